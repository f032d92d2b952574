"""Throughput profiling, side by side with mlx-lm's Llama on the same weights (and
optionally transformers on torch): `timing` (settings, samples timed around `mx.eval`,
their summary), `engines` (the timed models behind one interface), `devices` (the
device, its BLAS and peak bandwidth, the bytes a decode step reads, Metal capture),
`taps` (what recording taps costs), `stages` (each stage kind timed in isolation) and
`suite` (`run`: prefill and decode throughput and every other section, in one result).
The method is in `timing`'s docstring and docs/benchmarks.md; the names below are the
package's API.
"""

from __future__ import annotations

from .timing import (  # noqa: F401
    Settings,
    parse_lengths,
    validate,
    summarize,
    alternate,
    synthetic_ids,
    progress,
)
from .engines import (  # noqa: F401
    MLXEngine,
    mlx_lm_model,
    mlx_lm_engine,
    ours_engine,
    TorchEngine,
)
from .devices import (  # noqa: F401
    PEAK_BANDWIDTH_GBS,
    blas_library,
    device_report,
    lookup_peak,
    weight_bytes,
    bandwidth,
    check_metal_capture,
    metal_capture,
)
from .taps import (  # noqa: F401
    TAP_MODES,
    tap_recorder,
    collect,
    tapped_prefill,
    tapped_decode,
    tap_overhead_section,
)
from .stages import (  # noqa: F401
    STAGE_KINDS,
    STAGE_METHOD,
    stage_graphs,
    time_graph,
    whole_forward,
    stages_section,
)
from .suite import (  # noqa: F401
    FORMAT,
    prefill_section,
    decode_section,
    add_ratios,
    tokens_agreement,
    run,
)
