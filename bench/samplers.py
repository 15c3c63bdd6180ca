"""Samplers against exact answers: error against model evaluations (NFE), for
every sampler x step schedule, the official-equivalent settings among them
(see sit_ext.bench.samplers; also `sit-ext bench --samplers`).

    python bench/samplers.py              # writes bench/results/<date>-cpu-samplers.json and .png
    python bench/samplers.py --quick      # 1000 samples, NFE 4 and 16
    python bench/samplers.py --tuned      # tuned samplers against fixed ones (sit_ext.bench.tuned)
"""

import os
import sys

from sit_ext.bench import samplers

HERE = os.path.dirname(os.path.abspath(__file__))

if __name__ == "__main__":
    raise SystemExit(samplers.main(sys.argv[1:], out=os.path.join(HERE, "results")))
