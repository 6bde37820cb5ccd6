"""Packed sequences, the world-size-independent global batch loader, and per-rank slicing.

The global batch of step s is the same sequences in the same order whatever the
world size (docs/parallelism.md, "Layout"): :class:`GlobalBatchLoader` yields whole
global batches from a seeded per-epoch permutation, and each rank takes a fixed
contiguous slice of it with :func:`rank_slice`, then splits that into
micro-batches with :func:`split_micro_batches`. Resuming needs only
``state_dict()`` (epoch, position), whatever the world size after the restart.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from moetrain.config import DataConfig
from moetrain.data.corpus import DataError
from moetrain.data.packing import ConcatRows, pack_stream, token_streams
from moetrain.data.sampling import GlobalBatchLoader, MixtureLoader, to_long

Sequences = Any
"""Rows ``[n, seq_len + 1]``: an ndarray, :class:`~moetrain.data.packing.PackedSequences` or
:class:`~moetrain.data.mixture.ConcatRows` (anything with ``len``, ``shape`` and row indexing)."""


@dataclass
class PackedData:
    """Training and validation sequences, ``[n, seq_len + 1]`` each (memory-mapped, read-only).

    For a mixture (``data.sources``), ``sources`` holds each source's training sequences and
    ``weights`` their normalised weights; ``train`` and ``val`` are then all sources' rows.
    """

    train: Sequences
    val: Sequences
    vocab_size: int
    sources: dict[str, Sequences] = field(default_factory=dict)
    weights: dict[str, float] = field(default_factory=dict)


def _prepare_one(cfg: DataConfig, tokenizer: Any, max_val: int | None) -> tuple[Sequences, Sequences]:
    """(train, val) sequences of one corpus; :class:`DataError` when a split is shorter than one sequence."""
    train_stream, val_stream = token_streams(cfg, tokenizer)
    train = pack_stream(train_stream, cfg.seq_len)
    val = pack_stream(val_stream, cfg.seq_len, max_val)
    for name, seqs, stream in (("train", train, train_stream), ("val", val, val_stream)):
        if len(seqs) < 1:
            raise DataError(
                f"data.seq_len={cfg.seq_len}: the {name} split of data.source={cfg.source!r} has {len(stream)} "
                f"tokens, fewer than one sequence of seq_len + 1 (use a larger corpus, a smaller seq_len or "
                f"another val_fraction)"
            )
    return train, val


def source_configs(cfg: DataConfig) -> dict[str, DataConfig]:
    """Each mixture source as a single-corpus ``DataConfig`` (tokenizer, split and cache settings shared)."""
    return {
        s.name: replace(
            cfg, source=s.source, paths=list(s.paths), hub_config=s.hub_config, text_field=s.text_field, sources=[]
        )
        for s in cfg.sources
    }


def prepare_data(cfg: DataConfig, tokenizer: Any) -> PackedData:
    """Load (or build and cache) the token streams of ``cfg`` and cut them into sequences.

    ``val`` keeps the first ``cfg.max_val_sequences`` sequences when that is set (for a
    mixture: of each source, ``round(max_val_sequences * weight)``, at least one).
    Raises :class:`DataError` when either split is shorter than one sequence.
    """
    if not cfg.sources:
        train, val = _prepare_one(cfg, tokenizer, cfg.max_val_sequences)
        return PackedData(train=train, val=val, vocab_size=tokenizer.vocab_size)
    total = sum(s.weight for s in cfg.sources)
    weights = {s.name: s.weight / total for s in cfg.sources}
    trains, vals = {}, []
    for name, sub in source_configs(cfg).items():
        cap = None if cfg.max_val_sequences is None else max(1, round(cfg.max_val_sequences * weights[name]))
        trains[name], val = _prepare_one(sub, tokenizer, cap)
        vals.append(val)
    return PackedData(
        train=ConcatRows(list(trains.values())),
        val=ConcatRows(vals),
        vocab_size=tokenizer.vocab_size,
        sources=trains,
        weights=weights,
    )


def build_loader(data: PackedData, global_batch_size: int, seed: int) -> GlobalBatchLoader | MixtureLoader:
    """The training loader of ``data``: one source's :class:`GlobalBatchLoader` or a :class:`MixtureLoader`."""
    if data.sources:
        return MixtureLoader(data.sources, data.weights, global_batch_size, seed)
    return GlobalBatchLoader(data.train, global_batch_size, seed)


def rank_slice(batch: torch.Tensor, rank: int, world_size: int) -> torch.Tensor:
    """Rank ``rank``'s contiguous rows ``[r * B / W, (r + 1) * B / W)`` of a global batch."""
    size = batch.shape[0]
    if world_size <= 0 or not 0 <= rank < world_size:
        raise ValueError(f"rank={rank} is not in [0, world_size={world_size})")
    if size % world_size:
        raise ValueError(f"global batch of {size} sequences is not divisible by world size {world_size}")
    per_rank = size // world_size
    return batch[rank * per_rank : (rank + 1) * per_rank]


def split_micro_batches(batch: torch.Tensor, micro_batch_size: int) -> list[torch.Tensor]:
    """Consecutive micro-batches of ``micro_batch_size`` rows (must divide the batch)."""
    if micro_batch_size <= 0 or batch.shape[0] % micro_batch_size:
        raise ValueError(f"batch of {batch.shape[0]} sequences is not divisible by micro_batch_size={micro_batch_size}")
    return list(batch.split(micro_batch_size))


def val_batches(seqs: Sequences, batch_size: int, rank: int, world_size: int) -> Iterator[torch.Tensor]:
    """This rank's part of the validation set, batch by batch, in the fixed order of ``seqs``.

    The set is cut into consecutive global batches of ``batch_size`` sequences
    (the last one may be short). Of a batch of ``b`` rows, rank r takes the
    contiguous rows ``[r * b // W, (r + 1) * b // W)``: shares differ by at most
    one row and may be empty when ``b < W``, nothing is padded, and every
    sequence is evaluated exactly once over all ranks. All ranks yield the same
    number of batches (so collectives stay in step); reduce sums of loss and
    token counts, not per-rank means.
    """
    if batch_size <= 0:
        raise ValueError(f"batch_size={batch_size}: must be > 0")
    if world_size <= 0 or not 0 <= rank < world_size:
        raise ValueError(f"rank={rank} is not in [0, world_size={world_size})")
    for start in range(0, len(seqs), batch_size):
        b = min(batch_size, len(seqs) - start)
        lo, hi = start + rank * b // world_size, start + (rank + 1) * b // world_size
        yield to_long(seqs[lo:hi])
