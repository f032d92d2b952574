"""Build and run tests/field/decode_engine.c (a C engine that decodes one token at a time and
dumps every step with kit/tap_dump.h) on a synthetic model's weights."""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
from pathlib import Path

import numpy as np

SOURCE = Path(__file__).resolve().parent / "decode_engine.c"
FAULTS = ("KV_LATE", "ROPE_NEXT", "EXTRA_KEY", "KV_HEAD", "PARTIAL_ROWS", "RING4")


def compiler() -> str | None:
    return os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")


def build(cc: str, out: Path, fault: str | None = None, store_f16: bool = False) -> Path:
    flags = ([f"-DFAULT_{fault}"] if fault else []) + (["-DSTORE_F16"] if store_f16 else [])
    subprocess.run([cc, "-std=c99", "-O2", "-Wall", "-Wextra", "-Werror", *flags, "-o", str(out), str(SOURCE), "-lm"],
                   check=True, timeout=120)
    return out


def write_weights(model_dir: Path, out: Path) -> Path:
    """The model's weights as float32 in the engine's order, after its 7-int + 2-float header."""
    from safetensors.numpy import load_file

    cfg = json.loads((model_dir / "config.json").read_text())
    w = {}
    for f in sorted(model_dir.glob("*.safetensors")):
        w.update(load_file(str(f)))
    heads, kv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    hd = cfg.get("head_dim") or cfg["hidden_size"] // heads
    header = struct.pack("<7i2f", cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"], heads, kv,
                         cfg["vocab_size"], hd, cfg["rms_norm_eps"], cfg.get("rope_theta", 10000.0))
    order = ["model.embed_tokens.weight"]
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        order += [p + "input_layernorm.weight", p + "self_attn.q_proj.weight", p + "self_attn.k_proj.weight",
                  p + "self_attn.v_proj.weight", p + "self_attn.o_proj.weight", p + "post_attention_layernorm.weight",
                  p + "mlp.gate_proj.weight", p + "mlp.up_proj.weight", p + "mlp.down_proj.weight"]
    lm_head = "model.embed_tokens.weight" if cfg.get("tie_word_embeddings") else "lm_head.weight"
    order += ["model.norm.weight", lm_head]
    with open(out, "wb") as fh:
        fh.write(header)
        for name in order:
            fh.write(np.ascontiguousarray(w[name], dtype="<f4").tobytes())
    return out


def run(exe: Path, weights: Path, ids: list[int], out_dir: Path) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    subprocess.run([str(exe), str(weights), str(out_dir), *map(str, ids)], check=True, timeout=120)
    return out_dir
