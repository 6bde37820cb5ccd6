"""The run's tokenizer as ``transformers`` tokenizer files, and its special-token ids for the exported config.

A Hugging Face tokenizer (``data.tokenizer=NAME_OR_PATH``) is saved as it is.
moetrain's byte tokenizer (ids 0..255 = bytes, then eos 256, bos 257, pad 258)
is written as a byte-level BPE without merges (GPT-2's byte-to-unicode
alphabet, each byte its own token, in byte order), so
``AutoTokenizer.from_pretrained(folder)`` encodes text to the same ids.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from moetrain.data.tokenizer import ByteTokenizer, build_tokenizer

BYTE_SPECIALS = {"<eos>": ByteTokenizer.eos_id, "<bos>": ByteTokenizer.bos_id, "<pad>": ByteTokenizer.pad_id}


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map (what the ``ByteLevel`` pre-tokenizer emits)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return chars


def byte_tokenizer_fast() -> Any:
    """A ``PreTrainedTokenizerFast`` giving moetrain's byte ids."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {ch: b for b, ch in bytes_to_unicode().items()}
    vocab.update(BYTE_SPECIALS)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", bos_token="<bos>", pad_token="<pad>")


def special_token_ids(name: str) -> dict[str, int]:
    """``bos_token_id`` / ``eos_token_id`` / ``pad_token_id`` of the run's tokenizer, for the exported config."""
    tok = build_tokenizer(name)
    return {"bos_token_id": tok.bos_id, "eos_token_id": tok.eos_id, "pad_token_id": tok.pad_id}


def save_tokenizer(name: str, out_dir: Path) -> dict[str, int]:
    """Write the tokenizer files of ``data.tokenizer=name`` into ``out_dir``; returns its special-token ids."""
    if name == "byte":
        byte_tokenizer_fast().save_pretrained(str(out_dir))
    else:
        from transformers import AutoTokenizer

        AutoTokenizer.from_pretrained(name).save_pretrained(str(out_dir))
    return special_token_ids(name)


def has_tokenizer(folder: Path) -> bool:
    """Whether a transformers folder holds tokenizer files."""
    return any((folder / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model"))
