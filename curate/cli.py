"""`python -m curate run INPUT… --out DIR [--config curate.toml] [--strict]`, `python -m curate review …`,
and releases: `python -m curate release|diff|export …` (curate/release.py, curate/export.py)."""
from __future__ import annotations

import argparse
import sys

from curate.config import ConfigError, load_config
from curate.export import add_parser as add_export_parser, cmd_export
from curate.release import ReleaseError, add_parsers as add_release_parsers, cmd_diff, cmd_release
from curate.review.cli import add_review_parser, run_parsed

RELEASE_COMMANDS = {"release": cmd_release, "diff": cmd_diff, "export": cmd_export}

EPILOG = """exit codes:
  0  done (bad lines, if any, are listed on stderr and kept in DIR/quarantine.jsonl)
  1  --strict and at least one bad line
  2  usage error, unreadable config or recipe, no valid record was read, or DIR holds reviewed decisions
     (from `curate review pull`; --force overwrites them)
release / diff / export: see their --help"""


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m curate", description="Sort greeting records into "
                                 "approved / doubtful / rejected with reasons.", epilog=EPILOG,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="curate JSONL / JSON-array files", epilog=EPILOG,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    r.add_argument("inputs", nargs="+", help="input files or globs")
    r.add_argument("--out", required=True, help="output directory")
    r.add_argument("--config", help="curate.toml (CurateConfig keys, optionally under [curate])")
    r.add_argument("--strict", action="store_true", help="exit 1 if any input line is bad")
    r.add_argument("--force", action="store_true",
                   help="overwrite DIR even if `curate review pull` has merged reviewers' decisions into it")
    r.add_argument("--workers", type=int, default=None, metavar="N",
                   help="processes for the per-record filters (0: none; default: up to 4 for inputs over 1 MiB); "
                        "results do not depend on it")
    add_review_parser(sub)
    add_release_parsers(sub)
    add_export_parser(sub)
    try:
        args = ap.parse_args(argv)
    except SystemExit as e:
        return 0 if e.code == 0 else 2
    if args.cmd == "review":
        return run_parsed(args)
    if args.cmd in RELEASE_COMMANDS:
        try:
            return RELEASE_COMMANDS[args.cmd](args)
        except BrokenPipeError:  # `curate diff ... | head`: the reader left; not bad input
            raise
        except (ReleaseError, OSError) as e:  # OSError: e.g. an unwritable --root; still one line
            print(f"curate {args.cmd}: {e}", file=sys.stderr)
            return 2

    from curate.filters import Context
    from curate.pipeline import ReviewedOutput, run
    try:
        config = load_config(args.config)
        ctx = Context(config)
    except (ConfigError, OSError, ValueError) as e:
        print(f"curate: {e}", file=sys.stderr)
        return 2
    try:
        summary = run(args.inputs, args.out, config, ctx, workers=args.workers, force=args.force)
    except ReviewedOutput as e:
        print(f"curate: {e}", file=sys.stderr)
        return 2
    for p in summary.problems:
        print(str(p), file=sys.stderr)
    _table(summary)
    if summary.valid == 0:
        print("curate: no valid record was read", file=sys.stderr)
        return 2
    if args.strict and summary.problems:
        return 1
    return 0


def _table(summary) -> None:
    from rich.console import Console
    from rich.table import Table
    t = Table(title=f"curate  (config {summary.config_hash[:12]})")
    t.add_column("filter")
    for c in ("rejected", "doubtful", "skipped"):
        t.add_column(c, justify="right")
    for name, c in sorted(summary.by_filter.items()):
        t.add_row(name, str(c.get("rejected", 0)), str(c.get("doubtful", 0)), str(c.get("skipped", 0)))
    t.add_section()
    for v in ("approved", "doubtful", "rejected"):
        t.add_row(f"[bold]{v}", str(summary.counts.get(v, 0)), "", "")
    t.add_row("bad lines", str(len(summary.problems)), "", "")
    Console(stderr=False).print(t)
