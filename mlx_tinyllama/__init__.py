"""mlx_tinyllama: an instrumented MLX reference of the TinyLlama-1.1B-Chat forward pass.

Every stage of the forward pass has one canonical tap name (see `taps.py`); the
CLI (`python -m mlx_tinyllama.trace`) records, compares and explains them.
"""

__version__ = "0.1.0"
