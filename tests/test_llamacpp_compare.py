"""`compare` and `llamacpp` on real llama.cpp logs (tests/fixtures/llamacpp, PROVENANCE.md there):
a correct engine matches at fp32 and at llama.cpp's defaults (flash attention, f16 KV cache, f16
or q8_0 weights), short and long prompts, with fp32-tight tolerances because the reference
emulates llama.cpp's roundings; each patched fault is found at its stage, >= 10x over tolerance,
with a hint naming its cause; a token mismatch is exit 2, never a stage.

The reference runs on GGUFs written by gguf_write from the same synthetic seed: their tensors are
byte for byte those of llama.cpp's own converter (docs/llamacpp.md shows the check)."""

from __future__ import annotations

import json
import lzma
import os
import stat
import sys

import pytest
from conftest import REPO

from mlx_tinyllama import trace
from mlx_tinyllama.gguf_write import convert

FIXTURES = REPO / "tests" / "fixtures" / "llamacpp"
CASES = json.loads((FIXTURES / "cases.json").read_text())["cases"]

# fault -> (the stage it must be found at, a word the hint must hold: the fault's cause)
FAULTS = {
    "attn_scale": ("layers.0.attn.context", "scale"),
    "mask_off": ("layers.0.attn.context", "mask"),
    "rope_q_only": ("layers.0.attn.context", "RoPE on K"),
    "rope_theta": ("layers.0.attn.q_rope", "theta"),
    "rope_neox": ("layers.0.attn.q_rope", "rotate-half"),
    "norm_eps": ("layers.0.attn_norm", "eps"),
    "norm_weight_l1": ("layers.1.attn_norm", "weight"),
    "resid_attn_l2": ("layers.2.resid_mid", "residual"),
    "resid_ffn_dropped": ("layers.0.out", "residual"),
    "gate_up_swapped": ("layers.0.mlp.gate", "swapped"),
    "gelu": ("layers.0.mlp.prod", "GELU"),
    "v_from_k": ("layers.0.attn.v", "value projection"),
    # in ggml-cpu's flash attention kernel, made on the AMX CPU without -v (the wider tolerance)
    "gqa_broadcast": ("layers.0.attn.context", "KV-head mapping"),
}


# Kernel faults patched into ggml's CPU kernels (PROVENANCE.md: which kernel runs each): fault ->
# (stage, the pattern errorshape names on the printed corners and sums, the words the hint leads with).
KERNEL_FAULTS = {
    # tinyBLAS (llamafile sgemm), f32 GGUF: rows past 32 loaded as zeros; the printed rows show 0-2 right
    # and 36-38 zero, the printed sum places the boundary at 32 (the rows in between are never printed)
    "sgemm_rows_zero": ("layers.0.attn.q", "last_partial_tile", "token rows 0-31 match, rows 32-38 are zero (by the "
                                                                "printed sum"),
    # tinyBLAS's last (RN-1 = 5 row) block skipped: never written, its rows stay zero from 34 on
    "sgemm_last_tile_skipped": ("layers.0.attn.q", "rows_zero_from", "token rows 0-33 match, rows 34-38 are zero (by "
                                                                     "the printed sum"),
    # tinyBLAS reads activation row j % 32 for row j: rows 32-38 repeat rows 0-6, and at layer 0's q_proj
    # the printed rows 36-38 hold the same token ids as rows 4-6 (the chat template's "|>\n"): right by
    # coincidence. Only the printed sum (0.2 % off) sees it; the hint says where the error must lie.
    "sgemm_rows_wrap": ("layers.0.attn.q", "unprinted", "the printed values match, the printed sum does not: the "
                                                        "error lies in the values the log does not print"),
    # flash attention's one-chunk kernel (39 query rows < its 64-row tile), f16 GGUF at the defaults
    "fa_no_rescale": ("layers.0.attn.context", "all_rows_but_first", "printed token row 0 matches, every later "
                                                                     "printed token row differs: query row 0 sees one "
                                                                     "key only"),
    "rope_sin_sign": ("layers.0.attn.q_rope", "all_rows_but_first", "printed token row 0 matches, every later printed "
                                                                    "token row differs: position 0 is where RoPE"),
    "mask_off_by_one": ("layers.0.attn.context", "all_rows_but_last", "every printed token row but the last (38) "
                                                                      "differs: queries see keys after their own"),
    # flash attention's GQA broadcast h % n_kv (8 heads, 2 KV heads): the fused node's printed heads, read
    # per head from the merged [T, H*D], are wrong exactly where h % 2 and h // 4 differ
    "gqa_broadcast": ("layers.0.attn.context", "heads", "printed heads 1, 6 differ, printed heads 0, 2, 5, 7 match: "
                                                        "the GQA broadcast: query head h must read KV head h // 4"),
}


@pytest.fixture(scope="module")
def ggufs(small_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("llamacpp_gguf")
    files = {}
    for t in ("f32", "f16", "q8_0"):
        files[t] = out / f"small-{t}.gguf"
        convert(small_dir, files[t], out_type=t)
    return files


@pytest.fixture(scope="module")
def logs(tmp_path_factory):
    out = tmp_path_factory.mktemp("llamacpp_logs")

    def get(case: str):
        path = out / f"{case}.log"
        if not path.exists():
            path.write_bytes(lzma.decompress((FIXTURES / CASES[case]["log"]).read_bytes()))
        return path
    return get


def run_compare(tmp_path, *args) -> tuple[int, dict | None]:
    out = tmp_path / "result.json"
    rc = trace.main(["compare", *map(str, args), "--json", str(out)])
    return rc, (json.loads(out.read_text()) if out.exists() else None)


def worst_ratio(result: dict) -> float:
    return max(e["value"] / e["tolerance"] for e in result["entries"] if e["tolerance"] > 0)


@pytest.mark.parametrize("case", ["clean_fp32_short", "clean_fp32_long", "clean_default_short",
                                  "clean_default_long", "clean_q8_0_short", "amx_fp32_short"])
def test_correct_engine_matches_with_its_precision_emulated(case, ggufs, logs, tmp_path, capsys):
    rc, result = run_compare(tmp_path, "--against", logs(case), "--model", ggufs[CASES[case]["gguf_outtype"]])
    assert rc == 0, result["first_divergence"]
    # Well under: the print rounding (half the last printed digit) must not bring a correct engine near 1.
    assert result["status"] == "match" and worst_ratio(result) < 0.75
    compared = {e["tap"] for e in result["entries"]}
    assert {"embed", "layers.0.attn.q_rope", "layers.0.attn.k_rope", "layers.0.attn.context", "layers.3.out",
            "final_norm", "logits"} <= compared
    fp32 = CASES[case]["settings"].startswith("fp32")
    assert ("layers.0.attn.probs" in compared) == fp32  # flash attention prints no softmax
    reasons = {n["key"]: n["reason"] for n in result["not_compared"]}
    assert "RMSNorm before its weight" in reasons["norm-0 (RMS_NORM)"]
    assert all(r != "no canonical tap for this name" for r in reasons.values()), reasons
    err = capsys.readouterr().err
    assert ("flash attention on" in err) == (not fp32)
    # every printed sum is judged by its own rounding (sum_err), and a correct engine's are well within it
    sums = [e for e in result["entries"] if e["metric"] == "sum_err"]
    assert len(sums) >= 60 and max(e["value"] / e["tolerance"] for e in sums) < 0.5


def test_defaults_without_emulation_are_a_false_alarm(ggufs, logs, tmp_path):
    # the same correct log, compared as if llama.cpp had computed in fp32: it does not match
    rc, result = run_compare(tmp_path, "--against", logs("clean_default_short"), "--model", ggufs["f16"],
                             "--emulate", "fp32")
    assert rc == 1 and result["status"] == "diverged"


def test_verbose_log_says_the_weight_type_itself(small_dir, logs, tmp_path, capsys):
    # an HF directory tells nothing of the GGUF's types; the -v log's loader lines do
    rc, result = run_compare(tmp_path, "--against", logs("clean_default_short_verbose"), "--model", small_dir)
    assert rc == 0 and "matmul inputs f16" in capsys.readouterr().err
    rc, _ = run_compare(tmp_path, "--against", logs("clean_default_short"), "--model", small_dir)
    assert "weights' type is unknown" in capsys.readouterr().err  # and says so


@pytest.mark.parametrize("fault", sorted(FAULTS))
def test_each_llamacpp_fault_is_found_at_its_stage(fault, ggufs, logs, tmp_path):
    tap, word = FAULTS[fault]
    rc, result = run_compare(tmp_path, "--against", logs(f"fault_{fault}"), "--model", ggufs["f16"])
    assert rc == 1
    div = result["first_divergence"]
    assert div["tap"] == tap
    assert div["error"]["ratio"] >= 10, div["error"]
    assert word in div["hint"], div["hint"]


def test_fused_attention_hint_names_every_hidden_candidate(ggufs, logs, tmp_path):
    _, result = run_compare(tmp_path, "--against", logs("fault_mask_off"), "--model", ggufs["f16"])
    hint = result["first_divergence"]["hint"]
    assert all(w in hint for w in ("scale", "mask", "softmax")) and "RoPE on K" not in hint  # k_rope was printed


def test_token_mismatch_is_exit_2_with_the_token_diff(ggufs, logs, tmp_path, capsys):
    prompt = FIXTURES / "prompts" / "short.txt"
    # the log has BOS, the user did not pass --bos
    rc, result = run_compare(tmp_path, "--against", logs("clean_default_short"), "--model", ggufs["f16"],
                             "--prompt-file", prompt)
    err = capsys.readouterr().err
    assert rc == 2 and result is None
    assert err.startswith("error:") and "BOS" in err and "Nothing was compared" in err
    # -f stripped the prompt file's last newline: the log lacks the final "\n" (id 13)
    rc, _ = run_compare(tmp_path, "--against", logs("newline_stripped"), "--model", ggufs["f16"],
                        "--prompt-file", prompt, "--bos")
    err = capsys.readouterr().err
    assert rc == 2 and "38 ids vs 39 expected" in err
    # with the right options, or none (the log's own ids), it compares
    rc, _ = run_compare(tmp_path, "--against", logs("clean_default_short"), "--model", ggufs["f16"],
                        "--prompt-file", prompt, "--bos")
    assert rc == 0


# --- the one-shot command, with a stand-in for llama-eval-callback ---------------------


def fake_binary(tmp_path, case: str):
    """A llama-eval-callback stand-in: checks how it was called, prints a committed log."""
    script = tmp_path / "llama-eval-callback"
    script.write_text(f"""#!{sys.executable}
import lzma, sys
args = sys.argv[1:]
prompt = open(args[args.index("-f") + 1], encoding="utf-8").read()
expected = open({str(FIXTURES / "prompts" / "short.txt")!r}, encoding="utf-8").read() + "\\n"
if prompt != expected or "-m" not in args:
    print("unexpected call", args, repr(prompt[-20:]))
    sys.exit(3)
sys.stdout.write(lzma.decompress(open({str(FIXTURES / CASES[case]["log"])!r}, "rb").read()).decode())
""")
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    return script


@pytest.mark.skipif(os.name == "nt", reason="a shebang script stands in for the binary")
def test_llamacpp_command_from_gguf_to_verdict(ggufs, tmp_path):
    prompt = FIXTURES / "prompts" / "short.txt"
    out, report = tmp_path / "r.json", tmp_path / "r.html"
    rc = trace.main(["llamacpp", "--gguf", str(ggufs["f16"]), "--llama-cpp", str(fake_binary(tmp_path, "clean_default_short")),
                     "--prompt-file", str(prompt), "--json", str(out), "--report", str(report)])
    assert rc == 0 and json.loads(out.read_text())["status"] == "match" and report.stat().st_size > 0
    rc = trace.main(["llamacpp", "--gguf", str(ggufs["f16"]), "--llama-cpp", str(fake_binary(tmp_path, "fault_rope_theta")),
                     "--prompt-file", str(prompt), "--json", str(out)])
    assert rc == 1 and json.loads(out.read_text())["first_divergence"]["tap"] == "layers.0.attn.q_rope"


def test_llamacpp_command_without_the_binary_says_how_to_build_it(ggufs, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    rc = trace.main(["llamacpp", "--gguf", str(ggufs["f16"]), "--llama-cpp", str(tmp_path / "nowhere")])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "scripts/llamacpp/build.sh" in err


# --- llama.cpp's matmul path on a CPU with AMX (extra buffer types), read from the log ------------


def emulated(result: dict) -> str:
    return result["references"][0]["provenance"]["emulated_engine_precision"]


@pytest.mark.parametrize("case", ["amx_default_short_verbose", "amx_nr_short_verbose", "amx_q8_0_nr_short_verbose"])
def test_verbose_log_names_the_matmul_path_and_it_matches_tightly(case, ggufs, logs, tmp_path):
    # the true defaults put f16 weights in the AMX buffer (f32 matmul inputs); -nr does not
    rc, result = run_compare(tmp_path, "--against", logs(case), "--model", ggufs[CASES[case]["gguf_outtype"]])
    assert rc == 0, result["first_divergence"]
    assert worst_ratio(result) < 0.75
    assert ("AMX buffer (its f16 matmuls take f32 inputs)" in emulated(result)) == ("_nr_" not in case)
    assert result["references"][0]["dtype"].endswith("-emulated")  # the tight class, not fp16's


def test_the_other_path_is_not_what_the_amx_log_computed(ggufs, logs, tmp_path):
    # the AMX log under the plain path's rounding (what compare assumed before the path was read):
    # a false alarm in layer 1's MLP; so the AMX emulation is what makes it match
    rc, result = run_compare(tmp_path, "--against", logs("amx_default_short_verbose"), "--model", ggufs["f16"],
                             "--emulate", "matmul=f16,kv=f16,fa=on,amx=off")
    assert rc == 1 and result["first_divergence"]["tap"].startswith("layers.1.mlp")


@pytest.mark.parametrize("case", ["amx_default_short", "amx_nr_short", "amx_q8_0_nr_short"])
def test_a_log_that_cannot_tell_the_path_matches_under_a_tolerance_for_both(case, ggufs, logs, tmp_path, capsys):
    # without -v, a default log and a -nr log differ only in their numbers: both match, and it says so
    rc, result = run_compare(tmp_path, "--against", logs(case), "--model", ggufs[CASES[case]["gguf_outtype"]])
    err = capsys.readouterr().err
    assert rc == 0, result["first_divergence"]
    assert "does not say whether llama.cpp used its AMX buffer" in err and "-v" in err
    if CASES[case]["gguf_outtype"] == "f16":
        assert "AMX buffer or not: unknown" in emulated(result) and result["references"][0]["dtype"] == "float16"


@pytest.mark.parametrize("case, tap, word", [("amx_fault_norm_eps", "layers.0.attn_norm", "eps"),
                                             ("amx_fault_rope_theta_verbose", "layers.0.attn.q_rope", "theta")])
def test_faults_at_the_true_defaults_are_still_found(case, tap, word, ggufs, logs, tmp_path):
    # neither the AMX emulation (-v log) nor the wider tolerance of an unreadable path hides a fault
    rc, result = run_compare(tmp_path, "--against", logs(case), "--model", ggufs["f16"])
    div = result["first_divergence"]
    assert rc == 1 and div["tap"] == tap and word in div["hint"]
    assert div["error"]["ratio"] >= (100 if case.endswith("verbose") else 3), div["error"]


@pytest.mark.skipif(os.name == "nt", reason="a shebang script stands in for the binary")
def test_llamacpp_command_asks_for_the_verbose_log_that_names_the_path(ggufs, tmp_path):
    script = fake_binary(tmp_path, "amx_default_short_verbose")
    script.write_text(script.read_text().replace('if prompt != expected', 'if "-v" not in args or prompt != expected'))
    out = tmp_path / "r.json"
    rc = trace.main(["llamacpp", "--gguf", str(ggufs["f16"]), "--llama-cpp", str(script),
                     "--prompt-file", str(FIXTURES / "prompts" / "short.txt"), "--json", str(out)])
    assert rc == 0 and "AMX buffer (its" in emulated(json.loads(out.read_text()))


def test_the_fused_flash_attention_node_is_compared_and_shows_what_kqv_out_hides(ggufs, logs, tmp_path):
    # head h -> KV head h % n_kv: right for heads 0 and 7, the only ones kqv_out's printed corners
    # show; the FLASH_ATTN_EXT node prints 6 heads. Without it, the fault was blamed on o_proj.
    rc, result = run_compare(tmp_path, "--against", logs("fault_gqa_broadcast"), "--model", ggufs["f16"])
    context = {e["key"]: e for e in result["entries"] if e["tap"] == "layers.0.attn.context"}
    assert context["kqv_out-0 (RESHAPE)"]["ok"]  # its 36 printed values are right
    assert not context["node_21 (FLASH_ATTN_EXT)"]["ok"] and context["node_21 (FLASH_ATTN_EXT)"]["details"]["compared"] == 216
    assert rc == 1 and result["first_divergence"]["tap"] == "layers.0.attn.context"
    # a clean log: every layer's fused node is compared (as the context of the layer before it) and matches
    rc, result = run_compare(tmp_path, "--against", logs("amx_default_short_verbose"), "--model", ggufs["f16"])
    fused = [e for e in result["entries"] if "FLASH_ATTN_EXT" in e["key"] and e["metric"] != "sum_err"]
    assert rc == 0 and [e["tap"] for e in fused] == [f"layers.{i}.attn.context" for i in range(4)]
    assert not any("FLASH_ATTN_EXT" in n["key"] for n in result["not_compared"])


def test_gqa_broadcast_is_caught_by_the_sum_of_kqv_out_whose_corners_miss_it(ggufs, logs, tmp_path):
    # kqv_out prints heads 0 and 7 only, which h % n_kv gets right; its sum moved from -116.6 to -49.2.
    # Judged by sum|x| (2 sqrt(nmse) sum|x|, 70.4 here) that passed at 0.96; by the sum's own rounding
    # (6 sqrt(nmse) sqrt(n) rms(x) + the running sums' rounding + the printed digits, 2.8) it is 24x over.
    rc, result = run_compare(tmp_path, "--against", logs("fault_gqa_broadcast"), "--model", ggufs["f16"])
    kqv = {e["metric"]: e for e in result["entries"] if e["key"].startswith("kqv_out-0 (RESHAPE)")}
    assert kqv["rel_rms"]["ok"]  # its printed corners are right
    s = kqv["sum_err"]
    assert not s["ok"] and s["value"] / s["tolerance"] >= 10, s
    d = s["details"]
    assert d["scale_is"] == "sqrt(n)*rms(x)" and d["n"] == 39 * 256
    assert d["max_abs"] < d["tolerance_abs_by_sum_abs"]  # the old rule's tolerance let it through
    assert d["max_abs"] > 10 * d["tolerance_abs"]
    # its wrong printed heads (1, 6) hold no other reference head: no head-order reading is offered
    reading = result["first_divergence"]["printed_reordering"]
    assert reading["kind"] == "head_order" and reading["no_reference_head"] == [1, 6] and not reading["reordered"]
    assert "another order" not in result["first_divergence"]["hint"]


def test_a_real_log_read_in_the_wrong_qk_order_is_named_from_its_printed_corners(ggufs, logs, tmp_path):
    # llama.cpp's Q rows are in the GGUF's permuted order; read as Hugging Face's (--layout hf), the printed
    # values are ours at the positions unpermute_qk moves them to, and the printed sum (order-free) matches
    rc, result = run_compare(tmp_path, "--against", logs("clean_default_short"), "--model", ggufs["f16"],
                             "--layout", "hf")
    div = result["first_divergence"]
    assert rc == 1 and div["tap"] == "layers.0.attn.q"
    assert div["printed_reordering"]["fits"] == ["gguf.unpermute_qk"] and div["printed_reordering"]["reordered"]
    assert div["qk_permutation"]["fixed_by"] == "gguf.unpermute_qk"
    assert div["hint"].startswith("the printed values are the reference's at permuted positions and the printed "
                                  "sum matches: the Q rows are permuted within heads")
    sums = [e for e in result["entries"] if e["tap"] == "layers.0.attn.q" and e["metric"] == "sum_err"]
    assert sums and all(e["ok"] for e in sums)


# --- faults patched into ggml's CPU kernels: the hint leads with the shape of the error ---------------


@pytest.mark.parametrize("fault", sorted(KERNEL_FAULTS))
def test_each_kernel_fault_is_named_by_its_pattern_on_the_printed_corners(fault, ggufs, logs, tmp_path):
    tap, name, words = KERNEL_FAULTS[fault]
    case = f"fault_{fault}"
    rc, result = run_compare(tmp_path, "--against", logs(case), "--model", ggufs[CASES[case]["gguf_outtype"]])
    div = result["first_divergence"]
    assert rc == 1 and div["tap"] == tap, div
    assert div["error"]["ratio"] >= 10, div["error"]
    assert div["pattern"]["name"] == name and div["hint"].startswith(words), div["hint"]
    if name == "heads":
        assert div["pattern"]["evidence"]["reads"] == "h % 2", div["pattern"]


def test_no_clean_log_of_either_kernel_path_has_a_pattern(ggufs, logs, tmp_path):
    # the other way: the clean runs of the sgemm (f32) and flash attention (f16 defaults) paths on the
    # same AMX CPU match, and no entry of theirs carries a pattern
    for case in ("amx_fp32_short", "amx_default_short"):
        rc, result = run_compare(tmp_path, "--against", logs(case), "--model", ggufs[CASES[case]["gguf_outtype"]])
        assert rc == 0 and not [e for e in result["entries"] if e["details"].get("pattern")], case
