"""CLI. Exit codes: 0 ok, 2 bad input (release, model folder, template, device, out of GPU memory),
1 unexpected failure (with its traceback).

  python -m train run --data REL --model MODEL_DIR --out ADAPTER_DIR [--preset reference|fast|lean]
                      [--template deepseek|auto] [--max-steps N] [--epochs E] [--cpu]
  python -m train generate --model M --adapter A "祝姐姐生日快乐, 小红书风格"
  python -m train eval --model M --adapter A --data REL [--limit N] [--max-new-tokens T] [--out eval.json]
  python -m train merge --model M --adapter A --out DIR [--dtype float16|bfloat16|float32]
"""
from __future__ import annotations

import argparse
import os
import sys

from train.data import TrainError


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m train", epilog=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="train a LoRA adapter (re-run to resume from the last checkpoint)")
    r.add_argument("--data", required=True, help="release folder (train.json) or .json/.jsonl records")
    r.add_argument("--model", required=True)
    r.add_argument("--out", required=True)
    r.add_argument("--preset", default="fast", choices=["reference", "fast", "lean"])
    r.add_argument("--template", choices=["deepseek", "auto"], default=None)
    r.add_argument("--max-steps", type=int, default=None)
    r.add_argument("--epochs", type=float, default=None)
    r.add_argument("--batch-size", type=int, default=None)
    r.add_argument("--grad-accum", type=int, default=None)
    r.add_argument("--save-steps", type=int, default=None)
    r.add_argument("--pass-rate-every", type=int, default=None, metavar="N",
                   help="every N steps, generate for the release's eval split and log the curator's pass rate")
    r.add_argument("--cpu", action="store_true", help="run on CPU in fp32 (smoke tests only)")
    g = sub.add_parser("generate", help="generate with a trained adapter")
    g.add_argument("--model", required=True)
    g.add_argument("--adapter", required=True)
    g.add_argument("--max-new-tokens", type=int, default=128)
    g.add_argument("--cpu", action="store_true")
    g.add_argument("prompt", nargs="+")
    e = sub.add_parser("eval", help="student vs base on the release's eval split, judged by the curator")
    e.add_argument("--model", required=True)
    e.add_argument("--adapter", required=True)
    e.add_argument("--data", required=True, help="release folder with an eval split (records.jsonl or eval.json)")
    e.add_argument("--limit", type=int, default=None, help="first N eval records only")
    e.add_argument("--max-new-tokens", type=int, default=128)
    e.add_argument("--batch-size", type=int, default=16, help="generation batch")
    e.add_argument("--curate-config", default=None, help="curate.toml (default: the curator's defaults)")
    e.add_argument("--out", default=None, help="report JSON (default: ADAPTER/eval.json)")
    e.add_argument("--cpu", action="store_true")
    m = sub.add_parser("merge", help="fold the adapter into the base model (a plain transformers folder)")
    m.add_argument("--model", required=True)
    m.add_argument("--adapter", required=True)
    m.add_argument("--out", required=True, help="new or empty folder")
    m.add_argument("--dtype", choices=["float16", "bfloat16", "float32"], default=None,
                   help="default: the training dtype (float16 for the reference preset, else bfloat16)")
    return ap


def main(argv=None) -> int:
    try:
        a = _parser().parse_args(argv)
    except SystemExit as e:  # argparse already printed its usage line
        return 0 if e.code == 0 else 2
    try:
        from transformers.utils import logging as hf_logging
        hf_logging.disable_progress_bar()  # keep stderr to our one-line messages
        from train import core
        if a.cmd == "run":
            cfg = core.preset_config(a.preset, template=a.template, max_steps=a.max_steps, epochs=a.epochs,
                                     batch_size=a.batch_size, grad_accum=a.grad_accum, save_steps=a.save_steps,
                                     eval_every=a.pass_rate_every, cpu=a.cpu or None)
            meta = core.run(a.data, a.model, a.out, cfg)
            if os.environ.get("RANK", "0") == "0":  # under torchrun/accelerate, one line, not one per process
                loss = meta["train_loss"]  # None: the checkpoint resumed from had no step left to train
                print(f"adapter saved to {a.out}: {meta['global_step']} steps, "
                      + (f"loss {loss:.4f}" if loss is not None else "none trained by this run"))
        elif a.cmd == "generate":
            for text in core.generate(a.model, a.adapter, a.prompt, max_new_tokens=a.max_new_tokens,
                                      cpu=True if a.cpu else None):
                print(text)
        elif a.cmd == "eval":
            from pathlib import Path
            from train.eval import evaluate, print_table, write_report
            report = evaluate(a.model, a.adapter, a.data, limit=a.limit, max_new_tokens=a.max_new_tokens,
                              cpu=True if a.cpu else None, batch_size=a.batch_size, curate_config=a.curate_config)
            out = a.out or str(Path(a.adapter) / "eval.json")
            write_report(report, out)
            print_table(report)
            print(f"report: {out}")
        else:
            from train.merge import merge
            print(f"merged model saved to {merge(a.model, a.adapter, a.out, a.dtype)}")
        return 0
    except TrainError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
