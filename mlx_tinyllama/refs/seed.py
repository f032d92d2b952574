"""The seed's published JSON files (transformers, candle 22-layer, candle 1-layer):
each key mapped to a canonical tap and selector, with the traps each file holds."""

from __future__ import annotations

import re

import numpy as np

from ..config import ModelConfig
from ..errors import UserError
from .side import Item, SHORTCUT_LOGITS, SHORTCUT_NORM, Selector, Side

SEED_BOS = ModelConfig().bos_token_id  # the seed's values are TinyLlama-1.1B-Chat's: its config's BOS id


SEED_FORMAT = "mlx_tinyllama.seed-refs/1"


# ---------------------------------------------------------------------------
# The seed's JSON formats: key -> (tap, selector)

TRANSFORMERS_KEYS = {
    # key in intermediate_values -> (tap, selector, note)
    "embedding.sample_0_0_3": ("embed", "row0[0:3]", "hook on model.embed_tokens: output[0, 0, 0:3]"),
    "layer_0.attn_output.sample_0_0_3": ("layers.0.attn.out", "row0[0:3]",
                                         "hook on layers[0].self_attn: o_proj output before the residual add"),
    "layer_0.mlp_output.sample_0_0_3": ("layers.0.mlp.down", "row0[0:3]",
                                        "hook on layers[0].mlp: down_proj output before the residual add"),
    "layer_0.layer_output.sample_0_0_3": ("layers.0.out", "row0[0:3]", "hook on layers[0]: after both residual adds"),
    "layer_21_output.sample_last_0_3": ("final_norm", "last[0:3]",
                                        "TRAP: hidden_states[-1] is recorded after model.norm: the final-norm "
                                        "output of the last token, not layer 21's raw output"),
    "logits.sample_0_3": ("logits", "last[0:3]", "outputs.logits[0, -1, 0:3]: the last token's logits"),
    "logits.top_10": ("logits", "top10(last)", "torch.topk of the last token's logits"),
}


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def topk_value(entries) -> list[dict]:
    try:
        return [{"token_id": int(e["token_id"]), "logit": float(e["logit"])} for e in entries]
    except (TypeError, KeyError, ValueError) as e:
        raise UserError(f"malformed top-k list ({e}): expected [{{token_id, logit}}, ...]") from None


def seed_format_of(data: dict) -> str | None:
    if not isinstance(data, dict):
        return None
    if "intermediate_values" in data:
        return "transformers_reference_values"
    if "top_predictions" in data and "final_norm" in data:
        return "candle_1layer_reference"
    if isinstance(data.get("layer_0"), dict) and "output_sum" in data["layer_0"] and "final_norm" in data:
        return "candle_22layers_reference"
    return None


def seed_entries(fmt: str, data: dict) -> dict:
    """Map one of the seed's JSON files to {entries, not_comparable, prompt, config, dtype, provenance}."""
    try:
        return _SEED_MAPPERS[fmt](data)
    except (KeyError, TypeError, ValueError, IndexError) as e:
        raise UserError(f"malformed {fmt}.json: {type(e).__name__}: {e}") from None


def _entry(key, tap, index, value, note=""):
    return {"key": key, "tap": tap, "index": index, "value": value, "note": note}


def _map_transformers(data: dict) -> dict:
    iv = _flat(data["intermediate_values"])
    entries, skipped = [], []
    for key, value in iv.items():
        if key in TRANSFORMERS_KEYS:
            tap, index, note = TRANSFORMERS_KEYS[key]
            value = topk_value(value) if index.startswith("top") else [float(v) for v in value]
            entries.append(_entry(f"intermediate_values.{key}", tap, index, value, note))
        elif key.endswith(".shape"):
            continue  # shapes are checked through the config and token count
        else:
            skipped.append({"key": f"intermediate_values.{key}", "reason": "unknown key: no canonical tap known"})
    ids = [int(i) for i in data["tokens"]]
    hidden = data["intermediate_values"].get("embedding", {}).get("shape", [None, None])[-1]
    return {"entries": entries, "not_comparable": skipped,
            "prompt": {"text": data.get("prompt"), "ids": ids, "n_tokens": len(ids), "bos": bool(ids and ids[0] == SEED_BOS)},
            "config": {"hidden_size": hidden} if hidden else {}, "dtype": "float16",
            "provenance": {"computed_by": "Hugging Face transformers (the seed author's script)",
                           "how": "forward hooks on model.embed_tokens, layers[0].self_attn, layers[0].mlp, "
                                  "layers[0]; outputs.hidden_states[-1]; outputs.logits[0, -1]",
                           "dtype": "float16 forward pass, values cast to float32", "device": "cpu",
                           "versions": "not recorded (refs/README says hidden_states[-1] == model.norm output "
                                       "was checked on transformers 5.24)"}}


def _map_candle22(data: dict) -> dict:
    layers = sorted(int(k.split("_")[1]) for k in data if re.fullmatch(r"layer_\d+", k))
    entries = [_entry("embedding.sum", "embed", "sum", float(data["embedding"]["sum"]), "sum over [39, 2048]")]
    for i in layers:
        entries.append(_entry(f"layer_{i}.output_sum", f"layers.{i}.out", "sum",
                              float(data[f"layer_{i}"]["output_sum"]), "decoder layer output, whole-tensor sum"))
    entries.append(_entry("final_norm.sum", "final_norm", "sum", float(data["final_norm"]["sum"]), ""))
    entries.append(_entry("logits.last_token_sum", "logits", "last.sum", float(data["logits"]["last_token_sum"]),
                          "sum of the last token's logits"))
    n = int(data["num_tokens"])

    return {"entries": entries, "not_comparable": [],
            "prompt": {"text": data.get("prompt"), "ids": None, "n_tokens": n, "bos": True,
                       "ids_note": "the file stores no ids: 39 = BOS (1) + the 38 ids of the other files "
                                   "(candle's quantized example prepends BOS)"},
            "config": {"num_hidden_layers": len(layers)}, "dtype": "float16",
            "provenance": {"computed_by": "candle `quantized` example (Rust)",
                           "how": f"on {data.get('model_file', 'a GGUF file')}; sums over whole tensors",
                           "dtype": "float16 GGUF weights; candle's compute precision not recorded",
                           "device": "not recorded", "versions": "not recorded",
                           "note": data.get("note", "")}}


def _map_candle1(data: dict) -> dict:
    emb, fn, lg = data["embedding"], data["final_norm"], data["logits"]
    entries = [
        _entry("embedding.sum", "embed", "sum", float(emb["sum"]), "embed_tokens output"),
        _entry("embedding.first_3", "embed", "row0[0:3]", [float(v) for v in emb["first_3"]], ""),
        _entry("final_norm.sum", SHORTCUT_NORM, "sum", float(fn["sum"]),
               "model.norm applied directly to layer 0's output (layers 1-21 skipped)"),
        _entry("final_norm.first_3", SHORTCUT_NORM, "row0[0:3]", [float(v) for v in fn["first_3"]], ""),
        _entry("logits.last_token_sum", SHORTCUT_LOGITS, "last.sum", float(lg["last_token_sum"]),
               "lm_head(norm(layer 0 output)), last token"),
        _entry("top_predictions", SHORTCUT_LOGITS, "top10(last)", topk_value(data["top_predictions"]), ""),
    ]
    skipped = [{"key": f"layer_0.{k}", "reason": "TRAP: holds norm(layer 0 output), the same numbers as final_norm "
                                                  "(the seed script overwrote its variable before saving), not the raw "
                                                  "layer-0 output; compared once, under final_norm"}
               for k in data["layer_0"] if k != "output_shape"]
    ids = [int(i) for i in data["token_ids"]]
    return {"entries": entries, "not_comparable": skipped,
            "prompt": {"text": data.get("prompt"), "ids": ids, "n_tokens": len(ids), "bos": bool(ids and ids[0] == SEED_BOS)},
            "config": {"hidden_size": int(emb["shape"][-1]), "vocab_size": int(lg["shape"][-1])}, "dtype": "float16",
            "provenance": {"computed_by": "Hugging Face transformers (despite the file name)",
                           "how": "full model run; hidden_states[1] (layer 0 output) -> model.norm -> lm_head, "
                                  "layers 1-21 skipped",
                           "dtype": "float16", "device": "cpu", "versions": "not recorded"}}


_SEED_MAPPERS = {"transformers_reference_values": _map_transformers, "candle_22layers_reference": _map_candle22,
                 "candle_1layer_reference": _map_candle1}


def side_from_entries(name: str, kind: str, mapped: dict) -> Side:
    items = []
    for e in mapped["entries"]:
        sel = Selector.parse(e["index"])
        value = e["value"] if sel.kind == "topk" else np.asarray(e["value"], np.float64)
        items.append(Item(e["tap"], sel, value, key=e["key"], note=e.get("note", "")))
    p = mapped["prompt"]
    return Side(name=name, kind=kind, dtype=mapped.get("dtype"), ids=p.get("ids"), n_tokens=p.get("n_tokens"),
                config=mapped.get("config") or None, items=items, not_comparable=list(mapped["not_comparable"]),
                provenance=mapped.get("provenance", {}), ids_note=p.get("ids_note", ""))
