"""train/: real tiny Llama + real BPE tokenizer, trained on CPU. No downloads, no mocks."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from tiny_model import RECORDS, build_tiny  # noqa: E402

import train  # noqa: E402
from train import core  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny")
    build_tiny(d / "model")
    rel = d / "release"
    rel.mkdir()
    (rel / "train.json").write_text(json.dumps(RECORDS, ensure_ascii=False), encoding="utf-8")
    (rel / "manifest.json").write_text(json.dumps({"name": "tiny", "count": len(RECORDS)}), encoding="utf-8")
    return {"model": d / "model", "release": rel, "tok": AutoTokenizer.from_pretrained(d / "model")}


def cfg(preset, tmp_path, **kw):
    kw.setdefault("max_steps", 2)
    return train.preset_config(preset, cpu=True, batch_size=4, grad_accum=1, logging_steps=1,
                               cache_dir=str(tmp_path / "cache"), **kw)


# The tutorial's process_func, verbatim (only `tokenizer` made a parameter of the enclosing factory).
def tutorial_process_func(tokenizer):
    def process_func(example):
        MAX_LENGTH = 384
        input_ids, attention_mask, labels = [], [], []
        instruction = tokenizer(f"User: {example['instruction']+example['input']}\n\n", add_special_tokens=False)
        response = tokenizer(f"Assistant: {example['output']}<｜end▁of▁sentence｜>", add_special_tokens=False)
        input_ids = instruction["input_ids"] + response["input_ids"] + [tokenizer.pad_token_id]
        attention_mask = instruction["attention_mask"] + response["attention_mask"] + [1]
        labels = [-100] * len(instruction["input_ids"]) + response["input_ids"] + [tokenizer.pad_token_id]
        if len(input_ids) > MAX_LENGTH:
            input_ids = input_ids[:MAX_LENGTH]; attention_mask = attention_mask[:MAX_LENGTH]; labels = labels[:MAX_LENGTH]
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
    return process_func


def _many_records():
    recs = list(RECORDS)
    ref = ROOT / "dataset" / "reference" / "blessings.jsonl"
    if ref.exists():
        from distillery.io import Located, read_records
        recs += [i.record for i in read_records(ref) if isinstance(i, Located)]
    recs.append({"instruction": "长" * 10, "input": "祝福" * 300, "output": "好" * 200})  # exercises the 384 cut
    return recs


def test_reference_preset_is_token_identical_to_tutorial(tiny, tmp_path):
    tok = tiny["tok"]
    pf = tutorial_process_func(tok)
    recs = _many_records()
    rel = tmp_path / "r.jsonl"
    rel.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in recs) + "\n", encoding="utf-8")
    rows = train.build_dataset(rel, tok, "reference")
    assert len(rows) == len(recs)
    for r, row in zip(recs, rows):
        assert row == pf(r)
    assert max(len(r["input_ids"]) for r in rows) == 384


def test_deepseek_template_masks_prompt_and_matches_generation_prompt(tiny):
    tok = tiny["tok"]
    r = RECORDS[0]
    row = train.encode(r, tok, "deepseek")
    p_ids = tok(train.prompt_text("deepseek", tok, r["instruction"] + r["input"]), add_special_tokens=False)["input_ids"]
    n = sum(1 for x in row["labels"] if x == -100)
    assert n == len(p_ids) and row["input_ids"][:n] == p_ids  # generation starts exactly where labels start
    eos = tok.convert_tokens_to_ids("<｜end▁of▁sentence｜>")
    assert row["labels"][-1] == eos and row["labels"].count(eos) == 1  # one end token, no trailing pad
    # the tiny tokenizer carries DeepSeek's chat template, so `auto` must give the very same tokens
    assert train.encode(r, tok, "auto") == row


def test_packing_lets_no_attention_cross_samples(tiny):
    tok = tiny["tok"]
    model = AutoModelForCausalLM.from_pretrained(tiny["model"], dtype=torch.float32).eval()
    rows = [train.encode(r, tok, "deepseek") for r in RECORDS[:4]]
    batch = train.collator(train.preset_config("fast"), tok)(rows)
    assert batch["input_ids"].shape[0] == 1 and "position_ids" in batch
    real = sum(len(r["input_ids"]) for r in rows)
    assert batch["input_ids"].shape[1] % 16 == 0 and real <= batch["input_ids"].shape[1] < real + 16
    assert (batch["labels"][0, real:] == -100).all()  # the alignment filler is never a target
    with torch.no_grad():
        packed = model(**{k: v for k, v in batch.items() if k != "labels"}).logits[0]
        off = 0
        for r in rows:
            n = len(r["input_ids"])
            alone = model(input_ids=torch.tensor([r["input_ids"]])).logits[0]
            torch.testing.assert_close(packed[off:off + n], alone, atol=1e-4, rtol=1e-4)
            off += n
        # and the check has teeth: with a KV cache (the model's default) transformers skips the per-sample
        # mask, and the second sample sees the first
        flat = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=True).logits[0]
        n0 = len(rows[0]["input_ids"])
        assert not torch.allclose(flat[n0:n0 + 3], packed[n0:n0 + 3], atol=1e-3)


@pytest.mark.parametrize("preset", ["reference", "fast"])
def test_presets_train_on_cpu_and_save_card_and_plot(tiny, tmp_path, preset):
    out = tmp_path / "adapter"
    meta = core.run(tiny["release"], tiny["model"], out, cfg(preset, tmp_path))
    assert meta["global_step"] == 2 and meta["train_loss"] > 0
    card = (out / "README.md").read_text(encoding="utf-8")
    man = json.loads((tiny["release"] / "manifest.json").read_text())
    from distillery.record import canonical_hash
    assert canonical_hash(man) in card and "train.json" in card
    assert (out / "loss.png").stat().st_size > 1000
    assert (out / "adapter_config.json").exists()
    assert json.loads((out / "distillery_train.json").read_text())["template"] == (
        "reference" if preset == "reference" else "deepseek")


def test_loss_falls_on_repeated_batch(tiny):
    from peft import get_peft_model
    tok = tiny["tok"]
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny["model"], dtype=torch.float32)
    model = get_peft_model(model, train.lora_config("fast"))
    batch = train.collator(train.preset_config("fast"), tok)([train.encode(r, tok, "deepseek") for r in RECORDS[:2]])
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-3)
    losses = []
    for _ in range(25):
        loss = model(**batch).loss
        loss.backward(); opt.step(); opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.5 and losses[-1] == min(losses[-5:]), losses


def test_adapter_reload_gives_identical_logits_and_generate_uses_template(tiny, tmp_path):
    from peft import PeftModel
    out = tmp_path / "a"
    core.run(tiny["release"], tiny["model"], out, cfg("fast", tmp_path, lr=1e-2, max_steps=3))
    tok = tiny["tok"]
    ids = torch.tensor([train.encode(RECORDS[1], tok, "deepseek")["input_ids"]])
    tok2, m1, meta = core.load_adapter(tiny["model"], out, cpu=True)
    base = AutoModelForCausalLM.from_pretrained(tiny["model"], dtype=torch.float32)
    m2 = PeftModel.from_pretrained(base, str(out)).eval()
    with torch.no_grad():
        a, b = m1.eval()(input_ids=ids).logits, m2(input_ids=ids).logits
        plain = AutoModelForCausalLM.from_pretrained(tiny["model"], dtype=torch.float32)(input_ids=ids).logits
    torch.testing.assert_close(a, b, atol=0, rtol=0)
    assert not torch.allclose(a, plain)  # the adapter is really applied
    # generate() = the training template + the release's instruction, greedy
    got = core.generate(tiny["model"], out, ["祝姐姐生日快乐,小红书风格"], max_new_tokens=8, cpu=True)
    want = train.generate_texts(m1, tok2, "deepseek", [RECORDS[0]["instruction"] + "祝姐姐生日快乐,小红书风格"],
                                max_new_tokens=8)
    assert meta["template"] == "deepseek" and got == want


def test_resume_continues_step_count(tiny, tmp_path, capsys):
    out = tmp_path / "r"
    core.run(tiny["release"], tiny["model"], out, cfg("fast", tmp_path, max_steps=2, save_steps=2))
    assert (out / "checkpoint-2").is_dir()
    meta = core.run(tiny["release"], tiny["model"], out, cfg("fast", tmp_path, max_steps=4, save_steps=2))
    assert "resuming from" in capsys.readouterr().out
    assert meta["global_step"] == 4 and meta["resumed_from"].endswith("checkpoint-2")
    assert meta["steps_this_run"] == 2  # only steps 3 and 4 were trained after resuming
    assert [h["step"] for h in meta["log_history"] if "loss" in h] == [1, 2, 3, 4]


def test_rerun_at_max_steps_mid_epoch_trains_no_extra_step(tiny, tmp_path, capsys, monkeypatch):
    """13 records in batches of 4: step 2 is mid-epoch. Trainer resumed there with max_steps 2 used to train step 3
    (and save checkpoint-3) before it checked max_steps; a re-run now re-saves checkpoint-2's adapter as is."""
    from safetensors.torch import load_file
    from train.__main__ import main
    monkeypatch.setenv("HOME", str(tmp_path))  # the CLI's tokenization cache lives under ~/.cache
    out = tmp_path / "r"
    args = ["run", "--data", str(tiny["release"]), "--model", str(tiny["model"]), "--out", str(out), "--cpu",
            "--batch-size", "4", "--grad-accum", "1", "--max-steps", "2", "--save-steps", "2"]
    assert main(args) == 0
    capsys.readouterr()
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "nothing left to train" in printed and f"adapter saved to {out}: 2 steps, none trained" in printed
    meta = json.loads((out / "distillery_train.json").read_text(encoding="utf-8"))
    assert (meta["global_step"], meta["steps_this_run"], meta["train_loss"]) == (2, 0, None)
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2"]
    saved, ck = load_file(out / "adapter_model.safetensors"), load_file(out / "checkpoint-2" / "adapter_model.safetensors")
    assert saved.keys() == ck.keys() and all(torch.equal(saved[k], ck[k]) for k in ck)


def test_callback_logs_curator_pass_rate_in_a_plain_hf_trainer(tiny, tmp_path, capsys):
    """The plugin as a user wires it into their own Trainer: dataset, LoRA config, collator, callback."""
    from peft import get_peft_model
    from transformers import Trainer, TrainingArguments
    from curate.filters import ALL
    tok = tiny["tok"]
    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny["model"], dtype=torch.float32),
                           train.lora_config("fast"))
    prompts = [{**RECORDS[1], "meta": {"max_chars": 50, "constraint": ""}}, "祝王总开业大吉,严肃风格"]
    cb = train.PassRateCallback(prompts, 1, max_new_tokens=8)  # tokenizer: the Trainer's processing_class
    args = TrainingArguments(output_dir=str(tmp_path / "o"), per_device_train_batch_size=4, max_steps=2,
                             logging_steps=1, save_strategy="no", use_cpu=True, report_to=[],
                             remove_unused_columns=False, disable_tqdm=True)
    trainer = Trainer(model=model, args=args, train_dataset=train.build_dataset(tiny["release"], tok, "deepseek"),
                      data_collator=train.collator("fast", tok), processing_class=tok, callbacks=[cb])
    trainer.train()
    rates = [h for h in trainer.state.log_history if "pass_rate" in h]
    assert [h["step"] for h in rates] == [1, 2] and cb.history == rates
    assert all(0.0 <= h["pass_rate"] <= h["pass_or_doubtful_rate"] <= 1.0 for h in rates)
    # 8 tokens of an untrained model: the curator fails them and names the filters that did
    fails = {k[len("fails/"):] for h in rates for k in h if k.startswith("fails/")}
    assert fails and fails <= set(ALL) | {"empty"}
    assert "pass rate" in capsys.readouterr().out


def test_cuda_oom_becomes_one_line_naming_preset_and_batch_size():
    for preset, bs, accum, want in (("reference", 8, 2, "--batch-size 4 --grad-accum 4 (same effective batch)"),
                                    ("fast", 8, 1, "--preset lean"), ("lean", 1, 4, "a GPU with more memory")):
        with pytest.raises(train.TrainError) as e:
            with core.explain_oom(core.oom_advice(train.preset_config(preset, batch_size=bs, grad_accum=accum))):
                raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        msg = str(e.value)
        assert f"preset {preset}, batch size {bs}" in msg and want in msg and "\n" not in msg, msg
    with pytest.raises(ValueError):  # anything else is not dressed up as an OOM
        with core.explain_oom(core.oom_advice(train.preset_config("fast"))):
            raise ValueError("x")


def test_cli_errors_are_one_line_exit_2(tiny, tmp_path, capsys):
    from train.__main__ import main
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "train.json").write_text("[]", encoding="utf-8")
    noweights = tmp_path / "nw"
    noweights.mkdir()
    (noweights / "config.json").write_text("{}")
    (noweights / "tokenizer.json").write_text("{}")
    notok = tmp_path / "nt"
    notok.mkdir()
    (notok / "config.json").write_text("{}")
    (notok / "model.safetensors").write_bytes(b"")
    nochat = tmp_path / "nochat"
    build_tiny(nochat, chat_template=False)
    capsys.readouterr()
    cases = [
        (["--data", str(tmp_path / "nope"), "--model", str(tiny["model"])], "no such release"),
        (["--data", str(empty), "--model", str(tiny["model"])], "release is empty"),
        (["--data", str(tiny["release"]), "--model", str(noweights)], "no weights"),
        (["--data", str(tiny["release"]), "--model", str(notok)], "no tokenizer"),
        (["--data", str(tiny["release"]), "--model", str(nochat), "--template", "auto"], "no chat template"),
    ]
    for i, (args, msg) in enumerate(cases):
        assert main(["run", *args, "--out", str(tmp_path / f"o{i}"), "--cpu"]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and msg in err and "\n" not in err, err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU error")
def test_cli_gpu_preset_without_gpu_exits_2_in_a_real_process(tiny, tmp_path):
    p = subprocess.run([sys.executable, "-m", "train", "run", "--data", str(tiny["release"]), "--model",
                        str(tiny["model"]), "--out", str(tmp_path / "o"), "--preset", "fast"],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert p.returncode == 2, p.stderr
    assert p.stderr.strip().splitlines() == [p.stderr.strip()] and "needs a GPU" in p.stderr, p.stderr


def test_compiled_layers_match_eager_on_packed_rows(tiny):
    """The fast preset's compiled decoder layers compute the same loss and LoRA gradients as eager (aot_eager
    backend: the same dynamo capture and autograd split the GPU uses, without a C++ toolchain in CI)."""
    from peft import get_peft_model
    torch._dynamo.reset()
    tok = tiny["tok"]
    cfg = train.preset_config("fast", cpu=True, lora_dropout=0.0)
    coll = train.collator(cfg, tok)
    batches = [coll([train.encode(r, tok, "deepseek") for r in RECORDS[i:i + 4]]) for i in (0, 4, 8)]

    def loss_and_grads(compiled: bool):
        torch.manual_seed(0)
        model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny["model"], dtype=torch.float32),
                               train.lora_config(cfg))
        if compiled:
            assert core.compile_decoder_layers(model, backend="aot_eager") == 2
        out = []
        for b in batches:  # three row lengths: dynamic shapes, no recompile per length
            model.zero_grad()
            loss = model(**b).loss
            loss.backward()
            out.append((loss.detach(), [p.grad.clone() for p in model.parameters() if p.requires_grad]))
        return out

    for (l_eager, g_eager), (l_comp, g_comp) in zip(loss_and_grads(False), loss_and_grads(True)):
        torch.testing.assert_close(l_comp, l_eager, atol=1e-5, rtol=1e-5)
        for a, b in zip(g_comp, g_eager):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_per_device_batch_keeps_the_effective_batch():
    from train.core import per_device_batch
    fast, ref = train.preset_config("fast"), train.preset_config("reference")
    assert (fast.batch_size, fast.grad_accum) == (16, 1)  # the reference's 8 x 2, as one packed row
    assert per_device_batch(fast, 1) == (16, 1) and per_device_batch(fast, 2) == (8, 1)
    assert per_device_batch(ref, 1) == (8, 2) and per_device_batch(ref, 2) == (8, 1) and per_device_batch(ref, 4) == (4, 1)
    with pytest.raises(train.TrainError, match="does not split over 3"):
        per_device_batch(fast, 3)
