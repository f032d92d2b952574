"""Bounds (issue 24 items 2-5): children bounded in time and output, parsers bounded by the bytes
present, directories written as a set, manifests and indexes that name only files inside their
directory. Every probe: one line, its documented exit code, inputs and earlier outputs intact,
bounded time and memory. Fake children are small Python scripts (portable to macOS)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from conftest import REPO

from mlx_tinyllama import child, trace
from mlx_tinyllama.errors import UserError

posix_only = pytest.mark.skipif(os.name != "posix", reason="process groups are POSIX's")


def one_error(rc, err, code=2, words=None):
    lines = [ln for ln in err.splitlines() if ln.strip() and not ln.startswith("running:")]
    assert rc == code and len(lines) == 1 and lines[0].startswith("error:") and "Traceback" not in err, (rc, err)
    if words:
        assert words in lines[0], lines[0]
    return lines[0]


def script(tmp_path, name, body) -> list[str]:
    p = tmp_path / f"{name}.py"
    p.write_text(textwrap.dedent(body))
    return [sys.executable, str(p)]


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # a zombie still answers kill(0): read its state where /proc exists
    stat = Path(f"/proc/{pid}/stat")
    return not (stat.exists() and stat.read_text().split(")")[-1].split()[0] == "Z")


# A child that starts a grandchild (which would outlive a plain kill of the child), says both pids, then
# does what its mode says.
CHILD = """
import os, subprocess, sys, time
grand = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
open(sys.argv[2], "w").write(f"{os.getpid()} {grand.pid}")
mode = sys.argv[1]
if mode == "hang":
    time.sleep(120)
elif mode == "flood":
    line = "x" * 1023 + "\\n"
    while True:
        sys.stdout.write(line)
elif mode == "crash":
    print("loading model"); print("GGML_ASSERT(failed)", file=sys.stderr); sys.stdout.flush(); os._exit(134)
elif mode == "slow":
    time.sleep(1.5); print("all good"); sys.exit(0)
"""


@posix_only
@pytest.mark.parametrize("mode,words", [("hang", "ran longer than 2 s"), ("flood", "more than 1 MB")])
def test_a_hanging_or_flooding_child_is_stopped_with_its_group(tmp_path, mode, words):
    pids = tmp_path / "pids"
    t0 = time.monotonic()
    with pytest.raises(UserError, match=words):
        child.run_bounded([*script(tmp_path, "child", CHILD), mode, str(pids)], 2, 1 << 20, "fake")
    assert time.monotonic() - t0 < 2 + 2 * child.GRACE_S + 5  # bounded time
    me, grand = map(int, pids.read_text().split())
    time.sleep(0.2)
    assert not alive(me) and not alive(grand)  # the whole group, grandchild included


@posix_only
def test_a_crashing_child_gives_its_code_and_output_and_a_slow_one_finishes(tmp_path):
    pids = tmp_path / "pids"
    r = child.run_bounded([*script(tmp_path, "child", CHILD), "crash", str(pids)], 30, 1 << 20, "fake")
    assert r.returncode == 134 and "GGML_ASSERT" in r.output and "loading model" in r.output
    assert not alive(int(pids.read_text().split()[1]))  # what it left running is ended too
    r = child.run_bounded([*script(tmp_path, "child", CHILD), "slow", str(pids)], 30, 1 << 20, "fake")
    assert r.returncode == 0 and r.output == "all good\n" and r.seconds >= 1.5


def test_a_child_that_cannot_start_is_one_line(tmp_path):
    with pytest.raises(UserError, match="cannot run"):
        child.run_bounded([str(tmp_path / "nothing")], 5, 1 << 20, "fake")


@posix_only
def test_ctrl_c_and_sigterm_end_the_childs_group(tmp_path):
    """The parent interrupted (Ctrl-C, or SIGTERM as the CLI turns it into one): no child survives."""
    pids = tmp_path / "pids"
    parent = script(tmp_path, "parent", f"""
        import sys
        sys.path.insert(0, {str(REPO)!r})
        from mlx_tinyllama import child, trace
        try:
            with trace._sigterm_as_interrupt():
                child.run_bounded([sys.executable, {str(tmp_path / 'child.py')!r}, "hang", {str(pids)!r}], 60,
                                  1 << 20, "fake")
        except KeyboardInterrupt:
            sys.exit(130)
        """)
    script(tmp_path, "child", CHILD)
    for sig in (signal.SIGINT, signal.SIGTERM):
        pids.unlink(missing_ok=True)
        p = subprocess.Popen(parent)
        try:
            deadline = time.monotonic() + 30
            while not (pids.exists() and pids.read_text()) and time.monotonic() < deadline:
                time.sleep(0.05)
            me, grand = map(int, pids.read_text().split())
            p.send_signal(sig)
            assert p.wait(timeout=30) == 130
        finally:
            if p.poll() is None:
                p.kill()
        time.sleep(0.2)
        assert not alive(me) and not alive(grand), sig


# --- through the llamacpp command ----------------------------------------------------------------


@pytest.fixture(scope="module")
def gguf(tmp_path_factory):
    from mlx_tinyllama.gguf_write import convert
    from mlx_tinyllama.synthetic import materialize

    out = tmp_path_factory.mktemp("bounds_gguf") / "tiny-f32.gguf"
    convert(materialize("tiny", 0), out, out_type="f32")
    return out


def fake_llamacpp(tmp_path, body: str) -> Path:
    p = tmp_path / "llama-eval-callback"
    p.write_text(f"#!{sys.executable}\n" + textwrap.dedent(body))
    p.chmod(0o755)
    return p


@posix_only
@pytest.mark.parametrize("body,options,words", [
    ("import time\ntime.sleep(60)\n", ["--timeout", "1"], "ran longer than 1 s; it was stopped (--timeout"),
    ("import sys\nwhile True: sys.stdout.write('y' * 4096)\n", ["--max-log-mb", "1"], "more than 1 MB"),
    ("import sys\nprint('llama_model_load: error loading model'); sys.exit(1)\n", [], "exited with 1: llama_model_load"),
    ("import os, signal\nos.kill(os.getpid(), signal.SIGSEGV)\n", [], "killed by signal 11"),
])
def test_llamacpp_command_bounds_its_child(tmp_path, gguf, capfd, body, options, words):
    binary = fake_llamacpp(tmp_path, body)
    log = tmp_path / "kept.log"
    log.write_text("an earlier log\n")
    before = gguf.read_bytes()
    t0 = time.monotonic()
    capfd.readouterr()
    rc = trace.main(["llamacpp", "--gguf", str(gguf), "--llama-cpp", str(binary), "--prompt", "hi",
                     "--log", str(log), *options])
    one_error(rc, capfd.readouterr().err, 2, words)
    assert time.monotonic() - t0 < 30
    assert log.read_text() == "an earlier log\n" and gguf.read_bytes() == before


@pytest.mark.parametrize("option", [["--timeout", "0"], ["--timeout", "nan"], ["--max-log-mb", "-1"]])
def test_llamacpp_limits_must_be_positive(tmp_path, gguf, capfd, option):
    capfd.readouterr()
    rc = trace.main(["llamacpp", "--gguf", str(gguf), "--llama-cpp", str(tmp_path), "--prompt", "hi", *option])
    one_error(rc, capfd.readouterr().err, 2, "must be positive")


# --- parsers bounded by the bytes present ----------------------------------------------------------


def _block(name: str, shape: str, rows: int = 0, width: int = 6) -> str:
    body = "".join("  [" + ", ".join(["0.5000"] * width) + "]\n" for _ in range(rows))
    return f"ggml_debug: {name} = (f32) MUL_MAT(a, b) = {{{shape}}}\n{body}  sum = 1.0\n"


def _peak_mb(fn) -> tuple[object, float]:
    import tracemalloc

    tracemalloc.start()
    try:
        try:
            out = fn()
        except UserError as e:
            out = e
        return out, tracemalloc.get_traced_memory()[1] / 1e6
    finally:
        tracemalloc.stop()


def test_log_headers_declaring_big_shapes_allocate_nothing_until_refused():
    """The issue's probe: a few KB of `{8192, 8192}` blocks took over 2 GB. Blocks without values
    allocate nothing; blocks with values are refused once their declared total passes the bound,
    before any is made dense."""
    from mlx_tinyllama.refs.llamacpp import MAX_LOG_TOTAL_ELEMENTS, parse_llamacpp_log

    headers = "".join(_block(f"ffn_up-{i}", "8192, 8192") for i in range(200))  # sums only
    side, peak = _peak_mb(lambda: parse_llamacpp_log(headers))
    assert not isinstance(side, UserError) and peak < 20, peak
    assert {i.selector.kind for i in side.items} == {"sum"} and len(side.items) == 200
    printed = "".join(_block(f"ffn_up-{i}", "8192, 8192", rows=6) for i in range(5))
    assert len(printed) < 4096 and 5 * 8192 * 8192 > MAX_LOG_TOTAL_ELEMENTS
    err, peak = _peak_mb(lambda: parse_llamacpp_log(printed))
    assert isinstance(err, UserError) and "values in all" in str(err) and peak < 20, (err, peak)
    # the same blocks within the bound still parse (a clean case of the same shape, not flagged)
    side, _ = _peak_mb(lambda: parse_llamacpp_log(_block("ffn_up-0", "64, 8", rows=6)))
    assert [i.selector.kind for i in side.items] == ["full", "sum"] and side.items[0].known.sum() == 36


def test_log_rows_beyond_the_shape_are_refused_without_reading_on():
    from mlx_tinyllama.refs.llamacpp import parse_llamacpp_tensors

    with pytest.raises(UserError, match="should print 6 rows of 6 values"):
        parse_llamacpp_tensors(_block("ffn_up-0", "64, 8", rows=7))
    with pytest.raises(UserError, match="should print"):
        parse_llamacpp_tensors(_block("ffn_up-0", "64, 8", rows=6, width=5))


@pytest.fixture
def ref_json(tmp_path):
    """A tiny stats reference to compare logs against."""
    out = tmp_path / "ref.json"
    assert trace.main(["run", "--model", "synthetic:tiny", "--prompt", "hi", "--json", str(out)]) == 0
    return out


@posix_only
def test_special_files_and_oversized_logs_are_refused(tmp_path, ref_json, capfd, monkeypatch):
    fifo = tmp_path / "llama.log"
    os.mkfifo(fifo)  # a reader would block forever
    cases = [(fifo, "not a regular file")]
    if Path("/dev/zero").exists():
        cases.append((Path("/dev/zero"), "not a regular file"))  # a reader would never end
    from mlx_tinyllama.refs import loaders

    big = tmp_path / "big.log"
    big.write_bytes(_block("ffn_up-0", "64, 8", rows=6).encode() * 40)
    monkeypatch.setattr(loaders, "MAX_LOG_BYTES", 4096)
    cases.append((big, "a log is read up to 4096"))
    for path, words in cases:
        capfd.readouterr()
        t0 = time.monotonic()
        rc = trace.main(["compare", "--ref", str(ref_json), "--against", str(path)])
        one_error(rc, capfd.readouterr().err, 2, words)
        assert time.monotonic() - t0 < 30


# --- vectors: a directory written as a set; manifests that say only what they may ------------------


def tree(d: Path) -> dict:
    return {p.name: p.read_bytes() for p in sorted(Path(d).iterdir())}


def siblings(d: Path) -> list[str]:
    return sorted(p.name for p in d.parent.iterdir() if p.name.startswith(f".{d.name}."))


def vwrite(capfd, d, *more):
    capfd.readouterr()
    rc = trace.main(["vectors", "write", str(d), "--model", "synthetic:tiny", "--quick", *more])
    return rc, capfd.readouterr().err


@pytest.fixture
def written(tmp_path, capfd):
    d = tmp_path / "vec"
    rc, err = vwrite(capfd, d)
    assert rc == 0, err
    return d


def test_vectors_never_replace_a_directory_they_did_not_write(tmp_path, written, capfd):
    from mlx_tinyllama.synthetic import cache_root, materialize

    app = tmp_path / "webapp"
    app.mkdir()
    (app / "manifest.json").write_text('{"name": "my app", "icons": []}')  # a web app's manifest
    (app / "index.html").write_text("<html></html>")
    extra = tmp_path / "extra"
    extra.mkdir()
    for name, content in tree(written).items():
        (extra / name).write_bytes(content)
    (extra / "notes.txt").write_text("mine")  # a vectors directory the user added a file to
    model = materialize("tiny", 0)
    cases = [(app, "not a vectors directory this tool wrote"), (extra, "notes.txt"),
             (model, "inside the synthetic model cache"), (cache_root() / "vectors", "inside the synthetic model cache")]
    for d, words in cases:
        before = tree(d) if d.exists() else None
        rc, err = vwrite(capfd, d)
        one_error(rc, err, 2, words)
        assert (tree(d) if d.exists() else None) == before and siblings(d) == []


def test_vectors_rewrite_replaces_the_whole_set(written, capfd):
    """Another dtype's vectors over the earlier ones: every file is the new write's (the manifest
    names each, and each holds what the manifest says), nothing of the earlier is left."""
    from mlx_tinyllama.vectors.store import Vectors

    before = tree(written)
    rc, err = vwrite(capfd, written, "--dtype", "float32")
    assert rc == 0, err
    after = Vectors(written)
    assert after.manifest["dtype"] == "float32" and tree(written) != before and siblings(written) == []
    assert set(tree(written)) == {p.name for p in after.paths()}
    for case in after.cases:
        assert after.golden(case).shape == tuple(case["shapes"]["y"])  # no earlier file under a new manifest
        assert all(v.dtype.name in ("float32", "int32", "uint32", "int64") for v in after.inputs(case).values())


@pytest.mark.parametrize("where", ["second file", "manifest", "swap"])
def test_vectors_write_interrupted_leaves_the_earlier_set(written, capfd, monkeypatch, where):
    from mlx_tinyllama.vectors import store, write

    before = tree(written)
    if where == "swap":  # the new directory cannot take the place: the earlier one is put back
        real = os.replace

        def replace(a, b):
            if Path(a).name.endswith(".new"):
                raise OSError(28, "No space left on device")
            return real(a, b)
        monkeypatch.setattr(write.os, "replace", replace)
    else:
        calls = []
        target = write if where == "manifest" else store
        name = "write_text" if where == "manifest" else "save_safetensors"
        real = getattr(target, name)

        def interrupted(*a, **k):
            calls.append(a)
            if where == "manifest" or len(calls) == 2:
                raise KeyboardInterrupt
            return real(*a, **k)
        monkeypatch.setattr(target, name, interrupted)
        if where != "manifest":
            monkeypatch.setattr(write, "save_safetensors", interrupted)
    rc, err = vwrite(capfd, written, "--dtype", "float32")
    assert rc == (1 if where == "swap" else 130), err
    assert tree(written) == before and siblings(written) == []


BAD_CASES = [  # (change to case 0, words)
    ({"tolerance": {"nmse": "1e-3", "n": 1, "kappa": 0}}, "tolerance.nmse"),
    ({"tolerance": {"nmse": None, "n": 1, "kappa": 0}}, "tolerance.nmse"),
    ({"tolerance": {"nmse": -1, "n": 1, "kappa": 0}}, "tolerance.nmse"),
    ({"tolerance": {"nmse": 1e300, "n": 1, "kappa": 0}}, "tolerance.nmse"),
    ({"tolerance": {"nmse": 0.5, "n": 1, "kappa": 0}}, "an all-zero result has NMSE 1"),
    ({"tolerance": {"nmse": 1e-3, "n": "x", "kappa": 0}}, "tolerance.n"),
    ({"tolerance": None}, "tolerance.nmse/n/kappa"),
    ({"shapes": [[4, 4]]}, "shapes must be an object"),
    ({"shapes": {"x": [4, -1]}}, "shapes must be an object"),
    ({"params": {}}, "params lacks eps"),
    ({"params": None}, "params must be an object"),
    ({"inputs": ["x"]}, "inputs must be an object"),
    ({"file": "../outside.safetensors"}, "inside the vectors directory"),
    ({"file": "/etc/passwd"}, "inside the vectors directory"),
    ({"file": "sub/dir.safetensors"}, "inside the vectors directory"),
    ({"name": 3}, "name must be a string"),
]


@pytest.mark.parametrize("change,words", BAD_CASES, ids=[w + str(i) for i, (_, w) in enumerate(BAD_CASES)])
def test_bad_manifests_are_one_line(tmp_path, written, capfd, change, words):
    d = tmp_path / "bad"
    d.mkdir()
    for name, content in tree(written).items():
        (d / name).write_bytes(content)
    manifest = json.loads((d / "manifest.json").read_text())
    first = next(i for i, c in enumerate(manifest["cases"]) if c["op"] == "rms_norm")
    manifest["cases"][first].update(change)
    (d / "manifest.json").write_text(json.dumps(manifest))
    before = tree(d)
    capfd.readouterr()
    rc = trace.main(["vectors", "run", str(d), "--engine", f"{REPO / 'tests' / 'numpy_kernels.py'}:clean",
                     "--out", str(tmp_path / "out.safetensors")])
    one_error(rc, capfd.readouterr().err, 2, words)
    assert tree(d) == before and not (tmp_path / "out.safetensors").exists()


ENGINES = {
    "returns None": ("def f(op, inputs, params):\n    return None\n", "returned NoneType"),
    "returns text": ("def f(op, inputs, params):\n    return 'ok'\n", "returned str"),
    "syntax error": ("def f(op, inputs, params)\n    return 1\n", "SyntaxError"),
}


@pytest.mark.parametrize("what", list(ENGINES))
def test_bad_engines_are_one_line(tmp_path, written, capfd, monkeypatch, what):
    body, words = ENGINES[what]
    (tmp_path / "bad_engine_mod.py").write_text(body)
    monkeypatch.syspath_prepend(str(tmp_path))
    for spec in (f"{tmp_path / 'bad_engine_mod.py'}:f", "bad_engine_mod:f"):  # a file, and an importable module
        sys.modules.pop("bad_engine_mod", None)
        capfd.readouterr()
        rc = trace.main(["vectors", "run", str(written), "--engine", spec, "--out", str(tmp_path / "o.safetensors")])
        one_error(rc, capfd.readouterr().err, 2, words)
    assert not (tmp_path / "o.safetensors").exists()


def test_the_clean_vectors_and_engine_still_pass(tmp_path, written, capfd):
    """The checks above refuse nothing a correct manifest and engine give."""
    out = tmp_path / "o.safetensors"
    capfd.readouterr()
    rc = trace.main(["vectors", "run", str(written), "--engine", f"{REPO / 'tests' / 'numpy_kernels.py'}:clean",
                     "--out", str(out)])
    assert rc == 0, capfd.readouterr().err
    rc = trace.main(["vectors", "check", str(written), "--results", str(out)])
    assert rc == 0, capfd.readouterr()


# --- dumps of one path: never two writes mixed, never the stale form read --------------------------


def dump_run(path, *more):
    return trace.main(["run", "--model", "synthetic:tiny", "--dtype", "float32", "--taps", "*", "--dump", str(path),
                       *more])


def compare_dump(path, capfd, *more):
    capfd.readouterr()
    rc = trace.main(["compare", "--against", str(path), "--model", "synthetic:tiny", "--dtype", "float32", *more])
    return rc, capfd.readouterr().err


def test_a_sharded_dump_supersedes_a_single_file_dump_and_back(tmp_path, capfd):
    """Issue 21: a stale single-file dump beside a newer sharded dump of the same path was read
    instead of it (match against the earlier run's ids). Each write now removes the other form."""
    from mlx_tinyllama import dump

    path = tmp_path / "taps.safetensors"
    assert dump_run(path, "--token-ids", "1,450,4996") == 0 and path.is_file()  # earlier run: other ids
    assert dump_run(path, "--dump-shard-mb", "0.02") == 0  # the newer run, sharded
    assert not path.exists() and dump.index_path(path).is_file()
    rc, err = compare_dump(path, capfd, "--token-ids", "1,450,4996")  # the earlier run's ids: not this dump's
    assert rc == 2, err
    rc, err = compare_dump(path, capfd)  # its own ids: the clean run is not flagged
    assert rc == 0, err
    shards = sorted(p.name for p in tmp_path.glob("taps-*.safetensors"))
    assert dump_run(path) == 0  # back to one file: the index and its shards go
    assert path.is_file() and not dump.index_path(path).exists() and not list(tmp_path.glob("taps-*")) and shards
    rc, err = compare_dump(path, capfd)
    assert rc == 0, err


def test_both_forms_present_is_refused_not_guessed(tmp_path, capfd):
    from mlx_tinyllama import dump

    path = tmp_path / "taps.safetensors"
    assert dump_run(path, "--dump-shard-mb", "0.02") == 0
    stale = tmp_path / "other.safetensors"
    assert dump_run(stale, "--token-ids", "1,450,4996") == 0
    os.replace(stale, path)  # as a run stopped between its rename and its clean-up would leave it
    before = tree(tmp_path)
    rc, err = compare_dump(path, capfd)
    one_error(rc, err, 2, "two dumps of one path")
    rc, err = compare_dump(dump.index_path(path), capfd)  # the index named: its own shards, read
    assert rc == 0, err
    assert tree(tmp_path) == before


def test_a_shard_of_another_run_is_refused(tmp_path, capfd):
    """A run stopped after renaming its shards but before its index leaves new shards under an
    old index: the generation ids differ, the dump is refused, not mixed."""
    from mlx_tinyllama import dump

    a, b = tmp_path / "a" / "taps.safetensors", tmp_path / "b" / "taps.safetensors"
    a.parent.mkdir()
    b.parent.mkdir()
    assert dump_run(a, "--dump-shard-mb", "0.02") == 0
    assert dump_run(b, "--dump-shard-mb", "0.02", "--token-ids", "1,450,4996") == 0
    os.replace(b.parent / "taps-00002.safetensors", a.parent / "taps-00002.safetensors")
    rc, err = compare_dump(a, capfd)
    one_error(rc, err, 2, "taps-00002.safetensors is not of the dump")
    meta = json.loads(dump.index_path(b).read_text())["metadata"]
    assert len(meta[dump.GENERATION]) == 32


@pytest.mark.parametrize("name", ["../outside.safetensors", "/etc/passwd", "sub/x.safetensors", 3])
def test_index_entries_stay_inside_their_directory(tmp_path, capfd, name):
    from mlx_tinyllama import dump

    path = tmp_path / "d" / "taps.safetensors"
    path.parent.mkdir()
    assert dump_run(path, "--dump-shard-mb", "0.02") == 0
    (tmp_path / "outside.safetensors").write_bytes((path.parent / "taps-00001.safetensors").read_bytes())
    index = json.loads(dump.index_path(path).read_text())
    index["weight_map"]["layers.0.attn.q"] = name
    dump.index_path(path).write_text(json.dumps(index))
    rc, err = compare_dump(path, capfd)
    one_error(rc, err, 2, "outside its directory")


def test_npz_arrays_declaring_more_than_they_hold_are_refused(tmp_path, capfd):
    import io
    import zipfile

    import numpy as np
    from numpy.lib import format as fmt

    from mlx_tinyllama.refs.npz_bounds import check_npz

    header = io.BytesIO()
    fmt.write_array_header_1_0(header, {"descr": "<f4", "fortran_order": False, "shape": (200000, 200000)})
    hostile = tmp_path / "hostile.npz"
    with zipfile.ZipFile(hostile, "w") as z:
        z.writestr("logits.npy", header.getvalue() + b"\0" * 64)  # 150 GB declared, 64 bytes held
    before = hostile.read_bytes()
    err, peak = _peak_mb(lambda: check_npz(hostile))
    assert isinstance(err, UserError) and "holds 64" in str(err) and peak < 20
    capfd.readouterr()
    rc = trace.main(["compare", "--against", str(hostile), "--model", "synthetic:tiny"])
    one_error(rc, capfd.readouterr().err, 2, "declares shape [200000, 200000]")
    assert hostile.read_bytes() == before
    # consistent files pass, compressed or not, of any dtype (not flagged)
    fine = tmp_path / "fine.npz"
    np.savez_compressed(fine, a=np.zeros((300, 300), np.float16), ids=np.arange(5))
    assert check_npz(fine) is None


@posix_only
def test_a_fifo_as_map_is_refused(tmp_path, capfd, ref_json):
    fifo = tmp_path / "map.json"
    os.mkfifo(fifo)
    capfd.readouterr()
    rc = trace.main(["compare", "--ref", str(ref_json), "--against", str(ref_json), "--map", str(fifo)])
    one_error(rc, capfd.readouterr().err, 2, "not a regular file")


@posix_only
def test_step_dumps_and_tensor_files_that_are_fifos_are_refused(tmp_path):
    """The same checks for every tensor reader (step dumps read files directly)."""
    from mlx_tinyllama.refs.loaders import read_tensor_file

    fifo = tmp_path / "step-0001.safetensors"
    os.mkfifo(fifo)
    with pytest.raises(UserError, match="not a regular file"):
        read_tensor_file(fifo)


@pytest.mark.parametrize("name", ["../outside.safetensors", "/tmp/x.safetensors", "sub/m.safetensors", None, 3])
def test_reference_manifest_tensors_stay_beside_it(tmp_path, capfd, name):
    import shutil

    d = tmp_path / "refs"
    d.mkdir()
    src = REPO / "refs" / "synthetic-tiny-fp32.json"
    shutil.copy(REPO / "refs" / "synthetic-tiny-fp32.safetensors", tmp_path / "outside.safetensors")
    manifest = json.loads(src.read_text())
    manifest["tensors"] = name
    (d / "m.json").write_text(json.dumps(manifest))
    capfd.readouterr()
    rc = trace.main(["compare", "--ref", str(d / "m.json"), "--model", "synthetic:tiny", "--dtype", "float32"])
    one_error(rc, capfd.readouterr().err, 2, "must name a file beside the manifest")


@posix_only
def test_an_index_that_is_a_fifo_is_refused(tmp_path, capfd):
    from mlx_tinyllama import dump

    path = tmp_path / "taps.safetensors"
    os.mkfifo(dump.index_path(path))
    rc, err = compare_dump(dump.index_path(path), capfd)  # named directly: it would block the read
    one_error(rc, err, 2, "not a regular file")
    rc, err = compare_dump(path, capfd)  # by the dump's name: not taken for an index
    one_error(rc, err, 2, "does not exist")


@posix_only
def test_llamacpp_log_is_written_whole_or_not_at_all(tmp_path, gguf, capfd, monkeypatch):
    """--log keeps the child's output; a failed write (full disk) leaves the earlier log whole, exit 1."""
    from mlx_tinyllama import outputs

    binary = fake_llamacpp(tmp_path, "print('llama.cpp says hello')\n")
    log = tmp_path / "kept.log"
    log.write_text("an earlier log\n")
    real = os.replace

    def full(a, b):
        if Path(b) == log:
            raise OSError(28, "No space left on device")
        return real(a, b)
    monkeypatch.setattr(outputs.os, "replace", full)
    capfd.readouterr()
    rc = trace.main(["llamacpp", "--gguf", str(gguf), "--llama-cpp", str(binary), "--prompt", "hi", "--log", str(log)])
    one_error(rc, capfd.readouterr().err, 1, "No space left")
    assert log.read_text() == "an earlier log\n" and [p.name for p in tmp_path.glob(".kept.log*")] == []
