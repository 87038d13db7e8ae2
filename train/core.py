"""Presets, LoRA config, collators, the pass-rate callback, training and generation."""
from __future__ import annotations

import contextlib
import json
import math
import os
import time
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

from distillery.io import write_json_atomic, write_text_atomic

from train.data import (TrainError, Release, build_dataset, check_template, load_release, prompt_text,
                        tokens_in)

PRESETS = ("reference", "fast", "lean")
PASS_RATE_PROMPTS = 32  # eval records the pass-rate callback generates for when none are given
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass
class TrainConfig:
    """Everything a run needs. Presets change packing, grad_ckpt, compile, dtype, load_4bit and how the same
    effective batch (batch_size x grad_accum = 16) is split into micro-batches; never lr, LoRA or the batch itself."""
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
    compile: bool = False  # torch.compile each decoder layer (GPU only): removes most per-op launch overhead
    cpu: bool = False  # explicit CPU run (fp32); presets are otherwise GPU-only
    seed: int = 42
    eval_every: int = 0  # pass-rate callback period in steps (0 = off)
    eval_prompts: list = field(default_factory=list)  # records {instruction, input, meta?}; default: eval split
    cache_dir: str | None = None


def preset_config(preset: str = "fast", **overrides) -> TrainConfig:
    if preset not in PRESETS:
        raise TrainError(f"unknown preset {preset!r} (choose from {', '.join(PRESETS)})")
    base = TrainConfig(preset=preset)
    if preset == "reference":
        base = replace(base, template="reference", packing=False, grad_ckpt=True)
    elif preset == "fast":  # the whole effective batch (16) as one packed row: half the launches, no accumulation
        base = replace(base, batch_size=16, grad_accum=1, compile=True)
    elif preset == "lean":  # packed micro-batches of 8 (no padding), activations recomputed
        base = replace(base, grad_ckpt=True, load_4bit=True, compile=True)
    cfg = replace(base, **{k: v for k, v in overrides.items() if v is not None})
    if cfg.preset == "reference":
        cfg.template = "reference"  # the tutorial's format is what makes it the reference
    return cfg


def lora_config(preset: str | TrainConfig = "fast"):
    from peft import LoraConfig, TaskType
    cfg = preset if isinstance(preset, TrainConfig) else preset_config(preset)
    return LoraConfig(task_type=TaskType.CAUSAL_LM, target_modules=list(LORA_TARGETS), inference_mode=False,
                      r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout)


def compile_decoder_layers(model, backend: str = "inductor") -> int:
    """Regional compilation: torch.compile every decoder layer (the same code 30 times, so it compiles once).
    Why: eager PyTorch + peft launches ~100 small kernels per layer (RMSNorm, rotary, LoRA dropout/scale/add),
    and on a 7B model with ~2k tokens a step the GPU waits on Python. The mask and rotary tables are built outside
    the layers, so packing's per-sample mask is untouched. dynamic=True: packed rows change length every step."""
    import torch
    from transformers.modeling_layers import GradientCheckpointingLayer
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    layers = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
    for layer in layers:
        layer.compile(backend=backend, dynamic=True)
    return len(layers)


def prepare_model(model, cfg: TrainConfig):
    """The model side of a preset, shared by `run` and bench/train_bench.py: no KV cache, LoRA, compiled layers.
    (Activation checkpointing itself is switched on by the Trainer, or by the caller outside a Trainer.)"""
    from peft import get_peft_model
    model.config.use_cache = False  # no KV cache in training (also required for packing, see _PackingCollator)
    if cfg.grad_ckpt:
        model.enable_input_require_grads()  # the tutorial's line: checkpointing + frozen embeddings need it
    model = get_peft_model(model, lora_config(cfg))
    if cfg.compile and not cfg.cpu:
        compile_decoder_layers(model)
    return model


def per_device_batch(cfg: TrainConfig, world_size: int) -> tuple[int, int]:
    """(per-device micro-batch, accumulation steps) that keep the effective batch, batch_size x grad_accum, the
    same on any number of GPUs: under torchrun/accelerate the learning dynamics do not change with the GPU count."""
    effective = cfg.batch_size * cfg.grad_accum
    if effective % world_size:
        raise TrainError(f"effective batch {effective} (batch size {cfg.batch_size} x grad accum {cfg.grad_accum}) "
                         f"does not split over {world_size} processes")
    per_gpu = effective // world_size
    micro = math.gcd(per_gpu, cfg.batch_size)
    return micro, per_gpu // micro


def collator(preset: str | TrainConfig, tokenizer):
    """reference/lean: pad to the longest in the batch. fast: padding-free packing, one row per batch with
    position_ids restarting per sample; transformers turns that into a block-diagonal causal mask (sdpa/eager/
    flex) or varlen flash attention, so no attention crosses samples (tested: packed == unpacked logits)."""
    from transformers import DataCollatorForSeq2Seq
    cfg = preset if isinstance(preset, TrainConfig) else preset_config(preset)
    if cfg.packing:
        return _PackingCollator()
    return DataCollatorForSeq2Seq(tokenizer=tokenizer, padding=True)


class _PackingCollator:
    """DataCollatorWithFlattening plus use_cache=False. Why: transformers (5.x) only derives the per-sample mask
    from position_ids when no KV cache exists, and Llama creates one whenever use_cache is on, even in training;
    with it the packed samples silently attend to each other (test_packing_lets_no_attention_cross_samples)."""

    def __init__(self, pad_to_multiple_of: int = 16):
        from transformers import DataCollatorWithFlattening
        self.inner = DataCollatorWithFlattening(return_position_ids=True)
        self.multiple = pad_to_multiple_of

    def __call__(self, features):
        batch = self.inner(features)
        batch["use_cache"] = False
        return self._pad_row(batch)

    def _pad_row(self, batch):
        """Round the row up to a multiple of 16 with one trailing dummy sample (its own positions, labels -100):
        under torch.compile the Triton kernels are specialised on sizes divisible by 16, so rows of every length
        would compile two variants, one of them mid-run (seen on an H200: +13 s over 30 steps); aligned rows
        are also kinder to the tensor cores. It costs < 16 tokens a row and cannot leak: it comes last."""
        import torch
        extra = -batch["input_ids"].shape[1] % self.multiple
        if not extra:
            return batch
        fill = {"input_ids": torch.zeros(1, extra, dtype=torch.long),
                "labels": torch.full((1, extra), -100, dtype=torch.long),
                "position_ids": torch.arange(extra, dtype=torch.long)[None]}
        for key, tail in fill.items():
            batch[key] = torch.cat([batch[key], tail.to(batch[key].dtype)], dim=1)
        return batch


def _device_and_dtype(cfg: TrainConfig):
    import torch
    if cfg.cpu:
        return "cpu", torch.float32
    if not torch.cuda.is_available():
        raise TrainError(f"preset {cfg.preset} needs a GPU and none is visible (pass --cpu for a slow fp32 run)")
    return "cuda", (torch.float16 if cfg.preset == "reference" else torch.bfloat16)


@contextlib.contextmanager
def explain_oom(advice: str):
    """CUDA out of memory → one TrainError line, `advice`, naming what to try (e.g. oom_advice(cfg))."""
    import torch
    try:
        yield
    except torch.cuda.OutOfMemoryError:
        raise TrainError(advice) from None


def oom_advice(cfg: TrainConfig) -> str:
    half = max(1, cfg.batch_size // 2)
    accum = cfg.grad_accum * cfg.batch_size // half
    tips = [f"--batch-size {half} --grad-accum {accum} (same effective batch)"] if cfg.batch_size > 1 else []
    if cfg.preset != "lean":
        tips.append("--preset lean (gradient checkpointing, 4-bit base with bitsandbytes)")
    return (f"CUDA out of memory with preset {cfg.preset}, batch size {cfg.batch_size}: try "
            + (" or ".join(tips) if tips else "a GPU with more memory"))


def check_model_dir(model_dir: str | os.PathLike) -> Path:
    """One-line TrainError unless the folder has weights and a tokenizer (before anything slow is loaded)."""
    d = Path(model_dir)
    if not d.is_dir():
        raise TrainError(f"{d}: model folder does not exist")
    names = {p.name for p in d.iterdir()}
    if not any(n.endswith((".safetensors", ".bin")) or n.endswith(".safetensors.index.json") for n in names):
        raise TrainError(f"{d}: model folder has no weights (*.safetensors / *.bin)")
    if not names & {"tokenizer.json", "tokenizer.model", "tokenizer_config.json"}:
        raise TrainError(f"{d}: model folder has no tokenizer (tokenizer.json / tokenizer_config.json)")
    return d


def load_model_dir(model_dir: str | os.PathLike, cfg: TrainConfig | None = None, *, template: str | None = None):
    """Load tokenizer + model; one-line TrainError when the folder lacks weights or a tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    cfg = cfg or TrainConfig(cpu=not torch.cuda.is_available())
    d = check_model_dir(model_dir)
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
        kw["device_map"] = {"": int(os.environ.get("LOCAL_RANK", "0"))}  # one GPU per torchrun process
    model = AutoModelForCausalLM.from_pretrained(d, **kw)
    return tok, model


class PassRateCallback:
    """A TrainerCallback for any HF Trainer/TRL script: every `every_n` steps, greedy-generate for a fixed prompt
    set with the training template, run the curator's filters on the outputs and log `pass_rate` (approved share),
    `pass_or_doubtful_rate` and `fails/<filter>` counts into `state.log_history` (hence trainer_state.json).

    prompts: records {instruction, input, meta?} (meta gives the curator the length cap, style, constraint …;
    see train.eval.load_eval_records for a release's eval split) or plain prompt strings.
    tokenizer: defaults to the Trainer's processing_class.
    """

    def __new__(cls, *a, **k):  # subclass TrainerCallback lazily so importing train stays light
        from transformers import TrainerCallback

        class _CB(TrainerCallback):
            def __init__(self, prompts: list, every_n: int, *, tokenizer=None, template: str = "deepseek",
                         max_new_tokens: int = 64, curate_config=None, batch_size: int = 16):
                self.records = [p if isinstance(p, dict) else {"instruction": "", "input": p} for p in prompts]
                self.every, self.tok, self.template = every_n, tokenizer, template
                self.max_new_tokens, self.batch_size, self.history = max_new_tokens, batch_size, []
                self.curate_config, self._ctx = curate_config, None

            def on_step_end(self, args, state, control, model=None, processing_class=None, **kw):
                if not self.every or not self.records or state.global_step % self.every:
                    return
                from train.eval import curate_outputs, filter_fails
                tok = self.tok or processing_class
                if tok is None:
                    raise TrainError("PassRateCallback needs a tokenizer (pass tokenizer= or give the Trainer one)")
                if self._ctx is None:  # the recipe is read once, on first use
                    from curate.filters import Context
                    from train.eval import eval_curate_config
                    self._ctx = Context(self.curate_config or eval_curate_config())
                gen = generate_outputs(model, tok, self.template,
                                       [r["instruction"] + r["input"] for r in self.records],
                                       self.max_new_tokens, batch_size=self.batch_size)
                _, counts, by_filter = curate_outputs(self.records, [g[0] for g in gen], [g[1] for g in gen],
                                                      ctx=self._ctx)
                n, fails = len(self.records), filter_fails(by_filter)
                entry = {"step": state.global_step, "pass_rate": counts.get("approved", 0) / n,
                         "pass_or_doubtful_rate": (counts.get("approved", 0) + counts.get("doubtful", 0)) / n,
                         **{f"fails/{k}": v for k, v in fails.items()}}
                self.history.append(entry)
                state.log_history.append(entry)
                if state.is_world_process_zero:
                    worst = sorted(fails.items(), key=lambda kv: -kv[1])[:3]
                    print(f"step {state.global_step}: pass rate {entry['pass_rate']:.2f} "
                          f"({counts.get('approved', 0)}/{n})"
                          + (f"; most failed: {', '.join(f'{k} {v}' for k, v in worst)}" if worst else ""), flush=True)

        return _CB(*a, **k)


def generate_outputs(model, tok, template: str, prompts: list[str], max_new_tokens: int = 128,
                     batch_size: int = 16) -> list[tuple[str, bool]]:
    """Greedy generation with the training template, left-padded batches; (new text, stopped on the end token)."""
    import torch
    was_training = model.training
    model.eval()
    eos = tok.convert_tokens_to_ids("<｜end▁of▁sentence｜>") if template != "auto" else tok.eos_token_id
    if eos is None or eos == tok.unk_token_id:
        eos = tok.eos_token_id
    pad = tok.pad_token_id if tok.pad_token_id is not None else eos
    dev = next(model.parameters()).device
    out = []
    with torch.no_grad():
        for i in range(0, len(prompts), batch_size):
            enc = [tok(prompt_text(template, tok, p), add_special_tokens=False)["input_ids"]
                   for p in prompts[i:i + batch_size]]
            width = max(map(len, enc))
            ids = torch.tensor([[pad] * (width - len(e)) + e for e in enc], device=dev)
            mask = torch.tensor([[0] * (width - len(e)) + [1] * len(e) for e in enc], device=dev)
            # use_cache: training turns the model's KV cache off; without it every new token re-reads the prompt
            gen = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                                 do_sample=False, eos_token_id=eos, pad_token_id=pad, use_cache=True)
            for row in gen[:, width:].tolist():
                stopped = eos in row
                text = tok.decode(row[:row.index(eos)] if stopped else row, skip_special_tokens=True).strip()
                if template == "reference" and text.startswith("Assistant:"):
                    text = text[len("Assistant:"):].strip()  # the tutorial's prompt leaves "Assistant:" to the model
                out.append((text, stopped))
    if was_training:
        model.train()
    return out


def generate_texts(model, tok, template: str, prompts: list[str], max_new_tokens: int = 128,
                   batch_size: int = 16) -> list[str]:
    """Greedy generation with the training template; returns only the new text."""
    return [t for t, _ in generate_outputs(model, tok, template, prompts, max_new_tokens, batch_size)]


def _last_checkpoint(out: Path) -> str | None:
    cks = [p for p in out.glob("checkpoint-*") if p.is_dir() and p.name.split("-")[-1].isdigit()]
    return str(max(cks, key=lambda p: int(p.name.split("-")[-1]))) if cks else None


def _model_card(rel: Release, cfg: TrainConfig, model_dir: str, steps: int, loss: float | None) -> str:
    return (f"---\nlibrary_name: peft\nbase_model: {model_dir}\n---\n# distillery LoRA adapter\n\n"
            f"- release: `{rel.path}`\n"
            f"- release content hash: `{rel.release_content_hash or 'none (no manifest content_hash)'}`\n"
            f"- manifest hash: `{rel.manifest_hash or 'none (no manifest.json)'}`\n"
            f"- train records hash: `{rel.train_records_hash}`\n"
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


class _NothingToTrain(Exception):
    """The checkpoint a re-run resumes from is already at the run's last step."""


def run(data: str | os.PathLike, model_dir: str | os.PathLike, out_dir: str | os.PathLike,
        cfg: TrainConfig | None = None) -> dict:
    """Train a LoRA adapter. Re-running with the same out_dir resumes from its last checkpoint."""
    import torch
    from transformers import Trainer, TrainingArguments
    cfg = cfg or preset_config("fast")
    rel = load_release(data)
    for line in rel.problems:
        print(f"skipped: {line}", flush=True)
    pass_rate_prompts = cfg.eval_prompts
    if cfg.eval_every and not pass_rate_prompts:  # default: the release's own eval split (fails early if none)
        from train.eval import load_eval_records
        pass_rate_prompts = load_eval_records(data)[:PASS_RATE_PROMPTS]
    tok, model = load_model_dir(model_dir, cfg, template=cfg.template)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    cache = cfg.cache_dir or os.path.join(os.path.expanduser("~"), ".cache", "distillery", "tokenized")
    rows = build_dataset(rel, tok, cfg.template, cache_dir=cache)
    model = prepare_model(model, cfg)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    device, dtype = _device_and_dtype(cfg)
    micro, accum = per_device_batch(cfg, int(os.environ.get("WORLD_SIZE", "1")))  # torchrun/accelerate set it
    # transformers 5.2x renamed gradient_checkpointing to activation_checkpointing (the old name warns); the GPU
    # images we measured on (5.17) know only the old one
    ckpt_arg = ("activation_checkpointing" if "activation_checkpointing" in {f.name for f in fields(TrainingArguments)}
                else "gradient_checkpointing")
    args = TrainingArguments(
        output_dir=str(out), per_device_train_batch_size=micro, gradient_accumulation_steps=accum,
        optim="adamw_torch_fused" if device == "cuda" else "adamw_torch",
        learning_rate=cfg.lr, num_train_epochs=cfg.epochs, max_steps=cfg.max_steps, logging_steps=cfg.logging_steps,
        save_steps=cfg.save_steps, save_on_each_node=True, **{ckpt_arg: cfg.grad_ckpt},
        bf16=(device == "cuda" and dtype == torch.bfloat16), use_cpu=(device == "cpu"), report_to=[],
        remove_unused_columns=False, seed=cfg.seed, dataloader_num_workers=0, disable_tqdm=True)
    from transformers import TrainerCallback

    class _Steps(TrainerCallback):
        """Counts the steps this call trains (proves a resume did not restart at 0) and stops a resume that has
        nothing left to do. Why: Trainer skips the epochs a checkpoint finished, but inside a half-done epoch it
        trains a batch before it first checks max_steps: a re-run whose checkpoint sits mid-epoch at the last step
        would train (and save) one step more than asked."""

        def __init__(self):
            self.trained = 0

        def on_train_begin(self, args, state, control, **kw):
            if state.global_step >= state.max_steps:  # the checkpoint's step against this run's last
                raise _NothingToTrain

        def on_step_end(self, args, state, control, **kw):
            self.trained += 1

    steps = _Steps()
    callbacks = [steps]
    if cfg.eval_every:
        callbacks.append(PassRateCallback(pass_rate_prompts, cfg.eval_every, tokenizer=tok, template=cfg.template))
    trainer = Trainer(model=model, args=args, train_dataset=rows, data_collator=collator(cfg, tok),
                      callbacks=callbacks)
    resume = _last_checkpoint(out)
    if resume:
        print(f"resuming from {resume}", flush=True)
    t0 = time.time()
    train_loss = None  # mean loss of the steps this call trained; None when there were none
    try:
        with explain_oom(oom_advice(cfg)):
            train_loss = trainer.train(resume_from_checkpoint=resume).training_loss
    except _NothingToTrain:  # the checkpoint's weights (loaded by now) are the finished adapter
        print(f"{resume} is at step {trainer.state.global_step}, the last of this run: nothing left to train",
              flush=True)
    main_process = trainer.is_world_process_zero()  # under torchrun only rank 0 writes the adapter folder
    if main_process:
        model.save_pretrained(str(out))
        tok.save_pretrained(str(out))
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    meta = {"preset": cfg.preset, "template": cfg.template, "instruction": rel.instruction,
            "release": str(rel.path), "release_content_hash": rel.release_content_hash,
            "manifest_hash": rel.manifest_hash, "train_records_hash": rel.train_records_hash,
            "global_step": trainer.state.global_step, "train_loss": train_loss, "tokens": tokens_in(rows),
            "resumed_from": resume, "steps_this_run": steps.trained, "seconds": round(time.time() - t0, 2),
            "config": asdict(cfg)}
    if main_process:
        write_json_atomic(out / "distillery_train.json", meta)
        write_text_atomic(out / "README.md", _model_card(rel, cfg, str(model_dir), trainer.state.global_step,
                                                         losses[-1] if losses else None))
        plot_loss(trainer.state.log_history, out / "loss.png")
    meta["log_history"] = trainer.state.log_history
    return meta


def read_adapter(adapter_dir: str | os.PathLike) -> tuple[Path, dict]:
    """The adapter folder and what `run` recorded in it (distillery_train.json; {} for a foreign adapter)."""
    a = Path(adapter_dir)
    if not (a / "adapter_config.json").exists():
        raise TrainError(f"{a}: not an adapter folder (no adapter_config.json)")
    meta_path = a / "distillery_train.json"
    return a, (json.loads(meta_path.read_text(encoding="utf-8")) if meta_path.exists() else {})


def load_adapter(model_dir, adapter_dir, *, cpu: bool | None = None):
    import torch
    from peft import PeftModel
    cpu = (not torch.cuda.is_available()) if cpu is None else cpu
    a, meta = read_adapter(adapter_dir)
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
