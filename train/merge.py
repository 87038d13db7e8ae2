"""Fold a LoRA adapter into its base model: a plain transformers model folder that needs no peft to load."""
from __future__ import annotations

import os
from pathlib import Path

from distillery.io import write_json_atomic

from train.data import TrainError

DTYPES = ("float32", "float16", "bfloat16")


def merge(model_dir: str | os.PathLike, adapter_dir: str | os.PathLike, out_dir: str | os.PathLike,
          dtype: str | None = None) -> Path:
    """merge_and_unload on CPU (merging is a few small matmuls a layer; no GPU needed), then save_pretrained.

    dtype: the merged weights' dtype; default the training dtype (float16 for the reference preset, else bfloat16).
    """
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from train.core import check_model_dir, read_adapter
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise TrainError(f"{out}: output exists and is not an empty folder (merge never overwrites)")
    a, meta = read_adapter(adapter_dir)
    dtype = dtype or ("float16" if meta.get("preset") == "reference" else "bfloat16")
    if dtype not in DTYPES:
        raise TrainError(f"unknown dtype {dtype!r} (choose from {', '.join(DTYPES)})")
    check_model_dir(model_dir)
    tok = AutoTokenizer.from_pretrained(model_dir)
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype))
    merged = PeftModel.from_pretrained(base, str(a)).merge_and_unload()
    # the adapter folder's tokenizer is the one training used (run may have set a pad token)
    if (a / "tokenizer_config.json").exists():
        tok = AutoTokenizer.from_pretrained(a)
    out.mkdir(parents=True, exist_ok=True)
    merged.save_pretrained(str(out))
    tok.save_pretrained(str(out))
    write_json_atomic(out / "distillery_merge.json", {
        "base_model": str(model_dir), "adapter": str(a), "dtype": dtype, "training": meta.get("config"),
        "template": meta.get("template"), "release": meta.get("release"),
        "release_content_hash": meta.get("release_content_hash"), "manifest_hash": meta.get("manifest_hash"),
        # adapters trained before the rename stored the train records' hash as "release_hash"
        "train_records_hash": meta.get("train_records_hash", meta.get("release_hash"))})
    return out
