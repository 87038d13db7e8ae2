"""Throughput of the train presets on the DeepSeek-LLM-7B architecture with random weights (no download).

    python bench/train_bench.py --out train_bench.json --profile prof/      # one GPU: all presets, one process
    torchrun --nproc_per_node 2 bench/train_bench.py --presets fast --global-batch 32 --out ddp.json   # DDP
    python bench/train_bench.py --tiny --steps 3 --warmup 1 --out /tmp/b.json      # CPU smoke test

The model side of each preset is train.core.prepare_model, the code `python -m train run` uses; the loop is a
plain PyTorch loop (no Trainer) so that nothing but the preset is measured. Presets: reference, fast, lean, and
`<preset>-eager` (the same without torch.compile, to show what compilation buys).

Per preset: real (non-pad) tokens/s, samples/s, peak GPU memory, per-step global loss, MFU against a measured bf16
matmul rate. Model FLOPs per real token = 4 * params (frozen base: forward 2P + input-gradient backward 2P; LoRA
weight gradients are <0.3% of that); padding and checkpoint recompute are not credited.
Synthetic samples: prompt 30-50 tokens (masked), answer 30-130 tokens; effective (global) batch 16 by default.
Under torchrun each process takes its contiguous share of every global batch; the loss is normalised by the global
count of label tokens (then x world size, as DDP averages gradients), so 1 and N GPUs take the same optimizer step.
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import random
import sys
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def synth_rows(n: int, vocab: int, seed: int = 0) -> list[dict]:
    rnd = random.Random(seed)
    rows = []
    for _ in range(n):
        p, a = rnd.randint(30, 50), rnd.randint(30, 130)
        ids = [rnd.randrange(3, vocab) for _ in range(p + a)]
        rows.append({"input_ids": ids, "attention_mask": [1] * len(ids), "labels": [-100] * p + ids[p:]})
    return rows


def matmul_tflops(torch, device, dtype) -> float:
    n = 8192 if device.type == "cuda" else 512
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    sync(torch, device)
    reps = 20 if device.type == "cuda" else 3
    t = time.perf_counter()
    for _ in range(reps):
        a @ b
    sync(torch, device)
    return 2 * n ** 3 * reps / (time.perf_counter() - t) / 1e12


def sync(torch, device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def model_config(tiny: bool):
    from transformers import LlamaConfig
    if tiny:
        mc = LlamaConfig(vocab_size=1000, hidden_size=64, intermediate_size=172, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=512)
    else:  # DeepSeek-LLM-7B
        mc = LlamaConfig(vocab_size=102400, hidden_size=4096, intermediate_size=11008, num_hidden_layers=30,
                         num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096)
    mc.use_cache = False
    return mc


def build_model(torch, mc, device, dtype):
    """Random weights created directly in `dtype` on the device: no fp32 copy is ever resident (the old bench
    built fp32 then cast, which put 26.6 GiB on the card for a 12.9 GiB fp16 model)."""
    from transformers import LlamaForCausalLM
    torch.manual_seed(0)  # same weights and LoRA init in every process and every run
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with device:
            return LlamaForCausalLM(mc)
    finally:
        torch.set_default_dtype(old)


class _PadOnly:
    """A tokenizer stand-in that only knows the pad id: all DataCollatorForSeq2Seq needs for pre-tokenized rows."""
    pad_token_id = 0
    padding_side = "right"

    def pad(self, feats, return_tensors="pt", **kw):
        import torch
        from transformers.tokenization_utils_base import BatchEncoding
        m = max(len(f["input_ids"]) for f in feats)
        return BatchEncoding({k: torch.tensor([f[k] + [0] * (m - len(f[k])) for f in feats])
                              for k in ("input_ids", "attention_mask")})


def bench_collator(cfg):
    from transformers import DataCollatorForSeq2Seq
    from train import collator
    return collator(cfg, None) if cfg.packing else DataCollatorForSeq2Seq(tokenizer=_PadOnly(), padding=True)


def preset_for(name: str, cpu: bool):
    """`fast`, `lean`, `reference`, or `<preset>-eager` (compile off)."""
    from train import preset_config
    base, _, variant = name.partition("-")
    cfg = preset_config(base, cpu=cpu)
    if variant == "eager":
        cfg = replace(cfg, compile=False)
    elif variant:
        raise SystemExit(f"unknown preset variant {name!r}")
    return cfg


class Dist:
    """Rank/world from torchrun's environment; a no-op when run as a plain process."""

    def __init__(self, torch):
        self.torch = torch
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local = int(os.environ.get("LOCAL_RANK", "0"))
        if self.world > 1 and torch.cuda.is_available():
            torch.cuda.set_device(self.local)
            torch.distributed.init_process_group("nccl", device_id=torch.device("cuda", self.local))
        elif self.world > 1:  # CPU smoke test of the DDP path
            torch.distributed.init_process_group("gloo")

    def sum(self, t):
        if self.world > 1:
            self.torch.distributed.all_reduce(t)
        return t

    def max(self, t):
        if self.world > 1:
            self.torch.distributed.all_reduce(t, op=self.torch.distributed.ReduceOp.MAX)
        return t


def bench_preset(name: str, args, torch, device, dist: Dist) -> dict:
    from train.core import _device_and_dtype, compile_decoder_layers, per_device_batch, prepare_model
    cpu = device.type == "cpu"
    cfg = preset_for(name, cpu)
    cfg = replace(cfg, batch_size=min(cfg.batch_size, args.global_batch),
                  grad_accum=max(1, args.global_batch // min(cfg.batch_size, args.global_batch)))
    micro, accum = per_device_batch(cfg, dist.world)
    per_gpu = micro * accum
    mc = model_config(args.tiny)
    _, dtype = _device_and_dtype(cfg)  # the dtype `python -m train run` trains in
    if not cpu:
        torch.cuda.reset_peak_memory_stats(device)
    model = build_model(torch, mc, device, dtype)
    if cfg.grad_ckpt:
        # what Trainer(activation_checkpointing=True) calls; the old name still works on the 5.17 GPU image
        getattr(model, "activation_checkpointing_enable", model.gradient_checkpointing_enable)()
    model = prepare_model(model, cfg)
    if cpu and cfg.compile and args.compile_backend:  # CPU smoke test of the compiled path
        compile_decoder_layers(model, backend=args.compile_backend)
    compiled = cfg.compile and (not cpu or bool(args.compile_backend))
    n_params = sum(p.numel() for p in model.parameters())
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=cfg.lr, fused=not cpu and cfg.preset != "reference")
    if dist.world > 1:
        model = torch.nn.parallel.DistributedDataParallel(model, device_ids=None if cpu else [dist.local])
    coll = bench_collator(cfg)
    total_steps = args.warmup + args.steps
    rows = synth_rows(args.global_batch * (total_steps + PROFILE_STEPS), mc.vocab_size)
    # bf16 mixed precision is what Trainer(bf16=True) does for fast/lean; reference keeps the tutorial's plain fp16
    amp = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if not cpu and cfg.preset != "reference" else None

    def step(k: int):
        """One optimizer step on global batch k; returns (this process's real tokens, global loss tensor)."""
        mine = rows[k * args.global_batch + dist.rank * per_gpu:][:per_gpu]
        batches = [{key: v.to(device) if hasattr(v, "to") else v for key, v in coll(mine[i:i + micro]).items()}
                   for i in range(0, per_gpu, micro)]
        items = dist.sum(sum((b["labels"][..., 1:] != -100).sum() for b in batches).to(device))
        loss_sum = torch.zeros((), device=device)
        for i, b in enumerate(batches):
            sync_grads = dist.world == 1 or i == len(batches) - 1
            ctx = model.no_sync() if not sync_grads else contextlib.nullcontext()
            with ctx, (amp() if amp else contextlib.nullcontext()):
                loss = model(**b, num_items_in_batch=items).loss
            (loss * dist.world).backward()  # DDP averages gradients over processes; undo that
            loss_sum += loss.detach().float()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return sum(len(r["input_ids"]) for r in mine), dist.sum(loss_sum)

    model.train()
    losses, real_tokens, t_compile = [], 0, time.perf_counter()
    for k in range(args.warmup):
        losses.append(step(k)[1])
    sync(torch, device)
    warmup_s = time.perf_counter() - t_compile
    marks = []  # per-step timing without a host sync per step: CUDA events on the GPU, the host clock on CPU
    mark = (lambda: marks.append(torch.cuda.Event(enable_timing=True)) or marks[-1].record()) if not cpu \
        else (lambda: marks.append(time.perf_counter()))
    t0 = time.perf_counter()
    for k in range(args.warmup, total_steps):
        mark()
        n, loss = step(k)
        real_tokens += n
        losses.append(loss)
    mark()
    sync(torch, device)
    dt = time.perf_counter() - t0
    step_ms = [round(a.elapsed_time(b), 1) if not cpu else round((b - a) * 1e3, 1)
               for a, b in zip(marks, marks[1:])]
    real_tokens = int(dist.sum(torch.tensor(real_tokens, device=device)).item())
    peak = (dist.max(torch.tensor(torch.cuda.max_memory_allocated(device) / 2 ** 30, device=device)).item()
            if not cpu else None)
    prof = profile_steps(torch, device, step, total_steps, name, args.profile) if args.profile and dist.world == 1 \
        else None
    tps = real_tokens / dt
    res = {"preset": name, "world_size": dist.world, "global_batch": args.global_batch, "per_gpu_batch": per_gpu,
           "micro_batch": micro, "grad_accum": accum, "packing": cfg.packing, "grad_ckpt": cfg.grad_ckpt,
           "compiled": compiled, "dtype": str(dtype).split(".")[-1], "steps": args.steps,
           "warmup_seconds": round(warmup_s, 1), "seconds": round(dt, 3), "tokens_per_s": round(tps, 1),
           "samples_per_s": round(args.global_batch * args.steps / dt, 2),
           "peak_mem_gib": round(peak, 2) if peak else None, "achieved_tflops": round(4 * n_params * tps / 1e12, 3),
           "losses": [round(x.item(), 5) for x in losses], "step_ms": step_ms, "profile": prof,
           "dynamo_stats": _dynamo_stats(torch),
           "note": "lean: no bitsandbytes on this machine, so no 4-bit base" if cfg.load_4bit else ""}
    del model, opt
    gc.collect()
    if not cpu:
        torch.cuda.empty_cache()
    return res


def _dynamo_stats(torch) -> dict:
    """Cumulative compile counters of this process (a recompile mid-run shows up as more unique graphs)."""
    from torch._dynamo.utils import counters
    return dict(counters["stats"])


PROFILE_STEPS = 3


def profile_steps(torch, device, step, first: int, name: str, out_dir: str, n: int = PROFILE_STEPS) -> dict:
    """torch.profiler over n more steps: GPU busy share of the wall time, kernels per step, top ops (to a file)."""
    from torch.profiler import ProfilerActivity, profile
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    sync(torch, device)
    with profile(activities=acts) as prof:
        t = time.perf_counter()
        for k in range(first, first + n):
            step(k)
        sync(torch, device)
        wall = (time.perf_counter() - t) / n
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    busy = sum(e.time_range.elapsed_us() for e in kernels) / 1e6 / n
    sort = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    table = prof.key_averages().table(sort_by=sort, row_limit=30)
    Path(out_dir, f"profile-{name}.txt").write_text(
        f"{name}: {n} steps, wall {wall * 1e3:.1f} ms/step, GPU kernels busy {busy * 1e3:.1f} ms/step, "
        f"{len(kernels) / n:.0f} kernels/step\n\n{table}\n")
    return {"wall_ms_per_step": round(wall * 1e3, 1), "gpu_busy_ms_per_step": round(busy * 1e3, 1),
            "gpu_busy_share": round(busy / wall, 3) if wall else None, "kernels_per_step": round(len(kernels) / n)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--tiny", action="store_true", help="tiny model on CPU: smoke test")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--presets", default="reference,fast,lean")
    ap.add_argument("--global-batch", type=int, default=16, help="samples per optimizer step over all processes")
    ap.add_argument("--profile", metavar="DIR", help="profile 3 extra steps per preset, tables into DIR")
    ap.add_argument("--compile-backend", help="CPU smoke test only: compile layers with this backend (aot_eager)")
    args = ap.parse_args(argv)
    import torch
    dist = Dist(torch)
    cuda = torch.cuda.is_available() and not args.tiny
    device = torch.device("cuda", dist.local) if cuda else torch.device("cpu")
    peak = matmul_tflops(torch, device, torch.bfloat16 if cuda else torch.float32)
    dev = torch.cuda.get_device_name(device) if cuda else "cpu"
    results = []
    for p in args.presets.split(","):
        r = bench_preset(p, args, torch, device, dist)
        r["mfu"] = round(r["achieved_tflops"] / (peak * dist.world), 4)
        results.append(r)
        if dist.rank == 0:  # written after every preset, so a run cut short still leaves its numbers
            print(json.dumps(r), flush=True)
            Path(args.out).write_text(json.dumps(
                {"device": dev, "world_size": dist.world, "matmul_tflops_per_gpu": round(peak, 1),
                 "flops_per_token": "4*params", "tiny": args.tiny, "torch": torch.__version__,
                 "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "results": results}, indent=2))
    if dist.rank == 0:
        print(f"\n{dev} x{dist.world}, measured bf16 matmul {peak:.1f} TFLOP/s per GPU, global batch "
              f"{args.global_batch}\n")
        print("| preset | GPUs | micro x accum | real tokens/s | samples/s | peak GiB | MFU |\n|---|---|---|---|---|---|---|")
        for r in results:
            print(f"| {r['preset']} | {r['world_size']} | {r['micro_batch']}x{r['grad_accum']} | {r['tokens_per_s']} | "
                  f"{r['samples_per_s']} | {r['peak_mem_gib']} | {r['mfu']:.1%} |")
    if dist.world > 1:
        torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
