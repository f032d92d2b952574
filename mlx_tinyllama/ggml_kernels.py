"""Which of ggml-cpu's kernels computed a stage in a llama.cpp log, so a hint names the code to
read and not only the stage (issue 22).

A pattern says "the q_proj matmul never computes rows 36-38"; on llama.cpp that matmul is one of
several kernels, chosen per weight at load time and per call by its shapes (read in the
llama-cpp-python 0.3.36 sdist's ggml-cpu, docs/llamacpp.md "Kernel faults"):

- an f16 weight in the AMX extra buffer (the default on a CPU with AMX, when the weight's shape
  passes amx.cpp's supports_op): `ggml_backend_amx_mul_mat` in `amx/mmq.cpp`, f32 activations,
  token rows in blocks of 4 and outputs in blocks of 6;
- any other f16 weight (`-nr`, or a shape the AMX buffer refuses): ggml_compute_forward_mul_mat
  (`ggml-cpu.c`) copies the activations to f16 and tinyBLAS (`llamafile/sgemm.cpp`) takes the
  matmul when it has 2+ token rows, K % 16 == 0 and outputs % 4 == 0; otherwise `ggml_vec_dot_f16`;
- an f32 weight: tinyBLAS on the f32 activations themselves;
- flash attention: `ggml_compute_forward_flash_attn_ext_tiled` (64-row query tiles, 64-key KV
  tiles, online softmax across KV tiles) from 64 query rows on with an f16/f32 KV cache, else
  `ggml_compute_forward_flash_attn_ext_f16_one_chunk` (one key at a time, Q·K by the cache type's
  vec_dot: `ggml_vec_dot_f16` for an f16 cache) in `ops.cpp`.

Only x86 logs are named (system_info lists AVX): ARM and other backends dispatch otherwise. A
matmul is named only from a -v log (the loader's weight types and buffers) of f32/f16 weights;
without -v, or with quantized weights, nothing is said.
"""

from __future__ import annotations

from .emulation import AMX_K_ALIGN_F16, AMX_N_ALIGN
from .refs.side import SHORTCUT_TAPS
from .stages import stage_of

FA_TILE_Q = 64  # GGML_FA_TILE_Q (ggml-cpu/common.h): the tiled flash attention kernel's minimum query rows
TINYBLAS_KN = 16  # tinyBLAS's f16/f32 vector width on AVX512 (K must be a multiple of it)

AMX_BLOCK_M = 4  # ggml_backend_amx_mul_mat's f16 path: token rows per block (BLOCK_M), outputs per block 6
AMX_F16 = ("the AMX buffer's f16 matmul (ggml-cpu/amx/mmq.cpp, ggml_backend_amx_mul_mat: f32 activations, token "
           "rows in blocks of 4, outputs in blocks of 6)")
TINYBLAS_F16 = ("tinyBLAS's f16 tiles (ggml-cpu/llamafile/sgemm.cpp) on the f16 copy of the activations that "
                "ggml_compute_forward_mul_mat (ggml-cpu.c) makes, with its row stride")
VEC_DOT_F16 = "ggml_vec_dot_f16 (ggml-cpu/vec.cpp, from ggml_compute_forward_mul_mat_one_chunk in ggml-cpu.c)"
TINYBLAS_F32 = "tinyBLAS's f32 tiles (ggml-cpu/llamafile/sgemm.cpp)"
FA_TILED = ("the tiled flash attention kernel (ggml-cpu/ops.cpp, ggml_compute_forward_flash_attn_ext_tiled: 64-row "
            "query tiles, 64-key KV tiles, an online softmax carried across KV tiles)")
FA_ONE_CHUNK = ("the one-chunk flash attention kernel (ggml-cpu/ops.cpp, ggml_compute_forward_flash_attn_ext_f16_one_chunk: "
                "one key at a time, Q·K by the K cache type's vec_dot (ggml_vec_dot_f16 in ggml-cpu/vec.cpp for an "
                "f16 cache), an online softmax with an f16 accumulator)")


def _weight_shape(weight: str, cfg: dict) -> tuple[int, int] | None:
    """[out, in] of a stage's weight ("self_attn.q_proj", "mlp.down_proj", "lm_head")."""
    h, heads = int(cfg["hidden_size"]), int(cfg["num_attention_heads"])
    d = int(cfg.get("head_dim") or h // heads)
    kv = int(cfg.get("num_key_value_heads") or heads)
    inter = int(cfg.get("intermediate_size", 0))
    return {"q_proj": (heads * d, h), "k_proj": (kv * d, h), "v_proj": (kv * d, h), "o_proj": (h, heads * d),
            "gate_proj": (inter, h), "up_proj": (inter, h), "down_proj": (h, inter),
            "lm_head": (int(cfg.get("vocab_size", 0)), h)}.get(weight.split(".")[-1])


def _f16_plain(out_features: int, in_features: int, n_tokens: int) -> str:
    if n_tokens >= 2 and in_features % TINYBLAS_KN == 0 and out_features % 4 == 0:
        return TINYBLAS_F16
    return VEC_DOT_F16


def kernel_of(tap: str, engine: dict, cfg: dict) -> str | None:
    """The ggml-cpu kernel that computed `tap` in the llama.cpp run `engine` describes
    (refs.llamacpp.LogInfo.as_dict()), as a clause for a hint, or None when the log cannot tell."""
    if tap in SHORTCUT_TAPS or "AVX" not in (engine.get("system_info") or ""):
        return None
    stage = stage_of(tap)
    n_tokens = len(engine.get("ids") or [])
    if stage.op == "pv" and engine.get("flash_attn") and n_tokens:
        if n_tokens >= FA_TILE_Q and engine.get("kv_cache") in ("f16", "f32"):
            return (f"llama.cpp ran it in {FA_TILED}: {n_tokens} query rows, so rows 0-{FA_TILE_Q - 1} see one KV tile "
                    f"and every later row {FA_TILE_Q} keys or more")
        return f"llama.cpp ran it in {FA_ONE_CHUNK} ({n_tokens} query rows)"
    if stage.op not in ("linear", "heads") or not stage.weight:
        return None
    shape = _weight_shape(stage.weight, cfg)
    types = set(engine.get("weight_types") or [])
    buffers = engine.get("model_buffers") or []
    if shape is None or not types or not buffers or not types <= {"f32", "f16"}:
        return None  # no -v (types and buffers unknown), or quantized weights: not named
    out_features, in_features = shape
    if "f16" not in types:
        return f"llama.cpp ran it in {TINYBLAS_F32}" if n_tokens >= 2 else None
    plain = _f16_plain(out_features, in_features, n_tokens)
    if "AMX" not in buffers:  # -nr, or a CPU without AMX
        return f"llama.cpp ran it in {plain}"
    if out_features % AMX_N_ALIGN or in_features % AMX_K_ALIGN_F16:
        return f"llama.cpp ran it in {plain} (the AMX buffer does not take this weight's shape)"
    tail = n_tokens % AMX_BLOCK_M
    last = (f", the last partial block: token rows {n_tokens - tail}-{n_tokens - 1}" if tail and n_tokens > tail
            else "")
    return f"llama.cpp ran it in {AMX_F16}{last}"
