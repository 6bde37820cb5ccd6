"""A Hydra launcher that runs every sweep job as its own ``torchrun`` job.

``moetrain-train -m hydra/launcher=torchrun hydra.launcher.nproc_per_node=2 moe=switch,deepseek_v2 optim.lr=1e-3,3e-3``
runs four jobs, each ``python -m torch.distributed.run --standalone --nproc_per_node=2 -m moetrain.train
<job overrides>``, up to ``max_parallel`` at once. Each job gets its own run directory
(``hydra.sweep.dir/hydra.sweep.subdir``, passed to every rank as ``hydra.run.dir`` and
``run_dir`` so all ranks agree), its W&B run joins the sweep's group (the sweep
directory's name unless ``logger.wandb.group`` is set), and its output goes to
``JOB_DIR/launcher.log``. A failed job is recorded and the others still run; the
sweep summary (``SWEEP_DIR/summary.md`` and ``summary.json``) is written when all
are done, a failed job a row of it, and the sweep exits 1 naming the failed jobs
(:class:`moetrain.launch.sweep.SweepSummary`). Relaunching the same sweep
(``hydra.sweep.dir=<that dir>``) skips jobs that already completed.

For jobs spanning several nodes, start the same command on every node with
``hydra.launcher.nnodes=N hydra.launcher.rdzv_endpoint=HOST:PORT`` and a fixed
``hydra.sweep.dir``; the rendezvous id is derived from the sweep directory and job number.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from hydra.core.utils import JobReturn, JobStatus, configure_log, filter_overrides, setup_globals
from hydra.plugins.launcher import Launcher
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf, open_dict

from moetrain.config import ConfigError
from moetrain.launch.jobs import JobProgress, failure_cause, job_config_error
from moetrain.launch.sweep import read_job, write_summary

log = logging.getLogger(__name__)


@dataclass
class TorchrunLauncherConf:
    """``hydra/launcher=torchrun``: how each sweep job is started."""

    _target_: str = "hydra_plugins.moetrain_launcher.torchrun_launcher.TorchrunLauncher"
    nproc_per_node: int = 1
    """Ranks per node of each job."""
    nnodes: int = 1
    """Nodes per job; > 1 needs ``rdzv_endpoint`` and the same command on every node."""
    rdzv_endpoint: str | None = None
    """HOST:PORT of the c10d rendezvous for multi-node jobs."""
    max_parallel: int = 1
    """Jobs running at once (on one node: make nproc_per_node x max_parallel fit the machine)."""
    skip_finished: bool = True
    """Skip jobs whose run directory already holds a completed ``summary.json``."""
    module: str = "moetrain.train"
    """The module each rank runs."""
    extra_torchrun_args: list[str] = field(default_factory=list)
    """More torchrun flags, e.g. ``[--max-restarts=2]``."""
    env: dict[str, str] = field(default_factory=dict)
    """Extra environment variables for every job (e.g. NCCL settings)."""


def store_conf() -> None:
    """Store ``hydra/launcher=torchrun`` in Hydra's config store (what the ``hydra_plugins`` module does on import)."""
    ConfigStore.instance().store(
        group="hydra/launcher", name="torchrun", node=TorchrunLauncherConf, provider="moetrain"
    )


def register() -> None:
    """Store ``hydra/launcher=torchrun`` and make sure Hydra knows its class, however moetrain was installed
    (called by the ``moetrain-train`` entry point before Hydra starts)."""
    store_conf()
    register_plugin_class()


def register_plugin_class() -> None:
    """Register the ``hydra_plugins`` launcher class with Hydra's plugin registry (its public
    ``Plugins.register``).

    Hydra finds plugins by walking the ``hydra_plugins`` namespace package's directories with
    ``pkgutil``. A wheel or ``pip install .`` puts ``hydra_plugins/`` in site-packages, where that
    walk finds it; the default editable install (PEP 660) maps the package through an import hook
    instead, which ``pkgutil`` cannot list, so Hydra answered ``Unknown plugin class``. Importing
    the module by name works in every install mode, so moetrain registers the class itself.
    """
    import importlib

    from hydra.core.plugins import Plugins

    module_name, _, class_name = TorchrunLauncherConf._target_.rpartition(".")
    try:
        module = importlib.import_module(module_name)
    except ImportError:  # a source tree without hydra_plugins/ on the path: hydra/launcher=torchrun is unavailable
        return
    Plugins.instance().register(getattr(module, class_name))


@dataclass
class _Job:
    num: int
    overrides: list[str]
    job_dir: Path
    config: DictConfig
    proc: subprocess.Popen | None = None
    rc: int | None = None
    skipped: bool = False
    progress: JobProgress | None = None


class TorchrunLauncherImpl(Launcher):
    """The launcher (Hydra instantiates the ``hydra_plugins`` subclass of this)."""

    def __init__(
        self,
        nproc_per_node: int = 1,
        nnodes: int = 1,
        rdzv_endpoint: str | None = None,
        max_parallel: int = 1,
        skip_finished: bool = True,
        module: str = "moetrain.train",
        extra_torchrun_args: Sequence[str] = (),
        env: dict[str, str] | None = None,
    ) -> None:
        if nproc_per_node < 1 or nnodes < 1 or max_parallel < 1:
            raise ValueError("hydra.launcher: nproc_per_node, nnodes and max_parallel must be >= 1")
        if nnodes > 1 and not rdzv_endpoint:
            raise ValueError("hydra.launcher.rdzv_endpoint: required when hydra.launcher.nnodes > 1")
        self.nproc_per_node, self.nnodes, self.rdzv_endpoint = nproc_per_node, nnodes, rdzv_endpoint
        self.max_parallel, self.skip_finished, self.module = max_parallel, skip_finished, module
        self.extra_torchrun_args = list(extra_torchrun_args)
        self.env = dict(env or {})
        self.config: DictConfig | None = None
        self.hydra_context: HydraContext | None = None

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.config, self.hydra_context = config, hydra_context

    def command(self, job: _Job, sweep_dir: Path, group: str) -> list[str]:
        """The torchrun command line of one job."""
        if self.nnodes == 1:
            rdzv = ["--standalone"]
        else:
            rdzv = [
                f"--nnodes={self.nnodes}",
                "--rdzv-backend=c10d",
                f"--rdzv-endpoint={self.rdzv_endpoint}",
                f"--rdzv-id={sweep_dir.name}-{job.num}",
            ]
        extra = [f"hydra.run.dir={job.job_dir}", f"run_dir={job.job_dir}"]
        keys = {o.split("=", 1)[0].lstrip("+~") for o in job.overrides}
        if "logger.wandb.group" not in keys:
            extra.append(f"logger.wandb.group={group}")
        if "logger.wandb.name" not in keys:
            extra.append(f"logger.wandb.name={group}-{job.num}")
        return [
            sys.executable,
            "-m",
            "torch.distributed.run",
            *rdzv,
            f"--nproc_per_node={self.nproc_per_node}",
            *self.extra_torchrun_args,
            "-m",
            self.module,
            *job.overrides,
            *extra,
        ]

    def _start(self, job: _Job, sweep_dir: Path, group: str) -> None:
        job.job_dir.mkdir(parents=True, exist_ok=True)
        (job.job_dir / "failed.json").unlink(missing_ok=True)  # a relaunched sweep: this attempt decides
        (job.job_dir / "job.json").write_text(json.dumps({"num": job.num, "overrides": job.overrides}))
        cmd = self.command(job, sweep_dir, group)
        log.info(f"\t#{job.num} : {' '.join(filter_overrides(job.overrides))} (log: {job.job_dir / 'launcher.log'})")
        job.progress = JobProgress(int(OmegaConf.select(job.config, "trainer.max_steps", default=0) or 0))
        env = {**os.environ, **self.env}
        with open(job.job_dir / "launcher.log", "w") as out:
            out.write(" ".join(cmd) + "\n")
            out.flush()
            job.proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        setup_globals()
        assert self.config is not None and self.hydra_context is not None
        configure_log(self.config.hydra.hydra_logging, self.config.hydra.verbose)
        sweep_dir = Path(str(self.config.hydra.sweep.dir)).resolve()
        group = OmegaConf.select(self.config, "logger.wandb.group") or sweep_dir.name

        jobs: list[_Job] = []
        for i, overrides in enumerate(job_overrides):
            num = initial_job_idx + i
            cfg = self.hydra_context.config_loader.load_sweep_config(self.config, list(overrides))
            with open_dict(cfg):
                cfg.hydra.job.id = str(num)
                cfg.hydra.job.num = num
            HydraConfig.instance().set_config(cfg)
            job = _Job(num, list(overrides), sweep_dir / str(cfg.hydra.sweep.subdir), cfg)
            done = read_job(job.job_dir) if (job.job_dir / "job.json").exists() else None
            if self.skip_finished and done and done["status"] == "completed" and done["overrides"] == job.overrides:
                job.skipped, job.rc = True, 0
                log.info(f"\t#{num} : already completed in {job.job_dir}, skipped")
            jobs.append(job)

        self.check_jobs(jobs)  # every job's config, before any starts
        sweep_dir.mkdir(parents=True, exist_ok=True)
        log.info(f"Launching {sum(not j.skipped for j in jobs)} torchrun jobs ({self.nproc_per_node} ranks each)")
        self.run_jobs([j for j in jobs if not j.skipped], sweep_dir, group)
        table = write_summary(sweep_dir)
        log.info(f"Sweep summary ({sweep_dir / 'summary.md'}):\n{table}")
        return [self._job_return(job) for job in jobs]

    def check_jobs(self, jobs: list[_Job]) -> None:
        """Every job's composed config checked as its run would check it (:func:`job_config_error`) before any
        job starts: one line per bad job, then a :class:`ConfigError` and nothing launched."""
        world = self.nproc_per_node * self.nnodes
        bad = [(j, e) for j in jobs if not j.skipped and (e := job_config_error(j.config, world))]
        for job, error in bad:
            print(f"moetrain: sweep job #{job.num} ({' '.join(job.overrides)}): {error}", file=sys.stderr)
        if bad:
            raise ConfigError(f"{len(bad)} of {len(jobs)} sweep jobs would fail (above); nothing was launched")

    def run_jobs(self, pending: list[_Job], sweep_dir: Path, group: str) -> None:
        """Run the jobs, ``max_parallel`` at once; a progress line per running job, one line per ended job
        (a failed one with its cause, also kept in its ``failed.json``)."""
        running: list[_Job] = []
        while pending or running:
            while pending and len(running) < self.max_parallel:
                job = pending.pop(0)
                self._start(job, sweep_dir, group)
                running.append(job)
            time.sleep(0.2)
            for job in list(running):
                assert job.proc is not None and job.progress is not None
                if job.proc.poll() is None:
                    if line := job.progress.line(job.num, job.job_dir):
                        log.info(f"\t{line}")
                    continue
                job.rc = job.proc.returncode
                running.remove(job)
                if job.rc == 0:
                    log.info(f"\t#{job.num} : completed")
                    continue
                cause = failure_cause(job.job_dir / "launcher.log")
                log.info(f"\t#{job.num} : FAILED (exit {job.rc}): {cause or 'no output'}")
                (job.job_dir / "failed.json").write_text(json.dumps({"exit_code": job.rc, "cause": cause}))

    def _job_return(self, job: _Job) -> JobReturn:
        """Every job is reported to Hydra as done, a failed one too (its row says ``failed (exit N)``): a failed
        ``JobReturn`` would make Hydra re-raise it with a stack trace and skip the sweep's end, where
        :class:`moetrain.launch.sweep.SweepSummary` names the failed jobs and sets the exit status."""
        ret = JobReturn(overrides=job.overrides, cfg=job.config, working_dir=str(job.job_dir), task_name="train")
        ret.status = JobStatus.COMPLETED
        ret.return_value = read_job(job.job_dir)
        return ret
