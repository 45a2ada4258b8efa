"""``python -m labeldiff.cli`` (what torchrun and the study's workers start)."""
import sys

from labeldiff.cli import main

sys.exit(main())
