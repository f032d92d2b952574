"""An ONNX Runtime engine for the field suite: the project's synthetic Llama exported by
torch's dynamo exporter, its intermediates exposed as graph outputs, faults edited into the
graph, run by onnxruntime at its default optimisation level and dumped to safetensors keyed
by the ONNX value names, with a `--map` JSON that names their taps.

The map is read off the exported graph's structure, never a hand-written list of value
names: the dynamo exporter records for each node the torch module path it came from
(`pkg.torch.onnx.name_scopes`), so "the output of `layers.1.mlp.gate_proj`" or "the input
of `o_proj`" are found by module; the stages inside the attention module (RoPE, scores,
scale, mask, softmax) by op type and data flow from the projections. A user mapping their
own ONNX graph would do the same. Value names (`linear_4`, `val_217`) change with the
exporter's version; module paths and data flow do not.

Needs torch, transformers, onnx, onnxscript and onnxruntime (the dev extra)."""

from __future__ import annotations

import ast
import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

SCOPES = "pkg.torch.onnx.name_scopes"
_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)(?:\.|$)")


def export(model_dir: Path, n_tokens: int, dtype: str, out: Path) -> Path:
    """`LlamaForCausalLM` on the synthetic weights in `dtype`, exported for `n_tokens` ids
    (static shape: the exporter folds the mask and RoPE tables for that length)."""
    import torch

    from mlx_tinyllama.reference.hf import load_hf_model

    model = load_hf_model(model_dir, dtype)

    class Logits(torch.nn.Module):  # the logits tensor only, without the cache objects
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, input_ids):
            return self.m(input_ids=input_ids, use_cache=False).logits

    wrapped = Logits(model).eval()
    ids = torch.zeros((1, n_tokens), dtype=torch.int64)
    program = torch.onnx.export(wrapped, (ids,), dynamo=True, verbose=False)
    program.save(str(out))
    return out


# ---------------------------------------------------------------- mapping from the structure

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


def tap_map(model) -> dict[str, str]:
    """{ONNX value name: canonical tap} for every stage, read off the exported graph."""
    from mlx_tinyllama.taps import tap_names

    g = Graph(model)
    known = set(tap_names(len(g.layer_scopes())))
    names: dict[str, str] = {}
    names["embed"] = g.module_output(g.scopes("embed_tokens")[0])
    casts = ("Cast",)
    view = ("Reshape", "Transpose", "Cast")
    for layer_scope in g.layer_scopes():
        i = int(_LAYER.search(layer_scope).group(1))
        p = f"layers.{i}."
        attn = layer_scope + ".self_attn"
        mlp = layer_scope + ".mlp"
        names[p + "attn_norm"] = g.module_output(layer_scope + ".input_layernorm")
        q, k, v = (g.after(g.module_output(f"{attn}.{w}_proj"), view) for w in "qkv")
        names[p + "attn.q"], names[p + "attn.k"], names[p + "attn.v"] = q, k, v
        dq, dk, dv = g.descendants(q), g.descendants(k), g.descendants(v)

        def rope(d):  # the first Add both of whose inputs come from the projection
            return g.first_node("Add", lambda n: g.in_scope(n, attn) and all(x in d for x in n.input)).output[0]

        q_rope, k_rope = rope(dq), rope(dk)
        names[p + "attn.q_rope"], names[p + "attn.k_rope"] = q_rope, k_rope
        for tap, value in ((p + "attn.k_rep", k_rope), (p + "attn.v_rep", v)):
            if tap in known and g.repeated(value) != value:  # taps after the GQA repeat, where the table has them
                names[tap] = g.repeated(value)
        scores = g.first_node("MatMul", lambda n: g.before(n.input[0], casts) == q_rope).output[0]
        scaled = next(u for u in g.consumers[scores] if u.op_type in ("Mul", "Div")).output[0]
        masked = next(u for u in g.consumers[scaled] if u.op_type == "Add").output[0]
        pv = g.first_node("MatMul", lambda n: n.input[1] in dv and n.input[0] in g.descendants(masked))
        names[p + "attn.scores"], names[p + "attn.scores_scaled"] = scores, scaled
        names[p + "attn.scores_masked"], names[p + "attn.probs"] = masked, pv.input[0]
        names[p + "attn.context"] = g.module_input(f"{attn}.o_proj")
        names[p + "attn.out"] = g.module_output(attn)
        names[p + "resid_mid"] = g.first_node(
            "Add", lambda n: g.module[id(n)] == layer_scope and names[p + "attn.out"] in n.input).output[0]
        names[p + "mlp_norm"] = g.module_output(layer_scope + ".post_attention_layernorm")
        names[p + "mlp.gate"] = g.module_output(mlp + ".gate_proj")
        names[p + "mlp.up"] = g.module_output(mlp + ".up_proj")
        names[p + "mlp.act"] = g.module_output(mlp + ".act_fn")
        names[p + "mlp.prod"] = g.module_input(mlp + ".down_proj")
        names[p + "mlp.down"] = g.module_output(mlp)
        names[p + "out"] = g.module_output(layer_scope)
    names["final_norm"] = g.module_output(g.scopes("model.norm")[0])
    names["logits"] = g.module_output(g.scopes("lm_head")[0])
    inverse = {}
    for tap, value in names.items():
        if value in inverse:
            raise LookupError(f"{tap} and {inverse[value]} map to the same value {value}")
        inverse[value] = tap
    return inverse


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


def run(model, ids: list[int]) -> dict[str, np.ndarray]:
    """Every graph output of one ORT run at its default settings (ORT_ENABLE_ALL)."""
    import onnxruntime as ort

    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    assert sess.get_session_options().graph_optimization_level == ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    names = [o.name for o in sess.get_outputs()]
    feed = {sess.get_inputs()[0].name: np.asarray([ids], dtype=np.int64)}
    return dict(zip(names, sess.run(names, feed)))


def write_dump(values: dict[str, np.ndarray], names: dict[str, str], out: Path) -> tuple[Path, Path]:
    """The mapped values, batch dimension dropped, keyed by their ONNX names, plus the `--map` JSON.
    No metadata, as a user saving ORT's outputs would write it: the ids go on the command line,
    the dtype is the tensors' own."""
    from safetensors.numpy import save_file

    tensors = {v: np.ascontiguousarray(values[v][0]) for v in names}
    save_file(tensors, str(out))
    map_path = out.with_suffix(".map.json")
    map_path.write_text(json.dumps(names, indent=1))
    return out, map_path


def to_float16(model):
    """onnxconverter-common's float16 conversion of the fp32 graph, with its defaults (constants
    clipped to +-1e4: the causal mask's -3.4e38 becomes -1e4)."""
    from onnxconverter_common import float16

    return float16.convert_float_to_float16(model, keep_io_types=False)


# ---------------------------------------------------------------- graph faults

def _tap(names: dict[str, str], tap: str) -> str:
    return next(v for v, t in names.items() if t == tap)


def _initializer(model, name: str):
    return next(i for i in model.graph.initializer if i.name == name)


def _const(model, name: str, value: np.ndarray) -> str:
    from onnx import numpy_helper

    model.graph.initializer.append(numpy_helper.from_array(value, name))
    return name


def _const_value(model, name: str) -> np.ndarray:
    from onnx import numpy_helper

    return numpy_helper.to_array(_initializer(model, name))


def _scope_nodes(g: Graph, scope_suffix: str):
    scope = g.scopes(scope_suffix)[0]
    return [n for n in g.nodes if g.in_scope(n, scope)]


def _fault_eps_after_sqrt(model, names, layer):
    """The attention RMSNorm: rsqrt(mean + eps) written as 1 / (sqrt(mean) + eps). In layer 0,
    whose input (the embeddings, ~0.02) is small enough for eps to matter; deeper, the residual
    stream is large and the same fault stays under the fp32 tolerance at its own stage."""
    import onnx

    g = Graph(model)
    nodes = _scope_nodes(g, f"layers.{layer}.input_layernorm")
    add = next(n for n in nodes if n.op_type == "Add")
    sqrt = next(n for n in nodes if n.op_type == "Sqrt" and n.input[0] == add.output[0])
    recip = g.consumers[sqrt.output[0]][0]
    mean, eps = add.input
    root, shifted = f"fault_sqrt_{layer}", f"fault_sqrt_plus_eps_{layer}"
    recip.input[0] = shifted  # the original Add and Sqrt are left unused
    at = list(model.graph.node).index(recip)
    model.graph.node.insert(at, onnx.helper.make_node("Add", [root, eps], [shifted]))
    model.graph.node.insert(at, onnx.helper.make_node("Sqrt", [mean], [root]))


def _linear(g: Graph, scope_suffix: str):
    return next(n for n in _scope_nodes(g, scope_suffix) if n.op_type in ("MatMul", "Gemm"))


def _fault_gate_up_swapped(model, names, layer):
    g = Graph(model)
    gate, up = _linear(g, f"layers.{layer}.mlp.gate_proj"), _linear(g, f"layers.{layer}.mlp.up_proj")
    gate.input[1], up.input[1] = up.input[1], gate.input[1]


def _fault_scale_over_head_dim(model, names, layer):
    """scores / head_dim instead of scores / sqrt(head_dim)."""
    g = Graph(model)
    mul = g.producer[_tap(names, f"layers.{layer}.attn.scores_scaled")]
    k = 1 if mul.input[0] == _tap(names, f"layers.{layer}.attn.scores") else 0
    scale = _const_value(model, mul.input[k])
    mul.input[k] = _const(model, f"fault_scale_{layer}", (scale * scale).astype(scale.dtype))


def _rope_sin_inputs(g: Graph, rope_value: str):
    """The Mul of RoPE's rotated half (Concat(-x2, x1)) by the sin table: (node, index of sin)."""
    add = g.producer[rope_value]
    for v in add.input:
        mul = g.producer[v]
        for k, x in enumerate(mul.input):
            p = g.producer.get(x)
            if p is not None and p.op_type == "Concat":
                return mul, 1 - k
    raise LookupError("no rotated half in RoPE")


def _fault_rope_sin_sign(model, names, layer):
    """sin negated in this layer's RoPE of Q and K (a rotation the wrong way)."""
    import onnx

    g = Graph(model)
    for which in ("q_rope", "k_rope"):
        mul, k = _rope_sin_inputs(g, _tap(names, f"layers.{layer}.attn.{which}"))
        neg = f"fault_neg_sin_{layer}_{which}"
        model.graph.node.insert(list(model.graph.node).index(mul),
                                onnx.helper.make_node("Neg", [mul.input[k]], [neg]))
        mul.input[k] = neg


def _fault_rope_sin_table(model, names, layer):
    """The shared sin table stored negated (every layer rotates the wrong way)."""
    from onnx import numpy_helper

    g = Graph(model)
    mul, k = _rope_sin_inputs(g, _tap(names, "layers.0.attn.q_rope"))
    init = _initializer(model, mul.input[k])
    init.CopyFrom(numpy_helper.from_array(-numpy_helper.to_array(init), init.name))


def _identity(model, node, keep: str):
    import onnx

    node.CopyFrom(onnx.helper.make_node("Identity", [keep], [node.output[0]], name=node.name))


def _fault_residual_dropped(model, names, layer):
    g = Graph(model)
    _identity(model, g.producer[_tap(names, f"layers.{layer}.resid_mid")], _tap(names, f"layers.{layer}.attn.out"))


def _fault_mask_removed(model, names, layer):
    g = Graph(model)
    _identity(model, g.producer[_tap(names, f"layers.{layer}.attn.scores_masked")],
              _tap(names, f"layers.{layer}.attn.scores_scaled"))


def _fault_o_proj_transposed(model, names, layer):
    from onnx import numpy_helper

    g = Graph(model)
    init = _initializer(model, _linear(g, f"layers.{layer}.self_attn.o_proj").input[1])
    w = numpy_helper.to_array(init)
    init.CopyFrom(numpy_helper.from_array(np.ascontiguousarray(w.T), init.name))


def _fault_silu_to_gelu(model, names, layer):
    import onnx

    g = Graph(model)
    act = _tap(names, f"layers.{layer}.mlp.act")
    gate = _tap(names, f"layers.{layer}.mlp.gate")
    g.producer[act].CopyFrom(onnx.helper.make_node("Gelu", [gate], [act], name="fault_gelu"))


def _fault_kv_heads_tiled(model, names, layer):
    """K's GQA repeat as a tile (query head h reads KV head h % n_kv) instead of h // n_rep."""
    g = Graph(model)
    k_rope = _tap(names, f"layers.{layer}.attn.k_rope")
    unsq = next(u for u in g.consumers[k_rope] if u.op_type == "Unsqueeze")
    expand = g.consumers[unsq.output[0]][0]
    axis = _const_value(model, unsq.input[1])
    shape = _const_value(model, expand.input[1])  # [1, n_kv, n_rep, T, D]
    unsq.input[1] = _const(model, f"fault_unsq_{layer}", np.asarray([1], dtype=axis.dtype))
    tiled = shape.copy()
    tiled[1], tiled[2] = shape[2], shape[1]
    expand.input[1] = _const(model, f"fault_expand_{layer}", tiled)


def _fault_softmax_axis(model, names, layer):
    import onnx

    g = Graph(model)
    sm = g.producer[g.before(_tap(names, f"layers.{layer}.attn.probs"), ("Cast",))]
    assert sm.op_type == "Softmax", sm.op_type
    del sm.attribute[:]
    sm.attribute.append(onnx.helper.make_attribute("axis", -2))


def _fault_norm_rounded_to_fp16(model, names, layer):
    """A float32 engine whose attention RMSNorm output goes through a float16 buffer (rounded to
    fp16 and read back): wrong at fp32's precision, invisible at fp16's."""
    import onnx

    g = Graph(model)
    value = _tap(names, f"layers.{layer}.attn_norm")
    node = g.producer[value]
    at = list(model.graph.node).index(node)
    node.output[0] = value + "_fault_f32"
    model.graph.node.insert(at + 1, onnx.helper.make_node("Cast", [value + "_fault_f32"], [value + "_fault_f16"],
                                                          to=onnx.TensorProto.FLOAT16))
    model.graph.node.insert(at + 2, onnx.helper.make_node("Cast", [value + "_fault_f16"], [value],
                                                          to=onnx.TensorProto.FLOAT))


# name -> (edit, layer, the tap where it first shows)
FAULTS: dict[str, tuple] = {
    "rmsnorm_eps_after_sqrt": (_fault_eps_after_sqrt, 0, "layers.0.attn_norm"),
    "gate_up_swapped": (_fault_gate_up_swapped, 1, "layers.1.mlp.gate"),
    "scale_over_head_dim": (_fault_scale_over_head_dim, 1, "layers.1.attn.scores_scaled"),
    "rope_sin_sign": (_fault_rope_sin_sign, 1, "layers.1.attn.q_rope"),
    "rope_sin_table_negated": (_fault_rope_sin_table, 0, "layers.0.attn.q_rope"),
    "attn_residual_dropped": (_fault_residual_dropped, 1, "layers.1.resid_mid"),
    "o_proj_transposed": (_fault_o_proj_transposed, 1, "layers.1.attn.out"),
    "causal_mask_removed": (_fault_mask_removed, 0, "layers.0.attn.scores_masked"),
    "silu_to_gelu": (_fault_silu_to_gelu, 1, "layers.1.mlp.act"),
    "kv_heads_tiled": (_fault_kv_heads_tiled, 1, "layers.1.attn.k_rep"),
    "softmax_over_queries": (_fault_softmax_axis, 1, "layers.1.attn.probs"),
    "attn_norm_through_fp16": (_fault_norm_rounded_to_fp16, 1, "layers.1.attn_norm"),
}


def faulted(model, names: dict[str, str], fault: str):
    """A copy of `model` with `fault` edited in (value names kept, so the clean map applies)."""
    import onnx

    m = onnx.ModelProto()
    m.CopyFrom(model)
    edit, layer, _ = FAULTS[fault]
    edit(m, names, layer)
    return m
