"""Every command printed in README.md and docs/*.md runs here (issue 21, item 6), so the docs cannot
drift from the code.

tests/docs_commands.py reads the commands as a reader would copy them. Each one is either run
(with the placeholders filled from SUBSTITUTIONS, or the concrete form of a usage synopsis from
SYNOPSES) and checked for its documented exit code (EXIT; 0 unless listed), the files its output
options name, and, for a `$ ` command whose output the doc prints, the doc's last line; or it is in
EXCLUDED with the reason it cannot run here. A command that a doc gains is run by default: if it
needs a file or a binary this test does not make, it fails (placeholder left, or a non-zero exit)
until the tables say what it means. An entry of a table that no doc prints any more fails too.

`python -m mlx_tinyllama.trace ...` runs in-process through `trace.main` (a fresh temporary
directory as the working directory; output captured); anything else runs through bash, bounded,
in a temporary directory that links the repository's refs/, scripts/, tests/, kit/ and
mlx_tinyllama/, with `python` on PATH being this interpreter.
"""

from __future__ import annotations

import json
import lzma
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import REPO, SEED_IDS
from docs_commands import DocCommand, all_commands, extract, starts_command, strip_comment
from mlx_tinyllama import trace

TRACE = "python -m mlx_tinyllama.trace"
LLAMACPP_FIXTURES = REPO / "tests" / "fixtures" / "llamacpp"

# --- what the commands' placeholders become ------------------------------------------------------
# (doc text, replacement, why), applied in order to whole words (never inside a longer path or
# name); `{@name}` is a file the `made` fixture makes, or `{@tmp}`, the command's directory.
SUBSTITUTIONS = [
    ("TinyLlama/TinyLlama-1.1B-Chat-v1.0", "synthetic:tiny", "the real checkpoint needs a download; same architecture"),
    ("--model synthetic", "--model synthetic:tiny", "the 1.1B-shaped synthetic model writes 2.2 GB, minutes here"),
    ("synthetic:small", "synthetic:tiny", "speed: paths takes 17 s on small, 6 s on tiny on this 2-core VM"),
    ("/path/to/hf-dir", "{@tiny_hf}", "synthetic:tiny materialized as a Hugging Face directory"),
    ("--model PATH", "--model {@tiny_hf}", "a model directory: synthetic:tiny materialized"),
    ("--model M", "--model synthetic:tiny", "any model spec"),
    ("--model MODEL", "--model {@small_gguf}", "the GGUF (f16, synthetic:small) the llama.cpp fixture log was run on"),
    ("model.gguf", "{@small_gguf}", "the GGUF (f16, synthetic:small) the llama.cpp fixture log was run on"),
    ("eval-callback.log", "{@small_log}", "llama.cpp's log at its defaults (fixture clean_default_short)"),
    ("eval.log", "{@small_log}", "llama.cpp's log at its defaults (fixture clean_default_short)"),
    ("path/to/llama-eval-callback", "{@fake_llama}", "no llama.cpp here: a stand-in that prints clean_default_short's log"),
    ("--token-ids 1,529,29989,...", "--token-ids {@log_ids}", "the ids the log holds (llama.cpp's BOS first), written out"),
    ("--compare-ids 1,529,29989,5205,...", "--compare-ids {@bos_seed_ids}",
     "the reference's 38 ids with a BOS in front: the first difference the doc names"),
    ("yours.safetensors", "{@tiny_dump}", "a float32 dump of synthetic:tiny by the tests' NumPy engine (kit/tap_dump.py)"),
    ("their.safetensors", "{@tiny_dump}", "a float32 dump of synthetic:tiny by the tests' NumPy engine"),
    ("dump.safetensors", "{@tiny_dump}", "a float32 dump of synthetic:tiny by the tests' NumPy engine"),
    ("their.npz", "{@tiny_npz}", "the NumPy engine's taps in an npz under engine names (engine.blk.0...)"),
    ("names.json", "{@names_json}", "the map of those engine names to tap names"),
    ("steps/", "{@tiny_steps}", "three decode-step dumps of synthetic:tiny by the NumPy engine"),
    ("run vec", "run {@vectors}", "vectors written with `vectors write --quick` for synthetic:tiny"),
    ("check vec", "check {@vectors}", "vectors written with `vectors write --quick` for synthetic:tiny"),
    ("--results theirs.safetensors", "--results {@vector_results}", "the tests' clean NumPy kernels run on them"),
    ("mypkg.kernels:engine", "numpy_kernels:clean", "an importable module: the tests' clean NumPy kernels"),
    ("path/to/file.py:engine", "tests/numpy_kernels.py:clean", "a file: the tests' clean NumPy kernels"),
    ("/tmp/mlxtl", "{@tmp}/mlxtl", "the command's own directory instead of /tmp"),
    ("/tmp/vf", "{@tmp}/vf", "the command's own directory instead of /tmp"),
    ("/tmp/vf_float32", "{@tmp}/vf_float32", "the command's own directory instead of /tmp"),
    ("--max-tokens 64", "--max-tokens 8", "speed: 64 tokens take 16 s on this VM"),
    ("--model synthetic:tiny --repeats 2", "--model synthetic:tiny --repeats 1 --warmup 0 --prompt-lengths 16 "
     "--decode-tokens 4 --decode-context 8 --tap-prompt-length 16 --tap-decode-tokens 2",
     "speed: the default lengths (38..2048) take 97 s on this VM"),
]

# usage synopses ([optional], a|b, UPPERCASE values): the concrete command run for each (then
# substituted as above)
SYNOPSES = {
    "python -m mlx_tinyllama.trace gguf-check --gguf FILE --hf HF_DIR":
        f"{TRACE} gguf-check --gguf {{@small_gguf}} --hf {{@small_hf}}",
    "python -m mlx_tinyllama.trace gguf-check --gguf model.gguf --hf HF_DIR [--json check.json] [--all]":
        f"{TRACE} gguf-check --gguf {{@small_gguf}} --hf {{@small_hf}} --json check.json --all",
    "python -m mlx_tinyllama.trace llamacpp --gguf model.gguf [--llama-cpp BIN_OR_DIR] [--prompt TEXT | --prompt-file F "
    "| --chat USER [--system S]] [--report x.html] [--json x.json]":
        f"{TRACE} llamacpp --gguf model.gguf --llama-cpp path/to/llama-eval-callback "
        "--prompt-file tests/fixtures/llamacpp/prompts/short.txt --report x.html --json x.json",
    "python -m mlx_tinyllama.trace compare --against eval.log --model model.gguf [--emulate auto] [--report x.html]":
        f"{TRACE} compare --against eval.log --model model.gguf --emulate auto",  # (the report: the command above)
    "python scripts/hf_to_gguf.py HF_DIR OUT.gguf --outtype f32|f16|q8_0|q4_0|q4_1|q5_0 [--no-permute | --permute-twice]":
        "python scripts/hf_to_gguf.py {@tiny_hf} out.gguf --outtype q8_0",
    "python -m mlx_tinyllama.trace stability --model PATH_OR_REPO_OR_synthetic:PRESET [--dtypes float16,bfloat16 "
    "| --dtype bf16] [--policies fp16-pure,hf,mixed | --policy hf] [--kernels fused] [--taps GLOB ...] "
    "[--json PATH] [--report PATH.html] [--plots DIR] [prompt options: --prompt/--chat/--token-ids/... ; "
    "default: the seed's 38-id chat prompt]":
        f"{TRACE} stability --model synthetic:tiny --dtypes float16,bfloat16 --policies fp16-pure,hf "
        "--taps 'layers.0.*' --json s.json",  # (the report: docs/report.md's stability command)
    "python -m mlx_tinyllama.trace vectors write vec --dtype float16 [--model M] [--quick]":
        f"{TRACE} vectors write vec --dtype float16 --model synthetic:tiny --quick",
    "python -m mlx_tinyllama.trace vectors check vec --results theirs.safetensors [--json out.json] [--report out.html]":
        f"{TRACE} vectors check vec --results theirs.safetensors --json out.json --report out.html",
    f"{TRACE} COMMAND --help": f"{TRACE} compare --help",
    f"{TRACE} paths --model synthetic:small[:seed=N] --dtype float32 [--kernels explicit] --chunk 2 --chunk 5":
        f"{TRACE} paths --model synthetic:tiny:seed=1 --dtype float32 --kernels explicit --chunk 2 --chunk 5",
    f"{TRACE} stability --model synthetic:PRESET --dtypes fp16,bf16 --json out.json":
        f"{TRACE} stability --model synthetic:stress-scores --dtypes fp16,bf16 --json out.json",
}

# exit codes other than 0, with what the doc says
EXIT = {
    f"{TRACE} tokens --compare-ids 1,529,29989,5205,...": (1, "ids that differ: each difference named"),
    f"{TRACE} paths --model synthetic:small --dtype float32 --fault drop-kv:9 --chunk 5 --continue 4":
        (1, "an injected fault: the paths disagree"),
    f"{TRACE} paths --model synthetic:tiny --fault drop-kv:9 --report paths.html": (1, "an injected fault"),
}

# commands that cannot run in the test suite, and why
EXCLUDED = {
    "pip install -e .": "installs into the environment (and reaches PyPI)",
    "pip install mlx-tinyllama[onnx]": "installs into the environment (and reaches PyPI)",
    f"{TRACE} onnx --model model.onnx --hf HF_DIR [--prompt TEXT | --prompt-file F | --token-ids 1,2,3 | --chat USER] "
    "[--json x.json] [--report x.html]": "needs an ONNX export (torch's dynamo exporter); tests/test_onnx_cmd.py "
        "exports synthetic:tiny and runs this command on it, clean and with graph faults",
    f"{TRACE} --model TinyLlama/TinyLlama-1.1B-Chat-v1.0 --download": "downloads the real checkpoint (2.2 GB)",
    "bash scripts/test.sh": "the whole test suite (this test is part of it)",
    "python -m pytest -q -s tests/test_robustness.py": "a test file the suite runs itself (3-4 min a second time)",
    "python -m pytest tests/field": "a test directory the suite runs itself",
    "PYTHONPATH=. python scripts/field_table.py": "runs every field case again (5 min); the cases themselves "
        "run in tests/field",
    "LLAMACPP_DIR=.llamacpp python scripts/llamacpp/check_family_gguf.py": "needs llama.cpp's source and converter "
        "(scripts/llamacpp/build.sh), never in CI; its output is quoted in docs/family.md",
    f"{TRACE} compare --ref refs/tinyllama-1.1b-chat-v1.0.seed.json --model TinyLlama/TinyLlama-1.1B-Chat-v1.0":
        "the seed's published values need the real TinyLlama weights (synthetic weights differ by design)",
    "bash scripts/llamacpp/build.sh": "downloads the llama-cpp-python sdist and compiles llama.cpp",
    "PYTHONPATH=$PWD python scripts/llamacpp/make_fixtures.py --tinyllama": "needs the llama.cpp build; hours",
    "xz -dc tests/fixtures/llamacpp/clean_default_short_tinyllama.log.xz > tl.log":
        "the 1.1B-shaped GGUF check (the doc: not in CI; its GGUF is 2.2 GB)",
    "python scripts/hf_to_gguf.py \"$(python -c 'from mlx_tinyllama.synthetic import materialize; "
    "print(materialize(\"tinyllama\"))')\" tl.gguf": "the 1.1B-shaped GGUF (2.2 GB, minutes)",
    f"{TRACE} compare --against tl.log --model tl.gguf": "the 1.1B-shaped GGUF (2.2 GB, minutes)",
    "bash scripts/vectors_faults.sh /tmp/vf_tl": "vectors of the 1.1B shape",
    "bash scripts/test.sh -m 'not slow' tests/test_model.py": "makes (or reuses) .venv and installs the dev "
        "dependencies into it (PyPI), then runs pytest there",
    "pip uninstall mlx-cpu": "changes the environment (the CUDA backend's install)",
    "pip install --force-reinstall --no-deps mlx-cuda-13": "changes the environment; an NVIDIA GPU's wheel",
    "python scripts/llamacpp/table.py": "the same script as docs/llamacpp.md:115's command, which runs it (slow) "
        "and checks this table",
    # docs/benchmarks.md: the measurements as they were run (minutes each, a GPU, or Metal)
    f"{TRACE} bench": "the default benchmark: the 1.1B shape at 38..2,048 tokens (minutes)",
    f"LD_PRELOAD=/usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3 {TRACE}": "the prefix of the bench "
        "commands printed after it, not a command by itself (alone it runs the 1.1B shape)",
    "/usr/bin/time -v": "the measuring prefix of the dump commands printed with it, not a command by itself",
    "python scripts/profile_dump.py 2048 3": "a profile of a 2,048-token dump of the 1.1B shape (minutes, GBs)",
    "bash scripts/bench_gpu.sh exec CMD": "runs on the GPU machine",
    "bash scripts/bench_gpu.sh run": "runs on the GPU machine",
    "bash scripts/bench_gpu.sh tests": "runs on the GPU machine",
    "bash scripts/bench_gpu.sh exec python3 scripts/gpu_decode_attention.py": "runs on the GPU machine",
    "python scripts/profile_taps.py synthetic:tinyllama float16": "a recorded profile of the 1.1B shape",
    "python scripts/profile_taps.py synthetic:tinyllama float32": "a recorded profile of the 1.1B shape",
    f"{TRACE} bench --model TinyLlama/TinyLlama-1.1B-Chat-v1.0 --json bench.json": "a benchmark of the real checkpoint on a Mac",
    f"MTL_CAPTURE_ENABLED=1 {TRACE} bench --no-tap-overhead --no-stages --prompt-lengths 38 --metal-capture "
    "decode.gputrace": "Metal only (an Xcode GPU trace)",
    f"{TRACE} bench --model synthetic:tinyllama --dtype float16 --vs-dtype float32 --prompt-lengths 38,128":
        "a benchmark of the 1.1B shape (minutes)",
    "LD_PRELOAD=/usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3 python -m mlx_tinyllama.trace bench --model "
    "synthetic:medium --dtype float32 --prompt-lengths 38,128,512,2048 --decode-tokens 64 --repeats 5 --warmup 1 "
    "--json cpu_medium_fp32.json": "a recorded CPU benchmark (minutes)",
    "LD_PRELOAD=/usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3 python -m mlx_tinyllama.trace bench --model "
    "synthetic:tinyllama --dtype float32 --prompt-lengths 38 --decode-tokens 16 --decode-context 16 "
    "--tap-decode-tokens 4 --repeats 5 --warmup 1 --json cpu_tinyllama_fp32.json": "a recorded CPU benchmark (minutes)",
    "python scripts/cpu_upcast_cost.py": "a recorded CPU measurement of the 1.1B weights (minutes)",
    "python scripts/cpu_upcast_cost.py --prefill 512": "a recorded CPU measurement of the 1.1B weights (minutes)",
    "/usr/bin/time -v python -m mlx_tinyllama.trace run --model synthetic --taps '*' --dump /tmp/dN/taps.safetensors "
    "--dump-shard-mb 512 --token-ids $IDS --json /tmp/dN/run.json": "a recorded 1.1B dump of 512-2,048 tokens (minutes)",
    "python3 -m mlx_tinyllama.trace bench --model synthetic:tinyllama --dtype float16 --prompt-lengths 38,128,512,2048 "
    "--decode-tokens 128 --repeats 5 --warmup 2 --json bench_h200_fp16.json": "a recorded H200 benchmark",
    "python3 -m mlx_tinyllama.trace bench --model synthetic:tinyllama --dtype float16 --prompt-lengths 38 "
    "--decode-tokens 128 --repeats 7 --warmup 2 --no-stages --json bench_h200_fp16_taps.json": "a recorded H200 benchmark",
    "python3 scripts/gpu_stats.py check time": "a CUDA kernel check (NVIDIA GPU only)",
    "python3 scripts/profile_gpu.py graph decode prefill sweep": "a GPU profile (NVIDIA GPU only)",
    "python3 scripts/profile_taps.py synthetic:tinyllama float16 --cprofile": "a recorded profile of the 1.1B shape",
    "bash scripts/bench_gpu.sh stash": "stages wheels for the GPU machine",
    # docs/family.md: the bench at the real shapes (a GPU machine; minutes each on this CPU)
    "bash scripts/bench_gpu.sh stash && bash scripts/bench_gpu.sh generate": "runs on the GPU machine",
    "bash scripts/bench_gpu.sh family": "runs on the GPU machine",
    "python3 -m mlx_tinyllama.trace bench --model synthetic:PRESET --dtype float16 --prompt-lengths 38,128,512,2048 "
    "--decode-tokens 128 --repeats 10 --warmup 2 --no-tap-overhead": "what `bench_gpu.sh family` runs on the GPU machine",
    "LD_PRELOAD=/usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3 python -m mlx_tinyllama.trace bench --model "
    "synthetic:qwen2.5-0.5b --dtype float32 --prompt-lengths 38,128 --decode-tokens 16 --repeats 5 --warmup 1 "
    "--no-tap-overhead --no-stages --json real.json": "a recorded CPU benchmark of a 0.5B shape (minutes)",
    "bash scripts/bench_gpu.sh tests; bash scripts/bench_gpu.sh run": "runs on the GPU machine",
    "python3 -m mlx_tinyllama.trace bench --model synthetic:tinyllama --dtype float16 --prompt-lengths "
    "38,128,512,2048 --decode-tokens 128 --repeats 5 --warmup 2 --with-transformers --json $OUT/bench_h200_fp16.json":
        "a recorded H200 benchmark",
}

# run, but known to fail until another engineer's fix merges: (what its stderr says, why). Strict:
# the case flips to a failure when the fix merges; a failure with another message is a failure.
XFAIL: dict[str, tuple[str, str]] = {}  # none at present: the --against-steps dtype bug was fixed (issue 21)


# run only in the full suite (deselected by -m 'not slow'): over ~20 s each on this 2-core VM
SLOW = {
    "bash scripts/vectors_faults.sh /tmp/vf synthetic:small float16": "11 engines' vectors run and checked: 45 s",
    f"{TRACE} paths --model synthetic:tiny --fault drop-kv:9 --report paths.html": "the paths report: 35 s",
    f"{TRACE} stability --model synthetic:stress-scores --report stability.html": "the stability report: 25 s",
    "PYTHONPATH=$PWD python scripts/llamacpp/table.py": "19 compares on synthetic:small: 62 s",
    "python scripts/llamacpp/table.py --sums": "the same compares as the table above, for their sums: 62 s",
    "python scripts/measure_tolerances.py small medium": "transformers beside MLX on two models: 82 s",
    "PYTHONPATH=. python scripts/localize_faults.py": "every fault of the NumPy engine through compare and "
        "localize: 55 s",
    "python -m pytest tests/test_layers.py": "a pytest run of its own: 24 s",
    "PYTHONPATH=.:tests python tests/test_family_random.py": "21 transformers models built and compared: 40 s",
    "bash scripts/vectors_faults.sh /tmp/vf_float32 synthetic:small float32": "as the float16 one: 45 s",
}


_MEASURED = re.compile(r"\d+\.\d+(?:e[+-]?\d+)?|\d+e[+-]?\d+|\d+(?=\s?[x×])")


def table_rows(text: str) -> dict[str, str]:
    """A Markdown table's rows by their first cell, each row with its measured numbers (decimals,
    exponents, `N×` ratios) as `#`: they depend on the CPU's rounding order, and the doc records one
    machine's; the cases, stages, exit codes and diagnoses must be the same everywhere."""
    rows = {}
    for ln in text.splitlines():
        cells = [c.strip() for c in ln.strip().strip("|").split("|")]
        if ln.startswith("| `"):
            rows[_MEASURED.sub("#", cells[0])] = _MEASURED.sub("#", " | ".join(cells[1:]))
    return rows


def table_as_printed(doc: str, heading: str):
    """A check: the table under `heading` in `doc` is the one the command prints."""
    def check(out: str) -> None:
        section = (REPO / doc).read_text(encoding="utf-8").split(heading + "\n", 1)[1].split("\n## ", 1)[0]
        printed, shown = table_rows(out), table_rows(section)
        assert printed and printed == shown, f"{doc}'s table under {heading!r} differs from the command's:\n{out}"
    return check


def table_verbatim(doc: str, heading: str):
    """A check: every line the command prints (a table from committed JSON, the same on every machine)
    is in `doc` under `heading`, the table's rows in the printed order."""
    def check(out: str) -> None:
        section = (REPO / doc).read_text(encoding="utf-8").split(heading + "\n", 1)[1].split("\n## ", 1)[0]
        printed = [ln for ln in out.splitlines() if ln.strip()]
        shown = section.splitlines()
        assert printed and all(ln in shown for ln in printed), f"{doc} under {heading!r} lacks lines of:\n{out}"
        rows = [ln for ln in printed if ln.startswith("|")]
        at = shown.index(rows[0])
        assert shown[at:at + len(rows)] == rows, f"{doc}'s table under {heading!r} differs from the command's:\n{out}"
    return check


def _assert_json_fields(out: str, **want) -> None:
    data = json.loads(out[out.index("{"):])
    assert {k: data.get(k) for k in want} == want, data


def _assert_near_ties_only(out: str) -> None:
    data = json.loads(out[out.index("{"):])
    assert data["steps_choosing_differently"] <= 2, data
    assert data["steps_choosing_differently"] == 0 or data["near_tie"] is True, data


def _assert_in(words: str, out: str) -> None:
    assert words in out, out


# extra checks of a command's output: what the doc says it prints
CHECKS = {
    "python scripts/family_bench_table.py": table_verbatim("docs/family.md", "## bench at the real shapes"),
    "PYTHONPATH=$PWD python scripts/llamacpp/table.py": table_as_printed("docs/llamacpp.md", "## Results"),
    "python scripts/llamacpp/table.py --sums": table_as_printed("docs/llamacpp.md",
                                                                "### The sum's own tolerance (`sum_err`)"),
    "PYTHONPATH=. python scripts/localize_faults.py": table_as_printed("docs/localize.md",
                                                                      "## Every fault of the test engine"),
    # docs/family.md: ours and mlx-lm part on synthetic:tiny in float16 only at a near tie (on this CPU one
    # step of 64: 1 ulp margin, the engines 2 ulp apart; another backend rounds elsewhere, so the count is
    # not pinned); on mistral-tiny the logits differ by far more (mlx-lm's window)
    "python scripts/greedy_agreement.py --model synthetic:tiny --dtype float16 --tokens 64":
        lambda out: _assert_near_ties_only(out),
    "python scripts/greedy_agreement.py --model synthetic:mistral-tiny --dtype float16 --tokens 64":
        lambda out: (_assert_json_fields(out, near_tie=False), _assert_in("mlx-lm's Llama class", out)),
}

# options whose value is a file or directory the command writes
OUTPUT_OPTIONS = {"--json", "--report", "--dump", "--plots", "--out"}
REPO_ENTRIES = ("refs", "scripts", "tests", "kit", "mlx_tinyllama")
TIMEOUT_S = 300


def _commands() -> dict[str, list[DocCommand]]:
    """Each distinct command text -> where the docs print it."""
    out: dict[str, list[DocCommand]] = {}
    for c in all_commands(REPO):
        out.setdefault(c.text, []).append(c)
    return out


COMMANDS = _commands()


def _word(text: str) -> re.Pattern:
    """`text` as a whole word, or a directory a path starts with: not inside a longer name or value."""
    return re.compile(r"(?<![\w/.:-])" + re.escape(text) + r"(?![\w.:-])")


def concrete(text: str) -> str:
    """The doc's command with its synopsis made concrete and its placeholders filled (`{@name}` left
    for the made files)."""
    text = SYNOPSES.get(text, text)
    for doc, new, _ in SUBSTITUTIONS:
        text = _word(doc).sub(lambda _m: new, text)
    return text


class KnownIssue(Exception):
    """A documented command failing as XFAIL says it does."""


def known_issue(text: str, rc: int, expected: int, err: str) -> bool:
    """Whether the command failed as XFAIL says it does (any other failure is a failure)."""
    return text in XFAIL and rc != expected and XFAIL[text][0] in err


def unfilled(text: str) -> list[str]:
    """What still looks like a placeholder: `...`, [optional] parts, a|b choices, UPPERCASE values,
    and paths under /tmp (a command here writes only in its own directory); in the command line: a
    here-document's body is a program."""
    words = shlex.split(text.split("\n")[0], comments=True)
    bad = [w for w in words if w.endswith("...") or re.search(r"\[(-|:|[A-Z])", w)
           or re.fullmatch(r"[A-Z][A-Z0-9_]*(\.[a-z]+)?", w)]
    bad += [w for w in words if re.fullmatch(r"[\w.-]+(\|[\w.-]+)+", w) or w.startswith("/tmp/")]
    return bad


# --- the files the commands read -----------------------------------------------------------------


@pytest.fixture(scope="module")
def made(tmp_path_factory, tiny_dir, request):
    """name -> a function making that file (once) and returning its path."""
    root = tmp_path_factory.mktemp("docs_inputs")
    cache: dict[str, str] = {}

    def tiny_dump():
        from numpy_engine import Engine
        eng = Engine(tiny_dir)
        eng.prefill(SEED_IDS)
        return str(eng.dump(root / "tiny_dump.safetensors", SEED_IDS))

    def tiny_npz():
        from numpy_engine import Engine
        eng = Engine(tiny_dir)
        eng.prefill(SEED_IDS)
        np.savez(root / "tiny.npz", **{_engine_name(k): v.astype(np.float32) for k, v in eng.dumped().items()})
        return str(root / "tiny.npz")

    def names_json():
        from mlx_tinyllama import synthetic, taps
        cfg = synthetic.PRESETS["tiny"]
        names = {_engine_name(t): t for t in taps.tap_names(cfg.num_hidden_layers)}
        (root / "names.json").write_text(json.dumps(names))
        return str(root / "names.json")

    def tiny_steps():
        from numpy_engine import Engine
        eng = Engine(tiny_dir)
        logits = eng.prefill(SEED_IDS)["logits"]
        ids, out = list(SEED_IDS), root / "steps"
        out.mkdir()
        for k in range(3):
            ids.append(int(np.argmax(logits[-1])))
            logits = eng.step(ids[-1])["logits"]
            eng.dump(out / f"step{k}.safetensors", ids, position=len(ids) - 1)
        return str(out) + "/"

    def small_gguf():
        from mlx_tinyllama.gguf_write import convert
        convert(request.getfixturevalue("small_dir"), root / "small-f16.gguf", out_type="f16")
        return str(root / "small-f16.gguf")

    def small_log():
        path = root / "clean_default_short.log"
        path.write_bytes(lzma.decompress((LLAMACPP_FIXTURES / "clean_default_short.log.xz").read_bytes()))
        return str(path)

    def fake_llama():
        """A llama-eval-callback stand-in: prints the fixture log, after checking it got a model and a prompt."""
        script = root / "llama-eval-callback"
        script.write_text(f"#!{sys.executable}\nimport sys\nargs = sys.argv[1:]\n"
                          "if '-m' not in args or '-f' not in args:\n    sys.exit('unexpected call %r' % args)\n"
                          f"sys.stdout.write(open({small_log()!r}, encoding='utf-8').read())\n")
        script.chmod(0o755)
        return str(script)

    def vectors():
        rc = trace.main(["vectors", "write", str(root / "vec"), "--dtype", "float16", "--model", "synthetic:tiny",
                         "--quick"])
        assert rc == 0
        return str(root / "vec")

    def vector_results():
        rc = trace.main(["vectors", "run", vectors(), "--engine", str(REPO / "tests" / "numpy_kernels.py") + ":clean",
                         "--out", str(root / "theirs.safetensors")])
        assert rc == 0
        return str(root / "theirs.safetensors")

    makers = {
        "tiny_hf": lambda: str(tiny_dir),
        "small_hf": lambda: str(request.getfixturevalue("small_dir")),
        "log_ids": lambda: ",".join(map(str, [1, *SEED_IDS])),
        "bos_seed_ids": lambda: ",".join(map(str, [1, *SEED_IDS])),
        **{f.__name__: f for f in (tiny_dump, tiny_npz, names_json, tiny_steps, small_gguf, small_log, fake_llama,
                                   vectors, vector_results)},
    }

    def get(name: str) -> str:
        if name not in cache:
            cache[name] = makers[name]()
        return cache[name]
    get.names = set(makers)
    return get


def _engine_name(tap: str) -> str:
    return "engine." + tap.replace("layers.", "blk.")


def fill(text: str, made, tmp: Path) -> str:
    def one(m: re.Match) -> str:
        name = m.group(1)
        return str(tmp) if name == "tmp" else made(name)
    return re.sub(r"\{@(\w+)\}", one, text)


def workdir(tmp: Path) -> None:
    """The command's directory: the repository's inputs at their relative paths, nothing else."""
    for name in REPO_ENTRIES:
        (tmp / name).symlink_to(REPO / name, target_is_directory=True)


def run_in_process(argv: list[str], tmp: Path, monkeypatch, capsys) -> tuple[int, str, str]:
    monkeypatch.chdir(tmp)
    monkeypatch.setenv("COLUMNS", "200")
    try:
        rc = trace.main(argv)
    except SystemExit as e:  # argparse refusing the command line
        rc = 0 if e.code is None else e.code if isinstance(e.code, int) else 2
    out = capsys.readouterr()
    return rc, out.out, out.err


def run_in_shell(text: str, tmp: Path) -> tuple[int, str, str]:
    shim = tmp / ".bin"
    shim.mkdir()
    for name in ("python", "python3"):  # a script, not a link: a venv's python finds its site-packages by its path
        (shim / name).write_text(f'#!/bin/sh\nexec {shlex.quote(sys.executable)} "$@"\n')
        (shim / name).chmod(0o755)
    env = {**os.environ, "PATH": f"{shim}{os.pathsep}{os.environ.get('PATH', '')}",
           "PYTHONPATH": str(REPO), "COLUMNS": "200"}  # the package as `pip install -e .` gives it
    p = subprocess.run(["bash", "-c", text], cwd=tmp, env=env, capture_output=True, text=True, timeout=TIMEOUT_S)
    return p.returncode, p.stdout, p.stderr


def _cases():
    for text, where in COMMANDS.items():
        if text in EXCLUDED:
            continue
        marks = [pytest.mark.xfail(strict=True, raises=KnownIssue, reason=XFAIL[text][1])] if text in XFAIL else []
        marks += [pytest.mark.slow] if text in SLOW else []
        yield pytest.param(text, id=where[0].where, marks=marks)


@pytest.mark.skipif(os.name == "nt", reason="the commands are POSIX shell")
@pytest.mark.parametrize("text", list(_cases()))
def test_documented_command_runs(text, made, tmp_path, monkeypatch, capsys):
    where = ", ".join(c.where for c in COMMANDS[text])
    command = concrete(text)
    assert not unfilled(command), f"{where}: placeholders left in `{command}`: add them to SUBSTITUTIONS or SYNOPSES"
    command = fill(command, made, tmp_path)
    expected = EXIT.get(text, (0, ""))[0]
    workdir(tmp_path)
    if command.startswith(TRACE + " "):
        argv = shlex.split(command)[len(TRACE.split()):]
        rc, out, err = run_in_process(argv, tmp_path, monkeypatch, capsys)
    else:
        rc, out, err = run_in_shell(command, tmp_path)
    if known_issue(text, rc, expected, err):
        raise KnownIssue(err.strip())
    assert rc == expected, f"{where}: `{command}` exit {rc}, the doc says {expected}\n{out[-3000:]}\n{err[-3000:]}"
    if expected in (0, 1) and command.startswith(TRACE + " "):
        argv = shlex.split(command)
        for opt, value in zip(argv, argv[1:]):
            if opt in OUTPUT_OPTIONS:
                path = tmp_path / value
                assert path.exists() and (path.is_dir() or path.stat().st_size > 0), f"{where}: {opt} {value} not written"
                if opt == "--json":
                    assert json.loads(path.read_text())["schema"] >= 1
    if text in CHECKS:
        CHECKS[text](out)
    for c in COMMANDS[text]:  # the verdict line the doc shows is the one printed
        shown = [ln for ln in c.output if ln.strip()]
        if shown:
            assert last_line_shown(shown, out), f"{c.where}: the doc ends with `{shown[-1].strip()}`, the command:\n{out[-3000:]}"


def last_line_shown(shown: list[str], out: str) -> bool:
    """Whether the command's last printed line is the doc's last line (which the doc may show
    wrapped over up to three lines at its terminal's width)."""
    printed = [ln for ln in out.splitlines() if ln.strip()]
    last = " ".join(printed[-1].split()) if printed else ""
    return any(" ".join(" ".join(shown[-k:]).split()) == last for k in (1, 2, 3))


# --- the tables stay true to the docs --------------------------------------------------------------


def test_every_table_entry_is_a_printed_command():
    printed = set(COMMANDS)
    stale = [t for t in [*SYNOPSES, *EXIT, *EXCLUDED, *XFAIL, *SLOW, *CHECKS] if t not in printed]
    assert not stale, f"entries for commands no doc prints any more: {stale}"
    assert not set(EXCLUDED) & (set(SYNOPSES) | set(EXIT) | set(XFAIL) | set(SLOW))
    assert all(reason.strip() for reason in EXCLUDED.values())


def test_every_substitution_is_used_and_every_made_file_is_known(made):
    used = {doc for doc, _, _ in SUBSTITUTIONS
            if any(_word(doc).search(SYNOPSES.get(t, t)) for t in COMMANDS if t not in EXCLUDED)}
    assert used == {doc for doc, _, _ in SUBSTITUTIONS}, "substitutions no command uses any more"
    names = {n for t in COMMANDS if t not in EXCLUDED for n in re.findall(r"\{@(\w+)\}", concrete(t))}
    assert names - {"tmp"} <= made.names


# --- the extraction itself ---------------------------------------------------------------------------


def test_extraction_reads_shell_blocks_prompts_continuations_and_heredocs(tmp_path):
    doc = tmp_path / "doc.md"
    doc.write_text("\n".join([
        "Text `python -m mlx_tinyllama.trace inline` is a command in prose.", "",
        "```bash", "# a comment", "python -m mlx_tinyllama.trace run --model X \\", "    --json a.json  # why", "```",
        "", "```", "python -m mlx_tinyllama.trace stability --model M", "    [--json PATH]   # comment", "```",
        "", "```", "$ python -m mlx_tinyllama.trace paths", "table line", "all agree", "",
        "formula = a + b", "PYTHONPATH=$PWD python scripts/x.py", "```", "",
        "```python", "import numpy", "```", "",
        "```sh", "python - tiny <<'EOF'", "print(1)", "EOF", "echo done", "```", "",
        "Indented:", "", "    python3 scripts/y.py --flag", "    not a command", "",
        "Inline `python -m mlx_tinyllama.trace paths", "--chunk 2` and `x = python` and ``python a``.",
    ]))
    got = [(c.line, c.text, c.output) for c in extract(tmp_path, "doc.md")]
    assert got == [
        (5, "python -m mlx_tinyllama.trace run --model X --json a.json", ()),
        (10, "python -m mlx_tinyllama.trace stability --model M [--json PATH]", ()),
        (15, "python -m mlx_tinyllama.trace paths", ("table line", "all agree", "", "formula = a + b")),
        (20, "PYTHONPATH=$PWD python scripts/x.py", ()),
        (28, "python - tiny <<'EOF'\nprint(1)\nEOF", ()),
        (31, "echo done", ()),
        (36, "python3 scripts/y.py --flag", ()),
        (1, "python -m mlx_tinyllama.trace inline", ()),
        (39, "python -m mlx_tinyllama.trace paths --chunk 2", ()),
    ]
    assert starts_command("LD_PRELOAD=x python -m a") and not starts_command("x = python")
    assert strip_comment("a '#b' # c") == "a '#b'"


def test_a_known_issue_covers_only_its_own_message(monkeypatch):
    steps = f"{TRACE} compare --against-steps steps/ --model synthetic:tiny"
    monkeypatch.setitem(XFAIL, steps, ("unknown dtype None", "an example known issue"))
    assert known_issue(steps, 2, 0, "error: unknown dtype None for tolerances")
    assert not known_issue(steps, 2, 0, "error: steps/ does not exist")  # another failure stays a failure
    assert not known_issue(steps, 0, 0, "")  # fixed: the strict xfail turns it into a failure
    assert not known_issue(f"{TRACE} compare --ref refs/synthetic-tiny-fp32.json", 2, 0, "unknown dtype None")


def test_doc_output_is_matched_by_its_whole_last_line():
    assert last_line_shown(["table", "first divergence: a b", "(c)"], "table\nfirst divergence: a b (c)\n\n")
    assert not last_line_shown(["all paths agree at every tap"], "all paths agree at every tap and position\n")
    assert not last_line_shown(["x"], "")


def test_tables_compare_cases_stages_and_verdicts_not_measured_digits():
    a = "| `fault_gelu` | f16 | 1 | `layers.0.mlp.prod` | 78x over |\n| `clean` | f16 | 0 | none (match) | 0.30 (under 1) |"
    assert table_rows(a) == table_rows(a.replace("78x", "81x").replace("0.30", "0.38"))
    assert table_rows(a) != table_rows(a.replace("layers.0.mlp.prod", "layers.0.mlp.act"))
    assert table_rows(a) != table_rows(a.replace("| 1 |", "| 0 |"))
    assert table_rows(a) != table_rows(a.replace("layers.0", "layers.1"))
    assert set(table_rows("| `drift:3.37e-06` (tiny) | layers.0.attn.scores (2×) |")) == {"`drift:#` (tiny)"}


def test_placeholders_left_are_caught():
    assert unfilled("python -m mlx_tinyllama.trace x --model M --ids 1,2,... [--quick] --outtype f32|f16")
    for placeholder in ("--model synthetic:tiny[:seed=N]", "[--kernels explicit]", "--results X.safetensors", "a|b",
                        "--out /tmp/vf_fp32"):
        assert unfilled(f"python -m mlx_tinyllama.trace x {placeholder}"), placeholder
    assert not unfilled("python -m mlx_tinyllama.trace x --model synthetic:tiny --taps 'layers.*[0-9].out' --json a.json")
