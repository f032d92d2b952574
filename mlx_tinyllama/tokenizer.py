"""TinyLlama's tokenizer, encoding exactly as the reference run did.

`Tokenizer` is plain SentencePiece (the ground truth: TinyLlama was trained on its
output) wrapped the way transformers' legacy Llama tokenizer used it: special tokens
written in the text (`<s>`, `</s>`, `<unk>`) are split out and mapped to their ids,
and every text segment between them is encoded on its own, so each segment gets
SentencePiece's dummy prefix space (`</s>\\n` -> 2, 29871, 13). BOS is optional and
off by default (the reference used `add_special_tokens=False`).

`HFTokenizer` runs a model directory's `tokenizer.json` through the `tokenizers`
library as transformers' fast tokenizer does; it can disagree with SentencePiece
(runs of spaces, text starting with a space), which `tokens` reports.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from .errors import UserError, read_bytes

KINDS = ("auto", "sentencepiece", "hf")  # auto: tokenizer.model if the model has one, else tokenizer.json


class Tokenizer:
    """SentencePiece, segment-wise between special tokens (transformers' legacy behaviour)."""

    kind = "sentencepiece"

    def __init__(self, processor, source: str = "<model proto>"):
        self._sp = processor
        self.source = source
        # longest first so `</s>` is never read as `<` + ...; only ids the model has
        specials = {self._sp.id_to_piece(i): i for i in (self.unk_id, self.bos_id, self.eos_id) if i >= 0}
        self.special_ids = specials
        pattern = "|".join(re.escape(p) for p in sorted(specials, key=len, reverse=True))
        self._split = re.compile(f"({pattern})") if pattern else None

    # --- construction ------------------------------------------------------------

    @classmethod
    def from_file(cls, path) -> "Tokenizer":
        path = Path(path)
        return cls.from_model_proto(read_bytes(path, "tokenizer file"), source=str(path))

    @classmethod
    def from_model_proto(cls, data: bytes, source: str = "<model proto>") -> "Tokenizer":
        import sentencepiece as spm

        processor = None
        try:
            if data:  # an empty proto "loads" and then logs C++ errors on every call
                processor = spm.SentencePieceProcessor(model_proto=bytes(data))
        except (RuntimeError, OSError, TypeError, ValueError):
            pass
        # an empty proto "loads" with no pieces: that is corrupt too
        if processor is None or processor.vocab_size() == 0:
            raise UserError(f"{source} is not a valid SentencePiece model (corrupt or truncated tokenizer.model?)")
        return cls(processor, source)

    # --- vocabulary --------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        return self._sp.vocab_size()

    @property
    def bos_id(self) -> int:
        return self._sp.bos_id()

    @property
    def eos_id(self) -> int:
        return self._sp.eos_id()

    @property
    def unk_id(self) -> int:
        return self._sp.unk_id()

    def piece(self, id: int) -> str:
        _check_id(id, self.vocab_size)
        return self._sp.id_to_piece(int(id))

    def pieces(self, ids) -> list[str]:
        return [self.piece(i) for i in ids]

    def token_to_id(self, piece: str) -> int | None:
        i = self._sp.piece_to_id(piece)
        # SentencePiece maps unknown pieces to unk: only unk itself may return it
        return None if i == self.unk_id and piece != self._sp.id_to_piece(i) else i

    # --- encode / decode ---------------------------------------------------------

    def segments(self, text: str) -> list[str]:
        """The text split at special tokens, the special tokens kept as their own items."""
        parts = self._split.split(text) if self._split else [text]
        return [s for s in parts if s]

    def encode(self, text: str, bos: bool = False) -> list[int]:
        ids = [self.bos_id] if bos else []
        for seg in self.segments(text):
            if seg in self.special_ids:
                ids.append(self.special_ids[seg])
            else:
                ids.extend(self._sp.encode(seg))
        return ids

    def decode(self, ids, skip_special: bool = False) -> str:
        """Inverse of `encode`: each run between special ids loses its one dummy prefix space."""
        by_id = {i: p for p, i in self.special_ids.items()}
        out, run = [], []
        for i in ids:
            i = int(i)
            _check_id(i, self.vocab_size)
            if i in by_id:
                out.append(self._sp.decode(run))
                run = []
                if not skip_special:
                    out.append(by_id[i])
            else:
                run.append(i)
        out.append(self._sp.decode(run))
        return "".join(out)

    def __repr__(self) -> str:
        return f"Tokenizer({self.source!r}, vocab_size={self.vocab_size})"


class HFTokenizer:
    """A `tokenizer.json` run through `tokenizers`, as transformers' fast tokenizer loads it."""

    kind = "hf"

    def __init__(self, backend, source: str, special_tokens: dict[str, str] | None = None):
        self._tok = backend
        self.source = source
        names = {"unk": "<unk>", "bos": "<s>", "eos": "</s>", **(special_tokens or {})}
        self._ids = {k: self._tok.token_to_id(v) for k, v in names.items()}

    @classmethod
    def from_file(cls, path, config_path=None) -> "HFTokenizer":
        from tokenizers import Tokenizer as Backend

        path = Path(path)
        if not path.is_file():
            raise UserError(f"tokenizer file {path} does not exist")
        try:
            backend = Backend.from_file(str(path))
        except Exception as e:  # tokenizers raises a bare Exception on bad JSON
            raise UserError(f"{path} is not a valid tokenizer.json: {str(e).splitlines()[0]}") from None
        config_path = Path(config_path) if config_path else path.with_name("tokenizer_config.json")
        return cls(backend, str(path), _special_token_names(config_path))

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    @property
    def bos_id(self) -> int:
        return -1 if self._ids["bos"] is None else self._ids["bos"]

    @property
    def eos_id(self) -> int:
        return -1 if self._ids["eos"] is None else self._ids["eos"]

    @property
    def unk_id(self) -> int:
        return -1 if self._ids["unk"] is None else self._ids["unk"]

    @property
    def special_ids(self) -> dict[str, int]:
        return {self._tok.id_to_token(i): i for i in (self.unk_id, self.bos_id, self.eos_id) if i >= 0}

    def piece(self, id: int) -> str:
        _check_id(id, self.vocab_size)
        return self._tok.id_to_token(int(id))

    def pieces(self, ids) -> list[str]:
        return [self.piece(i) for i in ids]

    def token_to_id(self, piece: str) -> int | None:
        return self._tok.token_to_id(piece)

    def encode(self, text: str, bos: bool = False) -> list[int]:
        # the file's post-processor is not used: BOS is ours to add, as for `Tokenizer`
        if bos and self.bos_id < 0:  # Qwen2: bos_token null; prepending "-1" would be a wrong id, not a BOS
            raise UserError(f"--bos: this tokenizer ({self.source}) has no BOS token (its tokenizer_config.json "
                            "names none, as Qwen2's); run without --bos")
        ids = self._tok.encode(text, add_special_tokens=False).ids
        return ([self.bos_id] if bos else []) + ids

    def decode(self, ids, skip_special: bool = False) -> str:
        ids = [int(i) for i in ids]
        for i in ids:
            _check_id(i, self.vocab_size)
        return self._tok.decode(ids, skip_special_tokens=skip_special)

    def __repr__(self) -> str:
        return f"HFTokenizer({self.source!r}, vocab_size={self.vocab_size})"


def _check_id(id, vocab_size: int) -> None:
    if not 0 <= int(id) < vocab_size:
        raise UserError(f"token id {id} is outside the vocabulary (0..{vocab_size - 1})")


def _special_token_names(config_path: Path) -> dict[str, str]:
    """bos/eos/unk token strings from tokenizer_config.json (plain or AddedToken dicts)."""
    if not config_path.is_file():
        return {}
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"cannot read {config_path}: {e}") from None
    names = {}
    for key in ("bos", "eos", "unk"):
        value = config.get(f"{key}_token") if isinstance(config, dict) else None
        if isinstance(value, dict):
            value = value.get("content")
        if isinstance(value, str):
            names[key] = value
    return names


def load_tokenizer(location, kind: str = "auto") -> Tokenizer | HFTokenizer:
    """The tokenizer of a model directory (tokenizer.model, or tokenizer.json for kind="hf"; with
    "auto" the SentencePiece model where there is one, the ground truth of Llama 2 checkpoints, else
    the tokenizer.json that byte-level BPE models (Llama 3, Qwen2) ship alone), a `.gguf` file (its
    embedded SentencePiece model), or a tokenizer file given directly."""
    if kind not in KINDS:
        raise UserError(f"unknown tokenizer kind {kind!r}: choose from {', '.join(KINDS)}")
    path = Path(location).expanduser()
    if not path.exists():
        raise UserError(f"tokenizer location {path} does not exist")
    from .gguf import is_gguf  # lazy, like every use of gguf.py here

    if path.is_file() and (path.suffix == ".gguf" or is_gguf(path)):
        return _load_gguf(path, kind)
    if path.is_file():
        return HFTokenizer.from_file(path) if path.suffix == ".json" else Tokenizer.from_file(path)
    if kind == "auto":
        kind = "sentencepiece" if (path / "tokenizer.model").is_file() or not (path / "tokenizer.json").is_file() \
            else "hf"
    name = "tokenizer.json" if kind == "hf" else "tokenizer.model"
    if not (path / name).is_file():
        hint = " (use --tokenizer sentencepiece)" if kind == "hf" else ""
        raise UserError(f"model directory {path} has no {name}{hint}")
    return HFTokenizer.from_file(path / name) if kind == "hf" else Tokenizer.from_file(path / name)


def _load_gguf(path: Path, kind: str) -> Tokenizer:
    if kind == "hf":
        raise UserError(f"{path} is a GGUF file: it has no tokenizer.json, use --tokenizer sentencepiece")
    from .gguf import tokenizer_model_proto  # lazy: gguf pulls in heavier dependencies

    return Tokenizer.from_model_proto(tokenizer_model_proto(path), source=str(path))


