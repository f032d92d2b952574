"""Regenerate tests/fixtures/llamacpp/: llama.cpp's own `llama-eval-callback` logs of synthetic
models converted by llama.cpp's own convert_hf_to_gguf.py, clean and with each fault patch.

    bash scripts/llamacpp/build.sh                      # once (~17 min on 2 cores)
    PYTHONPATH=$PWD python scripts/llamacpp/make_fixtures.py [--only CASE ...] [--tinyllama]

LLAMACPP_DIR (default .llamacpp/) is the folder build.sh filled. Every GGUF is regenerated from the
synthetic seed (nothing but the xz logs, the prompts and cases.json is committed). A fault case applies
its patch from scripts/llamacpp/patches/ to $LLAMACPP_DIR/src, rebuilds, runs and reverts the patch
(and rebuilds) even when the run fails. CI never runs this: it reads the committed logs.
"""

from __future__ import annotations

import argparse
import json
import lzma
import os
import platform
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
OUT = REPO / "tests" / "fixtures" / "llamacpp"
LLAMACPP_DIR = Path(os.environ.get("LLAMACPP_DIR", REPO / ".llamacpp")).resolve()
SRC, BUILD = LLAMACPP_DIR / "src", LLAMACPP_DIR / "build"
BIN = BUILD / "bin" / "llama-eval-callback"
TARGET = "llama-eval-callback"
THREADS = "2"
FP32 = ["-fa", "off", "-ctk", "f32", "-ctv", "f32"]  # llama.cpp forced to fp32 attention and KV cache
SEED_SYSTEM = "You are a friendly chatbot."

sys.path.insert(0, str(REPO))
from mlx_tinyllama.chat_template import SEED_PROMPT, TINYLLAMA_CHAT_TEMPLATE, render_chat  # noqa: E402
from mlx_tinyllama.synthetic import materialize  # noqa: E402


def prompts() -> dict[str, str]:
    """name -> the exact prompt text the engine must see (chat-rendered, no BOS)."""
    long_user = (HERE / "long_user.txt").read_text(encoding="utf-8").strip()
    long = render_chat([{"role": "system", "content": SEED_SYSTEM}, {"role": "user", "content": long_user}],
                       add_generation_prompt=True, template=TINYLLAMA_CHAT_TEMPLATE)
    return {"short": SEED_PROMPT, "long": long}


# case -> (gguf outtype, prompt, extra eval-callback args, fault patch or None, what it is)
# "newline_stripped" is the -f pitfall: the prompt file without the extra newline loses its last "\n".
CASES: dict[str, tuple] = {
    "clean_fp32_short": ("f32", "short", FP32, None, "correct engine, fp32 weights, fp32 attention and KV cache"),
    "clean_fp32_long": ("f32", "long", FP32, None, "correct engine, fp32, long prompt"),
    "clean_default_short": ("f16", "short", [], None, "correct engine at llama.cpp's defaults (f16 GGUF, flash attention, f16 KV cache)"),
    "clean_default_long": ("f16", "long", [], None, "correct engine at defaults, long prompt"),
    "clean_q8_0_short": ("q8_0", "short", [], None, "correct engine, q8_0 GGUF, defaults"),
    "clean_default_short_verbose": ("f16", "short", ["-v"], None, "as clean_default_short, with -v: the log also holds the loader's "
                                    "tensor types, the KV cache types and the flash attention setting"),
    "newline_stripped": ("f16", "short", [], None, "prompt file without the extra trailing newline: -f strips the last one"),
}
# The same engine at its TRUE defaults on a CPU with AMX (system_info: AMX_INT8 = 1): the f16 weights
# go to the AMX extra buffer, whose f16 matmul keeps the activations in f32; -nr (--no-repack) turns the
# extra buffers off. Only a -v log names the buffers; without -v the two logs differ only in their numbers.
# Made on such a CPU (the older cases above were made on an AVX2 one: their system_info has no AMX).
AMX_CASES: dict[str, tuple] = {
    "amx_default_short": ("f16", "short", [], None, "correct engine at the true defaults on an AMX CPU (f16 weights in the AMX buffer)"),
    "amx_default_short_verbose": ("f16", "short", ["-v"], None, "as amx_default_short, with -v: the loader names the AMX buffer"),
    "amx_nr_short": ("f16", "short", ["-nr"], None, "correct engine on an AMX CPU with -nr: no extra buffer types, f16 matmul inputs"),
    "amx_nr_short_verbose": ("f16", "short", ["-nr", "-v"], None, "as amx_nr_short, with -v: no AMX buffer in the loader's lines"),
    "amx_q8_0_nr_short": ("q8_0", "short", ["-nr"], None, "correct engine, q8_0 GGUF on an AMX CPU with -nr (at the defaults it crashes: see crashes)"),
    "amx_q8_0_nr_short_verbose": ("q8_0", "short", ["-nr", "-v"], None, "as amx_q8_0_nr_short, with -v"),
    "amx_default_long_verbose": ("f16", "long", ["-v"], None, "correct engine at the true defaults on an AMX CPU, long "
                                 "prompt (366 query rows: the tiled flash attention kernel), -v"),
    "amx_fault_norm_eps": ("f16", "short", [], "norm_eps", "the norm_eps fault at the true defaults on an AMX CPU"),
    "amx_fault_rope_theta_verbose": ("f16", "short", ["-v"], "rope_theta", "the rope_theta fault at the true defaults on an AMX CPU, -v"),
}
# Runs that crash are recorded (exit status, the last tensor printed), never committed as a log.
CRASH_CASES: dict[str, tuple] = {
    "amx_q8_0_default_short": ("q8_0", "short", [], None, "q8_0 GGUF at the true defaults on an AMX CPU: "
                               "the AMX int8 matmul crashes (SIGSEGV) after the first tensor"),
}
# Kernel faults run where their kernel is the one that computes: tinyBLAS (llamafile sgemm) takes the
# matmul only when weights and activations are both f32 (f16 weights go to the AMX buffer on an AMX
# CPU, or to ggml's own vec_dot path with -nr), so the sgemm faults use the f32 GGUF and fp32 settings
# (and -fa off, so attention's K*Q and V*softmax are f32 tinyBLAS matmuls too).
FAULT_SETTINGS: dict[str, tuple[str, list[str]]] = {
    "sgemm_rows_zero": ("f32", FP32),
    "sgemm_last_tile_skipped": ("f32", FP32),
    "sgemm_rows_wrap": ("f32", FP32),
    # The kernels an f16 GGUF runs at the defaults (made on the AMX CPU, -v so the log names the path):
    # the AMX buffer's f16 matmul (amx/mmq.cpp) takes Q/K/V/O, ffn_down and the LM head;
    "amx_f16_last_block_skipped": ("f16", ["-v"]),
    # with -nr no extra buffer: the activations go to f16 and tinyBLAS's f16 tiles take the matmul
    # (llamafile_sgemm's second call in ggml_compute_forward_mul_mat; ggml_vec_dot_f16 only when
    # tinyBLAS declines: one token row, or K not a multiple of 16);
    "mulmat_f16_row_stride": ("f16", ["-nr", "-v"]),
    # flash attention from 64 query rows on: the tiled kernel, so the long prompt (366 rows).
    "fa_tiled_no_rescale": ("f16", ["-v"]),
    # ggml_vec_dot_f16: below 64 query rows the one-chunk flash attention takes Q.K with it, one key at a time
    "vec_dot_f16_tail_dropped": ("f16", ["-v"]),
}
FAULT_PROMPTS = {"fa_tiled_no_rescale": "long"}  # the others: the short prompt
AMX_CASES["amx_fp32_short"] = ("f32", "short", FP32, None, "correct engine, fp32, on an AMX CPU: the f32 matmuls run "
                               "in tinyBLAS (llamafile sgemm) with AVX512, where the sgemm faults are patched")
# The Llama family beside TinyLlama (docs/family.md): each architecture's tiny preset, clean at the true
# defaults with -v, and the norm_eps fault (llama-graph.cpp's build_norm: every architecture's RMSNorm).
# mistral-tiny's GGUF is `llama` without the window (llama.cpp's converter drops sliding_window), so its
# log is the GGUF's semantics, not the checkpoint's beyond 8 tokens.
FAMILY_PRESETS = ("llama3-tiny", "qwen2-tiny", "mistral-tiny")
FAMILY_CASES: dict[str, tuple] = {}
CASE_PRESET: dict[str, str] = {}
for _p in FAMILY_PRESETS:
    _k = _p.replace("-", "_")
    FAMILY_CASES[f"family_{_k}_default_short_verbose"] = ("f16", "short", ["-v"], None, f"correct engine, {_p}, true defaults, -v")
    FAMILY_CASES[f"family_{_k}_fault_norm_eps"] = ("f16", "short", ["-v"], "norm_eps", f"the norm_eps fault, {_p}, true defaults, -v")
    CASE_PRESET.update({n: _p for n in FAMILY_CASES if _k in n})
# Faults inside what an architecture adds to Llama, run on that architecture's preset only (on the
# others the patched code never runs): Qwen2's q/k/v bias ADD (llama-graph.cpp's build_qkv) and
# Llama 3's rope_freqs (the per-frequency divisors: ggml-cpu's rope cache, src/models/llama.cpp).
# Mistral has none: llama.cpp's converter writes it as `llama`, whose graph never reads a window.
FAMILY_FAULTS = {"qkv_bias_k_to_v": "qwen2-tiny", "qkv_bias_q_dropped": "qwen2-tiny",
                 "rope_freqs_mul": "llama3-tiny", "rope_freqs_k_dropped": "llama3-tiny",
                 "rope_freqs_ignored": "llama3-tiny"}
for _f, _p in FAMILY_FAULTS.items():
    _name = f"family_{_p.replace('-', '_')}_fault_{_f}"
    FAMILY_CASES[_name] = ("f16", "short", ["-v"], _f, (HERE / "patches" / f"{_f}.patch").read_text().splitlines()[0]
                           + f", {_p}, true defaults, -v")
    CASE_PRESET[_name] = _p
FAULT_PATCHES = sorted(p.stem for p in (HERE / "patches").glob("*.patch") if p.stem not in FAMILY_FAULTS)
for _f in FAULT_PATCHES:
    _outtype, _extra = FAULT_SETTINGS.get(_f, ("f16", []))
    CASES[f"fault_{_f}"] = (_outtype, FAULT_PROMPTS.get(_f, "short"), _extra, _f,
                            (HERE / "patches" / f"{_f}.patch").read_text().splitlines()[0])


def run(cmd, **kw):
    print("+", " ".join(map(str, cmd)), flush=True)
    return subprocess.run([str(c) for c in cmd], check=True, **kw)


def build():
    run(["cmake", "--build", BUILD, "-j", os.environ.get("JOBS", "2"), "--target", TARGET],
        stdout=subprocess.DEVNULL)


def convert(hf_dir: Path, outtype: str, preset: str) -> Path:
    out = LLAMACPP_DIR / "gguf" / f"synthetic-{preset}-seed0-{outtype}.gguf"
    if not out.is_file():
        out.parent.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ, PYTHONPATH=str(SRC / "gguf-py"))  # the sdist's own gguf package
        run([sys.executable, SRC / "convert_hf_to_gguf.py", hf_dir, "--outfile", out, "--outtype", outtype],
            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return out


def eval_callback(gguf: Path, prompt: str, extra: list[str], name: str, strip_newline_pitfall: bool,
                  crash_expected: bool = False) -> tuple[list, bytes, int]:
    pfile = LLAMACPP_DIR / "prompts" / f"{name}.txt"
    pfile.parent.mkdir(parents=True, exist_ok=True)
    # -f strips one trailing newline, so the file gets one extra (unless this case shows the pitfall).
    pfile.write_text(prompt if strip_newline_pitfall else prompt + "\n", encoding="utf-8")
    cmd = [BIN, "-m", gguf, "-f", pfile, "-t", THREADS, "--seed", "0", *extra]
    print("+", " ".join(map(str, cmd)), flush=True)
    r = subprocess.run([str(c) for c in cmd], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, check=False,
                       timeout=600)
    if (r.returncode != 0) != crash_expected:
        raise SystemExit(f"{name}: llama-eval-callback exited {r.returncode}"
                         f"{' (a crash was expected)' if crash_expected else ''}:\n{r.stdout[-3000:].decode(errors='replace')}")
    shown = ["llama-eval-callback", "-m", gguf.name, "-f", f"{name}.txt", "-t", THREADS, "--seed", "0", *extra]
    return shown, r.stdout, r.returncode


def cpu_features(log: bytes) -> str:
    """The CPU features ggml used (the log's system_info line, after "CPU :")."""
    for line in log.decode(errors="replace").splitlines():
        if "system_info:" in line and "CPU :" in line:
            return line.split("CPU :", 1)[1].strip(" |")
    return "?"


def last_tensor(log: bytes) -> str:
    lines = [x for x in log.decode(errors="replace").splitlines() if "common_debug_cb_eval:" in x or " = (" in x]
    return lines[-1].split(":", 1)[-1].strip() if lines else "none"


def patch(name: str, reverse: bool = False):
    run(["git", "-C", SRC, "apply", *(["-R"] if reverse else []), HERE / "patches" / f"{name}.patch"])


def write_case(name: str, log: bytes, record: dict):
    path = OUT / f"{name}.log.xz"
    path.write_bytes(lzma.compress(log, preset=9 | lzma.PRESET_EXTREME))
    record.update(log=path.name, log_bytes=len(log), xz_bytes=path.stat().st_size)
    print(f"  {path.name}: {len(log)} -> {record['xz_bytes']} bytes", flush=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", nargs="*", help="regenerate only these cases")
    ap.add_argument("--tinyllama", action="store_true", help="also the 1.1B shape, clean at defaults, short prompt")
    ap.add_argument("--provenance-only", action="store_true", help="rewrite cases.json's versions and PROVENANCE.md only")
    args = ap.parse_args(argv)
    if args.provenance_only:
        return write_manifest(json.loads((OUT / "cases.json").read_text()))
    if not BIN.is_file():
        raise SystemExit(f"{BIN} is missing: run scripts/llamacpp/build.sh first")
    if subprocess.run(["git", "-C", SRC, "diff", "--quiet"]).returncode != 0:
        raise SystemExit(f"{SRC} has local changes: revert them (git -C {SRC} checkout .) first")
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "prompts").mkdir(exist_ok=True)
    for pname, text in prompts().items():
        (OUT / "prompts" / f"{pname}.txt").write_text(text, encoding="utf-8")
    manifest_path = OUT / "cases.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.is_file() else {"cases": {}}
    cases = dict(CASES, **AMX_CASES, **CRASH_CASES, **FAMILY_CASES)
    if args.tinyllama:
        cases["clean_default_short_tinyllama"] = ("f16", "short", [], None, "correct engine, the 1.1B TinyLlama shape, defaults")
        cases["amx_default_short_verbose_tinyllama"] = ("f16", "short", ["-v"], None, "correct engine, the 1.1B TinyLlama "
                                                        "shape, true defaults on an AMX CPU (every matmul on the AMX buffer), -v")
    wanted = args.only or list(cases)
    unknown = [c for c in wanted if c not in cases]
    if unknown:
        raise SystemExit(f"unknown cases {unknown}; cases: {', '.join(cases)}")
    texts = prompts()
    dirty = False  # the built binary holds a fault patch
    try:
        for name in wanted:  # clean cases come first in CASES, so they run on the pristine build
            outtype, pname, extra, fault, what = cases[name]
            preset = CASE_PRESET.get(name) or ("tinyllama" if name.endswith("_tinyllama") else "small")
            gguf = convert(materialize(preset, 0, root=LLAMACPP_DIR / "models"), outtype, preset)
            if fault:
                patch(fault)
            if fault or dirty:  # a one-file rebuild; a revert is rebuilt with the next case or at the end
                build()
                dirty = fault is not None
            try:
                cmd, log, rc = eval_callback(gguf, texts[pname], extra, name, name == "newline_stripped",
                                             crash_expected=name in CRASH_CASES)
            finally:
                if fault:
                    patch(fault, reverse=True)
            record = {"what": what, "preset": preset, "seed": 0, "gguf_outtype": outtype,
                      "prompt": f"prompts/{pname}.txt", "fault": fault,
                      "settings": "fp32 (-fa off -ctk f32 -ctv f32)" if extra == FP32
                      else "defaults" + (f" ({' '.join(extra)})" if extra else ""),
                      "command": " ".join(cmd), "cpu": cpu_features(log)}
            if name in CRASH_CASES:
                record.update(exit_status=rc, last_tensor=last_tensor(log))
                manifest.setdefault("crashes", {})[name] = record
                print(f"  {name}: crashed as recorded (exit {rc})", flush=True)
                continue
            write_case(name, log, record)
            manifest["cases"][name] = record
    finally:
        if dirty:
            build()  # leave the pristine binary behind
    manifest["machine"] = f"{platform.machine()} {platform.system()}, {THREADS} threads"
    return write_manifest(manifest)


def write_manifest(manifest: dict) -> int:
    manifest["llama_cpp"] = source_version()
    for c in manifest["cases"].values():  # cases made before "cpu" was recorded: read it off their log
        if "cpu" not in c:
            c["cpu"] = cpu_features(lzma.decompress((OUT / c["log"]).read_bytes()))
    (OUT / "cases.json").write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    (OUT / "PROVENANCE.md").write_text(provenance(manifest), encoding="utf-8")
    return 0


def provenance(manifest: dict) -> str:
    """PROVENANCE.md, written from cases.json so the two never disagree."""
    v = manifest["llama_cpp"]
    lines = [
        "# llama.cpp eval-callback fixtures: provenance",
        "",
        "Written by `scripts/llamacpp/make_fixtures.py` (do not edit by hand; rerun it). Each `*.log.xz` is the",
        "complete stdout+stderr of one `llama-eval-callback` run, xz-compressed.",
        "",
        f"- llama.cpp: the copy vendored in the `llama-cpp-python` {v.get('llama_cpp_python_sdist')} sdist from PyPI "
        f"(sha256 `{v.get('sdist_sha256', '?')}`; llama.cpp {v.get('llama_version')}, ggml {v.get('ggml_version')}; "
        "the sdist records no llama.cpp commit), "
        "built by `scripts/llamacpp/build.sh` (cmake, Release, `-DLLAMA_CURL=OFF`, CPU backend).",
        f"- Machine: {manifest.get('machine')} (each log's system_info line lists the CPU features ggml used).",
        "- Models: `mlx_tinyllama.synthetic.materialize(preset, seed)` (weights are a pure function of preset and",
        "  seed), converted by the sdist's own `convert_hf_to_gguf.py` with its own `gguf-py` (`--outtype` below).",
        "- Prompts: `prompts/short.txt` is the seed chat prompt (38 ids), `prompts/long.txt` the seed system",
        "  message with `scripts/llamacpp/long_user.txt` as the user message (365 ids), both rendered with",
        "  TinyLlama's chat template, without BOS. llama.cpp's `-f` strips one trailing newline, so the file",
        "  given to `-f` holds the prompt plus one `\\n` (except in `newline_stripped`, the pitfall); the engine",
        "  adds BOS (id 1) and parses special tokens (`</s>` is id 2), so each log holds BOS + the prompt.",
        "- Settings: `defaults` = no precision flags (flash attention auto -> on for CPU, f16 KV cache);",
        "  `fp32` = `-fa off -ctk f32 -ctv f32` with an f32 GGUF.",
        "- Faults: `fault_X` (and `amx_fault_X`, `family_P_fault_X`) ran with `scripts/llamacpp/patches/X.patch`",
        "  applied to the llama.cpp source, then reverted.",
        "- Family faults (`FAMILY_FAULTS`: made on the AMX CPU, each on its architecture's preset only): Qwen2's",
        "  bias ADD in `build_qkv` (`src/llama-graph.cpp`): `qkv_bias_k_to_v` adds `wk_b` to Vcur, `qkv_bias_q_dropped`",
        "  has no `wq_b` add; Llama 3's `rope_freqs`: `rope_freqs_mul` multiplies theta by the factor in the CPU rope",
        "  cache (`ggml-cpu/ops.cpp`, `ggml_rope_cache_init`), `rope_freqs_k_dropped` passes no factors to K's",
        "  `ggml_rope_ext` (`src/models/llama.cpp`), `rope_freqs_ignored` never fetches them (Q and K unscaled).",
        "- CPU: the features ggml reports in the log's system_info line. `AMX_INT8` marks the cases made on a CPU",
        "  with AMX (the `amx_*` cases), where the defaults put f16 weights in the AMX extra buffer (f32 matmul",
        "  inputs) and `-nr` turns that off; the other cases were made on an AVX2 CPU (no extra buffer for f16).",
        "- Kernel faults (`sgemm_rows_zero`, `sgemm_last_tile_skipped`, `sgemm_rows_wrap`, `fa_no_rescale`, `rope_sin_sign`,",
        "  `mask_off_by_one`; made on the AMX CPU) are patched where the computing kernel runs, read from the",
        "  source and confirmed by the fault showing in the log (`amx_fp32_short` is the same path, clean):",
        "  - the f32 matmuls (f32 GGUF, `-fa off -ctk f32 -ctv f32`) run in tinyBLAS, `ggml-cpu/llamafile/sgemm.cpp`",
        "    (`ggml_compute_forward_mul_mat` tries `llamafile_sgemm` first when both operands are f32; the AMX",
        "    buffer holds only f16 and quantized weights and CPU_REPACK repacks no f32). With AVX512 (32 vector",
        "    registers) it tiles the 39 token rows (its N) in blocks of RN = 6, then RN-1 = 5 (rows 0-23 by 6,",
        "    24-38 by 5): `sgemm_rows_zero` loads zeros for activation rows >= 32 inside the 29-33 block;",
        "    `sgemm_last_tile_skipped` skips the block that ends at row 38, so rows 34-38 are never written (they",
        "    print as zero: the buffer was fresh); `sgemm_rows_wrap` reads activation row j mod 32 for row j, so",
        "    rows 32-38 repeat rows 0-6 (stale);",
        "  - flash attention at the defaults runs `ggml_compute_forward_flash_attn_ext_f16_one_chunk` in",
        "    `ggml-cpu/ops.cpp` (39 query rows < GGML_FA_TILE_Q = 64, the tiled kernel's minimum), one key at a",
        "    time: `fa_no_rescale` drops its rescale of the running output and sum when the maximum rises;",
        "  - `rope_sin_sign` negates sin in both rope caches of `ggml-cpu/ops.cpp` (the backward rotation);",
        "  - `mask_off_by_one` is in llama.cpp's mask builder (`src/llama-kv-cache.cpp`, `p0 > p1 + 1`): the CPU",
        "    flash attention kernel reads whatever mask the graph gives it.",
        "- The kernels an f16 GGUF runs at the defaults (made on the AMX CPU, `-v`; read from the source, and each",
        "  confirmed by its fault showing in the log at the stage that kernel computes):",
        "  - at the true defaults the f16 weights whose shape amx.cpp's `supports_op` takes (out % 32, in % 16:",
        "    Q/K/V/O, `ffn_down`, `output`) are in the AMX buffer, and `ggml_backend_amx_mul_mat` (`amx/mmq.cpp`)",
        "    computes them: f32 activations, AVX512 `tinygemm_kernel_avx` over blocks of 4 token rows and 6",
        "    outputs (the AMX tile instructions only for quantized types). `amx_f16_last_block_skipped` counts the",
        "    blocks with M / 4 instead of div_up(M, 4): rows 36-38 are never computed (printed as zero);",
        "  - with `-nr` (or a shape the AMX buffer refuses, e.g. synthetic:small's 688-row `ffn_gate`/`ffn_up`)",
        "    `ggml_compute_forward_mul_mat` (`ggml-cpu.c`) copies the activations to f16 (`vec_dot_type`) and",
        "    tinyBLAS's f16 instantiation (`llamafile/sgemm.cpp`, AVX512: 16 lanes, `_mm512_cvtph_ps`) takes the",
        "    matmul (2+ token rows, K % 16 == 0, outputs % 4 == 0); `ggml_vec_dot_f16` (`vec.cpp`) only when",
        "    tinyBLAS declines (one token row, as in decoding). `mulmat_f16_row_stride` hands tinyBLAS that copy",
        "    with the f32 source's row stride: row 2j reads row j, odd rows straddle two rows;",
        "  - flash attention from 64 query rows on (GGML_FA_TILE_Q) runs `ggml_compute_forward_flash_attn_ext_tiled`",
        "    (`ops.cpp`: 64-row query tiles, 64-key KV tiles, f32 after the f16 K/V): the long prompt (366 rows)",
        "    reaches it. `fa_tiled_no_rescale` drops its rescale of a row's output and sum when a KV tile raises",
        "    the row's maximum; `amx_default_long_verbose` is the same path, clean;",
        "  - `ggml_vec_dot_f16` (`vec.cpp`) is where the one-chunk flash attention (under 64 query rows) takes",
        "    each Q.K of an f16 cache. `vec_dot_f16_tail_dropped` drops its leftover loop: head_dim 32 is",
        "    shorter than the AVX512 step (64), so the whole dot is tail and every score is 0.",
        "",
        "| case | preset, seed | GGUF | prompt | settings | fault | AMX | log bytes | xz bytes |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, c in sorted(manifest["cases"].items()):
        amx = "yes" if "AMX_INT8 = 1" in c.get("cpu", "") else "no"
        lines.append(f"| `{name}` | {c['preset']}, {c['seed']} | {c['gguf_outtype']} | {c['prompt']} | {c['settings']} | "
                     f"{c['fault'] or '-'} | {amx} | {c['log_bytes']} | {c['xz_bytes']} |")
    if manifest.get("crashes"):
        lines += ["", "Runs that crash (recorded here, no log committed):", ""]
        for name, c in sorted(manifest["crashes"].items()):
            lines.append(f"- `{name}`: {c['what']}. Exit status {c['exit_status']} (negative: killed by that signal); "
                         f"the last tensor printed: `{c['last_tensor']}`  \n  `{c['command']}`")
    lines += ["", "Exact commands (the model and prompt file names as on the generating machine):", ""]
    for name, c in sorted(manifest["cases"].items()):
        lines.append(f"- `{name}`: {c['what']}  \n  `{c['command']}`")
    return "\n".join(lines) + "\n"


def source_version() -> dict:
    """Which llama.cpp this is. The sdist carries no git commit (and cmake's build-info would name
    the local repo build.sh makes), so: the sdist's version and sha256, and the versions in CMake."""
    import hashlib
    import re

    version = os.environ.get("LLAMA_CPP_PYTHON_VERSION", "0.3.36")
    info = {"llama_cpp_python_sdist": version}
    sdist = LLAMACPP_DIR / "sdist" / f"llama_cpp_python-{version}.tar.gz"
    if sdist.is_file():
        info["sdist_sha256"] = hashlib.sha256(sdist.read_bytes()).hexdigest()
    for key, cmake in (("llama_version", SRC / "CMakeLists.txt"), ("ggml_version", SRC / "ggml" / "CMakeLists.txt")):
        parts = dict(re.findall(r"set\((?:LLAMA|GGML)_VERSION_(MAJOR|MINOR|PATCH)\s+(\d+)\)", cmake.read_text()))
        info[key] = ".".join(parts[k] for k in ("MAJOR", "MINOR", "PATCH"))
    return info


if __name__ == "__main__":
    sys.exit(main())
