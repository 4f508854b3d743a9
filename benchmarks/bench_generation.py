"""The generation-path targets on their own, sambay only (transformers not needed): the YOCO prefill skip
(C3, last-token logits checked against the full forward) and the sliding ring after many wraps (C5).

    python benchmarks/bench_generation.py [--quick] [--check] [--out DIR] [--threads N]

Same as ``python benchmarks/run.py --only c3,c5``.
"""

from __future__ import annotations

import sys

from run import main  # benchmarks/ is on sys.path when this file runs as a script

if __name__ == "__main__":
    if any(a == "--only" or a.startswith("--only=") for a in sys.argv[1:]):
        sys.exit("bench_generation.py runs C3 and C5; use benchmarks/run.py --only ... for other sections")
    sys.exit(main(["--only", "c3,c5", *sys.argv[1:]]))
