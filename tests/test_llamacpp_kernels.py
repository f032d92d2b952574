"""The llama.cpp kernels an f16 GGUF runs at the defaults, faulted and named (issue 22;
tests/fixtures/llamacpp/PROVENANCE.md says which kernel computes what on the AMX CPU):

- the AMX buffer's f16 matmul (`amx/mmq.cpp`), at the true defaults;
- tinyBLAS's f16 tiles fed by ggml_compute_forward_mul_mat's f16 copy of the activations, with -nr;
- the tiled flash attention kernel (`ops.cpp`), from 64 query rows on (the long prompt);
- `ggml_vec_dot_f16` (`vec.cpp`), which no prefill matmul reaches here: the one-chunk flash
  attention's Q·K (under 64 query rows) is where it runs.

Both ways: each fault's log diverges at its stage with the pattern and the kernel in the hint's
first sentence, and the clean logs of the same paths match with no pattern anywhere. The two
mechanisms added for them (the row-stride shape, the name of the ggml-cpu kernel) are also checked
on arrays and log facts of other stages, ratios and paths than the fixtures'."""

from __future__ import annotations

import json
import lzma

import numpy as np
import pytest
from conftest import REPO

from mlx_tinyllama import trace
from mlx_tinyllama.errorshape import explain, printed_pattern
from mlx_tinyllama.gguf_write import convert
from mlx_tinyllama.ggml_kernels import kernel_of

FIXTURES = REPO / "tests" / "fixtures" / "llamacpp"
CASES = json.loads((FIXTURES / "cases.json").read_text())["cases"]

# fault -> (stage, pattern, the words the hint leads with, the ggml-cpu code its first sentence names)
F16_KERNEL_FAULTS = {
    # M / 4 blocks instead of div_up(M, 4): rows 36-38 (the last partial block) never computed, left zero;
    # the printed rows 36-38 are exactly those, and the kernel clause says where that block starts
    "amx_f16_last_block_skipped": ("layers.0.attn.q", "rows_zero_from",
                                   "the printed token rows up to 2 match, the printed rows from 36 on are zero",
                                   "ggml-cpu/amx/mmq.cpp, ggml_backend_amx_mul_mat"),
    # -nr: tinyBLAS reads the f16 activation copy at the f32 row stride: row 2j holds row j, odd rows straddle
    # two; printed row 36 reads row 18, the same chat-template tokens: right by coincidence, and fitting
    "mulmat_f16_row_stride": ("layers.0.attn.q", "row_stride",
                              "printed token row 0 matches, rows 2, 38 hold the reference's rows 1, 19 (row r holds "
                              "row r*1/2), rows 1, 37 hold no row",
                              "tinyBLAS's f16 tiles (ggml-cpu/llamafile/sgemm.cpp)"),
    # the tiled kernel (366 query rows) without the rescale across KV tiles: rows 0-63 see one KV tile only
    "fa_tiled_no_rescale": ("layers.0.attn.context", "rows_wrong_from",
                            "the printed token rows up to 2 match, the printed rows from 363 on are wrong",
                            "ggml_compute_forward_flash_attn_ext_tiled"),
    # ggml_vec_dot_f16 without its leftover loop: head_dim 32 is all tail (the AVX512 step is 64), so every
    # score of the one-chunk flash attention is 0: uniform weights, right for row 0 (one key) only
    "vec_dot_f16_tail_dropped": ("layers.0.attn.context", "all_rows_but_first",
                                 "printed token row 0 matches, every later printed token row differs: query row 0 "
                                 "sees one key only",
                                 "ggml_vec_dot_f16 in ggml-cpu/vec.cpp"),
}


@pytest.fixture(scope="module")
def f16_gguf(small_dir, tmp_path_factory):
    path = tmp_path_factory.mktemp("kernels_gguf") / "small-f16.gguf"
    convert(small_dir, path, out_type="f16")
    return path


def compare_log(case: str, gguf, tmp_path) -> tuple[int, dict]:
    log, out = tmp_path / f"{case}.log", tmp_path / f"{case}.json"
    log.write_bytes(lzma.decompress((FIXTURES / CASES[case]["log"]).read_bytes()))
    rc = trace.main(["compare", "--against", str(log), "--model", str(gguf), "--json", str(out)])
    return rc, json.loads(out.read_text())


def first_sentence(hint: str, pattern: dict) -> str:
    """The pattern's own sentence (words: cause; next step), which leads the hint."""
    sentence = f"{pattern['words']}: {pattern['cause']}; {pattern['next_step']}"
    assert hint.startswith(sentence), hint
    return sentence


@pytest.mark.parametrize("fault", sorted(F16_KERNEL_FAULTS))
def test_each_f16_kernel_fault_is_found_with_its_pattern_and_its_kernel(fault, f16_gguf, tmp_path):
    tap, name, words, kernel = F16_KERNEL_FAULTS[fault]
    case = f"fault_{fault}"
    assert CASES[case]["gguf_outtype"] == "f16" and "-v" in CASES[case]["settings"]
    rc, result = compare_log(case, f16_gguf, tmp_path)
    div = result["first_divergence"]
    assert rc == 1 and div["tap"] == tap, div
    assert div["error"]["ratio"] >= 10, div["error"]
    assert div["pattern"]["name"] == name and div["hint"].startswith(words), div["hint"]
    assert kernel in first_sentence(div["hint"], div["pattern"])


def test_the_stride_fault_says_what_each_row_read(f16_gguf, tmp_path):
    _, result = compare_log("fault_mulmat_f16_row_stride", f16_gguf, tmp_path)
    ev = result["first_divergence"]["pattern"]["evidence"]
    assert ev["stride_ratio"] == "1/2" and ev["row_holds"] == {"2": 1, "38": 19} and ev["straddling_rows"] == [1, 37]


def test_the_amx_fault_names_its_last_block_the_tiled_fault_the_kv_tile_the_tail_the_dot(f16_gguf, tmp_path):
    _, result = compare_log("fault_amx_f16_last_block_skipped", f16_gguf, tmp_path)
    assert "the last partial block: token rows 36-38" in result["first_divergence"]["hint"]
    _, result = compare_log("fault_fa_tiled_no_rescale", f16_gguf, tmp_path)
    sentence = first_sentence(result["first_divergence"]["hint"], result["first_divergence"]["pattern"])
    assert "online softmax that does not rescale" in sentence and "rows 0-63 see one KV tile" in sentence
    assert "M (row) loop" not in sentence  # the matmul's advice, wrong for attention
    _, result = compare_log("fault_vec_dot_f16_tail_dropped", f16_gguf, tmp_path)
    sentence = first_sentence(result["first_divergence"]["hint"], result["first_divergence"]["pattern"])
    assert "Q·K dot product that drops part of head_dim" in sentence  # not only the softmax


@pytest.mark.parametrize("case", ["amx_default_long_verbose", "amx_default_short_verbose", "amx_nr_short_verbose"])
def test_the_clean_logs_of_the_same_kernels_match_with_no_pattern(case, f16_gguf, tmp_path):
    # the tiled flash attention path (366 query rows) with the AMX matmul; the AMX path; the -nr path
    rc, result = compare_log(case, f16_gguf, tmp_path)
    assert rc == 0 and result["status"] == "match", result["first_divergence"]
    assert max(e["value"] / e["tolerance"] for e in result["entries"] if e["tolerance"] > 0) < 0.75
    assert not [e for e in result["entries"] if e["details"].get("pattern")]


# --- the row-stride shape, on arrays of other stages and ratios than the fixture's ---------------------

RNG = np.random.default_rng(7)


def strided(b: np.ndarray, ratio: float) -> np.ndarray:
    """Row r read at row r*ratio of the flat [T, N] buffer (the straddling rows mix two rows)."""
    T, N = b.shape
    flat = np.concatenate([b.ravel(), RNG.standard_normal(T * N)])  # past the end: other memory
    return np.stack([flat[int(r * ratio * N): int(r * ratio * N) + N] for r in range(T)])


def test_a_full_tensor_read_at_half_the_row_stride_is_a_row_stride():
    b = RNG.standard_normal((40, 32))
    p = explain(strided(b, 0.5), b, token_axis=0, budget=1e-8, kernel="down_proj matmul")
    assert p.name == "row_stride" and p.evidence["stride_ratio"] == "1/2"
    assert p.words.startswith("token row 0 matches, rows 2, 4, 6") and "down_proj matmul" in p.cause
    assert p.evidence["straddling_rows"][:3] == [1, 3, 5]


def test_printed_rows_read_at_twice_the_row_stride_are_a_row_stride():
    b = RNG.standard_normal((40, 16))
    a = strided(b, 2.0)
    known = np.zeros(a.shape, bool)
    known[[0, 1, 2, 37, 38, 39]] = True
    p = printed_pattern("layers.0.mlp.gate", np.where(known, a, 0.0), b, known, 1e-4, 0.5e-4)
    assert p.name == "row_stride" and p.evidence["stride_ratio"] == "2" and p.evidence["row_holds"] == {1: 2, 2: 4}
    assert "gate_proj matmul" in p.cause


def test_no_stride_for_a_permutation_stale_rows_or_unrelated_values():
    b = RNG.standard_normal((40, 32))
    swapped = b[[0, 2, 1] + list(range(3, 40))]  # a move, not a stride
    assert explain(swapped, b, token_axis=0, budget=1e-8, kernel="k").name == "rows_moved"
    stale = b.copy()
    stale[32:] = b[:8]  # a tile buffer not reloaded
    assert explain(stale, b, token_axis=0, budget=1e-8, kernel="k").name != "row_stride"
    p = explain(RNG.standard_normal((40, 32)), b, token_axis=0, budget=1e-8, kernel="k")
    assert p is None, p


def test_rows_wrong_after_the_first_printed_ones_get_attention_advice_only_at_attention():
    b = RNG.standard_normal((40, 32))
    a = b.copy()
    a[20:] += 1.0  # wrong from an unseen row on
    known = np.zeros(a.shape, bool)
    known[[0, 1, 2, 37, 38, 39]] = True
    at_attention = printed_pattern("layers.0.attn.context", np.where(known, a, 0.0), b, known, 1e-4, 0.5e-4)
    at_matmul = printed_pattern("layers.0.mlp.down", np.where(known, a, 0.0), b, known, 1e-4, 0.5e-4)
    assert at_attention.name == at_matmul.name == "rows_wrong_from"
    assert "key block" in at_attention.cause and "rescale" in at_attention.next_step
    assert "key block" not in at_matmul.cause and "M (row) loop" in at_matmul.next_step


# --- which ggml-cpu kernel a log's facts say computed a stage ----------------------------------------

SMALL = {"hidden_size": 256, "num_attention_heads": 8, "num_key_value_heads": 2, "intermediate_size": 688,
         "vocab_size": 32000, "num_hidden_layers": 4}
X86 = "CPU : SSE3 = 1 | AVX = 1 | AVX2 = 1 | F16C = 1 | AVX512 = 1 | AMX_INT8 = 1 | LLAMAFILE = 1"


def engine(**kw) -> dict:
    base = {"system_info": X86, "ids": list(range(39)), "weight_types": ["f32", "f16"], "kv_cache": "f16",
            "flash_attn": True, "model_buffers": ["AMX", "CPU_Mapped"]}
    return dict(base, **kw)


def test_the_kernel_follows_the_buffer_the_shape_the_rows_and_the_log():
    assert "amx/mmq.cpp" in kernel_of("layers.1.attn.out", engine(), SMALL)
    # 688 outputs: no multiple of 32, so the AMX buffer refuses it and the plain path runs it
    gate = kernel_of("layers.0.mlp.gate", engine(), SMALL)
    assert "tinyBLAS's f16 tiles" in gate and "does not take this weight's shape" in gate
    assert "tinyBLAS's f16 tiles" in kernel_of("layers.0.attn.q", engine(model_buffers=["CPU_Mapped"]), SMALL)
    assert "ggml_vec_dot_f16" in kernel_of("layers.0.attn.q", engine(model_buffers=["CPU_Mapped"], ids=[1]), SMALL)
    assert "f32 tiles" in kernel_of("logits", engine(weight_types=["f32"], model_buffers=["CPU_Mapped"]), SMALL)
    assert "one_chunk" in kernel_of("layers.2.attn.context", engine(), SMALL)
    assert "_tiled" in kernel_of("layers.2.attn.context", engine(ids=list(range(64))), SMALL)
    assert "one_chunk" in kernel_of("layers.2.attn.context", engine(ids=list(range(64)), kv_cache="q8_0"), SMALL)
    # what the log cannot tell is not said: no -v, quantized weights, another CPU, a stage no kernel names
    assert kernel_of("layers.0.attn.q", engine(weight_types=[], model_buffers=[]), SMALL) is None
    assert kernel_of("layers.0.attn.q", engine(weight_types=["f32", "q8_0"]), SMALL) is None
    assert kernel_of("layers.0.attn.q", engine(system_info="CPU : NEON = 1 | ARM_FMA = 1"), SMALL) is None
    assert kernel_of("layers.0.attn_norm", engine(), SMALL) is None
