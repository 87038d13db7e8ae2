"""Benchmark the synth engine against the loopback teacher (a separate process), vs a plain asyncio+AsyncOpenAI loop.

    .venv/bin/python bench/synth_bench.py --prompts 2000 --latency 0.2 --concurrency 16 64 256

efficiency = successful prompts/s ÷ (concurrency / latency) (Little's-law bound); CPU = this process's CPU time
(the client only: the server runs in its own process) per HTTP request.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import openai  # noqa: E402,F401  (imported up front: its import takes seconds and must not count as run time)
from synth.plan import iter_plan  # noqa: E402
from synth.recipe import load_recipe  # noqa: E402
from synth.run import Engine, RunConfig, Store, make_client  # noqa: E402

FAULTS = {"429": 0.05, "500": 0.02, "malformed": 0.01, "drop": 0.02}


def start_server(latency: float, faults: dict[str, float]) -> tuple[subprocess.Popen, str]:
    args = [sys.executable, str(ROOT / "tests" / "loopback_teacher.py"), "--port", "0", "--latency", str(latency),
            "--retry-after", "1"]
    for k, v in faults.items():
        args += ["--fault", f"{k}={v}"]
    p = subprocess.Popen(args, stdout=subprocess.PIPE, text=True)
    info = json.loads(p.stdout.readline())
    return p, info["base_url"]


def prompts(n: int) -> list:
    return list(iter_plan(load_recipe(ROOT / "dataset" / "recipes" / "blessing.toml"), 0, n))


async def engine_run(base_url: str, plan: list, conc: int) -> dict:
    with tempfile.TemporaryDirectory() as d:
        cfg = RunConfig(out=Path(d) / "run", model="loopback", api_key="bench", base_url=base_url,
                        concurrency=conc, timeout=30, max_attempts=8, max_tokens=256, progress_interval=3600)
        store = Store(cfg.out)
        client = make_client(cfg)
        eng = Engine(cfg, store, client, say=lambda s: None)
        try:
            await eng.run(plan)
        finally:
            await client.close()
            store.close()
        return {"done": eng.stats.done, "failed": eng.stats.failed, "requests": eng.stats.requests}


async def plain_run(base_url: str, plan: list, conc: int) -> dict:
    """What people write first: a semaphore, one task per prompt, the SDK's own retries (default 2)."""
    import openai
    client = openai.AsyncOpenAI(api_key="bench", base_url=base_url, timeout=30)
    sem = asyncio.Semaphore(conc)
    done = failed = 0

    async def one(p):
        nonlocal done, failed
        async with sem:
            try:
                r = await client.chat.completions.create(model="loopback", messages=p.messages, max_tokens=256)
                if r.choices and r.choices[0].finish_reason == "stop":
                    done += 1
                else:
                    failed += 1
            except Exception:  # noqa: BLE001 - the comparison counts what such a loop loses
                failed += 1
    await asyncio.gather(*(one(p) for p in plan))
    await client.close()
    return {"done": done, "failed": failed, "requests": None}


def measure(kind: str, base_url: str, plan: list, conc: int, latency: float) -> dict:
    c0, t0 = time.process_time(), time.perf_counter()
    res = asyncio.run((engine_run if kind == "engine" else plain_run)(base_url, plan, conc))
    cpu, wall = time.process_time() - c0, time.perf_counter() - t0
    reqs = res["requests"]
    res.update(kind=kind, concurrency=conc, wall_s=round(wall, 2), prompts_per_s=round(res["done"] / wall, 1),
               efficiency=round(res["done"] / wall / (conc / latency), 3),
               cpu_ms_per_request=round(1000 * cpu / (reqs or len(plan)), 2))
    return res


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompts", type=int, default=2000)
    ap.add_argument("--latency", type=float, default=0.2)
    ap.add_argument("--concurrency", type=int, nargs="+", default=[16, 64, 256])
    ap.add_argument("--kinds", nargs="+", default=["engine", "plain"])
    ap.add_argument("--mixes", nargs="+", default=["clean", "faults"])
    a = ap.parse_args()
    plan = prompts(a.prompts)
    rows = []
    for mix in a.mixes:
        server, url = start_server(a.latency, FAULTS if mix == "faults" else {})
        try:
            for conc in a.concurrency:
                for kind in a.kinds:
                    r = measure(kind, url, plan, conc, a.latency)
                    r["mix"] = mix
                    rows.append(r)
                    print(json.dumps(r), flush=True)
        finally:
            server.terminate()
            server.wait(10)
    print("| mix | client | conc | done | lost/failed | requests | wall s | prompts/s | ÷ bound | CPU ms/req |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['mix']} | {r['kind']} | {r['concurrency']} | {r['done']} | {r['failed']} | "
              f"{r['requests'] if r['requests'] is not None else 'n/a'} | {r['wall_s']} | {r['prompts_per_s']} | "
              f"{r['efficiency']} | {r['cpu_ms_per_request']} |")


if __name__ == "__main__":
    os.environ.pop("OPENAI_API_KEY", None)
    main()
