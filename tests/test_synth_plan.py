"""synth recipe loading, the deterministic plan, and `python -m synth plan`."""
from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from distillery.record import content_id, validate
from synth.plan import cells, iter_plan
from synth.recipe import RecipeError, load_recipe, parse_recipe

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "dataset" / "recipes" / "blessing.toml"
TEXT = RECIPE.read_text(encoding="utf-8")


def recipe_with(tmp_path: Path, text: str, name: str = "r.toml"):
    p = tmp_path / name
    p.write_text(text, encoding="utf-8")
    return p


def synth_cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "COLUMNS": "160"}
    return subprocess.run([sys.executable, "-m", "synth", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=120)


def small(text: str = TEXT, per_cell: int = 5) -> str:
    return text.replace("per_cell = 40", f"per_cell = {per_cell}")


# ── determinism and ids ───────────────────────────────────────────────────────

def test_two_loads_give_identical_plans():
    a = [(p.id, p.messages, p.input, p.meta) for p in iter_plan(load_recipe(RECIPE), seed=7)]
    b = [(p.id, p.messages, p.input, p.meta) for p in iter_plan(load_recipe(RECIPE), seed=7)]
    assert a == b and len(a) == 18 * 3 * 40
    assert load_recipe(RECIPE).hash == load_recipe(RECIPE).hash


def test_seed_changes_the_plan_and_defaults_to_recipe_seed():
    r = load_recipe(RECIPE)
    first = lambda seed: [p.id for p in iter_plan(r, seed=seed, limit=50)]
    assert first(1) != first(2)
    assert first(None) == first(r.sampling.seed)


def test_ids_are_content_derived_and_unique():
    r = load_recipe(RECIPE)
    plan = list(iter_plan(r))
    ids = [p.id for p in plan]
    assert len(set(ids)) == len(ids)
    for p in plan[:200]:
        base, occ = p.id.rsplit("-", 1)
        # re-deriving from the same content gives the same id
        assert base == content_id("p", p.instruction, p.input, p.messages[0]["content"], p.meta["scene"],
                                  p.meta["style"])
        # changing the content changes it
        assert base != content_id("p", p.instruction, p.input, p.messages[0]["content"] + "。", p.meta["scene"],
                                  p.meta["style"])
        assert p.meta["prompt_id"] == p.id and p.meta["prompt"] == p.messages[0]["content"]
        assert p.instruction == r.system
    # same content drawn twice → same base, occurrence suffixes 0, 1, …
    bases = Counter(p.id.rsplit("-", 1)[0] for p in plan)
    dup = next(b for b, c in bases.items() if c > 1)
    assert sorted(p.id for p in plan if p.id.startswith(dup + "-")) == [f"{dup}-{i}" for i in range(bases[dup])]


def test_planned_prompt_builds_a_valid_record_and_renders_the_reference_input():
    r = load_recipe(RECIPE)
    for p in iter_plan(r, limit=100):
        rec = {"id": p.id, "instruction": p.instruction, "input": p.input, "output": "x", "meta": p.meta}
        validate(rec, require_id=True)
        m = p.meta
        wish = next(s.wish for s in r.scenes if s.name == m["scene"])
        assert p.input == f"祝{m['recipient']}{wish},{m['style']}风格"
        prompt = p.messages[0]["content"]
        assert f"字数小于 {m['max_chars']} 字" in prompt and m["recipient"] in prompt and m["scene"] in prompt
        assert r.relations[m["relation"]] in prompt
        assert "{" not in prompt
        if m["style"] == "小红书":
            assert 1 <= len(m["examples"]) <= 2 and all(e in prompt for e in m["examples"])
        else:
            assert m["examples"] == [] and "例句，" not in prompt


# ── sampling rules ─────────────────────────────────────────────────────────────

def test_exclusions_are_honoured():
    r = load_recipe(RECIPE)
    plan = list(iter_plan(r))
    for p in plan:
        m = p.meta
        values = {"scene": m["scene"], "style": m["style"], "recipient": m["recipient"], "relation": m["relation"],
                  "kind": next(s.kind for s in r.scenes if s.name == m["scene"])}
        assert not any(e.matches(values) for e in r.exclusions), m
    qixi = {p.meta["relation"] for p in plan if p.meta["scene"] == "七夕节"}
    assert qixi and qixi <= {"伴侣", "朋友"}
    assert not any(p.meta["style"] == "小红书" and p.meta["relation"] in ("上级", "客户") for p in plan)


def test_cell_wide_exclusion_removes_the_cell(tmp_path):
    text = small() + '\n[[exclusions]]\nscene = "康复"\nstyle = "小红书"\nwhy = "test"\n'
    r = load_recipe(recipe_with(tmp_path, text))
    out = [c for c in cells(r) if not c.recipients]
    assert [(c.scene.name, c.style.name, c.excluded_by) for c in out] == [("康复", "小红书", "test")]
    plan = list(iter_plan(r))
    assert not any(p.meta["scene"] == "康复" and p.meta["style"] == "小红书" for p in plan)
    assert len(plan) == (18 * 3 - 1) * 5


def test_quotas_override_per_cell(tmp_path):
    text = small(per_cell=4) + ('\n[[quotas]]\nscene = "生日"\nper_cell = 9\n'
                                '\n[[quotas]]\nscene = "生日"\nstyle = "严肃"\nper_cell = 2\n'
                                '\n[[quotas]]\nkind = "work"\nstyle = "正常"\nper_cell = 0\n')
    r = load_recipe(recipe_with(tmp_path, text))
    cnt = Counter((p.meta["scene"], p.meta["style"]) for p in iter_plan(r))
    assert cnt[("生日", "小红书")] == 9 and cnt[("生日", "正常")] == 9 and cnt[("生日", "严肃")] == 2
    assert cnt[("谈判顺利", "正常")] == 0 and cnt[("工作升职", "正常")] == 0 and cnt[("谈判顺利", "严肃")] == 4
    assert cnt[("春节", "正常")] == 4


def test_weights_steer_draws(tmp_path):
    # only 20-char caps: weight 0 elsewhere would be invalid (non-positive), so use a heavy weight instead
    text = small(per_cell=50).replace("[[lengths]]\nmax_chars = 20", "[[lengths]]\nmax_chars = 20\nweight = 1000")
    r = load_recipe(recipe_with(tmp_path, text))
    caps = Counter(p.meta["max_chars"] for p in iter_plan(r))
    assert caps[20] > 0.95 * sum(caps.values())


def test_limit_prefix_is_round_robin_and_consistent():
    r = load_recipe(RECIPE)
    full = [p.id for p in iter_plan(r)]
    assert [p.id for p in iter_plan(r, limit=100)] == full[:100]
    first54 = list(iter_plan(r, limit=54))
    assert len({(p.meta["scene"], p.meta["style"]) for p in first54}) == 54
    assert list(iter_plan(r, limit=0)) == []


def test_plan_is_lazy_for_a_million_per_cell(tmp_path):
    r = load_recipe(recipe_with(tmp_path, small(per_cell=10**6)))
    t0 = time.monotonic()
    gen = iter_plan(r)
    head = list(itertools.islice(gen, 500))
    assert time.monotonic() - t0 < 5
    assert len(head) == 500 and len({p.id for p in head}) == 500


# ── validation ─────────────────────────────────────────────────────────────────

BAD = [
    # (what to change, key expected in the message, words expected)
    (lambda t: t.replace('temperature = 1.0', 'temprature = 1.0'), "teacher.temprature", "did you mean temperature"),
    (lambda t: t.replace('model = "deepseek-chat"\n', ''), "teacher.model", "missing key"),
    (lambda t: t.replace('per_cell = 40', 'per_cell = "40"'), "sampling.per_cell", "expected an integer"),
    (lambda t: t.replace('per_cell = 40', 'per_cell = 0'), "sampling.per_cell", "must be positive"),
    (lambda t: t.replace('max_chars = 35', 'max_chars = -35'), "lengths[1].max_chars", "must be positive"),
    (lambda t: t.replace('name = "学生"\nrelation = "晚辈"', 'name = "学生"\nrelation = "晚辈们"'),
     "recipients[29].relation", "unknown relation"),
    (lambda t: t.replace('写一条{scene}的祝福语', '写一条{scen}的祝福语'), "recipe.prompt_template",
     "unknown placeholder {scen}"),
    (lambda t: t.replace('写一条{scene}的祝福语', '写一条{scene的祝福语'), "recipe.prompt_template", "bad template"),
    (lambda t: t.replace('scene = "七夕节"', 'scene = "七夕"'), "exclusions[0].scene", "unknown scene"),
    (lambda t: t.replace('recipient = "小侄子"', 'recipient = "小侄女"'), "exclusions[3].recipient", "unknown recipient"),
    (lambda t: t.replace('style = "小红书"\nrelation', 'style = "抖音"\nrelation'), "exclusions[7].style",
     "unknown style"),
    (lambda t: t.replace('examples = []', 'examples = [""]', 1), "styles[1].examples[0]", "non-empty string"),
    (lambda t: t.replace('[[lengths]]\nmax_chars = 20\n[[lengths]]\nmax_chars = 35\n[[lengths]]\nmax_chars = 50\n'
                         '[[lengths]]\nmax_chars = 80\n', '').replace('[recipe]', 'lengths = []\n[recipe]'),
     "lengths", "empty list"),
    (lambda t: t.replace('[sampling]', '[samplng]'), "samplng", "did you mean sampling"),
    (lambda t: t.replace('top_p = 0.95', 'top_p = 0.95 0.9'),
     f"line {TEXT.splitlines().index('top_p = 0.95') + 1}", "invalid TOML"),
]


@pytest.mark.parametrize("change,key,words", BAD, ids=[b[1] for b in BAD])
def test_bad_recipes_raise_one_line_naming_file_and_key(tmp_path, change, key, words):
    bad = change(TEXT)
    assert bad != TEXT, "the test edit did not apply"
    p = recipe_with(tmp_path, bad, "bad.toml")
    with pytest.raises(RecipeError) as ei:
        load_recipe(p)
    msg = str(ei.value)
    assert "\n" not in msg
    assert msg.startswith(f"{p}: {key}: "), msg
    assert words in msg, msg


def test_missing_file_is_a_recipe_error(tmp_path):
    with pytest.raises(RecipeError, match="no such file"):
        load_recipe(tmp_path / "nope.toml")


@pytest.mark.parametrize("change,key,words", [BAD[0], BAD[5], BAD[-1]], ids=["typo", "relation", "toml"])
def test_plan_cli_bad_recipe_exits_2_with_one_line(tmp_path, change, key, words):
    p = recipe_with(tmp_path, change(TEXT), "bad.toml")
    res = synth_cli("plan", "--recipe", str(p))
    assert res.returncode == 2
    assert "Traceback" not in res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"{p}: {key}: ") and words in lines[0], res.stderr
    assert res.stdout == ""


def test_parse_recipe_without_file():
    r = parse_recipe(TEXT, "inline")
    assert r.path == "inline" and r.hash == load_recipe(RECIPE).hash


# ── CLI output ───────────────────────────────────────────────────────────────

def test_plan_cli_prints_counts_coverage_estimate_and_prompts():
    res = synth_cli("plan", "--recipe", str(RECIPE), "--limit", "108", "--show", "2")
    assert res.returncode == 0, res.stderr
    out = res.stdout
    assert "prompts: 108" in out
    for title in ("prompts per scene", "prompts per style", "prompts per constraint", "prompts per relation group"):
        assert title in out
    assert "54 / 54 scene × style cells" in out
    assert "estimate" in out and "$" in out
    first = list(iter_plan(load_recipe(RECIPE), limit=2))
    for p in first:
        assert p.id in out and p.input in out
        assert p.messages[0]["content"].splitlines()[1][:20] in out


def test_plan_cli_json_matches_plan():
    res = synth_cli("plan", "--recipe", str(RECIPE), "--json", "--show", "1", "--price-in", "1", "--price-out", "2")
    assert res.returncode == 0, res.stderr
    s = json.loads(res.stdout)
    plan = list(iter_plan(load_recipe(RECIPE)))
    assert s["prompts"] == len(plan) == 2160
    assert s["counts"]["style"] == {"严肃": 720, "小红书": 720, "正常": 720}
    assert sum(s["counts"]["relation"].values()) == len(plan)
    assert s["counts"]["relation"] == dict(Counter(p.meta["relation"] for p in plan))
    e = s["estimate"]
    assert e["cost_usd"] == round(e["input_tokens"] / 1e6 + 2 * e["output_tokens"] / 1e6, 4) > 0
    assert s["shown"][0]["id"] == plan[0].id


def test_help_documents_options():
    top = synth_cli("--help")
    assert top.returncode == 0 and "plan" in top.stdout and "run" in top.stdout
    h = synth_cli("plan", "--help")
    assert h.returncode == 0
    for opt in ("--recipe", "--seed", "--limit", "--show", "--price-in", "--price-out", "--json"):
        assert opt in h.stdout
