"""The dump kit (kit/): the C header, the Rust module and the numpy helper each write a
safetensors dump that `compare` reads and matches against this package's run; a perturbed
tensor diverges at its stage; f16/bf16 bits are the correctly rounded ones; metadata
round-trips; writes are atomic. The compiled writers are built here with cc and rustc."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import SEED_IDS, require_tool
from mlx_tinyllama import refs as R
from mlx_tinyllama import taps as T
from mlx_tinyllama.trace import main as cli

REPO = Path(__file__).resolve().parents[1]
KIT = REPO / "kit"

_REQUIRE_COMPILERS = os.environ.get("MLX_TINYLLAMA_REQUIRE_COMPILERS") == "1"


def _rustcs() -> list[str]:
    """Every distinct rustc to build with: the one on PATH (or $RUSTC), and Debian's 1.63 when present,
    so that the module is proven to build with the oldest rustc the kit promises."""
    found = [os.environ.get("RUSTC") or shutil.which("rustc"), "/usr/bin/rustc"]
    out = []
    for r in found:
        if r and os.path.isfile(r) and os.path.realpath(r) not in [os.path.realpath(o) for o in out]:
            out.append(r)
    return out


@pytest.fixture(scope="module")
def c_writer(tmp_path_factory) -> Path:
    cc = require_tool(os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang"),
               "C compiler (cc)")
    exe = tmp_path_factory.mktemp("c") / "raw_dump"
    subprocess.run([cc, "-std=c99", "-Wall", "-Wextra", "-Werror", "-O2", "-o", str(exe),
                    str(KIT / "examples" / "raw_dump.c")], check=True)
    return exe


@pytest.fixture(scope="module")
def rust_writers(tmp_path_factory) -> list[Path]:
    rustcs = _rustcs()
    require_tool(rustcs[0] if rustcs else None, "Rust compiler (rustc)")
    exes = []
    for k, rustc in enumerate(rustcs):
        exe = tmp_path_factory.mktemp("rust") / f"raw_dump_{k}"
        subprocess.run([rustc, "--edition", "2018", "-O", "-D", "warnings", "-o", str(exe),
                        str(KIT / "examples" / "raw_dump.rs")], check=True)
        exes.append(exe)
    return exes


def _writers(request, kind: str) -> list[list[str]]:
    if kind == "c":
        return [[str(request.getfixturevalue("c_writer"))]]
    if kind == "rust":
        return [[str(e)] for e in request.getfixturevalue("rust_writers")]
    return [[sys.executable, str(KIT / "examples" / "raw_dump.py")]]


@pytest.fixture(scope="module")
def reference_tensors(tiny_dir) -> dict[str, np.ndarray]:
    """Every tap of this package's float32 run of synthetic:tiny on the seed's ids."""
    from mlx_tinyllama import sources
    from mlx_tinyllama.compare import run_side

    return run_side(sources.load("synthetic:tiny", "float32"), SEED_IDS).tensors


def _write_raw(tmp: Path, tensors: dict[str, np.ndarray]) -> tuple[Path, Path]:
    manifest, data = tmp / "manifest.txt", tmp / "data.f32"
    with open(manifest, "w") as m, open(data, "wb") as d:
        for name, x in tensors.items():
            m.write(f"{name} {x.ndim} {' '.join(str(s) for s in x.shape)}\n")
            d.write(np.ascontiguousarray(x, "<f4").tobytes())
    return manifest, data


def _run_writer(cmd, tmp, tensors, store="f32", tokens=SEED_IDS, position=0) -> Path:
    manifest, data = _write_raw(tmp, tensors)
    out = tmp / f"dump-{store}.safetensors"
    subprocess.run([*cmd, str(manifest), str(data), str(out), store, ",".join(map(str, tokens)), str(position)],
                   check=True)
    return out


def _compare(dump: Path, tmp: Path, *extra) -> tuple[int, dict]:
    out = tmp / f"{dump.stem}.json"
    rc = cli(["compare", "--against", str(dump), "--model", "synthetic:tiny", "--dtype", "float32",
              "--json", str(out), *extra])
    return rc, json.loads(out.read_text())


KINDS = ["c", "rust", "python"]


@pytest.mark.parametrize("kind", KINDS)
def test_writer_dump_matches_reference_and_a_perturbed_one_diverges(request, kind, tmp_path, reference_tensors):
    for cmd in _writers(request, kind):
        dump = _run_writer(cmd, tmp_path, reference_tensors)
        rc, result = _compare(dump, tmp_path)
        assert rc == 0 and result["status"] == "match", result["first_divergence"]
        assert [s["tap"] for s in result["stages"]] == T.tap_names(2)  # every stage read under its canonical name
        assert result["prompt"]["ids"] == SEED_IDS  # from the dump's metadata: no --token-ids given

        bad = dict(reference_tensors)
        bad["layers.1.mlp.up"] = bad["layers.1.mlp.up"] * np.float32(1.01)
        rc, result = _compare(_run_writer(cmd, tmp_path, bad), tmp_path)
        assert rc == 1 and result["first_divergence"]["tap"] == "layers.1.mlp.up"


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("store,dtype", [("f16", "float16"), ("bf16", "bfloat16")])
def test_half_precision_dump_matches_within_its_tolerance(request, kind, store, dtype, tmp_path, reference_tensors):
    """An fp16/bf16 dump of the fp32 run: compared with the half-precision tolerance (the dump's
    metadata says its dtype), it matches; the same values judged as float32 do not."""
    for cmd in _writers(request, kind):
        dump = _run_writer(cmd, tmp_path, reference_tensors, store)
        side = R.load(dump)[0]
        assert side.dtype == dtype
        rc, result = _compare(dump, tmp_path)
        assert rc == 0, result["first_divergence"]
        assert result["first_nonfinite"] is None  # fp16's -inf mask values are masks, not overflows
        rc, result = _compare(dump, tmp_path, "--against-dtype", "float32")
        assert rc == 1


EDGE = np.array([0.0, -0.0, 1.0, -2.5, 65504.0, 65520.0, 1e6, -1e6, 6.0e-5, 6.1e-8, 2.0e-8, 3.0e-8, 1e-40,
                 1.0 + 2.0 ** -11, 1.0 + 3 * 2.0 ** -11, 1.0 + 2.0 ** -8, 1.0 + 3 * 2.0 ** -8, 3.14159265,
                 np.inf, -np.inf, np.nan, 3.4e38, -1.17e-38, 0.1], np.float32)


@pytest.mark.parametrize("kind", KINDS)
def test_half_precision_bits_are_correctly_rounded(request, kind, tmp_path):
    """Ties to even, subnormals, overflow to Inf, NaN: the same bits as numpy's float16 cast and
    MLX's bfloat16 cast."""
    import mlx.core as mx

    rng = np.random.default_rng(0)
    values = np.concatenate([EDGE, (rng.standard_normal(2000) * 10.0 ** rng.uniform(-9, 6, 2000)).astype(np.float32)])
    with np.errstate(over="ignore"):  # overflow to Inf is one of the cases
        f16 = values.astype(np.float16)
    want = {"f16": f16.view(np.uint16),
            "bf16": np.array(mx.array(values).astype(mx.bfloat16).view(mx.uint16))}
    for cmd in _writers(request, kind):
        for store, tag in (("f16", "F16"), ("bf16", "BF16")):
            dump = _run_writer(cmd, tmp_path, {"edge": values}, store)
            got_tag, shape, bits = _raw_tensor(dump, "edge")
            assert (got_tag, shape) == (tag, [values.size])
            nan = np.isnan(values)
            assert (bits[~nan] == want[store][~nan]).all(), values[bits != want[store]]
            exp_mask, mant_mask = (0x7C00, 0x03FF) if store == "f16" else (0x7F80, 0x007F)
            assert ((bits[nan] & exp_mask) == exp_mask).all() and (bits[nan] & mant_mask).all()  # NaN stays NaN


def _raw_tensor(path: Path, name: str) -> tuple[str, list[int], np.ndarray]:
    """A tensor's dtype tag, shape and raw little-endian 16-bit words, read by hand from the file."""
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    info = json.loads(raw[8:8 + n])[name]
    start, end = info["data_offsets"]
    return info["dtype"], info["shape"], np.frombuffer(raw[8 + n + start:8 + n + end], "<u2")


@pytest.mark.parametrize("kind", KINDS)
def test_metadata_round_trips(request, kind, tmp_path):
    from safetensors import safe_open

    tokens = [1, 529, 29989, 0, 31999]
    for cmd in _writers(request, kind):
        dump = _run_writer(cmd, tmp_path, {"layers.0.out": np.ones((5, 4), np.float32)}, "bf16", tokens, 41)
        with safe_open(str(dump), "numpy") as f:
            meta = f.metadata()
        assert json.loads(meta["tokens"]) == tokens
        assert meta["position"] == "41" and meta["dtype"] == "bfloat16"
        side = R.load(dump)[0]
        assert side.ids == tokens and side.dtype == "bfloat16" and side.provenance["metadata"]["position"] == "41"
        big = [0, 2147483647, -2147483648, 7]  # the widest int32 ids
        with safe_open(str(_run_writer(cmd, tmp_path, {"embed": np.ones((1, 2), np.float32)}, "f32", [], 0)),
                       "numpy") as f:
            assert json.loads(f.metadata()["tokens"]) == []
        if kind == "c":  # Rust's and Python's ids are unsigned / unbounded; C's int32_t edges are checked here
            with safe_open(str(_run_writer(cmd, tmp_path, {"embed": np.ones((1, 2), np.float32)}, "f32", big, 0)),
                           "numpy") as f:
                assert json.loads(f.metadata()["tokens"]) == big


@pytest.mark.parametrize("kind", KINDS)
def test_write_is_atomic(request, kind, tmp_path):
    """The dump appears under its name whole, replacing an older one, with no temp file left; a
    failed write leaves nothing."""
    for cmd in _writers(request, kind):
        work = tmp_path / kind
        work.mkdir(exist_ok=True)
        out = work / "dump-f32.safetensors"
        out.write_bytes(b"old")
        _run_writer(cmd, work, {"embed": np.arange(6, dtype=np.float32).reshape(2, 3)})
        assert sorted(p.name for p in work.iterdir()) == ["data.f32", "dump-f32.safetensors", "manifest.txt"]
        assert R.read_tensor_file(out)["embed"].tolist() == [[0, 1, 2], [3, 4, 5]]
        manifest, data = _write_raw(work, {"embed": np.zeros((2, 3), np.float32)})
        missing_dir = work / "no-such-dir" / "dump.safetensors"
        rc = subprocess.run([*cmd, str(manifest), str(data), str(missing_dir), "f32", "1", "0"],
                            capture_output=True).returncode
        assert rc != 0 and not missing_dir.parent.exists()


def test_rust_module_builds_with_debian_rustc_163(rust_writers):
    """The kit promises Rust 1.63 (Debian's rustc package): when that compiler is here, it built."""
    versions = [subprocess.run([r, "--version"], capture_output=True, text=True).stdout for r in _rustcs()]
    if not any(v.startswith("rustc 1.63") for v in versions):
        if _REQUIRE_COMPILERS and os.path.isfile("/usr/bin/rustc"):
            pytest.fail(f"Debian's rustc is not 1.63: {versions}")
        pytest.skip(f"no rustc 1.63 here ({versions})")
    assert len(rust_writers) == len(versions)


def test_kit_stage_tables_are_the_tap_table():
    """The C, Rust and Python copies of the stage names equal mlx_tinyllama/taps.py's table."""
    want_layer = [s.name for s in T.LAYER_STAGES]
    want_global = [s.name for s in T.GLOBAL_HEAD + T.GLOBAL_TAIL]
    c = (KIT / "tap_dump.h").read_text()
    rs = (KIT / "tap_dump.rs").read_text()
    py = (KIT / "tap_dump.py").read_text()

    def strings(text, start, end):
        block = text[text.index(start):]
        return re.findall(r'"([^"]+)"', block[:block.index(end)])

    assert strings(c, "TAP_DUMP_LAYER_STAGES[TAP_DUMP_N_LAYER_STAGES] = {", "};") == want_layer
    assert strings(c, "TAP_DUMP_GLOBAL_STAGES[TAP_DUMP_N_GLOBAL_STAGES] = {", "};") == want_global
    assert f"#define TAP_DUMP_N_LAYER_STAGES {len(want_layer)}" in c
    assert strings(rs, "pub const LAYER_STAGES", "];") == want_layer
    assert strings(rs, "pub const GLOBAL_STAGES", "];") == want_global
    assert strings(py, "LAYER_STAGES = (", ")\n") == want_layer
    assert strings(py, "GLOBAL_STAGES = (", ")\n") == want_global


def test_minus_inf_is_a_mask_value_in_masked_scores():
    """float32's minimum becomes -inf in an fp16 dump, and engines mask with -inf: in masked scores
    it is masked, not a non-finite value; -inf where the reference is not masked, or NaN, still counts."""
    from mlx_tinyllama.metrics import metrics

    lo = float(np.finfo(np.float32).min)
    ref = np.array([[1.0, lo], [0.5, 2.0]])
    m = metrics(np.array([[1.0, -np.inf], [0.5, 2.0]]), ref, masked=True)
    assert (m["mask_mismatch"], m["nonfinite"], m["nmse"], m["first_nonfinite_a"]) == (0, 0, 0.0, None)
    m = metrics(np.array([[1.0, -np.inf], [-np.inf, 2.0]]), ref, masked=True)
    assert m["mask_mismatch"] == 1 and m["nonfinite"] == 0
    m = metrics(np.array([[1.0, lo], [np.nan, 2.0]]), ref, masked=True)
    assert m["nonfinite"] == 1 and m["nmse"] == np.inf
    assert metrics(np.array([[1.0, -np.inf]]), np.array([[1.0, 3.0]]))["nonfinite"] == 1  # unmasked stages


def test_c_header_compiles_as_cpp_in_two_translation_units(tmp_path):
    """The header is for C++ engines too: declarations in every file, the implementation in one."""
    cxx = require_tool(os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++") or shutil.which("clang++"),
                       "C++ compiler (c++)")
    (tmp_path / "impl.cpp").write_text('#define TAP_DUMP_IMPLEMENTATION\n#include "tap_dump.h"\n')
    (tmp_path / "main.cpp").write_text(
        '#include "tap_dump.h"\n#include <vector>\n'
        'int main(int argc, char **argv) {\n'
        '  (void)argc; tap_dump *d = tap_dump_new(); std::vector<float> x(6, 0.5f); int64_t s[2] = {2, 3};\n'
        '  char name[32]; tap_dump_name(name, sizeof name, 0, TAP_DUMP_LAYER_STAGES[0]);\n'
        '  int dup = tap_dump_add_f32(d, name, x.data(), 2, s, TAP_DUMP_F32) == 0\n'
        '            && tap_dump_add_f32(d, name, x.data(), 2, s, TAP_DUMP_F16) == -1;\n'
        '  int rc = tap_dump_write(d, argv[1]); tap_dump_free(d); return dup && rc == 0 ? 0 : 1; }\n')
    exe = tmp_path / "cpp_dump"
    subprocess.run([cxx, "-std=c++11", "-Wall", "-Wextra", "-Werror", f"-I{KIT}", "-o", str(exe),
                    str(tmp_path / "impl.cpp"), str(tmp_path / "main.cpp")], check=True)
    out = tmp_path / "d.safetensors"
    subprocess.run([str(exe), str(out)], check=True)  # exit 0: a repeated name was refused
    assert R.read_tensor_file(out)["layers.0.attn_norm"].tolist() == [[0.5] * 3] * 2


def test_python_helper_refuses_repeated_names_and_unknown_dtypes(tmp_path):
    import importlib.util

    spec = importlib.util.spec_from_file_location("kit_tap_dump", KIT / "tap_dump.py")
    tap_dump = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tap_dump)
    d = tap_dump.TapDump(tokens=[1, 2], position=3, dtype="fp16")
    d.add(tap_dump.name(1, "out"), np.zeros((2, 4)))
    with pytest.raises(ValueError, match="already added"):
        d.add("layers.1.out", np.zeros((2, 4)))
    with pytest.raises(ValueError, match="store_as"):
        d.add("embed", np.zeros((2, 4)), store_as="int8")
    d.write(tmp_path / "d.safetensors")
    side = R.load(tmp_path / "d.safetensors")[0]
    assert side.dtype == "float16" and side.ids == [1, 2] and list(side.tensors) == ["layers.1.out"]


def test_c_dump_of_a_faulty_engine_is_localized_and_diagnosed(c_writer, tiny_dir, tmp_path):
    """Replay and diagnosis on a dump written by the C header: the NumPy engine's tensors with
    interleaved RoPE in layer 1, handed to raw_dump.c."""
    from numpy_engine import Engine

    engine = Engine(tiny_dir, ["rope_interleaved@1"])
    engine.prefill(SEED_IDS)
    dump = _run_writer([str(c_writer)], tmp_path, {n: x.astype(np.float32) for n, x in engine.dumped().items()})
    rc, result = _compare(dump, tmp_path)
    assert rc == 1 and result["localized"]["stage"] == "layers.1.attn.q_rope"
    assert [d["transform"] for d in result["diagnosis"]] == ["rope_interleaved"]
    assert len(result["coverage"]["compared"]) == len(T.tap_names(2))


def test_rust_step_dumps_of_a_faulty_decode_are_localized(rust_writers, tiny_dir, tmp_path):
    """Decode steps written by the Rust module, one file per step with its position metadata:
    positions that do not advance are found at the second step and diagnosed as rope_offset:-1."""
    from numpy_engine import Engine

    engine = Engine(tiny_dir, ["positions_stuck"])
    taps, ids = engine.prefill(SEED_IDS), list(SEED_IDS)
    steps = tmp_path / "steps"
    steps.mkdir()
    for k in range(3):
        ids.append(int(np.argmax(taps["logits"][-1])))
        taps = engine.step(ids[-1])
        work = tmp_path / f"w{k}"
        work.mkdir()
        out = _run_writer([str(rust_writers[-1])], work, {n: x.astype(np.float32) for n, x in taps.items()}, "f32",
                          ids, len(ids) - 1)
        out.rename(steps / f"step{k}.safetensors")
    json_path = tmp_path / "s.json"
    rc = cli(["compare", "--against-steps", str(steps), "--model", "synthetic:tiny", "--dtype", "float32",
              "--json", str(json_path)])
    result = json.loads(json_path.read_text())
    first = result["first_divergence"]
    assert rc == 1 and (first["position"], first["tap"]) == (len(SEED_IDS) + 1, "layers.0.attn.q_rope")
    assert [d["transform"] for d in first["diagnosis"]] == ["rope_offset:-1"]
    assert result["steps"][0]["status"] == "match"


@pytest.mark.parametrize("kind", KINDS)
def test_fused_tensors_named_by_the_writer_are_split_without_a_map(request, kind, tmp_path, reference_tensors):
    """Each writer names fused tensors (C tap_dump_set_fused, Rust set_fused, Python set_fused) in the
    `fused` metadata: q|k|v of layer 0 concatenated, layer 1's in Megatron's per-KV-group packing,
    gate|up concatenated. compare splits them with no --map and matches every stage; the same dump
    with layer 1's up block off by 1% diverges at layers.1.mlp.up (the block, not gate)."""
    from test_fused import megatron_qkv, _tokens_major

    from mlx_tinyllama import sources

    kv = sources.load("synthetic:tiny", "float32").config.num_key_value_heads
    taps = {t: np.asarray(x, np.float32) for t, x in reference_tensors.items()}

    def fused_dump(cmd, tensors, out_name):
        out, lines = {}, []
        for t, x in tensors.items():
            if t.split(".", 2)[-1] not in ("attn.q", "attn.k", "attn.v", "mlp.gate", "mlp.up"):
                out[t] = x
        for i in range(2):
            p = f"layers.{i}."
            q, k, v = (_tokens_major(tensors[p + s]) for s in ("attn.q", "attn.k", "attn.v"))
            out[f"qkv.{i}"] = np.concatenate([q, k, v], -1) if i == 0 else megatron_qkv(q, k, v, kv)
            out[f"gate_up.{i}"] = np.concatenate([tensors[p + "mlp.gate"], tensors[p + "mlp.up"]], -1)
            lines.append(f"@fused qkv.{i} {'concat' if i == 0 else 'grouped'} {p}attn.q,{p}attn.k,{p}attn.v")
            lines.append(f"@fused gate_up.{i} concat {p}mlp.gate,{p}mlp.up")
        manifest, data = _write_raw(tmp_path, out)
        with open(manifest, "a") as m:
            m.write("\n".join(lines) + "\n")
        dump = tmp_path / out_name
        subprocess.run([*cmd, str(manifest), str(data), str(dump), "f32", ",".join(map(str, SEED_IDS)), "0"],
                       check=True)
        return dump

    for cmd in _writers(request, kind):
        dump = fused_dump(cmd, taps, "fused.safetensors")
        meta = R.safetensors_metadata(dump)
        assert json.loads(meta["fused"])["qkv.1"] == {"taps": [f"layers.1.attn.{s}" for s in "qkv"],
                                                      "layout": "grouped"}
        rc, result = _compare(dump, tmp_path)
        assert rc == 0 and result["verdict"]["line"] == f"match: {len(T.tap_names(2))}/{len(T.tap_names(2))} stages"
        bad = dict(taps, **{"layers.1.mlp.up": taps["layers.1.mlp.up"] * np.float32(1.01)})
        rc, result = _compare(fused_dump(cmd, bad, "bad.safetensors"), tmp_path)
        assert rc == 1 and result["first_divergence"]["tap"] == "layers.1.mlp.up"
        assert {s["tap"]: s["ok"] for s in result["stages"]}["layers.1.mlp.gate"]
        # a fused tensor of one tap is refused by the writer itself (exit 2 of the example)
        manifest, data = _write_raw(tmp_path, {"embed": np.ones((1, 2), np.float32)})
        with open(manifest, "a") as m:
            m.write("@fused embed concat embed\n")
        rc = subprocess.run([*cmd, str(manifest), str(data), str(tmp_path / "x.safetensors"), "f32", "1", "0"],
                            capture_output=True).returncode
        assert rc != 0 and not (tmp_path / "x.safetensors").exists()
