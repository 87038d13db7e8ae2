"""Presets, LoRA config, collators, the pass-rate callback, training and generation."""
from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable

from train.data import (TrainError, Release, build_dataset, check_template, load_release, prompt_text,
                        tokens_in)

PRESETS = ("reference", "fast", "lean")
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass
class TrainConfig:
    """Everything a run needs. Presets only change `packing`, `grad_ckpt`, dtype and `load_4bit`."""
    preset: str = "fast"
    template: str = "deepseek"  # forced to "reference" by the reference preset
    batch_size: int = 8
    grad_accum: int = 2
    lr: float = 1e-4
    epochs: float = 3
    max_steps: int = -1
    save_steps: int = 100
    logging_steps: int = 10
    lora_r: int = 8
    lora_alpha: int = 32
    lora_dropout: float = 0.1
    packing: bool = True
    grad_ckpt: bool = False
    load_4bit: bool = False
    cpu: bool = False  # explicit CPU run (fp32); presets are otherwise GPU-only
    seed: int = 42
    eval_every: int = 0  # pass-rate callback period in steps (0 = off)
    eval_prompts: list = field(default_factory=list)  # [{"prompt": str, "max_chars": int}]
    cache_dir: str | None = None


def preset_config(preset: str = "fast", **overrides) -> TrainConfig:
    if preset not in PRESETS:
        raise TrainError(f"unknown preset {preset!r} (choose from {', '.join(PRESETS)})")
    base = TrainConfig(preset=preset)
    if preset == "reference":
        base = replace(base, template="reference", packing=False, grad_ckpt=True)
    elif preset == "lean":
        base = replace(base, packing=False, grad_ckpt=True, load_4bit=True)
    cfg = replace(base, **{k: v for k, v in overrides.items() if v is not None})
    if cfg.preset == "reference":
        cfg.template = "reference"  # the tutorial's format is what makes it the reference
    return cfg


def lora_config(preset: str | TrainConfig = "fast"):
    from peft import LoraConfig, TaskType
    cfg = preset if isinstance(preset, TrainConfig) else preset_config(preset)
    return LoraConfig(task_type=TaskType.CAUSAL_LM, target_modules=list(LORA_TARGETS), inference_mode=False,
                      r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout)


def collator(preset: str | TrainConfig, tokenizer):
    """reference/lean: pad to the longest in the batch. fast: padding-free packing, one row per batch with
    position_ids restarting per sample; transformers turns that into a block-diagonal causal mask (sdpa/eager/
    flex) or varlen flash attention, so no attention crosses samples (tested: packed == unpacked logits)."""
    from transformers import DataCollatorForSeq2Seq, DataCollatorWithFlattening
    cfg = preset if isinstance(preset, TrainConfig) else preset_config(preset)
    if cfg.packing:
        return _PackingCollator()
    return DataCollatorForSeq2Seq(tokenizer=tokenizer, padding=True)


class _PackingCollator:
    """DataCollatorWithFlattening plus use_cache=False. Why: transformers (5.x) only derives the per-sample mask
    from position_ids when no KV cache exists, and Llama creates one whenever use_cache is on, even in training;
    with it the packed samples silently attend to each other (test_packing_lets_no_attention_cross_samples)."""

    def __init__(self):
        from transformers import DataCollatorWithFlattening
        self.inner = DataCollatorWithFlattening(return_position_ids=True)

    def __call__(self, features):
        batch = self.inner(features)
        batch["use_cache"] = False
        return batch


def pass_check_chars(output: str, max_chars: int | None) -> tuple[bool, str]:
    """Fallback pass check (curate's Curator is not importable yet): non-empty and 字数 < max_chars."""
    from distillery.text import char_count
    n = char_count(output)
    if n == 0:
        return False, "empty output"
    if max_chars and n >= max_chars:
        return False, f"{n} 字 >= {max_chars}"
    return True, f"{n} 字"


def _device_and_dtype(cfg: TrainConfig):
    import torch
    if cfg.cpu:
        return "cpu", torch.float32
    if not torch.cuda.is_available():
        raise TrainError(f"preset {cfg.preset} needs a GPU and none is visible (pass --cpu for a slow fp32 run)")
    return "cuda", (torch.float16 if cfg.preset == "reference" else torch.bfloat16)


def load_model_dir(model_dir: str | os.PathLike, cfg: TrainConfig | None = None, *, template: str | None = None):
    """Load tokenizer + model; one-line TrainError when the folder lacks weights or a tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    cfg = cfg or TrainConfig(cpu=not torch.cuda.is_available())
    d = Path(model_dir)
    if not d.is_dir():
        raise TrainError(f"{d}: model folder does not exist")
    names = {p.name for p in d.iterdir()}
    if not any(n.endswith((".safetensors", ".bin")) or n.endswith(".safetensors.index.json") for n in names):
        raise TrainError(f"{d}: model folder has no weights (*.safetensors / *.bin)")
    if not names & {"tokenizer.json", "tokenizer.model", "tokenizer_config.json"}:
        raise TrainError(f"{d}: model folder has no tokenizer (tokenizer.json / tokenizer_config.json)")
    device, dtype = _device_and_dtype(cfg)
    tok = AutoTokenizer.from_pretrained(d)
    if template:
        check_template(tok, template)  # before the (slow) weights
    kw = {"dtype": dtype}
    if cfg.load_4bit and device == "cuda":
        try:
            from transformers import BitsAndBytesConfig
            import bitsandbytes  # noqa: F401
            kw["quantization_config"] = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                           bnb_4bit_compute_dtype=dtype)
        except ImportError:
            pass  # lean without bitsandbytes = gradient checkpointing only
    if device == "cuda":
        kw["device_map"] = {"": 0}
    model = AutoModelForCausalLM.from_pretrained(d, **kw)
    return tok, model


class PassRateCallback:
    """Every `every` steps: greedy-generate for a fixed prompt set, check each output, log `pass_rate`."""

    def __new__(cls, *a, **k):  # subclass TrainerCallback lazily so importing train stays light
        from transformers import TrainerCallback

        class _CB(TrainerCallback):
            def __init__(self, tokenizer, template, prompts, every, max_new_tokens=64,
                         check: Callable[[str, int | None], tuple[bool, str]] = pass_check_chars):
                self.tok, self.template, self.prompts, self.every = tokenizer, template, prompts, every
                self.max_new_tokens, self.check, self.history = max_new_tokens, check, []

            def on_step_end(self, args, state, control, model=None, **kw):
                if not self.every or not self.prompts or state.global_step % self.every:
                    return
                outs = generate_texts(model, self.tok, self.template, [p["prompt"] for p in self.prompts],
                                      max_new_tokens=self.max_new_tokens)
                ok = [self.check(o, p.get("max_chars"))[0] for o, p in zip(outs, self.prompts)]
                rate = sum(ok) / len(ok)
                self.history.append({"step": state.global_step, "pass_rate": rate})
                state.log_history.append({"step": state.global_step, "pass_rate": rate})
                print(f"step {state.global_step}: pass rate {rate:.2f} ({sum(ok)}/{len(ok)})", flush=True)

        return _CB(*a, **k)


def generate_texts(model, tok, template: str, prompts: list[str], max_new_tokens: int = 128) -> list[str]:
    """Greedy generation with the training template; returns only the new text."""
    import torch
    was_training = model.training
    model.eval()
    out = []
    eos = tok.convert_tokens_to_ids("<｜end▁of▁sentence｜>") if template != "auto" else tok.eos_token_id
    if eos is None or eos == tok.unk_token_id:
        eos = tok.eos_token_id
    dev = next(model.parameters()).device
    with torch.no_grad():
        for p in prompts:
            ids = tok(prompt_text(template, tok, p), add_special_tokens=False, return_tensors="pt")["input_ids"]
            ids = ids.to(dev)
            gen = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                                 do_sample=False, eos_token_id=eos, pad_token_id=tok.pad_token_id or eos)
            text = tok.decode(gen[0, ids.shape[1]:], skip_special_tokens=True).strip()
            if template == "reference" and text.startswith("Assistant:"):
                text = text[len("Assistant:"):].strip()  # the tutorial's prompt leaves "Assistant:" to the model
            out.append(text)
    if was_training:
        model.train()
    return out


def _last_checkpoint(out: Path) -> str | None:
    cks = [p for p in out.glob("checkpoint-*") if p.is_dir() and p.name.split("-")[-1].isdigit()]
    return str(max(cks, key=lambda p: int(p.name.split("-")[-1]))) if cks else None


def _model_card(rel: Release, cfg: TrainConfig, model_dir: str, steps: int, loss: float | None) -> str:
    return (f"---\nlibrary_name: peft\nbase_model: {model_dir}\n---\n# distillery LoRA adapter\n\n"
            f"- release: `{rel.path}`\n- release content hash: `{rel.content_hash}`\n"
            f"- manifest hash: `{rel.manifest_hash or 'none (no manifest.json)'}`\n"
            f"- records: {len(rel.records)}\n- preset: {cfg.preset}, template: {cfg.template}\n"
            f"- LoRA r={cfg.lora_r} alpha={cfg.lora_alpha} dropout={cfg.lora_dropout} on {', '.join(LORA_TARGETS)}\n"
            f"- batch {cfg.batch_size} x accum {cfg.grad_accum}, lr {cfg.lr}, steps {steps}, final loss {loss}\n\n"
            f"Generate with: `python -m train generate --model {model_dir} --adapter <this folder> \"...\"`\n")


def plot_loss(log_history: list[dict], path: str | os.PathLike) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    pts = [(h["step"], h["loss"]) for h in log_history if "loss" in h]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    if pts:
        ax.plot(*zip(*pts), marker=".")
    ax.set_xlabel("step"), ax.set_ylabel("train loss"), ax.set_title("LoRA training loss")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def run(data: str | os.PathLike, model_dir: str | os.PathLike, out_dir: str | os.PathLike,
        cfg: TrainConfig | None = None) -> dict:
    """Train a LoRA adapter. Re-running with the same out_dir resumes from its last checkpoint."""
    import torch
    from peft import get_peft_model
    from transformers import Trainer, TrainingArguments
    cfg = cfg or preset_config("fast")
    rel = load_release(data)
    for line in rel.problems:
        print(f"skipped: {line}", flush=True)
    tok, model = load_model_dir(model_dir, cfg, template=cfg.template)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    cache = cfg.cache_dir or os.path.join(os.path.expanduser("~"), ".cache", "distillery", "tokenized")
    rows = build_dataset(rel, tok, cfg.template, cache_dir=cache)
    model.config.use_cache = False  # no KV cache in training (also required for packing, see _PackingCollator)
    if cfg.grad_ckpt:
        model.enable_input_require_grads()  # the tutorial's line: checkpointing + frozen embeddings need it
    model = get_peft_model(model, lora_config(cfg))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    device, dtype = _device_and_dtype(cfg)
    args = TrainingArguments(
        output_dir=str(out), per_device_train_batch_size=cfg.batch_size, gradient_accumulation_steps=cfg.grad_accum,
        learning_rate=cfg.lr, num_train_epochs=cfg.epochs, max_steps=cfg.max_steps, logging_steps=cfg.logging_steps,
        save_steps=cfg.save_steps, save_on_each_node=True, gradient_checkpointing=cfg.grad_ckpt,
        bf16=(device == "cuda" and dtype == torch.bfloat16), use_cpu=(device == "cpu"), report_to=[],
        remove_unused_columns=False, seed=cfg.seed, dataloader_num_workers=0, disable_tqdm=True)
    from transformers import TrainerCallback

    class _Count(TrainerCallback):  # steps really trained by this call (proves resume did not restart at 0)
        n = 0

        def on_step_end(self, args, state, control, **kw):
            _Count.n += 1

    callbacks = [_Count()]
    if cfg.eval_every and cfg.eval_prompts:
        callbacks.append(PassRateCallback(tok, cfg.template, cfg.eval_prompts, cfg.eval_every))
    trainer = Trainer(model=model, args=args, train_dataset=rows, data_collator=collator(cfg, tok),
                      callbacks=callbacks)
    resume = _last_checkpoint(out)
    if resume:
        print(f"resuming from {resume}", flush=True)
    t0 = time.time()
    result = trainer.train(resume_from_checkpoint=resume)
    model.save_pretrained(str(out))
    tok.save_pretrained(str(out))
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    meta = {"preset": cfg.preset, "template": cfg.template, "instruction": rel.instruction,
            "release": str(rel.path), "release_hash": rel.content_hash, "manifest_hash": rel.manifest_hash,
            "global_step": trainer.state.global_step, "train_loss": result.training_loss,
            "tokens": tokens_in(rows),
            "resumed_from": resume, "steps_this_run": _Count.n, "seconds": round(time.time() - t0, 2), "config": asdict(cfg)}
    (out / "distillery_train.json").write_text(json.dumps(meta, ensure_ascii=False, indent=2))
    (out / "README.md").write_text(_model_card(rel, cfg, str(model_dir), trainer.state.global_step,
                                               losses[-1] if losses else None), encoding="utf-8")
    plot_loss(trainer.state.log_history, out / "loss.png")
    meta["log_history"] = trainer.state.log_history
    return meta


def load_adapter(model_dir, adapter_dir, *, cpu: bool | None = None):
    import torch
    from peft import PeftModel
    cpu = (not torch.cuda.is_available()) if cpu is None else cpu
    a = Path(adapter_dir)
    if not (a / "adapter_config.json").exists():
        raise TrainError(f"{a}: not an adapter folder (no adapter_config.json)")
    meta = json.loads((a / "distillery_train.json").read_text()) if (a / "distillery_train.json").exists() else {}
    cfg = preset_config(meta.get("preset", "fast"), cpu=cpu)
    tok, model = load_model_dir(model_dir, cfg)
    model = PeftModel.from_pretrained(model, str(a))
    return tok, model, meta


def generate(model_dir, adapter_dir, prompts: list[str], *, max_new_tokens: int = 128,
             cpu: bool | None = None) -> list[str]:
    """Generate with the adapter, using the template (and default instruction) it was trained with."""
    tok, model, meta = load_adapter(model_dir, adapter_dir, cpu=cpu)
    template = meta.get("template", "deepseek")
    instr = meta.get("instruction", "")
    return generate_texts(model, tok, template, [instr + p for p in prompts], max_new_tokens=max_new_tokens)
