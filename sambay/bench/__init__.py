"""`sambay bench` and the measurements behind it: sambay against a same-shape ``transformers.Phi3ForCausalLM``
(random weights), interleaved repeats, plain dicts of raw samples, the read bandwidth, and the one way benchmark
workers run (:mod:`sambay.bench.workers`). benchmarks/ builds its targets on these.

    sambay bench --quick        # a table of medians and sambay/phi3 ratios with 95% intervals; results.json
"""

from sambay.bench.command import add_arguments, run, table
from sambay.bench.measure import (
    bandwidth,
    decode_latency_seconds,
    decode_state_bytes,
    decode_step_seconds,
    decode_step_seconds_vs_context,
    load_peak_rss,
    prefill_seconds,
    sliding_layer_seconds,
    sum_bandwidth,
    yoco_prefill_seconds,
)
from sambay.bench.subjects import CONFIGS, Phi3, SambaY, load_config, phi3_config, shape
from sambay.bench.timing import bootstrap, describe, interleaved, machine, median, ratio
from sambay.bench.workers import WAIT_POLICIES, peak_rss, run_worker, worker_env, write_json, write_result

__all__ = [
    "CONFIGS", "WAIT_POLICIES", "Phi3", "SambaY", "add_arguments", "bandwidth", "bootstrap", "decode_latency_seconds",
    "decode_state_bytes", "decode_step_seconds", "decode_step_seconds_vs_context", "describe", "interleaved",
    "load_config", "load_peak_rss", "machine", "median", "peak_rss", "phi3_config", "prefill_seconds", "ratio", "run",
    "run_worker", "shape", "sliding_layer_seconds", "sum_bandwidth", "table", "worker_env", "write_json",
    "write_result", "yoco_prefill_seconds",
]
