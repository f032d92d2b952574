"""References and other engines' numbers, read into one shape to compare: `side` (the
`Side`/`Item`/`Selector` data model and the canonical tap order), `seed` (the seed's
published JSON files mapped to canonical taps, with their traps), `loaders` (every file
format read into `Side`s: reference manifests, the seed bundle, stats JSON,
safetensors/npz dumps, the user's name map), `llamacpp` (llama.cpp's graph names and
`llama-eval-callback` logs) and `layout` (any layout made canonical: batch dim, ggml's
reversed dims, heads, GGUF's Q/K permutation). The names below are the package's API;
code inside the package imports from the submodules.
"""

from __future__ import annotations

from .side import (  # noqa: F401
    SHORTCUT_NORM,
    SHORTCUT_LOGITS,
    SHORTCUT_TAPS,
    Selector,
    Item,
    Side,
    tap_order,
    token_axis_of,
    is_known_tap,
)
from .seed import (  # noqa: F401
    SEED_FORMAT,
    TRANSFORMERS_KEYS,
    topk_value,
    seed_format_of,
    seed_entries,
    side_from_entries,
)
from .llamacpp import (  # noqa: F401
    LLAMACPP_PRINT_RESOLUTION,
    LLAMACPP_STAGES,
    LLAMACPP_GLOBAL,
    LLAMACPP_TWICE,
    map_name,
    llamacpp_tap,
    LogTensor,
    parse_llamacpp_tensors,
    parse_llamacpp_log,
)
from .layout import (  # noqa: F401
    expected_shape,
    unpermute_gguf,
    QK_TAPS,
    to_canonical,
)
from .loaders import (  # noqa: F401
    MANIFEST_FORMAT,
    load,
    read_tensor_file,
    read_name_map,
)
