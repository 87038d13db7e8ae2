"""`python -m synth` → synth.cli.main (exit codes documented there)."""
import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
