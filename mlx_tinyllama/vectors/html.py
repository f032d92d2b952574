"""A self-contained HTML page of a `vectors check` result: per op, then every case."""

from __future__ import annotations

from jinja2 import Environment, StrictUndefined, select_autoescape

from ..formatting import fmt

TEMPLATE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<title>mlx_tinyllama · kernel vectors · {{ result.dtype }}</title>
<style>
 body { margin: 0; font: 14px/1.45 -apple-system, "Segoe UI", Roboto, Helvetica, Arial, sans-serif; color: #1d2430; background: #f6f7f9; }
 header { background: #1f2a3a; color: #fff; padding: 18px 28px; } header h1 { margin: 0 0 4px; font-size: 22px; }
 .sub { color: #c9d3e0; font-size: 13px; } main { padding: 8px 28px 40px; }
 .status { display: inline-block; margin-top: 8px; padding: 3px 10px; border-radius: 12px; font-weight: 600; }
 .ok { background: #dff3e4; color: #1e7b34; } .bad { background: #fdecea; color: #b3261e; }
 section { background: #fff; border: 1px solid #d8dee6; border-radius: 8px; padding: 14px 20px; margin: 16px 0; }
 table { border-collapse: collapse; font-size: 12.5px; } th, td { padding: 3px 8px; border-bottom: 1px solid #eef1f4; text-align: left; }
 th { background: #eef2f7; } td.num { text-align: right; white-space: nowrap; font-family: ui-monospace, Menlo, Consolas, monospace; }
 tr.fail td { background: #fdecea; color: #b3261e; } code { font-size: 12.5px; }
</style></head><body>
<header><h1>Kernel conformance vectors</h1>
<div class="sub">{{ result.vectors }} · {{ result.dtype }} · model {{ result.model.spec }}{% if results_path %} · results {{ results_path }}{% endif %}</div>
<span class="status {{ 'ok' if result.pass else 'bad' }}">{{ 'all ops pass' if result.pass else 'some ops fail' }}</span></header>
<main>
<section><h2>Per op</h2><table>
<tr><th>op</th><th>cases</th><th>failed</th><th>status</th><th>first failing shape</th><th>pattern</th><th>detail</th><th>worst NMSE / tolerance</th></tr>
{% for s in result.ops %}<tr class="{{ '' if s.pass else 'fail' }}"><td>{{ s.op }}</td><td class="num">{{ s.cases }}</td>
<td class="num">{{ s.failed }}</td><td>{{ 'pass' if s.pass else 'FAIL' }}</td><td>{{ s.first_failing_shape or '' }}</td>
<td><code>{{ s.pattern or '' }}</code></td><td>{{ s.detail or '' }}</td><td class="num">{{ fmt(s.worst_ratio) }}</td></tr>
{% endfor %}</table></section>
<section><h2>Every case</h2><table>
<tr><th>case</th><th>shape</th><th>NMSE</th><th>tolerance</th><th>NMSE / tolerance</th><th>status</th><th>pattern</th><th>detail</th></tr>
{% for c in result.cases %}<tr class="{{ '' if c.pass else 'fail' }}"><td><code>{{ c.name }}</code></td><td>{{ c.shape }}</td>
<td class="num">{{ fmt(c.nmse) }}</td><td class="num">{{ fmt(c.tolerance) }}</td><td class="num">{{ fmt(c.ratio) }}</td>
<td>{{ 'pass' if c.pass else 'FAIL' }}</td><td><code>{{ c.pattern or '' }}</code></td><td>{{ c.detail or '' }}</td></tr>
{% endfor %}</table></section>
<section><h2>What each failing op's first failure points to</h2>
{% for s in result.ops if s.explanation %}<p><b>{{ s.op }}</b> (<code>{{ s.pattern }}</code>): {{ s.explanation.words }}:
{{ s.explanation.cause }}; {{ s.explanation.next_step }}.</p>
{% else %}<p>No failure.</p>{% endfor %}
<p>The pattern names are the ones <code>compare</code> gives a diverging stage: see docs/vectors.md.</p></section>
</main></body></html>
"""


def render(result: dict, results_path: str | None = None) -> str:
    env = Environment(autoescape=select_autoescape(default=True, default_for_string=True), undefined=StrictUndefined)
    return env.from_string(TEMPLATE).render(result=result, results_path=results_path,
                                            fmt=lambda v: "" if v is None else fmt(v))
