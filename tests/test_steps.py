"""Decode steps (localize/steps.py): the NumPy engine's per-step dumps, keyed by position, against
this package's KV-cache decode and prefill rows. Clean steps match; a cache that stops growing,
positions that do not advance and all-zero outputs after the first step (the seed's symptom) are
each reported at their first (position, stage), with the words or diagnosis that explain them."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import SEED_IDS
from mlx_tinyllama import sources
from mlx_tinyllama.errors import UserError
from mlx_tinyllama.localize.steps import compare_steps, load_steps
from mlx_tinyllama.stages import tap_names
from mlx_tinyllama.tolerances import Tolerances
from numpy_engine import Engine

N_STEPS = 3
P0 = len(SEED_IDS)  # the first decode step's position


@pytest.fixture(scope="module")
def tiny_lm():
    return sources.load("synthetic:tiny", "float32")


def write_steps(engine: Engine, out_dir, prefill_too: bool = False) -> list[int]:
    """Greedy-decode N_STEPS tokens, one dump per step (position metadata, the ids so far)."""
    out_dir.mkdir(exist_ok=True)
    taps = engine.prefill(SEED_IDS)
    if prefill_too:
        engine.dump(out_dir / "prefill.safetensors", SEED_IDS, position=0)
    ids = list(SEED_IDS)
    for k in range(N_STEPS):
        ids.append(int(np.argmax(taps["logits"][-1])))
        taps = engine.step(ids[-1])
        engine.dump(out_dir / f"step{k}.safetensors", ids, position=len(ids) - 1)
    return ids


def test_clean_steps_match_decode_and_prefill_rows(tiny_dir, tmp_path, tiny_lm):
    ids = write_steps(Engine(tiny_dir), tmp_path / "steps", prefill_too=True)
    result = compare_steps(load_steps([str(tmp_path / "steps")]), tiny_lm, None, Tolerances())
    assert result["status"] == "match" and result["first_divergence"] is None
    assert result["first_prefill_row_divergence"] is None and result["localized"] is None
    assert [s["position"] for s in result["steps"]] == [0, P0, P0 + 1, P0 + 2]
    assert [s["n_tokens"] for s in result["steps"]] == [P0, 1, 1, 1]
    assert result["tokens"] == ids
    step = result["steps"][-1]
    assert step["missing"] == [] and len(step["stages"]) == len(tap_names(2)) and all(s["ok"] for s in step["stages"])
    # the stages whose inputs a decode step holds were replayed: everything but scores and context
    replayed = [s["tap"] for s in step["stages"] if s["local_ratio"] is not None]
    assert "layers.1.attn.q_rope" in replayed and "layers.1.attn.scores" not in replayed


@pytest.mark.parametrize("fault,tap,words,diagnosis", [
    ("cache_stops_growing", "layers.0.attn.scores", "KV cache does not hold every past position", None),
    ("positions_stuck", "layers.0.attn.q_rope", "", "rope_offset:-1"),
    ("zeros_after_first_step", "layers.0.attn.context", "all zeros", None),
])
def test_decode_fault_is_reported_at_its_position_and_stage(fault, tap, words, diagnosis, tiny_dir, tmp_path, tiny_lm):
    write_steps(Engine(tiny_dir, [fault]), tmp_path / fault)
    result = compare_steps(load_steps([str(tmp_path / fault)]), tiny_lm, None, Tolerances())
    first = result["first_divergence"]
    assert result["status"] == "diverged"
    assert (first["position"], first["tap"]) == (P0 + 1, tap)  # the first decode step is still right
    assert result["steps"][0]["status"] == "match"
    assert words in first["note"]
    assert [d["transform"] for d in first["diagnosis"]] == ([diagnosis] if diagnosis else [])
    assert result["first_prefill_row_divergence"]["position"] == P0 + 1
    if fault == "positions_stuck":  # replayed from their own q: the RoPE itself is the local fault
        assert result["localized"] == {"position": P0 + 1, "stage": tap,
                                       "local_ratio": result["localized"]["local_ratio"]}
        assert result["localized"]["local_ratio"] > 1e3


def test_one_file_with_positions_in_tensor_names(tiny_dir, tmp_path, tiny_lm):
    """TAP@POSITION names: every step in one file, no position metadata."""
    from safetensors.numpy import save_file

    engine = Engine(tiny_dir, ["positions_stuck"])
    taps = engine.prefill(SEED_IDS)
    ids, tensors = list(SEED_IDS), {}
    for _ in range(N_STEPS):
        ids.append(int(np.argmax(taps["logits"][-1])))
        taps = engine.step(ids[-1])
        tensors.update({f"{n}@{len(ids) - 1}": x.astype(np.float32) for n, x in taps.items()})
    save_file(tensors, str(tmp_path / "all.safetensors"), metadata={"tokens": str(ids)})
    result = compare_steps(load_steps([str(tmp_path / "all.safetensors")]), tiny_lm, None, Tolerances())
    assert [s["position"] for s in result["steps"]] == [P0, P0 + 1, P0 + 2]
    assert (result["first_divergence"]["position"], result["first_divergence"]["tap"]) == (P0 + 1,
                                                                                         "layers.0.attn.q_rope")


def test_bad_step_dumps_are_user_errors(tiny_dir, tmp_path, tiny_lm):
    from safetensors.numpy import save_file

    save_file({"layers.0.out": np.zeros((1, 64), np.float32)}, str(tmp_path / "nopos.safetensors"))
    with pytest.raises(UserError, match="no position"):
        load_steps([str(tmp_path / "nopos.safetensors")])
    with pytest.raises(UserError, match="no such file"):
        load_steps([str(tmp_path / "absent")])
    save_file({"layers.0.out@40": np.zeros((1, 64), np.float32)}, str(tmp_path / "noids.safetensors"))
    with pytest.raises(UserError, match="no token ids"):
        compare_steps(load_steps([str(tmp_path / "noids.safetensors")]), tiny_lm, None, Tolerances())
    with pytest.raises(UserError, match="only 3 token ids"):
        compare_steps(load_steps([str(tmp_path / "noids.safetensors")]), tiny_lm, [1, 2, 3], Tolerances())


def test_a_step_divergence_is_explained_as_a_prefill_is(tiny_dir, tmp_path, tiny_lm):
    """The shape of the error and the Q/K check on decode steps (issue 22 item 3): a wrong GQA head
    mapping leads with the heads it breaks; Q rows written in interleaved pairs are named a Q/K
    permutation, not a wrong value; a clean step has neither (test_clean_steps_... above)."""
    from numpy_engine import _kit_module

    write_steps(Engine(tiny_dir, ["kv_head_mapping"]), tmp_path / "gqa")
    first = compare_steps(load_steps([str(tmp_path / "gqa")]), tiny_lm, None, Tolerances())["first_divergence"]
    assert first["tap"] == "layers.0.attn.k_rep" and first["pattern"]["name"] == "heads"
    assert first["hint"].startswith("heads 1-2 of 4 differ") and "GQA broadcast" in first["hint"]

    kit = _kit_module()

    class Interleaved(Engine):  # dumps its Q rows in Meta's/GGUF's pair order, computes right
        def dumped(self):
            out = super().dumped()
            out["layers.1.attn.q"] = kit.rotate_half_to_interleaved(out["layers.1.attn.q"])
            return out

    write_steps(Interleaved(tiny_dir), tmp_path / "qk")
    first = compare_steps(load_steps([str(tmp_path / "qk")]), tiny_lm, None, Tolerances())["first_divergence"]
    assert first["tap"] == "layers.1.attn.q" and first["qk_permutation"] and first["pattern"] is None
    assert "permuted within heads" in first["hint"]
