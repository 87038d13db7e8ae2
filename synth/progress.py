"""What `synth run` shows while it works: a rich live panel on a terminal, a plain line every few seconds otherwise
(logs, CI, `| tee`). Both render the same `Snapshot`, so the fields cannot drift apart."""
from __future__ import annotations

import asyncio
import sys
from dataclasses import dataclass
from typing import Callable, TextIO


@dataclass(frozen=True)
class Snapshot:
    done: int
    failed: int
    skipped: int        # already in samples.jsonl from an earlier run
    retrying: int       # prompts now between attempts or on a second+ attempt
    requests: int
    throttled: int
    tokens: int
    cost: float
    in_flight: int
    limit: int          # the AIMD gate's current concurrency
    elapsed: float
    total: int | None   # planned prompts (None when unknown)

    @property
    def req_per_s(self) -> float:
        return self.requests / self.elapsed if self.elapsed > 0 else 0.0

    @property
    def eta_s(self) -> float | None:
        """Seconds left at this run's average pace; None until something finished or when the total is unknown."""
        finished = self.done + self.failed
        if self.total is None or finished == 0 or self.elapsed <= 0:
            return None
        left = max(0, self.total - self.skipped - finished)
        return left / (finished / self.elapsed)


def _clock(s: float | None) -> str:
    if s is None:
        return "?"
    s = int(round(s))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


def plain_line(s: Snapshot) -> str:
    total = f"/{s.total}" if s.total is not None else ""
    return (f"[synth] done={s.done + s.skipped}{total} (this run {s.done}, earlier {s.skipped}) failed={s.failed} "
            f"retrying={s.retrying} requests={s.requests} 429s={s.throttled} in_flight={s.in_flight}/{s.limit} "
            f"req/s={s.req_per_s:.1f} tokens={s.tokens} spend={s.cost:.4f} elapsed={_clock(s.elapsed)} "
            f"eta={_clock(s.eta_s)}")


def live_panel(s: Snapshot):
    from rich.table import Table
    t = Table.grid(padding=(0, 2))
    for _ in range(6):
        t.add_column()
    total = f" / {s.total}" if s.total is not None else ""
    t.add_row("done", f"{s.done + s.skipped}{total}", "failed", str(s.failed), "retrying", str(s.retrying))
    t.add_row("req/s", f"{s.req_per_s:.1f}", "requests", str(s.requests), "429s", str(s.throttled))
    t.add_row("tokens", f"{s.tokens:,}", "spend", f"{s.cost:.4f}", "in flight", f"{s.in_flight}/{s.limit}")
    t.add_row("elapsed", _clock(s.elapsed), "ETA", _clock(s.eta_s), "", "")
    return t


async def show(snapshot: Callable[[], Snapshot], out: TextIO | None = None, plain_every: float = 2.0,
               live_every: float = 0.5) -> None:
    """Runs until cancelled, then shows the final state once more. The live panel is refreshed from this coroutine
    (no rich refresh thread competing with the event loop for the GIL); a refresh every 0.5 s is plenty for a human."""
    out = out or sys.stdout
    if not out.isatty():
        try:
            while True:
                await asyncio.sleep(plain_every)
                print(plain_line(snapshot()), file=out, flush=True)
        finally:  # the final line, so a log always ends with the run's totals
            print(plain_line(snapshot()), file=out, flush=True)
    from rich.console import Console
    from rich.live import Live
    with Live(live_panel(snapshot()), console=Console(file=out), auto_refresh=False, transient=False) as live:
        try:
            while True:
                await asyncio.sleep(live_every)
                live.update(live_panel(snapshot()), refresh=True)
        finally:  # the last state stays on screen
            live.update(live_panel(snapshot()), refresh=True)
