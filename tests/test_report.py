"""The HTML report: valid, self-contained HTML with every section and embedded
figures; rendered by headless Chromium; the divergence map marks the stage where
an injected fault first changes the numbers."""

from __future__ import annotations

import base64
import html
import html.parser
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from mlx_tinyllama import report as report_mod
from mlx_tinyllama.errors import UserError
from mlx_tinyllama.results import PromptRecord, ResultHeader
from mlx_tinyllama.trace import main as trace_main

RUN_SECTIONS = {"header", "magnitudes", "attention", "top-k"}
VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "track", "wbr"}


class PageParser(html.parser.HTMLParser):
    """Collects what the tests check and fails on unbalanced tags."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.stack, self.errors = [], []
        self.section_ids, self.images, self.urls, self.scripts = [], [], [], {}
        self.doctype = False
        self._script_id = None

    def handle_decl(self, decl):
        self.doctype = self.doctype or decl.lower() == "doctype html"

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "section":
            self.section_ids.append(a.get("id"))
        if tag == "img":
            self.images.append(a)
        for key in ("src", "href"):
            if key in a:
                self.urls.append(a[key])
        if tag == "script":
            self._script_id = a.get("id")
        if tag not in VOID:
            self.stack.append(tag)

    def handle_endtag(self, tag):
        if not self.stack or self.stack[-1] != tag:
            self.errors.append(f"</{tag}> closes <{self.stack[-1] if self.stack else None}>")
            return
        self.stack.pop()
        if tag == "script":
            self._script_id = None

    def handle_data(self, data):
        if self._script_id:
            self.scripts[self._script_id] = self.scripts.get(self._script_id, "") + data


def parse_page(path: Path) -> PageParser:
    p = PageParser()
    p.feed(path.read_text(encoding="utf-8"))
    p.close()
    assert p.doctype, "no <!DOCTYPE html>"
    assert not p.errors, p.errors
    assert p.stack == [], f"unclosed tags: {p.stack}"
    return p


def decode_png(uri: str):
    from PIL import Image

    prefix = "data:image/png;base64,"
    assert uri.startswith(prefix), uri[:40]
    raw = base64.b64decode(uri[len(prefix):], validate=True)
    img = Image.open(io.BytesIO(raw))
    img.load()
    return raw, img


@pytest.fixture(scope="module")
def run_report_files(tiny_dir, tmp_path_factory):
    """The run command end to end: --report and --plots on a synthetic model."""
    out = tmp_path_factory.mktemp("report")
    html_path, plots = out / "run.html", out / "plots"
    rc = trace_main(["run", "--model", "synthetic:tiny", "--dtype", "float32", "--report", str(html_path),
                     "--plots", str(plots)])
    assert rc == 0
    return html_path, plots


def test_run_report_is_valid_html_with_every_section(run_report_files):
    html_path, _ = run_report_files
    page = parse_page(html_path)
    assert RUN_SECTIONS <= set(page.section_ids), page.section_ids
    assert len(page.section_ids) == len(set(page.section_ids)), "duplicate section ids"
    text = html_path.read_text(encoding="utf-8")
    assert "synthetic:tiny" in text and "float32" in text and "mlx" in text
    # The header lists the seed prompt's ids, each as its own token cell.
    for token_id in (529, 29989, 13):
        assert f'<span class="id">{token_id}</span>' in text


def test_run_report_embeds_its_images_and_needs_no_network(run_report_files):
    html_path, plots = run_report_files
    page = parse_page(html_path)
    # magnitudes, two attention layers (tiny has 2), top-k
    assert len(page.images) == 4, [i.get("data-plot") for i in page.images]
    embedded = {}
    for img in page.images:
        raw, decoded = decode_png(img["src"])
        assert decoded.size[0] > 200 and decoded.size[1] > 100
        assert np.asarray(decoded.convert("L")).std() > 5, f"{img['data-plot']} is blank"
        embedded[img["data-plot"]] = raw
    # Only in-page links and data: URIs: the file opens offline.
    assert all(u.startswith(("data:", "#")) for u in page.urls), [u[:40] for u in page.urls]
    # --plots wrote the same figures, byte for byte.
    saved = {p.stem.removeprefix("run_"): p.read_bytes() for p in plots.glob("*.png")}
    assert saved == embedded


def test_attention_maps_are_probabilities_of_the_model(tiny_dir):
    from mlx_tinyllama import sources

    lm = sources.load(str(tiny_dir), "float32")
    ids = [529, 29989, 5205, 29989, 29958, 13]
    obs = report_mod.observe(lm, ids, [1])
    probs = obs.probs[1]
    assert probs.shape == (lm.config.num_attention_heads, len(ids), len(ids))
    np.testing.assert_allclose(probs.sum(-1), 1.0, atol=1e-5)
    assert np.triu(probs, k=1).max() == 0.0  # causal
    # The stats forward pass saw every canonical stage.
    from mlx_tinyllama.taps import tap_names

    assert list(obs.stats) == tap_names(lm.config.num_hidden_layers)


def test_report_text_is_escaped(tiny_dir, tmp_path):
    from mlx_tinyllama import sources
    from mlx_tinyllama.prompt import Prompt

    lm = sources.load(str(tiny_dir), "float32")
    evil = '<script>alert("x")</script>'
    prompt = Prompt(ids=[1, 2, 3], text=evil, pieces=["<s>", "</s>", "<img src=x>"], source="test")
    out = tmp_path / "r.html"
    result = ResultHeader.of_run("run", lm, prompt).as_dict()
    result["model"]["spec"] = evil
    report_mod.run_report(result, lm, html_path=out, attention_layers=[0], attention_heads=[0])
    text = out.read_text(encoding="utf-8")
    assert evil not in text and "<img src=x>" not in text
    assert "&lt;script&gt;" in text
    parse_page(out)


def test_bad_attention_selection_is_a_user_error(tiny_dir, tmp_path):
    from mlx_tinyllama import sources

    lm = sources.load(str(tiny_dir), "float32")
    out = tmp_path / "r.html"
    with pytest.raises(UserError, match="attention layer 7"):
        report_mod.run_report(ResultHeader.of_run("run", lm, PromptRecord([1, 2, 3])).as_dict(), lm, html_path=out,
                              attention_layers=[7])
    with pytest.raises(UserError, match="--attention-heads"):
        report_mod.parse_int_list("0,x", "--attention-heads")
    with pytest.raises(UserError, match="does not exist"):
        report_mod.run_report(ResultHeader.of_run("run", lm).as_dict(), lm, html_path=tmp_path / "missing" / "r.html")
    assert not out.exists()


# ---------------------------------------------------------------------------
# compare --report: compare's own result, an injected fault, the committed reference

REPO = Path(__file__).resolve().parents[1]
REF_FP32 = REPO / "refs" / "synthetic-tiny-fp32.json"
REPORT_SECTIONS = {"header", "magnitudes", "attention", "top-k"}


def data_block(page: PageParser, block_id: str):
    return json.loads(page.scripts[block_id])


def number(v) -> float:
    """A JSON number as the report writes it (NaN/Inf as strings)."""
    return float(v) if not isinstance(v, str) else float(v.replace("inf", "Infinity"))


@pytest.fixture(scope="module")
def fault_compare(tmp_path_factory):
    """`compare --ref refs/synthetic-tiny-fp32.json --report --plots --json` on a model whose
    softmax runs over the wrong axis: the command's own result, report and JSON."""
    from mlx_tinyllama import cli_common, faults

    out = tmp_path_factory.mktemp("compare")
    load_model = cli_common.load_model
    expected = []

    def faulty_load(args):
        lm = load_model(args)
        expected.append(faults.inject(lm.model, "softmax-axis"))
        return lm

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(cli_common, "load_model", faulty_load)
        rc = trace_main(["compare", "--ref", str(REF_FP32), "--model", "synthetic:tiny", "--dtype", "float32",
                         "--report", str(out / "compare.html"), "--plots", str(out / "plots"),
                         "--json", str(out / "compare.json"), "--attention-layers", "0", "--attention-heads", "0"])
    result = json.loads((out / "compare.json").read_text())
    return rc, expected[0], out, result


def test_compare_report_marks_the_injected_fault(fault_compare):
    """The heat map data comes from compare's own entries: the first divergence is
    layers.0.attn.probs (where faults.py says softmax-axis breaks), every stage before it
    is within its tolerance against transformers, the fault itself far outside."""
    rc, expected, out, result = fault_compare
    assert rc == 1 and result["first_divergence"]["tap"] == expected == "layers.0.attn.probs"
    page = parse_page(out / "compare.html")
    assert REPORT_SECTIONS | {"divergence", "comparison-table"} <= set(page.section_ids), page.section_ids
    data = data_block(page, "divergence-data")
    first = data["first_divergence"]
    assert (first["tap"], first["stage"], first["layer"]) == (expected, "attn.probs", 0)
    row = data["stages"].index("attn.probs")
    assert first["row"] == row and data["status"] == "diverged"
    nmse = {e["tap"]: e for e in result["entries"] if e["metric"] == "nmse"}
    matrix = np.array([[number(v) for v in r] for r in data["matrix"]])
    for r, stage in enumerate(data["stages"][:row]):  # the map holds compare's numbers, all within tolerance
        e = nmse[f"layers.0.{stage}"]
        assert matrix[r, 0] == pytest.approx(e["value"], rel=1e-12, abs=0) and e["ok"], stage
    fault = nmse[expected]
    assert matrix[row, 0] == pytest.approx(fault["value"]) and fault["value"] > 100 * fault["tolerance"]
    assert data["globals"]["embed"] == pytest.approx(nmse["embed"]["value"], abs=1e-30)
    # The hint and the comparison table are on the page.
    text = (out / "compare.html").read_text(encoding="utf-8")
    assert "inside the attention softmax" in text and "← first divergence" in text
    assert {"compare_divergence.png", "compare_magnitudes.png", "compare_attention_layer0.png",
            "compare_top_k.png"} <= {f.name for f in (out / "plots").glob("*.png")}


def test_compare_report_header_has_the_tokens_and_attention_maps(fault_compare):
    from conftest import SEED_IDS

    _, _, out, result = fault_compare
    assert result["prompt"]["ids"] == SEED_IDS and len(result["prompt"]["pieces"]) == len(SEED_IDS)
    text = (out / "compare.html").read_text(encoding="utf-8")
    assert text.count('class="tok"') == len(SEED_IDS)
    assert "<dd>38 tokens" in text and "synthetic:tiny" in text
    page = parse_page(out / "compare.html")
    attention = [i for i in page.images if i["data-plot"].startswith("attention_layer")]
    assert [i["data-plot"] for i in attention] == ["attention_layer0"]  # --attention-layers 0


def test_compare_report_from_the_json_alone(fault_compare, tmp_path):
    """A report made later from `compare --json` (no model): tokens and pieces from the result."""
    from conftest import SEED_IDS

    _, expected, out, result = fault_compare
    report_mod.compare_report(result, None, html_path=tmp_path / "later.html")
    page = parse_page(tmp_path / "later.html")
    assert data_block(page, "divergence-data")["first_divergence"]["tap"] == expected
    text = (tmp_path / "later.html").read_text(encoding="utf-8")
    assert text.count('class="tok"') == len(SEED_IDS)
    for token_id, piece in zip(SEED_IDS[:6], result["prompt"]["pieces"][:6]):
        assert f"{html.escape(piece, quote=False)}<span class=\"id\">{token_id}</span>" in text


def test_run_compare_writes_the_comparison_report(tmp_path):
    """`run --compare REF --report`: the same comparison report, here for a clean run (status match)."""
    out = tmp_path / "run-compare.html"
    rc = trace_main(["run", "--model", "synthetic:tiny", "--dtype", "float32", "--compare", str(REF_FP32),
                     "--report", str(out), "--attention-layers", "1", "--attention-heads", "0"])
    assert rc == 0
    page = parse_page(out)
    assert REPORT_SECTIONS | {"divergence", "comparison-table"} <= set(page.section_ids)
    data = data_block(page, "divergence-data")
    assert data["status"] == "match" and data["first_divergence"] is None
    assert [i["data-plot"] for i in page.images] == ["magnitudes", "divergence", "attention_layer1", "top_k"]


# ---------------------------------------------------------------------------
# paths --report: prefill vs decode per stage and position

PATHS_IDS = [529, 29989, 5205, 29989, 29958, 13, 3492, 526, 263, 19780, 13563, 7451]
DROP = 5


@pytest.fixture(scope="module")
def drop_kv_paths(tmp_path_factory):
    out = tmp_path_factory.mktemp("paths")
    rc = trace_main(["paths", "--model", "synthetic:tiny", "--dtype", "float32", "--token-ids",
                     ",".join(map(str, PATHS_IDS)), "--chunk", "4", "--continue", "0", "--fault", f"drop-kv:{DROP}",
                     "--report", str(out / "paths.html"), "--plots", str(out / "plots"),
                     "--json", str(out / "paths.json"), "--attention-layers", "0", "--attention-heads", "0"])
    return rc, out, json.loads((out / "paths.json").read_text())


def test_paths_report_marks_the_dropped_cache_entry(drop_kv_paths):
    """The decode map's first divergence is layers.0.attn.scores at the dropped position
    (the step sees one key too few); before it every stage of every position agrees."""
    rc, out, result = drop_kv_paths
    assert rc == 1
    first = result["first_divergence"]
    assert (first["path"], first["tap"], first["position"]) == ("decode", "layers.0.attn.scores", DROP)
    page = parse_page(out / "paths.html")
    assert REPORT_SECTIONS | {"paths"} <= set(page.section_ids), page.section_ids
    data = data_block(page, "paths-data")
    maps = {m["path"]: m for m in data["paths"]}
    assert list(maps) == ["decode", "chunk-4"]
    decode = maps["decode"]
    mark = decode["first_divergence"]
    assert (mark["tap"], mark["stage"], mark["position"]) == ("layers.0.attn.scores", "attn.scores", DROP)
    assert mark["row"] == decode["stages"].index("attn.scores") and data["first_divergence"] == mark
    matrix = np.array([[number(v) for v in r] for r in decode["matrix"]])
    assert matrix.shape == (len(decode["stages"]), len(PATHS_IDS)) and decode["stages"][0] == "embed"
    assert np.isposinf(matrix[mark["row"], DROP])  # another number of keys: not comparable
    assert (matrix[:, :DROP] <= result["tolerance"]["layer_0"]).all()  # every stage agrees before it
    # The chunk path has its own mark: the first row of the chunk that holds the dropped position.
    own = result["paths"][1]["first_divergence"]
    chunk_mark = maps["chunk-4"]["first_divergence"]
    assert (chunk_mark["tap"], chunk_mark["position"]) == (own["tap"], own["position"])
    assert own["position"] == DROP // 4 * 4 and own["tap"] == "layers.0.attn.scores"
    assert {"paths_decode_stage_position.png", "paths_chunk-4_stage_position.png",
            "paths_attention_layer0.png"} <= {f.name for f in (out / "plots").glob("*.png")}


def test_paths_map_is_the_max_over_layers_of_the_result(drop_kv_paths):
    _, out, result = drop_kv_paths
    data = data_block(parse_page(out / "paths.html"), "paths-data")
    decode = next(m for m in data["paths"] if m["path"] == "decode")
    per_tap = result["nmse_by_tap_position"]["decode"]
    from mlx_tinyllama.taps import split_name, tap_names

    assert list(per_tap) == tap_names(2)
    for r, stage in enumerate(decode["stages"]):
        rows = np.array([[number(v) for v in per_tap[t]] for t in per_tap if split_name(t)[1] == stage])
        np.testing.assert_array_equal(np.array([number(v) for v in decode["matrix"][r]]), rows.max(axis=0))


# ---------------------------------------------------------------------------
# stability --report: headroom, first non-finite stage, drift


def test_stability_report_marks_the_first_nonfinite_stage(tmp_path):
    from mlx_tinyllama import stress

    rc = trace_main(["stability", "--model", "synthetic:stress-mlp", "--policies", "hf",
                     "--report", str(tmp_path / "s.html"), "--plots", str(tmp_path / "plots"),
                     "--json", str(tmp_path / "s.json"), "--attention-layers", "1", "--attention-heads", "0"])
    assert rc == 0
    run = json.loads((tmp_path / "s.json").read_text())["runs"]["float16"]["hf"]
    assert run["first_nonfinite"] == stress.STRESS_PRESETS["stress-mlp"].breaks == "layers.1.mlp.prod"
    page = parse_page(tmp_path / "s.html")
    assert REPORT_SECTIONS | {"stability-float16-hf", "drift"} <= set(page.section_ids), page.section_ids
    data = data_block(page, "headroom-data-float16-hf")
    first = data["first_divergence"]
    assert (first["tap"], first["stage"], first["layer"]) == ("layers.1.mlp.prod", "mlp.prod", 1)
    assert first["row"] == data["stages"].index("mlp.prod")
    for r, stage in enumerate(data["stages"]):  # the map holds the run's headroom
        for layer in (0, 1):
            np.testing.assert_allclose(number(data["matrix"][r][layer]),  # inf = all zero: equal, not close
                                       number(run["taps"][f"layers.{layer}.{stage}"]["headroom"]), rtol=1e-12)
    drift = data_block(page, "drift-data")["nmse_by_layer"]["float16 · hf"]
    assert number(drift[0]) == pytest.approx(run["taps"]["layers.0.out"]["nmse"])
    assert "SiLU(gate)×up" in (tmp_path / "s.html").read_text(encoding="utf-8")  # the explanation
    assert {"stability_headroom_float16-hf.png", "stability_drift.png", "stability_attention_layer1.png"} <= {
        f.name for f in (tmp_path / "plots").glob("*.png")}


@pytest.mark.parametrize("command", ["compare", "paths", "stability"])
def test_report_options_are_checked_before_any_work(command, tmp_path, capsys):
    extra = ["--ref", str(REF_FP32)] if command == "compare" else []
    argv = [command, "--model", "synthetic:tiny", *extra, "--report", str(tmp_path / "no" / "r.html")]
    assert trace_main(argv) == 2
    assert "does not exist" in capsys.readouterr().err
    argv = [command, "--model", "synthetic:tiny", *extra, "--report", str(tmp_path / "r.html"),
            "--attention-heads", "0,x"]
    assert trace_main(argv) == 2
    assert "--attention-heads" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------
# compare's hint for a wrong Q/K layout (a GGUF whose llama.cpp permutation is off)


@pytest.mark.parametrize("permute, fix", [("none", "gguf.permute_qk"), ("twice", "gguf.unpermute_qk")])
def test_wrong_gguf_qk_layout_gets_the_permutation_hint(permute, fix, tiny_dir, tmp_path):
    from conftest import SEED_IDS

    from mlx_tinyllama import sources
    from mlx_tinyllama.compare import compare_run
    from mlx_tinyllama.gguf_write import convert
    from mlx_tinyllama.tolerances import Tolerances

    path = tmp_path / f"tiny-{permute}.gguf"
    convert(tiny_dir, path, out_type="f16", permute=permute)
    result = compare_run(sources.load(str(path), "float32"), SEED_IDS, str(REF_FP32), Tolerances())
    d = result["first_divergence"]
    assert d["tap"] == "layers.0.attn.q"
    assert "permuted within heads" in d["hint"] and "interleaved" in d["hint"]
    assert d["qk_permutation"]["fixed_by"] == fix
    assert d["qk_permutation"]["sorted_nmse"] <= d["error"]["tolerance"] < d["error"]["value"]


def test_correct_gguf_layout_matches_and_other_q_errors_get_no_permutation_hint(tiny_dir, tmp_path):
    from conftest import SEED_IDS

    from mlx_tinyllama import sources
    from mlx_tinyllama.compare import compare_run, qk_permutation
    from mlx_tinyllama.gguf import permute_qk
    from mlx_tinyllama.gguf_write import convert
    from mlx_tinyllama.tolerances import Tolerances

    path = tmp_path / "tiny-once.gguf"
    convert(tiny_dir, path, out_type="f16", permute="once")
    assert compare_run(sources.load(str(path), "float32"), SEED_IDS, str(REF_FP32), Tolerances())["status"] == "match"
    rng = np.random.default_rng(0)
    ref = rng.standard_normal((4, 5, 8))  # [heads, T, head_dim]
    rows = ref.transpose(0, 2, 1).reshape(32, 5)
    shuffled = permute_qk(rows, 4).reshape(4, 8, 5).transpose(0, 2, 1)
    assert qk_permutation(shuffled, ref, 1e-12)["fixed_by"] == "gguf.unpermute_qk"
    assert qk_permutation(ref * 1.01, ref, 1e-12) is None  # wrong values, not a wrong order
    assert qk_permutation(ref[:, :, ::-1], ref, 1e-12)["fixed_by"] is None  # another order: said, no fix named


# ---------------------------------------------------------------------------
# Headless Chromium


CHROME_CANDIDATES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable",
                     "/Applications/Google Chrome.app/Contents/MacOS/Google Chrome",
                     "/Applications/Chromium.app/Contents/MacOS/Chromium")


def find_chromium() -> str | None:
    for name in CHROME_CANDIDATES:
        path = shutil.which(name) or (name if os.path.isfile(name) and os.access(name, os.X_OK) else None)
        if path:
            return path
    return None


def chromium_or_skip() -> str:
    binary = find_chromium()
    if binary is None:
        if os.environ.get("MLX_TINYLLAMA_REQUIRE_CHROMIUM") == "1":
            pytest.fail("MLX_TINYLLAMA_REQUIRE_CHROMIUM=1 but no chromium/google-chrome binary was found")
        pytest.skip("no Chromium or Chrome binary (set MLX_TINYLLAMA_REQUIRE_CHROMIUM=1 to make this a failure)")
    return binary


def _chromium(binary: str, profile: Path, *extra: str) -> subprocess.CompletedProcess:
    cmd = [binary, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           f"--user-data-dir={profile}", "--enable-logging=stderr", "--v=0", *extra]
    # A BLAS preloaded into the test process (CI speeds up MLX that way) must not reach the
    # browser: preloaded into Chromium's GPU process it makes that process fail to start.
    env = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env)


def _render_check(binary: str, html_path: Path, tmp_path: Path, n_images: int) -> None:
    url = html_path.resolve().as_uri()
    shot = tmp_path / "shot.png"
    proc = _chromium(binary, tmp_path / "profile-shot", f"--screenshot={shot}", "--window-size=1280,2000", url)
    assert shot.is_file(), proc.stderr[-2000:]
    console = [line for line in proc.stderr.splitlines() if "CONSOLE" in line or "Uncaught" in line]
    assert not [line for line in console if "ERROR:CONSOLE" in line or "Uncaught" in line], console
    from PIL import Image

    pixels = np.asarray(Image.open(shot).convert("L"), dtype=np.float64)
    assert pixels.shape == (2000, 1280)
    assert pixels.std() > 20, "the screenshot is blank"
    assert (pixels < 80).mean() > 0.01  # the dark page header and plot lines are there
    # The page's own check: every embedded figure decoded in the browser.
    dom = _chromium(binary, tmp_path / "profile-dom", "--dump-dom", "--virtual-time-budget=5000", url)
    assert f'data-render-check="ok {n_images}/{n_images}"' in dom.stdout, dom.stdout[:400] + dom.stderr[-1000:]


def test_chromium_renders_the_report(run_report_files, tmp_path):
    binary = chromium_or_skip()
    html_path, _ = run_report_files
    _render_check(binary, html_path, tmp_path, 4)


def test_chromium_renders_the_compare_report(fault_compare, tmp_path):
    binary = chromium_or_skip()
    _, _, out, _ = fault_compare
    n = len(parse_page(out / "compare.html").images)
    assert n == 4  # magnitudes, divergence, one attention layer, top-k
    _render_check(binary, out / "compare.html", tmp_path, n)


def test_missing_chromium_fails_when_required(monkeypatch):
    monkeypatch.setattr(sys.modules[__name__], "find_chromium", lambda: None)
    monkeypatch.setenv("MLX_TINYLLAMA_REQUIRE_CHROMIUM", "1")
    with pytest.raises(pytest.fail.Exception, match="REQUIRE_CHROMIUM"):
        chromium_or_skip()
