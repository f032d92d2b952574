"""A report put together and written: the header, magnitudes, the command's own
sections, attention maps and top-k, rendered to HTML by the jinja2 template and/or
saved as PNG files."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..errors import OutputError
from ..outputs import check_dir, check_file, json_safe, write_bytes, write_text
from .blocks import Section, infer_layers
from .observe import DEFAULT_ATTENTION_HEADS, Observation, choose, observe
from .sections import (attention_section, magnitude_section, page_header, pieces_of, prompt_of, tokenizer_of,
                       top_k_section)


# ---------------------------------------------------------------------------
# Page


@dataclass
class Report:
    kind: str
    title: str
    header: dict
    sections: list[Section]
    status: str = ""
    status_ok: bool | None = None


def render_html(report: Report) -> str:
    from jinja2 import Environment, PackageLoader, StrictUndefined, select_autoescape

    env = Environment(loader=PackageLoader("mlx_tinyllama", "templates"),
                      autoescape=select_autoescape(["html", "j2"], default_for_string=True, default=True),
                      undefined=StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    sections = [{"section": s, "data_json": json_safe(s.data) if s.data is not None else None}
                for s in report.sections]
    return env.get_template("report.html.j2").render(report=report, header=report.header, sections=sections)


def write_report(report: Report, html_path, plots_dir) -> None:
    """Each file written atomically: an interrupted report leaves the earlier one, never half a page."""
    if html_path is not None:
        write_text(html_path, render_html(report))
    if plots_dir is not None:
        d = Path(plots_dir).expanduser()
        try:
            d.mkdir(exist_ok=True)
        except OSError as e:
            raise OutputError(f"cannot make --plots {d}: {e.strerror or e}") from None
        for sec in report.sections:
            for p in sec.plots:
                write_bytes(d / f"{report.kind}_{p.stem}.png", p.png)


def _observed_sections(result: dict, lm, attention_layers, attention_heads, *,
                       fallback_stats: dict | None, fallback_source: str) -> tuple[list[Section], Observation | None]:
    """Magnitudes (from a fresh forward pass when `lm` is given) and attention maps."""
    prompt = prompt_of(result)
    ids = prompt.ids
    if lm is None or not ids:
        stats = fallback_stats or {}
        n = infer_layers(stats, None)
        sec = magnitude_section(stats, n, fallback_source)
        att = Section("attention", "Attention maps",
                      intro="Attention maps need the model and the prompt's token ids; this report had "
                            + ("no token ids." if lm is not None else "no model."))
        return [sec, att], None
    n = lm.config.num_hidden_layers
    layers = choose(attention_layers, sorted({0, n - 1}), n, "attention layer")
    heads = choose(attention_heads, [h for h in DEFAULT_ATTENTION_HEADS if h < lm.config.num_attention_heads],
                    lm.config.num_attention_heads, "attention head")
    obs = observe(lm, ids, layers)
    source = f"a forward pass of every stage on this model ({lm.dtype}, policy {lm.ops.policy})"
    pieces = prompt.pieces or pieces_of(lm, ids)
    return [magnitude_section(obs.stats, n, source), attention_section(obs.probs, pieces, heads)], obs


def _top_k_entries(result: dict, lm, obs: Observation | None, k: int = 10) -> list[dict]:
    if result.get("top_k"):
        return list(result["top_k"])
    if obs is None:
        return []
    from ..runtime import top_k

    return top_k(obs.last_logits, k, tokenizer_of(lm))


def build(kind: str, title: str, result: dict, lm, html_path, plots_dir, middle, options) -> Report:
    """Header, magnitudes, the command's own sections (`middle`), attention maps, top-k."""
    check_file(html_path, "--report")
    check_dir(plots_dir, "--plots")
    header = page_header(result, lm)
    observed, obs = _observed_sections(result, lm, options.get("attention_layers"),
                                       options.get("attention_heads"),
                                       fallback_stats=options.get("fallback_stats"),
                                       fallback_source=options.get("fallback_source", "the result's taps"))
    own, status, ok = middle(obs)
    sections = [observed[0], *own, observed[1], top_k_section(_top_k_entries(result, lm, obs))]
    report = Report(kind, title, header, sections, status, ok)
    write_report(report, html_path, plots_dir)
    return report
