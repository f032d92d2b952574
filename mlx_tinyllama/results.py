"""The header that every command's JSON result starts with, typed: which command, model,
dtype, precision policy and kernels, on which device with which library versions, and
the prompt (ids, text, source, pieces). The report reads it back with `from_dict`.

docs/json.md documents each command's JSON; `SCHEMA` is its version, written as
`"schema"` in every result: bump it when a key changes meaning or spelling.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

SCHEMA = 1


@dataclass
class PromptRecord:
    """The prompt a result is about: its token ids always; text, source and pieces when known."""

    ids: list[int]
    text: str | None = None  # None when the ids were given directly or came from a dump
    source: str = ""  # how the prompt was given: "seed chat prompt", "--prompt", "the dump's token ids", ...
    pieces: list[str] = field(default_factory=list)  # one tokenizer piece per id ([] when no tokenizer)

    @classmethod
    def of(cls, prompt) -> PromptRecord:
        """From prompt.Prompt (or anything with ids, text, source and pieces)."""
        return cls([int(i) for i in prompt.ids], prompt.text, prompt.source, list(prompt.pieces or []))


@dataclass
class ResultHeader:
    command: str
    model: dict | None  # {spec, format, origin, path, details, config}; None when no model was run
    dtype: str | None  # comma-separated when the command ran several (stability)
    policy: str | None
    kernels: str | None
    device: str
    versions: dict
    prompt: PromptRecord | None
    schema: int = SCHEMA

    @classmethod
    def of_run(cls, command: str, lm, prompt=None, *, dtype: str | None = None, policy: str | None = None,
               kernels: str | None = None) -> ResultHeader:
        """The header of a run of `lm` on `prompt` on this machine; dtype, policy and kernels
        default to the model's own."""
        from .runtime import device_description, model_header, versions

        return cls(command, model_header(lm), dtype or lm.dtype, policy or lm.ops.policy, kernels or lm.ops.kernels,
                   device_description(), versions(), PromptRecord.of(prompt) if prompt is not None else None)

    @classmethod
    def without_model(cls, command: str, dtype: str | None, prompt: PromptRecord | None) -> ResultHeader:
        """The header of a result that ran no model here (a comparison of two stored files)."""
        from .runtime import device_description, versions

        return cls(command, None, dtype, None, None, device_description(), versions(), prompt)

    def as_dict(self) -> dict:
        d = asdict(self)
        return {"schema": d.pop("schema"), **d}

    @classmethod
    def from_dict(cls, d: dict) -> ResultHeader:
        """A result's header (the keys above; a result of another schema is refused by the caller)."""
        p = d.get("prompt")
        return cls(d["command"], d.get("model"), d.get("dtype"), d.get("policy"), d.get("kernels"), d["device"],
                   d.get("versions") or {}, PromptRecord(**p) if p else None, d.get("schema", SCHEMA))
