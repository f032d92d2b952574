"""The `run` command's report: the common sections only."""

from __future__ import annotations

from .render import Report, build


def run_report(result: dict, lm, html_path=None, plots_dir=None, attention_layers=None,
               attention_heads=None) -> Report:
    """The `run` command's report: header, magnitudes, attention maps, top-k."""
    opts = {"attention_layers": attention_layers, "attention_heads": attention_heads,
            "fallback_stats": result.get("taps") or {}, "fallback_source": "the run's taps"}
    return build("run", "Forward pass", result, lm, html_path, plots_dir, lambda obs: ([], "", None), opts)
