"""llama.cpp `llama-eval-callback` logs: a log written here from known tensors, in llama.cpp's
layout (ggml's reversed dims, GGUF-permuted Q/K rows, only the last token after the last
layer, "%12.4f" values, first/last 3 per dimension), parses and compares correctly."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import SEED_IDS
from mlx_tinyllama import refs as R
from mlx_tinyllama import sources
from mlx_tinyllama.compare import compare, run_side
from mlx_tinyllama.errors import UserError
from mlx_tinyllama.tolerances import Tolerances


def ggml_block(name: str, op: str, x: np.ndarray, type_: str = "f32") -> str:
    """One tensor as llama.cpp prints it: x is in numpy order (ggml ne reversed)."""
    ne = list(reversed(x.shape)) + [1] * (4 - x.ndim)
    x4 = x.reshape(ne[3], ne[2], ne[1], ne[0])
    shape = ", ".join(map(str, ne))
    lines = [f"ggml_debug: {name:>24} = ({type_}) {op:>10}(src0{{{shape}}}, }}) = {{{shape}}}"]

    def idx(n):
        return list(range(n)) if n <= 6 else [0, 1, 2, None, n - 3, n - 2, n - 1]

    for i3 in range(ne[3]):
        lines.append("    [")
        for i2 in idx(ne[2]):
            if i2 is None:
                lines.append("        ..., ")
                continue
            lines.append("        [")
            for i1 in idx(ne[1]):
                if i1 is None:
                    lines.append("            ..., ")
                    continue
                vals = ["   ..., " if i0 is None else f"{x4[i3, i2, i1, i0]:12.4f}" for i0 in idx(ne[0])]
                lines.append("            [" + ", ".join(v.strip(", ") if v.strip() == "...," else v for v in vals)
                             .replace("..., ,", "...,") + "  ],")
            lines.append("        ],")
        lines.append("    ]")
        # ggml's debug callback: a float32 running sum in memory order (common/debug.cpp)
        lines.append(f"    sum = {float(np.cumsum(x4[i3].ravel(), dtype=np.float32)[-1]):f}")
    return "\n".join(lines)


def to_gguf(q: np.ndarray) -> np.ndarray:
    """HF rotate-half rows -> GGUF interleaved pairs, per head (convert_hf_to_gguf's permute)."""
    H, T, D = q.shape
    return q.reshape(H, T, 2, D // 2).swapaxes(-1, -2).reshape(H, T, D)


def llamacpp_log(t: dict, n_layers: int, permute: bool = True, perturb: str | None = None,
                 middle_row: str | None = None) -> str:
    """The eval-callback log of a llama.cpp run whose tensors equal `t` (canonical taps).
    `perturb` "NAME-i/OP": one printed value wrong; `middle_row` "NAME-i/OP": token row 20 (never
    printed) computed in bfloat16, as a remainder path of another precision would."""
    perm = to_gguf if permute else (lambda a: a)
    heads_t = lambda a: a.transpose(1, 0, 2)  # noqa: E731  [H, T, D] -> ggml {D, H, T} printed as [T, H, D]
    out = [ggml_block("inp_embd", "GET_ROWS", t["embed"])]
    for i in range(n_layers):
        p = f"layers.{i}."
        last = i == n_layers - 1
        tail = (lambda a: a[-1:]) if last else (lambda a: a)  # llama.cpp keeps the output rows only
        q, k = heads_t(perm(t[p + "attn.q"])), heads_t(perm(t[p + "attn.k"]))
        blocks = [
            ("norm", "RMS_NORM", t[p + "attn_norm"] * 0.5), (f"attn_norm", "MUL", t[p + "attn_norm"]),
            ("Qcur", "MUL_MAT", q.reshape(q.shape[0], -1)), ("Kcur", "MUL_MAT", k.reshape(k.shape[0], -1)),
            ("Vcur", "MUL_MAT", heads_t(t[p + "attn.v"]).reshape(q.shape[0], -1)),
            ("Qcur", "ROPE", heads_t(perm(t[p + "attn.q_rope"]))), ("Kcur", "ROPE", heads_t(perm(t[p + "attn.k_rope"]))),
            ("Vcur", "RESHAPE", heads_t(t[p + "attn.v"])),
            ("kq", "MUL_MAT", t[p + "attn.scores"]), ("kq_soft_max", "SOFT_MAX", t[p + "attn.probs"]),
            ("kqv_out", "CONT", t[p + "attn.context"]), ("attn_out", "MUL_MAT", t[p + "attn.out"]),
            ("ffn_inp", "ADD", tail(t[p + "resid_mid"])), ("ffn_norm", "MUL", tail(t[p + "mlp_norm"])),
            ("ffn_up", "MUL_MAT", tail(t[p + "mlp.up"])), ("ffn_gate", "MUL_MAT", tail(t[p + "mlp.gate"])),
            ("ffn_swiglu", "SWIGLU", tail(t[p + "mlp.prod"])), ("ffn_out", "MUL_MAT", tail(t[p + "mlp.down"])),
            ("ffn_out", "ADD", tail(t[p + "out"])), ("l_out", "ADD", tail(t[p + "out"])),
        ]
        for name, op, x in blocks:
            x = np.array(x, np.float32)
            if perturb == f"{name}-{i}/{op}":
                x.flat[1] += 1.0 + 2 * np.abs(x).max()
            if middle_row == f"{name}-{i}/{op}":
                bits = x[20].view(np.uint32)
                x[20] = ((bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000).view(np.float32)  # to bf16, nearest even
            out.append(ggml_block(f"{name}-{i}", op, x))
    out.append(ggml_block("result_norm", "MUL", t["final_norm"][-1:]))
    out.append(ggml_block("result_output", "MUL_MAT", t["logits"][-1:]))
    return "\n".join(["llama_model_loader: loaded meta data ...", *out, "llama_perf_context_print: done"]) + "\n"


@pytest.fixture(scope="module")
def run():
    lm = sources.load("synthetic:tiny", "float32")
    return run_side(lm, SEED_IDS), lm.config.as_dict()


def _compare(text, tmp_path, run, layout=None):
    side, cfg = run
    path = tmp_path / "eval.log"
    path.write_text(text)
    return compare(R.load(path, layout=layout)[0], [side], Tolerances(), cfg, len(SEED_IDS))


def test_log_parses_into_the_printed_values(run):
    side, cfg = run
    tensors = R.parse_llamacpp_tensors(llamacpp_log(side.tensors, 2))
    names = [(t.name, t.op) for t in tensors]
    assert names[:3] == [("inp_embd", "GET_ROWS"), ("norm-0", "RMS_NORM"), ("attn_norm-0", "MUL")]
    emb = tensors[0]
    assert emb.values.shape == (38, 64) and emb.known.sum() == 36  # 6 rows x 6 columns printed
    np.testing.assert_allclose(emb.values[emb.known].reshape(6, 6)[0, :3], side.tensors["embed"][0, :3], atol=5e-5)
    assert emb.sum == pytest.approx(float(side.tensors["embed"].sum()), abs=1e-5)
    assert R.llamacpp_tap("Qcur-0", "ROPE", 1, 2) == "layers.0.attn.q_rope"
    assert R.llamacpp_tap("ffn_out-1", "ADD", 1, 2) == "layers.1.out"


def test_log_of_a_correct_run_matches_every_mapped_stage(run, tmp_path):
    result = _compare(llamacpp_log(run[0].tensors, 2), tmp_path, run)
    assert result["status"] == "match", result["first_divergence"]
    stages = {s["tap"] for s in result["stages"]}
    assert {"embed", "layers.0.attn.q", "layers.0.attn.k_rope", "layers.0.attn.probs", "layers.1.out",
            "final_norm", "logits"} <= stages
    assert any(n["key"].startswith("norm-0") for n in result["not_compared"])


@pytest.mark.parametrize("which,tap", [("Kcur-0/MUL_MAT", "layers.0.attn.k"), ("Qcur-1/ROPE", "layers.1.attn.q_rope"),
                                       ("kq_soft_max-0/SOFT_MAX", "layers.0.attn.probs"),
                                       ("ffn_out-1/ADD", "layers.1.out")])
def test_one_wrong_printed_value_names_its_stage(run, tmp_path, which, tap):
    result = _compare(llamacpp_log(run[0].tensors, 2, perturb=which), tmp_path, run)
    assert result["first_divergence"]["tap"] == tap


def test_qk_permutation_matters(run, tmp_path):
    # an HF-layout log read as GGUF layout: Q is "wrong" at once
    result = _compare(llamacpp_log(run[0].tensors, 2, permute=False), tmp_path, run)
    assert result["first_divergence"]["tap"] == "layers.0.attn.q"
    result = _compare(llamacpp_log(run[0].tensors, 2, permute=False), tmp_path, run, layout="hf")
    assert result["status"] == "match"


def test_truncated_log_is_refused(run, tmp_path):
    text = llamacpp_log(run[0].tensors, 2)
    cut = "\n".join(line for k, line in enumerate(text.splitlines()) if k != 4)  # drop one printed row
    with pytest.raises(UserError, match="truncated or edited"):
        R.parse_llamacpp_tensors(cut)
    with pytest.raises(UserError, match="no 'NAME = \\(type\\) OP"):
        R.parse_llamacpp_log("ggml_debug but nothing else\n")


def test_fused_softmax_hint_names_scale_mask_and_softmax(run, tmp_path):
    # llama.cpp's kq_soft_max is scale + mask + softmax in one op: all three are candidates
    result = _compare(llamacpp_log(run[0].tensors, 2, perturb="kq_soft_max-0/SOFT_MAX"), tmp_path, run)
    hint = result["first_divergence"]["hint"]
    assert result["first_divergence"]["tap"] == "layers.0.attn.probs"
    assert all(w in hint for w in ("scale", "mask", "softmax")) and "RoPE on K" not in hint


@pytest.mark.parametrize("which,tap", [("attn_norm-0/MUL", "layers.0.attn_norm"), ("ffn_inp-0/ADD", "layers.0.resid_mid")])
def test_a_middle_row_off_by_a_rounding_is_caught_by_the_printed_sum_alone(run, tmp_path, which, tap):
    # Token row 20 is never printed (first and last 3 rows): only the sum sees it. Its bfloat16
    # rounding moves the sum by about sqrt(64) * rms * 2^-9, above the sum's own rounding
    # (sum_err) but far below what sum|x| allowed: the old rule passed it.
    result = _compare(llamacpp_log(run[0].tensors, 2, middle_row=which), tmp_path, run)
    div = result["first_divergence"]
    assert result["status"] == "diverged" and div["tap"] == tap, div
    entries = {e["metric"]: e for e in result["entries"] if e["tap"] == tap}
    assert entries["rel_rms"]["ok"] and not entries["sum_err"]["ok"]
    d = entries["sum_err"]["details"]
    assert entries["sum_err"]["value"] / entries["sum_err"]["tolerance"] >= 2  # measured 2.4 and 2.3
    assert d["max_abs"] < d["tolerance_abs_by_sum_abs"]  # under sum|x| this passed
    assert div["pattern"]["name"] == "unprinted" and div["hint"].startswith("the printed values match, the printed sum")


def test_clean_synthetic_log_sums_are_within_their_own_rounding(run, tmp_path):
    # the other way: the same writer without the fault, every printed sum (ggml's running sum) passes
    result = _compare(llamacpp_log(run[0].tensors, 2), tmp_path, run)
    sums = [e for e in result["entries"] if e["metric"] == "sum_err"]
    assert result["status"] == "match" and len(sums) >= 30
    assert max(e["value"] / e["tolerance"] for e in sums) < 0.5


# --- Q/K permutation and head order from what a log prints (first/last 3 per axis, and the sum) -------


def _sum_moved(text: str, block: str, by: float) -> str:
    """The log with the printed sum of the block named `block` moved by `by`."""
    lines, at = text.splitlines(), None
    for k, line in enumerate(lines):
        if f" {block} = " in line:
            at = k
        elif at is not None and line.strip().startswith("sum = "):
            lines[k] = f"    sum = {float(line.split('=')[1]) + by:f}"
            break
    return "\n".join(lines) + "\n"


def _heads_reversed(tensors: dict, tap: str, n_heads: int) -> dict:
    t = dict(tensors)
    x = np.asarray(t[tap])
    t[tap] = x.reshape(x.shape[0], n_heads, -1)[:, ::-1].reshape(x.shape)
    return t


def test_q_written_without_the_permutation_is_named_from_the_printed_corners(run, tmp_path):
    # a GGUF written without the Q/K permutation, read in llama's (permuted) order: the printed values
    # are ours at the positions permute_qk moves them to, and the printed sum (order-free) matches
    result = _compare(llamacpp_log(run[0].tensors, 2, permute=False), tmp_path, run)
    div = result["first_divergence"]
    assert div["tap"] == "layers.0.attn.q"
    assert div["printed_reordering"]["kind"] == "qk_permutation" and div["printed_reordering"]["reordered"]
    assert div["qk_permutation"]["fixed_by"] == "gguf.permute_qk"
    assert div["hint"].startswith("the printed values are the reference's at permuted positions and the printed sum "
                                  "matches: the Q rows are permuted within heads: each printed value"), div["hint"]


def test_a_wrong_printed_q_value_is_not_called_a_permutation(run, tmp_path):
    # the other way: one printed Q value wrong is no reordering (no map fits), and a clean log says nothing
    result = _compare(llamacpp_log(run[0].tensors, 2, perturb="Qcur-0/MUL_MAT"), tmp_path, run)
    div = result["first_divergence"]
    assert div["tap"] == "layers.0.attn.q" and div["printed_reordering"]["fits"] == []
    assert not div["printed_reordering"]["reordered"] and "permuted" not in div["hint"]
    clean = _compare(llamacpp_log(run[0].tensors, 2), tmp_path, run)
    assert clean["status"] == "match" and not [e for e in clean["entries"] if "printed_reordering" in e["details"]]


def test_heads_merged_in_another_order_are_named_from_the_printed_heads(run, tmp_path):
    # merged heads [T, H*D] (kqv_out) in reversed order: printed heads 0 and 3 hold the reference's 3 and 0
    t = _heads_reversed(run[0].tensors, "layers.0.attn.context", run[1]["num_attention_heads"])
    result = _compare(llamacpp_log(t, 2), tmp_path, run)
    div = result["first_divergence"]
    assert div["tap"] == "layers.0.attn.context"
    assert div["printed_reordering"]["holds"] == {"0": 3, "3": 0} or div["printed_reordering"]["holds"] == {0: 3, 3: 0}
    assert div["hint"].startswith("the heads are in another order: printed head 0 holds the reference's head 3, "
                                  "printed head 3 holds the reference's head 0, and the printed sum matches")


def test_a_reordering_whose_sum_moved_is_not_decidable_from_the_printed_values(run, tmp_path):
    # the same printed values, but the printed sum moved: a reordering keeps the sum, so it is not said
    t = _heads_reversed(run[0].tensors, "layers.0.attn.context", run[1]["num_attention_heads"])
    result = _compare(_sum_moved(llamacpp_log(t, 2), "kqv_out-0", 5.0), tmp_path, run)
    div = result["first_divergence"]
    assert div["tap"] == "layers.0.attn.context" and not div["printed_reordering"]["reordered"]
    assert "head order: not decidable from the printed values" in div["hint"]
    assert "the printed sum differs" in div["hint"] and not div["hint"].startswith("the heads are in another order")
    result = _compare(_sum_moved(llamacpp_log(run[0].tensors, 2, permute=False), "Qcur-0", 5.0), tmp_path, run)
    assert "Q/K row permutation within heads: not decidable from the printed values" in \
        result["first_divergence"]["hint"]
