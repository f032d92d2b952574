"""Self-contained HTML reports (and the same plots as PNG files) for `run`, `compare`,
`paths` and `stability`, drawn from the command's JSON result: one HTML file with the
figures as base64 PNGs and the data behind the heat maps as JSON blocks (`<script
type="application/json" id="divergence-data">` and friends), so it opens anywhere
without a network. `blocks` holds the page's parts (plots, sections, the stage × layer
heat map), `observe` the one extra forward pass for magnitudes and attention maps,
`sections` the sections every report has (header, magnitudes, attention, top-k),
`render` puts a report together and writes it (jinja2 template, autoescape on); `run`,
`compare`, `paths` and `stability` each hold one command's sections and its entry point
`<command>_report(result, lm, html_path=None, plots_dir=None, attention_layers=None,
attention_heads=None)`. See docs/report.md.
"""

from __future__ import annotations

from .blocks import (  # noqa: F401
    LAYER_STAGE_NAMES,
    GLOBAL_NAMES,
    Plot,
    Section,
    plot,
    divergence_matrix,
    infer_layers,
    heatmap_plot,
    describe,
    slug,
)
from .observe import (  # noqa: F401
    DEFAULT_ATTENTION_HEADS,
    parse_int_list,
    Observation,
    observe,
    choose,
)
from .sections import (  # noqa: F401
    MAGNITUDE_PANELS,
    NOT_PLOTTED,
    page_header,
    prompt_of,
    pieces_of,
    tokenizer_of,
    rms_of,
    magnitude_data,
    magnitude_section,
    attention_section,
    top_k_section,
)
from .render import (  # noqa: F401
    Report,
    render_html,
    write_report,
    build,
)
from .run import (  # noqa: F401
    run_report,
)
from .compare import (  # noqa: F401
    compare_report,
    comparison_sections,
)
from .paths import (  # noqa: F401
    paths_report,
    paths_sections,
)
from .stability import (  # noqa: F401
    stability_report,
    stability_sections,
    headroom_plot,
    HEADROOM_RANGE,
)
