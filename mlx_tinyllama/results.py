"""The header that every command's JSON result starts with, typed: which command, model,
dtype, precision policy and kernels, on which device with which library versions, and
the prompt (ids, text, source, pieces). The report reads it back with `from_dict`.

docs/json.md documents each command's JSON; `SCHEMA` is its version, written as
`"schema"` in every result: bump it when a key changes meaning or spelling.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from .errors import UserError

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
        from .runtime import model_header

        return cls(command, model_header(lm), dtype or lm.dtype, policy or lm.ops.policy, kernels or lm.ops.kernels,
                   *_this_machine(), PromptRecord.of(prompt) if prompt is not None else None)

    @classmethod
    def without_model(cls, command: str, dtype: str | None, prompt: PromptRecord | None) -> ResultHeader:
        """The header of a result that ran no model here (a comparison of two stored files)."""
        return cls(command, None, dtype, None, None, *_this_machine(), prompt)

    def as_dict(self) -> dict:
        d = asdict(self)
        return {"schema": d.pop("schema"), **d}

    @classmethod
    def from_dict(cls, d: dict) -> ResultHeader:
        """A result's header; a result of another schema (or none) is a UserError."""
        if not isinstance(d, dict) or d.get("schema") != SCHEMA:
            found = d.get("schema") if isinstance(d, dict) else None
            raise UserError(f"not a schema-{SCHEMA} result (its schema: {found}); docs/json.md has the keys")
        p = d["prompt"]
        return cls(d["command"], d["model"], d["dtype"], d["policy"], d["kernels"], d["device"], d["versions"],
                   PromptRecord(**p) if p else None, d["schema"])


def _this_machine() -> tuple[str, dict]:
    """The device this runs on and the library versions: the pair every header records."""
    from .runtime import device_description, versions

    return device_description(), versions()
