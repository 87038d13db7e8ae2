"""Release loading, prompt templates and tokenization for the LoRA trainer.

Three ways to turn a record into tokens:
- `reference`: the self-llm DeepSeek-7B-chat LoRA tutorial's process_func, token for token (quirks kept).
- `deepseek`: DeepSeek-LLM chat format, "User: {p}\n\nAssistant: {a}<eos>", prompt (incl. "Assistant:") masked.
- `auto`: tokenizer.apply_chat_template, loss on the assistant turn only.
"""
from __future__ import annotations

import collections
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from distillery.io import Located, Problem, read_records, write_json_atomic
from distillery.record import canonical_hash

EOS_TEXT = "<｜end▁of▁sentence｜>"
MAX_LENGTH = 384  # the tutorial's cut; kept for every template
TEMPLATES = ("reference", "deepseek", "auto")


class TrainError(Exception):
    """A user-facing problem (bad release, model folder, template, device): one line, exit code 2."""


@dataclass
class Release:
    path: Path  # the train file that was read
    records: list[dict]  # {instruction, input, output}
    train_records_hash: str  # canonical hash of `records`, in order (what the tokenization cache is keyed on)
    manifest_hash: str | None  # canonical hash of manifest.json, when the release has one
    problems: list[str]
    # the manifest's own "content_hash" (both splits, order-free: curate/release.py content_hash()), the hash
    # `curate release` prints and a child release records as its parent; None without a manifest
    release_content_hash: str | None = None

    @property
    def instruction(self) -> str:
        """The most common instruction: what `generate` puts before a bare user request."""
        c = collections.Counter(r["instruction"] for r in self.records)
        return c.most_common(1)[0][0] if c else ""


def split_of(rec: dict) -> str:
    """A record's split, for training and eval alike: the top-level "split" that `curate release` gives every
    record of records.jsonl, else meta.split, else "train" (a plain record file is all training data)."""
    return rec.get("split") or (rec.get("meta") or {}).get("split") or "train"


def load_release(path: str | os.PathLike) -> Release:
    """Read a release folder or a .json/.jsonl file. Bad lines are collected, not fatal.

    A folder from `curate release` is read through records.jsonl (its split "train" records; same texts and order
    as train.json, so the train records hash and the tokenization cache agree); else train.json / train.jsonl."""
    p = Path(path)
    manifest_hash = release_content_hash = None
    only_train = False
    if p.is_dir():
        train = p / "records.jsonl"
        only_train = train.exists()
        if not only_train:
            train = p / "train.json"
        if not train.exists():
            alt = p / "train.jsonl"
            train = alt if alt.exists() else train
        if not train.exists():
            raise TrainError(f"{p}: release has no train.json")
        man = p / "manifest.json"
        if man.exists():
            try:
                manifest = json.loads(man.read_text(encoding="utf-8"))
            except (ValueError, UnicodeDecodeError) as e:
                raise TrainError(f"{man}: unreadable manifest: {e}") from None
            manifest_hash = canonical_hash(manifest)
            release_content_hash = manifest.get("content_hash") if isinstance(manifest, dict) else None
        p = train
    elif not p.exists():
        raise TrainError(f"{p}: no such release or file")
    records, problems = [], []
    for item in read_records(p):
        if isinstance(item, Problem):
            problems.append(str(item))
        elif isinstance(item, Located):
            r = item.record
            if only_train and split_of(r) != "train":
                continue
            records.append({"instruction": r["instruction"], "input": r["input"], "output": r["output"]})
    if not records:
        detail = f" ({problems[0]})" if problems else ""
        raise TrainError(f"{p}: release is empty: no usable records{detail}")
    return Release(p, records, canonical_hash(records), manifest_hash, problems, release_content_hash)


# ---------------------------------------------------------------- templates

def _ids(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


def encode_reference(example: dict, tok) -> dict:
    """The tutorial's process_func, kept exactly. Quirks (on purpose, for parity): the end token is followed by
    a pad token that is also a label, and the tutorial's inference prompt stops at "\\n\\n" (no "Assistant:"),
    so the model learns to emit "Assistant: " itself."""
    instruction = tok(f"User: {example['instruction']+example['input']}\n\n", add_special_tokens=False)
    response = tok(f"Assistant: {example['output']}{EOS_TEXT}", add_special_tokens=False)
    input_ids = instruction["input_ids"] + response["input_ids"] + [tok.pad_token_id]
    attention_mask = instruction["attention_mask"] + response["attention_mask"] + [1]
    labels = [-100] * len(instruction["input_ids"]) + response["input_ids"] + [tok.pad_token_id]
    return {"input_ids": input_ids[:MAX_LENGTH], "attention_mask": attention_mask[:MAX_LENGTH],
            "labels": labels[:MAX_LENGTH]}


def prompt_text(template: str, tok, prompt: str) -> str:
    """The text a generation starts from; the same one training masked out (except `reference`, see above)."""
    if template == "reference":
        return f"User: {prompt}\n\n"
    if template == "deepseek":
        return f"User: {prompt}\n\nAssistant:"
    if template == "auto":
        return tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                       add_generation_prompt=True)
    raise TrainError(f"unknown template {template!r} (choose from {', '.join(TEMPLATES)})")


def encode(example: dict, tok, template: str) -> dict:
    if template == "reference":
        return encode_reference(example, tok)
    prompt = example["instruction"] + example["input"]
    p_text = prompt_text(template, tok, prompt)
    if template == "deepseek":
        a_ids = _ids(tok, f" {example['output']}{EOS_TEXT}")
        p_ids = _ids(tok, p_text)
    else:
        full = tok.apply_chat_template([{"role": "user", "content": prompt},
                                        {"role": "assistant", "content": example["output"]}], tokenize=False)
        if not full.startswith(p_text):
            raise TrainError("template auto: the chat template's prompt is not a prefix of the full chat")
        p_ids = _ids(tok, p_text)
        a_ids = _ids(tok, full[len(p_text):])
    ids = (p_ids + a_ids)[:MAX_LENGTH]
    labels = ([-100] * len(p_ids) + a_ids)[:MAX_LENGTH]
    return {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels}


def check_template(tok, template: str) -> None:
    """Fail early, with one line, when the template cannot work with this tokenizer."""
    if template not in TEMPLATES:
        raise TrainError(f"unknown template {template!r} (choose from {', '.join(TEMPLATES)})")
    if template == "auto" and not getattr(tok, "chat_template", None):
        raise TrainError("template auto: the tokenizer has no chat template (use --template deepseek)")
    if template in ("reference", "deepseek"):
        ids = _ids(tok, EOS_TEXT)
        if len(ids) != 1:
            raise TrainError(f"template {template}: {EOS_TEXT} is not one token in this tokenizer "
                             "(not a DeepSeek tokenizer? use --template auto)")
        if template == "reference" and tok.pad_token_id is None:
            raise TrainError("template reference: the tokenizer has no pad token")


def _tok_fingerprint(tok) -> str:
    vocab = sorted(tok.get_vocab().items())
    return hashlib.sha256(json.dumps([vocab, getattr(tok, "chat_template", None) or ""],
                                     ensure_ascii=False).encode()).hexdigest()[:16]


def build_dataset(release: Release | str | os.PathLike, tokenizer, template: str = "deepseek", *,
                  cache_dir: str | os.PathLike | None = None) -> list[dict]:
    """Tokenize a release. With cache_dir, results are cached by (release content, tokenizer, template)."""
    rel = release if isinstance(release, Release) else load_release(release)
    check_template(tokenizer, template)
    cache = None
    if cache_dir is not None:
        key = f"{rel.train_records_hash[:24]}-{_tok_fingerprint(tokenizer)}-{template}-{MAX_LENGTH}"
        cache = Path(cache_dir) / f"{key}.json"
        if cache.exists():
            return json.loads(cache.read_text())
    rows = [encode(r, tokenizer, template) for r in rel.records]
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(cache, rows, indent=None)  # a per-process temp name: DDP ranks may write it at once
    return rows


def tokens_in(rows: list[dict[str, Any]]) -> int:
    return sum(len(r["input_ids"]) for r in rows)
