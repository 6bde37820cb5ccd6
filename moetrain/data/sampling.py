"""Samplers of global batches: one source's seeded epochs, and a weighted mixture of sources.

Both yield whole global batches ``[global_batch_size, seq_len + 1]`` that depend only
on the seed, the data and the number of batches drawn so far, never on the world size
or the micro-batch split, and both resume exactly from ``state_dict()``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch


def to_long(rows: Any) -> torch.Tensor:
    """Rows of token ids as an int64 tensor."""
    return torch.from_numpy(np.asarray(rows, dtype=np.int64))


def seeded_permutation(seed: int, epoch: int, n: int) -> np.ndarray:
    """The visiting order of ``n`` sequences in ``epoch``: ``default_rng([seed, epoch]).permutation(n)``."""
    return np.random.default_rng([seed, epoch]).permutation(n)


class GlobalBatchLoader:
    """Infinite stream of global batches ``[global_batch_size, seq_len + 1]`` (int64).

    Epoch e visits every sequence once in the order ``default_rng([seed, e]).permutation(n)``;
    a batch that runs past the end of an epoch continues with the next epoch's
    permutation. Nothing depends on the world size.
    """

    def __init__(self, seqs: Any, global_batch_size: int, seed: int) -> None:
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
            self._perm = seeded_permutation(self.seed, epoch, len(self.seqs))
            self._perm_epoch = epoch
        return self._perm

    def next_indices(self, count: int | None = None) -> np.ndarray:
        """Sequence indices of the next global batch, or of the next ``count`` sequences (advances the loader)."""
        parts, need = [], self.global_batch_size if count is None else count
        while need > 0:
            perm = self._permutation(self.epoch)
            take = perm[self.position : self.position + need]
            parts.append(take)
            need -= len(take)
            self.position += len(take)
            if self.position == len(perm):
                self.epoch, self.position = self.epoch + 1, 0
        return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)

    def next_batch(self) -> torch.Tensor:
        """The next global batch as a LongTensor ``[global_batch_size, seq_len + 1]``."""
        return to_long(self.seqs[self.next_indices()])

    def __iter__(self) -> Iterator[torch.Tensor]:
        return self

    def __next__(self) -> torch.Tensor:
        return self.next_batch()

    def metrics(self) -> dict[str, float]:
        """Nothing to log for one source (a :class:`MixtureLoader` logs its proportions)."""
        return {}

    def state_dict(self) -> dict[str, int]:
        """Where the next batch starts: ``{"epoch": e, "position": p}``."""
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Resume so that the following batches equal those of the saved loader."""
        epoch, position = int(state["epoch"]), int(state["position"])
        if epoch < 0 or not 0 <= position < len(self.seqs):
            raise ValueError(f"loader state {state} does not fit {len(self.seqs)} sequences")
        self.epoch, self.position = epoch, position


def source_seed(seed: int, name: str) -> int:
    """A per-source shuffle seed derived from ``data.seed`` and the source's name."""
    return int.from_bytes(hashlib.sha1(f"{seed}:{name}".encode()).digest()[:4], "big")


def mixture_choices(weights: np.ndarray, counts: np.ndarray, n: int) -> np.ndarray:
    """The sources of the next ``n`` rows, by smallest deficit (smooth weighted round robin); updates ``counts``.

    Row t (counting every row drawn so far) goes to the source with the largest
    ``weights[s] * (t + 1) - counts[s]`` (lowest index on ties), so after t rows every
    source has drawn ``weights[s] * t`` rows up to less than one row, deterministically.
    """
    out = np.empty(n, dtype=np.int64)
    total = int(counts.sum())
    for j in range(n):
        s = int(np.argmax(weights * (total + j + 1) - counts))
        counts[s] += 1
        out[j] = s
    return out


class MixtureLoader:
    """Global batches drawn from weighted sources (``data.sources``).

    Each row's source comes from :func:`mixture_choices`; the rows of source s are the next
    sequences of its own :class:`GlobalBatchLoader` (own seeded epochs), in row order. The state
    is every source's loader position plus the rows drawn per source, so a resume continues
    exactly, and the realised proportions are logged as ``data/source/<name>`` (cumulative).
    """

    def __init__(self, sources: dict[str, Any], weights: dict[str, float], global_batch_size: int, seed: int) -> None:
        if global_batch_size <= 0:
            raise ValueError(f"global_batch_size={global_batch_size}: must be > 0")
        self.names = list(sources)
        self.sources = sources
        self.global_batch_size = global_batch_size
        self.weights = np.array([weights[n] for n in self.names], dtype=np.float64)
        self.loaders = {n: GlobalBatchLoader(s, 1, source_seed(seed, n)) for n, s in sources.items()}
        self.counts = np.zeros(len(self.names), dtype=np.int64)

    def next_batch(self) -> torch.Tensor:
        """The next global batch as a LongTensor ``[global_batch_size, seq_len + 1]``."""
        choice = mixture_choices(self.weights, self.counts, self.global_batch_size)
        width = self.sources[self.names[0]].shape[1]
        out = np.empty((self.global_batch_size, width), dtype=np.int64)
        for s, name in enumerate(self.names):
            rows = np.flatnonzero(choice == s)
            if len(rows):
                out[rows] = self.sources[name][self.loaders[name].next_indices(len(rows))]
        return torch.from_numpy(out)

    def __iter__(self) -> Iterator[torch.Tensor]:
        return self

    def __next__(self) -> torch.Tensor:
        return self.next_batch()

    def metrics(self) -> dict[str, float]:
        """``data/source/<name>``: the fraction of all rows drawn so far that came from each source."""
        total = max(int(self.counts.sum()), 1)
        return {f"data/source/{n}": float(c) / total for n, c in zip(self.names, self.counts)}

    def state_dict(self) -> dict[str, Any]:
        """Rows drawn per source and each source's loader position."""
        return {
            "mixture": {n: {**self.loaders[n].state_dict(), "drawn": int(c)} for n, c in zip(self.names, self.counts)}
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume so that the following batches equal those of the saved loader (same sources)."""
        saved = state.get("mixture")
        if not isinstance(saved, dict) or sorted(saved) != sorted(self.names):
            raise ValueError(f"loader state {state} does not fit the mixture of {self.names}")
        for s, name in enumerate(self.names):
            self.loaders[name].load_state_dict(saved[name])
            self.counts[s] = int(saved[name]["drawn"])
