"""sambay against a same-shape transformer (transformers.Phi3ForCausalLM, random weights): every CPU target
of PERFORMANCE.md (C1-C7), the announcement's two plots, a table, results.json. Same as ``sambay bench``.

    python benchmarks/bench_vs_transformer.py --quick     # about a minute on a 2-core CPU
    python benchmarks/bench_vs_transformer.py             # the full CPU run (< 10 min)
    python benchmarks/bench_vs_transformer.py --device cuda   # the released config in bf16
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from sambay.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]]))
