"""CLI. Exit codes: 0 ok, 2 bad input (release, model folder, template, device), 1 unexpected failure.

  python -m train run --data REL --model MODEL_DIR --out ADAPTER_DIR [--preset reference|fast|lean]
                      [--template deepseek|auto] [--max-steps N] [--epochs E] [--cpu]
  python -m train generate --model M --adapter A "祝姐姐生日快乐, 小红书风格"
"""
from __future__ import annotations

import argparse
import sys

from train.data import TrainError


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m train")
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
    r.add_argument("--save-steps", type=int, default=None)
    r.add_argument("--cpu", action="store_true", help="run on CPU in fp32 (smoke tests only)")
    g = sub.add_parser("generate", help="generate with a trained adapter")
    g.add_argument("--model", required=True)
    g.add_argument("--adapter", required=True)
    g.add_argument("--max-new-tokens", type=int, default=128)
    g.add_argument("--cpu", action="store_true")
    g.add_argument("prompt", nargs="+")
    a = ap.parse_args(argv)
    try:
        from transformers.utils import logging as hf_logging
        hf_logging.disable_progress_bar()  # keep stderr to our one-line messages
        from train import core
        if a.cmd == "run":
            cfg = core.preset_config(a.preset, template=a.template, max_steps=a.max_steps, epochs=a.epochs,
                                     batch_size=a.batch_size, save_steps=a.save_steps, cpu=a.cpu or None)
            meta = core.run(a.data, a.model, a.out, cfg)
            print(f"adapter saved to {a.out}: {meta['global_step']} steps, loss {meta['train_loss']:.4f}")
        else:
            for text in core.generate(a.model, a.adapter, a.prompt, max_new_tokens=a.max_new_tokens,
                                      cpu=True if a.cpu else None):
                print(text)
        return 0
    except TrainError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
