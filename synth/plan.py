"""The deterministic prompt plan: which prompts a recipe asks the teacher, in which order.

For every scene × style cell not ruled out by [[exclusions]], draw `quota` prompts (sampling.per_cell, or a
matching [[quotas]] entry). Each cell has its own random.Random seeded with a *string* built from the seed,
recipe name, scene and style: string seeds hash with SHA-512 (seed version 2), so the same recipe and seed give
the same prompts in the same order on any machine and Python ≥ 3.2, and adding a scene does not reshuffle the
others. Cells are visited round-robin (one prompt of each cell in turn), so any prefix — `--limit N`, or a run
stopped half-way — covers the grid evenly. The plan is a lazy generator: a million prompts per cell cost no
memory beyond one small counter per cell.
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field
from itertools import accumulate
from typing import Iterator

from distillery.record import content_id

from .recipe import Recipe, Recipient, Scene, Style

__all__ = ["PlannedPrompt", "Cell", "iter_plan", "cells"]


@dataclass(frozen=True)
class PlannedPrompt:
    id: str
    messages: list[dict]
    instruction: str
    input: str
    meta: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Cell:
    scene: Scene
    style: Style
    recipients: tuple[Recipient, ...]  # those not excluded in this cell; empty → cell excluded
    quota: int
    excluded_by: str = ""             # why the whole cell is out ('' when it is sampled)

    @property
    def sampled(self) -> bool:
        """The plan draws from this cell: some recipient is allowed and the quota is positive."""
        return bool(self.recipients) and self.quota > 0


def cells(recipe: Recipe) -> list[Cell]:
    """All scene × style cells in recipe order, with the recipients allowed in each and its quota."""
    out = []
    for sc in recipe.scenes:
        for st in recipe.styles:
            allowed = []
            why = ""
            for r in recipe.recipients:
                values = {"scene": sc.name, "style": st.name, "recipient": r.name, "relation": r.relation,
                          "kind": sc.kind}
                hit = next((e for e in recipe.exclusions if e.matches(values)), None)
                if hit is None:
                    allowed.append(r)
                else:
                    why = why or hit.why or "excluded"
            out.append(Cell(sc, st, tuple(allowed), recipe.quota(sc, st), "" if allowed else why))
    return out


class _CellSampler:
    """Draws one cell's prompts from its own string-seeded stream."""

    def __init__(self, recipe: Recipe, cell: Cell, seed: int):
        self.recipe, self.cell, self.remaining = recipe, cell, cell.quota
        self.rng = random.Random(f"distillery/{seed}/{recipe.name}/{cell.scene.name}/{cell.style.name}")
        # cumulative weights once per cell: choices() with cum_weights avoids re-summing per draw
        self.rec_cw = list(accumulate(r.weight for r in cell.recipients))
        self.con_cw = list(accumulate(c.weight for c in recipe.constraints))
        self.len_cw = list(accumulate(x.weight for x in recipe.lengths))
        self.occurrences: dict[str, int] = {}  # base id → times seen, for unique ids of repeated content

    def next(self) -> PlannedPrompt:
        r, rec, cell, rng = self.recipe, self.cell.recipients, self.cell, self.rng
        self.remaining -= 1
        recipient = rng.choices(rec, cum_weights=self.rec_cw)[0]
        constraint = rng.choices(r.constraints, cum_weights=self.con_cw)[0]
        length = rng.choices(r.lengths, cum_weights=self.len_cw)[0]
        examples: list[str] = []
        if cell.style.examples:
            lo, hi = r.sampling.examples_per_prompt
            k = min(rng.randint(lo, hi), len(cell.style.examples))
            examples = rng.sample(cell.style.examples, k)
        examples_block = (r.examples_template.format(examples="\n".join(examples)) if examples else "")
        fields = {
            "recipient": recipient.name, "relation": recipient.relation,
            "relation_hint": r.relations[recipient.relation], "scene": cell.scene.name, "wish": cell.scene.wish,
            "style": cell.style.name, "style_instruction": cell.style.instruction,
            "examples_block": examples_block, "constraint": constraint.text, "max_chars": length.max_chars,
        }
        prompt = r.prompt_template.format(**fields)
        inp = r.input_template.format(**fields)
        # scene and style are in the hashed content so repeats can only happen inside one cell,
        # which keeps the occurrence counter per cell (bounded by the cell's distinct contents).
        base = content_id("p", r.system, inp, prompt, cell.scene.name, cell.style.name)
        occ = self.occurrences.get(base, 0)
        self.occurrences[base] = occ + 1
        pid = f"{base}-{occ}"
        meta = {
            "recipe": r.name, "recipe_hash": r.hash, "scene": cell.scene.name, "style": cell.style.name,
            "recipient": recipient.name, "relation": recipient.relation, "constraint": constraint.text,
            "max_chars": length.max_chars, "prompt": prompt, "examples": examples, "prompt_id": pid,
        }
        return PlannedPrompt(id=pid, messages=[{"role": "user", "content": prompt}], instruction=r.system,
                             input=inp, meta=meta)


def iter_plan(recipe: Recipe, seed: int | None = None, limit: int | None = None) -> Iterator[PlannedPrompt]:
    """Yield the recipe's planned prompts lazily, round-robin over the sampled cells.

    seed defaults to recipe.sampling.seed; limit stops after that many prompts (None: the whole plan).
    """
    if seed is None:
        seed = recipe.sampling.seed
    if limit is not None and limit < 0:
        raise ValueError("limit must be >= 0")
    active = [_CellSampler(recipe, c, seed) for c in cells(recipe) if c.sampled]
    emitted = 0
    while active:
        still = []
        for s in active:
            if limit is not None and emitted >= limit:
                return
            yield s.next()
            emitted += 1
            if s.remaining > 0:
                still.append(s)
        active = still
