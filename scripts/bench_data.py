"""Benchmark the data pipeline on a corpus made by ``scripts/make_corpus.py``.

    python scripts/make_corpus.py /tmp/corpus --gb 2
    nice python scripts/bench_data.py /tmp/corpus --cache /tmp/bench_cache [--num-proc 2] [--bpe 8000]

Measures, in this order and each phase once:

* ``load``: ``datasets`` turning the JSONL parts into Arrow (its own cache), dropping empty
  documents and splitting train/val by document;
* ``tokenise``: :func:`~moetrain.data.packing.build_token_streams` into sharded token files
  (tokens/s, documents/s);
* peak memory while doing so: the largest anonymous (heap) memory of this process, and of it
  plus its forked tokenisation workers (proportional set size, so pages a worker shares with
  its parent count once), sampled every 50 ms; and the kernel's peak RSS (``VmHWM``), which
  also counts the pages of the memory-mapped Arrow and token files read so far (the page
  cache, reclaimable);
* ``loader``: global batches/s of the trainer's loader over the sharded cache;
* ``step``: optimizer steps/s of the default model (``model=tiny``, default MoE) on the same
  global batch, fp32 on this machine's CPU: the rate the loader has to keep up with.

``--bpe N`` first trains an N-token byte-level BPE on the first part (with ``tokenizers``,
nothing downloaded) and tokenises with it instead of the byte tokenizer. Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import threading
import time
from pathlib import Path
from typing import Any

import torch

from moetrain.config import DataConfig, ModelConfig, MoEConfig
from moetrain.data import GlobalBatchLoader, build_tokenizer, load_documents, prepare_data
from moetrain.data.packing import build_token_streams
from moetrain.model.transformer import build_model


def _status_kb(pid: int, field: str, name: str = "status") -> int:
    """A ``kB`` field of ``/proc/<pid>/<name>`` (0 when the process is gone)."""
    try:
        for line in Path(f"/proc/{pid}/{name}").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def _children(pid: int) -> list[int]:
    out = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            out += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            continue
    return out


class MemorySampler(threading.Thread):
    """Peak anonymous memory (``Pss_Anon``) of this process, and of it plus its children, every 50 ms."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.stop = threading.Event()
        self.peak_main = self.peak_tree = 0

    def run(self) -> None:
        me = os.getpid()
        while not self.stop.is_set():
            main = _status_kb(me, "Pss_Anon", "smaps_rollup")
            tree = main + sum(_status_kb(c, "Pss_Anon", "smaps_rollup") for c in _children(me))
            self.peak_main, self.peak_tree = max(self.peak_main, main), max(self.peak_tree, tree)
            time.sleep(0.05)


def train_bpe(corpus: Path, vocab: int, out: Path) -> str:
    """Train a byte-level BPE on the first part of ``corpus``; returns a tokenizer directory."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    first = sorted(corpus.glob("*.jsonl"))[0]
    sample = out / "sample.txt"
    out.mkdir(parents=True, exist_ok=True)
    with open(first, encoding="utf-8") as f, open(sample, "w", encoding="utf-8") as g:
        for line, _ in zip(f, range(3000)):
            g.write(json.loads(line)["text"] + "\n")
    tok = ByteLevelBPETokenizer()
    tok.train([str(sample)], vocab_size=vocab, special_tokens=["<|endoftext|>"])
    PreTrainedTokenizerFast(tokenizer_object=tok._tokenizer, eos_token="<|endoftext|>").save_pretrained(out)
    return str(out)


def loader_rate(cfg: DataConfig, tokenizer: Any, global_batch: int, seconds: float = 5.0) -> float:
    """Global batches/s of the trainer's loader over the cached shards."""
    loader = GlobalBatchLoader(prepare_data(cfg, tokenizer).train, global_batch, cfg.seed)
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        loader.next_batch()
        n += 1
    return n / (time.perf_counter() - t0)


def step_rate(vocab: int, seq_len: int, global_batch: int, steps: int = 2) -> float:
    """Optimizer steps/s of the default model on one global batch (fp32, CPU, after one warm-up step)."""
    model = build_model(ModelConfig(), MoEConfig(), -(-vocab // 64) * 64, seq_len, seed=0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    batch = torch.randint(0, vocab, (global_batch, seq_len + 1))
    for i in range(steps + 1):
        if i == 1:
            t0 = time.perf_counter()
        out = model(batch[:, :-1])
        loss = torch.nn.functional.cross_entropy(out.logits.flatten(0, 1), batch[:, 1:].flatten()) + out.aux_loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    return steps / (time.perf_counter() - t0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("corpus", type=Path, help="a folder of *.jsonl parts (scripts/make_corpus.py)")
    p.add_argument("--cache", type=Path, required=True, help="data.cache_dir for the run (deleted by hand)")
    p.add_argument("--num-proc", type=int, default=0, help="data.num_proc (0 = one per core for big corpora)")
    p.add_argument("--shard-tokens", type=int, default=2**26)
    p.add_argument("--bpe", type=int, default=0, help="train a byte-level BPE of this vocabulary first")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--global-batch", type=int, default=16)
    args = p.parse_args()

    name = train_bpe(args.corpus, args.bpe, args.cache / "bpe") if args.bpe else "byte"
    cfg = DataConfig(
        source="files",
        paths=[str(args.corpus / "*.jsonl")],
        tokenizer=name,
        seq_len=args.seq_len,
        cache_dir=str(args.cache),
        num_proc=args.num_proc,
        shard_tokens=args.shard_tokens,
    )
    tokenizer = build_tokenizer(name)
    sampler = MemorySampler()
    sampler.start()
    t0 = time.perf_counter()
    load_documents(cfg)
    load_s = time.perf_counter() - t0
    text_bytes = sum(f.stat().st_size for f in args.corpus.glob("*.jsonl"))
    t0 = time.perf_counter()
    directory = build_token_streams(cfg, tokenizer)
    tokenise_s = time.perf_counter() - t0
    sampler.stop.set()
    sampler.join()
    meta = json.loads((directory / "meta.json").read_text())
    tokens = meta["train_tokens"] + meta["val_tokens"]
    documents = meta["train_documents"] + meta["val_documents"]
    result = {
        "corpus_gb": round(text_bytes / 1e9, 3),
        "documents": documents,
        "tokens": tokens,
        "tokenizer": "byte" if not args.bpe else f"bpe{args.bpe}",
        "num_proc": args.num_proc or os.cpu_count(),
        "shards": len(list((directory / "train").glob("shard_*.json"))),
        "load_s": round(load_s, 1),
        "tokenise_s": round(tokenise_s, 1),
        "tokens_per_s": round(tokens / tokenise_s),
        "mb_text_per_s": round(text_bytes / 1e6 / tokenise_s, 1),
        "peak_anon_main_mb": round(sampler.peak_main / 1024),
        "peak_anon_with_workers_mb": round(sampler.peak_tree / 1024),
        "vm_hwm_mb": round(_status_kb(os.getpid(), "VmHWM") / 1024),
        "loader_batches_per_s": round(loader_rate(cfg, tokenizer, args.global_batch), 1),
        "train_steps_per_s": round(step_rate(tokenizer.vocab_size, args.seq_len, args.global_batch), 2),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
