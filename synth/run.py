"""`python -m synth run`: ask the teacher for every planned prompt, crash-safe, within rate and budget limits.

Design (see /work/shared/notes/teacher-client.md for the measurements behind it):
- N workers pull lazily from the plan iterator (never one task per prompt), so a 1M-prompt plan costs no memory.
- Every HTTP attempt passes a shared AIMD concurrency gate and shared RPM/TPM token buckets; a burst of 429s
  halves the gate for everyone, which is what stops a Retry-After stampede. Back-off sleeps happen outside the gate.
- samples.jsonl is appended + fsynced per record; on start a torn last line is truncated and finished prompt ids
  are skipped, so kill -9 at any point loses at most in-flight work and never duplicates a record.
"""
from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import dataclasses
import datetime as _dt
import fcntl
import json
import os
import random
import signal
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

from distillery.record import RecordError, dumps, validate

EXIT_OK, EXIT_FAILED, EXIT_BAD_ARGS, EXIT_AUTH, EXIT_LOCKED, EXIT_BUDGET, EXIT_INTERRUPTED = 0, 1, 2, 3, 4, 5, 130

EPILOG = """exit codes:
  0    every planned prompt has a record in samples.jsonl
  1    some prompts failed (listed in failures.jsonl; the next run retries them) or the teacher was unreachable
  2    bad recipe or arguments
  3    the teacher refused the API key (401/403); the run stopped at once
  4    another run holds the lock on --out
  5    a budget cap (--max-requests / --max-tokens-budget / --max-cost) was reached; rerun to continue
  130  interrupted (SIGINT/SIGTERM); files are valid, rerun to continue
environment: OPENAI_API_KEY (or --api-key-file), OPENAI_BASE_URL (or --base-url)."""


class RunError(Exception):
    """A run that cannot start or must stop; `code` is the process exit code."""

    def __init__(self, message: str, code: int):
        super().__init__(message)
        self.code = code


class LockedError(RunError):
    def __init__(self, out: Path):
        super().__init__(f"{out}: another synth run is using this folder (lock {out / '.lock'})", EXIT_LOCKED)


class AuthError(RunError):
    def __init__(self, message: str):
        super().__init__(message, EXIT_AUTH)


@dataclasses.dataclass
class RunConfig:
    """Everything a run needs; built from the recipe's teacher section and the command line."""
    out: Path
    model: str
    api_key: str = dataclasses.field(repr=False, default="")
    base_url: str | None = None
    concurrency: int = 64
    rpm: float | None = None
    tpm: float | None = None
    max_requests: int | None = None
    max_tokens_budget: int | None = None
    max_cost: float | None = None
    timeout: float = 60.0
    max_attempts: int = 6
    temperature: float | None = None
    top_p: float | None = None
    max_tokens: int | None = None
    n: int = 1
    price_input_per_mtok: float = 0.0
    price_output_per_mtok: float = 0.0
    recipe_name: str = ""
    recipe_hash: str = ""
    progress_interval: float = 2.0
    unreachable_after: int = 3  # prompts in a row lost to connection errors, with no success yet, mean "down"

    def redact(self, text: str) -> str:
        return text.replace(self.api_key, "***") if self.api_key else text


# ---------------------------------------------------------------------------------------------- store

class Store:
    """The --out folder: lock, samples.jsonl (append+fsync per record), failures.jsonl, summary.json."""

    def __init__(self, out: Path):
        self.out = out
        out.mkdir(parents=True, exist_ok=True)
        self._lock_fd = os.open(out / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._lock_fd)
            raise LockedError(out) from None
        self.done: set[str] = self._recover(out / "samples.jsonl")
        self.previous_failures = self._read_failures(out / "failures.jsonl")
        self._samples = open(out / "samples.jsonl", "ab")
        # Failures are rewritten per run: whatever failed before is retried now and re-listed if it fails again.
        self._failures = open(out / "failures.jsonl", "wb")

    @staticmethod
    def _recover(path: Path) -> set[str]:
        done: set[str] = set()
        if not path.exists():
            return done
        with open(path, "r+b") as f:
            data = f.read()
            end = data.rfind(b"\n") + 1
            if end < len(data):  # torn last line from a crash: cut it, its prompt is simply asked again
                f.truncate(end)
                f.flush()
                os.fsync(f.fileno())
        for line in data[:end].splitlines():
            try:
                rec = json.loads(line)
                done.add(rec["meta"]["prompt_id"])
            except (ValueError, KeyError, TypeError):
                continue
        return done

    @staticmethod
    def _read_failures(path: Path) -> int:
        if not path.exists():
            return 0
        return sum(1 for line in path.read_bytes().splitlines() if line.strip())

    def _append(self, f, obj_line: str) -> None:
        f.write(obj_line.encode("utf-8") + b"\n")
        f.flush()
        os.fsync(f.fileno())

    def write_records(self, records: list[dict]) -> None:
        for rec in records:
            self._append(self._samples, dumps(rec))

    def write_failure(self, prompt_id: str, reason: str, attempts: int) -> None:
        self._append(self._failures, dumps({"id": prompt_id, "reason": reason, "attempts": attempts,
                                            "at": _now_iso()}))

    def write_summary(self, summary: dict) -> None:
        tmp = self.out / "summary.json.tmp"
        tmp.write_text(json.dumps(summary, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
        os.replace(tmp, self.out / "summary.json")

    def close(self) -> None:
        for f in (self._samples, self._failures):
            with contextlib.suppress(Exception):
                f.close()
        with contextlib.suppress(OSError):
            os.close(self._lock_fd)


def _now_iso() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


# ---------------------------------------------------------------------------------------------- limiters

class TokenBucket:
    """`per_minute` refilled continuously. `burst` is the bucket size: 1 for requests (even pacing, so any window
    of T seconds holds at most rate*T + 1 requests, measured at the server); about a second's worth for tokens."""

    def __init__(self, per_minute: float, burst: float = 1.0):
        self.rate = per_minute / 60.0
        self.capacity = max(1.0, burst)
        self.tokens = self.capacity
        self.t = time.monotonic()

    async def take(self, amount: float = 1.0) -> None:
        amount = min(amount, self.capacity)  # a single request bigger than the burst still goes, alone
        while True:
            now = time.monotonic()
            self.tokens = min(self.capacity, self.tokens + (now - self.t) * self.rate)
            self.t = now
            if self.tokens >= amount:
                self.tokens -= amount
                return
            await asyncio.sleep((amount - self.tokens) / self.rate)


class AIMDGate:
    """Adaptive concurrency. Halve on a *burst* of 429s (>= 3 and >= 25% of the responses of the last second, at
    most once per `cooldown`): a lone random 429 must not make the run crawl. +1 after each `streak` successes."""

    def __init__(self, limit: int, cooldown: float = 1.0, streak: int = 4, window: float = 1.0):
        self.max = limit
        self.limit = float(limit)
        self.in_flight = 0
        self.cooldown = cooldown
        self.streak_needed = streak
        self.window = window
        self._streak = 0
        self._last_cut = 0.0
        self._recent: collections.deque[tuple[float, bool]] = collections.deque()
        self._recent_429 = 0
        self._cond = asyncio.Condition()

    async def __aenter__(self):
        async with self._cond:
            await self._cond.wait_for(lambda: self.in_flight < int(self.limit))
            self.in_flight += 1

    async def __aexit__(self, *exc):
        async with self._cond:
            self.in_flight -= 1
            self._cond.notify_all()

    def _note(self, throttled: bool) -> None:
        now = time.monotonic()
        self._recent.append((now, throttled))
        self._recent_429 += throttled
        while self._recent and self._recent[0][0] < now - self.window:
            self._recent_429 -= self._recent.popleft()[1]

    def throttled(self) -> None:
        self._note(True)
        self._streak = 0
        now = time.monotonic()
        burst = self._recent_429 >= 3 and self._recent_429 >= 0.25 * len(self._recent)
        if burst and now - self._last_cut >= self.cooldown:
            self._last_cut = now
            self.limit = max(1.0, self.limit / 2)

    def succeeded(self) -> None:
        self._note(False)
        self._streak += 1
        if self._streak >= self.streak_needed and self.limit < self.max:
            self._streak = 0
            self.limit = min(float(self.max), self.limit + 1)
            self._wake()

    def _wake(self) -> None:
        async def _notify():
            async with self._cond:
                self._cond.notify_all()
        asyncio.ensure_future(_notify())


# ---------------------------------------------------------------------------------------------- engine

class _Retryable(Exception):
    def __init__(self, reason: str, retry_after: float | None = None, connection: bool = False):
        super().__init__(reason)
        self.reason = reason
        self.retry_after = retry_after
        self.connection = connection


class _Final(Exception):
    """Not worth retrying (e.g. 400): the prompt is recorded as failed."""


class _Stop(Exception):
    """Budget reached or run stopping: leave the prompt unrecorded so the next run asks again."""


@dataclasses.dataclass
class Stats:
    done: int = 0
    failed: int = 0
    skipped: int = 0
    requests: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost: float = 0.0
    retries: int = 0
    throttled: int = 0


def _retry_after(exc) -> float | None:
    resp = getattr(exc, "response", None)
    if resp is None:
        return None
    h = resp.headers
    for name, scale in (("retry-after-ms", 1e-3), ("retry-after", 1.0)):
        v = h.get(name)
        if v:
            try:
                return max(0.0, float(v) * scale)
            except ValueError:
                continue
    return None


class Engine:
    def __init__(self, cfg: RunConfig, store: Store, client=None, say: Callable[[str], None] | None = None):
        self.cfg = cfg
        self.store = store
        self.client = client
        self.say = say or (lambda s: print(cfg.redact(s), file=sys.stderr, flush=True))
        self.stats = Stats()
        self.gate = AIMDGate(cfg.concurrency)
        self.rpm = TokenBucket(cfg.rpm) if cfg.rpm else None
        self.tpm = TokenBucket(cfg.tpm, burst=cfg.tpm / 60.0) if cfg.tpm else None
        self.stopping: str | None = None  # why feeding stopped: budget | interrupted | auth | unreachable
        self.stop_message = ""
        self._conn_lost_in_a_row = 0
        self._ever_ok = False
        self.t0 = time.monotonic()

    # -- budget
    def _budget_hit(self) -> str | None:
        c, s = self.cfg, self.stats
        if c.max_requests is not None and s.requests >= c.max_requests:
            return f"request budget reached ({s.requests} requests)"
        if c.max_tokens_budget is not None and s.prompt_tokens + s.completion_tokens >= c.max_tokens_budget:
            return f"token budget reached ({s.prompt_tokens + s.completion_tokens} tokens)"
        if c.max_cost is not None and s.cost >= c.max_cost:
            return f"cost budget reached ({s.cost:.4f})"
        return None

    def _stop(self, why: str, message: str) -> None:
        if self.stopping is None:
            self.stopping = why
            self.stop_message = message

    # -- one HTTP attempt
    async def _attempt(self, prompt) -> tuple[Any, float]:
        import openai
        est = sum(len(str(m.get("content", ""))) for m in prompt.messages) + (self.cfg.max_tokens or 256) * self.cfg.n
        async with self.gate:
            if self.rpm:
                await self.rpm.take()
            if self.tpm:
                await self.tpm.take(est)
            if self.stopping:
                raise _Stop(self.stopping)
            hit = self._budget_hit()
            if hit:
                self._stop("budget", hit)
                raise _Stop("budget")
            self.stats.requests += 1
            kw: dict[str, Any] = {"model": self.cfg.model, "messages": prompt.messages}
            for k in ("temperature", "top_p", "max_tokens"):
                if getattr(self.cfg, k) is not None:
                    kw[k] = getattr(self.cfg, k)
            if self.cfg.n != 1:
                kw["n"] = self.cfg.n
            kw["extra_headers"] = {"X-Prompt-Id": prompt.id}  # lets a server or proxy trace retries per prompt
            t = time.monotonic()
            try:
                resp = await self.client.chat.completions.create(**kw)
            except (openai.AuthenticationError, openai.PermissionDeniedError) as e:
                self._stop("auth", f"teacher refused the API key (HTTP {e.status_code}); check OPENAI_API_KEY "
                                   f"/ --api-key-file")
                raise _Stop("auth") from None
            except openai.RateLimitError as e:
                self.stats.throttled += 1
                self.gate.throttled()
                raise _Retryable("HTTP 429 rate limited", _retry_after(e)) from None
            except openai.APITimeoutError:
                raise _Retryable(f"timeout after {self.cfg.timeout:g} s") from None
            except openai.APIConnectionError:
                raise _Retryable("connection error", connection=True) from None
            except openai.APIStatusError as e:
                if e.status_code >= 500 or e.status_code in (408, 409):
                    raise _Retryable(f"HTTP {e.status_code}", _retry_after(e)) from None
                raise _Final(f"HTTP {e.status_code}") from None
            except ValueError as e:  # malformed body: json.JSONDecodeError / UnicodeDecodeError, not APIError
                raise _Retryable(f"malformed response ({type(e).__name__})") from None
            latency = time.monotonic() - t
        return resp, latency

    def _account(self, resp) -> None:
        u = getattr(resp, "usage", None)
        pt = int(getattr(u, "prompt_tokens", 0) or 0) if u else 0
        ct = int(getattr(u, "completion_tokens", 0) or 0) if u else 0
        self.stats.prompt_tokens += pt
        self.stats.completion_tokens += ct
        self.stats.cost += (pt * self.cfg.price_input_per_mtok + ct * self.cfg.price_output_per_mtok) / 1e6

    def _wait(self, retry_state) -> float:
        from tenacity import wait_exponential_jitter
        exc = retry_state.outcome.exception()
        ra = getattr(exc, "retry_after", None)
        if ra is not None:  # honour Retry-After, plus jitter so the retries of one burst do not land together
            return ra + random.uniform(0, max(0.05, ra * 0.5))
        return wait_exponential_jitter(multiplier=0.2, max=10.0, jitter=0.5)(retry_state)

    async def _ask(self, prompt) -> None:
        from tenacity import AsyncRetrying, RetryError, retry_if_exception_type, stop_after_attempt
        attempts = 0
        try:
            async for attempt in AsyncRetrying(stop=stop_after_attempt(self.cfg.max_attempts), wait=self._wait,
                                               retry=retry_if_exception_type(_Retryable), reraise=True):
                with attempt:
                    attempts += 1
                    if attempts > 1:
                        self.stats.retries += 1
                    resp, latency = await self._attempt(prompt)
                    self._account(resp)
                    records = self._records(prompt, resp, latency, attempts)  # raises _Retryable on bad choices
        except _Retryable as e:
            self._fail(prompt, e.reason, attempts)
            if e.connection and not self._ever_ok:
                self._conn_lost_in_a_row += 1
                if self._conn_lost_in_a_row >= self.cfg.unreachable_after:
                    self._stop("unreachable", f"cannot reach the teacher at {self.cfg.base_url or 'default URL'} "
                                              f"({attempts} attempts each for {self._conn_lost_in_a_row} prompts)")
            return
        except _Final as e:
            self._fail(prompt, str(e), attempts)
            return
        except (_Stop, RetryError):
            return
        self._ever_ok = True
        self._conn_lost_in_a_row = 0
        self.gate.succeeded()
        self.store.write_records(records)
        self.stats.done += 1

    def _fail(self, prompt, reason: str, attempts: int) -> None:
        self.store.write_failure(prompt.id, self.cfg.redact(reason), attempts)
        self.stats.failed += 1

    def _records(self, prompt, resp, latency: float, attempts: int) -> list[dict]:
        choices = list(getattr(resp, "choices", None) or [])
        if not choices:
            raise _Retryable("response has no choices")
        usage = getattr(resp, "usage", None)
        created = _now_iso()
        teacher = {"model": self.cfg.model, "temperature": self.cfg.temperature, "top_p": self.cfg.top_p,
                   "max_tokens": self.cfg.max_tokens, "n": self.cfg.n}
        out = []
        for ch in choices:
            fr = ch.finish_reason
            if fr in ("length", "content_filter"):  # truncated or filtered text is not a sample
                raise _Retryable(f"finish_reason={fr}")
            text = ((ch.message.content if ch.message else None) or "").strip()
            idx = int(getattr(ch, "index", 0) or 0)
            meta = dict(prompt.meta)
            meta.update({
                "recipe": meta.get("recipe", self.cfg.recipe_name), "teacher": teacher,
                "usage": {"prompt_tokens": getattr(usage, "prompt_tokens", None),
                          "completion_tokens": getattr(usage, "completion_tokens", None)},
                "latency_s": round(latency, 4), "finish_reason": fr, "attempts": attempts, "created_at": created,
                "choice_index": idx, "prompt_id": prompt.id,
                "provenance": {"source": "teacher", "run": self.cfg.out.name},
            })
            if self.cfg.recipe_hash:
                meta.setdefault("recipe_hash", self.cfg.recipe_hash)
            rec = {"id": f"{prompt.id}-{idx}", "instruction": prompt.instruction, "input": prompt.input,
                   "output": text, "meta": meta}
            try:
                validate(rec, require_id=True)
            except RecordError as e:
                raise _Retryable(f"invalid sample: {e}") from None
            out.append(rec)
        return out

    # -- pool
    async def _worker(self, it: Iterator) -> None:
        while self.stopping is None:
            try:
                prompt = next(it)  # synchronous and atomic under asyncio: workers share one lazy iterator
            except StopIteration:
                return
            if prompt.id in self.store.done:
                self.stats.skipped += 1
                continue
            await self._ask(prompt)

    def summary(self) -> dict:
        el = time.monotonic() - self.t0
        s = self.stats
        return {"done": s.done, "failed": s.failed, "skipped_already_done": s.skipped, "requests": s.requests,
                "retries": s.retries, "throttled_429": s.throttled,
                "tokens": {"prompt": s.prompt_tokens, "completion": s.completion_tokens,
                           "total": s.prompt_tokens + s.completion_tokens},
                "cost": round(s.cost, 6), "elapsed_s": round(el, 3),
                "req_per_s": round(s.requests / el, 3) if el > 0 else 0.0,
                "concurrency_limit_now": int(self.gate.limit), "stopped": self.stopping,
                "stop_message": self.cfg.redact(self.stop_message)}

    def _progress_line(self) -> str:
        s = self.stats
        el = time.monotonic() - self.t0
        return (f"[synth] done={s.done} failed={s.failed} skipped={s.skipped} requests={s.requests} "
                f"retries={s.retries} 429s={s.throttled} in_flight={self.gate.in_flight}/{int(self.gate.limit)} "
                f"tokens={s.prompt_tokens + s.completion_tokens} cost={s.cost:.4f} "
                f"req/s={s.requests / el if el else 0:.1f} elapsed={el:.1f}s")

    async def _progress(self) -> None:
        if sys.stdout.isatty():
            from rich.live import Live
            from rich.text import Text
            with Live(Text(self._progress_line()), refresh_per_second=4, transient=False) as live:
                while True:
                    await asyncio.sleep(0.25)
                    live.update(Text(self._progress_line()))
        while True:
            await asyncio.sleep(self.cfg.progress_interval)
            print(self._progress_line(), flush=True)

    async def run(self, plan: Iterable) -> int:
        it = iter(plan)
        loop = asyncio.get_running_loop()
        workers = [asyncio.ensure_future(self._worker(it)) for _ in range(self.cfg.concurrency)]
        interrupted = asyncio.Event()

        def _on_signal() -> None:
            if interrupted.is_set():  # second signal: stop waiting for in-flight requests
                for w in workers:
                    w.cancel()
            interrupted.set()
            self._stop("interrupted", "interrupted: stopped feeding, in-flight requests finishing")

        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, _on_signal)
        prog = asyncio.ensure_future(self._progress())
        try:
            all_done = asyncio.ensure_future(asyncio.gather(*workers, return_exceptions=True))
            await asyncio.wait([all_done, asyncio.ensure_future(interrupted.wait())],
                               return_when=asyncio.FIRST_COMPLETED)
            if interrupted.is_set() and not all_done.done():
                # in-flight requests get one timeout's worth of grace, then are cancelled (asked again next run)
                await asyncio.wait([all_done], timeout=min(self.cfg.timeout, 10.0))
                for w in workers:
                    w.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await all_done
        finally:
            prog.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await prog
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.remove_signal_handler(sig)
        print(self._progress_line(), flush=True)
        if self.stopping == "auth":
            return EXIT_AUTH
        if self.stopping == "interrupted":
            return EXIT_INTERRUPTED
        if self.stopping == "budget":
            return EXIT_BUDGET
        if self.stopping == "unreachable" or self.stats.failed:
            return EXIT_FAILED
        return EXIT_OK


def make_client(cfg: RunConfig):
    """AsyncOpenAI with its own retries off (we retry with a shared limiter) on the cheaper aiohttp transport."""
    import openai
    try:
        import aiohttp
        http = openai.DefaultAioHttpClient(
            connector=aiohttp.TCPConnector(limit=cfg.concurrency + 8, limit_per_host=cfg.concurrency + 8))
    except Exception:  # noqa: BLE001 - the extra is optional; the default httpx2 transport still works
        http = None
    kw: dict[str, Any] = {"api_key": cfg.api_key, "max_retries": 0, "timeout": cfg.timeout}
    if cfg.base_url:
        kw["base_url"] = cfg.base_url
    if http is not None:
        kw["http_client"] = http
    return openai.AsyncOpenAI(**kw)


async def run_async(cfg: RunConfig, plan: Iterable, store: Store) -> tuple[int, dict]:
    client = make_client(cfg)
    eng = Engine(cfg, store, client)
    try:
        code = await eng.run(plan)
    finally:
        with contextlib.suppress(Exception):
            await client.close()
    summary = eng.summary()
    summary["exit_code"] = code
    store.write_summary(summary)
    if eng.stop_message:
        eng.say(f"synth run: {eng.stop_message}")
    if code == EXIT_FAILED and eng.stats.failed:
        eng.say(f"synth run: {eng.stats.failed} prompts failed, see {cfg.out / 'failures.jsonl'} "
                f"(rerun to retry them)")
    return code, summary


def run(cfg: RunConfig, plan: Iterable) -> int:
    """Run the plan into cfg.out; returns the exit code. Raises LockedError if the folder is in use."""
    store = Store(cfg.out)
    try:
        code, _ = asyncio.run(run_async(cfg, plan, store))
        return code
    finally:
        store.close()


# ---------------------------------------------------------------------------------------------- CLI

def add_arguments(p: argparse.ArgumentParser) -> None:
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.epilog = EPILOG
    p.add_argument("--recipe", required=True, help="recipe TOML (e.g. dataset/recipes/blessing.toml)")
    p.add_argument("--out", required=True, help="output folder: samples.jsonl, failures.jsonl, summary.json; "
                                               "rerunning into the same folder resumes")
    p.add_argument("--model", help="teacher model (default: the recipe's teacher.model)")
    p.add_argument("--concurrency", type=int, default=64, help="max requests in flight (default 64; lowered "
                                                               "automatically on bursts of 429)")
    p.add_argument("--limit", type=int, help="only the first N planned prompts")
    p.add_argument("--seed", type=int, default=None, help="plan seed (default: the recipe's sampling.seed, as `synth plan` uses)")
    p.add_argument("--rpm", type=float, help="requests per minute cap (client-side token bucket)")
    p.add_argument("--tpm", type=float, help="tokens per minute cap (estimated: prompt chars + max_tokens*n)")
    p.add_argument("--max-requests", type=int, help="stop cleanly after this many HTTP requests (exit 5)")
    p.add_argument("--max-tokens-budget", type=int, help="stop cleanly after this many prompt+completion tokens")
    p.add_argument("--max-cost", type=float, help="stop cleanly at this cost (recipe prices per million tokens)")
    p.add_argument("--timeout", type=float, default=60.0, help="per-request timeout in seconds (default 60)")
    p.add_argument("--max-attempts", type=int, default=6, help="HTTP attempts per prompt before it is recorded "
                                                               "as failed (default 6)")
    p.add_argument("--api-key-file", help="file holding the API key (default: $OPENAI_API_KEY)")
    p.add_argument("--base-url", help="teacher base URL, e.g. http://127.0.0.1:8000/v1 (default: $OPENAI_BASE_URL)")


def _err(msg: str) -> None:
    print(f"synth run: {msg}", file=sys.stderr, flush=True)


def main(args: argparse.Namespace) -> int:
    """Entry point for `python -m synth run`; returns the exit code (see EPILOG)."""
    if args.concurrency < 1 or args.max_attempts < 1 or args.timeout <= 0 or (args.limit is not None and args.limit < 0):
        _err("--concurrency and --max-attempts must be >= 1, --timeout > 0, --limit >= 0")
        return EXIT_BAD_ARGS
    key = os.environ.get("OPENAI_API_KEY", "")
    if args.api_key_file:
        try:
            key = Path(args.api_key_file).read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as e:
            _err(f"{args.api_key_file}: cannot read API key file ({type(e).__name__})")
            return EXIT_BAD_ARGS
    if not key:
        _err("no API key: set OPENAI_API_KEY or pass --api-key-file")
        return EXIT_BAD_ARGS
    try:
        from synth.plan import iter_plan
        from synth.recipe import RecipeError, load_recipe
    except ImportError as e:
        _err(f"synth.recipe / synth.plan not available ({e})")
        return EXIT_BAD_ARGS
    try:
        recipe = load_recipe(args.recipe)
        plan = iter_plan(recipe, args.seed, args.limit)
    except RecipeError as e:
        _err(str(e))
        return EXIT_BAD_ARGS
    except OSError as e:
        _err(f"{args.recipe}: {e.strerror or e}")
        return EXIT_BAD_ARGS
    t = recipe.teacher
    cfg = RunConfig(out=Path(args.out), model=args.model or t.model, api_key=key,
                    base_url=args.base_url or os.environ.get("OPENAI_BASE_URL") or None,
                    concurrency=args.concurrency, rpm=args.rpm, tpm=args.tpm, max_requests=args.max_requests,
                    max_tokens_budget=args.max_tokens_budget, max_cost=args.max_cost, timeout=args.timeout,
                    max_attempts=args.max_attempts, temperature=t.temperature, top_p=t.top_p,
                    max_tokens=t.max_tokens, n=t.n or 1,
                    price_input_per_mtok=t.price_input_per_mtok or 0.0,
                    price_output_per_mtok=t.price_output_per_mtok or 0.0,
                    recipe_name=recipe.name, recipe_hash=recipe.hash)
    try:
        return run(cfg, plan)
    except RunError as e:
        _err(cfg.redact(str(e)))
        return e.code


if __name__ == "__main__":  # `python -m synth.run ...` works even without the synth CLI shell
    _p = argparse.ArgumentParser(prog="python -m synth run", description="Ask the teacher for every planned prompt.")
    add_arguments(_p)
    sys.exit(main(_p.parse_args()))
