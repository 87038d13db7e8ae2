"""`python -m synth`: plan prompts offline (`plan`) and ask the teacher (`run`).

Exit codes: 0 success; 2 bad usage or a bad recipe (one line on stderr: `<file>: <key>: <problem>`);
1 anything else the subcommand reports as failure (see `synth run --help` for run's own codes).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections import Counter
from typing import Sequence

from .recipe import RecipeError, load_recipe

EXIT_OK, EXIT_FAIL, EXIT_USAGE = 0, 1, 2

# Token estimate used by `plan` (documented in --help): Chinese text runs about 1.5 characters per token on
# DeepSeek/GPT-style BPE vocabularies. It is a budget guide, not a bill; `run` records real usage.
CHARS_PER_TOKEN = 1.5


def estimate_tokens(chars: int) -> int:
    return math.ceil(chars / CHARS_PER_TOKEN)


def _add_plan_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--recipe", required=True, metavar="PATH", help="recipe TOML file, e.g. dataset/recipes/blessing.toml")
    p.add_argument("--seed", type=int, default=None, metavar="S",
                   help="sampling seed (default: the recipe's sampling.seed); same recipe + seed = same plan")
    p.add_argument("--limit", type=int, default=None, metavar="N",
                   help="only the first N prompts of the plan (cells are visited round-robin, so a prefix "
                        "covers the grid evenly); default: the whole plan")
    p.add_argument("--show", type=int, default=3, metavar="K", help="print K rendered prompts (default 3; 0 for none)")
    p.add_argument("--price-in", type=float, default=None, metavar="X",
                   help="USD per million input tokens (default: the recipe's teacher.price_input_per_mtok)")
    p.add_argument("--price-out", type=float, default=None, metavar="Y",
                   help="USD per million output tokens (default: the recipe's teacher.price_output_per_mtok)")
    p.add_argument("--json", action="store_true", help="print one JSON summary object on stdout instead of tables")


def build_parser(with_run: bool = False) -> argparse.ArgumentParser:
    """The CLI parser. `run`'s options come from synth.run, imported only when with_run is true."""
    parser = argparse.ArgumentParser(
        prog="synth",
        description="Synthesize training data from a teacher LLM: plan the prompts a recipe asks (offline), "
                    "then run them against an OpenAI-compatible API.",
        epilog="Exit codes: 0 ok; 1 failure; 2 bad usage or bad recipe (one line on stderr, no traceback).")
    sub = parser.add_subparsers(dest="command", metavar="{plan,run}")
    sub.required = True
    plan = sub.add_parser(
        "plan", help="show what a recipe samples: counts, grid coverage, token/cost estimate (offline)",
        description="Offline: load the recipe, walk its deterministic plan and print counts per scene, style, "
                    "constraint, relation group and length cap; grid coverage (cells sampled / possible, excluded "
                    "cells); an estimate of tokens and cost; and K rendered prompts. Nothing is sent anywhere.",
        epilog=f"Token estimate: input = prompt characters / {CHARS_PER_TOKEN} per request; output = max_chars / "
               f"{CHARS_PER_TOKEN} per choice (the length cap, so an upper-side guess) × teacher.n. Cost = tokens × "
               "price per million. Exit codes: 0 ok; 2 bad usage or bad recipe.")
    _add_plan_arguments(plan)
    run = sub.add_parser(
        "run", help="send the planned prompts to the teacher and write records (see `synth run --help`)",
        description="Send the recipe's planned prompts to the teacher and write distillery records.")
    if with_run:
        from . import run as run_mod  # imported lazily: `synth plan` must work even if run is broken
        run_mod.add_arguments(run)
    return parser


def _wants_run(argv: Sequence[str]) -> bool:
    first = next((a for a in argv if not a.startswith("-")), None)
    return first == "run"


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    with_run = _wants_run(argv)
    try:
        parser = build_parser(with_run=with_run)
    except Exception as e:  # synth.run failed to import: say so in one line, plan still works
        print(f"synth run: unavailable: {type(e).__name__}: {e}".splitlines()[0], file=sys.stderr)
        return EXIT_FAIL
    args = parser.parse_args(argv)
    try:
        if args.command == "plan":
            return plan_main(args)
        from . import run as run_mod
        return int(run_mod.main(args) or 0)
    except RecipeError as e:
        print(str(e), file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("synth: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `synth plan | head`: the reader left; not an error worth a traceback
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK


# ── plan ───────────────────────────────────────────────────────────────────────

def summarize(recipe, seed: int | None = None, limit: int | None = None, show: int = 3,
              price_in: float | None = None, price_out: float | None = None) -> dict:
    """Walk the plan once (lazily) and return counts, coverage, estimates and the first `show` prompts."""
    from .plan import cells, iter_plan

    price_in = recipe.teacher.price_input_per_mtok if price_in is None else price_in
    price_out = recipe.teacher.price_output_per_mtok if price_out is None else price_out
    n = recipe.teacher.n
    by = {k: Counter() for k in ("scene", "style", "constraint", "relation", "max_chars")}
    covered: set[tuple[str, str]] = set()
    total = in_tok = out_tok = 0
    shown = []
    for p in iter_plan(recipe, seed=seed, limit=limit):
        m = p.meta
        total += 1
        for k, c in by.items():
            c[m[k]] += 1
        covered.add((m["scene"], m["style"]))
        in_tok += estimate_tokens(len(p.messages[0]["content"]))
        out_tok += estimate_tokens(m["max_chars"]) * n
        if len(shown) < show:
            shown.append({"id": p.id, "input": p.input, "prompt": m["prompt"], "meta": {
                k: m[k] for k in ("scene", "style", "recipient", "relation", "max_chars", "examples")}})
    all_cells = cells(recipe)
    excluded = [{"scene": c.scene.name, "style": c.style.name, "why": c.excluded_by or "quota 0"}
                for c in all_cells if not c.sampled]
    partial = sum(1 for c in all_cells if c.recipients and len(c.recipients) < len(recipe.recipients))
    pairs_out = sum(len(recipe.recipients) - len(c.recipients) for c in all_cells)
    return {
        "recipe": recipe.name, "recipe_hash": recipe.hash, "path": recipe.path,
        "seed": recipe.sampling.seed if seed is None else seed, "limit": limit,
        "prompts": total, "requests": total, "samples": total * n,
        "counts": {k: dict(sorted(c.items(), key=lambda kv: (-kv[1], str(kv[0])))) for k, c in by.items()},
        "grid": {"cells_possible": len(all_cells), "cells_covered": len(covered),
                 "cells_excluded": excluded, "cells_with_excluded_recipients": partial,
                 "recipient_cell_pairs_excluded": pairs_out},
        "estimate": {"chars_per_token": CHARS_PER_TOKEN, "input_tokens": in_tok, "output_tokens": out_tok,
                     "price_input_per_mtok": price_in, "price_output_per_mtok": price_out,
                     "cost_usd": round(in_tok * price_in / 1e6 + out_tok * price_out / 1e6, 4)},
        "shown": shown,
    }


def plan_main(args: argparse.Namespace) -> int:
    for name in ("limit", "show"):
        if getattr(args, name) is not None and getattr(args, name) < 0:
            print(f"synth plan: --{name}: must be >= 0", file=sys.stderr)
            return EXIT_USAGE
    for name in ("price_in", "price_out"):
        v = getattr(args, name)
        if v is not None and not (v >= 0 and math.isfinite(v)):
            print(f"synth plan: --{name.replace('_', '-')}: must be a finite number >= 0", file=sys.stderr)
            return EXIT_USAGE
    recipe = load_recipe(args.recipe)
    s = summarize(recipe, seed=args.seed, limit=args.limit, show=args.show,
                  price_in=args.price_in, price_out=args.price_out)
    if args.json:
        print(json.dumps(s, ensure_ascii=False, indent=2))
        return EXIT_OK
    _print_tables(s)
    return EXIT_OK


def _print_tables(s: dict) -> None:
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    con = Console(highlight=False, width=max(100, Console().width))
    con.print(Text(f"recipe {s['recipe']} ({s['path']})  hash {s['recipe_hash'][:12]}  seed {s['seed']}"
                   + (f"  limit {s['limit']}" if s["limit"] is not None else "")))
    con.print(Text(f"prompts: {s['prompts']}   samples (× teacher.n): {s['samples']}"))
    titles = {"scene": "scene", "style": "style", "constraint": "constraint", "relation": "relation group",
              "max_chars": "length cap (max_chars)"}
    for key, title in titles.items():
        t = Table(title=f"prompts per {title}", title_justify="left")
        t.add_column(title, overflow="fold")
        t.add_column("prompts", justify="right")
        t.add_column("share", justify="right")
        for k, c in s["counts"][key].items():
            label = (k if k != "" else "(none)") if key == "constraint" else str(k)
            t.add_row(Text(label), str(c), f"{100 * c / max(1, s['prompts']):.1f}%")
        con.print(t)
    g = s["grid"]
    con.print(Text(f"grid coverage: {g['cells_covered']} / {g['cells_possible']} scene × style cells sampled; "
                   f"{len(g['cells_excluded'])} excluded; {g['cells_with_excluded_recipients']} cells exclude some "
                   f"recipients ({g['recipient_cell_pairs_excluded']} recipient × cell pairs excluded)"))
    for c in g["cells_excluded"]:
        con.print(Text(f"  excluded cell: {c['scene']} × {c['style']}: {c['why']}"))
    e = s["estimate"]
    con.print(Text(f"estimate (≈{e['chars_per_token']} chars/token): input {e['input_tokens']:,} tokens, output "
                   f"{e['output_tokens']:,} tokens; at ${e['price_input_per_mtok']}/M in, "
                   f"${e['price_output_per_mtok']}/M out ≈ ${e['cost_usd']:.4f}"))
    for i, p in enumerate(s["shown"], 1):
        m = p["meta"]
        con.rule(Text(f"prompt {i}: {p['id']}"))
        con.print(Text(f"input: {p['input']}   [{m['scene']} / {m['style']} / {m['recipient']} ({m['relation']}) "
                       f"/ < {m['max_chars']} 字]"))
        con.print(Text(p["prompt"]))
