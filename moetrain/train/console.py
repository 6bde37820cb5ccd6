"""Human-readable run output through :mod:`logging`: the same lines on rank 0's console and in ``train.log``.

:func:`setup_run_logging` gives the ``moetrain`` logger two handlers on rank 0:
stdout (flushed after every line, so a redirected run under SLURM or ``nohup``
shows its progress as it happens) and ``RUN_DIR/train.log`` (appended across
resumes). Other ranks log nothing. :class:`LogSink` turns logged metrics into
step and evaluation lines, each with the elapsed time and the ETA; on a terminal
(stderr a TTY of usable width, ``trainer.progress``) a tqdm bar stays below them.
"""

from __future__ import annotations

import logging
import shutil
import sys
import time
from pathlib import Path
from typing import Any

LOG = logging.getLogger("moetrain")
_HANDLER_TAG = "_moetrain_run_handler"


class _ConsoleHandler(logging.StreamHandler):
    """stdout, line-flushed; written above the progress bar when one is shown."""

    def __init__(self) -> None:
        super().__init__(sys.stdout)
        self.bar: Any = None

    def emit(self, record: logging.LogRecord) -> None:
        if self.bar is None:
            super().emit(record)  # StreamHandler flushes after every record
            return
        try:
            self.bar.write(self.format(record), file=sys.stdout)
        except Exception:
            self.handleError(record)


def setup_run_logging(run_dir: Path | None, is_main: bool) -> _ConsoleHandler | None:
    """(Re)configure the ``moetrain`` logger for one run; returns rank 0's console handler."""
    close_run_logging()
    LOG.setLevel(logging.INFO)
    LOG.propagate = False  # Hydra's root handlers would print every line twice
    if not is_main:
        return None
    console = _ConsoleHandler()
    handlers: list[logging.Handler] = []
    if run_dir is not None:  # the file first: a line seen on the console is already in train.log
        run_dir.mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(run_dir / "train.log", encoding="utf-8"))
    handlers.append(console)
    for h in handlers:
        h.setFormatter(logging.Formatter("%(message)s"))
        setattr(h, _HANDLER_TAG, True)
        LOG.addHandler(h)
    return console


def close_run_logging() -> None:
    """Remove (and close) the handlers a run added."""
    for h in list(LOG.handlers):
        if getattr(h, _HANDLER_TAG, False):
            LOG.removeHandler(h)
            h.close()


def clock(seconds: float) -> str:
    """``H:MM:SS``."""
    s = int(max(seconds, 0))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


def terminal_bar_wanted(progress: bool) -> bool:
    """A bar only on a terminal wide enough to show one (a zero-width one would hide everything)."""
    return progress and sys.stderr.isatty() and shutil.get_terminal_size((0, 0)).columns >= 40


def hardware_text(metrics: dict[str, Any]) -> str:
    """`` | mfu 41.2% | mem 12.3 GB``: the step's MFU (when logged) and the peak memory where it is known (the
    GPU's allocator peak, else the process's peak resident set on Linux)."""
    out = ""
    mfu = metrics.get("perf/mfu")
    if isinstance(mfu, int | float) and mfu == mfu:
        out += f" | mfu {mfu:.1%}"
    peak = peak_memory_gb()
    return out + (f" | mem {peak:.2f} GB" if peak is not None else "")


def peak_memory_gb() -> float | None:
    """Peak memory of this process in GB: CUDA's ``max_memory_allocated`` when CUDA is in use, else the peak
    resident set size (``getrusage``'s ``ru_maxrss``, kB on Linux), else ``None``."""
    import torch

    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return torch.cuda.max_memory_allocated() / 1e9
    try:
        import resource
    except ImportError:  # pragma: no cover - not on Windows
        return None
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6 if sys.platform == "linux" else None


def config_tree(resolved: dict[str, Any], defaults: dict[str, Any], run_dir: Path) -> str:
    """The run's config at start, compact: per section the keys that differ from the schema's defaults (a tree
    of one line per section), then where the whole resolved config is."""
    from moetrain.train.checkpoint import flat_config

    new, base = flat_config(resolved), flat_config(defaults)
    sections: dict[str, list[str]] = {}
    for key, value in new.items():
        if base.get(key, object()) != value:
            section, _, rest = key.partition(".")
            shown = str(value) if len(str(value)) <= 60 else f"{str(value)[:57]}..."
            sections.setdefault(section if rest else "", []).append(f"{rest or key}={shown}")
    lines = ["config (differs from the defaults):"]
    lines += [f"  {name or '(root)'}: {' '.join(items)}" for name, items in sections.items()] or ["  (defaults)"]
    lines.append(f"  (every key: {run_dir / 'config.yaml'})")
    return "\n".join(lines)


def say_config(tree: str, run_dir: Path) -> None:
    """The start tree on rank 0's console and at the top of this run's part of ``train.log`` (the console and the
    file hold the same lines)."""
    print(tree, flush=True)
    with open(run_dir / "train.log", "a", encoding="utf-8") as log:
        log.write(tree + "\n")


def closing_summary(run_dir: Path, final: dict[str, Any], tokens_per_sec: float | None, resume: str) -> str:
    """What a finished run prints last: its final metrics, where its files are, and the next commands."""
    shown = [(k, final[k]) for k in ("val/loss", "val/bpb", "val/maxvio_global", "train/loss") if k in final]
    metrics = " | ".join(f"{k} {v:.4f}" for k, v in shown if isinstance(v, int | float))
    if tokens_per_sec is not None:
        metrics += f" | {tokens_per_sec:,.0f} tok/s (median)"
    return "\n".join([
        f"moetrain: done: {metrics}",
        f"  files: {run_dir}/ (config.yaml, metrics.jsonl, train.log, checkpoints/, summary.json)",
        f"  plots and report: moetrain-plot {run_dir} --html",
        f"  routes:           moetrain-inspect {run_dir}",
        f"  sample:           moetrain-generate {run_dir} --prompt 'def '",
        f"  export:           moetrain-export {run_dir} {run_dir}/export",
        f"  train longer:     {resume}",
    ])  # fmt: skip


class LogSink:
    """Step and evaluation lines (``step 10/300 | loss ... | elapsed 0:01:02 | eta 0:29:00``) and the bar."""

    def __init__(self, console: _ConsoleHandler | None, max_steps: int, start_step: int, progress: bool) -> None:
        self.max_steps = max_steps
        self.start_step = start_step
        self.t0 = time.perf_counter()
        self.bar: Any = None
        if console is not None and terminal_bar_wanted(progress):
            from tqdm import tqdm

            self.bar = tqdm(total=max_steps, initial=start_step, desc="train", unit="step", dynamic_ncols=True)
            console.bar = self.bar
        self.console = console

    def timing(self, step: int) -> str:
        elapsed = time.perf_counter() - self.t0
        done = step - self.start_step
        eta = elapsed / done * (self.max_steps - step) if done > 0 else float("nan")
        return f"elapsed {clock(elapsed)} | eta {clock(eta) if eta == eta else '?'}"

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        if "train/loss" in metrics:
            m = metrics
            if self.bar is not None:
                maxvio, tps = f"{m.get('moe/maxvio', 0):.2f}", f"{m['perf/tokens_per_sec']:,.0f}"
                self.bar.set_postfix(loss=f"{m['train/loss']:.3f}", maxvio=maxvio, tok_s=tps)
            LOG.info(
                f"step {step:>6}/{self.max_steps} | loss {m['train/loss']:.4f} | aux {m['train/aux_loss']:.4f} | "
                f"maxvio {m.get('moe/maxvio', 0):.3f} | lr {m['train/lr']:.2e} | "
                f"{m['perf/tokens_per_sec']:,.0f} tok/s{hardware_text(m)} | {self.timing(step)}"
            )
        if "val/loss" in metrics:
            line = f"eval step {step}: val/loss {metrics['val/loss']:.4f}"
            if step:  # not the evaluation before training
                bpb = f" ({metrics['val/bpb']:.3f} bits/byte)" if "val/bpb" in metrics else ""
                line += f"{bpb} val/maxvio_global {metrics.get('val/maxvio_global', 0):.3f}"
            LOG.info(f"{line} | {self.timing(step)}")

    def advance(self) -> None:
        """One step done."""
        if self.bar is not None:
            self.bar.update(1)

    def close(self, exit_code: int = 0) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        if self.console is not None:
            self.console.bar = None
