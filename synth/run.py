"""`python -m synth run`: ask the teacher for every planned prompt, crash-safe, within rate and budget limits.

Design (see /work/shared/notes/teacher-client.md for the measurements behind it):
- 2×concurrency workers pull lazily from the plan iterator (never one task per prompt), so a 1M-prompt plan
  costs no memory; a shared gate keeps at most `concurrency` requests in flight.
- Every HTTP attempt passes a shared AIMD concurrency gate and shared RPM/TPM token buckets; a burst of 429s
  halves the gate and holds everyone for the Retry-After once (the shared back-off), which is what stops a
  Retry-After stampede. A burst is a high *share* of push-back among recent responses, not a count, so occasional
  random 429s only make their own prompts wait their Retry-After. Back-off sleeps happen outside the gate.
  A burst of 429s also caps the request *rate* at what the server accepted (AcceptedRate): a rate limiter answers
  429 at once, so holding fewer requests in flight alone would not slow the client down.
- samples.jsonl gets each record written and flushed as it arrives (fsync batched in a background thread, see
  Store); on start a torn last line is truncated and finished prompt ids are skipped, so kill -9 at any point
  loses at most in-flight work and never duplicates a record.
- The HTTP call itself lives in synth/transport.py: a lean aiohttp client by default, the openai SDK with
  `--transport sdk` (numbers in docs/benchmarks.md).
"""
from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import dataclasses
import fcntl
import json
import os
import random
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, TextIO

import orjson
from tenacity import AsyncRetrying, RetryError, retry_if_exception_type

from distillery.record import RecordError, dumps, validate

from . import progress
from .progress import Snapshot
from .transport import DEFAULT_BASE_URL, TRANSPORTS, Final, KeyRefused, Reply, Retryable, Transport, make_transport

EXIT_OK, EXIT_FAILED, EXIT_BAD_ARGS, EXIT_AUTH, EXIT_LOCKED, EXIT_BUDGET, EXIT_INTERRUPTED = 0, 1, 2, 3, 4, 5, 130

EPILOG = """exit codes:
  0    every planned prompt has a record in samples.jsonl
  1    some prompts failed (listed in failures.jsonl; the next run retries them), the teacher was unreachable,
       or it refused the first prompts outright with one status (e.g. 404: wrong --base-url or --model)
  2    bad recipe or arguments
  3    the teacher refused the API key (401/403) or said its quota is spent (429 insufficient_quota); the run
       stopped at once
  4    another run holds the lock on --out
  5    a budget cap (--max-requests / --max-tokens-budget / --max-cost) was reached; rerun to continue
  130  interrupted (SIGINT/SIGTERM); files are valid, rerun to continue
environment: OPENAI_API_KEY (or --api-key-file), OPENAI_BASE_URL (or --base-url).
durability: every record is flushed as it arrives (a crash or kill -9 loses nothing received) and fsynced at
most 0.1 s later (a power cut loses at most that, and those prompts are asked again by the next run)."""


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
    progress_interval: float = 2.0  # seconds between plain progress lines when stdout is not a terminal
    transport: str = "aiohttp"
    unreachable_after: int = 3  # prompts in a row lost to connection errors, with no success yet, mean "down"
    refused_after: int = 5  # prompts in a row refused with one HTTP status (404, 400), no success yet: stop

    def redact(self, text: str) -> str:
        return text.replace(self.api_key, "***") if self.api_key else text


# ---------------------------------------------------------------------------------------------- store

class Store:
    """The --out folder: lock, samples.jsonl, failures.jsonl, summary.json.

    Durability (group commit): every record is written and flushed to the kernel as soon as it arrives, so a
    process crash or kill -9 loses nothing received; a background thread fsyncs at most every SYNC_EVERY seconds
    and at close, so a power loss loses at most the last ~0.1 s of records (their prompts are asked again).
    fsync per record in the event loop cost ~0.6 ms of a 200 ms request cycle and stalled every other request.
    """
    SYNC_EVERY = 0.1

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
        self._samples = open(out / "samples.jsonl", "ab")
        # Failures are rewritten per run: whatever failed before is retried now and re-listed if it fails again.
        self._failures = open(out / "failures.jsonl", "wb")
        self._dirty = False
        self._closing = threading.Event()
        self._syncer = threading.Thread(target=self._sync_loop, name="synth-fsync", daemon=True)
        self._syncer.start()

    @staticmethod
    def _recover(path: Path) -> set[str]:
        """Prompt ids already answered; a torn last line (crash mid-write) is cut, its prompt is simply asked again.
        Streams the file: resuming a 100k-record run must not load it whole."""
        done: set[str] = set()
        if not path.exists():
            return done
        good_end = 0
        with open(path, "r+b") as f:
            for line in f:
                if not line.endswith(b"\n"):
                    break
                good_end += len(line)
                try:
                    done.add(orjson.loads(line)["meta"]["prompt_id"])
                except (ValueError, KeyError, TypeError):
                    continue
            if good_end < os.fstat(f.fileno()).st_size:
                f.truncate(good_end)
                os.fsync(f.fileno())
        return done

    def _sync_loop(self) -> None:
        while not self._closing.wait(self.SYNC_EVERY):
            if self._dirty:
                self._dirty = False
                self._fsync()

    def _fsync(self) -> None:
        for f in (self._samples, self._failures):
            with contextlib.suppress(OSError, ValueError):
                os.fsync(f.fileno())

    def _append(self, f, line: str) -> None:
        f.write(line.encode("utf-8") + b"\n")
        f.flush()  # in the kernel now: survives kill -9
        self._dirty = True

    def write_records(self, records: list[dict]) -> None:
        # orjson writes the line distillery.record.dumps would (compact, UTF-8, not ASCII-escaped; only a float
        # exponent may read 1e-7 for 1e-07) in a tenth of the time; distillery.record.validate checked it just before.
        for rec in records:
            self._samples.write(orjson.dumps(rec, option=orjson.OPT_APPEND_NEWLINE))
        self._samples.flush()  # in the kernel now: survives kill -9
        self._dirty = True

    def write_failure(self, prompt_id: str, reason: str, attempts: int) -> None:
        self._append(self._failures, dumps({"id": prompt_id, "reason": reason, "attempts": attempts,
                                            "at": _now_iso()}))

    def write_summary(self, summary: dict) -> None:
        tmp = self.out / "summary.json.tmp"
        tmp.write_text(json.dumps(summary, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
        os.replace(tmp, self.out / "summary.json")

    def close(self) -> None:
        self._closing.set()
        self._syncer.join()
        self._fsync()
        for f in (self._samples, self._failures):
            with contextlib.suppress(Exception):
                f.close()
        with contextlib.suppress(OSError):
            os.close(self._lock_fd)


_iso_second: list = [-1, ""]  # (whole second, its "YYYY-MM-DDTHH:MM:SS" text): formatted once a second, not per record


def _now_iso() -> str:
    """UTC now as 2026-11-28T12:40:47.123Z (what datetime.isoformat(timespec="milliseconds") gives, with Z)."""
    t = time.time()
    sec = int(t)
    if sec != _iso_second[0]:
        _iso_second[:] = [sec, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(sec))]
    return f"{_iso_second[1]}.{int((t - sec) * 1000):03d}Z"


# ---------------------------------------------------------------------------------------------- limiters

class TokenBucket:
    """`per_minute` refilled continuously. `burst` is the bucket size: 1 for requests (even pacing, so any window
    of T seconds holds at most rate*T + 1 requests, measured at the server); about a second's worth for tokens."""

    def __init__(self, per_minute: float, burst: float = 1.0):
        self.rate = per_minute / 60.0
        self.capacity = max(1.0, burst)
        self.tokens = self.capacity
        self.t = time.monotonic()
        self._turn = asyncio.Lock()

    async def take(self, amount: float = 1.0) -> None:
        amount = min(amount, self.capacity)  # a single request bigger than the burst still goes, alone
        # one taker at a time, in arrival order: a herd of sleepers all waking to re-check lost the race to each
        # other and paced 10-20% under the rate
        async with self._turn:
            while True:
                now = time.monotonic()
                self.tokens = min(self.capacity, self.tokens + (now - self.t) * self.rate)
                self.t = now
                if self.tokens >= amount:
                    self.tokens -= amount
                    return
                await asyncio.sleep((amount - self.tokens) / self.rate)


class RecentShare:
    """The share of flagged answers (push-back, 429s) among the last `size`, those of the last `memory` seconds, taken
    over at least `min_evidence`: how the gate and the rate cap tell a burst from random faults."""

    def __init__(self, size: int, min_evidence: int, memory: float = float("inf")):
        self.min_evidence = min_evidence
        self.memory = memory
        # (when, flagged, tagged)
        self._items: collections.deque[tuple[float, bool, bool]] = collections.deque(maxlen=size)
        self._flagged = 0

    def add(self, now: float, flagged: bool, tag: bool = False) -> None:
        self._forget(now)
        items = self._items
        if len(items) == items.maxlen:
            self._flagged -= items[0][1]  # about to fall out of the window
        items.append((now, flagged, tag))
        self._flagged += flagged

    def share(self, now: float) -> float:
        self._forget(now)
        return self._flagged / max(len(self._items), self.min_evidence)

    def drop_tagged(self) -> None:
        self._items = collections.deque((x for x in self._items if not x[2]), maxlen=self._items.maxlen)
        self._flagged = sum(x[1] for x in self._items)

    def _forget(self, now: float) -> None:
        items = self._items
        while items and items[0][0] < now - self.memory:
            self._flagged -= items.popleft()[1]


class AIMDGate:
    """Adaptive concurrency shared by every request (the shared back-off).

    Push-back (429s, 5xx, timeouts, lost connections) is judged by its *share* of the last `window` responses
    (those of the last `memory` seconds), never by a count: at 1,280 requests/s a 5% random 429 rate gives dozens
    of 429s a second, and pausing everyone for those crawls (the fault mix at concurrency 256 ran at half speed).
    Answers older than `memory` leave the window: after an outage had filled it with lost connections, a limit of 1
    brought so few new answers that every stray 429 cut it again, for a minute. Only when the share reaches `threshold`
    (a real rate limit or an overloaded server: then most answers are push-back) does the limit halve and every new
    request hold off for the server's Retry-After (default 1 s), at most once per `cooldown`. Until `window`
    responses have been seen the share is taken over `min_evidence` at least, so a few unlucky answers at the start
    are not a burst. Why 30% of 100: with 9% random push-back (the bench's fault mix) a given window reaches 30%
    with odds of ~2e-9 (the first 50 responses: ~2e-5), while a client over a real limit or in an outage sees well
    over half its answers pushed back. A lone 429 only makes its own prompt wait its Retry-After (outside the gate,
    so it holds no slot). +1 to the limit after each `streak` successes, or after each one while push-back is rare.
    A FIFO of futures instead of an asyncio.Condition: a release wakes exactly one waiter, not all of them."""

    def __init__(self, limit: int, cooldown: float = 1.0, streak: int = 4, window: int = 100,
                 threshold: float = 0.3, min_evidence: int = 50, memory: float = 10.0):
        self.max = limit
        self.limit = float(limit)
        self.in_flight = 0
        self.cooldown = cooldown
        self.streak_needed = streak
        self.threshold = threshold
        self._since_raise = 0  # successes since the limit was last raised
        self._last_cut = float("-inf")
        self._resume_at = 0.0
        self._recent = RecentShare(window, min_evidence, memory)  # tagged: pushed back by a lost connection
        self._waiters: collections.deque[asyncio.Future] = collections.deque()

    async def acquire(self, retry: bool = False) -> None:
        """Wait for a request slot. A retry goes to the front of the queue: finishing started prompts first keeps
        the run's tail short (a retry queued behind a full wave of fresh prompts lost a whole latency)."""
        pause = self._resume_at - time.monotonic()
        if pause > 0:  # the server asked everyone to back off
            await asyncio.sleep(pause)
        if self.in_flight < int(self.limit) and not self._waiters:
            self.in_flight += 1
            return
        fut = asyncio.get_running_loop().create_future()
        if retry:
            self._waiters.appendleft(fut)
        else:
            self._waiters.append(fut)
        self._wake()  # grants at once if only cancelled waiters were ahead of us
        try:
            await fut  # the releaser counted us in (hand-off)
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled():  # granted, then cancelled before running: give the slot back
                self.release()
            raise

    async def __aenter__(self):
        await self.acquire()

    async def __aexit__(self, *exc):
        self.release()

    def release(self) -> None:
        self.in_flight -= 1
        self._wake()

    def _wake(self) -> None:
        while self._waiters and self.in_flight < int(self.limit):
            fut = self._waiters.popleft()
            if not fut.done():  # a cancelled waiter left its future behind
                self.in_flight += 1
                fut.set_result(None)

    def forget_lost_connections(self) -> None:
        """The teacher answers again after an outage: its lost connections leave the window, so that the first
        stray fault after it does not halve a limit the outage already brought down to 1."""
        self._recent.drop_tagged()

    def push_back_share(self) -> float:
        return self._recent.share(time.monotonic())

    def hold(self, seconds: float) -> None:
        """No new request for `seconds` (in flight ones finish)."""
        if seconds > 0:
            self._resume_at = max(self._resume_at, time.monotonic() + seconds)

    def pushed_back(self, retry_after: float | None = None, lost_connection: bool = False) -> None:
        now = time.monotonic()
        self._recent.add(now, True, lost_connection)
        if self._recent.share(now) >= self.threshold and now - self._last_cut >= self.cooldown:
            self._last_cut = now
            self.limit = max(1.0, self.limit / 2)
            self.hold(min(retry_after if retry_after is not None else 1.0, 60.0))

    def succeeded(self) -> None:
        self._recent.add(time.monotonic(), False)
        self._since_raise += 1
        # +1 per `streak` successes, counted whether or not push-back came between them (it was "in a row": under
        # a 35% fault mix that almost never happened, and after an outage had halved the limit to 1 it stayed
        # there for a minute); +1 per success while push-back is under half the burst share (the server is fine
        # again), which doubles the limit every round trip, like TCP's slow start
        needed = 1 if self.push_back_share() < self.threshold / 2 else self.streak_needed
        if self.limit < self.max and self._since_raise >= needed:
            self._since_raise = 0
            self.limit = min(float(self.max), self.limit + 1)
            self._wake()


class AcceptedRate:
    """A requests/s cap for servers that limit a *rate* (a provider's token bucket), engaged by a burst of 429s.

    The concurrency gate alone cannot hold a client under a rate limit: a 429 comes back at once, its slot is free
    again at once, and the next request meets the same limit. So when 429s are 30% of the last answers (at least 50;
    only answers and 429s count here: an outage's lost connections are the gate's business, not a rate), the cap is
    set a little under what the server accepted over the last second (its limit, measured; seconds everyone held off
    are left out of that second), then raised per success (see PROBE) until 10% of the answers since are 429s and
    it is set again: a sawtooth around the limit instead of a stampede. Until a quarter second of answers makes the
    rate measurable, everyone holds off. Measured in docs/benchmarks.md."""

    WINDOW = 1.0        # seconds of successes the accepted rate is measured over
    MIN_HISTORY = 0.25  # seconds of answers needed to measure; everyone holds off this long at a time meanwhile
    UNDER = 0.9         # the cap starts this far under the measured rate
    # req/s added per success: PROBE_FAST (doubling a second) after a second without 429s (a cap set too low,
    # measured while prompts sat in their Retry-After waits, comes back within seconds), else PROBE (+10% a second)
    PROBE_FAST, PROBE = 1.0, 0.1
    BURST_SHARE, RECENT = 0.3, 100   # engage: 429s among the last RECENT answers (taken over at least 50)
    RECUT_SHARE, RECUT_EVIDENCE = 0.1, 50  # set again: 429s among the answers since the cap was last set

    def __init__(self):
        self.bucket: TokenBucket | None = None
        self.measured: float | None = None  # requests/s the server accepted, when the cap was last set
        self.best: float | None = None      # the most it accepted in a second while the cap was on
        self._last_429 = float("-inf")
        self._ok: collections.deque[float] = collections.deque()   # success times, last WINDOW seconds
        self._recent = RecentShare(self.RECENT, min_evidence=50)  # flagged: a 429
        self._first_ok: float | None = None
        self._held: collections.deque[tuple[float, float]] = collections.deque()  # (from, until) everyone held off
        self._due = False
        self._answers = self._429s = 0  # since the cap was last set

    def _note(self, now: float, throttled: bool) -> None:
        self._recent.add(now, throttled)
        self._answers += 1
        self._429s += throttled

    def succeeded(self) -> None:
        now = time.monotonic()
        self._note(now, False)
        if self._first_ok is None:
            self._first_ok = now
        ok = self._ok
        ok.append(now)
        while ok[0] < now - self.WINDOW:
            ok.popleft()
        if self.bucket:
            # near the limit (a 429 within the last second) slowly, else fast
            self.bucket.rate += self.PROBE if now - self._last_429 < self.WINDOW else self.PROBE_FAST
            if now - self._ok[0] >= 0.9 * self.WINDOW:  # a full second of answers under the cap
                self.best = max(self.best or 0.0, len(self._ok) / self.WINDOW)
        if self._due and now - self._first_ok >= self.MIN_HISTORY:
            self._set_cap(now)

    def throttled(self) -> float:
        """Every 429. Returns how long everyone should hold off (0: no need)."""
        now = self._last_429 = time.monotonic()
        self._note(now, True)
        if self.bucket is None:
            burst = self._recent.share(now) >= self.BURST_SHARE
        else:
            burst = self._answers >= self.RECUT_EVIDENCE and self._429s >= self.RECUT_SHARE * self._answers
        self._due = self._due or burst
        if not self._due:
            return 0.0
        if self._first_ok is None or now - self._first_ok < self.MIN_HISTORY:
            # the rate cannot be measured yet and sending more only feeds the 429s; the cap is set by the first
            # success that makes it measurable
            if not self._held or self._held[-1][1] <= now:
                self._held.append((now, now + self.MIN_HISTORY))
            return self._held[-1][1] - now
        self._set_cap(now)
        return 0.0

    def _set_cap(self, now: float) -> None:
        self._due = False
        self._answers = self._429s = 0
        start = max(now - self.WINDOW, self._first_ok)
        while self._ok and self._ok[0] < start:
            self._ok.popleft()
        while self._held and self._held[0][1] <= start:
            self._held.popleft()
        held = sum(min(until, now) - max(since, start) for since, until in self._held if since < now)
        self.measured = len(self._ok) / max(0.1, now - start - held)
        cap = max(0.5, self.measured * self.UNDER)
        if self.bucket is None:
            self.bucket = TokenBucket(cap * 60.0, burst=max(1.0, cap * 0.02))  # 20 ms of slack for timer lateness
        elif cap < self.bucket.rate:
            self.bucket.rate = cap


# ---------------------------------------------------------------------------------------------- engine

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
    retrying: int = 0
    throttled: int = 0


THROTTLE_ALLOWANCE = 4  # 429s / lost connections a prompt may take per allowed retry before they count as failed
MAX_RETRY_AFTER = 60.0  # like the openai SDK: a longer Retry-After (a spent daily quota) is not waited out per prompt


def retry_wait(exc: BaseException, failures: int) -> float:
    """Exponential back-off with jitter after a prompt's `failures`-th failure, and never sooner than the server's
    Retry-After (capped at MAX_RETRY_AFTER, plus a little jitter: 1 s → up to 30 ms). Retry-After is a floor, not
    the wait: a limiter answering "retry in 5 ms" would otherwise get a prompt's six attempts within 30 ms and the
    prompt would be lost. The jitter is small because a real burst is spread by the shared gate's pause, and every
    extra 10% was 0.1 s more on each 429 in a prompt's chain, which is the run's tail (docs/benchmarks.md).
    Back-off: 0.1 s, 0.2 s, 0.4 s, … (max 10 s) plus up to 0.1 s of jitter (the AWS SDKs' base delay): a dropped
    connection or a cut body is usually a one-off, and a server in real trouble is slowed down for everyone by the
    gate instead."""
    backoff = min(10.0, 0.1 * 2 ** (failures - 1)) + random.uniform(0, 0.1)
    ra = getattr(exc, "retry_after", None)
    if ra is not None:
        ra = min(ra, MAX_RETRY_AFTER)
        return max(backoff, ra + random.uniform(0, 0.01 + ra * 0.02))
    return backoff


class Engine:
    def __init__(self, cfg: RunConfig, store: Store, transport: Transport, say: Callable[[str], None] | None = None,
                 total: int | None = None, progress_out: TextIO | None = None):
        self.cfg = cfg
        self.store = store
        self.transport = transport
        self.say = say or (lambda s: print(cfg.redact(s), file=sys.stderr, flush=True))
        self.total = total
        self.progress_out = progress_out
        self.stats = Stats()
        self.gate = AIMDGate(cfg.concurrency)
        self.rpm = TokenBucket(cfg.rpm) if cfg.rpm else None
        self.tpm = TokenBucket(cfg.tpm, burst=cfg.tpm / 60.0) if cfg.tpm else None
        self.accepted = AcceptedRate()
        self.stopping: str | None = None  # why feeding stopped: budget | interrupted | auth | unreachable | refused
        self.stop_message = ""
        self._conn_lost_in_a_row = 0
        self._refused: tuple[int | None, int] = (None, 0)  # (HTTP status, prompts in a row) before any success
        self._ever_ok = False
        self._reachable = asyncio.Event()  # cleared by a lost connection, set by the next success
        self._teacher = {"model": cfg.model, "temperature": cfg.temperature, "top_p": cfg.top_p,
                         "max_tokens": cfg.max_tokens, "n": cfg.n}
        self._provenance = {"source": "teacher", "run": cfg.out.name}
        # the policy is built once; each prompt gets a cheap copy() (tenacity keeps per-call state on the object)
        # (its stop rule, wait and sleep are per prompt: _retry passes _prompt_policy())
        self._retrying = AsyncRetrying(retry=retry_if_exception_type(Retryable), reraise=True)
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
    async def _attempt(self, prompt, retry: bool) -> tuple[Reply, float]:
        await self.gate.acquire(retry)
        try:
            if self.rpm:
                await self.rpm.take()
            if self.accepted.bucket:
                await self.accepted.bucket.take()
            if self.tpm:
                chars = sum(len(str(m.get("content", ""))) for m in prompt.messages)
                await self.tpm.take(chars + (self.cfg.max_tokens or 256) * self.cfg.n)
            if self.stopping:
                raise _Stop(self.stopping)
            hit = self._budget_hit()
            if hit:
                self._stop("budget", hit)
                raise _Stop("budget")
            self.stats.requests += 1
            t = time.monotonic()
            try:
                reply = await self.transport.complete(prompt.messages, prompt.id)
            except KeyRefused as e:
                self._stop("auth", "the teacher says the account's quota is spent (HTTP 429 insufficient_quota); "
                                   "add credit or use another key" if e.quota else
                                   f"teacher refused the API key (HTTP {e.status}); check OPENAI_API_KEY "
                                   f"/ --api-key-file")
                raise _Stop("auth") from None
            except Retryable as e:
                self.stats.throttled += e.throttled
                if e.connection:
                    self._reachable.clear()
                if e.overloaded:
                    self.gate.pushed_back(e.retry_after, e.connection)
                if e.throttled:
                    self.gate.hold(self.accepted.throttled())
                raise
            return reply, time.monotonic() - t
        finally:
            self.gate.release()

    def _account(self, reply: Reply) -> None:
        pt, ct = int(reply.prompt_tokens or 0), int(reply.completion_tokens or 0)
        self.stats.prompt_tokens += pt
        self.stats.completion_tokens += ct
        self.stats.cost += (pt * self.cfg.price_input_per_mtok + ct * self.cfg.price_output_per_mtok) / 1e6

    async def _ask(self, prompt) -> None:
        attempts = 0

        async def once() -> list[dict]:
            nonlocal attempts
            attempts += 1
            if attempts > 1:
                self.stats.retries += 1
                if attempts == 2:
                    self.stats.retrying += 1
            reply, latency = await self._attempt(prompt, attempts > 1)
            self._account(reply)
            return self._records(prompt, reply, latency, attempts)  # raises Retryable on bad choices

        try:
            try:
                # fast path: most prompts succeed at the first attempt, and tenacity's per-prompt set-up and
                # bookkeeping cost about a fifth of the engine's CPU a request (py-spy at concurrency 256)
                records = await once()
            except Retryable as first:
                records = await self._retry(once, first)
        except Retryable as e:
            self._fail(prompt, e.reason, attempts)
            if e.connection and not self._ever_ok:
                self._conn_lost_in_a_row += 1
                if self._conn_lost_in_a_row >= self.cfg.unreachable_after:
                    self._stop("unreachable", f"cannot reach the teacher at {self.cfg.base_url or DEFAULT_BASE_URL} "
                                              f"({attempts} attempts each for {self._conn_lost_in_a_row} prompts)")
            return
        except Final as e:
            self._fail(prompt, str(e), attempts)
            if e.status is not None and not self._ever_ok:
                status, n = self._refused
                self._refused = (e.status, n + 1 if status == e.status else 1)
                if self._refused[1] >= self.cfg.refused_after:
                    self._stop("refused", f"the teacher answered the first {self._refused[1]} prompts with "
                                          f"{self.cfg.redact(str(e))}; check --base-url, --model and the recipe's "
                                          f"teacher parameters")
            return
        except (_Stop, RetryError):
            return
        except Exception as e:  # noqa: BLE001 - a bug or an odd reply must cost one prompt, not a silent worker
            self._fail(prompt, f"unexpected {type(e).__name__}: {e}", attempts)
            return
        finally:
            if attempts > 1:
                self.stats.retrying -= 1
        self._ever_ok = True
        self._conn_lost_in_a_row = 0
        if not self._reachable.is_set():  # back after lost connections: they say nothing about its load now
            self._reachable.set()
            self.gate.forget_lost_connections()
        self.gate.succeeded()
        self.accepted.succeeded()
        self.store.write_records(records)
        self.stats.done += 1

    async def _retry(self, once: Callable[[], Any], first: Retryable) -> list[dict]:
        """Attempts 2..max under the tenacity policy. Attempt 1 already ran on the fast path: its error is replayed
        as tenacity's first attempt, so the attempt count and the waits are exactly the policy's. The waits (the
        server's Retry-After, else exponential back-off) are slept here, outside the gate: they hold no slot."""
        replay: Retryable | None = first
        stop, wait, sleep = self._prompt_policy()
        async for attempt in self._retrying.copy(stop=stop, wait=wait, sleep=sleep):
            with attempt:
                if replay is not None:
                    error, replay = replay, None
                    raise error
                records = await once()
        return records

    def _prompt_policy(self) -> tuple[Callable[[Any], bool], Callable[[Any], float], Callable[[float], Any]]:
        """One prompt's stop rule, wait and sleep.

        Stop: --max-attempts failed attempts, where a 429, or a lost connection to a teacher that has answered
        before, does not count until the prompt has had THROTTLE_ALLOWANCE x (max_attempts - 1) of them. Those say
        "not now", not "this prompt fails": while the client finds a server's rate limit (AcceptedRate) or a server
        restarts, prompts would otherwise burn their attempts within seconds and be recorded as failed (a 5 s
        restart failed ~40 of 1,000). The allowance (back-off growing to 10 s: about two and a half minutes) still
        ends a prompt a server never takes; a teacher never reached at all is stopped sooner by "cannot reach".
        Wait: retry_wait, its back-off growing with the attempts that counted (a 500 after an outage's excused
        attempts waits 0.1 s, not 10 s), or with all of them after an excused answer (a server that is down or
        limiting is not asked again and again). Sleep: after a lost connection, the back-off ends early as soon as
        any request succeeds again, so prompts do not idle for seconds after the server is back."""
        max_attempts = self.cfg.max_attempts
        allowance = THROTTLE_ALLOWANCE * (max_attempts - 1)
        excused = 0
        lost_connection = False

        last_excused = False
        seen = 0  # attempts accounted for: tenacity calls wait before stop, and either may come first

        def account(retry_state) -> None:
            nonlocal excused, lost_connection, last_excused, seen
            if retry_state.attempt_number == seen:
                return
            seen = retry_state.attempt_number
            e = retry_state.outcome.exception()
            lost_connection = bool(getattr(e, "connection", False))
            last_excused = bool(getattr(e, "throttled", False) or (lost_connection and self._ever_ok))
            excused += last_excused

        def stop(retry_state) -> bool:
            account(retry_state)
            return retry_state.attempt_number - min(excused, allowance) >= max_attempts

        def wait(retry_state) -> float:
            account(retry_state)
            n = retry_state.attempt_number
            return retry_wait(retry_state.outcome.exception(), n if last_excused else n - min(excused, allowance))

        async def sleep(seconds: float) -> None:
            if not lost_connection:
                await asyncio.sleep(seconds)
                return
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._reachable.wait(), seconds)
        return stop, wait, sleep

    def _fail(self, prompt, reason: str, attempts: int) -> None:
        self.store.write_failure(prompt.id, self.cfg.redact(reason), attempts)
        self.stats.failed += 1

    def _records(self, prompt, reply: Reply, latency: float, attempts: int) -> list[dict]:
        created = _now_iso()
        usage = {"prompt_tokens": reply.prompt_tokens, "completion_tokens": reply.completion_tokens}
        # one sample per index asked for (0..n-1), the first choice with it: a server's repeated or extra choices
        # (two with index 0, more than n) are not samples we asked for, and would repeat a record id; a choice whose
        # index is out of range is taken by its position
        n = self.cfg.n
        taken: dict[int, Any] = {}
        for pos, ch in enumerate(reply.choices):
            idx = ch.index if 0 <= ch.index < n else pos
            if idx < n:
                taken.setdefault(idx, ch)
        out = []
        for idx, ch in sorted(taken.items()):
            fr = ch.finish_reason
            if fr in ("length", "content_filter"):  # truncated or filtered text is not a sample
                raise Retryable(f"finish_reason={fr}")
            meta = dict(prompt.meta)
            meta.update({
                "recipe": meta.get("recipe", self.cfg.recipe_name), "teacher": self._teacher, "usage": usage,
                "latency_s": round(latency, 4), "finish_reason": fr, "attempts": attempts, "created_at": created,
                "choice_index": idx, "prompt_id": prompt.id, "provenance": self._provenance,
            })
            if self.cfg.recipe_hash:
                meta.setdefault("recipe_hash", self.cfg.recipe_hash)
            rec = {"id": f"{prompt.id}-{idx}", "instruction": prompt.instruction, "input": prompt.input,
                   "output": (ch.content or "").strip(), "meta": meta}
            try:
                validate(rec, require_id=True)
            except RecordError as e:
                raise Retryable(f"invalid sample: {e}") from None
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

    def snapshot(self) -> Snapshot:
        s = self.stats
        return Snapshot(done=s.done, failed=s.failed, skipped=s.skipped, retrying=s.retrying, requests=s.requests,
                        throttled=s.throttled, tokens=s.prompt_tokens + s.completion_tokens, cost=s.cost,
                        in_flight=self.gate.in_flight, limit=int(self.gate.limit),
                        elapsed=time.monotonic() - self.t0, total=self.total)

    def summary(self) -> dict:
        el = time.monotonic() - self.t0
        s = self.stats
        return {"planned": self.total, "done": s.done, "failed": s.failed, "skipped_already_done": s.skipped,
                "requests": s.requests, "retries": s.retries, "throttled_429": s.throttled,
                "tokens": {"prompt": s.prompt_tokens, "completion": s.completion_tokens,
                           "total": s.prompt_tokens + s.completion_tokens},
                "cost": round(s.cost, 6), "elapsed_s": round(el, 3),
                "req_per_s": round(s.requests / el, 3) if el > 0 else 0.0,
                "concurrency_limit_now": int(self.gate.limit), "transport": self.cfg.transport,
                "rate_limit_accepted_per_s": round(self.accepted.best or self.accepted.measured, 1)
                if self.accepted.measured else None,
                "stopped": self.stopping, "stop_message": self.cfg.redact(self.stop_message)}

    async def run(self, plan: Iterable) -> int:
        it = iter(plan)
        loop = asyncio.get_running_loop()
        # Twice as many workers as request slots: a prompt sleeping before its next attempt (Retry-After, back-off)
        # holds a worker but not a slot, and a standby worker fills the slot. With exactly `concurrency` workers,
        # the fault mix's 429s (Retry-After 1 s) left a quarter of the slots idle. The gate still caps requests.
        workers = [asyncio.ensure_future(self._worker(it)) for _ in range(2 * self.cfg.concurrency)]
        interrupted = asyncio.Event()

        def _on_signal() -> None:
            if interrupted.is_set():  # second signal: stop waiting for in-flight requests
                for w in workers:
                    w.cancel()
            interrupted.set()
            self._stop("interrupted", "interrupted: stopped feeding, in-flight requests finishing")

        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, _on_signal)
        prog = asyncio.ensure_future(progress.show(self.snapshot, self.progress_out, self.cfg.progress_interval))
        try:
            all_done = asyncio.ensure_future(asyncio.gather(*workers, return_exceptions=True))
            signalled = asyncio.ensure_future(interrupted.wait())
            await asyncio.wait([all_done, signalled], return_when=asyncio.FIRST_COMPLETED)
            signalled.cancel()
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
        if self.stopping == "auth":
            return EXIT_AUTH
        if self.stopping == "interrupted":
            return EXIT_INTERRUPTED
        if self.stopping == "budget":
            return EXIT_BUDGET
        if self.stopping in ("unreachable", "refused") or self.stats.failed:
            return EXIT_FAILED
        return EXIT_OK


def make_engine_transport(cfg: RunConfig) -> Transport:
    """The configured transport; call inside the running event loop."""
    params: dict[str, Any] = {k: getattr(cfg, k) for k in ("temperature", "top_p", "max_tokens")
                              if getattr(cfg, k) is not None}
    if cfg.n != 1:
        params["n"] = cfg.n
    return make_transport(cfg.transport, cfg.base_url, cfg.api_key, cfg.timeout, cfg.concurrency, cfg.model, params)


async def run_async(cfg: RunConfig, plan: Iterable, store: Store, total: int | None = None,
                    progress_out: TextIO | None = None) -> tuple[int, dict]:
    transport = make_engine_transport(cfg)
    eng = Engine(cfg, store, transport, total=total, progress_out=progress_out)
    try:
        code = await eng.run(plan)
    finally:
        with contextlib.suppress(Exception):
            await transport.close()
    summary = eng.summary()
    summary["exit_code"] = code
    store.write_summary(summary)
    if eng.stop_message:
        eng.say(f"synth run: {eng.stop_message}")
    if eng.accepted.measured:
        rate = eng.accepted.best or eng.accepted.measured
        eng.say(f"synth run: the teacher limits the request rate; it accepted about {rate:.1f} requests/s "
                f"(--rpm {rate * 60:.0f} starts there)")
    if code == EXIT_FAILED and eng.stats.failed:
        eng.say(f"synth run: {eng.stats.failed} prompts failed, see {cfg.out / 'failures.jsonl'} "
                f"(rerun to retry them)")
    return code, summary


def run(cfg: RunConfig, plan: Iterable, total: int | None = None) -> int:
    """Run the plan into cfg.out; returns the exit code. Raises LockedError if the folder is in use."""
    store = Store(cfg.out)
    try:
        code, _ = asyncio.run(run_async(cfg, plan, store, total))
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
                                                               "automatically on bursts of 429, 5xx or timeouts)")
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
    p.add_argument("--transport", choices=TRANSPORTS, default="aiohttp",
                   help="aiohttp (default): a lean built-in chat-completions client (~0.35 ms CPU a request in "
                        "bench/synth_bench.py); sdk: the openai SDK's AsyncOpenAI (~1.8 ms), for servers that need "
                        "its exact behaviour; both retry and record the same way")
    p.add_argument("--progress-every", type=float, default=2.0, metavar="S",
                   help="seconds between progress lines when stdout is not a terminal (default 2; a terminal "
                        "gets a live display)")


def _err(msg: str) -> None:
    print(f"synth run: {msg}", file=sys.stderr, flush=True)


def main(args: argparse.Namespace) -> int:
    """Entry point for `python -m synth run`; returns the exit code (see EPILOG)."""
    if (args.concurrency < 1 or args.max_attempts < 1 or args.timeout <= 0 or args.progress_every <= 0
            or (args.limit is not None and args.limit < 0)):
        _err("--concurrency and --max-attempts must be >= 1, --timeout and --progress-every > 0, --limit >= 0")
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
    from synth.plan import cells, iter_plan
    from synth.recipe import RecipeError, load_recipe
    try:
        recipe = load_recipe(args.recipe)
        plan = iter_plan(recipe, args.seed, args.limit)
        total = sum(c.quota for c in cells(recipe) if c.sampled)  # for the ETA
        if args.limit is not None:
            total = min(total, args.limit)
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
                    recipe_name=recipe.name, recipe_hash=recipe.hash, transport=args.transport,
                    progress_interval=args.progress_every)
    try:
        return run(cfg, plan, total)
    except RunError as e:
        _err(cfg.redact(str(e)))
        return e.code


if __name__ == "__main__":  # `python -m synth.run ...` works even without the synth CLI shell
    _p = argparse.ArgumentParser(prog="python -m synth run", description="Ask the teacher for every planned prompt.")
    add_arguments(_p)
    sys.exit(main(_p.parse_args()))
