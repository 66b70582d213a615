"""``python -m bench.quality_lm``: the LM study (bench/quality_lm/study.py)."""
import sys

from bench.quality_lm.study import main

sys.exit(main())
