"""The generation-path checks on their own: the YOCO prefill skip (C3: prefill with logits_to_keep=1 vs the
cross-decoder on every position, last-token logits checked against the full forward) and the sliding ring
after many wraps (C5). sambay only, so transformers is not needed.

    python benchmarks/bench_generation.py [--quick] [--device cpu|cuda] [--out DIR] [--threads N] [--repeats N]

Same as ``sambay bench --only c3,c5`` (see sambay/bench/).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from sambay.cli import main

if __name__ == "__main__":
    argv = sys.argv[1:]
    if any(a == "--only" or a.startswith("--only=") for a in argv):
        sys.exit("bench_generation.py runs C3 and C5; use `sambay bench --only ...` for other sections")
    sys.exit(main(["bench", "--only", "c3,c5", *argv]))
