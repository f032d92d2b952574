"""The HTML report: valid, self-contained HTML with every section and embedded
figures; rendered by headless Chromium; the divergence map marks the stage where
an injected fault first changes the numbers."""

from __future__ import annotations

import base64
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
    report_mod.run_report({"model": {"spec": evil}}, lm, prompt, html_path=out, attention_layers=[0],
                          attention_heads=[0])
    text = out.read_text(encoding="utf-8")
    assert evil not in text and "<img src=x>" not in text
    assert "&lt;script&gt;" in text
    parse_page(out)


def test_bad_attention_selection_is_a_user_error(tiny_dir, tmp_path):
    from mlx_tinyllama import sources

    lm = sources.load(str(tiny_dir), "float32")
    out = tmp_path / "r.html"
    with pytest.raises(UserError, match="attention layer 7"):
        report_mod.run_report({"tokens": [1, 2, 3]}, lm, None, html_path=out, attention_layers=[7])
    with pytest.raises(UserError, match="--attention-heads"):
        report_mod.parse_int_list("0,x", "--attention-heads")
    with pytest.raises(UserError, match="does not exist"):
        report_mod.run_report({}, lm, None, html_path=tmp_path / "missing" / "r.html")
    assert not out.exists()


# ---------------------------------------------------------------------------
# Divergence map with an injected fault


def _nmse(a: np.ndarray, ref: np.ndarray) -> float:
    a, ref = a.astype(np.float64), ref.astype(np.float64)
    return float(((a - ref) ** 2).sum() / max((ref ** 2).sum(), 1e-300))


def _full_taps(lm, ids):
    import mlx.core as mx

    from mlx_tinyllama.taps import Taps, tap_names

    taps = Taps(tap_names(lm.config.num_hidden_layers), "full")
    mx.eval(lm.model(mx.array(ids), tap=taps))
    return {n: np.array(t.astype(mx.float32)) for n, t in taps.tensors.items()}


def test_comparison_report_marks_the_injected_fault(tiny_dir, tmp_path):
    """softmax over the wrong axis vs a clean run of the same weights: the map's first
    divergence is layers.0.attn.probs, the stage faults.py says the fault breaks.
    Both runs use explicit kernels in fp32, so every stage before the fault is
    bit-identical: a check passes only at exactly zero error."""
    from mlx_tinyllama import faults, sources

    ids = [529, 29989, 5205, 29989, 29958, 13, 3492, 526]
    clean = sources.load(str(tiny_dir), "float32", kernels="explicit")
    faulty = sources.load(str(tiny_dir), "float32", kernels="explicit")
    expected = faults.inject(faulty.model, "softmax-axis")
    ref, got = _full_taps(clean, ids), _full_taps(faulty, ids)
    entries = []
    for name in ref:
        value = _nmse(got[name], ref[name])
        entries.append({"tap": name, "metric": "nmse", "value": value, "tolerance": 0.0, "ok": value == 0.0})
    # No first_divergence given: the report finds it from the failed checks.
    result = {"status": "diverged", "entries": entries, "tokens": ids}
    out = tmp_path / "compare.html"
    rep = report_mod.compare_report(result, faulty, None, html_path=out, plots_dir=tmp_path / "plots",
                                    attention_layers=[0], attention_heads=[0])
    page = parse_page(out)
    assert {"header", "magnitudes", "divergence", "comparison-table", "attention", "top-k"} <= set(page.section_ids)
    data = json.loads(page.scripts["divergence-data"])
    first = data["first_divergence"]
    assert first["tap"] == expected == "layers.0.attn.probs"
    assert (first["stage"], first["layer"]) == ("attn.probs", 0)
    row = data["stages"].index("attn.probs")
    assert first["row"] == row
    matrix = np.array(data["matrix"], dtype=np.float64)
    assert matrix[row, 0] > 1e-3  # the fault is large ...
    assert (matrix[:row, 0] == 0).all()  # ... and nothing before it differs
    assert "divergence" in {p.stem for s in rep.sections for p in s.plots}
    saved = {p.name for p in (tmp_path / "plots").glob("*.png")}
    assert {"compare_divergence.png", "compare_magnitudes.png", "compare_attention_layer0.png"} <= saved


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


def test_chromium_renders_the_report(run_report_files, tmp_path):
    binary = chromium_or_skip()
    html_path, _ = run_report_files
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
    assert 'data-render-check="ok 4/4"' in dom.stdout, dom.stdout[:400] + dom.stderr[-1000:]


def test_missing_chromium_fails_when_required(monkeypatch):
    monkeypatch.setattr(sys.modules[__name__], "find_chromium", lambda: None)
    monkeypatch.setenv("MLX_TINYLLAMA_REQUIRE_CHROMIUM", "1")
    with pytest.raises(pytest.fail.Exception, match="REQUIRE_CHROMIUM"):
        chromium_or_skip()
