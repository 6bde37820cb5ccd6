"""A sweep's jobs before and while they run: every job's config checked before any starts, a progress line per
running job, and the one-line cause of a job that failed.

The torchrun launcher (:mod:`moetrain.launch.torchrun`) composes each job's config with Hydra and passes it
to :func:`job_config_error` (the checks ``moetrain-train`` makes before a run: known keys, the schema's rules,
the batch over the job's ranks) before it starts any: a sweep with a bad job launches nothing and names it
(issue 31: four jobs started and failed on a batch size, the reason only inside their ``launcher.log``).
"""

from __future__ import annotations

import copy
import difflib
import json
import time
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf, open_dict

from moetrain.config import ConfigError, TrainConfig, config_keys, with_micro_batch
from moetrain.errors import one_line, user_error

ERROR_MARKS = ("moetrain: config error:", "moetrain: ", "Error:", "error:")
"""What a failed job's log line starts with (or contains), most telling first (:func:`failure_cause`)."""


def _flat(data: dict[str, Any], prefix: str = "") -> list[str]:
    out = []
    for key, value in data.items():
        out += _flat(value, f"{prefix}{key}.") if isinstance(value, dict) else [f"{prefix}{key}"]
    return out


def did_you_mean(key: str, known: set[str]) -> str:
    """``did you mean trainer.max_steps? `` for a near miss, else ``""``."""
    close = difflib.get_close_matches(key, sorted(known), n=1, cutoff=0.75)
    return f"did you mean {close[0]}? " if close else ""


def check_override_keys(args: list[str], groups: set[str]) -> None:
    """Refuse a command-line ``key=value`` whose key is neither a config key nor a group, before Hydra (whose
    own message, "Could not override", names no near miss)."""
    known = config_keys(TrainConfig())
    sections = {k.rsplit(".", i)[0] for k in known for i in range(1, k.count(".") + 1)}
    for arg in args:
        key, eq, _ = arg.partition("=")
        if not eq or arg.startswith(("-", "+", "~", "hydra.", "hydra/")) or key in groups:
            continue
        if key not in known and key not in sections and not any(key.startswith(f"{k}.") for k in known):
            raise ConfigError(
                f"{key}: unknown key ({did_you_mean(key, known | groups)}moetrain-train --help lists every key)"
            )


def check_known_keys(dcfg: DictConfig) -> None:
    """Refuse keys the schema does not define (also those added with ``+key=value``: Hydra lets them in), with
    the known key it most resembles (``trainer.max_step`` -> did you mean ``trainer.max_steps``?)."""
    known = config_keys(TrainConfig())
    data = OmegaConf.to_container(dcfg, resolve=False)
    assert isinstance(data, dict)
    data.pop("hydra", None)
    for key in sorted(_flat(data)):
        if key not in known and not any(key.startswith(f"{k}.") for k in known):  # list / dict values
            raise ConfigError(f"{key}: unknown key ({did_you_mean(key, known)}moetrain-train --help lists every key)")


def job_config_error(dcfg: DictConfig, world_size: int) -> str | None:
    """The one-line reason a job's composed config would stop the job before any work, or ``None``."""
    from moetrain.config import validate
    from moetrain.train.deepspeed.config import validate_deepspeed

    try:
        check_known_keys(dcfg)
        job = copy.deepcopy(dcfg)
        with open_dict(job):
            job.pop("hydra", None)
        cfg = OmegaConf.to_object(job)
        assert isinstance(cfg, TrainConfig)
        cfg = with_micro_batch(cfg, world_size)
        validate(cfg, world_size=world_size)
        validate_deepspeed(cfg, world_size)
    except Exception as e:
        found = user_error(e)
        if found is None:
            raise
        kind, message = found
        return f"{kind} error: {one_line(message)}"
    return None


def failure_cause(log: Path) -> str | None:
    """The line of a failed job's ``launcher.log`` that says why: moetrain's own one-line error, else the last
    line naming an error, else the last line."""
    if not log.is_file():
        return None
    lines = [line.strip() for line in log.read_text(errors="replace").splitlines() if line.strip()]
    for mark in ERROR_MARKS:
        found = [line for line in lines if mark in line and not line.startswith("[")]
        if found:
            return one_line(found[-1], 300)
    return one_line(lines[-1], 300) if lines else None


class JobProgress:
    """One line per running job while it trains (``#1 step 40/300 | loss 2.31 | eta 0:03:10``), at most every
    ``every`` seconds each, from the job's ``metrics.jsonl``."""

    def __init__(self, max_steps: int, every: float = 10.0) -> None:
        self.max_steps, self.every = max_steps, every
        self.started = time.monotonic()
        self.first_step: int | None = None
        self.said_step, self.said_at = -1, 0.0

    def line(self, num: int, job_dir: Path) -> str | None:
        """The next progress line of job ``num``, or ``None`` when nothing new is to be said yet."""
        now = time.monotonic()
        if now - self.said_at < self.every:
            return None
        last = last_train_record(job_dir / "metrics.jsonl")
        if last is None or last["step"] == self.said_step:
            return None
        step = last["step"]
        if self.first_step is None:
            self.first_step, self.started = step, now  # the rate from the first step seen (start-up excluded)
            eta = "?"
        else:
            rate = (now - self.started) / max(step - self.first_step, 1)
            eta = _clock(rate * (self.max_steps - step))
        self.said_step, self.said_at = step, now
        return f"#{num} step {step}/{self.max_steps} | loss {last['train/loss']:.4f} | eta {eta}"


def last_train_record(path: Path) -> dict[str, Any] | None:
    """The newest record with a train loss in a ``metrics.jsonl`` being written (a half-written last line is
    skipped)."""
    if not path.is_file():
        return None
    for raw in reversed(path.read_bytes().splitlines()[-20:]):
        try:
            record = json.loads(raw)
        except ValueError:
            continue
        if isinstance(record, dict) and isinstance(record.get("train/loss"), int | float):
            return record
    return None


def _clock(seconds: float) -> str:
    s = int(max(seconds, 0))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"
