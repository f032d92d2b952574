"""Dtype names: the one table of aliases (fp16 -> float16, ...) and the fp16 maximum."""

from __future__ import annotations

# Short names users and other engines write, to the canonical names used everywhere here.
ALIASES = {"fp16": "float16", "f16": "float16", "half": "float16", "bf16": "bfloat16", "fp32": "float32",
           "f32": "float32", "float": "float32", "fp64": "float64", "f64": "float64", "double": "float64"}

FP16_MAX = 65504.0  # the largest finite float16

# A stored tensor's dtype (safetensors' tags, numpy's names) -> its canonical float dtype
STORAGE_DTYPES = {"F16": "float16", "BF16": "bfloat16", "F32": "float32", "F64": "float64",
                  "float16": "float16", "bfloat16": "bfloat16", "float32": "float32", "float64": "float64"}


def canonical(name: str) -> str:
    """`fp16` -> `float16`; a canonical or unknown name is returned as it is (callers check it)."""
    return ALIASES.get(name, name)
