"""An independent kernel engine in NumPy for the vectors tests, with injectable faults.

Written from the manifest's one-line semantics only (no code shared with mlx_tinyllama):
compute in float32 (RoPE angles in float64), round each output to the case's dtype.
`make_engine(fault)` returns `engine(op, inputs, params)`; each fault is one mistake real
kernels make:

    drop_partial_tile    matmul in tiles of TILE rows; the last, partial tile is never written
    zero_rows_from_32    matmul rows >= 32 stay zero (the seed's symptom: a 32-row tile loaded once)
    fp16_accumulation    matmul sums its K products in fp16, one product at a time
    softmax_no_max       softmax as exp(x) / sum(exp(x)): no max subtraction
    rope_offset_by_one   RoPE at positions offset+1 ..
    decode_mask_at_zero  at T = 1 the causal mask is built for query position 0, not offset
    no_mask              no causal mask at all
    rope_sin_sign        RoPE rotates backwards (the sin term's sign flipped): right at position 0 only
    rope_pairs_interleaved  RoPE's output written in interleaved pair order (d0, d0+D/2, d1, ...): the
                         right values of each row in another order
    softmax_stale_tile   softmax in tiles of 32 rows; the last partial tile is not reloaded and keeps
                         the first tile's rows
    sdpa_kv_head_modulo  SDPA query head h reads KV head h % KV, not h // (H / KV)
    rms_norm_tail_columns  RMSNorm writes whole vectors of 96 columns only; the remainder stays zero
    scores_scale_by_d    the scores scaled by 1/head_dim, not by the case's scale (1/sqrt(head_dim))
"""

from __future__ import annotations

import numpy as np

TILE = 16
FAULTS = ("drop_partial_tile", "zero_rows_from_32", "fp16_accumulation", "softmax_no_max", "rope_offset_by_one",
          "decode_mask_at_zero", "no_mask", "rope_sin_sign", "rope_pairs_interleaved", "softmax_stale_tile",
          "sdpa_kv_head_modulo", "rms_norm_tail_columns", "scores_scale_by_d")
ROW_TILE, COLUMN_VECTOR = 32, 96


def round_to(x: np.ndarray, dtype: str) -> np.ndarray:
    """float32 values rounded to dtype; bfloat16 rounded to nearest even, held in float32."""
    x = np.asarray(x, np.float32)
    if dtype == "float16":
        return x.astype(np.float16)
    if dtype == "bfloat16":
        bits = x.view(np.uint32).astype(np.uint64)
        rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        return rounded.astype(np.uint32).view(np.float32)
    return x


def _f32(x) -> np.ndarray:
    return np.asarray(x, np.float32)


def kv_heads(H: int, KV: int, modulo: bool = False) -> np.ndarray:
    """The KV head each query head reads: h // (H/KV) (GQA), or the slip h % KV."""
    return np.arange(H) % KV if modulo else np.arange(H) // (H // KV)


def make_engine(fault: str | None = None):
    if fault is not None and fault not in FAULTS:
        raise ValueError(fault)

    def matmul(x, w, dtype):
        x, w = _f32(x), _f32(w)
        if fault == "fp16_accumulation":
            x16, w16 = x.astype(np.float16), w.astype(np.float16)
            acc = np.zeros((x.shape[0], w.shape[0]), np.float16)
            product = np.empty_like(acc)
            for k in range(x.shape[1]):  # each product and each partial sum rounded to fp16
                np.multiply.outer(x16[:, k], w16[:, k], out=product)
                np.add(acc, product, out=acc)
            return round_to(acc.astype(np.float32), dtype)
        y = x @ w.T
        if fault == "drop_partial_tile":
            y[(x.shape[0] // TILE) * TILE:] = 0.0
        if fault == "zero_rows_from_32":
            y[32:] = 0.0
        return round_to(y, dtype)

    def softmax(s):
        s = _f32(s)
        with np.errstate(over="ignore", invalid="ignore"):  # the no-max fault overflows on purpose
            e = np.exp(s) if fault == "softmax_no_max" else np.exp(s - s.max(axis=-1, keepdims=True))
            return e / e.sum(axis=-1, keepdims=True)

    def scores(q, k, params, dtype, kv=None):
        q, k = _f32(q), _f32(k)
        H, T, _ = q.shape
        KV, S, _ = k.shape
        kk = k[kv_heads(H, KV) if kv is None else kv]
        scale = 1.0 / q.shape[-1] if fault == "scores_scale_by_d" else params["scale"]
        s = np.einsum("htd,hsd->hts", q, kk) * np.float32(scale)
        query_pos = params["offset"] + np.arange(T)
        if fault == "decode_mask_at_zero" and T == 1:
            query_pos = np.zeros(1, int)
        if fault != "no_mask":
            s = np.where(np.arange(S)[None, :] > query_pos[:, None], -np.inf, s)
        return s

    def rope(x, params, dtype):
        x = _f32(x)
        D = x.shape[-1]
        offset = params["offset"] + (1 if fault == "rope_offset_by_one" else 0)
        inv_freq = 1.0 / params["theta"] ** (np.arange(0, D, 2, dtype=np.float64) / D)
        pos = (offset + np.arange(x.shape[1], dtype=np.float64)) * params.get("position_scale", 1.0)
        angle = np.concatenate([np.outer(pos, inv_freq)] * 2, axis=-1)
        rotated = np.concatenate([-x[..., D // 2:], x[..., :D // 2]], axis=-1)
        sin = np.sin(angle).astype(np.float32) * (-1 if fault == "rope_sin_sign" else 1)
        y = x * np.cos(angle).astype(np.float32) + rotated * sin
        if fault == "rope_pairs_interleaved":
            y = y[..., np.arange(D).reshape(2, D // 2).T.reshape(-1)]
        return round_to(y, dtype)

    def engine(op, inputs, params):
        dtype = params["dtype"]
        if op == "matmul":
            return matmul(inputs["x"], inputs["w"], dtype)
        if op == "rms_norm":
            x = _f32(inputs["x"])
            normed = x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + np.float32(params["eps"]))
            y = round_to(_f32(inputs["weight"]) * _f32(round_to(normed, dtype)), dtype)
            if fault == "rms_norm_tail_columns":
                y[:, (y.shape[-1] // COLUMN_VECTOR) * COLUMN_VECTOR:] = 0
            return y
        if op == "rope":
            return rope(inputs["x"], params, dtype)
        if op == "scores":
            return round_to(scores(inputs["q"], inputs["k"], params, dtype), dtype)
        if op == "softmax":
            p = softmax(inputs["x"])
            start = (p.shape[1] // ROW_TILE) * ROW_TILE  # rows along T, in tiles of ROW_TILE
            if fault == "softmax_stale_tile" and 0 < start < p.shape[1]:  # the buffer keeps tile 0's rows
                p[:, start:] = p[:, :p.shape[1] - start]
            return round_to(p, dtype)
        if op == "sdpa":
            kv = kv_heads(inputs["q"].shape[0], inputs["v"].shape[0], fault == "sdpa_kv_head_modulo")
            p = softmax(scores(inputs["q"], inputs["k"], params, dtype, kv))
            v = _f32(inputs["v"])[kv]
            return round_to(np.einsum("hts,hsd->htd", p, v), dtype)
        if op == "silu":
            x = _f32(inputs["x"])
            return round_to(x / (1.0 + np.exp(-x)), dtype)
        if op == "swiglu":
            g = _f32(inputs["gate"])
            return round_to(g / (1.0 + np.exp(-g)) * _f32(inputs["up"]), dtype)
        if op == "add":
            return round_to(_f32(inputs["a"]) + _f32(inputs["b"]), dtype)
        if op == "embedding":
            return np.asarray(inputs["table"])[np.asarray(inputs["ids"])]
        raise NotImplementedError(op)

    return engine


clean = make_engine()

# One module-level engine per fault, so `vectors run --engine tests/numpy_kernels.py:zero_rows_from_32` works.
drop_partial_tile = make_engine("drop_partial_tile")
zero_rows_from_32 = make_engine("zero_rows_from_32")
fp16_accumulation = make_engine("fp16_accumulation")
rope_sin_sign = make_engine("rope_sin_sign")
rope_pairs_interleaved = make_engine("rope_pairs_interleaved")
softmax_stale_tile = make_engine("softmax_stale_tile")
sdpa_kv_head_modulo = make_engine("sdpa_kv_head_modulo")
rms_norm_tail_columns = make_engine("rms_norm_tail_columns")
scores_scale_by_d = make_engine("scores_scale_by_d")
softmax_no_max = make_engine("softmax_no_max")
rope_offset_by_one = make_engine("rope_offset_by_one")
decode_mask_at_zero = make_engine("decode_mask_at_zero")
no_mask = make_engine("no_mask")
