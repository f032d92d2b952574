"""An ONNX Runtime engine for the field suite: the project's synthetic Llama exported by
torch's dynamo exporter, its intermediates exposed as graph outputs, faults edited into the
graph, run by onnxruntime at its default optimisation level and dumped to safetensors keyed
by the ONNX value names, with a `--map` JSON that names their taps.

The map is read off the exported graph's structure, never a hand-written list of value
names, by the package's own `mlx_tinyllama/onnx_engine.py` (the mapping, exposing and ORT
run of `trace onnx`, imported here: one implementation); this file keeps the export, the dump
and the graph faults.

Needs torch, transformers, onnx, onnxscript and onnxruntime (the dev extra)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from mlx_tinyllama.onnx_engine import SCOPES, Graph, expose, run, tap_map  # noqa: F401  (the package's, one implementation)


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
