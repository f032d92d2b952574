"""Model configuration, read from a Hugging Face `config.json` (LlamaConfig fields)."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

from .errors import UserError

SUPPORTED_ROPE_TYPES = ("default", "linear")


@dataclass(frozen=True)
class ModelConfig:
    hidden_size: int = 2048
    intermediate_size: int = 5632
    num_hidden_layers: int = 22
    num_attention_heads: int = 32
    num_key_value_heads: int = 4
    vocab_size: int = 32000
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_type: str = "default"
    rope_factor: float = 1.0  # positions are divided by this ("linear" scaling)
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    head_dim: int = 0  # 0: hidden_size // num_attention_heads
    bos_token_id: int = 1
    eos_token_id: int = 2
    model_type: str = "llama"

    def __post_init__(self):
        self._check_sizes()
        if not self.head_dim:
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_attention_heads)
        if self.num_attention_heads % self.num_key_value_heads:
            raise UserError(
                f"num_attention_heads ({self.num_attention_heads}) is not a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )

    def _check_sizes(self) -> None:
        """Zero or negative sizes would crash later (division, reshape) far from their cause."""
        sizes = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                 "num_key_value_heads", "vocab_size", "max_position_embeddings")
        for name in sizes:
            if getattr(self, name) < 1:
                raise UserError(f"{name} is {getattr(self, name)}; it must be a positive integer")
        if self.head_dim < 0:
            raise UserError(f"head_dim is {self.head_dim}; it must be a positive integer")
        for name in ("rms_norm_eps", "rope_theta", "rope_factor"):
            if not getattr(self, name) > 0:
                raise UserError(f"{name} is {getattr(self, name)}; it must be positive")

    @property
    def n_rep(self) -> int:
        """How many query heads share one key/value head (GQA group size)."""
        return self.num_attention_heads // self.num_key_value_heads

    @property
    def attn_scale(self) -> float:
        return 1.0 / math.sqrt(self.head_dim)

    def weight_shapes(self) -> dict[str, tuple[int, ...]]:
        """Every parameter of a Llama checkpoint: HF names, HF shapes ([out, in] for linears)."""
        h, i, d = self.hidden_size, self.intermediate_size, self.head_dim
        q, kv = self.num_attention_heads * d, self.num_key_value_heads * d
        shapes = {"model.embed_tokens.weight": (self.vocab_size, h)}
        for n in range(self.num_hidden_layers):
            p = f"model.layers.{n}."
            shapes.update({
                p + "input_layernorm.weight": (h,),
                p + "self_attn.q_proj.weight": (q, h),
                p + "self_attn.k_proj.weight": (kv, h),
                p + "self_attn.v_proj.weight": (kv, h),
                p + "self_attn.o_proj.weight": (h, q),
                p + "post_attention_layernorm.weight": (h,),
                p + "mlp.gate_proj.weight": (i, h),
                p + "mlp.up_proj.weight": (i, h),
                p + "mlp.down_proj.weight": (h, i),
            })
        shapes["model.norm.weight"] = (h,)
        if not self.tie_word_embeddings:
            shapes["lm_head.weight"] = (self.vocab_size, h)
        return shapes

    def check_ids(self, ids: list[int]) -> None:
        """Token ids this model can run: non-empty, inside the vocabulary, within its context."""
        if not ids:
            raise UserError("the prompt is empty: no tokens to run")
        bad = [(i, t) for i, t in enumerate(ids) if not 0 <= t < self.vocab_size]
        if bad:
            i, t = bad[0]
            raise UserError(f"token id {t} at position {i} is outside the vocabulary (0..{self.vocab_size - 1})")
        if len(ids) > self.max_position_embeddings:
            raise UserError(f"the prompt has {len(ids)} tokens, more than "
                            f"max_position_embeddings={self.max_position_embeddings}")

    def num_parameters(self) -> int:
        return sum(math.prod(shape) for shape in self.weight_shapes().values())

    def to_hf_dict(self) -> dict:
        """A config.json that transformers' LlamaConfig (4.x and 5.x) reads back to the same model."""
        d = {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "hidden_act": "silu",
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "vocab_size": self.vocab_size,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_scaling": None
            if self.rope_type == "default"
            else {"rope_type": self.rope_type, "factor": self.rope_factor},
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "attention_bias": False,
            "mlp_bias": False,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "torch_dtype": "float16",
        }
        return d

    def as_dict(self) -> dict:
        return asdict(self)


def _rope_from_hf(d: dict) -> tuple[float, str, float]:
    """rope_theta / rope_scaling (transformers 4.x) or rope_parameters (5.x)."""
    params = d.get("rope_parameters") or {}
    scaling = d.get("rope_scaling") or {}
    for key, value in (("rope_parameters", params), ("rope_scaling", scaling)):
        if not isinstance(value, dict):
            raise UserError(f"config.json's {key} is {value!r}; expected an object such as "
                            '{"rope_type": "linear", "factor": 2.0} or null')
    theta = d.get("rope_theta")
    if theta is None:  # transformers 5.x keeps it in rope_parameters (and may write rope_theta: null)
        theta = params.get("rope_theta", 10000.0)
    rope = {**params, **scaling}
    rope_type = rope.get("rope_type", rope.get("type", "default")) or "default"
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise UserError(
            f"unsupported rope scaling {rope_type!r}; this tool runs {', '.join(SUPPORTED_ROPE_TYPES)} RoPE "
            "(TinyLlama uses the default)"
        )
    try:
        factor = float(rope.get("factor", 1.0)) if rope_type == "linear" else 1.0
        theta = float(theta)
    except (TypeError, ValueError):
        raise UserError(f"config.json's rope_theta ({theta!r}) or rope factor ({rope.get('factor')!r}) "
                        "is not a number") from None
    return theta, rope_type, factor


def config_from_hf_dict(d: dict) -> ModelConfig:
    model_type = d.get("model_type")
    if model_type != "llama":
        raise UserError(
            f"model_type is {model_type!r}, not 'llama': this tool runs the Llama architecture "
            "(TinyLlama, Llama 2) only"
        )
    act = d.get("hidden_act", "silu")
    if act != "silu":
        raise UserError(f"hidden_act is {act!r}; the Llama MLP here is SwiGLU with 'silu'")
    if d.get("attention_bias") or d.get("mlp_bias"):
        raise UserError("attention_bias / mlp_bias are set; TinyLlama has no biases and this tool runs none")
    required = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size")
    missing = [k for k in required if k not in d]
    if missing:
        raise UserError(f"config.json lacks {', '.join(missing)}")
    theta, rope_type, factor = _rope_from_hf(d)
    eos = d.get("eos_token_id", 2)
    if isinstance(eos, list):
        if not eos:
            raise UserError("config.json's eos_token_id is an empty list")
        eos = eos[0]
    try:
        return ModelConfig(
            hidden_size=int(d["hidden_size"]),
            intermediate_size=int(d["intermediate_size"]),
            num_hidden_layers=int(d["num_hidden_layers"]),
            num_attention_heads=int(d["num_attention_heads"]),
            num_key_value_heads=int(d["num_attention_heads"] if d.get("num_key_value_heads") is None
                                    else d["num_key_value_heads"]),  # absent: no GQA, as transformers
            vocab_size=int(d["vocab_size"]),
            rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
            rope_theta=theta,
            rope_type=rope_type,
            rope_factor=factor,
            max_position_embeddings=int(d.get("max_position_embeddings", 2048)),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            head_dim=int(d.get("head_dim") or 0),
            bos_token_id=int(d.get("bos_token_id", 1) if d.get("bos_token_id") is not None else 1),
            eos_token_id=int(eos if eos is not None else 2),
        )
    except (TypeError, ValueError) as e:
        raise UserError(f"config.json has a field of the wrong type: {e}") from None


def load_config(model_dir: Path) -> ModelConfig:
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise UserError(f"{model_dir} has no config.json: it is not a Hugging Face model directory")
    try:
        d = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(d, dict):
        raise UserError(f"{path} does not hold a JSON object")
    return config_from_hf_dict(d)
