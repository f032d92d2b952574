"""The one result header (results.ResultHeader): every command's --json starts with it,
with one spelling for the prompt's ids, and the report reads it back."""

from __future__ import annotations

import json
from pathlib import Path

from conftest import SEED_IDS
from mlx_tinyllama.results import SCHEMA, PromptRecord, ResultHeader
from mlx_tinyllama.trace import main as trace

HEADER_KEYS = ["schema", "command", "model", "dtype", "policy", "kernels", "device", "versions", "prompt"]
REF = Path(__file__).resolve().parents[1] / "refs" / "synthetic-tiny-fp32.json"
TINY = ["--model", "synthetic:tiny", "--dtype", "float32"]


def test_header_round_trips_through_a_dict():
    head = ResultHeader("run", {"spec": "x"}, "float16", "hf", "fused", "CPU (test)", {"mlx": "0"},
                        PromptRecord([1, 2], "hi", "--prompt", ["▁h", "i"]))
    d = head.as_dict()
    assert list(d) == HEADER_KEYS and d["schema"] == SCHEMA == 1
    assert d["prompt"] == {"ids": [1, 2], "text": "hi", "source": "--prompt", "pieces": ["▁h", "i"]}
    assert ResultHeader.from_dict(json.loads(json.dumps(d))) == head


def test_every_command_json_starts_with_the_header(tmp_path):
    runs = {
        "run": ["run", *TINY, "--taps", "logits"],
        "generate": ["generate", *TINY, "--max-tokens", "2"],
        "paths": ["paths", *TINY, "--chunk", "19", "--continue", "0"],
        "tokens": ["tokens", "--model", "synthetic:tiny"],
        "compare": ["compare", *TINY, "--ref", str(REF)],
    }
    for command, argv in runs.items():
        out = tmp_path / f"{command}.json"
        assert trace([*argv, "--json", str(out)]) in (0, 1), command
        result = json.loads(out.read_text())
        assert list(result)[:len(HEADER_KEYS)] == HEADER_KEYS, command
        assert result["schema"] == 1 and result["command"] == command
        assert result["prompt"]["ids"] == SEED_IDS and result["prompt"]["source"] == "seed chat prompt", command
        assert (result["model"] is None) == (command == "tokens"), command
        assert not {"tokens", "prompt_ids", "ids", "divergence", "first_divergence_detail"} & set(result), command
