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


def write_steps(engine: Engine, out_dir, prefill_too: bool = False, store_as: str = "float32",
                drop: tuple[str, ...] = ()) -> list[int]:
    """Greedy-decode N_STEPS tokens, one dump per step (position metadata, the ids so far);
    `drop`: taps the engine does not dump."""
    out_dir.mkdir(exist_ok=True)
    if drop:
        dumped = engine.dumped
        engine.dumped = lambda: {n: x for n, x in dumped().items() if n not in drop}
    taps = engine.prefill(SEED_IDS)
    if prefill_too:
        engine.dump(out_dir / "prefill.safetensors", SEED_IDS, position=0, store_as=store_as)
    ids = list(SEED_IDS)
    for k in range(N_STEPS):
        ids.append(int(np.argmax(taps["logits"][-1])))
        taps = engine.step(ids[-1])
        engine.dump(out_dir / f"step{k}.safetensors", ids, position=len(ids) - 1, store_as=store_as)
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
    # every stage of a decode step is replayed: scores and context from the cache of its own step dumps
    assert all(s["local_ratio"] is not None and s["local_ratio"] <= 1 for s in step["stages"]), step["stages"]
    assert result["not_replayed"] == [] and "not_replayed" not in step


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


# ---------------------------------------------------------------------------
# Replay of a step's attention from the engine's own cached K/V (issue 22 item 3)

def _steps_result(engine, out, lm, **kw):
    write_steps(engine, out, prefill_too=kw.pop("prefill_too", True), **kw)
    return compare_steps(load_steps([str(out)]), lm, None, Tolerances())


def _keys(result, position):
    return next(s for s in result["steps"] if s["position"] == position)["localized"]["keys"]


@pytest.mark.parametrize("fault,words", [
    # decode writes K/V one slot late: the first step's own key is missing, the next reads position 38 in column 39
    ("kv_late", {P0: "this step's own key (position 38) in the last column, which is zeros",
                 P0 + 1: "used the key of position 38 in column 39 where its own cache holds position 39"}),
    ("ring", {P0: "hold only the last 4 keys (positions 35-38): positions 0-34 were dropped",
              P0 + 2: "hold only the last 4 keys (positions 37-40)"}),
    ("extra_key", {P0: "read one key past the current position 38: column 39 is zeros",
                   P0 + 1: "read one key past the current position 39"}),
    # a cache of 39 slots: the first decode step fits, the next one's own key is never read
    ("cache_stops_growing", {P0 + 1: "hold only the first 39 keys (positions 0-38): position 39 (this step's own "
                                     "key) is never read: the cache stopped growing at 39 slots"}),
])
def test_kv_cache_faults_are_localized_with_the_keys_they_read(fault, words, tiny_dir, tmp_path, tiny_lm):
    """A cache written late, a ring of 4 slots, one key past the current position: each localized at
    the step's scores (its own arithmetic disagrees with the K/V its own earlier steps dumped), the
    words saying which keys it read; the prefill before them is clean and not localized."""
    result = _steps_result(Engine(tiny_dir, [fault]), tmp_path / fault, tiny_lm)
    at = min(words)  # the first step it shows at
    assert (result["first_divergence"]["position"], result["first_divergence"]["tap"]) == (at, "layers.0.attn.scores")
    assert result["localized"]["position"] == at and result["localized"]["stage"] == "layers.0.attn.scores"
    assert all("localized" not in s and s["status"] == "match" for s in result["steps"] if s["position"] < at)
    for pos, text in words.items():
        step = next(s for s in result["steps"] if s["position"] == pos)
        assert step["localized"]["stage"] == "layers.0.attn.scores", step["localized"]
        assert text in step["localized"]["keys"], step["localized"]["keys"]
    # the hint leads with the keys read, then where to look (the cache, not the Q·Kᵀ kernel)
    assert result["first_divergence"]["hint"].startswith(result["localized"]["keys"])
    assert "check the KV cache" in result["first_divergence"]["hint"]
    if fault == "ring":  # their probs weigh positions 35-38: context replayed from those cached values, right
        ctx = next(e for e in result["steps"][1]["stages"] if e["tap"] == "layers.0.attn.context")
        assert ctx["local_ratio"] is not None and ctx["local_ratio"] <= 1
    if fault == "extra_key":  # the value of the extra key is in no dump: context said not replayed
        assert "layers.0.attn.context" in result["not_replayed"][0]["stages"]
        why = result["not_replayed"][0]["stages"]["layers.0.attn.context"]
        assert "no cached value is known for column(s) 39" in why


def test_wrong_kv_head_is_localized_at_every_decode_step(tiny_dir, tmp_path, tiny_lm):
    """An engine that never forms K after the GQA repeat (no k_rep/v_rep dumped) and reads KV head
    h % KV: every decode step's scores are localized from its cached keys, explained by the
    kv_head_mapping diagnosis (not by the keys' placement: no column is a right key)."""
    result = _steps_result(Engine(tiny_dir, ["kv_head_mapping@1"]), tmp_path / "kvh", tiny_lm,
                           drop=("layers.1.attn.k_rep", "layers.1.attn.v_rep"))
    assert result["first_divergence"]["tap"] == "layers.1.attn.scores"
    assert [d["transform"] for d in result["first_divergence"]["diagnosis"]][:1] == ["kv_head_mapping"]
    for step in result["steps"][1:]:
        assert step["localized"]["stage"] == "layers.1.attn.scores"
        assert "no column is Q·K of a cached key through the GQA mapping" in step["localized"]["keys"]


@pytest.mark.parametrize("store_as", ["float32", "float16"])
def test_clean_steps_replayed_from_their_cache_are_not_localized(store_as, tiny_dir, tmp_path, tiny_lm):
    """Clean step dumps (stored as float32 or float16): every step's scores and context replayed
    from the cache, none over its tolerance, nothing localized, nothing left unreplayed."""
    result = _steps_result(Engine(tiny_dir), tmp_path / store_as, tiny_lm, store_as=store_as)
    assert result["status"] == "match" and result["localized"] is None and result["not_replayed"] == []
    for step in result["steps"][1:]:
        done = {e["tap"]: e["local_ratio"] for e in step["stages"]}
        assert done["layers.1.attn.scores"] <= 1 and done["layers.1.attn.context"] <= 1


def test_what_the_dumps_lack_is_said_not_replayed(tiny_dir, tmp_path, tiny_lm):
    """No prefill dump (the cache's positions 0-37 are in no file), a step missing, a step without
    its K: the attention stages that read them are listed as not replayed, in the verdict line too;
    a kv_late engine with no prefill dump still diverges (never a silent pass)."""
    from mlx_tinyllama.verdict import steps_verdict

    result = _steps_result(Engine(tiny_dir), tmp_path / "noprefill", tiny_lm, prefill_too=False)
    assert result["status"] == "match" and [s["position"] for s in result["not_replayed"]] == [P0, P0 + 1, P0 + 2]
    why = result["not_replayed"][0]["stages"]
    assert set(why) == {f"layers.{i}.attn.{s}" for i in (0, 1) for s in ("scores", "context")}
    assert all("no step dump holds positions 0-37" in w for w in why.values())
    assert "not replayed from their own cache: 12 attention stage(s) of 3 step(s)" in steps_verdict(result)["line"]

    out = tmp_path / "gap"
    write_steps(Engine(tiny_dir), out, prefill_too=True)
    (out / "step1.safetensors").unlink()  # position 39
    result = compare_steps(load_steps([str(out)]), tiny_lm, None, Tolerances())
    assert [s["position"] for s in result["not_replayed"]] == [P0 + 2]
    assert all("no step dump holds position 39" in w for w in result["not_replayed"][0]["stages"].values())

    out = tmp_path / "nok"
    write_steps(Engine(tiny_dir), out, prefill_too=True)
    from safetensors.numpy import load_file, save_file
    from mlx_tinyllama import refs as R

    path = out / "step0.safetensors"
    tensors, meta = load_file(str(path)), R.safetensors_metadata(path)
    del tensors["layers.1.attn.k_rope"]
    save_file(tensors, str(path), metadata=meta)
    result = compare_steps(load_steps([str(out)]), tiny_lm, None, Tolerances())
    assert [s["position"] for s in result["not_replayed"]] == [P0, P0 + 1, P0 + 2]
    assert result["not_replayed"][0]["stages"] == {
        "layers.1.attn.scores": "the engine's cache is not in the step dumps: layers.1.attn.k_rope is not in the "
                                "step dump of position 38"}

    faulty = _steps_result(Engine(tiny_dir, ["kv_late"]), tmp_path / "late-noprefill", tiny_lm, prefill_too=False)
    assert faulty["status"] == "diverged" and faulty["localized"] is None and faulty["not_replayed"]


@pytest.fixture(scope="module")
def mistral():
    from mlx_tinyllama.synthetic import materialize

    return materialize("mistral-tiny", 0), sources.load("synthetic:mistral-tiny", "float32")


@pytest.mark.parametrize("faults,want", [
    ([], None),  # every cached key, the older ones masked
    (["ring:8"], None),  # a ring of the window's 8 slots: the scores hold 8 keys, as the model reads them
    (["ring:10"], None),  # a ring of 10: two older keys, masked
    (["window_off_by_one"], "layers.0.attn.scores_masked"),  # 9 keys seen: the mask's own fault
    (["ring:7"], "layers.0.attn.scores"),  # 7 slots for a window of 8: the cache's fault
    (["ring:9", "window_off_by_one"], "layers.0.attn.scores_masked"),  # 9 slots, the ninth not masked
])
def test_sliding_window_steps_past_the_window(faults, want, mistral, tmp_path):
    """Another case (Mistral's sliding window of 8, decode steps at 38-40, far past it): a cache of
    every key or a ring of the window's size (or larger, masked) is not localized; a window one key
    too wide is localized at the mask, a ring one slot too small at the scores, in words."""
    model_dir, lm = mistral
    result = _steps_result(Engine(model_dir, faults), tmp_path / "-".join(faults or ["clean"]), lm)
    decode = result["steps"][1:]
    if want is None:
        assert result["status"] == "match" and result["localized"] is None and result["not_replayed"] == []
        for step in decode:
            assert all(e["local_ratio"] is not None and e["local_ratio"] <= 1 for e in step["stages"]), step["stages"]
        return
    assert result["status"] == "diverged"
    for step in decode:
        assert step["localized"]["stage"] == want, step["localized"]
    if want.endswith("scores"):
        assert "hold only the last 7 keys (positions 32-38): position 31 was dropped" in _keys(result, P0)
        assert "a ring buffer or window of 7 slots where the model's window is 8 keys" in _keys(result, P0)


def test_key_columns_and_their_words_on_made_up_caches():
    """kvcache on its own: each column of a made-up step's scores matched to the cached key it holds
    (a permutation, a zero slot, a key from nowhere), and the words of each way a read goes wrong;
    the right reads (every key, a window's keys, a larger masked ring) are consistent."""
    from mlx_tinyllama.localize.kvcache import ZEROS, explain, key_columns

    rng = np.random.default_rng(0)
    q, keys = rng.standard_normal((4, 1, 8)), rng.standard_normal((2, 6, 8))
    kv_map = np.arange(4) // 2
    full = np.einsum("htd,hsd->hts", q, keys[kv_map])
    theirs = np.concatenate([full[..., [5, 0]], np.zeros((4, 1, 1)), rng.standard_normal((4, 1, 1))], axis=-1)
    assert key_columns(theirs, q, keys, kv_map, 1e-6) == [5, 0, ZEROS, None]
    assert key_columns(full, q, keys, np.arange(4) % 2, 1e-6) == [None] * 6  # another KV head: no key

    assert explain(list(range(6)), 5, 1, 0)[0]
    assert explain([2, 3, 4, 5], 5, 1, 4)[0] and explain([1, 2, 3, 4, 5], 5, 1, 4)[0]  # a window, a larger ring
    ok, words = explain([0, 1, 2, 3, 4], 5, 1, 0)
    assert not ok and "hold only the first 5 keys (positions 0-4)" in words and "the cache stopped growing" in words
    ok, words = explain([ZEROS, 0, 1, 2, 3, 4], 5, 1, 0)
    assert not ok and "used the key of position 0 in column 1 where its own cache holds position 1" in words
    ok, words = explain([0, 1, 2, 3, 4, ZEROS], 5, 1, 0)
    assert not ok and "do not hold this step's own key (position 5)" in words
    ok, words = explain([0, 1, 2, 3, 4, 5, None], 5, 1, 0)
    assert not ok and "read one key past the current position 5: column 6 matches no cached key" in words
    ok, words = explain([0, 1, 2, 3, 4, 5, ZEROS], 5, 1, 4)  # a window's model whose cache keeps every key
    assert not ok and "read one key past the current position 5: column 6 is zeros" in words
    ok, words = explain([3, 4, 5], 5, 1, 4)
    assert not ok and "hold only the last 3 keys (positions 3-5): position 2 was dropped" in words
    ok, words = explain([1, 0, 2, 3, 4, 5], 5, 1, 0)
    assert not ok and "hold keys out of place (column 0: position 1, column 1: position 0" in words


def test_prefill_chunks_are_steps_whose_attention_reads_the_earlier_chunks(tiny_dir, tmp_path, tiny_lm):
    """Chunked prefill (positions 0-19, then 20-37, then decode steps): the second chunk's 18 query
    rows are replayed against the 38 cached keys of both chunks (causal mask included), not
    localized; with the first chunk's layer-1 V left out of its dump, the layers' attention that
    reads it is said not replayed, from the second chunk on."""
    def write(out, drop_first=()):
        out.mkdir()
        engine = Engine(tiny_dir)
        taps = engine.prefill(SEED_IDS[:20])
        engine.dump(out / "chunk0.safetensors", SEED_IDS[:20], position=0)
        if drop_first:
            from safetensors.numpy import load_file, save_file
            from mlx_tinyllama import refs as R

            path = out / "chunk0.safetensors"
            tensors, meta = load_file(str(path)), R.safetensors_metadata(path)
            save_file({n: x for n, x in tensors.items() if n not in drop_first}, str(path), metadata=meta)
        taps = engine.chunk(SEED_IDS[20:])
        engine.dump(out / "chunk1.safetensors", SEED_IDS, position=20)
        ids = list(SEED_IDS)
        for k in range(2):
            ids.append(int(np.argmax(taps["logits"][-1])))
            taps = engine.step(ids[-1])
            engine.dump(out / f"step{k}.safetensors", ids, position=len(ids) - 1)
        return compare_steps(load_steps([str(out)]), tiny_lm, None, Tolerances())

    result = write(tmp_path / "chunks")
    assert result["status"] == "match" and result["localized"] is None and result["not_replayed"] == []
    assert [(s["position"], s["n_tokens"]) for s in result["steps"]] == [(0, 20), (20, 18), (P0, 1), (P0 + 1, 1)]
    second = {e["tap"]: e["local_ratio"] for e in result["steps"][1]["stages"]}
    assert second["layers.1.attn.scores"] <= 1 and second["layers.1.attn.context"] <= 1

    result = write(tmp_path / "no-v", drop_first=("layers.1.attn.v",))
    assert [s["position"] for s in result["not_replayed"]] == [0, 20, P0, P0 + 1]
    assert result["not_replayed"][1]["stages"] == {
        "layers.1.attn.context": "the engine's cache is not in the step dumps: layers.1.attn.v is not in the step "
                                 "dump of position 0"}


def test_a_window_ring_stored_as_float16_is_not_localized(mistral, tmp_path):
    """The ring of the window's 8 slots, its taps stored as float16: each column still matched to its
    cached key (their rounding, not a wrong key) and judged at float16's tolerance: clean."""
    model_dir, _ = mistral
    lm = sources.load("synthetic:mistral-tiny", "float16")
    result = _steps_result(Engine(model_dir, ["ring:8"]), tmp_path / "ring8-f16", lm, store_as="float16")
    assert result["dtype"] == "float16"
    assert result["status"] == "match" and result["localized"] is None and result["not_replayed"] == []
    for step in result["steps"][1:]:
        assert all(e["local_ratio"] is not None and e["local_ratio"] <= 1 for e in step["stages"]), step["stages"]
