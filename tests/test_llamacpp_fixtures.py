"""The committed llama.cpp fixtures are complete and what PROVENANCE.md says they are: every
fault patch has its log, every log is a whole llama-eval-callback run (header, token ids,
every layer's tensors, the final logits), and its settings are the ones recorded."""

from __future__ import annotations

import json
import lzma
import re

import pytest
from conftest import REPO, SEED_IDS

from mlx_tinyllama.refs import parse_llamacpp_tensors
from mlx_tinyllama.synthetic import PRESETS

FIXTURES = REPO / "tests" / "fixtures" / "llamacpp"
PATCHES = REPO / "scripts" / "llamacpp" / "patches"
MANIFEST = json.loads((FIXTURES / "cases.json").read_text())
CASES = MANIFEST["cases"]


def log_of(case: str) -> str:
    return lzma.decompress((FIXTURES / CASES[case]["log"]).read_bytes()).decode()


def token_ids(text: str) -> list[int]:
    """The ids eval-callback prints after 'number of input tokens = N', one a line (after a log prefix)."""
    lines = text.splitlines()
    at = next(k for k, line in enumerate(lines) if "number of input tokens = " in line)
    n = int(lines[at].rsplit("=", 1)[1])
    return [int(re.search(r"(-?\d+)\s*$", line).group(1)) for line in lines[at + 1: at + 1 + n]]


def test_every_patch_has_a_fault_case_and_every_case_a_log():
    patches = {p.stem for p in PATCHES.glob("*.patch")}
    assert len(patches) >= 10
    assert patches == {c["fault"] for c in CASES.values() if c["fault"]}
    for name, case in CASES.items():
        assert (FIXTURES / case["log"]).is_file(), name
        assert (FIXTURES / case["prompt"]).is_file(), name
        assert case["xz_bytes"] < 200_000, name  # small enough to commit
    assert {"clean_fp32_short", "clean_fp32_long", "clean_default_short", "clean_default_long",
            "clean_q8_0_short", "newline_stripped"} <= set(CASES)


def test_provenance_lists_every_case_and_the_sdist():
    text = (FIXTURES / "PROVENANCE.md").read_text()
    for name, case in CASES.items():
        assert f"`{name}`" in text and case["command"] in text
    assert f"llama-cpp-python` {MANIFEST['llama_cpp']['llama_cpp_python_sdist']} sdist" in text


@pytest.mark.parametrize("case", sorted(CASES))
def test_log_is_one_whole_run_with_bos_and_the_recorded_settings(case):
    text = log_of(case)
    info = CASES[case]
    prompt = (FIXTURES / info["prompt"]).read_text()
    ids = token_ids(text)
    assert ids[0] == 1  # llama.cpp added BOS
    if info["prompt"].endswith("short.txt"):
        expected = [1] + SEED_IDS
        # -f strips one trailing newline: without the extra one the last "\n" (id 13) is lost
        assert ids == (expected[:-1] if case == "newline_stripped" else expected)
    else:
        assert prompt.endswith("<|assistant|>\n") and 300 <= len(ids) <= 400
    tensors = parse_llamacpp_tensors(text)  # every block parses (not truncated)
    names = {t.name for t in tensors}
    assert {"result_norm", "result_output"} <= names
    n_layers = PRESETS[info["preset"]].num_hidden_layers  # small 4, tinyllama 22, the family's tiny ones 2
    assert all(f"l_out-{i}" in names for i in range(n_layers))
    fp32 = info["settings"].startswith("fp32")
    assert ("-fa off -ctk f32 -ctv f32" in info["command"]) == fp32
    # flash attention shows as one fused op; without it, the separate kq / kq_soft_max tensors
    assert any(n.startswith("kq_soft_max") for n in names) == fp32
    assert any(t.op == "FLASH_ATTN_EXT" for t in tensors) == (not fp32)
    cache_types = {t.type for t in tensors if t.name.startswith("cache_k_l0")}
    assert cache_types == ({"f32"} if fp32 else {"f16"})


def test_amx_cases_were_made_where_the_defaults_take_the_amx_buffer():
    amx = [c for c in CASES if c.startswith("amx_")]
    assert {"amx_default_short", "amx_nr_short", "amx_q8_0_nr_short", "amx_fault_norm_eps"} <= set(amx)
    for case in amx:
        text = log_of(case)
        assert "AMX_INT8 = 1" in text, case  # system_info: ggml-cpu built with AMX
        assert ("-nr" in CASES[case]["command"]) == ("_nr_" in case)
        if "-v" in CASES[case]["command"].split():  # only a verbose log names the buffers
            assert ("AMX model buffer size" in text) == ("-nr" not in CASES[case]["command"]), case
        else:
            assert "model buffer size" not in text
    # q8_0 at the true defaults crashes in the AMX int8 matmul: recorded, never committed as a clean log
    crash = MANIFEST["crashes"]["amx_q8_0_default_short"]
    assert crash["exit_status"] != 0 and "-nr" not in crash["command"] and "log" not in crash
    assert "amx_q8_0_default_short" not in CASES
