"""The package's layers (README, Layout): CLI -> commands -> library -> core. Every import,
at the top of a module or inside a function, points to the importer's layer or one below;
the library and the core never import argparse; no modules import each other in a loop."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "mlx_tinyllama"
CLI = {"trace"}
COMMANDS = {"commands", "cli_common"}
CORE = {"model", "ops", "cuda_attention", "cuda_stats", "taps", "stages", "tap_stats", "config", "architectures", "sources", "tokenizer", "gguf", "gguf_header", "synthetic",
        "stress", "chat_template", "dtypes", "errors"}
RANK = {"cli": 3, "commands": 2, "library": 1, "core": 0}


def layer(module: str) -> str:
    top = module.split(".")[1] if "." in module else ""
    if top in CLI:
        return "cli"
    if top in COMMANDS:
        return "commands"
    return "core" if top in CORE else "library"


def modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def imports(module: str, path: Path, known: dict) -> set[str]:
    """The package's own modules that `module` imports, anywhere in its code."""
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = package.split(".")
            base = base[:len(base) - node.level + 1] if node.level else []
            stem = ".".join(base + ([node.module] if node.module else []))
            found |= {f"{stem}.{a.name}" if f"{stem}.{a.name}" in known else stem for a in node.names}
    return {m for m in found if m in known and m != module}


def graph() -> dict[str, set[str]]:
    known = modules()
    return {m: imports(m, p, known) for m, p in known.items()}


def test_imports_point_down():
    up = [(m, t) for m, targets in graph().items() for t in targets if RANK[layer(t)] > RANK[layer(m)]]
    assert up == []


def test_library_and_core_never_import_argparse():
    for module, path in modules().items():
        if layer(module) in ("library", "core"):
            tree = ast.parse(path.read_text(encoding="utf-8"))
            names = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
            names |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
            assert "argparse" not in names, module


def test_no_import_cycles():
    g, done, stack = graph(), set(), []

    def visit(m):
        if m in stack:
            raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(m):] + [m]))
        if m in done:
            return
        stack.append(m)
        for t in sorted(g[m]):
            visit(t)
        stack.pop()
        done.add(m)

    for m in sorted(g):
        visit(m)


def test_the_checks_see_an_upward_import_and_a_cycle():
    """The graph is read right: known arrows are there (the checks above can fail)."""
    g = graph()
    assert "mlx_tinyllama.cli_common" in g["mlx_tinyllama.commands.run"]
    assert "mlx_tinyllama.refs.side" in g["mlx_tinyllama.compare"]
    assert "mlx_tinyllama.stress" in g["mlx_tinyllama.synthetic"]
    assert "mlx_tinyllama.fast" in g["mlx_tinyllama.bench.engines"]  # `from .. import fast`
    assert layer("mlx_tinyllama.commands.run") == "commands" and layer("mlx_tinyllama.report.render") == "library"
