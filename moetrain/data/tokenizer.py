"""Tokenizers: a dependency-free byte tokenizer and a thin Hugging Face wrapper.

Both expose the same small interface (:class:`Tokenizer`): ``name`` (part of the
data cache key), ``vocab_size``, ``eos_id`` / ``bos_id`` / ``pad_id``,
``encode(text) -> np.ndarray[int32]`` (no special tokens added) and
``decode(ids) -> str``.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Protocol, runtime_checkable

import numpy as np


@runtime_checkable
class Tokenizer(Protocol):
    """What the data pipeline and the trainer need from a tokenizer."""

    name: str
    vocab_size: int
    eos_id: int
    bos_id: int
    pad_id: int

    def encode(self, text: str) -> np.ndarray: ...

    def decode(self, ids: Iterable[int] | np.ndarray) -> str: ...


class ByteTokenizer:
    """UTF-8 bytes as tokens: ids 0..255 are bytes, then eos=256, bos=257, pad=258."""

    name = "byte"
    eos_id = 256
    bos_id = 257
    pad_id = 258
    vocab_size = 259

    def encode(self, text: str) -> np.ndarray:
        """The UTF-8 bytes of ``text`` as int32 ids (no special tokens)."""
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int32)

    def decode(self, ids: Iterable[int] | np.ndarray) -> str:
        """Bytes back to text; special ids are skipped, invalid UTF-8 becomes U+FFFD."""
        arr = np.asarray(ids if isinstance(ids, np.ndarray) else list(ids), dtype=np.int64).reshape(-1)
        arr = arr[(arr >= 0) & (arr < 256)]
        return arr.astype(np.uint8).tobytes().decode("utf-8", errors="replace")

    def __repr__(self) -> str:
        return "ByteTokenizer(vocab_size=259)"


class HFTokenizer:
    """A ``transformers.AutoTokenizer`` behind the :class:`Tokenizer` interface.

    ``vocab_size`` is ``len(tokenizer)`` (added tokens included). A tokenizer
    without an EOS token uses its SEP token as the document separator; missing
    BOS / PAD ids fall back to the EOS id.
    """

    def __init__(self, name: str) -> None:
        try:
            from transformers import AutoTokenizer
        except ImportError as exc:  # pragma: no cover - depends on the environment
            raise ImportError(
                f"data.tokenizer={name!r} needs the transformers package: scripts/setup.sh transformers (a clone) or pip install -e '.[transformers]'"
            ) from exc
        try:
            self._tok = AutoTokenizer.from_pretrained(name)
        except (OSError, ValueError) as exc:  # unknown name, offline without a cached copy, not a tokenizer
            from moetrain.data.corpus import DataError

            reason = " ".join(str(exc).split())[:300]
            raise DataError(f"data.tokenizer={name!r}: cannot load it ({reason})") from None
        self.name = f"hf:{name}"
        self.vocab_size = len(self._tok)
        eos = self._tok.eos_token_id
        if eos is None:
            eos = self._tok.sep_token_id
        if eos is None:
            raise ValueError(f"data.tokenizer={name!r}: the tokenizer has neither an EOS nor a SEP token")
        self.eos_id = int(eos)
        bos, pad = self._tok.bos_token_id, self._tok.pad_token_id
        self.bos_id = int(bos) if bos is not None else self.eos_id
        self.pad_id = int(pad) if pad is not None else self.eos_id

    def encode(self, text: str) -> np.ndarray:
        """Token ids of ``text`` as int32, without special tokens."""
        return np.asarray(self._tok.encode(text, add_special_tokens=False), dtype=np.int32)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Token ids of each text (the fast tokenizer's batched call: equal to ``encode`` of each)."""
        return self._tok(texts, add_special_tokens=False)["input_ids"]

    def decode(self, ids: Iterable[int] | np.ndarray) -> str:
        """Text of ``ids``, special tokens skipped."""
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=True)

    def __repr__(self) -> str:
        return f"HFTokenizer({self.name!r}, vocab_size={self.vocab_size})"


def build_tokenizer(name: str) -> ByteTokenizer | HFTokenizer:
    """``"byte"`` -> :class:`ByteTokenizer`; anything else is a Hugging Face name or path."""
    if name == "byte":
        return ByteTokenizer()
    return HFTokenizer(name)
