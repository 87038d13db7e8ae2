"""Benchmark `synth run` against the loopback teacher (its own process), with a plain asyncio+AsyncOpenAI loop beside it.

Throughput (issue #2's benchmark):
    .venv/bin/python bench/synth_bench.py --prompts 2000 --latency 0.2 --concurrency 16 64 256

  efficiency (÷ bound) = successful prompts/s ÷ (concurrency / latency), the Little's-law bound.
  client CPU ms/req = this process's CPU time (event loop + fsync thread) from the engine's start to its transport
  closed (reading samples.jsonl back for the duplicate count is not counted) ÷ HTTP requests counted at the server.
  server CPU % = the loopback server's CPU over the wall time (near 100% would mean the server is the bottleneck).
  kinds: engine (synth.run.Engine, default aiohttp transport), engine-sdk (--transport sdk), plain (what people
  write first: a semaphore, one task per prompt, AsyncOpenAI on its default transport with its own 2 retries),
  bare (`--kinds bare`: aiohttp workers speaking the protocol with no retries or files, the floor on this box).
  With both mixes it ends with faults ÷ clean per row and the ceiling on it: no client that honours Retry-After
  can beat the fault run's longest prompt (its attempts x latency + its 429s x 1 s) or its requests x latency / conc.

A real rate limit instead of random faults (a token bucket of --rate-limit requests/s answering 429 at once, with
retry-after-ms = when a token is due; the best wall time is prompts / rate - 1 s of initial burst):
    .venv/bin/python bench/synth_bench.py --mixes limit --rate-limit 200 --latency 0.05 --concurrency 256

Peak RSS of the real CLI over a large plan (plan and run, at two sizes, to show it is flat):
    .venv/bin/python bench/synth_bench.py --rss 10000 100000

  runs `python -m synth plan` and `python -m synth run` (concurrency 256, 0 ms teacher latency) as child processes
  on a temporary copy of dataset/recipes/blessing.toml whose per_cell quota is raised to reach the size, and reports
  each child's peak RSS (VmHWM) and its RSS half-way through (flat = about the same at both sizes).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import re
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import openai  # noqa: E402,F401  (imported up front: its import takes seconds and must not count as run time)
from synth.plan import cells, iter_plan  # noqa: E402
from synth.recipe import load_recipe  # noqa: E402
from synth.run import Engine, RunConfig, Store, make_engine_transport  # noqa: E402

RECIPE = ROOT / "dataset" / "recipes" / "blessing.toml"
FAULTS = {"429": 0.05, "500": 0.02, "malformed": 0.01, "drop": 0.02}
TICK = os.sysconf("SC_CLK_TCK")


def start_server(latency: float, faults: dict[str, float], rate_limit: float | None = None) -> tuple[subprocess.Popen, str]:
    args = [sys.executable, str(ROOT / "tests" / "loopback_teacher.py"), "--port", "0", "--latency", str(latency),
            "--retry-after", "1"]
    if rate_limit:
        args += ["--rate-limit", str(rate_limit)]
    for k, v in faults.items():
        args += ["--fault", f"{k}={v}"]
    p = subprocess.Popen(args, stdout=subprocess.PIPE, text=True)
    info = json.loads(p.stdout.readline())
    return p, info["base_url"]


def proc_cpu_s(pid: int) -> float:
    """utime + stime of a process, from /proc (Linux)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def server_requests(base_url: str) -> int:
    with urllib.request.urlopen(base_url.rsplit("/v1", 1)[0] + "/stats?brief=1", timeout=10) as r:
        return json.load(r)["requests"]


async def engine_run(base_url: str, plan: list, conc: int, transport: str) -> dict:
    with tempfile.TemporaryDirectory() as d, open(os.devnull, "w") as devnull:
        cfg = RunConfig(out=Path(d) / "run", model="loopback", api_key="bench", base_url=base_url,
                        concurrency=conc, timeout=30, max_attempts=8, max_tokens=256, progress_interval=3600,
                        transport=transport)
        store = Store(cfg.out)
        tr = make_engine_transport(cfg)
        eng = Engine(cfg, store, tr, say=lambda s: None, total=len(plan), progress_out=devnull)
        c0, t0 = time.process_time(), time.perf_counter()
        try:
            await eng.run(plan)
        finally:
            await tr.close()
            store.close()
        cpu, wall = time.process_time() - c0, time.perf_counter() - t0
        # the duplicate check below reads the file back: the benchmark's work, not the engine's, so not timed
        with open(cfg.out / "samples.jsonl", "rb") as f:
            ids = [json.loads(line)["meta"]["prompt_id"] for line in f]
        return {"done": eng.stats.done, "failed": eng.stats.failed, "records": len(ids),
                "duplicates": len(ids) - len(set(ids)), "cpu_s": cpu, "wall_s": wall}


async def plain_run(base_url: str, plan: list, conc: int) -> dict:
    """What people write first: a semaphore, one task per prompt, the SDK's own retries (default 2)."""
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
    return {"done": done, "failed": failed, "records": None, "duplicates": None}  # it writes no file


async def bare_run(base_url: str, plan: list, conc: int) -> dict:
    """The floor for a Python client on this box: `conc` workers on one aiohttp session speaking the protocol,
    no retries, no files, no accounting (a fault just loses its prompt)."""
    import aiohttp
    done = failed = 0
    it = iter(plan)
    url = base_url + "/chat/completions"
    headers = {"Authorization": "Bearer bench", "Content-Type": "application/json"}
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=conc), headers=headers) as session:
        async def worker():
            nonlocal done, failed
            for p in it:
                try:
                    async with session.post(url, data=json.dumps({"model": "loopback", "messages": p.messages,
                                                                  "max_tokens": 256})) as r:
                        body = await r.read()
                    ok = r.status == 200 and json.loads(body)["choices"][0]["finish_reason"] == "stop"
                except Exception:  # noqa: BLE001 - a fault loses the prompt: this loop is only a speed floor
                    ok = False
                done, failed = done + ok, failed + (not ok)
        await asyncio.gather(*(worker() for _ in range(conc)))
    return {"done": done, "failed": failed, "records": None, "duplicates": None}


def measure(kind: str, server: subprocess.Popen, base_url: str, plan: list, conc: int, latency: float) -> dict:
    s_cpu0, s_req0 = proc_cpu_s(server.pid), server_requests(base_url)
    c0, t0 = time.process_time(), time.perf_counter()
    if kind == "plain":
        res = asyncio.run(plain_run(base_url, plan, conc))
    elif kind == "bare":
        res = asyncio.run(bare_run(base_url, plan, conc))
    else:
        res = asyncio.run(engine_run(base_url, plan, conc, "sdk" if kind == "engine-sdk" else "aiohttp"))
    cpu, wall = time.process_time() - c0, time.perf_counter() - t0
    cpu, wall = res.pop("cpu_s", cpu), res.pop("wall_s", wall)  # the engine times its run itself (see engine_run)
    s_cpu, s_req = proc_cpu_s(server.pid) - s_cpu0, server_requests(base_url) - s_req0
    reqs = s_req  # counted at the server, the same way for every kind (plain's SDK retries included)
    res.update(kind=kind, concurrency=conc, requests=reqs, wall_s=round(wall, 2),
               prompts_per_s=round(res["done"] / wall, 1), efficiency=round(res["done"] / wall / (conc / latency), 3),
               cpu_ms_per_request=round(1000 * cpu / max(1, reqs), 2),
               server_cpu_pct=round(100 * s_cpu / wall), load_avg=round(os.getloadavg()[0], 2))
    return res


def throughput(a: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory() as d:  # more prompts than the shipped recipe plans: a bigger copy of it
        plan = list(iter_plan(load_recipe(big_recipe(a.prompts, Path(d))), 0, a.prompts))
    rows = []
    for mix in a.mixes:
        for conc in a.concurrency:
            for kind in a.kinds:
                # a fresh server per measurement: faults depend on how often the server has seen a prompt, so
                # every client meets exactly the same fault sequence
                server, url = start_server(a.latency, FAULTS if mix == "faults" else {},
                                           a.rate_limit if mix == "limit" else None)
                try:
                    r = measure(kind, server, url, plan, conc, a.latency)
                finally:
                    server.terminate()
                    server.wait(10)
                r["mix"] = mix
                rows.append(r)
                print(json.dumps(r), flush=True)
    print("| mix | client | conc | done | lost/failed | duplicates | requests | wall s | prompts/s | ÷ bound "
          "| client CPU ms/req | server CPU % | load avg |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        dup = "n/a" if r["duplicates"] is None else r["duplicates"]
        print(f"| {r['mix']} | {r['kind']} | {r['concurrency']} | {r['done']} | {r['failed']} | {dup} | {r['requests']} | "
              f"{r['wall_s']} | {r['prompts_per_s']} | {r['efficiency']} | {r['cpu_ms_per_request']} | "
              f"{r['server_cpu_pct']} | {r['load_avg']} |")
    if "faults" in a.mixes and "clean" in a.mixes:
        fault_summary(rows, plan, a.latency)


def served_fault(latency: float, retry_after: float):
    """The loopback teacher's fault for (prompt id, attempt index) under the bench's mix, None for an answer: the
    same deterministic draw the server in start_server makes."""
    sys.path.insert(0, str(ROOT / "tests"))
    from loopback_teacher import LoopbackTeacher
    return LoopbackTeacher(latency, FAULTS, retry_after=retry_after)._fault


def retry_after_floor(plan: list, latency: float, retry_after: float = 1.0) -> tuple[float, int, list[str]]:
    """The least wall time ANY client that honours Retry-After needs for the fault run: the longest single prompt,
    attempts x latency + its 429s x Retry-After, even started at t=0 with every other fault retried at once.
    Read from the loopback teacher's fault sequence (deterministic per prompt id and attempt).
    Returns (seconds, plan index, the prompt's answers in order)."""
    fault = served_fault(latency, retry_after)
    worst = (0.0, -1, [])
    for i, p in enumerate(plan):
        seq = []
        while not seq or seq[-1] != "ok":
            seq.append(fault(p.id, len(seq)) or "ok")
        t = len(seq) * latency + seq.count("429") * retry_after
        worst = max(worst, (t, i, seq))
    return worst


def ideal_client_wall(plan: list, conc: int, latency: float, retry_after: float = 1.0) -> float:
    """Wall time of a zero-overhead client with the engine's policy on the same fault sequence: `conc` slots, a
    retry whose wait is over goes before a fresh prompt, a 429 waits exactly Retry-After, other faults retry at
    once, every answer takes exactly `latency` (an event simulation, not a run)."""
    import heapq
    fault_of = served_fault(latency, retry_after)
    slots = [0.0] * conc         # when each slot is free again
    ready: list = []             # (when a retry may go, plan index, attempt)
    fresh, left, end = 0, len(plan), 0.0
    while left:
        free = heapq.heappop(slots)
        if ready and (ready[0][0] <= free or fresh == len(plan)):
            at, i, k = heapq.heappop(ready)
            start = max(free, at)
        else:
            i, k, start = fresh, 0, free
            fresh += 1
        fault = fault_of(plan[i].id, k)
        heapq.heappush(slots, start + latency)
        if fault is None:
            left -= 1
            end = max(end, start + latency)
        else:
            heapq.heappush(ready, (start + latency + (retry_after if fault == "429" else 0.0), i, k + 1))
    return end


def fault_summary(rows: list[dict], plan: list, latency: float) -> None:
    """faults ÷ clean per client and concurrency, beside the ceiling that Retry-After alone puts on it."""
    floor, index, seq = retry_after_floor(plan, latency)
    print(f"\nRetry-After floor: prompt #{index} is answered {', '.join(seq)}; honouring Retry-After 1 s, no client "
          f"can finish it in under {floor:.1f} s.")
    print("| client | conc | clean wall s | faults wall s | faults ÷ clean | ceiling: clean wall ÷ max(floor, "
          "requests x latency / conc) | ideal client (same policy, no overhead): faults wall s, ÷ its clean |")
    print("|---|---|---|---|---|---|---|")
    clean = {(r["kind"], r["concurrency"]): r for r in rows if r["mix"] == "clean"}
    for r in rows:
        c = clean.get((r["kind"], r["concurrency"]))
        if r["mix"] != "faults" or c is None or r["kind"] not in ("engine", "engine-sdk"):
            continue  # plain and bare lose prompts under faults: their wall time is not the same work
        conc = r["concurrency"]
        least = max(floor, r["requests"] * latency / conc)
        ideal = ideal_client_wall(plan, conc, latency)
        ideal_clean = math.ceil(len(plan) / conc) * latency
        print(f"| {r['kind']} | {conc} | {c['wall_s']} | {r['wall_s']} | {c['wall_s'] / r['wall_s']:.2f} | "
              f"{min(1.0, c['wall_s'] / least):.2f} | {ideal:.2f}, {ideal_clean / ideal:.2f} |")


def big_recipe(n: int, folder: Path) -> Path:
    """A copy of blessing.toml whose per_cell quota gives at least n prompts (the shipped defaults stay)."""
    text = RECIPE.read_text(encoding="utf-8")
    active = sum(1 for c in cells(load_recipe(RECIPE)) if c.sampled)
    per_cell = math.ceil(n / active)
    text, k = re.subn(r"(?m)^per_cell\s*=\s*\d+", f"per_cell = {per_cell}", text, count=1)
    assert k == 1, "per_cell not found in the recipe"
    path = folder / "blessing-big.toml"
    path.write_text(text, encoding="utf-8")
    return path


def child_peak_rss_mb(args: list[str], env: dict) -> tuple[int, float, float, float]:
    """(exit code, peak RSS MB, RSS MB half-way through, wall s) of a child, polling /proc/PID/status.
    VmHWM, not wait4's ru_maxrss: the latter counts the forked parent's (this benchmark's) size before exec."""
    t0 = time.perf_counter()
    p = subprocess.Popen(args, env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    samples: list[tuple[float, int, int]] = []  # (t, VmRSS kB, VmHWM kB)
    while p.poll() is None:
        try:
            status = Path(f"/proc/{p.pid}/status").read_text()
            kb = {k: int(v.split()[0]) for k, v in (ln.split(":", 1) for ln in status.splitlines())
                  if k in ("VmRSS", "VmHWM")}
            if len(kb) == 2:
                samples.append((time.perf_counter() - t0, kb["VmRSS"], kb["VmHWM"]))
        except (OSError, ValueError):
            pass
        time.sleep(0.05)
    wall = time.perf_counter() - t0
    err = p.stderr.read().decode(errors="replace")
    if p.returncode:
        print(err[-2000:], file=sys.stderr)
    peak = max((h for _, _, h in samples), default=0)
    mid = next((r for t, r, _ in samples if t >= wall / 2), 0)
    return p.returncode, peak / 1024, mid / 1024, wall


def rss(sizes: list[int], concurrency: int) -> None:
    rows = []
    with tempfile.TemporaryDirectory() as d:
        server, url = start_server(0.0, {})
        try:
            for n in sizes:
                recipe = big_recipe(n, Path(d))
                env = dict(os.environ, OPENAI_API_KEY="bench", OPENAI_BASE_URL=url, PYTHONPATH=str(ROOT))
                base = [sys.executable, "-m", "synth"]
                code, mb, mid, wall = child_peak_rss_mb(base + ["plan", "--recipe", str(recipe), "--limit", str(n),
                                                                "--show", "0", "--json"], env)
                rows.append({"command": "synth plan", "prompts": n, "exit": code, "peak_rss_mb": round(mb, 1),
                             "half_way_rss_mb": round(mid, 1), "wall_s": round(wall, 1)})
                print(json.dumps(rows[-1]), flush=True)
                out = Path(d) / f"run-{n}"
                # the run, then the same command again: a resume that finds every prompt done (reads all records)
                for label in ("synth run", "synth run (resume, all done)"):
                    code, mb, mid, wall = child_peak_rss_mb(base + ["run", "--recipe", str(recipe), "--limit", str(n),
                                                                    "--out", str(out), "--concurrency",
                                                                    str(concurrency)], env)
                    with open(out / "samples.jsonl", "rb") as f:
                        lines = sum(1 for _ in f)
                    rows.append({"command": label, "prompts": n, "exit": code, "records": lines,
                                 "peak_rss_mb": round(mb, 1), "half_way_rss_mb": round(mid, 1),
                                 "wall_s": round(wall, 1)})
                    print(json.dumps(rows[-1]), flush=True)
        finally:
            server.terminate()
            server.wait(10)
    print("| command | prompts | exit | records | peak RSS MB | RSS half-way MB | wall s |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['command']} | {r['prompts']} | {r['exit']} | {r.get('records', '')} | {r['peak_rss_mb']} | "
              f"{r['half_way_rss_mb']} | {r['wall_s']} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--prompts", type=int, default=2000)
    ap.add_argument("--latency", type=float, default=0.2)
    ap.add_argument("--concurrency", type=int, nargs="+", default=[16, 64, 256])
    ap.add_argument("--kinds", nargs="+", default=["engine", "engine-sdk", "plain"],
                    choices=["engine", "engine-sdk", "plain", "bare"])
    ap.add_argument("--mixes", nargs="+", default=["clean", "faults"], choices=["clean", "faults", "limit"],
                    help="limit: no faults, but a real token-bucket limiter of --rate-limit requests/s")
    ap.add_argument("--rate-limit", type=float, default=200.0)
    ap.add_argument("--rss", type=int, nargs="+", metavar="N", help="instead: peak RSS of plan and run over N prompts")
    a = ap.parse_args()
    if a.rss:
        rss(a.rss, max(a.concurrency))
    else:
        throughput(a)


if __name__ == "__main__":
    os.environ.pop("OPENAI_API_KEY", None)
    main()
