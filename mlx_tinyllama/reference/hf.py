"""The transformers reference: run the checkpoint's class (LlamaForCausalLM, Qwen2ForCausalLM, MistralForCausalLM) on a model directory and
capture every canonical tap (taps.py) with the same names and shapes as this
package's own run.

Module outputs are taken with forward hooks; sub-operations that are not module
outputs are recomputed from hooked inputs with transformers' own functions
(`apply_rotary_pos_emb`, `repeat_kv`, the eager attention's matmul/scale/mask/
softmax sequence), in the dtype transformers used. The eager attention's own
probabilities (output_attentions) are checked against the recomputed ones, so a
change in transformers' attention is noticed rather than silently mirrored.

Needs torch and transformers (the `dev` extra); imported lazily.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import platform
from pathlib import Path

from ..outputs import atomic_path, write_text
from ..refs.loaders import MANIFEST_FORMAT
from ..taps import tap_names


def _torch():
    try:
        import torch
        import transformers  # noqa: F401
    except ImportError as e:  # pragma: no cover - depends on the environment
        from ..errors import UserError

        raise UserError(
            f"the transformers reference needs torch and transformers ({e.name} is missing): "
            "pip install 'mlx_tinyllama[dev]'"
        ) from None
    return torch


def load_hf_model(model_dir: Path, dtype: str = "float32"):
    torch = _torch()
    import transformers

    from ..config import load_config

    cls = getattr(transformers, load_config(Path(model_dir)).architecture)  # the checkpoint's own class
    model = cls.from_pretrained(str(model_dir), dtype=getattr(torch, dtype), attn_implementation="eager")
    model.eval()
    return model


def capture(model, ids: list[int]) -> tuple[dict, "object"]:
    """Run `model` on `ids` (no BOS added) and return ({tap name: tensor without batch dim}, logits)."""
    import sys

    torch = _torch()
    # The architecture's own modeling module (Llama, Qwen2, Mistral): its RoPE and GQA repeat.
    ml = sys.modules[type(model.model.layers[0].self_attn).__module__]

    cfg = model.config
    n_layers = cfg.num_hidden_layers
    n_heads, n_kv = cfg.num_attention_heads, cfg.num_key_value_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // n_heads
    taps: dict = {}
    hooks = []

    def out_hook(name, transform=None):
        def hook(module, args, kwargs, output):
            y = output[0] if isinstance(output, tuple) else output
            taps[name] = (transform(y) if transform else y)[0].detach().clone()
        return hook

    def in_hook(name, transform=None):
        def hook(module, args, kwargs):
            x = args[0] if args else kwargs["hidden_states"]
            taps[name] = (transform(x) if transform else x)[0].detach().clone()
        return hook

    def heads(n):
        return lambda y: y.view(y.shape[0], y.shape[1], n, head_dim).transpose(1, 2)

    attn_inputs: dict = {}

    def attn_pre(i):
        def hook(module, args, kwargs):
            attn_inputs[i] = kwargs
        return hook

    m = model.model
    hooks.append(m.embed_tokens.register_forward_hook(out_hook("embed"), with_kwargs=True))
    for i, layer in enumerate(m.layers):
        p = f"layers.{i}."
        a, mlp = layer.self_attn, layer.mlp
        reg = [
            (layer.input_layernorm, out_hook(p + "attn_norm")),
            (a.q_proj, out_hook(p + "attn.q", heads(n_heads))),
            (a.k_proj, out_hook(p + "attn.k", heads(n_kv))),
            (a.v_proj, out_hook(p + "attn.v", heads(n_kv))),
            (a, out_hook(p + "attn.out")),
            (layer.post_attention_layernorm, out_hook(p + "mlp_norm")),
            (mlp.gate_proj, out_hook(p + "mlp.gate")),
            (mlp.up_proj, out_hook(p + "mlp.up")),
            (mlp.act_fn, out_hook(p + "mlp.act")),
            (mlp, out_hook(p + "mlp.down")),
            (layer, out_hook(p + "out")),
        ]
        hooks += [mod.register_forward_hook(h, with_kwargs=True) for mod, h in reg]
        hooks.append(a.o_proj.register_forward_pre_hook(in_hook(p + "attn.context"), with_kwargs=True))
        hooks.append(layer.post_attention_layernorm.register_forward_pre_hook(in_hook(p + "resid_mid"), with_kwargs=True))
        hooks.append(mlp.down_proj.register_forward_pre_hook(in_hook(p + "mlp.prod"), with_kwargs=True))
        hooks.append(a.register_forward_pre_hook(attn_pre(i), with_kwargs=True))
    hooks.append(m.norm.register_forward_hook(out_hook("final_norm"), with_kwargs=True))
    try:
        with torch.no_grad():
            out = model(torch.tensor([ids]), output_attentions=True, use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    taps["logits"] = out.logits[0].detach().clone()

    # Sub-operations that are not module outputs: recompute them exactly as the eager attention does.
    for i, layer in enumerate(m.layers):
        p = f"layers.{i}."
        kw = attn_inputs[i]
        cos, sin = kw["position_embeddings"]
        q = taps[p + "attn.q"][None]
        k = taps[p + "attn.k"][None]
        with torch.no_grad():
            q_rope, k_rope = ml.apply_rotary_pos_emb(q, k, cos, sin)
            k_rep = ml.repeat_kv(k_rope, n_heads // n_kv)
            scores = torch.matmul(q_rope, k_rep.transpose(2, 3))
            scaled = scores * layer.self_attn.scaling
            mask = kw.get("attention_mask")
            if mask is None:  # transformers skipped the mask: rebuild its additive causal mask
                T = scaled.shape[-1]
                mask = torch.full((T, T), torch.finfo(scaled.dtype).min, dtype=scaled.dtype).triu(1)[None, None]
            masked = scaled + mask[..., : scaled.shape[-1]]
            probs = torch.nn.functional.softmax(masked, dim=-1, dtype=torch.float32).to(q.dtype)
        eager_probs = out.attentions[i]
        if not torch.allclose(probs, eager_probs, rtol=0, atol=0, equal_nan=True):  # NaN where transformers breaks
            raise RuntimeError(
                f"layer {i}: recomputed attention probs differ from transformers' eager attention "
                f"(max diff {(probs.float() - eager_probs.float()).abs().max().item():.3g}): "
                "transformers' attention changed; update reference/hf.py"
            )
        taps[p + "attn.q_rope"] = q_rope[0]
        taps[p + "attn.k_rope"] = k_rope[0]
        taps[p + "attn.k_rep"] = k_rep[0]
        taps[p + "attn.v_rep"] = ml.repeat_kv(taps[p + "attn.v"][None], n_heads // n_kv)[0]
        taps[p + "attn.scores"] = scores[0]
        taps[p + "attn.scores_scaled"] = scaled[0]
        taps[p + "attn.scores_masked"] = masked[0]
        taps[p + "attn.probs"] = probs[0]
    order = tap_names(n_layers)
    missing = [n for n in order if n not in taps]
    if missing:
        raise RuntimeError(f"reference capture missed taps: {missing[:5]}")
    return {n: taps[n] for n in order}, out.logits


def versions() -> dict:
    torch = _torch()
    import transformers

    import mlx_tinyllama

    return {
        "transformers": transformers.__version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "mlx_tinyllama": mlx_tinyllama.__version__,
    }


def weights_digest(model_dir: Path) -> str:
    """sha256 over the safetensors files (names and bytes), to tie a reference to its weights."""
    h = hashlib.sha256()
    for f in sorted(Path(model_dir).glob("*.safetensors")):
        h.update(f.name.encode())
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 24), b""):
                h.update(chunk)
    return h.hexdigest()


def write_reference(out: Path, model_dir: Path, ids: list[int], dtype: str = "float32",
                    model_spec: str | None = None, prompt_text: str | None = None,
                    top_k: int = 10, taps: list[str] | None = None) -> Path:
    """Capture the taps and write `out.safetensors` + `out.json` (the manifest). Returns the manifest path."""
    torch = _torch()
    from safetensors.torch import save_file

    from ..config import load_config

    out = Path(out)
    config = load_config(model_dir)
    model = load_hf_model(model_dir, dtype)
    captured, logits = capture(model, ids)
    if taps is not None:
        captured = {n: captured[n] for n in taps}
    last = logits[0, -1].float()
    vals, idx = torch.topk(last, top_k)
    out.parent.mkdir(parents=True, exist_ok=True)
    tensor_file = out.with_suffix(".safetensors")
    with atomic_path(tensor_file, suffix=".safetensors") as tmp:
        save_file({n: t.contiguous() for n, t in captured.items()}, str(tmp))
    manifest = {
        "format": MANIFEST_FORMAT,
        "kind": "full-tensors",
        "tensors": tensor_file.name,
        "provenance": {
            "computed_by": f"Hugging Face transformers ({load_config(model_dir).architecture}, eager attention, "
                           "eval mode, no cache)",
            "script": "scripts/make_reference.py",
            "method": "forward hooks for module outputs; RoPE/scores/mask/softmax recomputed with transformers' "
                      "apply_rotary_pos_emb and repeat_kv from hooked inputs, checked equal to the eager "
                      "attention's own probabilities",
            "dtype": dtype,
            "device": "cpu",
            "date": _dt.date.today().isoformat(),
            "versions": versions(),
        },
        "model": {
            "spec": model_spec or str(model_dir),
            "config": config.as_dict(),
            "weights_sha256": weights_digest(model_dir),
        },
        "prompt": {"text": prompt_text, "ids": list(ids), "bos": bool(ids and ids[0] == config.bos_token_id)},
        "taps": {n: {"shape": list(t.shape), "dtype": str(t.dtype).replace("torch.", "")} for n, t in captured.items()},
        "top_k": [{"token_id": int(i), "logit": float(v)} for v, i in zip(vals.tolist(), idx.tolist())],
    }
    manifest_path = out.with_suffix(".json")
    write_text(manifest_path, json.dumps(manifest, indent=1) + "\n")
    return manifest_path
