"""Data pipeline: tokenizers, corpora, packing into sequences, the global batch loader."""

from moetrain.data.corpus import DataError, cache_root, load_documents, split_by_hash, stdlib_files
from moetrain.data.loader import (
    PackedData,
    build_loader,
    prepare_data,
    rank_slice,
    split_micro_batches,
    val_batches,
)
from moetrain.data.packing import (
    ConcatRows,
    PackedSequences,
    cache_key,
    pack_sequences,
    token_streams,
    tokenize_documents,
)
from moetrain.data.sampling import GlobalBatchLoader, MixtureLoader
from moetrain.data.shards import TokenStream, token_dtype, write_split
from moetrain.data.tokenizer import ByteTokenizer, HFTokenizer, Tokenizer, build_tokenizer

__all__ = [
    "ByteTokenizer",
    "ConcatRows",
    "DataError",
    "GlobalBatchLoader",
    "HFTokenizer",
    "MixtureLoader",
    "PackedData",
    "PackedSequences",
    "TokenStream",
    "Tokenizer",
    "build_loader",
    "build_tokenizer",
    "cache_key",
    "cache_root",
    "load_documents",
    "pack_sequences",
    "prepare_data",
    "rank_slice",
    "split_by_hash",
    "split_micro_batches",
    "stdlib_files",
    "token_dtype",
    "token_streams",
    "tokenize_documents",
    "val_batches",
    "write_split",
]
