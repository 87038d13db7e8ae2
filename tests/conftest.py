import sys
from pathlib import Path

# Tests import the packages from the checkout (also when the project is not installed in editable mode).
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
