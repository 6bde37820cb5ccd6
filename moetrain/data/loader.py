"""Packed sequences, the world-size-independent global batch loader, and per-rank slicing.

The global batch of step s is the same sequences in the same order whatever the
world size (DESIGN.md, "Parallel layout"): :class:`GlobalBatchLoader` yields whole
global batches from a seeded per-epoch permutation, and each rank takes a fixed
contiguous slice of it with :func:`rank_slice`, then splits that into
micro-batches with :func:`split_micro_batches`. Resuming needs only
``state_dict()`` (epoch, position), whatever the world size after the restart.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from moetrain.config import DataConfig
from moetrain.data.corpus import DataError
from moetrain.data.packing import pack_sequences, token_streams


@dataclass
class PackedData:
    """Training and validation sequences, ``[n, seq_len + 1]`` each (memory-mapped, read-only)."""

    train: np.ndarray
    val: np.ndarray
    vocab_size: int


def prepare_data(cfg: DataConfig, tokenizer) -> PackedData:
    """Load (or build and cache) the token streams of ``cfg`` and cut them into sequences.

    ``val`` keeps the first ``cfg.max_val_sequences`` sequences when that is set.
    Raises :class:`DataError` when either split is shorter than one sequence.
    """
    train_stream, val_stream = token_streams(cfg, tokenizer)
    train = pack_sequences(train_stream, cfg.seq_len)
    val = pack_sequences(val_stream, cfg.seq_len)
    if cfg.max_val_sequences is not None:
        val = val[: cfg.max_val_sequences]
    for name, seqs, stream in (("train", train, train_stream), ("val", val, val_stream)):
        if len(seqs) < 1:
            raise DataError(
                f"data.seq_len={cfg.seq_len}: the {name} split has {stream.shape[0]} tokens, fewer than one "
                f"sequence of seq_len + 1 (use a larger corpus, a smaller seq_len or another val_fraction)"
            )
    return PackedData(train=train, val=val, vocab_size=tokenizer.vocab_size)


def _to_long(rows: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.asarray(rows, dtype=np.int64))


class GlobalBatchLoader:
    """Infinite stream of global batches ``[global_batch_size, seq_len + 1]`` (int64).

    Epoch e visits every sequence once in the order ``default_rng([seed, e]).permutation(n)``;
    a batch that runs past the end of an epoch continues with the next epoch's
    permutation. Nothing depends on the world size.
    """

    def __init__(self, seqs: np.ndarray, global_batch_size: int, seed: int) -> None:
        if global_batch_size <= 0:
            raise ValueError(f"global_batch_size={global_batch_size}: must be > 0")
        if len(seqs) == 0:
            raise ValueError("GlobalBatchLoader needs at least one sequence")
        self.seqs = seqs
        self.global_batch_size = global_batch_size
        self.seed = seed
        self.epoch = 0
        self.position = 0
        self._perm_epoch = -1
        self._perm = np.empty(0, dtype=np.int64)

    def _permutation(self, epoch: int) -> np.ndarray:
        if epoch != self._perm_epoch:
            self._perm = np.random.default_rng([self.seed, epoch]).permutation(len(self.seqs))
            self._perm_epoch = epoch
        return self._perm

    def next_indices(self) -> np.ndarray:
        """Sequence indices of the next global batch (advances the loader)."""
        parts, need = [], self.global_batch_size
        while need > 0:
            perm = self._permutation(self.epoch)
            take = perm[self.position : self.position + need]
            parts.append(take)
            need -= len(take)
            self.position += len(take)
            if self.position == len(perm):
                self.epoch, self.position = self.epoch + 1, 0
        return np.concatenate(parts)

    def next_batch(self) -> torch.Tensor:
        """The next global batch as a LongTensor ``[global_batch_size, seq_len + 1]``."""
        return _to_long(self.seqs[self.next_indices()])

    def __iter__(self) -> Iterator[torch.Tensor]:
        return self

    def __next__(self) -> torch.Tensor:
        return self.next_batch()

    def state_dict(self) -> dict[str, int]:
        """Where the next batch starts: ``{"epoch": e, "position": p}``."""
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Resume so that the following batches equal those of the saved loader."""
        epoch, position = int(state["epoch"]), int(state["position"])
        if epoch < 0 or not 0 <= position < len(self.seqs):
            raise ValueError(f"loader state {state} does not fit {len(self.seqs)} sequences")
        self.epoch, self.position = epoch, position


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


def val_batches(seqs: np.ndarray, batch_size: int, rank: int, world_size: int) -> Iterator[torch.Tensor]:
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
        yield _to_long(seqs[lo:hi])
