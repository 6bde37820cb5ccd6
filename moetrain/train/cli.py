"""``moetrain-train`` (= ``python -m moetrain.train``): Hydra composes, dataclasses validate, the Trainer runs.

Hydra only composes YAML values onto the :class:`~moetrain.config.TrainConfig`
schema; the config is converted once here (``OmegaConf.to_object``) and
validated before any data or model is built. The run directory is rank 0's
(Hydra's output dir unless ``run_dir`` is set), broadcast to every rank.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Any

import hydra
from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from moetrain.config import ConfigError, TrainConfig, to_dict, validate
from moetrain.data.corpus import DataError
from moetrain.launch.slurm import export_slurm_env
from moetrain.launch.torchrun import register as register_torchrun_launcher
from moetrain.train.checkpoint import CheckpointError


def config_dir() -> str:
    """The Hydra config groups: the installed ``moetrain.configs`` package data, or, in a
    source checkout installed in editable mode, the repository's ``configs/``."""
    from importlib import resources
    from importlib.util import find_spec

    if find_spec("moetrain.configs") is not None:
        return str(resources.files("moetrain.configs"))
    return str(Path(__file__).resolve().parents[2] / "configs")


ConfigStore.instance().store(name="train_schema", node=TrainConfig)
register_torchrun_launcher()  # hydra/launcher=torchrun (the class itself lives in hydra_plugins/)


def save_resolved_config(cfg: TrainConfig, run_dir: Path) -> None:
    """Write ``config.yaml`` atomically (temp file + rename)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    tmp = run_dir / ".config.yaml.tmp"
    tmp.write_text(OmegaConf.to_yaml(OmegaConf.create(to_dict(cfg))))
    tmp.replace(run_dir / "config.yaml")


def write_run_summary(run_dir: Path, final: dict) -> None:
    """``summary.json``: the run finished, with its last metrics (sweep summaries and resumed
    sweeps read it; its presence marks a completed run). Written atomically."""
    import json

    scalars = {k: v for k, v in final.items() if isinstance(v, (int, float))}
    tmp = run_dir / ".summary.json.tmp"
    tmp.write_text(json.dumps({"status": "completed", "metrics": scalars}, indent=1))
    tmp.replace(run_dir / "summary.json")


def remove_stray_run_dir(own: Path, agreed: Path) -> bool:
    """Delete a non-zero rank's own Hydra output dir when it is not the agreed (rank 0's) one.

    Under ``torchrun`` every rank's Hydra creates ``hydra.run.dir`` (``runs/<time>``)
    before any code runs; ranks starting in different seconds get different
    dirs. Only a dir holding nothing but Hydra's own files (``.hydra/``, ``*.log``)
    is removed, so a real run dir is never touched. Returns whether it removed it.
    """
    import shutil

    if not own.is_dir() or own.resolve() == agreed.resolve():
        return False
    if any(p.name != ".hydra" and p.suffix != ".log" for p in own.iterdir()):
        return False
    shutil.rmtree(own, ignore_errors=True)
    return True


def make_trainer(cfg: TrainConfig, run_dir: Path, pc: object) -> Any:
    """The Trainer of ``engine.name``: moetrain's own loop, or the same loop through DeepSpeed."""
    if cfg.engine.name == "deepspeed":
        from moetrain.train.ds_engine import DeepSpeedTrainer

        return DeepSpeedTrainer(cfg, run_dir, pc)  # type: ignore[arg-type]
    from moetrain.train.trainer import Trainer

    return Trainer(cfg, run_dir, pc)  # type: ignore[arg-type]


def strip_launcher_args(argv: list[str]) -> list[str]:
    """Drop ``--local_rank=N`` / ``--local_rank N``, which the ``deepspeed`` launcher appends (Hydra would refuse
    it); the rank is in ``LOCAL_RANK`` already, set from the flag when it is not."""
    out: list[str] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg.startswith("--local_rank=") or arg.startswith("--local-rank="):
            os.environ.setdefault("LOCAL_RANK", arg.split("=", 1)[1])
        elif arg in ("--local_rank", "--local-rank") and i + 1 < len(argv):
            os.environ.setdefault("LOCAL_RANK", argv[i + 1])
            i += 1
        else:
            out.append(arg)
        i += 1
    return out


def run(cfg: TrainConfig, run_dir: str | Path | None = None) -> dict:
    """Train with a validated config (the Python API; no Hydra needed)."""
    from moetrain.parallel.context import init_parallel

    export_slurm_env()  # srun / submitit tasks without torchrun: ranks from SLURM's variables
    world = int(os.environ.get("WORLD_SIZE", "1"))
    validate(cfg, world_size=world)
    pc = init_parallel(cfg.parallel, cfg.trainer.device)
    try:
        chosen = run_dir or cfg.run_dir or f"runs/{time.strftime('%Y%m%d-%H%M%S')}"
        run_path = Path(str(pc.broadcast_object(str(chosen))))
        if not pc.is_main and run_dir is not None:
            remove_stray_run_dir(Path(run_dir), run_path)
        if pc.is_main:
            save_resolved_config(cfg, run_path)
        trainer = make_trainer(cfg, run_path, pc)
        try:
            final = trainer.fit()
        finally:
            trainer.close()
        if pc.is_main:
            write_run_summary(run_path, final)
        return final
    finally:
        pc.close()


def _hydra_entry(dcfg: DictConfig) -> None:
    try:
        cfg = OmegaConf.to_object(dcfg)
        assert isinstance(cfg, TrainConfig)
        run_dir = cfg.run_dir or HydraConfig.get().runtime.output_dir
        run(cfg, run_dir)
    except (ConfigError, DataError, CheckpointError) as e:
        if os.environ.get("RANK", "0") == "0":  # every rank validates; one says why
            kind = {ConfigError: "config", DataError: "data"}.get(type(e), "checkpoint")
            print(f"moetrain: {kind} error: {e}", file=sys.stderr)
        sys.exit(2)


def main() -> None:
    sys.argv = strip_launcher_args(sys.argv)
    hydra.main(version_base="1.3", config_path=config_dir(), config_name="train")(_hydra_entry)()


if __name__ == "__main__":
    main()
