"""Decode steps: another engine's per-step dumps, each keyed by position, against this package's
decode of the same tokens through its KV cache, and against the prefill row at that position.
Reports the first (position, stage) that diverges, replays each step (local errors, for the
stages whose inputs a step holds) and diagnoses the first divergence.

A step dump holds T token rows starting at its position (T = 1 for a decode step; a prefill
is a step at position 0). Its position comes from the file's `position` metadata (kit/ writes
it), or from a tensor name `TAP@POSITION`, which lets one file hold every step. Shapes are
canonical with S = position + T key positions: `[H, 1, S]` scores for a decode step.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import mlx.core as mx
import numpy as np

from .. import refs as R
from ..errors import UserError
from ..refs.loaders import declared_dtype
from ..stages import LAYER_STAGES, stage_of, tap_names
from ..taps import Taps
from ..tolerances import Basis, Tolerances, candidate_basis, coarsest
from ..metrics import metrics
from .diagnose import diagnose
from .kvcache import CacheBuilder, placed
from .replay import StageOps, recipe_inputs, replay
from .transforms import Case

KEY_AXIS_STAGES = tuple(s.name for s in LAYER_STAGES if s.key_axis is not None)  # [.., S]: S grows per step


@dataclass
class Step:
    position: int
    tensors: dict[str, np.ndarray] = field(default_factory=dict)
    sources: set[str] = field(default_factory=set)

    @property
    def n_tokens(self) -> int:
        tap, x = next(iter(self.tensors.items()))
        return int(x.shape[stage_of(tap).token_axis])


@dataclass
class StepDumps:
    steps: list[Step]
    ids: list[int] | None
    dtype: str | None  # declared in their metadata (kit/ writes it); None when not
    not_comparable: list[dict] = field(default_factory=list)
    tensor_dtypes: dict[str, str] = field(default_factory=dict)  # tap -> stored dtype (the coarsest over steps)

    def basis(self, forced: str | None = None, n_layers: int = 0) -> Basis:
        """The dtype each tap is judged at, and why: the rule of compare (tolerances.Basis)."""
        return candidate_basis(tap_names(n_layers), self.tensor_dtypes, self.dtype, forced, "the step dumps")


def _files(paths: list[str]) -> list[Path]:
    out: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            found = sorted(f for f in p.iterdir() if f.suffix.lower() in (".safetensors", ".npz"))
            if not found:
                raise UserError(f"{p}: no .safetensors or .npz step dumps in this directory")
            out += found
        elif p.is_file():
            out.append(p)
        else:
            raise UserError(f"{p}: no such file or directory")
    return out


def load_steps(paths: list[str], name_map: dict | None = None) -> StepDumps:
    """Read step dumps (files, or directories of them) and group their tensors by position."""
    by_pos: dict[int, Step] = {}
    token_lists, dtypes, skipped, stored = [], set(), [], {}
    for path in _files(paths):
        meta = R.safetensors_metadata(path)
        storage: dict[str, str] = {}
        tensors = R.read_tensor_file(path, storage)
        if meta.get("tokens"):
            try:
                token_lists.append([int(i) for i in json.loads(meta["tokens"])])
            except (ValueError, TypeError):
                raise UserError(f"{path}: metadata 'tokens' is not a JSON list of ids") from None
        declared = declared_dtype(meta, path)
        if declared:
            dtypes.add(declared)
        for their, x in tensors.items():
            name, at, pos_text = their.partition("@")
            pos_text = pos_text if at else meta.get("position")
            if pos_text is None or not re.fullmatch(r"\d+", str(pos_text).strip()):
                raise UserError(f"{path}: tensor {their!r} has no position: give the file a 'position' metadata "
                                "entry (kit/ writes it) or name the tensor TAP@POSITION")
            tap = R.map_name(name, name_map)
            if tap is None or tap in R.SHORTCUT_TAPS:
                skipped.append({"key": their, "reason": "no canonical tap for this name (give --map)"})
                continue
            step = by_pos.setdefault(int(pos_text), Step(int(pos_text)))
            if tap in step.tensors:
                raise UserError(f"{path}: {tap} at position {pos_text} is given twice")
            x = np.asarray(x, np.float32)
            while x.ndim > len(stage_of(tap).dims) and x.shape[0] == 1:  # a batch dimension
                x = x[0]
            step.tensors[tap] = x
            step.sources.add(path.name)
            if their in storage:
                stored[tap] = coarsest([stored.get(tap), storage[their]])
    if not by_pos:
        raise UserError("no step tensors with canonical names in " + ", ".join(paths))
    if len(dtypes) > 1:
        raise UserError(f"the step dumps disagree on their dtype: {sorted(dtypes)}")
    return StepDumps(sorted(by_pos.values(), key=lambda s: s.position), _token_ids(token_lists),
                     dtypes.pop() if dtypes else None, skipped, stored)


def _token_ids(lists: list[list[int]]) -> list[int] | None:
    """The longest recorded id list; every other must be a prefix of it."""
    if not lists:
        return None
    longest = max(lists, key=len)
    for ids in lists:
        if longest[:len(ids)] != ids:
            raise UserError(f"the step dumps record different token ids ({len(ids)} ids differ from the "
                            f"longest list of {len(longest)} at position "
                            f"{next(i for i, (a, b) in enumerate(zip(ids, longest)) if a != b)})")
    return longest


# ---------------------------------------------------------------------------
# The reference: our KV-cache decode, and one prefill's rows


def reference_steps(lm, ids: list[int], chunks: list[tuple[int, int]]) -> tuple[dict, dict]:
    """({position: taps of our KV-cache decode of that chunk}, {position: the prefill's rows})."""
    model, names = lm.model, tap_names(lm.config.num_hidden_layers)
    cache = model.make_cache()
    decode, at = {}, 0
    for pos, T in chunks:
        if pos > at:  # tokens before this chunk (the prompt, or a gap between dumped steps)
            mx.eval(model(mx.array(ids[at:pos]), cache=cache))
        taps = Taps(names, "full")
        mx.eval(model(mx.array(ids[pos:pos + T]), cache=cache, tap=taps))
        decode[pos] = {n: np.array(v.astype(mx.float32)) for n, v in taps.tensors.items()}
        at = pos + T
    taps = Taps(names, "full")
    mx.eval(model(mx.array(ids[:at]), tap=taps))
    full = {n: np.array(v.astype(mx.float32)) for n, v in taps.tensors.items()}
    rows = {}
    for pos, T in chunks:
        rows[pos] = {}
        for n, x in full.items():
            stage = stage_of(n)
            if stage.token_axis == 0:
                rows[pos][n] = x[pos:pos + T]
            else:
                y = x[:, pos:pos + T]
                rows[pos][n] = y[..., :pos + T] if any(n.endswith(s) for s in KEY_AXIS_STAGES) else y
    return decode, rows


# ---------------------------------------------------------------------------
# Comparing


def _ratio(value: float, tolerance: float) -> float:
    if math.isnan(value):
        return math.inf
    return value / tolerance if tolerance > 0 else (0.0 if value == 0 else math.inf)


def _shape_note(tap: str, theirs: tuple, ours: tuple, pos: int) -> str:
    """A shape mismatch in words; on the key axis, which way the key count is wrong."""
    if any(tap.endswith(s) for s in KEY_AXIS_STAGES) and theirs[:-1] == ours[:-1]:
        have, want = theirs[-1], ours[-1]
        head = f"{have} key positions, {want} expected at position {pos} (position + tokens)"
        if have < want:
            return (f"{head}: {'one' if want - have == 1 else want - have} too few: the KV cache does not hold every past position (it stopped "
                    "growing, has a fixed size, or the new token's key was not appended before attending)")
        off = "one" if have - want == 1 else str(have - want)
        return (f"{head}: {off} too many: attention reads past the current position (a cache length off by "
                f"{off}, the cache's capacity or padding read as keys, or the position advanced before the "
                "step); if the extra keys are padding, give only the first position + tokens")
    return f"shape {list(theirs)}, expected {list(ours)}"


def compare_step(theirs: dict, ours: dict, pos: int, tol: Tolerances, dtypes: tuple, n_layers: int,
                 window: int = 0) -> list[dict]:
    """Per tap (forward order) of one step: {tap, ok, ratio, metric, value, tolerance, note}.
    `dtypes`: (theirs, ours), for an unpinned `tol`; the mask dtype is theirs. `window`: the model's
    sliding window, whose keys alone a decode step's cache may hold (a ring of `window` slots)."""
    out = []
    for tap in tap_names(n_layers):
        if tap not in theirs or tap not in ours:
            continue
        a, b = theirs[tap], ours[tap]
        window_only = any(tap.endswith(s) for s in KEY_AXIS_STAGES) and window and a.shape[-2] == 1 and \
            a.shape[:-1] == b.shape[:-1] and window <= a.shape[-1] < b.shape[-1]
        if window_only:  # a ring of the window's keys (or more): ours masks the older ones alike
            b = b[..., -a.shape[-1]:]
        if a.shape != b.shape:
            out.append({"tap": tap, "ok": False, "ratio": math.inf, "metric": "shape", "value": math.inf,
                        "tolerance": 0.0, "note": _shape_note(tap, a.shape, b.shape, pos)})
            continue
        their_dtype = tol.basis.dtype_of(tap) if getattr(tol, "basis", None) else dtypes[0]
        m = metrics(a, b, masked=stage_of(tap).masked, mask_dtype=their_dtype)
        tolerance = tol.get(tap, "nmse", dtypes[0], dtypes[1], n_layers)
        counts_over = m["mask_mismatch"] > tol.get(tap, "mask_mismatch", dtypes[0], dtypes[1], n_layers) or \
            m["nonfinite"] > tol.get(tap, "nonfinite", dtypes[0], dtypes[1], n_layers)
        value = math.inf if counts_over else m["nmse"]
        ratio = _ratio(value, tolerance)
        note = ""
        if ratio > 1 and not np.any(a):
            note = ("their tensor is all zeros: read before the GPU finished writing it (wait for the command "
                    "buffer to complete), or never written")
        if window_only:
            note = (note + "; " if note else "") + (f"{a.shape[-1]} key positions (a cache of the sliding window "
                                                    f"of {window} or more): compared on positions "
                                                    f"{pos + 1 - a.shape[-1]}-{pos}")
        out.append({"tap": tap, "ok": ratio <= 1, "ratio": ratio, "metric": "nmse", "value": value,
                    "tolerance": tolerance, "note": note})
    return out


def compare_steps(dumps: StepDumps, lm, ids: list[int] | None, tol: Tolerances, their_dtype: str | None = None) -> dict:
    """The `compare --against-steps` result: per step against our decode and our prefill row, the
    first (position, stage) that diverges, local errors, and a diagnosis of the first divergence.
    `their_dtype` (--against-dtype) overrides the dumps' own (StepDumps.basis)."""
    if ids and dumps.ids:
        n = min(len(ids), len(dumps.ids))
        if ids[:n] != dumps.ids[:n]:
            at = next(i for i in range(n) if ids[i] != dumps.ids[i])
            raise UserError(f"--token-ids differ from the ids the step dumps record ({len(ids)} given, "
                            f"{len(dumps.ids)} recorded; first difference at position {at}: {ids[at]} given, "
                            f"{dumps.ids[at]} recorded): nothing was compared")
    ids = ids or dumps.ids
    if not ids:
        raise UserError("the step dumps record no token ids: give --token-ids with every id up to the last step")
    L = lm.config.num_hidden_layers
    chunks, at = [], 0
    for s in dumps.steps:
        if s.position < at:
            raise UserError(f"step dumps overlap: position {s.position} is inside the step before it")
        chunks.append((s.position, s.n_tokens))
        at = s.position + s.n_tokens
    if at > len(ids):
        raise UserError(f"the steps reach position {at - 1} but only {len(ids)} token ids are known")
    lm.config.check_ids(ids[:at])
    basis = dumps.basis(their_dtype, L).with_reference(lm.dtype, False)
    free, tol = tol, tol.pinned(basis)  # the verdict and the replay judge on one basis
    dtype = basis.dtype
    decode, rows = reference_steps(lm, ids, chunks)
    out_steps, first, first_row, localized = [], None, None, None
    caches = CacheBuilder(L)
    for s in dumps.steps:
        pos = s.position
        stages = compare_step(s.tensors, decode[pos], pos, tol, (dtype, lm.dtype), L, lm.config.window)
        row = compare_step(s.tensors, rows[pos], pos, tol, (dtype, lm.dtype), L, lm.config.window)
        kv = caches.add(pos, s.n_tokens, s.tensors)
        rep = replay(s.tensors, lm, ids[pos:pos + s.n_tokens], tol, dtype, pos, kv)
        for e in stages:
            e["local_ratio"] = rep.stages.get(e["tap"], {}).get("local_ratio")
        bad = next((e for e in stages if not e["ok"]), None)
        bad_row = next((e for e in row if not e["ok"]), None)
        step = {"position": pos, "n_tokens": s.n_tokens, "token_ids": ids[pos:pos + s.n_tokens],
                "sources": sorted(s.sources), "status": "diverged" if bad else "match",
                "first_divergence": bad["tap"] if bad else None, "stages": stages,
                "missing": [t for t in tap_names(L) if t not in s.tensors],
                "prefill_row": {"status": "diverged" if bad_row else "match",
                                "first_divergence": bad_row["tap"] if bad_row else None}}
        not_replayed = _not_replayed(s.tensors, rep, L)
        if not_replayed:
            step["not_replayed"] = not_replayed
        local = rep.first_local() if bad else None  # beside a step that matches there is nothing to localize
        if local:
            step["localized"] = {"stage": local, "local_ratio": rep.stages[local]["local_ratio"]}
            if "keys" in rep.stages[local]:  # which cached key each of their score columns holds
                step["localized"].update({k: rep.stages[local][k] for k in ("keys", "key_columns")})
            localized = localized or {"position": pos, **step["localized"]}
        if bad and first is None:
            first = {"position": pos, "tap": bad["tap"], "metric": bad["metric"], "ratio": bad["ratio"],
                     "note": bad["note"]}
            first["diagnosis"] = _diagnose_step(s, bad["tap"], rep, decode[pos], lm, ids, pos, free, dtype)
            first.update(_explain_step(bad, stages, s.tensors, decode[pos], lm.config.as_dict(), L))
            if local and "keys" in step["localized"]:  # which cached keys the step read explains it
                if placed(step["localized"]["key_columns"]):  # a cache slot, not a kernel: that is the hint
                    first["hint"] = (step["localized"]["keys"] + "; check the KV cache: the slot each step "
                                     "writes its K/V row to, and the slots (and how many) its attention reads")
                else:
                    first["hint"] += "; " + step["localized"]["keys"]
        if bad_row and first_row is None:
            first_row = {"position": pos, "tap": bad_row["tap"], "note": bad_row["note"]}
        out_steps.append(step)
    return {"status": "diverged" if first else "match", "tokens": ids[:at], "first_divergence": first,
            "first_prefill_row_divergence": first_row, "localized": localized, "steps": out_steps,
            "dtype": dtype, "tolerance_basis": basis.as_dict(), "reference": {"model": lm.source.spec, "dtype": lm.dtype},
            "not_compared": dumps.not_comparable, "tolerances": tol.describe(),
            "not_replayed": [{"position": s["position"], "stages": s["not_replayed"]} for s in out_steps
                             if s.get("not_replayed")]}


def _not_replayed(theirs: dict, rep, n_layers: int) -> dict[str, str]:
    """{tap: why} for the attention stages a step dumped but its replay could not recompute (a step
    or the cached K/V missing from the dumps): said, never passed over."""
    return {t: rep.stages[t]["skipped"] for t in tap_names(n_layers)
            if t in theirs and stage_of(t).op in ("qk", "pv") and "skipped" in rep.stages.get(t, {})}


def _explain_step(bad: dict, stages: list[dict], theirs: dict, ours: dict, cfg: dict, n_layers: int) -> dict:
    """The first divergence of a step told as a prefill's is: the Q/K row permutation, the shape of
    the error (heads, columns, a reordering, a factor: a step has one token row) and where to look."""
    from ..divergence import QK_STAGES, hint, qk_hint, qk_permutation
    from ..errorshape import Pattern, stage_pattern

    tap = bad["tap"]
    a, b = theirs.get(tap), ours.get(tap)
    perm = shape = None
    if a is not None and b is not None and np.shape(a) == np.shape(b) and math.isfinite(bad["tolerance"]):
        if tap.split(".", 2)[-1] in QK_STAGES:
            perm = qk_permutation(a, b, bad["tolerance"])
        if perm is None:
            found = stage_pattern(tap, a, b, bad["tolerance"], cfg)
            shape = found.as_dict() if found is not None else None
    k = next(i for i, e in enumerate(stages) if e["tap"] == tap)
    before = stages[k - 1] if k > 0 else None
    text = qk_hint(tap, perm) if perm else hint(tap, before, n_layers, {e["tap"] for e in stages[:k]})
    if shape is not None:  # the error's shape leads, as in a prefill's hint
        text = Pattern(**shape).sentence() + "; " + text
    return {"hint": text, "qk_permutation": perm, "pattern": shape}


def _diagnose_step(step: Step, tap: str, rep, ours: dict, lm, ids, pos, tol, dtype) -> list[dict]:
    """Diagnose a step's first divergence: from their inputs when replayed, else from our decode's."""
    L = lm.config.num_hidden_layers
    ops = StageOps(lm, ids[pos:pos + step.n_tokens], pos)
    if tap in rep.outputs:
        case = Case(tap, step.tensors[tap], rep.outputs[tap], rep.inputs[tap], ops, lm.config, step.tensors)
    else:
        if step.tensors[tap].shape != ours[tap].shape:
            return []
        ins = recipe_inputs(tap, L)
        inputs = [ours[i] for i in ins] if all(i in ours for i in ins) else None
        case = Case(tap, step.tensors[tap], ours[tap], inputs, ops, lm.config, step.tensors)
    return diagnose(case, lambda d: tol.get(tap, "nmse", d, "float32", L), dtype)
