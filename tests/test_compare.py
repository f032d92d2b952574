"""compare: own run vs transformers references (committed and live), the seed's recipe,
fault injection, the CLI's exit codes and JSON."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from conftest import SEED_IDS, SEED_PROMPT, needs_torch
from mlx_tinyllama import refs as R
from mlx_tinyllama import sources
from mlx_tinyllama.compare import compare, compare_run, run_side
from mlx_tinyllama.faults import OPS_FAULTS, inject
from mlx_tinyllama.taps import tap_names
from mlx_tinyllama.tolerances import Tolerances
from mlx_tinyllama.trace import main as cli

REPO = Path(__file__).resolve().parents[1]
REF = {"float32": REPO / "refs" / "synthetic-tiny-fp32.json", "float16": REPO / "refs" / "synthetic-tiny-fp16.json"}


def _tiny(dtype="float32", kernels=None):
    return sources.load("synthetic:tiny", dtype, "hf", kernels)


def test_committed_refs_are_for_todays_synthetic_weights(tiny_dir):
    from mlx_tinyllama.reference.hf import weights_digest

    for path in REF.values():
        manifest = json.loads(path.read_text())
        assert manifest["model"]["weights_sha256"] == weights_digest(tiny_dir), f"remake {path.name}"
        assert manifest["prompt"]["ids"] == SEED_IDS


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_own_run_matches_committed_reference_at_every_stage(dtype):
    result = compare_run(_tiny(dtype), SEED_IDS, str(REF[dtype]), Tolerances())
    assert result["status"] == "match", result["first_divergence"]
    assert result["first_divergence"] is None
    assert [s["tap"] for s in result["stages"]] == tap_names(2)  # every stage compared, in forward order
    assert all(e["ok"] for e in result["entries"])


@needs_torch
@pytest.mark.parametrize("preset,dtype", [("small", "float32"), ("tiny", "float16")])
def test_own_run_matches_live_transformers_reference(tmp_path, preset, dtype):
    from mlx_tinyllama.reference.hf import write_reference
    from mlx_tinyllama.synthetic import materialize

    manifest = write_reference(tmp_path / "ref", materialize(preset, 0), SEED_IDS, dtype, prompt_text=SEED_PROMPT)
    lm = sources.load(f"synthetic:{preset}", dtype)
    result = compare_run(lm, SEED_IDS, str(manifest), Tolerances())
    assert result["status"] == "match", result["first_divergence"]
    assert len(result["stages"]) == len(tap_names(lm.config.num_hidden_layers))


@pytest.mark.parametrize("fault", sorted(OPS_FAULTS))
def test_fault_is_reported_at_its_stage(fault):
    lm = _tiny("float32", "explicit")
    expected = inject(lm.model, fault)
    result = compare_run(lm, SEED_IDS, str(REF["float32"]), Tolerances())
    assert result["status"] == "diverged"
    assert result["first_divergence"]["tap"] == expected
    d = result["first_divergence"]
    assert d["before"]["ok"] and "inputs to this stage match" in d["hint"]
    assert d["error"]["ratio"] > 10  # far outside tolerance, not a borderline call


def test_tolerance_override_turns_a_match_into_a_divergence():
    result = compare_run(_tiny("float16"), SEED_IDS, str(REF["float32"]), Tolerances.from_overrides(["nmse=1e-12"]))
    assert result["status"] == "diverged" and result["first_divergence"]["tap"] == "layers.0.attn_norm"


# --- the seed's own recipe on a synthetic model ------------------------------------------


def seed_recipe_json(model_dir, ids) -> dict:
    """transformers_reference_values.json the way the seed made it: fp16, hooks, hidden_states[-1]."""
    import torch
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(str(model_dir), dtype=torch.float16).eval()
    got = {}

    def hook(name):
        def fn(module, args, output):
            got[name] = (output[0] if isinstance(output, tuple) else output).float()
        return fn

    m = model.model
    handles = [m.embed_tokens.register_forward_hook(hook("embedding")),
               m.layers[0].self_attn.register_forward_hook(hook("attn")),
               m.layers[0].mlp.register_forward_hook(hook("mlp")), m.layers[0].register_forward_hook(hook("layer"))]
    with torch.no_grad():
        out = model(torch.tensor([ids]), output_hidden_states=True)
    for h in handles:
        h.remove()
    logits = out.logits[0, -1].float()
    vals, idx = torch.topk(logits, 10)
    sample = lambda t: t[0, 0, 0:3].tolist()  # noqa: E731
    return {"prompt": SEED_PROMPT, "tokens": list(ids), "num_tokens": len(ids), "intermediate_values": {
        "embedding": {"sample_0_0_3": sample(got["embedding"]), "shape": list(got["embedding"].shape[1:])},
        "layer_0": {"attn_output": {"sample_0_0_3": sample(got["attn"])}, "mlp_output": {"sample_0_0_3": sample(got["mlp"])},
                    "layer_output": {"sample_0_0_3": sample(got["layer"])}},
        "layer_21_output": {"sample_last_0_3": out.hidden_states[-1][0, -1, 0:3].float().tolist()},
        "logits": {"sample_0_3": logits[0:3].tolist(),
                   "top_10": [{"rank": r + 1, "token_id": int(i), "logit": float(v)}
                              for r, (v, i) in enumerate(zip(vals.tolist(), idx.tolist()))]}}}


@needs_torch
def test_seed_recipe_reference_passes_and_a_perturbed_value_names_its_stage(tmp_path):
    from mlx_tinyllama.synthetic import materialize

    data = seed_recipe_json(materialize("small", 0), SEED_IDS)
    lm = sources.load("synthetic:small", "float16")
    candidate = run_side(lm, SEED_IDS)
    cfg = lm.config.as_dict()
    path = tmp_path / "transformers_reference_values.json"
    path.write_text(json.dumps(data))
    result = compare(candidate, R.load(path), Tolerances(), cfg, len(SEED_IDS))
    assert result["status"] == "match", result["first_divergence"]
    assert {e["tap"] for e in result["entries"]} == {"embed", "layers.0.attn.out", "layers.0.mlp.down",
                                                     "layers.0.out", "final_norm", "logits"}
    cases = [(("embedding", "sample_0_0_3"), "embed"), (("layer_0", "mlp_output", "sample_0_0_3"), "layers.0.mlp.down"),
             (("layer_21_output", "sample_last_0_3"), "final_norm"), (("logits", "sample_0_3"), "logits")]
    for keys, tap in cases:
        bad = json.loads(json.dumps(data))
        node = bad["intermediate_values"]
        for k in keys[:-1]:
            node = node[k]
        values = node[keys[-1]]
        values[1] += 0.5 * (abs(values[1]) + max(abs(v) for v in values))  # a clearly wrong number
        path.write_text(json.dumps(bad))
        result = compare(candidate, R.load(path), Tolerances(), cfg, len(SEED_IDS))
        assert result["first_divergence"]["tap"] == tap, keys


# --- CLI -------------------------------------------------------------------------------


def test_cli_json_and_exit_codes(tmp_path, capsys):
    out = tmp_path / "c.json"
    assert cli(["compare", "--ref", str(REF["float32"]), "--dtype", "float32", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["status"] == "match" and result["first_divergence"] is None
    assert {"tap", "metric", "value", "tolerance", "ok"} <= set(result["entries"][0])
    rc = cli(["compare", "--ref", str(REF["float32"]), "--json", str(out), "--tol", "layers.1.attn.probs:nmse=0"])
    result = json.loads(out.read_text())
    assert rc == 1 and result["status"] == "diverged" and result["first_divergence"]["tap"] == "layers.1.attn.probs"
    out.unlink()
    rc = cli(["run", "--model", "synthetic:tiny", "--compare", str(REF["float16"]), "--json", str(out)])
    assert rc == 0 and json.loads(out.read_text())["status"] == "match"


@pytest.mark.parametrize("argv,message", [
    (["--token-ids", "1,2,3"], "different token ids"),
    (["--bos"], "extra BOS"),
    (["--model", "synthetic:small"], "different model shape"),
    (["--model", "synthetic:tiny:seed=1"], "computed on other weights"),
    (["--tol", "nmse"], "expected [TAP_GLOB:]METRIC=VALUE"),
    (["--tol", "foo=1"], "unknown metric"),
])
def test_cli_refuses_mismatched_or_bad_input(capsys, argv, message):
    assert cli(["compare", "--ref", str(REF["float32"]), *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and "Traceback" not in err


def test_cli_refuses_malformed_files(tmp_path, capsys):
    bad_json = tmp_path / "bad.json"
    bad_json.write_text("{not json")
    unknown = tmp_path / "unknown.json"
    unknown.write_text('{"a": 1}')
    manifest = tmp_path / "m.json"
    manifest.write_text(REF["float32"].read_text())  # its tensor file is not beside it
    trunc = tmp_path / "t.safetensors"
    trunc.write_bytes(REF["float32"].with_suffix(".safetensors").read_bytes()[:1000])
    for path, message in ((bad_json, "not valid JSON"), (unknown, "unrecognised JSON"), (manifest, "is missing"),
                          (tmp_path / "nope.json", "does not exist")):
        assert cli(["compare", "--ref", str(path)]) == 2
        assert message in capsys.readouterr().err
    assert cli(["compare", "--against", str(trunc), "--model", "synthetic:tiny"]) == 2
    assert "cannot read" in capsys.readouterr().err
    assert cli(["compare"]) == 2
