"""An ONNX Llama graph read, mapped to this package's taps and run by ONNX Runtime with every
mapped value exposed: the engine side of `trace onnx` (commands/onnx.py) and of the field suite.

The map is read off the graph's structure, never a list of value names: torch's dynamo exporter
records for each node the module path it came from (`pkg.torch.onnx.name_scopes`), so "the
output of `layers.1.mlp.gate_proj`" or "the input of `o_proj`" are found by module; the stages
inside the attention module (RoPE, scores, scale, mask, softmax) by op type and data flow from
the projections. Value names (`linear_4`, `val_217`) change with the exporter's version; module
paths and data flow do not. A tap the structure does not settle is left to the caller (the
command matches those by value, refs/suggest.py).

Needs onnx and onnxruntime (the `onnx` extra), imported by the functions that use them."""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import UserError

SCOPES = "pkg.torch.onnx.name_scopes"
_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)(?:\.|$)")
INSTALL_HINT = "pip install mlx-tinyllama[onnx]"
# The ids a graph may take besides input_ids, and what a prefill of T tokens feeds them.
_SIDE_INPUTS = {"attention_mask": lambda t: np.ones((1, t), np.int64),
                "position_ids": lambda t: np.arange(t, dtype=np.int64)[None]}


def require_onnx() -> None:
    """One line naming the extra when onnx or onnxruntime is missing."""
    import importlib.util

    missing = [m for m in ("onnx", "onnxruntime") if importlib.util.find_spec(m) is None]
    if missing:
        raise UserError(f"{' and '.join(missing)} not installed: {INSTALL_HINT}")


def load_graph(path: str | Path):
    """The ModelProto at `path` (external data beside it), or one UserError line: a file that does
    not parse as ONNX, or parses (protobuf reads many byte strings) into no graph of nodes."""
    import onnx

    p = Path(path)
    if not p.is_file():
        raise UserError(f"--model {p}: no such file")
    with open(p, "rb") as f:
        head = f.read(64)
    if head.lstrip()[:1] in (b"{", b"[", b"<", b"#") or head.startswith((b"GGUF", b"PK", b"\x93NUMPY")):
        raise UserError(f"--model {p}: not an ONNX model (a text, GGUF, zip or NumPy file)")
    try:
        # The weights stay where they are: TinyLlama's are over protobuf's 2 GB, so an export keeps
        # them in external data, which ORT reads from the graph's folder (run(..., folder)).
        model = onnx.load(str(p), load_external_data=False)
    except Exception as e:  # DecodeError, a missing external-data file, ...
        raise UserError(f"--model {p}: not a readable ONNX model ({type(e).__name__}: {str(e)[:120]})") from None
    _load_small_external(model, p.resolve().parent)
    if model.ir_version <= 0 or not model.graph.node or not model.graph.output:
        raise UserError(f"--model {p}: not an ONNX model (no IR version, nodes or outputs)")
    return model


@dataclass
class Graph:
    """The node list with who produces and who consumes each value, and each node's module path."""

    model: object

    def __post_init__(self):
        g = self.model.graph
        self.nodes = list(g.node)
        self.producer = {o: n for n in self.nodes for o in n.output}
        self.consumers: dict[str, list] = {}
        for n in self.nodes:
            for i in n.input:
                self.consumers.setdefault(i, []).append(n)
        self.order = {id(n): k for k, n in enumerate(self.nodes)}
        self.module = {id(n): _module_path(n) for n in self.nodes}
        self.outputs = {o.name for o in g.output}

    def in_scope(self, node, scope: str) -> bool:
        m = self.module[id(node)]
        return m == scope or m.startswith(scope + ".")

    def scopes(self, suffix: str) -> list[str]:
        """Module paths ending in `suffix` (e.g. `layers.0.self_attn.q_proj`), in graph order."""
        seen = []
        for n in self.nodes:
            for s in _prefixes(self.module[id(n)]):
                if (s == suffix or s.endswith("." + suffix)) and s not in seen:
                    seen.append(s)
        return seen

    def layer_scopes(self) -> list[str]:
        """The decoder layers' module paths (`...layers.N`), in graph order."""
        out = []
        for n in self.nodes:
            for s in _prefixes(self.module[id(n)]):
                if re.search(r"(?:^|\.)layers\.\d+$", s) and s not in out:
                    out.append(s)
        return out

    def module_output(self, scope: str) -> str:
        """The last value made inside `scope` and used outside it: what the module returns."""
        found = None
        for n in self.nodes:
            if not self.in_scope(n, scope):
                continue
            for o in n.output:
                users = self.consumers.get(o, [])
                if o in self.outputs or any(not self.in_scope(u, scope) for u in users):
                    found = o
        if found is None:
            raise LookupError(f"no output of module {scope}")
        return found

    def module_input(self, scope: str) -> str:
        """The first activation (made by a node, not a weight) that `scope` reads from outside it."""
        for n in self.nodes:
            if self.in_scope(n, scope):
                for i in n.input:
                    p = self.producer.get(i)
                    if p is not None and not self.in_scope(p, scope) and p.op_type != "Constant":
                        return i
        raise LookupError(f"no input of module {scope}")

    def after(self, value: str, ops: tuple[str, ...]) -> str:
        """Follow single-consumer ops in `ops` from `value` (Reshape/Transpose/Cast chains)."""
        while True:
            users = self.consumers.get(value, [])
            if len(users) != 1 or users[0].op_type not in ops:
                return value
            value = users[0].output[0]

    def before(self, value: str, ops: tuple[str, ...]) -> str:
        while (p := self.producer.get(value)) is not None and p.op_type in ops:
            value = p.input[0]
        return value

    def repeated(self, value: str) -> str:
        """`value` after transformers' GQA repeat (`repeat_kv`: Unsqueeze, Expand, Reshape to
        [1, H, T, D]); `value` itself where the graph has no repeat."""
        return self.after(value, ("Unsqueeze", "Expand", "Reshape"))

    def descendants(self, value: str) -> set[str]:
        seen, todo = set(), [value]
        while todo:
            v = todo.pop()
            for u in self.consumers.get(v, []):
                for o in u.output:
                    if o not in seen:
                        seen.add(o)
                        todo.append(o)
        return seen

    def first_node(self, op: str, where) -> object:
        for n in self.nodes:
            if n.op_type == op and where(n):
                return n
        raise LookupError(f"no {op} node found")


def _module_path(node) -> str:
    md = {p.key: p.value for p in node.metadata_props}
    scopes = ast.literal_eval(md.get(SCOPES, "[]"))
    return scopes[-2] if len(scopes) >= 2 else ""  # the last scope is the op itself


def _prefixes(path: str) -> list[str]:
    parts = path.split(".")
    return [".".join(parts[:k]) for k in range(1, len(parts) + 1)]


def structure_map(model) -> tuple[dict[str, str], dict[str, str]]:
    """({ONNX value name: tap} for every stage the structure settles, {tap: why not} for the rest).
    Each tap is looked up on its own, so a graph whose attention is fused or written otherwise still
    maps its norms, projections and MLP; a tap whose lookup needs an unsettled one is unsettled too.
    What to look for comes from the stage table: a stage with a weight is its module's output (the
    module path is the table's `weight`, as transformers names it); a stage without one that the
    next stage's module reads whole is that module's input (probs·V -> o_proj, the product ->
    down_proj); the others are found by their op's node in the data flow from their inputs."""
    from .stages import GLOBAL_HEAD, GLOBAL_TAIL, LAYER_STAGES, tap_names

    g = Graph(model)
    n_layers = len(g.layer_scopes())
    known = set(tap_names(n_layers))
    names: dict[str, str] = {}
    why: dict[str, str] = {}

    def put(tap, find):
        try:
            names[tap] = find()
        except (LookupError, StopIteration, ValueError) as e:  # KeyError: a tap it needs is unsettled
            why[tap] = (f"needs {e.args[0]}" if isinstance(e, KeyError) else
                        "no op of the expected type in its data flow" if isinstance(e, StopIteration) else str(e))

    for stage in GLOBAL_HEAD:
        put(stage.name, lambda s=stage: g.module_output(g.scopes(s.weight)[0]))
    for layer_scope in g.layer_scopes():
        i = int(_LAYER.search(layer_scope).group(1))
        for stage in LAYER_STAGES:
            tap = f"layers.{i}.{stage.name}"
            if tap in known:
                put(tap, lambda s=stage, p=f"layers.{i}.", ls=layer_scope: _find(g, s, p, ls, names))
    for stage in GLOBAL_TAIL:
        put(stage.name, lambda s=stage: g.module_output(g.scopes(s.weight)[0]))
    inverse: dict[str, str] = {}
    for tap, value in names.items():
        if value in inverse:  # two stages on one value: the structure did not settle either
            why[tap] = why[inverse[value]] = f"{tap} and {inverse[value]} found the same value {value}"
        inverse[value] = tap
    for tap in known - set(names) - set(why):
        why[tap] = "no such module or op in the graph"
    return {v: t for v, t in inverse.items() if t not in why}, why


_VIEW = ("Reshape", "Transpose", "Cast")  # what a value passes through to become [heads, T, D]


def _find(g: Graph, stage, p: str, layer_scope: str, names: dict[str, str]) -> str:
    """The ONNX value of layer stage `stage` (tap prefix `p`) in the layer at `layer_scope`."""
    from .stages import LAYER_INPUT, LAYER_STAGES

    def scope(weight: str) -> str:  # a module path of the layer, as transformers names it
        return f"{layer_scope}.{weight}"

    def parent(ref: str) -> str:  # the module that holds the stage `ref`'s weight (self_attn, mlp)
        weight = next(s.weight for s in LAYER_STAGES if s.name == ref)
        return scope(weight.rsplit(".", 1)[0])

    inputs = [r for r in stage.inputs if r != LAYER_INPUT]
    if stage.weight:
        value = g.module_output(scope(stage.weight))
        return g.after(value, _VIEW) if stage.op == "heads" else value
    reader = next((s for s in LAYER_STAGES if s.weight and s.inputs == (stage.name,)), None)
    if reader is not None:  # read whole by the next module: its input
        return g.module_input(scope(reader.weight))
    src = [names[p + r] for r in inputs]  # KeyError: an input is unsettled
    if stage.op == "rope":  # the first Add both of whose inputs come from the projection
        d = g.descendants(src[0])
        attn = parent(inputs[0])
        return g.first_node("Add", lambda n: g.in_scope(n, attn) and all(x in d for x in n.input)).output[0]
    if stage.op == "repeat_kv":
        if g.repeated(src[0]) == src[0]:
            raise LookupError(f"no GQA repeat (Unsqueeze/Expand/Reshape) after {p + inputs[0]}")
        return g.repeated(src[0])
    if stage.op == "qk":
        return g.first_node("MatMul", lambda n: g.before(n.input[0], ("Cast",)) == src[0]).output[0]
    if stage.op in ("scale", "mask"):
        ops = ("Mul", "Div") if stage.op == "scale" else ("Add",)
        return next(u for u in g.consumers[src[0]] if u.op_type in ops).output[0]
    if stage.op == "softmax":  # what the probs·V MatMul reads: from these scores, beside the values
        pv = next(s for s in LAYER_STAGES if stage.name in s.inputs)
        other = names[p + next(r for r in pv.inputs if r != stage.name)]
        return g.first_node("MatMul", lambda n: n.input[1] in g.descendants(other)
                            and n.input[0] in g.descendants(src[0])).input[0]
    if stage.op == "silu":  # transformers' activation module beside the projection it reads
        return g.module_output(parent(inputs[0]) + ".act_fn")
    if stage.op == "add":  # the residual Add of the layer's own scope that reads the branch
        return g.first_node("Add", lambda n: g.module[id(n)] == layer_scope and src[-1] in n.input).output[0]
    raise LookupError(f"no rule for op {stage.op}")


def tap_map(model) -> dict[str, str]:
    """{ONNX value name: canonical tap} for every stage, read off the exported graph; LookupError
    when the structure leaves any stage unsettled."""
    names, why = structure_map(model)
    if why:
        raise LookupError("; ".join(f"{t}: {r}" for t, r in sorted(why.items())))
    return names


def expose(model, values: list[str]):
    """The model with `values` added as graph outputs (types from shape inference)."""
    import onnx

    inferred = onnx.shape_inference.infer_shapes(model)
    types = {vi.name: vi for vi in list(inferred.graph.value_info) + list(inferred.graph.output)}
    have = {o.name for o in model.graph.output}
    for v in values:
        if v not in have:
            model.graph.output.append(types[v])
    return model


def run(model, ids: list[int], folder: str | Path | None = None) -> dict[str, np.ndarray]:
    """Every graph output of one ORT run at its default settings (ORT_ENABLE_ALL); `folder`: where
    the external data of a graph loaded without it lies (the graph's own folder)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    if folder is not None:
        opts.add_session_config_entry("session.model_external_initializers_file_folder_path", str(folder))
    try:  # a graph ORT cannot load (an op it lacks, external data missing) is the input's fault
        sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    except Exception as e:
        raise UserError(f"ONNX Runtime cannot load the graph: {' '.join(str(e).split())[:200]}") from None
    assert sess.get_session_options().graph_optimization_level == ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    names = [o.name for o in sess.get_outputs()]
    return dict(zip(names, sess.run(names, feeds(model, ids))))


def _load_small_external(model, folder: Path, max_values: int = 4096) -> None:
    """Small external tensors (axes, shapes, scales) read into the graph: ORT's shape inference
    needs their values, and an exporter saving with size_threshold=0 puts even those outside."""
    from onnx.external_data_helper import load_external_data_for_tensor, uses_external_data

    for t in model.graph.initializer:
        if uses_external_data(t) and int(np.prod(t.dims)) <= max_values:
            try:
                load_external_data_for_tensor(t, str(folder))
            except Exception as e:  # a missing or short data file
                raise UserError(f"the ONNX graph's external data for {t.name} cannot be read from {folder}: "
                                f"{str(e)[:120]}") from None
            t.data_location = 0  # DEFAULT: the value is in raw_data now
            del t.external_data[:]


def graph_inputs(model) -> list:
    """The graph's real inputs (an initializer listed as an input is a weight)."""
    weights = {i.name for i in model.graph.initializer}
    return [i for i in model.graph.input if i.name not in weights]


def feeds(model, ids: list[int]) -> dict[str, np.ndarray]:
    """The inputs of a prefill of `ids`, by the names the graph gives them: the one token-id input
    (`input_ids`, or the only input), and attention_mask / position_ids where the graph has them.
    A static sequence length other than len(ids), or an input of unknown meaning: one UserError line."""
    inputs = graph_inputs(model)
    names = [i.name for i in inputs]
    id_input = next((i for i in inputs if i.name == "input_ids"), inputs[0] if len(inputs) == 1 else None)
    if id_input is None:
        raise UserError(f"the ONNX graph's inputs {names[:6]} have none named input_ids: cannot tell where the "
                        "token ids go")
    dims = [d.dim_value if d.HasField("dim_value") else None for d in id_input.type.tensor_type.shape.dim]
    if dims and dims[-1] is not None and dims[-1] != len(ids):
        raise UserError(f"the ONNX graph was exported for {dims[-1]} tokens (static shape of {id_input.name}); "
                        f"the prompt has {len(ids)}: export it for this length or with a dynamic axis")
    out = {id_input.name: np.asarray([ids], dtype=np.int64)}
    for i in inputs:
        if i.name == id_input.name:
            continue
        if i.name not in _SIDE_INPUTS:
            raise UserError(f"the ONNX graph takes an input {i.name!r} this command does not know how to feed "
                            f"(it feeds input_ids, {', '.join(_SIDE_INPUTS)})")
        out[i.name] = _SIDE_INPUTS[i.name](len(ids))
    return out


def float_values(model) -> dict[str, tuple[int, ...] | None]:
    """Every float value the nodes make, with its shape where inference knows it: the candidates a
    value matching may look at."""
    import onnx

    inferred = onnx.shape_inference.infer_shapes(model)
    floats = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16, onnx.TensorProto.DOUBLE}
    out = {}
    for vi in list(inferred.graph.value_info) + list(inferred.graph.output):
        t = vi.type.tensor_type
        if t.elem_type in floats:
            dims = [d.dim_value if d.HasField("dim_value") else None for d in t.shape.dim]
            out[vi.name] = tuple(dims) if t.HasField("shape") and None not in dims else None
    made = {o for n in model.graph.node for o in n.output}
    return {v: s for v, s in out.items() if v in made}
