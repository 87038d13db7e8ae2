"""Load and validate a synthesis recipe (TOML): what to ask the teacher, and how to sample it.

Every problem is a RecipeError whose message is one line, `<file>: <key>: <what is wrong>`, so the CLI can
print it and exit 2 without a traceback. Keys are dotted paths such as `scenes[3].wish`.

Optional `weight` keys (default 1, must be > 0) on recipients, constraints and lengths steer the draws (scenes and
styles are not drawn: every cell of the grid is enumerated); `[[quotas]]` entries override `sampling.per_cell`
for the cells they match (see plan.py).
"""
from __future__ import annotations

import difflib
import re
import string
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

try:  # Python 3.11+
    import tomllib
except ModuleNotFoundError:  # pragma: no cover - 3.10 fallback (pyproject depends on tomli there)
    import tomli as tomllib  # type: ignore[no-redef]

from distillery.record import canonical_hash

__all__ = [
    "RecipeError", "Recipe", "Teacher", "Sampling", "Scene", "Style", "Constraint", "Length",
    "Recipient", "Exclusion", "Quota", "load_recipe", "parse_recipe",
    "PROMPT_FIELDS", "INPUT_FIELDS", "MATCH_KEYS",
]

# Placeholders each template may use. prompt/input share the cell fields; examples_template only {examples}.
PROMPT_FIELDS = frozenset({"recipient", "relation", "relation_hint", "scene", "wish", "style",
                           "style_instruction", "examples_block", "constraint", "max_chars"})
INPUT_FIELDS = PROMPT_FIELDS - {"examples_block"}
EXAMPLES_FIELDS = frozenset({"examples"})
# What an exclusion or quota may match on. `kind` is the scene's kind.
MATCH_KEYS = ("scene", "style", "recipient", "relation", "kind")


class RecipeError(ValueError):
    """A recipe that cannot be used. str() is one line: `<file>: <key>: <problem>`."""

    def __init__(self, path: str, key: str, problem: str):
        problem = " ".join(str(problem).split())  # keep it one line whatever the source said
        super().__init__(f"{path}: {key}: {problem}")
        self.path, self.key, self.problem = path, key, problem


@dataclass(frozen=True)
class Teacher:
    model: str
    temperature: float = 1.0
    top_p: float = 1.0
    max_tokens: int = 256
    n: int = 1
    price_input_per_mtok: float = 0.0
    price_output_per_mtok: float = 0.0


@dataclass(frozen=True)
class Sampling:
    seed: int
    per_cell: int
    examples_per_prompt: tuple[int, int]  # inclusive range of example sentences shown (styles with examples)


@dataclass(frozen=True)
class Scene:
    name: str
    wish: str
    kind: str = ""


@dataclass(frozen=True)
class Style:
    name: str
    instruction: str
    examples: tuple[str, ...] = ()


@dataclass(frozen=True)
class Constraint:
    text: str
    forbids: tuple[str, ...] = ()
    elder_exception: bool = False
    weight: float = 1.0


@dataclass(frozen=True)
class Length:
    max_chars: int
    weight: float = 1.0


@dataclass(frozen=True)
class Recipient:
    name: str
    relation: str
    weight: float = 1.0


@dataclass(frozen=True)
class Exclusion:
    """Matches a (scene, style, recipient) combination when every named key matches (value or list)."""
    match: dict[str, tuple[str, ...]]
    why: str = ""

    def matches(self, values: dict[str, str]) -> bool:
        return all(values.get(k) in allowed for k, allowed in self.match.items())


@dataclass(frozen=True)
class Quota:
    """Overrides per_cell for every scene × style cell it matches (keys: scene, style, kind)."""
    match: dict[str, tuple[str, ...]]
    per_cell: int

    def matches(self, values: dict[str, str]) -> bool:
        return all(values.get(k) in allowed for k, allowed in self.match.items())


@dataclass(frozen=True)
class Recipe:
    name: str
    hash: str
    path: str
    system: str
    input_template: str
    prompt_template: str
    examples_template: str
    teacher: Teacher
    sampling: Sampling
    scenes: tuple[Scene, ...]
    styles: tuple[Style, ...]
    constraints: tuple[Constraint, ...]
    lengths: tuple[Length, ...]
    relations: dict[str, str]
    recipients: tuple[Recipient, ...]
    exclusions: tuple[Exclusion, ...] = ()
    quotas: tuple[Quota, ...] = ()
    version: int = 1
    raw: dict = field(default_factory=dict, repr=False, compare=False)

    def quota(self, scene: Scene, style: Style) -> int:
        """Prompts for one cell: the last matching [[quotas]] entry wins, else sampling.per_cell."""
        values = {"scene": scene.name, "style": style.name, "kind": scene.kind}
        n = self.sampling.per_cell
        for q in self.quotas:
            if q.matches(values):
                n = q.per_cell
        return n


# ── validation helpers ─────────────────────────────────────────────────────────

class _V:
    """Small typed getters that raise RecipeError with the dotted key."""

    def __init__(self, path: str):
        self.path = path

    def fail(self, key: str, problem: str):
        raise RecipeError(self.path, key, problem)

    def keys(self, table: dict, key: str, required: set[str], optional: set[str] = frozenset()) -> None:
        known = set(required) | set(optional)
        for k in table:
            if k not in known:
                close = difflib.get_close_matches(k, sorted(known), n=1, cutoff=0.6)
                hint = f" (did you mean {close[0]}?)" if close else f" (known: {', '.join(sorted(known))})"
                self.fail(_join(key, k), f"unknown key{hint}")
        for k in sorted(required):
            if k not in table:
                self.fail(_join(key, k), "missing key")

    def table(self, obj: Any, key: str) -> dict:
        if not isinstance(obj, dict):
            self.fail(key, f"expected a table, got {_tname(obj)}")
        return obj

    def array_of_tables(self, obj: Any, key: str) -> list[dict]:
        if not isinstance(obj, list):
            self.fail(key, f"expected an array of tables ([[{key}]]), got {_tname(obj)}")
        if not obj:
            self.fail(key, "empty list")
        for i, item in enumerate(obj):
            self.table(item, f"{key}[{i}]")
        return obj

    def str_(self, t: dict, key: str, k: str, default: Any = ..., nonempty: bool = True) -> str:
        if k not in t:
            if default is ...:
                self.fail(_join(key, k), "missing key")
            return default
        v = t[k]
        if not isinstance(v, str):
            self.fail(_join(key, k), f"expected a string, got {_tname(v)}")
        if nonempty and not v.strip():
            self.fail(_join(key, k), "empty string")
        return v

    def int_(self, t: dict, key: str, k: str, default: Any = ..., positive: bool = True) -> int:
        if k not in t:
            if default is ...:
                self.fail(_join(key, k), "missing key")
            return default
        v = t[k]
        if not isinstance(v, int) or isinstance(v, bool):
            self.fail(_join(key, k), f"expected an integer, got {_tname(v)}")
        if positive and v <= 0:
            self.fail(_join(key, k), f"must be positive, got {v}")
        if not positive and v < 0:
            self.fail(_join(key, k), f"must not be negative, got {v}")
        return v

    def num(self, t: dict, key: str, k: str, default: Any = ..., lo: float = 0.0, lo_open: bool = True,
            hi: float | None = None) -> float:
        if k not in t:
            if default is ...:
                self.fail(_join(key, k), "missing key")
            return default
        v = t[k]
        if not isinstance(v, (int, float)) or isinstance(v, bool):
            self.fail(_join(key, k), f"expected a number, got {_tname(v)}")
        if v != v or v in (float("inf"), float("-inf")):
            self.fail(_join(key, k), f"expected a finite number, got {v}")
        if (lo_open and v <= lo) or (not lo_open and v < lo):
            self.fail(_join(key, k), f"must be {'>' if lo_open else '>='} {lo:g}, got {v}")
        if hi is not None and v > hi:
            self.fail(_join(key, k), f"must be <= {hi:g}, got {v}")
        return float(v)

    def str_list(self, t: dict, key: str, k: str, default: Any = ...) -> tuple[str, ...]:
        if k not in t:
            if default is ...:
                self.fail(_join(key, k), "missing key")
            return default
        v = t[k]
        if not isinstance(v, list):
            self.fail(_join(key, k), f"expected a list of strings, got {_tname(v)}")
        for i, s in enumerate(v):
            if not isinstance(s, str) or not s.strip():
                self.fail(f"{_join(key, k)}[{i}]", f"expected a non-empty string, got {s!r}")
        return tuple(v)

    def bool_(self, t: dict, key: str, k: str, default: bool = False) -> bool:
        v = t.get(k, default)
        if not isinstance(v, bool):
            self.fail(_join(key, k), f"expected true or false, got {_tname(v)}")
        return v

    def template(self, text: str, key: str, allowed: frozenset[str], required: tuple[str, ...] = ()) -> None:
        try:
            parsed = list(string.Formatter().parse(text))
        except ValueError as e:  # unbalanced braces
            self.fail(key, f"bad template: {e} (write {{{{ and }}}} for literal braces)")
        seen = set()
        for _lit, name, spec, conv in parsed:
            if name is None:
                continue
            if name not in allowed:
                close = difflib.get_close_matches(name, sorted(allowed), n=1, cutoff=0.6)
                hint = f" (did you mean {{{close[0]}}}?)" if close else f" (allowed: {', '.join('{%s}' % a for a in sorted(allowed))})"
                self.fail(key, f"unknown placeholder {{{name}}}{hint}")
            if spec or conv:
                self.fail(key, f"placeholder {{{name}}} must not have a format spec or conversion")
            seen.add(name)
        for name in required:
            if name not in seen:
                self.fail(key, f"missing placeholder {{{name}}}")


def _join(key: str, k: str) -> str:
    return f"{key}.{k}" if key else k


def _tname(v: Any) -> str:
    return {dict: "table", list: "array", str: "string", bool: "boolean", int: "integer",
            float: "float"}.get(type(v), type(v).__name__)


def _unique(v: _V, key: str, names: list[str], what: str) -> None:
    seen: set[str] = set()
    for i, n in enumerate(names):
        if n in seen:
            v.fail(f"{key}[{i}].{what}", f"duplicate {what} {n!r}")
        seen.add(n)


# ── loading ────────────────────────────────────────────────────────────────────

_TOP_REQUIRED = {"recipe", "teacher", "sampling", "scenes", "styles", "constraints", "lengths", "relations",
                 "recipients"}
_TOP_OPTIONAL = {"exclusions", "quotas"}


def load_recipe(path: str | Path) -> Recipe:
    """Read, parse and validate a recipe file; raise RecipeError (one line) on any problem."""
    p = str(path)
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        raise RecipeError(p, "(file)", "no such file") from None
    except OSError as e:
        raise RecipeError(p, "(file)", f"cannot read: {e.strerror or e}") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise RecipeError(p, "(file)", f"not UTF-8 (byte {e.start})") from None
    return parse_recipe(text, p)


def parse_recipe(text: str, path: str = "<recipe>") -> Recipe:
    """Parse recipe TOML text. `path` only names the source in error messages and Recipe.path."""
    try:
        raw = tomllib.loads(text.lstrip("\ufeff"))
    except tomllib.TOMLDecodeError as e:
        msg = str(e)
        m = re.search(r"\(at line (\d+), column (\d+)\)", msg)
        where = f"line {m.group(1)}" if m else "(toml)"
        msg = re.sub(r"\s*\(at line \d+, column \d+\)", f" (column {m.group(2)})" if m else "", msg)
        raise RecipeError(path, where, f"invalid TOML: {msg}") from None
    return _build(raw, path)


def _build(raw: dict, path: str) -> Recipe:
    v = _V(path)
    v.keys(raw, "", _TOP_REQUIRED, _TOP_OPTIONAL)

    rt = v.table(raw["recipe"], "recipe")
    v.keys(rt, "recipe", {"name", "system", "input_template", "prompt_template"},
           {"version", "examples_template", "description"})
    name = v.str_(rt, "recipe", "name")
    version = v.int_(rt, "recipe", "version", default=1)
    system = v.str_(rt, "recipe", "system")
    input_template = v.str_(rt, "recipe", "input_template")
    prompt_template = v.str_(rt, "recipe", "prompt_template")
    examples_template = v.str_(rt, "recipe", "examples_template", default="\n{examples}")
    v.template(input_template, "recipe.input_template", INPUT_FIELDS, ("recipient",))
    v.template(prompt_template, "recipe.prompt_template", PROMPT_FIELDS, ("recipient", "scene", "max_chars"))
    v.template(examples_template, "recipe.examples_template", EXAMPLES_FIELDS, ("examples",))

    tt = v.table(raw["teacher"], "teacher")
    v.keys(tt, "teacher", {"model"}, {"temperature", "top_p", "max_tokens", "n", "price_input_per_mtok",
                                      "price_output_per_mtok"})
    teacher = Teacher(
        model=v.str_(tt, "teacher", "model"),
        temperature=v.num(tt, "teacher", "temperature", default=1.0, lo=0.0, lo_open=False, hi=2.0),
        top_p=v.num(tt, "teacher", "top_p", default=1.0, hi=1.0),
        max_tokens=v.int_(tt, "teacher", "max_tokens", default=256),
        n=v.int_(tt, "teacher", "n", default=1),
        price_input_per_mtok=v.num(tt, "teacher", "price_input_per_mtok", default=0.0, lo_open=False),
        price_output_per_mtok=v.num(tt, "teacher", "price_output_per_mtok", default=0.0, lo_open=False),
    )

    st = v.table(raw["sampling"], "sampling")
    v.keys(st, "sampling", {"per_cell"}, {"seed", "examples_per_prompt"})
    epp = st.get("examples_per_prompt", [1, 2])
    if isinstance(epp, int) and not isinstance(epp, bool):
        epp = [epp, epp]
    if (not isinstance(epp, list) or len(epp) != 2
            or not all(isinstance(x, int) and not isinstance(x, bool) for x in epp)):
        v.fail("sampling.examples_per_prompt", f"expected an integer or [min, max], got {epp!r}")
    if epp[0] < 0 or epp[1] < epp[0]:
        v.fail("sampling.examples_per_prompt", f"need 0 <= min <= max, got {epp!r}")
    sampling = Sampling(seed=v.int_(st, "sampling", "seed", default=0, positive=False),
                        per_cell=v.int_(st, "sampling", "per_cell"),
                        examples_per_prompt=(epp[0], epp[1]))

    scenes = []
    for i, t in enumerate(v.array_of_tables(raw["scenes"], "scenes")):
        k = f"scenes[{i}]"
        v.keys(t, k, {"name"}, {"wish", "kind"})
        n = v.str_(t, k, "name")
        scenes.append(Scene(n, v.str_(t, k, "wish", default=n), v.str_(t, k, "kind", default="")))
    _unique(v, "scenes", [s.name for s in scenes], "name")

    styles = []
    for i, t in enumerate(v.array_of_tables(raw["styles"], "styles")):
        k = f"styles[{i}]"
        v.keys(t, k, {"name", "instruction"}, {"examples"})
        styles.append(Style(v.str_(t, k, "name"), v.str_(t, k, "instruction"),
                            v.str_list(t, k, "examples", default=())))
    _unique(v, "styles", [s.name for s in styles], "name")

    constraints = []
    for i, t in enumerate(v.array_of_tables(raw["constraints"], "constraints")):
        k = f"constraints[{i}]"
        v.keys(t, k, {"text"}, {"forbids", "elder_exception", "weight"})
        constraints.append(Constraint(v.str_(t, k, "text", nonempty=False), v.str_list(t, k, "forbids", default=()),
                                      v.bool_(t, k, "elder_exception"), v.num(t, k, "weight", default=1.0)))

    lengths = []
    for i, t in enumerate(v.array_of_tables(raw["lengths"], "lengths")):
        k = f"lengths[{i}]"
        v.keys(t, k, {"max_chars"}, {"weight"})
        lengths.append(Length(v.int_(t, k, "max_chars"), v.num(t, k, "weight", default=1.0)))

    rel = v.table(raw["relations"], "relations")
    if not rel:
        v.fail("relations", "empty table")
    for rk, rv in rel.items():
        if not isinstance(rv, str) or not rv.strip():
            v.fail(f"relations.{rk}", f"expected a non-empty string (the tone hint), got {_tname(rv)}")
    relations = dict(rel)

    recipients = []
    for i, t in enumerate(v.array_of_tables(raw["recipients"], "recipients")):
        k = f"recipients[{i}]"
        v.keys(t, k, {"name", "relation"}, {"weight"})
        r = v.str_(t, k, "relation")
        if r not in relations:
            close = difflib.get_close_matches(r, list(relations), n=1, cutoff=0.5)
            hint = f" (did you mean {close[0]}?)" if close else f" (known: {', '.join(relations)})"
            v.fail(f"{k}.relation", f"unknown relation {r!r}{hint}")
        recipients.append(Recipient(v.str_(t, k, "name"), r, v.num(t, k, "weight", default=1.0)))
    _unique(v, "recipients", [r.name for r in recipients], "name")

    known = {"scene": [s.name for s in scenes], "style": [s.name for s in styles],
             "recipient": [r.name for r in recipients], "relation": list(relations),
             "kind": sorted({s.kind for s in scenes if s.kind})}

    def match_table(t: dict, k: str, keys: tuple[str, ...]) -> dict[str, tuple[str, ...]]:
        m: dict[str, tuple[str, ...]] = {}
        for mk in keys:
            if mk not in t:
                continue
            val = t[mk]
            vals = [val] if isinstance(val, str) else val
            if not isinstance(vals, list) or not vals or not all(isinstance(x, str) for x in vals):
                v.fail(f"{k}.{mk}", f"expected a string or a non-empty list of strings, got {_tname(val)}")
            for x in vals:
                if x not in known[mk]:
                    close = difflib.get_close_matches(x, known[mk], n=1, cutoff=0.5)
                    hint = f" (did you mean {close[0]}?)" if close else ""
                    v.fail(f"{k}.{mk}", f"unknown {mk} {x!r}{hint}")
            m[mk] = tuple(vals)
        if not m:
            v.fail(k, f"names none of {', '.join(keys)}")
        return m

    exclusions = []
    if "exclusions" in raw:
        for i, t in enumerate(v.array_of_tables(raw["exclusions"], "exclusions")):
            k = f"exclusions[{i}]"
            v.keys(t, k, set(), set(MATCH_KEYS) | {"why"})
            exclusions.append(Exclusion(match_table(t, k, MATCH_KEYS), v.str_(t, k, "why", default="")))

    quotas = []
    if "quotas" in raw:
        for i, t in enumerate(v.array_of_tables(raw["quotas"], "quotas")):
            k = f"quotas[{i}]"
            v.keys(t, k, {"per_cell"}, {"scene", "style", "kind"})
            quotas.append(Quota(match_table(t, k, ("scene", "style", "kind")),
                                v.int_(t, k, "per_cell", positive=False)))

    return Recipe(name=name, hash=canonical_hash(raw), path=path, system=system, input_template=input_template,
                  prompt_template=prompt_template, examples_template=examples_template, teacher=teacher,
                  sampling=sampling, scenes=tuple(scenes), styles=tuple(styles), constraints=tuple(constraints),
                  lengths=tuple(lengths), relations=relations, recipients=tuple(recipients),
                  exclusions=tuple(exclusions), quotas=tuple(quotas), version=version, raw=raw)
