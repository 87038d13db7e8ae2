"""Build dataset/reference/*.jsonl from the hand-written TSV sources in dataset/reference/src/.

Each source line is: scene <TAB> style <TAB> recipient <TAB> constraint# (0-3) <TAB> max_chars <TAB> output
(defect sources add a 7th column: the defect kind). This script fills in the reference `instruction` and
`input` from the recipe, the meta fields, a content-derived id and the provenance, and checks every good
greeting against the recipe (cell allowed, 字数 under the cap, emoji rules per style, forbidden phrases).
The held-out quality set (heldout-good / heldout-bad, written separately from the corpus so that the curate
filters are not judged on the lines they were tuned on) is built the same way.

    python dataset/tools/build_reference.py            # writes the .jsonl files, exit 1 on problems
    python dataset/tools/build_reference.py --check    # exit 1 if a .jsonl file differs from what src/ builds
"""
from __future__ import annotations

import functools
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from distillery.record import SCHEMA_VERSION, content_id, dumps  # noqa: E402
from distillery.text import PARTICLES, char_count, emoji_list, without_emoji  # noqa: E402

RECIPE = ROOT / "dataset/recipes/blessing.toml"
SRC = ROOT / "dataset/reference/src"
OUT = ROOT / "dataset/reference"
AUTHOR = "distillery maintainers"
# kind (= source file prefix and output name) → (id prefix, is a defect set, provenance source)
KINDS = {
    "blessings": ("ref", False, "hand-written"),
    "defects": ("bad", True, "hand-written-defect"),
    "heldout-good": ("held", False, "hand-written-heldout"),
    "heldout-bad": ("heldbad", True, "hand-written-heldout-defect"),
}


def load_recipe() -> dict:
    with open(RECIPE, "rb") as f:
        return tomllib.load(f)


def excluded(recipe: dict, scene: str, style: str, recipient: str, relation: str) -> bool:
    """The recipe's own exclusion rule (synth.recipe.Exclusion.matches), so the corpus and the plan agree."""
    kind = next(s.get("kind", "") for s in recipe["scenes"] if s["name"] == scene)
    cell = {"scene": scene, "style": style, "recipient": recipient, "relation": relation, "kind": kind}
    return any(ex.matches(cell) for ex in parsed_recipe().exclusions)


@functools.cache
def parsed_recipe():
    from synth.recipe import load_recipe as load_checked_recipe

    return load_checked_recipe(RECIPE)


def check_good(recipe: dict, rec: dict) -> list[str]:
    m, out = rec["meta"], rec["output"]
    problems = []
    if excluded(recipe, m["scene"], m["style"], m["recipient"], m["relation"]):
        problems.append("cell is excluded by the recipe")
    n = char_count(out)
    if n >= m["max_chars"]:
        problems.append(f"{n} 字, cap is < {m['max_chars']}")
    e = len(emoji_list(out))
    if m["style"] == "小红书":
        if not 1 <= e <= 2:
            problems.append(f"小红书 needs 1-2 emoji, has {e}")
        tail = without_emoji(out).rstrip("！!~～。.，, ")
        if not tail or tail[-1] not in PARTICLES:
            problems.append("小红书 should end on a modal particle")
    elif m["style"] == "严肃" and e:
        problems.append("严肃 must have no emoji")
    constraint = recipe["constraints"][m["constraint_index"]]
    forbidden = [p for p in constraint.get("forbids", []) if p in out]
    if forbidden and not (constraint.get("elder_exception") and m["relation"] == "长辈" and forbidden == ["祝你"]):
        problems.append(f"forbidden phrase {forbidden} under constraint {m['constraint_index']}")
    return problems


def build(kind: str, recipe: dict) -> tuple[list[dict], list[str]]:
    scenes = {s["name"]: s for s in recipe["scenes"]}
    styles = {s["name"] for s in recipe["styles"]}
    relation_of = {r["name"]: r["relation"] for r in recipe["recipients"]}
    prefix, is_defect, source = KINDS[kind]
    records, problems, seen = [], [], set()
    for path in sorted(SRC.glob(f"{kind}*.tsv")):
        for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            if not line.strip() or line.startswith("#"):
                continue
            where = f"{path.relative_to(ROOT)}:{lineno}"
            cols = line.split("\t")
            want = 7 if is_defect else 6
            if len(cols) != want:
                problems.append(f"{where}: expected {want} tab-separated columns, got {len(cols)}")
                continue
            scene, style, recipient, ci, cap, output = (c.strip() for c in cols[:6])
            if scene not in scenes or style not in styles or recipient not in relation_of:
                problems.append(f"{where}: unknown scene/style/recipient {scene!r}/{style!r}/{recipient!r}")
                continue
            if not ci.isdigit() or int(ci) >= len(recipe["constraints"]) or not cap.isdigit():
                problems.append(f"{where}: bad constraint# {ci!r} or max_chars {cap!r}")
                continue
            relation = relation_of[recipient]
            constraint = recipe["constraints"][int(ci)]["text"]
            meta = {
                "schema": SCHEMA_VERSION, "recipe": recipe["recipe"]["name"], "scene": scene, "style": style,
                "recipient": recipient, "relation": relation, "constraint": constraint,
                "constraint_index": int(ci), "max_chars": int(cap),
                "provenance": {"source": source, "author": AUTHOR},
            }
            if is_defect:
                meta["defect"] = cols[6].strip()
            rec = {
                "id": content_id(prefix, scene, style, recipient, output),
                "instruction": recipe["recipe"]["system"],
                "input": recipe["recipe"]["input_template"].format(
                    recipient=recipient, wish=scenes[scene]["wish"], style=style),
                "output": output,
                "meta": meta,
            }
            if rec["id"] in seen:
                problems.append(f"{where}: duplicate of an earlier line")
                continue
            seen.add(rec["id"])
            if not is_defect:
                problems += [f"{where}: {p}: {output}" for p in check_good(recipe, rec)]
            records.append(rec)
    return records, problems


def main(argv: list[str] | None = None) -> int:
    check = "--check" in (sys.argv[1:] if argv is None else argv)
    recipe = load_recipe()
    status = 0
    for kind in KINDS:
        records, problems = build(kind, recipe)
        for p in problems:
            print(p, file=sys.stderr)
        status |= bool(problems)
        if not records:
            continue
        path, text = OUT / f"{kind}.jsonl", "".join(dumps(r) + "\n" for r in records)
        if check:
            if not path.exists() or path.read_text(encoding="utf-8") != text:
                print(f"{path.relative_to(ROOT)} differs from what src/ builds: run {Path(__file__).relative_to(ROOT)}",
                      file=sys.stderr)
                status = 1
        else:
            path.write_text(text, encoding="utf-8")
        print(f"{kind}: {len(records)} records, {len(problems)} problems")
    return status


if __name__ == "__main__":
    sys.exit(main())
