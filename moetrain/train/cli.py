"""``moetrain-train`` (= ``python -m moetrain.train``): Hydra composes, dataclasses validate, the Trainer runs.

Hydra only composes YAML values onto the :class:`~moetrain.config.TrainConfig`
schema; the config is converted once here (``OmegaConf.to_object``) and
validated before any data or model is built. The run directory is rank 0's
(Hydra's output dir unless ``run_dir`` is set), broadcast to every rank.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time
from pathlib import Path
from typing import Any

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from moetrain.config import ConfigError, TrainConfig, micro_batch_for, to_dict, validate, with_micro_batch
from moetrain.config.docs import config_dir, register_schema
from moetrain.errors import USER_ERROR_EXIT_CODE, is_failure, report, user_error
from moetrain.launch.jobs import check_known_keys, check_override_keys
from moetrain.launch.slurm import export_slurm_env
from moetrain.launch.torchrun import register as register_torchrun_launcher
from moetrain.train.checkpoint import CheckpointError
from moetrain.train.command import group_options, resolve_run_args, say_done, say_how_to_continue
from moetrain.train.console import config_tree, say_config
from moetrain.train.guards import NonFiniteError
from moetrain.train.rundir import RunDirError, RunDirLock, chosen_run_dir, preflight

NONFINITE_EXIT_CODE = 3
"""Exit status of a run stopped by a non-finite loss or gradient norm (user errors exit 2)."""
STOP_EXIT_CODES = (130, 143)
"""A run stopped by SIGINT / SIGTERM (128 + signal), with its checkpoint: it prints the command that continues."""
USER_ARGS: list[str] | None = None
"""The overrides as the user typed them (set by :func:`main`), for the command that continues a stopped run."""
FAILURE: list[str] = []
"""The one-line causes of this process's failed runs (a sweep job's ``failed.json`` keeps its own)."""
SWEEP_SUMMARY_CALLBACK = "moetrain.launch.sweep.SweepSummary"
"""The Hydra callback that writes a sweep's summary when it ends and exits 1 when a job failed."""


register_schema()
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


def check_device(device: str, backend: str = "auto") -> None:
    """``trainer.device=cuda`` (or ``parallel.backend=nccl``) on a machine without a visible GPU is one config
    error, before any work."""
    import torch

    if torch.cuda.is_available():
        return
    if device == "cuda":
        raise ConfigError("trainer.device='cuda': no CUDA GPU is visible here (use trainer.device=auto or cpu)")
    if backend == "nccl":
        raise ConfigError("parallel.backend='nccl': needs CUDA GPUs, none is visible here (use auto or gloo)")


def inactive_options(cfg: TrainConfig, world_size: int) -> list[str]:
    """Options set to something that has no effect in this setting, each with the reason."""
    from moetrain.train.deepspeed.config import inactive_engine_options

    out = []
    moe, ep = cfg.moe, cfg.parallel.ep
    if moe.max_recv_factor is not None and ep == 1:
        out.append(f"moe.max_recv_factor={moe.max_recv_factor} only acts under expert parallelism (parallel.ep > 1)")
    if moe.recv_overflow != "drop" and moe.max_recv_factor is None:
        out.append(f"moe.recv_overflow={moe.recv_overflow} only acts with moe.max_recv_factor set")
    micro = cfg.trainer.global_batch_size // max(micro_batch_for(cfg.trainer, world_size) * world_size, 1)
    if moe.balance.scope == "global" and world_size == 1 and micro == 1:
        out.append("moe.balance.scope=global equals micro_batch with one rank and one micro-batch per step")
    out += inactive_engine_options(cfg)
    if cfg.trainer.nonfinite == "stop" and cfg.trainer.nonfinite_max_skips != type(cfg.trainer)().nonfinite_max_skips:
        out.append("trainer.nonfinite_max_skips only acts with trainer.nonfinite=skip")
    if not cfg.checkpoint.enabled and cfg.checkpoint.async_save:
        out.append("checkpoint.async_save has no effect with checkpoint.enabled=false")
    out += _parallel_notes(cfg, world_size)
    return out


def _parallel_notes(cfg: TrainConfig, world_size: int) -> list[str]:
    """The ``parallel.*`` options without effect: sharding needs several ranks."""
    out = []
    p, defaults = cfg.parallel, type(cfg.parallel)()
    if p.fsdp and world_size == 1:
        out.append("parallel.fsdp=true only acts with several ranks (one process holds the whole model)")
    if p.fsdp_keep_gathered != defaults.fsdp_keep_gathered and not p.fsdp:
        out.append("parallel.fsdp_keep_gathered only acts with parallel.fsdp=true")
    if not p.overlap_shared_experts and (p.ep == 1 or cfg.moe.num_shared_experts == 0):
        out.append("parallel.overlap_shared_experts only acts with shared experts under parallel.ep > 1")
    return out


def warn_inactive(cfg: TrainConfig, world_size: int) -> None:
    """Say (rank 0, one line each) which options do nothing in this setting."""
    if os.environ.get("RANK", "0") != "0":
        return
    for line in inactive_options(cfg, world_size):
        print(f"moetrain: note: {line}", file=sys.stderr)


def make_trainer(cfg: TrainConfig, run_dir: Path, pc: object) -> Any:
    """The Trainer; its train module is ``engine.name``'s (moetrain's own, or DeepSpeed's)."""
    from moetrain.train.trainer import Trainer

    return Trainer(cfg, run_dir, pc)  # type: ignore[arg-type]


def validate_run(cfg: TrainConfig, world_size: int) -> None:
    """Every check of a run's config before any work: the schema's rules, then the engine's (DeepSpeed's
    merged JSON); one :class:`ConfigError` line."""
    from moetrain.train.deepspeed.config import validate_deepspeed

    validate(cfg, world_size=world_size)
    validate_deepspeed(cfg, world_size)


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
    cfg = with_micro_batch(cfg, world)  # micro_batch_size=None: each rank's share, saved so in config.yaml
    validate_run(cfg, world)
    check_device(cfg.trainer.device, cfg.parallel.backend)
    warn_inactive(cfg, world)
    chosen = run_dir or chosen_run_dir(cfg.run_dir, cfg.run_name, cfg.trainer.resume)
    if cfg.trainer.resume == "latest":  # the run it names is chosen: continue it from its newest checkpoint
        cfg = dataclasses.replace(cfg, trainer=dataclasses.replace(cfg.trainer, resume="auto"))
    pc = init_parallel(cfg.parallel, cfg.trainer.device)
    try:
        chosen = chosen or f"runs/{time.strftime('%Y%m%d-%H%M%S')}"
        run_path = Path(str(pc.broadcast_object(str(chosen))))
        if not pc.is_main and run_dir is not None:
            remove_stray_run_dir(Path(run_dir), run_path)
        lock = agreed_preflight(cfg, run_path, pc)  # before anything in the run dir is written
        try:
            if pc.is_main:
                save_resolved_config(cfg, run_path)
                say_config(config_tree(to_dict(cfg), to_dict(TrainConfig()), run_path), run_path)
            trainer = make_trainer(cfg, run_path, pc)
            try:
                final = trainer.fit()
            except SystemExit as e:
                if pc.is_main and e.code in STOP_EXIT_CODES:
                    say_how_to_continue(run_path, USER_ARGS)
                raise
            finally:
                trainer.close()
            if pc.is_main:
                write_run_summary(run_path, final)
                say_done(run_path, final, cfg.trainer.max_steps, USER_ARGS)
            return final
        finally:
            if lock is not None:
                lock.release()
    finally:
        pc.close()


def agreed_preflight(cfg: TrainConfig, run_path: Path, pc: Any) -> RunDirLock | None:
    """Rank 0 locks the run dir and checks the resume (:func:`moetrain.train.rundir.preflight`); every rank
    raises the same one-line error if that fails. Returns rank 0's lock (``None`` on the other ranks)."""
    lock, failure, error = None, None, None
    if pc.is_main:
        try:
            lock = preflight(cfg, run_path)
        except Exception as e:  # every rank must hear of it (an unwritable disk included)
            failure, error = (type(e).__name__, str(e)), e
    failure = pc.broadcast_object(failure)
    if error is not None:
        raise error
    if failure:
        kind, message = failure
        raise (CheckpointError if kind == "CheckpointError" else RunDirError)(message)
    return lock


def _hydra_entry(dcfg: DictConfig) -> None:
    """One run: its exit status, or, as a job of a Hydra sweep, a failure recorded in the job's directory
    (``failed.json``, read by the sweep summary) so that the sweep goes on with the other jobs."""
    sweeping = HydraConfig.get().mode == RunMode.MULTIRUN
    job_dir = Path(HydraConfig.get().runtime.output_dir)
    if sweeping:
        (job_dir / "failed.json").unlink(missing_ok=True)  # a relaunched sweep: this attempt decides
    code = _run_reported(dcfg)
    if code and sweeping:
        write_failed_job(job_dir, code, FAILURE[-1] if FAILURE else None)
    elif code:
        sys.exit(code)


def write_failed_job(job_dir: Path, code: int, cause: str | None = None) -> None:
    """``JOB_DIR/failed.json``: the job's exit status and its one-line cause, for
    :func:`moetrain.launch.sweep.read_job`."""
    import json

    job_dir.mkdir(parents=True, exist_ok=True)
    (job_dir / "failed.json").write_text(json.dumps({"exit_code": code, "cause": cause}))


def _run_reported(dcfg: DictConfig) -> int:
    """Run; a non-finite stop (exit 3) or a user's mistake (exit 2) is one line, a bug re-raises."""
    try:
        check_known_keys(dcfg)
        cfg = OmegaConf.to_object(dcfg)
        assert isinstance(cfg, TrainConfig)
        run_dir = cfg.run_dir or HydraConfig.get().runtime.output_dir
        run(cfg, run_dir)
        return 0
    except NonFiniteError as e:
        FAILURE.append(f"training stopped: {e}")
        if os.environ.get("RANK", "0") == "0":
            print(f"moetrain: training stopped: {e}", file=sys.stderr)
        return NONFINITE_EXIT_CODE
    except BaseException as e:  # DCP's CheckpointException (a full disk during a save) is a BaseException
        found = user_error(e)
        if found is None or os.environ.get("MOETRAIN_DEBUG") == "1":
            raise
        kind, message = found
        FAILURE.append(f"{kind} error: {message}")
        if os.environ.get("RANK", "0") == "0" or kind == "file":  # the ranks agree on the others; one says why
            print(f"moetrain: {kind} error: {message}", file=sys.stderr)
        return USER_ERROR_EXIT_CODE


def run_dir_override(argv: list[str]) -> str | None:
    """The ``run_dir=...`` of a single run's command line (``None`` for a sweep, or when Hydra picks it)."""
    if any(a in ("-m", "--multirun") for a in argv) or any(a.startswith("hydra.run.dir=") for a in argv):
        return None
    values = [a.split("=", 1)[1] for a in argv if a.startswith("run_dir=") or a.startswith("+run_dir=")]
    return values[-1] if values and values[-1] not in ("", "null") else None


def print_help(args: list[str]) -> int:
    """``moetrain-train [overrides] --help``: every key with its default (after the overrides) and its
    documentation, from the config dataclasses (:mod:`moetrain.config.docs`)."""
    from moetrain.config.docs import composed_defaults, help_text

    overrides = [a for a in args if not a.startswith("-") and not a.startswith("hydra")]
    try:
        cfg = composed_defaults(overrides)
    except Exception as e:  # a bad override: say it in one line, as a run would
        print(f"moetrain: config error: {' '.join(str(e).split())}", file=sys.stderr)
        return USER_ERROR_EXIT_CODE
    print(help_text(cfg), end="")
    print(group_options(config_dir()))
    return 0


def main() -> None:
    """``moetrain-train``. With ``run_dir=X`` Hydra's output dir is X too, without Hydra's own files
    (``.hydra/``, ``train.log``), so nothing is written elsewhere and nothing in X before the run's checks;
    an X that Hydra created for a run that stopped before writing anything is removed again."""
    global USER_ARGS
    argv = strip_launcher_args(sys.argv)
    if any(a in ("--help", "-h") for a in argv[1:]):
        sys.exit(print_help(argv[1:]))
    USER_ARGS = argv[1:]
    try:
        groups = {p.name for p in Path(config_dir()).iterdir() if p.is_dir()}
        check_override_keys(argv[1:], groups)  # a misspelled key: one line with the nearest known key
    except ConfigError as e:
        sys.exit(report("moetrain", e))
    argv = [argv[0], *resolve_run_args(argv[1:])]  # run_name, trainer.resume=latest: a run_dir=
    run_dir = run_dir_override(argv[1:])
    existed = run_dir is None or Path(run_dir).exists()
    if run_dir is not None:
        argv += [f"hydra.run.dir={run_dir}", "hydra.output_subdir=null", "hydra/job_logging=stdout"]
    if any(a in ("-m", "--multirun") for a in argv):  # every launcher's sweep ends with its summary
        argv.append(f"++hydra.callbacks.moetrain_sweep_summary._target_={SWEEP_SUMMARY_CALLBACK}")
    sys.argv = argv
    # Hydra's own failures (a run dir it cannot create, a bad override) reach report() as exceptions, not
    # as the stack trace Hydra prints without this.
    os.environ["HYDRA_FULL_ERROR"] = "1"
    try:
        hydra.main(version_base="1.3", config_path=config_dir(), config_name="train")(_hydra_entry)()
    except BaseException as e:
        if not is_failure(e):
            raise
        sys.exit(report("moetrain", e))
    finally:
        if not existed and run_dir is not None and Path(run_dir).is_dir() and not any(Path(run_dir).iterdir()):
            Path(run_dir).rmdir()


if __name__ == "__main__":
    main()
