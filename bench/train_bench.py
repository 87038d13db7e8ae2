"""Throughput of the train presets on the DeepSeek-LLM-7B architecture with random weights (no download).

    python bench/train_bench.py --out bench_train.json            # GPU: 7B shape, all presets in one process
    python bench/train_bench.py --tiny --steps 3 --warmup 1 --out /tmp/b.json   # CPU smoke test

Per preset: real (non-pad) tokens/s, samples/s, peak GPU memory, MFU against a measured bf16 matmul rate
(6 * params * tokens for the frozen-base forward+backward is an upper estimate; we count 4*P for the frozen base
(forward + input-grad backward) + a negligible LoRA term, and say so in the JSON).
Synthetic samples: prompt 30-50 tokens (masked), answer 30-130 tokens; effective batch 16 (8 x accum 2).
"""
from __future__ import annotations

import argparse
import gc
import json
import random
import sys
import time
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
    n = 8192 if device == "cuda" else 512
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    sync(torch, device)
    reps = 20 if device == "cuda" else 3
    t = time.perf_counter()
    for _ in range(reps):
        a @ b
    sync(torch, device)
    return 2 * n ** 3 * reps / (time.perf_counter() - t) / 1e12


def sync(torch, device):
    if device == "cuda":
        torch.cuda.synchronize()


def bench_preset(preset: str, args, torch, device) -> dict:
    from peft import get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM
    from train import collator, lora_config, preset_config

    cfg = preset_config(preset, cpu=(device == "cpu"))
    if args.tiny:
        mc = LlamaConfig(vocab_size=1000, hidden_size=64, intermediate_size=172, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=512)
    else:  # DeepSeek-LLM-7B
        mc = LlamaConfig(vocab_size=102400, hidden_size=4096, intermediate_size=11008, num_hidden_layers=30,
                         num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096)
    mc.use_cache = False
    dtype = torch.float32 if device == "cpu" else (torch.float16 if preset == "reference" else torch.bfloat16)
    note = ""
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    with torch.device(device if device == "cuda" else "cpu"):
        model = LlamaForCausalLM(mc).to(dtype)
    if cfg.load_4bit and device == "cuda":
        note = "4-bit not applied to random weights in-process (needs from_pretrained); lean = grad ckpt only"
    if cfg.grad_ckpt:
        model.gradient_checkpointing_enable()
        model.enable_input_require_grads()
    model = get_peft_model(model, lora_config(cfg))
    n_params = sum(p.numel() for p in model.parameters())
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.lr)
    coll = collator(cfg, None) if cfg.packing else None
    if coll is None:
        from transformers import DataCollatorForSeq2Seq

        class _Pad:  # a tokenizer stand-in that only knows the pad id, enough for DataCollatorForSeq2Seq
            pad_token_id = 0
            padding_side = "right"

            def pad(self, feats, **kw):
                from transformers.tokenization_utils_base import BatchEncoding
                m = max(len(f["input_ids"]) for f in feats)
                return BatchEncoding({k: torch.tensor([f[k] + [0] * (m - len(f[k])) for f in feats])
                                      for k in ("input_ids", "attention_mask")})
        coll = DataCollatorForSeq2Seq(tokenizer=_Pad(), padding=True)
    micro, accum = cfg.batch_size, cfg.grad_accum
    rows = synth_rows(micro * accum * (args.warmup + args.steps), mc.vocab_size)
    amp = torch.autocast("cuda", dtype=dtype) if device == "cuda" and preset != "reference" else None
    real_tokens, samples, t0 = 0, 0, None
    model.train()
    for step in range(args.warmup + args.steps):
        if step == args.warmup:
            sync(torch, device)
            t0 = time.perf_counter()
        for k in range(accum):
            i = (step * accum + k) * micro
            batch = {key: v.to(device) if hasattr(v, "to") else v for key, v in coll(rows[i:i + micro]).items()}
            if amp:
                with amp:
                    loss = model(**batch).loss / accum
            else:
                loss = model(**batch).loss / accum
            loss.backward()
            if step >= args.warmup:
                real_tokens += sum(len(r["input_ids"]) for r in rows[i:i + micro])
                samples += micro
        opt.step()
        opt.zero_grad(set_to_none=True)
    sync(torch, device)
    dt = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated() / 2 ** 30 if device == "cuda" else None
    tps = real_tokens / dt
    res = {"preset": preset, "steps": args.steps, "seconds": round(dt, 3), "tokens_per_s": round(tps, 1),
           "samples_per_s": round(samples / dt, 2), "peak_mem_gib": round(peak, 2) if peak else None,
           "achieved_tflops": round(4 * n_params * tps / 1e12, 3), "note": note}
    del model, opt
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--tiny", action="store_true", help="tiny model on CPU: smoke test")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--presets", default="reference,fast,lean")
    args = ap.parse_args(argv)
    import torch
    device = "cuda" if torch.cuda.is_available() and not args.tiny else "cpu"
    peak = matmul_tflops(torch, device, torch.bfloat16 if device == "cuda" else torch.float32)
    results = []
    for p in args.presets.split(","):
        r = bench_preset(p, args, torch, device)
        r["mfu"] = round(r["achieved_tflops"] / peak, 4)
        results.append(r)
        print(json.dumps(r), flush=True)
    dev = torch.cuda.get_device_name(0) if device == "cuda" else "cpu"
    print(f"\n{dev}, measured matmul {peak:.1f} TFLOP/s, effective batch 16\n")
    print("| preset | tokens/s | samples/s | peak GiB | MFU |\n|---|---|---|---|---|")
    for r in results:
        print(f"| {r['preset']} | {r['tokens_per_s']} | {r['samples_per_s']} | {r['peak_mem_gib']} | {r['mfu']:.1%} |")
    Path(args.out).write_text(json.dumps({"device": dev, "matmul_tflops": peak, "flops_per_token": "4*params",
                                          "tiny": args.tiny, "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
