"""Kernel conformance vectors: every op of the forward pass at a model's shapes and at tile edges.

    cases    the case list (ops, shapes, quick subset, one-line semantics)
    inputs   real weights through the project's loader, layer-0 activations from them
    engine   the project's ops as a per-op engine: golden outputs and the MLX engines
    write    inputs + golden outputs + manifest.json
    store    the on-disk format: atomic writes, validated reads
    runner   a Python engine (module:function) run over the cases
    check    results against golden outputs, per case and per op
    patterns failure patterns: compare's shapes (errorshape.py) on a kernel's output
    html     the HTML page of a check
"""
