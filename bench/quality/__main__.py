"""``python -m bench.quality``: the variant study (bench/quality/study.py)."""
import sys

from bench.quality.study import main

sys.exit(main())
