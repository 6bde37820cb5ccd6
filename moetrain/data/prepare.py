"""``moetrain-prepare-data``: tokenise a run's corpus (or mixture) into the shared token cache ahead of a job.

Takes the same Hydra overrides as ``moetrain-train`` (only ``data.*`` matters), e.g.::

    moetrain-prepare-data data=files 'data.paths=[corpus/*.jsonl]' data.num_proc=16

and builds ``<cache>/tokens/<key>/{train,val}/`` shards that every later run with
the same corpus, tokenizer and split reuses. Interrupt it at any time: rerunning it
resumes after the last complete shard. A cache that exists already is verified whole first (every shard's
size, SHA-256 and ids, the index against the shards and the build's meta); whatever is damaged is said,
deleted and rebuilt.
"""

from __future__ import annotations

import json
import sys
import time

from moetrain.config import DataConfig, TrainConfig, validate
from moetrain.errors import guarded_main


def compose_data_config(overrides: list[str]) -> DataConfig:
    """The ``data`` section of ``moetrain-train``'s config with ``overrides`` applied (validated)."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from moetrain.train.cli import check_known_keys, config_dir

    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        dcfg = compose(config_name="train", overrides=overrides)
    check_known_keys(dcfg)
    cfg = OmegaConf.to_object(dcfg)
    assert isinstance(cfg, TrainConfig)
    return validate(cfg).data


def say(line: str) -> None:
    print(f"moetrain-prepare-data: {line}", flush=True)


def prepare(cfg: DataConfig, progress: bool = True) -> list[dict]:
    """Build (or find and verify) the token shards of every source of ``cfg``; one summary dict per source."""
    from moetrain.data.loader import source_configs
    from moetrain.data.packing import build_token_streams
    from moetrain.data.tokenizer import build_tokenizer

    tokenizer = build_tokenizer(cfg.tokenizer)
    subs = source_configs(cfg) if cfg.sources else {cfg.source: cfg}
    out = []
    for name, sub in subs.items():
        t0 = time.perf_counter()
        directory = build_token_streams(sub, tokenizer, progress=progress, verify=say)
        meta = json.loads((directory / "meta.json").read_text())
        out.append({"name": name, "directory": str(directory), "seconds": time.perf_counter() - t0, **meta})
    return out


def _main(argv: list[str]) -> None:
    if any(a in ("-h", "--help") for a in argv):
        print(__doc__)
        return
    for summary in prepare(compose_data_config(argv)):
        print(
            f"{summary['name']}: {summary['train_tokens']:,} train / {summary['val_tokens']:,} val tokens "
            f"({summary['train_documents']:,} / {summary['val_documents']:,} documents) in {summary['directory']} "
            f"({summary['seconds']:.1f} s)"
        )


def main() -> None:
    """Console entry point; a user's mistake is one line and exit status 2."""
    guarded_main("moetrain-prepare-data", lambda: _main(sys.argv[1:]))


if __name__ == "__main__":
    main()
