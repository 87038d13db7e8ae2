"""Student vs base on a release's eval split, judged by the same curator that built the release.

Both models get the same prompt: the training template around instruction+input (for the base model this is the
DeepSeek chat format it was tuned on; for other templates it is still the prompt the student will see in use).
The base model is the student with its adapter disabled, so the weights are loaded once.

Scores per model: pass rate (curator verdict approved; and approved or doubtful), per-filter failure rates,
length adherence (字数 < meta.max_chars, as the prompt asks) and eval loss (mean token loss of the reference answers,
teacher-forced with the training template's label masking).
"""
from __future__ import annotations

import contextlib
import copy
import os
from collections import Counter
from pathlib import Path

from distillery.io import ReadError, read_all, write_json_atomic
from distillery.text import char_count

from train.data import TrainError, encode, split_of

EMPTY = "empty"  # pseudo-filter: the schema forbids empty outputs, so the curator has no filter for them


# ---------------------------------------------------------------- the eval split

def load_eval_records(release: str | os.PathLike) -> list[dict]:
    """The eval split's full records: from records.jsonl (split "eval", with meta) when the release has it,
    else from eval.json (instruction/input/output only: the curator then derives scene/style from the input)."""
    p = Path(release)
    if not p.is_dir():
        raise TrainError(f"{p}: not a release folder")
    full, plain = p / "records.jsonl", p / "eval.json"
    if not full.exists() and not plain.exists():
        raise TrainError(f"{p}: release has no eval split (no records.jsonl or eval.json)")
    try:  # a bad line fails the eval: scores over part of the split would not compare with other runs
        recs = [r for r in read_all(full) if split_of(r) == "eval"] if full.exists() else read_all(plain)
    except ReadError as e:
        raise TrainError(str(e)) from None
    if not recs:
        raise TrainError(f"{p}: release has no eval split (no eval records in {full if full.exists() else plain})")
    return recs


# ---------------------------------------------------------------- judging outputs with the curator

def eval_curate_config(path: str | os.PathLike | None = None):
    """The curator's config without near-duplicate detection: eval judges each output on its own, and a student
    that reproduces a training greeting is not a failure here."""
    from curate.config import load_config
    cfg = load_config(path)
    cfg.filters = [f for f in cfg.filters if f != "duplicates"]
    return cfg


def curate_outputs(records: list[dict], outputs: list[str], stopped: list[bool] | None = None,
                   config=None, ctx=None) -> tuple[list[dict], Counter, dict]:
    """Put each output into a copy of its record and run the curator's filters on it.

    Returns the judged records, the verdict counts and per-filter counts {filter: {rejected, doubtful, skipped}}.
    `stopped[i]` False means generation hit max_new_tokens: it becomes meta.finish_reason "length", which the
    truncation filter rejects, exactly as for a teacher cut short.
    """
    from curate.filters import Context
    from curate.pipeline import Summary, curate_records
    ctx = ctx or Context(config or eval_curate_config())
    stopped = stopped if stopped is not None else [True] * len(outputs)
    todo, empty = [], []
    for i, (rec, out, stop) in enumerate(zip(records, outputs, stopped)):
        r = copy.deepcopy(rec)
        r.pop("curation", None)
        r["id"] = f"{rec.get('id') or 'eval'}-{i}"
        r["output"] = out
        r.setdefault("meta", {})
        r["meta"] = dict(r["meta"] or {}, finish_reason="stop" if stop else "length")
        (todo if out.strip() else empty).append(r)
    summary = Summary()
    judged = list(curate_records(todo, ctx, summary, None))
    for r in empty:
        r["curation"] = {"verdict": "rejected", "reasons": [{"filter": EMPTY, "detail": "empty output", "score": 1.0}],
                         "config_hash": summary.config_hash or ctx.config.config_hash()}
        summary.counts["rejected"] += 1
        summary.by_filter[EMPTY]["rejected"] += 1
    by_id = {r["id"]: r for r in judged + empty}
    ordered = [by_id[f"{rec.get('id') or 'eval'}-{i}"] for i, rec in enumerate(records)]
    return ordered, summary.counts, {k: dict(v) for k, v in sorted(summary.by_filter.items())}


def filter_fails(by_filter: dict) -> dict[str, int]:
    """Per filter: how many outputs it did not approve (rejected or doubtful)."""
    return {k: v.get("rejected", 0) + v.get("doubtful", 0) for k, v in by_filter.items()
            if v.get("rejected", 0) + v.get("doubtful", 0)}


def length_adherence(judged: list[dict]) -> dict:
    """Share of outputs with 字数 < meta.max_chars and the mean 字数/cap, over records that have a cap."""
    ratios = [(char_count(r["output"]), r["meta"]["max_chars"]) for r in judged
              if isinstance((r.get("meta") or {}).get("max_chars"), int)]
    if not ratios:
        return {"n": 0, "within_cap": None, "mean_chars_over_cap": None}
    return {"n": len(ratios), "within_cap": round(sum(n < cap for n, cap in ratios) / len(ratios), 4),
            "mean_chars_over_cap": round(sum(n / cap for n, cap in ratios) / len(ratios), 4)}


def scores(judged: list[dict], counts: Counter, by_filter: dict) -> dict:
    n = len(judged)
    rate = lambda k: round(k / n, 4) if n else None  # noqa: E731
    return {
        "n": n,
        "pass_rate": rate(counts.get("approved", 0)),
        "pass_or_doubtful_rate": rate(counts.get("approved", 0) + counts.get("doubtful", 0)),
        "verdicts": {k: counts.get(k, 0) for k in ("approved", "doubtful", "rejected")},
        "filters": {k: {"rejected": rate(v.get("rejected", 0)), "doubtful": rate(v.get("doubtful", 0)),
                        "skipped": v.get("skipped", 0)} for k, v in by_filter.items()},
        "length": length_adherence(judged),
    }


# ---------------------------------------------------------------- eval loss

def answer_loss(model, tok, template: str, records: list[dict], batch_size: int = 8) -> float:
    """Mean token loss over all answer tokens (labels != -100), teacher-forced with the training encoding."""
    import torch
    rows = [encode(r, tok, template) for r in records]
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    dev = next(model.parameters()).device
    total, count = 0.0, 0
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for i in range(0, len(rows), batch_size):
            chunk = rows[i:i + batch_size]
            width = max(len(r["input_ids"]) for r in chunk)
            ids = torch.tensor([r["input_ids"] + [pad] * (width - len(r["input_ids"])) for r in chunk], device=dev)
            mask = torch.tensor([[1] * len(r["input_ids"]) + [0] * (width - len(r["input_ids"])) for r in chunk],
                                device=dev)
            labels = torch.tensor([r["labels"] + [-100] * (width - len(r["labels"])) for r in chunk], device=dev)
            logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits.float()
            shift, target = logits[:, :-1], labels[:, 1:]
            total += torch.nn.functional.cross_entropy(shift.reshape(-1, shift.shape[-1]), target.reshape(-1),
                                                       ignore_index=-100, reduction="sum").item()
            count += int((target != -100).sum())
    if was_training:
        model.train()
    return round(total / count, 6) if count else float("nan")


# ---------------------------------------------------------------- the whole evaluation

def evaluate(model_dir, adapter_dir, release, *, limit: int | None = None, max_new_tokens: int = 128,
             cpu: bool | None = None, batch_size: int = 16, curate_config: str | None = None) -> dict:
    from curate.config import ConfigError
    from curate.filters import Context
    from train.core import explain_oom, generate_outputs, load_adapter
    records = load_eval_records(release)
    records = records[:limit] if limit else records
    try:
        ctx = Context(eval_curate_config(curate_config))
    except (ConfigError, OSError, ValueError) as e:
        raise TrainError(f"curate config: {e}") from None
    tok, model, meta = load_adapter(model_dir, adapter_dir, cpu=cpu)
    template = meta.get("template", "deepseek")
    prompts = [r["instruction"] + r["input"] for r in records]
    report = {"release": str(release), "model": str(model_dir), "adapter": str(adapter_dir), "template": template,
              "max_new_tokens": max_new_tokens, "curate_config_hash": ctx.config.config_hash(), "n": len(records)}
    samples = [{"id": r.get("id"), "input": r["input"], "max_chars": (r.get("meta") or {}).get("max_chars"),
                "reference": r["output"]} for r in records]
    oom = (f"CUDA out of memory in eval with generation batch {batch_size}: "
           f"try --batch-size {max(1, batch_size // 2)}")
    for name in ("base", "student"):
        # the base model is the student with its adapter switched off: one copy of the weights
        with model.disable_adapter() if name == "base" else contextlib.nullcontext(), explain_oom(oom):
            gen = generate_outputs(model, tok, template, prompts, max_new_tokens, batch_size=batch_size)
            loss = answer_loss(model, tok, template, records)
        judged, counts, by_filter = curate_outputs(records, [g[0] for g in gen], [g[1] for g in gen], ctx=ctx)
        report[name] = {**scores(judged, counts, by_filter), "eval_loss": loss}
        for s, j in zip(samples, judged):
            s[name] = {"output": j["output"], "verdict": j["curation"]["verdict"],
                       "reasons": [f"{x['filter']}: {x['detail']}" for x in j["curation"]["reasons"]]}
    report["samples"] = samples
    return report


def print_table(report: dict, console=None) -> None:
    from rich.console import Console
    from rich.table import Table
    console = console or Console()
    b, s = report["base"], report["student"]
    t = Table(title=f"eval: {report['n']} prompts, template {report['template']}")
    for col in ("", "base", "student"):
        t.add_column(col, justify="left" if not col else "right")
    pct = lambda x: "–" if x is None else f"{100 * x:.1f}%"  # noqa: E731
    t.add_row("pass rate (approved)", pct(b["pass_rate"]), pct(s["pass_rate"]))
    t.add_row("approved + doubtful", pct(b["pass_or_doubtful_rate"]), pct(s["pass_or_doubtful_rate"]))
    t.add_row("within length cap", pct(b["length"]["within_cap"]), pct(s["length"]["within_cap"]))
    mc = lambda x: "–" if x is None else f"{x:.2f}"  # noqa: E731
    t.add_row("mean 字数 / cap", mc(b["length"]["mean_chars_over_cap"]), mc(s["length"]["mean_chars_over_cap"]))
    t.add_row("eval loss", f"{b['eval_loss']:.4f}", f"{s['eval_loss']:.4f}")
    fail = lambda d: (d.get("rejected") or 0) + (d.get("doubtful") or 0)  # noqa: E731
    for f in sorted(set(b["filters"]) | set(s["filters"])):
        fb, fs = fail(b["filters"].get(f, {})), fail(s["filters"].get(f, {}))
        if fb or fs:  # filters that only skipped (no meta to check) or passed everything add no row
            t.add_row(f"  not approved by {f}", pct(fb), pct(fs))
    console.print(t)


def write_report(report: dict, path: str | os.PathLike) -> None:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(p, report)
