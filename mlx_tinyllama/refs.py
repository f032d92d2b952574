"""Reference formats and other engines' dumps, read into one shape: a `Side`.

A `Side` is one set of numbers to compare: full tensors under canonical tap names
(taps.py) and/or `Item`s, each a canonical tap plus a `Selector` saying which
part of that tap the number is (row 0 columns 0:3, last row columns 0:3, the
whole-tensor sum, the last row's sum, top-10 of the last row, or the full tensor,
possibly sparse). Formats read here:

- the project's full-tensor references (`refs/*.json` manifest + safetensors,
  written by `reference/hf.py::write_reference`);
- the seed's published JSON files (`../shared/refs/tinyllama-1.1b-chat-v1.0/*.json`)
  and the project's carried-over copy of them (`refs/*.seed.json`, one file, several
  sources; made by scripts/import_seed_refs.py);
- another engine's numbers: safetensors or npz tensors, a JSON of stats/samples
  (the `run --json` shape), and llama.cpp `llama-eval-callback` text logs.

Layouts are made canonical by `to_canonical` (batch dim, ggml's reversed dims,
heads split/merged, GGUF's per-head Q/K row permutation, padded KV length, only the
last token's rows).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import UserError
from .taps import split_name, stage_of, tap_names

SEED_FORMAT = "mlx_tinyllama.seed-refs/1"
MANIFEST_FORMAT = "mlx_tinyllama.reference/1"  # reference/hf.py's manifest

# Taps of the seed's 1-layer shortcut (candle_1layer_reference.json): the final norm and
# the lm_head applied directly to layer 0's output. Only a run that does the same
# shortcut can be compared with them (compare.py computes it from the layers.0.out tap).
SHORTCUT_NORM = "shortcut.final_norm(layers.0.out)"
SHORTCUT_LOGITS = "shortcut.logits(layers.0.out)"
SHORTCUT_TAPS = (SHORTCUT_NORM, SHORTCUT_LOGITS)

LLAMACPP_PRINT_RESOLUTION = 0.5e-4  # llama.cpp prints values with "%12.4f": +-0.00005


# ---------------------------------------------------------------------------
# Selectors and items


@dataclass(frozen=True)
class Selector:
    """Which part of a tap a reference number is.

    kind: full | row | sum | row_sum | topk. `row` is a token position (0, -1, ...);
    a row of a head-major tap ([H, T, ...]) is head 0's row, as taps.Taps' first/last.
    """

    kind: str
    row: int | None = None
    cols: tuple[int, int] | None = None  # None: the whole row
    k: int | None = None

    @property
    def key(self) -> str:
        r = {0: "row0", -1: "last"}.get(self.row, f"row{self.row}")
        if self.kind == "row":
            return f"{r}[{self.cols[0]}:{self.cols[1]}]" if self.cols else f"{r}[:]"
        if self.kind == "row_sum":
            return f"{r}.sum"
        if self.kind == "topk":
            return f"top{self.k}({r})"
        return self.kind

    @classmethod
    def parse(cls, text: str) -> "Selector":
        m = re.fullmatch(r"(row(-?\d+)|last)(\[(\d*):(\d*)\]|\.sum)|top(\d+)\((row(-?\d+)|last)\)|full|sum", text)
        if not m:
            raise UserError(f"bad index {text!r}: expected full, sum, row0[0:3], last[0:3], last.sum, top10(last)")
        if text in ("full", "sum"):
            return cls(text)
        if m.group(6):
            return cls("topk", row=-1 if m.group(7) == "last" else int(m.group(8)), k=int(m.group(6)))
        row = -1 if m.group(1) == "last" else int(m.group(2))
        if m.group(3) == ".sum":
            return cls("row_sum", row=row)
        cols = (int(m.group(4)), int(m.group(5))) if m.group(4) else None
        return cls("row", row=row, cols=cols)

    def row_of(self, x: np.ndarray, token_axis: int) -> np.ndarray:
        if x.ndim == 1:
            return x
        return (x[self.row] if token_axis == 0 else x[0, self.row]).reshape(-1)

    def extract(self, x: np.ndarray, token_axis: int):
        """The part of full tensor x (canonical layout) this selector names."""
        if self.kind == "full":
            return x
        if self.kind == "sum":
            return np.float64(np.sum(x[np.isfinite(x)], dtype=np.float64))
        row = self.row_of(x, token_axis).astype(np.float64)
        if self.kind == "row":
            return row[self.cols[0]:self.cols[1]] if self.cols else row
        if self.kind == "row_sum":
            return np.float64(np.sum(row[np.isfinite(row)]))
        order = np.argsort(-np.nan_to_num(row, nan=-np.inf), kind="stable")[: self.k]
        return [{"token_id": int(i), "logit": float(row[i])} for i in order]

    def scale(self, x: np.ndarray, token_axis: int) -> float:
        """The size an error of this item is measured against: RMS (values) or L1 (sums)."""
        part = x if self.kind in ("full", "sum") else self.row_of(x, token_axis)
        part = np.asarray(part, np.float64)
        part = part[np.isfinite(part)]
        if part.size == 0:
            return float("nan")
        if self.kind in ("sum", "row_sum"):
            return float(np.sum(np.abs(part)))
        return float(np.sqrt(np.mean(part * part)))


@dataclass
class Item:
    tap: str
    selector: Selector
    value: object  # np.ndarray, float, or a top-k list of {token_id, logit}
    key: str = ""  # where it came from in its file
    known: np.ndarray | None = None  # sparse full tensors: which positions hold values
    resolution: float = 0.0  # absolute precision of the printed values
    note: str = ""
    token_rows: list[int] | None = None  # only these token positions (e.g. llama.cpp's last layer)
    source_shape: tuple | None = None  # sums of another engine's tensor: its shape, to find the rows it covers


@dataclass
class Side:
    name: str
    kind: str  # full-tensors | seed-json | run | dump | stats-json | llama.cpp-log
    dtype: str | None = None  # for tolerances; None = unknown
    ids: list[int] | None = None
    n_tokens: int | None = None
    config: dict | None = None  # (partial) model shape
    tensors: dict[str, np.ndarray] = field(default_factory=dict)
    items: list[Item] = field(default_factory=list)
    not_comparable: list[dict] = field(default_factory=list)
    provenance: dict = field(default_factory=dict)
    layout: str = "hf"  # hf | gguf (Q/K rows permuted per head)
    ids_note: str = ""

    def taps(self) -> set[str]:
        return set(self.tensors) | {i.tap for i in self.items}

    def header(self) -> dict:
        return {"name": self.name, "kind": self.kind, "dtype": self.dtype, "n_tokens": self.n_tokens,
                "provenance": self.provenance, "layout": self.layout}


def tap_order(n_layers: int) -> list[str]:
    return tap_names(n_layers) + list(SHORTCUT_TAPS)


def token_axis_of(tap: str) -> int:
    return 0 if tap in SHORTCUT_TAPS else stage_of(tap).token_axis


def is_known_tap(tap: str) -> bool:
    if tap in SHORTCUT_TAPS:
        return True
    try:
        layer, _ = split_name(tap)
        stage_of(tap)
    except (KeyError, ValueError):
        return False
    return layer is None or layer >= 0


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


def _topk_value(entries) -> list[dict]:
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
            value = _topk_value(value) if index.startswith("top") else [float(v) for v in value]
            entries.append(_entry(f"intermediate_values.{key}", tap, index, value, note))
        elif key.endswith(".shape"):
            continue  # shapes are checked through the config and token count
        else:
            skipped.append({"key": f"intermediate_values.{key}", "reason": "unknown key: no canonical tap known"})
    ids = [int(i) for i in data["tokens"]]
    hidden = data["intermediate_values"].get("embedding", {}).get("shape", [None, None])[-1]
    return {"entries": entries, "not_comparable": skipped,
            "prompt": {"text": data.get("prompt"), "ids": ids, "n_tokens": len(ids), "bos": bool(ids and ids[0] == 1)},
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
        _entry("top_predictions", SHORTCUT_LOGITS, "top10(last)", _topk_value(data["top_predictions"]), ""),
    ]
    skipped = [{"key": f"layer_0.{k}", "reason": "TRAP: holds norm(layer 0 output), the same numbers as final_norm "
                                                  "(the seed script overwrote its variable before saving), not the raw "
                                                  "layer-0 output; compared once, under final_norm"}
               for k in data["layer_0"] if k != "output_shape"]
    ids = [int(i) for i in data["token_ids"]]
    return {"entries": entries, "not_comparable": skipped,
            "prompt": {"text": data.get("prompt"), "ids": ids, "n_tokens": len(ids), "bos": bool(ids and ids[0] == 1)},
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


# ---------------------------------------------------------------------------
# Loading


def load(path: str | Path, name_map: dict | None = None, layout: str | None = None) -> list[Side]:
    """Read any supported file into one or more Sides (a seed bundle holds several)."""
    path = Path(path)
    from .dump import INDEX_SUFFIX, index_path

    if not path.exists() and index_path(path).is_file():  # a sharded dump named by its first form
        path = index_path(path)
    if not path.exists():
        raise UserError(f"{path} does not exist")
    if path.name.endswith(INDEX_SUFFIX):
        return [_load_sharded(path, name_map, layout or "hf")]
    if path.is_dir():
        raise UserError(f"{path} is a directory: give a reference .json, a .safetensors/.npz dump or a log file")
    suffix = path.suffix.lower()
    if suffix == ".json":
        return _load_json(path, name_map)
    if suffix in (".safetensors", ".npz"):
        return [_load_tensors(path, name_map, layout or "hf")]
    text = _read_text(path)
    if "ggml_debug" in text or "common_debug_cb_eval" in text or re.search(r"= \(\w+\)\s+\S+\(", text):
        return [parse_llamacpp_log(text, path.name, name_map, layout or "gguf")]
    raise UserError(f"{path}: not a recognised reference or dump (expected .json, .safetensors, .npz, "
                    "or a llama.cpp eval-callback log with 'ggml_debug: NAME = (type) OP(...) = {shape}' lines)")


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8", errors="replace")
    except OSError as e:
        raise UserError(f"cannot read {path}: {e.strerror or e}") from None


def _load_json(path: Path, name_map: dict | None) -> list[Side]:
    try:
        data = json.loads(_read_text(path))
    except json.JSONDecodeError as e:
        raise UserError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a JSON object at the top level")
    fmt = data.get("format")
    if fmt == MANIFEST_FORMAT:
        return [_load_manifest(path, data)]
    if fmt == SEED_FORMAT:
        return _load_bundle(path, data)
    seed = seed_format_of(data)
    if seed:
        return [side_from_entries(path.name, "seed-json", seed_entries(seed, data))]
    if isinstance(data.get("taps"), dict):
        return [_load_stats_json(path, data, name_map)]
    raise UserError(f"{path}: unrecognised JSON (not a reference manifest '{MANIFEST_FORMAT}', a seed bundle "
                    f"'{SEED_FORMAT}', one of the seed's files, nor a stats JSON with 'taps')")


def _load_manifest(path: Path, data: dict) -> Side:
    tensor_file = path.parent / str(data.get("tensors", ""))
    if not tensor_file.is_file():
        raise UserError(f"{path}: its tensor file {tensor_file.name} is missing beside it")
    tensors = read_tensor_file(tensor_file)
    try:
        prompt, model = data["prompt"], data["model"]
        ids = [int(i) for i in prompt["ids"]]
        declared = data["taps"]
        dtype = data["provenance"]["dtype"]
    except (KeyError, TypeError, ValueError) as e:
        raise UserError(f"{path}: malformed reference manifest ({type(e).__name__}: {e})") from None
    missing = [n for n in declared if n not in tensors]
    if missing:
        raise UserError(f"{path}: {tensor_file.name} lacks {len(missing)} declared tap(s), e.g. {missing[0]}")
    side = Side(name=path.name, kind="full-tensors", dtype=dtype, ids=ids, n_tokens=len(ids),
                config=model.get("config"), provenance=dict(data.get("provenance", {}), model=model.get("spec"),
                                                            weights_sha256=model.get("weights_sha256")))
    rows = data.get("token_rows", {})  # taps stored for some token positions only (kept small)
    for name in declared:
        x = tensors[name]
        if name in rows:
            for j, t in enumerate(rows[name]):
                side.items.append(Item(name, Selector("row", row=int(t)), x[j], key=f"{name}[{t}]",
                                       note="stored for this token position only"))
        else:
            side.tensors[name] = x
    if data.get("top_k"):
        side.items.append(Item("logits", Selector("topk", row=-1, k=len(data["top_k"])), _topk_value(data["top_k"]),
                               key="top_k"))
    return side


def _load_bundle(path: Path, data: dict) -> list[Side]:
    try:
        sources = data["sources"]
        config = data.get("config") or {}
        out = []
        for name, src in sources.items():
            mapped = {"entries": src["entries"], "not_comparable": src.get("not_comparable", []),
                      "prompt": src["prompt"], "dtype": src.get("dtype"), "provenance": src.get("provenance", {}),
                      "config": dict(config, **(src.get("config") or {}))}
            out.append(side_from_entries(f"{path.name}#{name}", "seed-json", mapped))
        return out
    except (KeyError, TypeError, AttributeError) as e:
        raise UserError(f"{path}: malformed seed reference bundle ({type(e).__name__}: {e})") from None


def _load_stats_json(path: Path, data: dict, name_map: dict | None) -> Side:
    """The `run --json` shape (or any engine writing it): per-tap {first, last, sum, ...} and top_k."""
    side = Side(name=path.name, kind="stats-json", dtype=data.get("dtype"),
                ids=[int(i) for i in data["tokens"]] if isinstance(data.get("tokens"), list) else None,
                config=(data.get("model") or {}).get("config") if isinstance(data.get("model"), dict) else None)
    side.n_tokens = len(side.ids) if side.ids else None
    for their, stats in data["taps"].items():
        tap = map_name(their, name_map)
        if tap is None:
            side.not_comparable.append({"key": their, "reason": "no canonical tap for this name (give --map)"})
            continue
        if not isinstance(stats, dict):
            raise UserError(f"{path}: taps.{their} is not an object")
        if "values" in stats:
            side.tensors[tap] = np.asarray(stats["values"], np.float64)
        for field_name, sel in (("first", Selector("row", 0, (0, 3))), ("last", Selector("row", -1, (0, 3))),
                                ("sum", Selector("sum"))):
            if field_name in stats:
                value = np.asarray(_num(stats[field_name]), np.float64)
                if sel.kind == "row":
                    sel = Selector("row", sel.row, (0, value.size))
                side.items.append(Item(tap, sel, value, key=f"taps.{their}.{field_name}"))
    if isinstance(data.get("top_k"), list) and data["top_k"]:
        side.items.append(Item("logits", Selector("topk", row=-1, k=len(data["top_k"])),
                               _topk_value(data["top_k"]), key="top_k"))
    return side


def _num(v):
    """JSON writes NaN/Inf as strings (cli_common.write_json)."""
    if isinstance(v, list):
        return [_num(x) for x in v]
    if isinstance(v, str):
        return float(v)
    return v


def read_tensor_file(path: Path) -> dict[str, np.ndarray]:
    """safetensors (any float dtype, bf16 included) or npz -> float32 numpy arrays."""
    try:
        if path.suffix.lower() == ".npz":
            with np.load(path) as z:
                return {k: np.asarray(z[k]) for k in z.files}
        import mlx.core as mx

        return {k: np.array(v.astype(mx.float32)) if v.dtype != mx.float32 else np.array(v)
                for k, v in mx.load(str(path), format="safetensors").items()}
    except Exception as e:  # truncated or foreign files raise several types
        raise UserError(f"cannot read {path}: {type(e).__name__}: {e} (truncated or not a tensor file?)") from None


def _tensor_dtype(path: Path) -> str | None:
    if path.suffix.lower() != ".safetensors":
        return None
    try:
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(n))
        meta = header.pop("__metadata__", {}) or {}
        kinds = {v.get("dtype") for v in header.values() if isinstance(v, dict)}
        return meta.get("dtype") or {"F16": "float16", "BF16": "bfloat16", "F32": "float32"}.get(
            kinds.pop() if len(kinds) == 1 else "")
    except Exception:  # the tensor reader reports a broken file with a clear message
        return None


def _safetensors_metadata(path: Path) -> dict:
    if path.suffix.lower() != ".safetensors":
        return {}
    try:
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            return json.loads(f.read(n)).get("__metadata__", {}) or {}
    except Exception:
        return {}


def _load_tensors(path: Path, name_map: dict | None, layout: str) -> Side:
    tensors = read_tensor_file(path)
    meta = _safetensors_metadata(path)
    ids = None
    if "tokens" in meta:
        try:
            ids = [int(i) for i in json.loads(meta["tokens"])]
        except (ValueError, TypeError):
            ids = None
    side = Side(name=path.name, kind="dump", dtype=_tensor_dtype(path), ids=ids,
                n_tokens=len(ids) if ids else None, layout=layout, provenance={"metadata": meta})
    for their, x in tensors.items():
        tap = map_name(their, name_map)
        if tap is None:
            side.not_comparable.append({"key": their, "reason": "no canonical tap for this name (give --map)"})
        else:
            side.tensors[tap] = np.asarray(x, np.float32)
    return side


def _load_sharded(path: Path, name_map: dict | None, layout: str) -> Side:
    """A dump streamed in shards (dump.py): its index names the shards, read as one dump."""
    from .dump import read_index

    shards, _ = read_index(path)
    side = _load_tensors(shards[0], name_map, layout)
    for shard in shards[1:]:
        more = _load_tensors(shard, name_map, layout)
        side.tensors.update(more.tensors)
        side.not_comparable += more.not_comparable
    side.name = path.name
    return side


# ---------------------------------------------------------------------------
# Names: canonical, user mappings, llama.cpp's graph names

# llama.cpp Llama graph (src/models/llama.cpp, src/llama-graph.cpp build_norm/build_qkv/build_attn/
# build_ffn): callback name -> canonical stage. Names that occur twice in one layer are told
# apart by op (Qcur/Kcur: ROPE is after RoPE) or order (ffn_out: first the MLP output, then
# the residual sum).
LLAMACPP_STAGES = {
    "attn_norm": "attn_norm", "Vcur": "attn.v", "kq": "attn.scores", "kq_soft_max": "attn.probs",
    "kq_soft_max_ext": "attn.probs", "kqv": "attn.context", "kqv_out": "attn.context", "attn_out": "attn.out",
    "ffn_inp": "resid_mid", "ffn_norm": "mlp_norm", "ffn_gate": "mlp.gate", "ffn_up": "mlp.up",
    "ffn_silu": "mlp.act", "ffn_swiglu": "mlp.prod", "ffn_gate_par": "mlp.prod", "ffn_down": "mlp.down",
    "l_out": "out",
}
LLAMACPP_GLOBAL = {"inp_embd": "embed", "result_norm": "final_norm", "result_output": "logits"}
LLAMACPP_TWICE = {"Qcur": ("attn.q", "attn.q_rope"), "Kcur": ("attn.k", "attn.k_rope"),
                  "ffn_out": ("mlp.down", "out")}


def map_name(name: str, name_map: dict | None = None) -> str | None:
    """Their tensor name -> canonical tap (user map first, then canonical names, then llama.cpp's)."""
    if name_map and name in name_map:
        return name_map[name]
    if is_known_tap(name):
        return name
    m = re.fullmatch(r"(\w+)-(\d+)", name)
    if m and m.group(1) in LLAMACPP_STAGES:
        return f"layers.{m.group(2)}.{LLAMACPP_STAGES[m.group(1)]}"
    if m and m.group(1) in LLAMACPP_TWICE:  # without op/order information: the first meaning
        return f"layers.{m.group(2)}.{LLAMACPP_TWICE[m.group(1)][0]}"
    return LLAMACPP_GLOBAL.get(name)


def llamacpp_tap(name: str, op: str, occurrence: int, occurrences: int, name_map: dict | None = None) -> str | None:
    """Canonical tap of the `occurrence`-th (0-based) of `occurrences` tensors printed under `name`."""
    if name_map and name in name_map:
        return name_map[name]
    m = re.fullmatch(r"(\w+)-(\d+)", name)
    if m and m.group(1) in LLAMACPP_TWICE:
        before, after = LLAMACPP_TWICE[m.group(1)]
        if m.group(1) in ("Qcur", "Kcur"):
            late = op.upper().startswith("ROPE") if op else occurrence == occurrences - 1 and occurrences > 1
        else:
            late = occurrence == occurrences - 1 and occurrences > 1 or op.upper() == "ADD" and occurrences == 1
        return f"layers.{m.group(2)}.{after if late else before}"
    return map_name(name, None)


def read_name_map(path: str | Path | None) -> dict | None:
    if path is None:
        return None
    p = Path(path)
    if not p.is_file():
        raise UserError(f"--map: {p} does not exist")
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"--map: {p} is not valid JSON: {e}") from None
    if not isinstance(data, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in data.items()):
        raise UserError(f"--map: {p} must be a JSON object {{their name: canonical tap}}")
    bad = [v for v in data.values() if not is_known_tap(v)]
    if bad:
        raise UserError(f"--map: {bad[0]!r} is not a canonical tap name (e.g. layers.0.attn.q, logits)")
    return data


# ---------------------------------------------------------------------------
# llama.cpp eval-callback logs

_HEADER = re.compile(r"^\s*(?:[\w:]+:\s+)?(?P<name>\S.*?) = \((?P<type>\w+)\)\s+(?P<op>\S+)\((?P<args>.*)\) = "
                     r"\{(?P<shape>[\d,\s]+)\}\s*$")
_SUM = re.compile(r"^\s*sum\s*=\s*(?P<v>\S+)\s*$")
_PRINT_EDGE = 3  # llama.cpp prints the first and last 3 entries along each dimension


def _printed_indices(ne: int) -> list[int]:
    return list(range(ne)) if ne <= 2 * _PRINT_EDGE else [0, 1, 2, ne - 3, ne - 2, ne - 1]


def _parse_float(tok: str) -> float:
    t = tok.strip().lower().lstrip("+")
    if t in ("nan", "-nan"):
        return float("nan")
    return float(t)


@dataclass
class LogTensor:
    name: str
    type: str
    op: str
    ne: list[int]
    values: np.ndarray  # numpy order (reversed ne), NaN where not printed
    known: np.ndarray
    sum: float | None


def parse_llamacpp_tensors(text: str) -> list[LogTensor]:
    """Every tensor block of a llama-eval-callback log, in order."""
    out: list[LogTensor] = []
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        m = _HEADER.match(lines[i])
        i += 1
        if not m:
            continue
        ne = [int(s) for s in m.group("shape").replace(" ", "").split(",") if s]
        ne = (ne + [1, 1, 1, 1])[:4]
        rows, total = [], None
        while i < len(lines) and not _HEADER.match(lines[i]):
            s = lines[i].strip()
            i += 1
            sm = _SUM.match(s)
            if sm:
                total = _parse_float(sm.group("v"))
                break
            if s.startswith("[") and len(s) > 1:  # one printed row of ne[0] values
                body = s.strip("[], ")
                toks = [t for t in body.split(",") if t.strip() and t.strip() != "..."]
                try:
                    rows.append([_parse_float(t) for t in toks])
                except ValueError:
                    raise UserError(f"llama.cpp log: bad number in the values of {m.group('name')}: {s[:80]!r}") from None
        out.append(_assemble(m.group("name").strip(), m.group("type"), m.group("op"), ne, rows, total))
    return out


def _assemble(name, type_, op, ne, rows, total) -> LogTensor:
    shape = (ne[3], ne[2], ne[1], ne[0])
    values = np.full(shape, np.nan)
    known = np.zeros(shape, bool)
    i0s = _printed_indices(ne[0])
    slots = [(i3, i2, i1) for i3 in range(ne[3]) for i2 in _printed_indices(ne[2]) for i1 in _printed_indices(ne[1])]
    if rows and (len(rows) != len(slots) or any(len(r) != len(i0s) for r in rows)):
        raise UserError(f"llama.cpp log: tensor {name} with shape {{{', '.join(map(str, ne))}}} should print "
                        f"{len(slots)} rows of {len(i0s)} values, found {len(rows)} rows: truncated or edited log?")
    for (i3, i2, i1), row in zip(slots, rows):
        values[i3, i2, i1, i0s] = row
        known[i3, i2, i1, i0s] = True
    # numpy order without ggml's trailing 1-sized dims
    ndim = max(1, max(d + 1 for d in range(4) if ne[d] > 1) if any(n > 1 for n in ne) else 1)
    keep = shape[4 - ndim:]
    return LogTensor(name, type_, op, ne, values.reshape(keep), known.reshape(keep), total)


def parse_llamacpp_log(text: str, name: str = "llama.cpp log", name_map: dict | None = None,
                       layout: str = "gguf") -> Side:
    tensors = parse_llamacpp_tensors(text)
    if not tensors:
        raise UserError(f"{name}: no 'ggml_debug: NAME = (type) OP(...) = {{shape}}' blocks found")
    counts: dict[str, int] = {}
    for t in tensors:
        counts[t.name] = counts.get(t.name, 0) + 1
    seen: dict[str, int] = {}
    side = Side(name=name, kind="llama.cpp-log", layout=layout,
                provenance={"computed_by": "llama.cpp (llama-eval-callback log)"})
    types = set()
    for t in tensors:
        k = seen.get(t.name, 0)
        seen[t.name] = k + 1
        tap = llamacpp_tap(t.name, t.op, k, counts[t.name], name_map)
        if tap is None:
            side.not_comparable.append({"key": f"{t.name} ({t.op})", "reason": "no canonical tap for this name"})
            continue
        types.add(t.type)
        if t.known.any():
            side.items.append(Item(tap, Selector("full"), t.values, key=f"{t.name} ({t.op}) #{k + 1}", known=t.known,
                                   resolution=LLAMACPP_PRINT_RESOLUTION, note="printed values (first/last 3 per dim)"))
        if t.sum is not None:
            side.items.append(Item(tap, Selector("sum"), np.float64(t.sum), key=f"{t.name} ({t.op}) #{k + 1} sum",
                                   source_shape=t.values.shape))
    side.dtype = {"f32": "float32", "f16": "float16", "bf16": "bfloat16"}.get(types.pop()) if len(types) == 1 else "float32"
    return side


# ---------------------------------------------------------------------------
# Layouts


def expected_shape(tap: str, cfg: dict, n_tokens: int) -> tuple[int, ...]:
    """The canonical shape of a tap for a prefill of n_tokens (S = T)."""
    if tap in SHORTCUT_TAPS:
        return (n_tokens, cfg["hidden_size"] if tap == SHORTCUT_NORM else cfg["vocab_size"])
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    dims = {"T": n_tokens, "S": n_tokens, "hidden": cfg["hidden_size"], "H": cfg["num_attention_heads"],
            "KV": cfg["num_key_value_heads"], "D": head_dim, "I": cfg["intermediate_size"], "V": cfg["vocab_size"]}
    spec = stage_of(tap).shape.strip("[]").replace(" ", "").split(",")
    return tuple(dims["H"] * dims["D"] if s == "H*D" else dims[s] for s in spec)


def unpermute_gguf(x: np.ndarray) -> np.ndarray:
    """GGUF stores Q/K rows of each head as interleaved pairs (gguf[2i+h] = hf[h*D/2+i]); undo on the last axis."""
    D = x.shape[-1]
    return x.reshape(*x.shape[:-1], D // 2, 2).swapaxes(-1, -2).reshape(x.shape)


QK_TAPS = ("attn.q", "attn.k", "attn.q_rope", "attn.k_rope")


def to_canonical(tap: str, x: np.ndarray, known: np.ndarray | None, cfg: dict, n_tokens: int,
                 layout: str = "hf"):
    """Bring another engine's tensor to the canonical layout of `tap`.

    Returns (x, known, token_rows, notes); token_rows is None (all T rows) or the token
    positions x holds (llama.cpp keeps only the last token's rows in the last layer).
    Raises ValueError with a plain message when no known layout fits.
    """
    want = expected_shape(tap, cfg, n_tokens)
    notes = []
    arrays = [x] if known is None else [x, known]

    def apply(fn):
        return [fn(a) for a in arrays]

    while arrays[0].shape and arrays[0].shape[0] == 1 and (
            arrays[0].ndim > len(want) or (arrays[0].ndim == 3 and want[0] != 1)):  # batch dimension
        arrays = apply(lambda a: a[0])
    # ggml drops a 1-token dimension (its outermost): [hidden] for [T, hidden], [H, D] or [H*D] for [H, T, D]
    one = arrays[0].shape
    if (len(want) == 2 and one == want[1:]) or (len(want) == 3 and one in ((want[0], want[2]), (want[0] * want[2],))):
        arrays = apply(lambda a: a[None])
    shape = arrays[0].shape
    stage = split_name(tap)[1] if tap.startswith("layers.") else tap
    tok_axis = token_axis_of(tap)
    if len(want) == 3 and stage != "attn.context":
        H, T, D = want
        if shape == (shape[0], H * D) and len(shape) == 2:
            arrays = apply(lambda a: a.reshape(a.shape[0], H, D).transpose(1, 0, 2))
            notes.append("split [T, heads*D] into heads")
        elif len(shape) == 3 and shape[1:] == (H, D) and shape != want:
            arrays = apply(lambda a: a.transpose(1, 0, 2))
            notes.append("[T, heads, D] (ggml order) -> [heads, T, D]")
    if stage == "attn.context" and len(shape) == 3:
        arrays = apply(lambda a: a.transpose(1, 0, 2).reshape(a.shape[1], -1))
        notes.append("merged heads [heads, T, D] -> [T, heads*D]")
    shape = arrays[0].shape
    if len(shape) == len(want) and shape != want and tuple(reversed(shape)) == want and len(shape) == 2:
        arrays = apply(lambda a: a.T)
        notes.append("transposed")
        shape = arrays[0].shape
    if len(want) == 3 and stage in ("attn.scores", "attn.scores_scaled", "attn.scores_masked", "attn.probs") \
            and len(shape) == 3 and shape[:2] == want[:2] and shape[2] > want[2]:
        arrays = apply(lambda a: a[..., : want[2]])
        notes.append(f"KV length padded to {shape[2]}: first {want[2]} key positions kept")
        shape = arrays[0].shape
    token_rows = None
    if len(shape) == len(want) and shape != want:
        t_len = shape[tok_axis]
        other_ok = all(s == w for d, (s, w) in enumerate(zip(shape, want)) if d != tok_axis)
        if other_ok and t_len < want[tok_axis]:
            token_rows = list(range(want[tok_axis] - t_len, want[tok_axis]))
            notes.append(f"holds the last {t_len} token(s) only")
        else:
            raise ValueError(f"shape {list(x.shape)} does not fit {tap} {list(want)} in any known layout")
    elif shape != want:
        raise ValueError(f"shape {list(x.shape)} does not fit {tap} {list(want)} in any known layout")
    if layout == "gguf" and stage in QK_TAPS:
        arrays = apply(unpermute_gguf)
        notes.append("GGUF per-head Q/K row permutation undone")
    return arrays[0], (arrays[1] if known is not None else None), token_rows, notes
