"""mlx_tinyllama: an instrumented MLX reference of the TinyLlama-1.1B-Chat forward pass.

Every stage of the forward pass has one canonical tap name (see `taps.py`); the
CLI (`python -m mlx_tinyllama.trace`) records, compares and explains them.
"""

import os

# MLX's CUDA backend runs float32 matmuls as TF32 (10-bit mantissa) unless told
# otherwise: a reference must compute float32 as float32 (measured on an H200:
# NMSE 4e-8 vs transformers at the first projection with TF32, 1e-12 without).
# Read once by MLX at its first matmul; set MLX_ENABLE_TF32=1 to opt back in.
os.environ.setdefault("MLX_ENABLE_TF32", "0")

__version__ = "0.1.0"
