"""One module per CLI command (see `mlx_tinyllama.trace.COMMANDS`)."""
