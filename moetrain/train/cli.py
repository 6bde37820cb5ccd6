"""``moetrain-train`` (= ``python -m moetrain.train``): Hydra composes, dataclasses validate, the Trainer runs.

Hydra only composes YAML values onto the :class:`~moetrain.config.TrainConfig`
schema; the config is converted once here (``OmegaConf.to_object``) and
validated before any data or model is built. The run directory is rank 0's
(Hydra's output dir unless ``run_dir`` is set), broadcast to every rank.
"""

from __future__ import annotations

import sys
from pathlib import Path

import hydra
from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from moetrain.config import ConfigError, TrainConfig, to_dict, validate
from moetrain.data.corpus import DataError


def config_dir() -> str:
    """The composed config groups: the installed ``moetrain.configs`` package (repo ``configs/``)."""
    from importlib import resources

    return str(resources.files("moetrain.configs"))


ConfigStore.instance().store(name="train_schema", node=TrainConfig)


def save_resolved_config(cfg: TrainConfig, run_dir: Path) -> None:
    """Write ``config.yaml`` atomically (temp file + rename)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    tmp = run_dir / ".config.yaml.tmp"
    tmp.write_text(OmegaConf.to_yaml(OmegaConf.create(to_dict(cfg))))
    tmp.replace(run_dir / "config.yaml")


def run(cfg: TrainConfig, run_dir: str | Path | None = None) -> dict:
    """Train with a validated config (the Python API; no Hydra needed)."""
    import os

    from moetrain.parallel.context import init_parallel
    from moetrain.train.trainer import Trainer

    world = int(os.environ.get("WORLD_SIZE", "1"))
    validate(cfg, world_size=world)
    pc = init_parallel(cfg.parallel, cfg.trainer.device)
    try:
        chosen = run_dir or cfg.run_dir or f"runs/{__import__('time').strftime('%Y%m%d-%H%M%S')}"
        run_path = Path(str(pc.broadcast_object(str(chosen))))
        if pc.is_main:
            save_resolved_config(cfg, run_path)
        return Trainer(cfg, run_path, pc).fit()
    finally:
        pc.close()


def _hydra_entry(dcfg: DictConfig) -> None:
    try:
        cfg = OmegaConf.to_object(dcfg)
        assert isinstance(cfg, TrainConfig)
        run_dir = cfg.run_dir or HydraConfig.get().runtime.output_dir
        run(cfg, run_dir)
    except ConfigError as e:
        print(f"moetrain: config error: {e}", file=sys.stderr)
        sys.exit(2)
    except DataError as e:
        print(f"moetrain: data error: {e}", file=sys.stderr)
        sys.exit(2)


def main() -> None:
    hydra.main(version_base="1.3", config_path=config_dir(), config_name="train")(_hydra_entry)()


if __name__ == "__main__":
    main()
