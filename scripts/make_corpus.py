"""Generate a synthetic text corpus of a given size (nothing downloaded) as JSONL parts.

    python scripts/make_corpus.py /tmp/corpus --gb 2

writes ``/tmp/corpus/part-00000.jsonl`` ... (``--part-mb`` each), one document per line
(``{"text": ...}``), deterministic for a ``--seed``. Words are pseudo-words drawn with a
Zipf law, sentences are cached and reused, document lengths are log-normal (median about
3 KB, some near 100 KB), and a few documents hold non-ASCII text, so tokenisation,
empty-document checks and splitting see something like a real crawl. Train on it with
``data=files 'data.paths=[/tmp/corpus/*.jsonl]'``.
"""

from __future__ import annotations

import argparse
import json
import string
from collections.abc import Iterator
from pathlib import Path

import numpy as np

ACCENTED = "éèàüöñçßø"


def word_bank(rng: np.random.Generator, n: int) -> list[str]:
    """``n`` distinct pseudo-words of 1 to 12 letters (1 in 50 with an accented letter)."""
    letters = np.array(list(string.ascii_lowercase))
    words: dict[str, None] = {}  # insertion-ordered: the Zipf rank of a word is its draw order
    while len(words) < n:
        length = int(rng.integers(1, 13))
        word = "".join(rng.choice(letters, length))
        if rng.random() < 0.02:
            word += ACCENTED[int(rng.integers(len(ACCENTED)))]
        words[word] = None
    return list(words)


def sentence_pool(rng: np.random.Generator, words: list[str], n: int) -> list[str]:
    """``n`` sentences of 4 to 30 Zipf-distributed words."""
    ranks = np.minimum(rng.zipf(1.2, size=n * 30) - 1, len(words) - 1)
    out, k = [], 0
    for _ in range(n):
        length = int(rng.integers(4, 31))
        picked = [words[int(r)] for r in ranks[k : k + length]]
        k += length
        out.append(" ".join(picked).capitalize() + rng.choice([". ", "? ", "! ", ".\n\n"]))
    return out


def documents(rng: np.random.Generator, pool: list[str]) -> Iterator[str]:
    """An endless stream of documents: log-normal numbers of pooled sentences."""
    while True:
        count = int(np.clip(rng.lognormal(3.3, 1.0), 1, 1200))
        picks = rng.integers(0, len(pool), size=count)
        yield "".join(pool[int(i)] for i in picks)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out", type=Path)
    p.add_argument("--gb", type=float, default=2.0, help="total size of the text (UTF-8 bytes), GB (1e9)")
    p.add_argument("--part-mb", type=float, default=128.0, help="size of one JSONL part, MB")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    rng = np.random.default_rng(args.seed)
    pool = sentence_pool(rng, word_bank(rng, 20_000), 200_000)
    args.out.mkdir(parents=True, exist_ok=True)
    total, part, docs = 0, 0, 0
    target, part_bytes = int(args.gb * 1e9), int(args.part_mb * 1e6)
    stream = documents(rng, pool)
    while total < target:
        written = 0
        with open(args.out / f"part-{part:05d}.jsonl", "w", encoding="utf-8") as f:
            while written < part_bytes and total < target:
                text = next(stream)
                size = len(text.encode("utf-8"))
                f.write(json.dumps({"text": text}, ensure_ascii=False) + "\n")
                written, total, docs = written + size, total + size, docs + 1
        part += 1
        print(f"\r{total / 1e9:.2f} GB, {docs:,} documents, {part} parts", end="", flush=True)
    print()


if __name__ == "__main__":
    main()
