"""The project's own ops (ops.py) as a per-op kernel engine: the golden outputs and the MLX engines.

An engine is a function `engine(op, inputs, params) -> array`: `inputs` maps the roles of
the manifest (`x`, `w`, `q`, ...) to NumPy arrays (bfloat16 values arrive as float32, exactly;
`params["dtype"]` says which dtype the case is in), `params` are the case's parameters.
Layouts have no batch axis: activations are [T, hidden], attention tensors [heads, T, head_dim].

- `golden` runs the explicit ops in float32 (matmul in float64 NumPy): the reference values.
- `fused` and `explicit` run the ops in the case's dtype through `Ops(kernels=...)`, exactly
  as model.py calls them: `vectors run DIR --engine mlx_tinyllama.vectors.engine:fused`;
  `fp16_pure` runs them under the fp16-pure precision policy (RMSNorm's x² in the model dtype).
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np

from ..ops import Ops, Rope, mask_value

MX_DTYPES = {"float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16}


def _mx(a, dtype) -> mx.array:
    arr = mx.array(np.asarray(a))
    return arr if arr.dtype in (mx.int32, mx.int64, mx.uint32) else arr.astype(dtype)


def query_mask(ops: Ops, T: int, S: int, offset: int, dtype) -> mx.array | None:
    """Additive [T, S] mask for queries at positions offset..offset+T-1 over keys 0..S-1.
    offset == S - T is the model's mask (ops.causal_mask); other offsets are the
    misplaced masks the checker tries when it names a failure."""
    width = offset + T
    mask = ops.causal_mask(T, width, dtype)
    if mask is None:
        mask = mx.zeros((T, width), dtype)
    if width >= S:
        return mask[:, :S]
    pad = mx.full((T, S - width), mask_value(dtype), dtype)  # keys after every query: masked
    return mx.concatenate([mask, pad], axis=1)


def _scores(ops: Ops, q, k, params, masked: bool = True) -> mx.array:
    """Scaled, masked scores [1, H, T, S] the way model.Attention.probs computes them."""
    T, S = q.shape[2], k.shape[2]
    s = ops.scale(ops.qk(q, k), params["scale"])
    offset = params.get("offset", S - T)
    if not masked:
        return s
    if offset == S - T:
        return ops.add_mask(s, T, S)
    return s + query_mask(ops, T, S, offset, s.dtype)


def run_op(ops: Ops, op: str, inputs: dict, params: dict, dtype) -> mx.array:
    """One op of the forward pass on `inputs` in `dtype`, computed by `ops`; evaluated."""
    a = {role: _mx(v, dtype) for role, v in inputs.items()}
    if op == "matmul":
        out = a["x"] @ a["w"].T  # nn.Linear: w is [out, in]
    elif op == "rms_norm":
        out = ops.rms_norm(a["x"], a["weight"], params["eps"])
    elif op == "rope":
        llama3 = params.get("llama3")
        rope = Rope.make(params["head_dim"], params["theta"], params.get("position_scale", 1.0),
                         tuple(llama3) if llama3 else None)
        out = ops.rope(a["x"][None], params["offset"], rope)[0]
    elif op == "scores":
        out = _scores(ops, a["q"][None], a["k"][None], params, params.get("masked", True))[0]
    elif op == "softmax":
        out = ops.softmax(a["x"], dtype)
    elif op == "sdpa":
        q, k, v = a["q"][None], a["k"][None], a["v"][None]
        T, S = q.shape[2], k.shape[2]
        if ops.fused and params.get("offset", S - T) == S - T and params.get("masked", True):
            out = ops.fused_attention(q, k, v, params["scale"])[0]
        else:
            probs = ops.softmax(_scores(ops, q, k, params, params.get("masked", True)), dtype)
            out = ops.pv(probs, v)[0]
    elif op == "silu":
        out = ops.silu(a["x"])
    elif op == "swiglu":
        out = ops.swiglu(a["gate"], a["up"])
    elif op == "add":
        out = a["a"] + a["b"]
    elif op == "embedding":
        out = a["table"][a["ids"]]
    else:
        raise NotImplementedError(f"op {op!r}")
    mx.eval(out)
    return out


_GOLDEN_OPS = Ops("hf", "explicit")


def golden(op: str, inputs: dict, params: dict) -> np.ndarray:
    """The reference output in float32: explicit ops in float32 on the (already rounded) inputs;
    matmul as one float64 product (the most exact value, cheap in BLAS)."""
    if op == "matmul":
        x, w = np.asarray(inputs["x"], np.float64), np.asarray(inputs["w"], np.float64)
        return (x @ w.T).astype(np.float32)
    return np.array(run_op(_GOLDEN_OPS, op, inputs, params, mx.float32))


def _engine(policy: str, kernels: str):
    ops = Ops(policy, kernels)

    def engine(op: str, inputs: dict, params: dict) -> mx.array:
        return run_op(ops, op, inputs, params, MX_DTYPES[params["dtype"]])

    engine.__doc__ = f"The project's ops, policy {policy!r}, kernels {kernels!r}, in the case's dtype."
    return engine


fused = _engine("hf", "fused")
explicit = _engine("hf", "explicit")
fp16_pure = _engine("fp16-pure", "explicit")  # every op in the model dtype, as a naive engine (ops.py)
