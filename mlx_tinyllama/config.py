"""Model configuration, read from a Hugging Face `config.json` (LlamaConfig fields)."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

from .architectures import ARCHITECTURES, BY_MODEL_TYPE, Architecture
from .errors import UserError, read_bytes

SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")
SUPPORTED_ARCHITECTURES = tuple(ARCHITECTURES)

# (min, max) of each size; checked before anything is built from them. The maxima are far above any
# Llama (Llama 3 405B: hidden 16384, 126 layers, vocabulary 128256) but keep a corrupt value such as
# num_hidden_layers 1e9 from allocating per-layer tables.
SIZE_RANGES = {
    "hidden_size": (1, 1 << 16), "intermediate_size": (1, 1 << 18), "num_hidden_layers": (1, 1024),
    "num_attention_heads": (1, 1024), "num_key_value_heads": (1, 1024), "vocab_size": (1, 1 << 21),
    "max_position_embeddings": (1, 1 << 24), "head_dim": (0, 4096), "sliding_window": (0, 1 << 24),
    "rope_original_max_position": (1, 1 << 24),
}
MAX_CONFIG_BYTES = 1 << 20


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
    rope_factor: float = 1.0  # "linear": positions are divided by this; "llama3": low frequencies are
    rope_low_freq_factor: float = 1.0  # "llama3" only: the wavelength band (original context / factor)
    rope_high_freq_factor: float = 4.0  # between which frequencies are blended
    rope_original_max_position: int = 8192  # "llama3" only: the context the model was first trained at
    rope_freq_factors: tuple = ()  # a GGUF's rope_freqs (Llama 3 as llama.cpp stores it): inv_freq / factor
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    head_dim: int = 0  # 0: hidden_size // num_attention_heads
    bos_token_id: int = 1
    eos_token_id: int = 2
    model_type: str = "llama"
    architecture: str = "LlamaForCausalLM"  # architectures.ARCHITECTURES says what it changes
    attention_bias: bool = False  # Llama's attention_bias: biases on q/k/v and o_proj
    sliding_window: int = 0  # attention sees the last `sliding_window` keys (Mistral); 0: all

    def __post_init__(self):
        if self.architecture not in ARCHITECTURES:
            raise UserError(f"architecture {self.architecture!r}; this tool runs {', '.join(ARCHITECTURES)}")
        if self.rope_type not in self.arch.rope_types:
            raise UserError(f"rope_type {self.rope_type!r} is not one {self.architecture} uses here "
                            f"({', '.join(self.arch.rope_types)})")
        self._check_sizes()
        if not self.head_dim:
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_attention_heads)
            if not self.head_dim:
                raise UserError(f"hidden_size ({self.hidden_size}) is smaller than num_attention_heads "
                                f"({self.num_attention_heads}): no room for a head")
        if self.head_dim % 2:
            raise UserError(f"head_dim is {self.head_dim}; RoPE rotates halves of each head, so it must be even")
        object.__setattr__(self, "rope_freq_factors", tuple(float(f) for f in self.rope_freq_factors))
        if self.rope_freq_factors and len(self.rope_freq_factors) != self.head_dim // 2:
            raise UserError(f"{len(self.rope_freq_factors)} RoPE frequency factors for head_dim {self.head_dim}; "
                            f"expected {self.head_dim // 2}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise UserError(
                f"num_attention_heads ({self.num_attention_heads}) is not a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )
        for name in ("bos_token_id", "eos_token_id"):
            if not 0 <= getattr(self, name) < self.vocab_size:
                raise UserError(f"{name} is {getattr(self, name)}; it must be a token id in 0..{self.vocab_size - 1}")

    def _check_sizes(self) -> None:
        """Types and ranges first: a float or string size, or one in the billions, would crash (or
        allocate) later, far from its cause. Bounds are generous multiples of any Llama released."""
        for name, (low, high) in SIZE_RANGES.items():
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int):
                raise UserError(f"{name} is {v!r}; it must be an integer")
            if not low <= v <= high:
                what = "a positive integer" if low == 1 else f"an integer >= {low}"
                raise UserError(f"{name} is {v}; it must be {what} at most {high}")
        for name in ("rms_norm_eps", "rope_theta", "rope_factor"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or not v > 0:
                raise UserError(f"{name} is {v!r}; it must be a positive finite number")
        if not isinstance(self.tie_word_embeddings, bool):
            raise UserError(f"tie_word_embeddings is {self.tie_word_embeddings!r}; it must be true or false")
        for name in ("bos_token_id", "eos_token_id"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int):
                raise UserError(f"{name} is {v!r}; it must be an integer token id")

    @property
    def arch(self) -> Architecture:
        return ARCHITECTURES[self.architecture]

    @property
    def qkv_bias(self) -> bool:
        return self.arch.qkv_bias or self.attention_bias

    @property
    def o_bias(self) -> bool:
        return self.attention_bias

    @property
    def window(self) -> int:
        """The attention window in keys (0: causal attention over every earlier key)."""
        return self.sliding_window if self.arch.sliding_window else 0

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
            if self.qkv_bias:
                shapes.update({p + "self_attn.q_proj.bias": (q,), p + "self_attn.k_proj.bias": (kv,),
                               p + "self_attn.v_proj.bias": (kv,)})
            if self.o_bias:
                shapes[p + "self_attn.o_proj.bias"] = (h,)
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
        """The sizes of weight_shapes(), summed without building it (checked before it is built)."""
        h, i, layers = self.hidden_size, self.intermediate_size, self.num_hidden_layers
        d = self.head_dim or self.hidden_size // self.num_attention_heads
        q, kv = self.num_attention_heads * d, self.num_key_value_heads * d
        per_layer = 2 * h + 2 * q * h + 2 * kv * h + 3 * i * h + (q + 2 * kv if self.qkv_bias else 0) \
            + (h if self.o_bias else 0)
        return self.vocab_size * h * (1 if self.tie_word_embeddings else 2) + layers * per_layer + h

    def to_hf_dict(self) -> dict:
        """A config.json that transformers (4.x and 5.x) reads back to the same model, of this
        architecture's class."""
        rope = None
        if self.rope_type == "linear":
            rope = {"rope_type": "linear", "factor": self.rope_factor}
        elif self.rope_type == "llama3":
            rope = {"rope_type": "llama3", "factor": self.rope_factor, "low_freq_factor": self.rope_low_freq_factor,
                    "high_freq_factor": self.rope_high_freq_factor,
                    "original_max_position_embeddings": self.rope_original_max_position}
        d = {
            "architectures": [self.architecture],
            "model_type": self.arch.model_type,
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
            "rope_scaling": rope,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "torch_dtype": "float16",
        }
        if self.arch.bias_key:
            d.update(attention_bias=self.attention_bias, mlp_bias=False)
        if self.arch.sliding_window:
            d["sliding_window"] = self.sliding_window or None
        if self.arch.model_type == "qwen2":
            d["use_sliding_window"] = False
        return d

    def as_dict(self) -> dict:
        d = asdict(self)
        d["rope_freq_factors"] = list(self.rope_freq_factors)  # as JSON reads it back
        return d


def _rope_from_hf(d: dict, where: str = "config.json", allowed=SUPPORTED_ROPE_TYPES) -> dict:
    """rope_theta / rope_scaling (transformers 4.x) or rope_parameters (5.x)."""
    params = d.get("rope_parameters") or {}
    scaling = d.get("rope_scaling") or {}
    for key, value in (("rope_parameters", params), ("rope_scaling", scaling)):
        if not isinstance(value, dict):
            raise UserError(f"{where}: {key} is {value!r}; expected an object such as "
                            '{"rope_type": "linear", "factor": 2.0} or null')
    theta = d.get("rope_theta")
    if theta is None:  # transformers 5.x keeps it in rope_parameters (and may write rope_theta: null)
        theta = params.get("rope_theta", 10000.0)
    rope = {**params, **scaling}
    rope_type = rope.get("rope_type", rope.get("type", "default")) or "default"
    if not isinstance(rope_type, str) or rope_type not in allowed:
        raise UserError(
            f"{where}: unsupported rope scaling {rope_type!r}; this tool runs {', '.join(allowed)} RoPE "
            "for this architecture (TinyLlama uses the default)"
        )
    out = {"rope_theta": _number({"rope_theta": theta}, "rope_theta", None, where), "rope_type": rope_type,
           "rope_factor": 1.0}
    if rope_type in ("linear", "llama3"):
        out["rope_factor"] = _number(rope, "factor", None, f"{where}: rope scaling")
    if rope_type == "llama3":
        out.update(rope_low_freq_factor=_number(rope, "low_freq_factor", None, f"{where}: rope scaling"),
                   rope_high_freq_factor=_number(rope, "high_freq_factor", None, f"{where}: rope scaling"),
                   rope_original_max_position=_integer(rope, "original_max_position_embeddings", None,
                                                       f"{where}: rope scaling"))
        if not out["rope_high_freq_factor"] > out["rope_low_freq_factor"]:
            raise UserError(f"{where}: rope scaling high_freq_factor must be above low_freq_factor")
    return out


def _integer(d: dict, key: str, default, where: str) -> int:
    """An integer field: 64.7, "64", true or null is refused rather than truncated or guessed."""
    v = d.get(key, default)
    if v is None and default is not None and key in d:
        v = default  # null: the default, as transformers reads it
    if isinstance(v, float) and v.is_integer():
        v = int(v)  # 2048.0: some converters write integral floats
    if isinstance(v, bool) or not isinstance(v, int):
        raise UserError(f"{where}: {key} is {json.dumps(v)}; expected an integer")
    return v


def _number(d: dict, key: str, default, where: str) -> float:
    v = d.get(key, default)
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise UserError(f"{where}: {key} is {json.dumps(v)}; expected a finite number")
    return float(v)


def _architecture(d: dict, where: str) -> Architecture:
    """The architecture a config.json declares: its model_type, and its architectures list if any."""
    model_type = d.get("model_type")
    arch = BY_MODEL_TYPE.get(model_type) if isinstance(model_type, str) else None
    if arch is None:
        raise UserError(
            f"{where}: model_type is {model_type!r}; this tool runs "
            + ", ".join(f"{a.model_type} ({a.hf_class})" for a in ARCHITECTURES.values())
        )
    archs = d.get("architectures")
    if archs is None:
        return arch  # optional in a config.json; model_type decides then
    if not isinstance(archs, list) or not all(isinstance(a, str) for a in archs):
        raise UserError(f"{where}: architectures is {json.dumps(archs)}; expected a list of class names")
    if arch.hf_class not in archs:
        raise UserError(f"{where}: architectures is {archs}; for model_type {model_type!r} this tool runs "
                        f"{arch.hf_class} only (a different head or model class would compute something else "
                        "from these weights)")
    return arch


def config_from_hf_dict(d: dict, where: str = "config.json") -> ModelConfig:
    if not isinstance(d, dict):
        raise UserError(f"{where} does not hold a JSON object")
    arch = _architecture(d, where)
    act = d.get("hidden_act", "silu")
    if act != "silu":
        raise UserError(f"{where}: hidden_act is {act!r}; the Llama MLP here is SwiGLU with 'silu'")
    if d.get("mlp_bias"):
        raise UserError(f"{where}: mlp_bias is set; no model of the Llama family this tool runs has MLP biases")
    if d.get("attention_bias") and not arch.bias_key:
        raise UserError(f"{where}: attention_bias is set; {arch.hf_class} has no such option")
    if arch.model_type == "qwen2" and d.get("use_sliding_window"):
        raise UserError(f"{where}: use_sliding_window is true; Qwen2's per-layer sliding window "
                        "(max_window_layers) is not run by this tool")
    absent = dict(arch.absent)
    window = d.get("sliding_window", absent.get("sliding_window")) if arch.sliding_window else None
    required = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size")
    missing = [k for k in required if k not in d]
    if missing:
        raise UserError(f"{where} lacks {', '.join(missing)}")
    rope = _rope_from_hf(d, where, arch.rope_types)
    eos = d.get("eos_token_id", 2)
    if isinstance(eos, list):
        if not eos:
            raise UserError(f"{where}: eos_token_id is an empty list")
        eos = eos[0]
    tie = d.get("tie_word_embeddings", False)
    if not isinstance(tie, bool):
        raise UserError(f"{where}: tie_word_embeddings is {json.dumps(tie)}; expected true or false")
    heads = _integer(d, "num_attention_heads", None, where)
    values = {k: _integer(d, k, None, where) for k in required}
    values.update(
        # null: as many as the heads (no GQA); absent: the architecture's class default (Mistral 8, Qwen2 32)
        num_key_value_heads=_integer(d, "num_key_value_heads",
                                     heads if "num_key_value_heads" in d else absent["num_key_value_heads"] or heads,
                                     where),
        rms_norm_eps=_number(d, "rms_norm_eps", 1e-6, where),
        **rope,
        architecture=arch.hf_class, model_type=arch.model_type,
        attention_bias=bool(d.get("attention_bias", False)) if arch.bias_key else False,
        sliding_window=_integer({"sliding_window": window}, "sliding_window", 0, where) if window is not None else 0,
        max_position_embeddings=_integer(d, "max_position_embeddings", absent["max_position_embeddings"], where),
        tie_word_embeddings=tie,
        head_dim=_integer(d, "head_dim", 0, where),
        bos_token_id=_integer(d, "bos_token_id", 1, where),
        eos_token_id=_integer({"eos_token_id": eos}, "eos_token_id", 2, where),
    )
    try:
        return ModelConfig(**values)
    except UserError as e:
        raise UserError(f"{where}: {e}") from None


def load_config(model_dir: Path) -> ModelConfig:
    path = Path(model_dir) / "config.json"
    if not path.exists():
        raise UserError(f"{model_dir} has no config.json: it is not a Hugging Face model directory")
    if path.stat().st_size > MAX_CONFIG_BYTES:
        raise UserError(f"{path} is {path.stat().st_size} bytes; a config.json is a few kB (at most "
                        f"{MAX_CONFIG_BYTES} read)")
    try:
        d = json.loads(read_bytes(path, "config.json"))
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        raise UserError(f"{path} is not valid JSON: {e}") from None
    return config_from_hf_dict(d, str(path))
