"""A real OpenAI-compatible chat-completions server on 127.0.0.1 for tests and benchmarks.

POST /v1/chat/completions answers after `latency` seconds, or injects a fault chosen deterministically from
(seed, prompt key, how many times that key was seen), so a retry of the same prompt may succeed. GET /stats
returns what was served. Use in-process (`with LoopbackTeacher(...) as t: t.base_url`) or as a subprocess:
`python tests/loopback_teacher.py --port 0 --latency 0.2 --fault 429=0.05 --fault 500=0.02` (prints the port).

Faults: 429 (with Retry-After), 500, 503, drop (connection closed with no response), malformed (200 with a
broken JSON body), slow (sleeps `slow_s`), length (finish_reason "length"), 400 (a request the server rejects),
401 (every request, see `api_key`), truncate (a 200 whose body stops half-way, shorter than its Content-Length),
reset (TCP RST, no response), empty (200, finish_reason "stop", content null), html (502 with a proxy's HTML page),
quota (OpenAI's 429 insufficient_quota: the account has no credit). `rate_limit` adds a real limiter (token bucket).
Not faults but odd good answers: close (the server closes the keep-alive connection after it), gzip (the body
gzip-compressed), dupchoice (every choice twice, same index), idx1 (choice indexes counted from 1). `last_request` holds the headers (lower-cased names) and JSON body of the latest chat request.

Answers: by default one stock line with the prompt's digest (cheap, unique, but junk to the curator). With
`greetings=True` (`--greetings`) it answers like a teacher: a hand-written held-out greeting that fits the prompt's
scene, style, recipient and length cap, and with probability `defect_rate` a labelled defect from the gallery
(dataset/reference/defects.jsonl), so a curated run has approved, doubtful and rejected samples.
"""
from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import re
import socket
import struct
import threading
import time
from collections import Counter
from pathlib import Path

from aiohttp import web

# new kinds go at the end: a fault is picked by cumulative probability in this order, so appending keeps the
# fault sequence of every existing mix (and the benchmark's numbers) unchanged
FAULTS = ("429", "500", "503", "drop", "malformed", "slow", "length", "400",
          "truncate", "reset", "empty", "html", "close", "gzip", "quota", "dupchoice", "idx1")
REFERENCE = Path(__file__).resolve().parents[1] / "dataset" / "reference"


def _unit(*parts) -> float:
    """A deterministic number in [0, 1) from parts: same prompt, same occurrence → same choice."""
    h = hashlib.sha256("\x1f".join(map(str, parts)).encode()).digest()
    return int.from_bytes(h[:8], "big") / 2**64


class GreetingBook:
    """Realistic teacher answers from the held-out set (heldout-good.jsonl: written apart from blessings.jsonl, which
    the curator dedups against, so answers are not rejected as copies of the reference corpus) and the defect
    gallery."""
    PROMPT_RE = re.compile(r"为(?P<recipient>[^（(]+)[（(].*?[）)]写一条(?P<scene>.+?)的祝福语")
    CAP_RE = re.compile(r"字数小于\s*(\d+)\s*字")

    def __init__(self, defect_rate: float = 0.0, seed: int = 0):
        load = lambda name: [json.loads(line) for line in (REFERENCE / name).open(encoding="utf-8")]  # noqa: E731
        self.good, self.bad = load("heldout-good.jsonl"), load("defects.jsonl")
        self.relation = {r["meta"]["recipient"]: r["meta"]["relation"] for r in self.good + self.bad}
        self.defect_rate, self.seed = defect_rate, seed

    def answer(self, prompt: str, key: str, index: int) -> str:
        m = self.PROMPT_RE.search(prompt)
        cap = self.CAP_RE.search(prompt)
        if not m or not cap:
            return "祝您万事如意，心想事成！"  # not a recipe prompt: a plain, valid greeting
        recipient, scene, cap = m["recipient"], m["scene"], int(cap[1])
        style = "小红书" if "小红书风格" in prompt else "严肃" if "严肃风格" in prompt else "正常"
        u = _unit(self.seed, key, index, "defect")  # salted: independent of the fault draw
        if u < self.defect_rate:
            pool = [r for r in self.bad if r["meta"]["scene"] == scene] or self.bad
            return pool[int(u / self.defect_rate * len(pool))]["output"]
        fits = [r for r in self.good if r["meta"]["scene"] == scene and r["meta"]["style"] == style
                and r["meta"]["max_chars"] <= cap] or [r for r in self.good if r["meta"]["scene"] == scene] or self.good

        def score(r: dict) -> int:  # same recipient, else same relation; same constraint sentence
            meta = r["meta"]
            return (4 * (meta["recipient"] == recipient) + 2 * (meta["relation"] == self.relation.get(recipient))
                    + (bool(meta["constraint"]) and meta["constraint"] in prompt))
        best = max(map(score, fits))
        # the best tier and the one below (the constraint aside), so that one cell's prompts vary
        pool = [r for r in fits if score(r) >= best - 1]
        return pool[int(_unit(self.seed, key, index, "pick") * len(pool))]["output"]


class LoopbackTeacher:
    def __init__(self, latency: float = 0.0, faults: dict[str, float] | None = None, seed: int = 0,
                 retry_after: float = 1.0, slow_s: float = 5.0, api_key: str | None = None,
                 echo_key_on_401: bool = True, host: str = "127.0.0.1", port: int = 0, *,
                 greetings: bool = False, defect_rate: float = 0.0, rate_limit: float | None = None):
        self.latency = latency
        self.faults = {k: float(v) for k, v in (faults or {}).items()}
        unknown = set(self.faults) - set(FAULTS)
        if unknown:
            raise ValueError(f"unknown faults: {sorted(unknown)}")
        self.seed = seed
        self.retry_after = retry_after
        self.slow_s = slow_s
        self.api_key = api_key  # None: accept any key; else anything else gets 401
        self.echo_key_on_401 = echo_key_on_401  # like real APIs, quote the bad key back (tests check redaction)
        self.host, self.port = host, port
        self.book = GreetingBook(defect_rate, seed) if greetings else None
        # a real limiter, like a provider's: a token bucket of `rate_limit` requests/s (a second's worth of burst);
        # a request over it gets 429 at once, with retry-after-ms = when its token would be there
        self.rate_limit = rate_limit
        self._tokens, self._refilled = (rate_limit or 0.0), time.monotonic()
        self.requests = 0
        self.seen: Counter[str] = Counter()      # requests per prompt key
        self.served_ok: Counter[str] = Counter()  # successful (stop) answers per prompt key
        self.outcomes: Counter[str] = Counter()
        self.times: list[float] = []              # wall-clock arrival time of every request
        self.last_request: dict = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._runner: web.AppRunner | None = None

    # -- fault choice: deterministic per (seed, key, occurrence)
    def _fault(self, key: str, k: int) -> str | None:
        if not self.faults:
            return None
        h = hashlib.sha256(f"{self.seed}\x1f{key}\x1f{k}".encode()).digest()
        u = int.from_bytes(h[:8], "big") / 2**64
        acc = 0.0
        for name in FAULTS:
            acc += self.faults.get(name, 0.0)
            if u < acc:
                return name
        return None

    def stats(self) -> dict:
        return {"requests": self.requests, "seen": dict(self.seen), "served_ok": dict(self.served_ok),
                "outcomes": dict(self.outcomes), "times": list(self.times)}

    async def _stats(self, request: web.Request) -> web.Response:
        if request.query.get("brief"):  # cheap for benchmarks: no per-prompt counters or arrival times
            return web.json_response({"requests": self.requests, "outcomes": dict(self.outcomes)})
        return web.json_response(self.stats())

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        self.requests += 1
        self.times.append(time.time())
        if self.api_key is not None:
            auth = request.headers.get("Authorization", "")
            if auth != f"Bearer {self.api_key}":
                self.outcomes["401"] += 1
                bad = auth.removeprefix("Bearer ")
                msg = f"Incorrect API key provided: {bad}" if self.echo_key_on_401 else "Incorrect API key"
                return web.json_response({"error": {"message": msg, "type": "invalid_request_error",
                                                    "code": "invalid_api_key"}}, status=401)
        if self.rate_limit:
            now = time.monotonic()
            self._tokens = min(self.rate_limit, self._tokens + (now - self._refilled) * self.rate_limit)
            self._refilled = now
            if self._tokens < 1:
                self.outcomes["429-limit"] += 1
                wait = (1 - self._tokens) / self.rate_limit
                return web.json_response({"error": {"message": "Rate limit reached", "type": "rate_limit"}},
                                         status=429, headers={"retry-after-ms": str(max(1, round(wait * 1000))),
                                                              "Retry-After": str(max(1, round(wait)))})
            self._tokens -= 1
        body = await request.json()
        self.last_request = {"headers": {k.lower(): v for k, v in request.headers.items()}, "body": body}
        content = str(body["messages"][-1]["content"])
        key = request.headers.get("X-Prompt-Id") or content
        k = self.seen[key]
        self.seen[key] += 1
        fault = self._fault(key, k)
        self.outcomes[fault or "ok"] += 1
        if self.latency:
            await asyncio.sleep(self.latency)
        if fault == "429":
            return web.json_response({"error": {"message": "Rate limit reached", "type": "rate_limit"}},
                                     status=429, headers={"Retry-After": f"{self.retry_after:g}",
                                                          "retry-after-ms": str(int(self.retry_after * 1000))})
        if fault == "quota":
            return web.json_response({"error": {"message": "You exceeded your current quota, please check your plan "
                                                "and billing details.", "type": "insufficient_quota",
                                                "code": "insufficient_quota"}}, status=429)
        if fault == "400":
            return web.json_response({"error": {"message": "Invalid value for 'top_p'", "type": "invalid_request_error"}},
                                     status=400)
        if fault in ("500", "503"):
            return web.json_response({"error": {"message": "server error"}}, status=int(fault))
        if fault == "drop":
            request.transport.close()  # connection closed mid-request, no response at all
            raise asyncio.CancelledError
        if fault == "reset":  # SO_LINGER 0: the close sends RST, the client sees "connection reset by peer"
            request.transport.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                                                  struct.pack("ii", 1, 0))
            request.transport.abort()
            raise asyncio.CancelledError
        if fault == "html":
            return web.Response(status=502, text="<html><body><h1>502 Bad Gateway</h1></body></html>",
                                content_type="text/html")
        if fault == "malformed":
            return web.Response(status=200, body=b'{"id": "x", "choices": [{"mess', content_type="application/json")
        if fault == "slow":
            await asyncio.sleep(self.slow_s)
        if fault == "truncate":
            whole = json.dumps({"id": "x", "object": "chat.completion", "choices": [
                {"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": "祝您万事如意"}}]})
            resp = web.StreamResponse(status=200, headers={"Content-Type": "application/json"})
            resp.content_length = len(whole)
            await resp.prepare(request)
            await resp.write(whole[: len(whole) // 2].encode())
            request.transport.close()
            raise asyncio.CancelledError
        n = int(body.get("n") or 1)
        finish = "length" if fault == "length" else "stop"
        digest = hashlib.sha256(content.encode()).hexdigest()[:6]
        texts = ([self.book.answer(content, key, i) for i in range(n)] if self.book
                 else [f"  祝您万事如意，心想事成！({digest}-{i})\n" for i in range(n)])
        choices = [{"index": i + (fault == "idx1"), "finish_reason": finish,
                    "message": {"role": "assistant", "content": None if fault == "empty" else text}}
                   for i, text in enumerate(texts)]
        if fault == "dupchoice":
            choices = [c for c in choices for _ in range(2)]
        if finish == "stop" and fault != "empty":
            self.served_ok[key] += 1
        resp = web.json_response({
            "id": f"chatcmpl-{digest}", "object": "chat.completion", "created": int(time.time()),
            "model": body.get("model", "loopback"), "choices": choices,
            "usage": {"prompt_tokens": len(content), "completion_tokens": 20 * n, "total_tokens": len(content) + 20 * n},
        })
        if fault == "close":
            resp.force_close()
        elif fault == "gzip":
            resp.enable_compression(web.ContentCoding.gzip)
        return resp

    def _app(self) -> web.Application:
        app = web.Application(client_max_size=8 * 1024 * 1024)
        app.router.add_post("/v1/chat/completions", self._chat)
        app.router.add_get("/stats", self._stats)
        return app

    async def start_async(self) -> None:
        self._runner = web.AppRunner(self._app(), access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port, backlog=1024)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}/v1"

    # -- background thread
    def start(self) -> "LoopbackTeacher":
        ready = threading.Event()

        def _main():
            self._loop = asyncio.new_event_loop()
            asyncio.set_event_loop(self._loop)
            self._loop.run_until_complete(self.start_async())
            ready.set()
            self._loop.run_forever()
            self._loop.run_until_complete(self._runner.cleanup())
            self._loop.close()

        self._thread = threading.Thread(target=_main, daemon=True)
        self._thread.start()
        ready.wait(10)
        return self

    def stop(self) -> None:
        if self._loop and self._thread:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)

    def __enter__(self) -> "LoopbackTeacher":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--latency", type=float, default=0.0)
    ap.add_argument("--fault", action="append", default=[], help="NAME=PROBABILITY, e.g. 429=0.05")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--retry-after", type=float, default=1.0)
    ap.add_argument("--slow-s", type=float, default=5.0)
    ap.add_argument("--api-key")
    ap.add_argument("--rate-limit", type=float, help="requests/s of a token-bucket limiter answering 429 above it")
    ap.add_argument("--greetings", action="store_true", help="answer with fitting held-out greetings")
    ap.add_argument("--defect-rate", type=float, default=0.0, help="with --greetings: share of gallery defects")
    a = ap.parse_args()
    faults = dict(f.split("=", 1) for f in a.fault)
    t = LoopbackTeacher(a.latency, faults, a.seed, a.retry_after, a.slow_s, a.api_key, host=a.host, port=a.port,
                        greetings=a.greetings, defect_rate=a.defect_rate, rate_limit=a.rate_limit)

    async def serve():
        await t.start_async()
        print(json.dumps({"port": t.port, "base_url": t.base_url}), flush=True)
        await asyncio.Event().wait()

    try:
        asyncio.run(serve())
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
