"""Reading a reference or another engine's numbers from a file into `Side`s: the
project's manifests, the seed's files and bundle, stats JSON, safetensors/npz tensors,
llama.cpp logs, and the user's name map."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np

from ..dtypes import STORAGE_DTYPES, canonical
from ..errors import UserError, read_bytes
from ..outputs import number
from .side import Item, Selector, Side, is_known_tap
from .seed import SEED_FORMAT, topk_value, seed_entries, seed_format_of, side_from_entries
from .llamacpp import map_name, parse_llamacpp_log
from .npz_bounds import check_npz
from .fused import Fused, declared_fused, parse_entry


MANIFEST_FORMAT = "mlx_tinyllama.reference/1"  # the manifest that reference/hf.py writes


# ---------------------------------------------------------------------------
# Loading


def load(path: str | Path, name_map: dict | None = None, layout: str | None = None) -> list[Side]:
    """Read any supported file into one or more Sides (a seed bundle holds several)."""
    path = Path(path)
    from ..dump import INDEX_SUFFIX, check_single, index_path

    if not path.exists() and index_path(path).is_file():  # a sharded dump named by its first form
        path = index_path(path)
    if not path.exists():
        raise UserError(f"{path} does not exist")
    if path.name.endswith(INDEX_SUFFIX):
        return [_load_sharded(path, name_map, layout)]
    if path.is_dir():
        raise UserError(f"{path} is a directory: give a reference .json, a .safetensors/.npz dump or a log file")
    if not path.is_file():  # /dev/zero, a FIFO, a socket: endless or blocking reads
        raise UserError(f"{path} is not a regular file (a device, pipe or socket): give a file")
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        check_single(path)
    if suffix not in (".safetensors", ".npz"):
        refuse_fused(name_map, path)
    if suffix == ".json":
        return _load_json(path, name_map)
    if suffix in (".safetensors", ".npz"):
        return [_load_tensors(path, name_map, layout)]
    if path.stat().st_size > MAX_LOG_BYTES:
        raise UserError(f"{path} is {path.stat().st_size} bytes; a log is read up to {MAX_LOG_BYTES} "
                        "(TinyLlama's llama-eval-callback log of a 39-token prompt is 1.3 MB)")
    text = _read_text(path)
    if "ggml_debug" in text or "common_debug_cb_eval" in text or re.search(r"= \(\w+\)\s+\S+\(", text):
        return [parse_llamacpp_log(text, path.name, name_map, layout)]
    raise UserError(f"{path}: not a recognised reference or dump (expected .json, .safetensors, .npz, "
                    "or a llama.cpp eval-callback log with 'ggml_debug: NAME = (type) OP(...) = {shape}' lines)")


def refuse_fused(name_map: dict | None, where) -> None:
    """A map entry naming several taps splits a full tensor of a .safetensors/.npz dump; a log or a
    stats JSON holds no such tensor, and the decode steps' reader does not split (not built)."""
    fused = next((k for k, v in (name_map or {}).items() if isinstance(v, Fused)), None)
    if fused:
        raise UserError(f"--map: {fused!r} names several taps (a fused tensor): only a .safetensors/.npz dump "
                        f"given to --against is split, not {where}")


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8", errors="replace")
    except OSError as e:
        raise UserError(f"cannot read {path}: {e.strerror or e}") from None


MAX_JSON_BYTES = 256 << 20  # a stats JSON with full `values` of every tap of a long prompt stays below
MAX_LOG_BYTES = 128 << 20  # ~100x TinyLlama's llama-eval-callback log of a 39-token prompt (1.3 MB)


def _load_json(path: Path, name_map: dict | None) -> list[Side]:
    if path.stat().st_size > MAX_JSON_BYTES:
        raise UserError(f"{path} is {path.stat().st_size} bytes; reference JSON is read up to {MAX_JSON_BYTES}")
    try:
        data = json.loads(_read_text(path))
    except (json.JSONDecodeError, RecursionError) as e:
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
    name = data.get("tensors")
    if not isinstance(name, str) or name in ("", ".", "..") or "/" in name or "\\" in name or ":" in name:
        raise UserError(f"{path}: \"tensors\" must name a file beside the manifest, not {json.dumps(name)[:60]}")
    tensor_file = path.parent / name
    if not tensor_file.is_file():
        raise UserError(f"{path}: its tensor file {tensor_file.name} is missing beside it")
    tensors = read_tensor_file(tensor_file)
    try:
        prompt, model = data["prompt"], data["model"]
        ids = _ids(prompt["ids"], path, "prompt.ids")
        declared = list(data["taps"])
        dtype = data["provenance"]["dtype"]
        rows = data.get("token_rows") or {}  # taps stored for some token positions only (kept small)
        if not isinstance(rows, dict) or not all(isinstance(r, list) for r in rows.values()):
            raise TypeError("token_rows is not an object of lists")
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise UserError(f"{path}: malformed reference manifest ({type(e).__name__}: {e})") from None
    missing = [n for n in declared if n not in tensors]
    if missing:
        raise UserError(f"{path}: {tensor_file.name} lacks {len(missing)} declared tap(s), e.g. {missing[0]}")
    side = Side(name=path.name, kind="full-tensors", dtype=dtype, ids=ids, n_tokens=len(ids),
                config=model.get("config"), provenance=dict(data.get("provenance", {}), model=model.get("spec"),
                                                            weights_sha256=model.get("weights_sha256")))
    for name in declared:
        x = tensors[name]
        if name in rows:
            n = len(ids)
            bad = [t for t in rows[name] if isinstance(t, bool) or not isinstance(t, int) or not -n <= t < n]
            if bad or len(rows[name]) != x.shape[0]:
                raise UserError(f"{path}: token_rows.{name} must list {x.shape[0]} positions in {-n}..{n - 1} "
                                f"(one per stored row); it holds {json.dumps(rows[name])[:60]}")
            for j, t in enumerate(rows[name]):
                side.items.append(Item(name, Selector("row", row=int(t)), x[j], key=f"{name}[{t}]",
                                       note="stored for this token position only"))
        else:
            side.tensors[name] = x
    if data.get("top_k"):
        side.items.append(Item("logits", Selector("topk", row=-1, k=len(data["top_k"])), topk_value(data["top_k"]),
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
    """The `run --json` shape (or any engine writing it): per-tap {first, last, sum, ...} and top_k.
    The token ids are `prompt.ids` (schema 1, docs/json.md), or `tokens` in files written before it."""
    prompt = data.get("prompt") if isinstance(data.get("prompt"), dict) else {}
    ids = prompt.get("ids") if isinstance(prompt.get("ids"), list) else data.get("tokens")
    side = Side(name=path.name, kind="stats-json", dtype=declared_dtype(data, path),
                ids=_ids(ids, path, "prompt.ids") if isinstance(ids, list) else None,
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
            side.tensors[tap] = _array(stats["values"], path, f"taps.{their}.values")
        for field_name, sel in (("first", Selector("row", 0, (0, 3))), ("last", Selector("row", -1, (0, 3))),
                                ("sum", Selector("sum"))):
            if field_name in stats:
                value = _array(stats[field_name], path, f"taps.{their}.{field_name}", flat=field_name != "sum")
                if sel.kind == "row":
                    sel = Selector("row", sel.row, (0, value.size))
                side.items.append(Item(tap, sel, value, key=f"taps.{their}.{field_name}"))
    if isinstance(data.get("top_k"), list) and data["top_k"]:
        side.items.append(Item("logits", Selector("topk", row=-1, k=len(data["top_k"])),
                               topk_value(data["top_k"]), key="top_k"))
    return side


_NONFINITE = {"nan", "inf", "-inf", "+inf", "infinity", "-infinity"}


def _array(v, path: Path, key: str, flat: bool = False) -> np.ndarray:
    """Numbers as a stats JSON holds them (outputs.json_safe writes NaN/Inf as the strings "nan",
    "inf", "-inf"), checked: any other string, an object, null or a ragged list is refused, not
    turned into NaN or a traceback."""
    def leaf(x):
        if isinstance(x, bool) or x is None or isinstance(x, (dict, list)) or \
                (isinstance(x, str) and x.strip().lower() not in _NONFINITE):
            raise UserError(f"{path}: {key} holds {json.dumps(x)[:40]}; expected numbers (or \"nan\", \"inf\")")
        return number(x)

    def walk(x, depth):
        if isinstance(x, list):
            if flat and depth:
                raise UserError(f"{path}: {key} is a nested list; expected a flat list of numbers")
            return [walk(e, depth + 1) for e in x]
        return leaf(x)

    if not flat and not isinstance(v, list):
        return np.float64(leaf(v))
    if flat and not isinstance(v, list):
        raise UserError(f"{path}: {key} is {json.dumps(v)[:40]}; expected a list of numbers")
    try:
        return np.asarray(walk(v, 0), np.float64)
    except ValueError:  # numpy refuses a ragged nesting
        raise UserError(f"{path}: {key} is a ragged list (rows of different lengths)") from None


def _ids(v, path: Path, key: str) -> list[int]:
    bad = [x for x in v if isinstance(x, bool) or not isinstance(x, int) or x < 0]
    if bad:
        raise UserError(f"{path}: {key} holds {json.dumps(bad[0])[:40]}; expected token ids (integers >= 0)")
    return list(v)


def read_tensor_file(path: Path, storage: dict | None = None) -> dict[str, np.ndarray]:
    """safetensors (any float dtype, bf16 included) or npz -> float32 numpy arrays; `storage`, when
    given, receives each tensor's stored dtype ({name: "float16", ...}: the tolerances follow it)."""
    _check_tensor_file(path)
    try:
        if path.suffix.lower() == ".npz":
            with np.load(path) as z:
                arrays = {k: np.asarray(z[k]) for k in z.files}
            if storage is not None:
                storage.update({k: str(v.dtype) for k, v in arrays.items() if v.dtype.kind == "f"})
            return arrays
        import mlx.core as mx

        if storage is not None:
            storage.update(_safetensors_dtypes(path))
        return {k: np.array(v.astype(mx.float32)) if v.dtype != mx.float32 else np.array(v)
                for k, v in mx.load(str(path), format="safetensors").items()}
    except Exception as e:  # truncated or foreign files raise several types
        raise UserError(f"cannot read {path}: {type(e).__name__}: {e} (truncated or not a tensor file?)") from None


def _check_tensor_file(path: Path) -> None:
    """Before reading: a regular file (a FIFO would block, a device never end) whose npz arrays fit
    in the bytes it holds (safetensors offsets are checked by MLX against the file's size)."""
    if not Path(path).is_file():
        raise UserError(f"{path} is not a regular file (missing, a directory, a device or a pipe): give a tensor file")
    if Path(path).suffix.lower() == ".npz":
        check_npz(Path(path))


def _header(path: Path) -> dict:
    """A safetensors file's header, or {} when it is broken: the tensor reader reports that with a
    clear message of its own (sources.safetensors_header is the one reader)."""
    from ..sources import safetensors_header  # lazy: sources imports MLX and the model

    try:
        return safetensors_header(path)
    except UserError:
        return {}


def _safetensors_dtypes(path: Path) -> dict[str, str]:
    """{tensor name: stored dtype} from a safetensors header (floating tensors only)."""
    header = _header(path)
    return {k: STORAGE_DTYPES[v["dtype"]] for k, v in header.items()
            if k != "__metadata__" and isinstance(v, dict) and v.get("dtype") in STORAGE_DTYPES}


def declared_dtype(meta: dict, path: Path) -> str | None:
    """The precision a dump's metadata declares (kit/ writes `dtype`), checked: an unknown name is
    bad input, not a silent float32."""
    value = meta.get("dtype")
    if value in (None, ""):
        return None
    name = canonical(str(value).strip().lower())
    if name not in STORAGE_DTYPES.values():
        raise UserError(f"{path}: its metadata declares dtype {str(value)[:40]!r}, not one of float16, bfloat16, "
                        "float32, float64 (give --against-dtype)")
    return name


def refuse_decode_step(side: Side) -> None:
    """A decode-step dump (kit's `position` > 0, or TAP@POSITION names) is not a prefill: its rows
    start past position 0 and its scores hold more keys than rows. Say which option reads it
    (compare --against calls this; other readers, the kit's tests among them, read any dump)."""
    if side.kind != "dump":
        return
    position = str((side.provenance.get("metadata") or {}).get("position", "0")).strip()
    stepped = next((n["key"] for n in side.not_comparable if "@" in str(n.get("key", ""))), None)
    if (position.isdigit() and int(position) > 0) or stepped:
        where = f"position {position} in its metadata" if not stepped else f"tensor names like {stepped!r}"
        raise UserError(f"{side.name} is a decode step ({where}): use --against-steps, which compares it with "
                        "this package's KV-cache decode")


def safetensors_metadata(path: Path) -> dict:
    """The `__metadata__` of a safetensors file ({} for other files or a broken header)."""
    if path.suffix.lower() != ".safetensors":
        return {}
    meta = _header(path).get("__metadata__")
    return meta if isinstance(meta, dict) else {}


def _load_tensors(path: Path, name_map: dict | None, layout: str | None) -> Side:
    storage: dict[str, str] = {}
    tensors = read_tensor_file(path, storage)
    meta = safetensors_metadata(path)
    layout = layout or declared_layout(meta, path)
    ids = None
    if "tokens" in meta:
        try:
            ids = [int(i) for i in json.loads(meta["tokens"])]
        except (ValueError, TypeError):
            ids = None
    side = Side(name=path.name, kind="dump", dtype=declared_dtype(meta, path), ids=ids,
                n_tokens=len(ids) if ids else None, layout=layout, provenance={"metadata": meta})
    source: dict = {}
    fused = declared_fused(meta, path)  # the kit's `fused` metadata; a --map entry of the name wins
    fused.update({k: v for k, v in (name_map or {}).items() if isinstance(v, Fused)})
    fused = {k: v for k, v in fused.items() if not isinstance((name_map or {}).get(k), str)}
    for their, x in tensors.items():
        if their in fused:
            for tap in fused[their].taps:
                if tap in source:
                    raise UserError(f"{path}: tensors {source[tap]!r} and {their!r} are both {tap} (by their "
                                    "names, --map or the fused metadata); keep one")
                source[tap] = their
                if their in storage:
                    side.tensor_dtypes[tap] = storage[their]
            side.fused.append((fused[their], np.asarray(x, np.float32)))
            continue
        tap = map_name(their, name_map)
        if tap is None:
            side.not_comparable.append({"key": their, "reason": "no canonical tap for this name (give --map)"})
        elif tap in source:  # e.g. a canonical name and a --map entry onto it: which one is theirs?
            raise UserError(f"{path}: tensors {source[tap]!r} and {their!r} are both {tap} (by their names or "
                            "--map); keep one, or map the other elsewhere")
        else:
            source[tap] = their
            side.tensors[tap] = np.asarray(x, np.float32)
            if their in storage:
                side.tensor_dtypes[tap] = storage[their]
    return side


def declared_layout(meta: dict, path: Path) -> str:
    """The Q/K row order a dump's metadata declares (kit's `qk_layout`), checked; "hf" when none."""
    from .layout import QK_LAYOUTS

    value = str(meta.get("qk_layout") or "hf").strip().lower()
    if value not in QK_LAYOUTS:
        raise UserError(f"{path}: its metadata declares qk_layout {value[:40]!r}, not one of {', '.join(QK_LAYOUTS)} "
                        "(or give --layout)")
    return value


def _load_sharded(path: Path, name_map: dict | None, layout: str | None) -> Side:
    """A dump streamed in shards (dump.py): its index names the shards, read as one dump."""
    from ..dump import check_generation, read_index

    shards, meta = read_index(path)
    for shard in shards:  # before any tensor is read
        check_generation(shard, safetensors_metadata(shard), path, meta)
    side = _load_tensors(shards[0], name_map, layout)
    for shard in shards[1:]:
        more = _load_tensors(shard, name_map, layout)
        side.tensors.update(more.tensors)
        side.tensor_dtypes.update(more.tensor_dtypes)
        side.fused += more.fused
        side.not_comparable += more.not_comparable
    side.name = path.name
    return side


def read_name_map(path: str | Path | None) -> dict | None:
    if path is None:
        return None
    p = Path(path)
    if p.is_dir():
        raise UserError(f"--map: {p} is a directory; give a JSON file {{their name: canonical tap}}")
    if not p.exists():
        raise UserError(f"--map: {p} does not exist")
    if not p.is_file():  # a FIFO or a device: the read would block or never end
        raise UserError(f"--map: {p} is not a regular file; give a JSON file")
    if p.stat().st_size > MAX_JSON_BYTES:
        raise UserError(f"--map: {p} is {p.stat().st_size} bytes; at most {MAX_JSON_BYTES} are read")
    try:
        data = json.loads(read_bytes(p, "--map"))
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        raise UserError(f"--map: {p} is not valid JSON: {e}") from None
    if not isinstance(data, dict) or not all(isinstance(k, str) and isinstance(v, (str, list, dict))
                                             for k, v in data.items()):
        raise UserError(f"--map: {p} must be a JSON object {{their name: canonical tap, or [taps] for a fused "
                        "tensor}}")
    data = {k: parse_entry(k, v, f"--map {p.name}") or v for k, v in data.items()}
    bad = [v for v in data.values() if isinstance(v, str) and not is_known_tap(v)]
    if bad:
        raise UserError(f"--map: {bad[0]!r} is not a canonical tap name (e.g. layers.0.attn.q, logits)")
    first: dict = {}
    for their, entry in data.items():  # one tap holds one tensor: a second would silently replace the first
        for tap in (entry.taps if isinstance(entry, Fused) else (entry,)):
            if tap in first:
                raise UserError(f"--map: {first[tap]!r} and {their!r} both map to {tap}; map one name to each tap")
            first[tap] = their
    return data
