import sys

from curate.review.cli import main

sys.exit(main())
