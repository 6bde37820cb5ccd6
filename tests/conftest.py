from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("WANDB_SILENT", "true")
os.environ.pop("WANDB_API_KEY", None)  # tests never go online


# ------------------------------------------------------- no silent skips in CI
# CI installs every extra, so there a skip means a test that guards something did not run: under CI=true an
# unexpected skip fails the run. Expected: tests marked ``cuda`` (tests/moe/test_cuda.py, no GPU on CI) and skips
# whose reason names CUDA or a GPU. xfail reports are not skips.


def ci_strict() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("true", "1")


def expected_skip(reason: str, item: pytest.Item | None = None) -> bool:
    if item is not None and item.get_closest_marker("cuda") is not None:
        return True
    return any(word in reason for word in ("CUDA", "GPU"))


def skip_reason(report: pytest.TestReport | pytest.CollectReport) -> str:
    longrepr = report.longrepr
    if isinstance(longrepr, tuple) and len(longrepr) == 3:
        return str(longrepr[2])
    return str(longrepr)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    outcome = yield
    report = outcome.get_result()
    if not ci_strict() or not report.skipped or hasattr(report, "wasxfail"):
        return
    reason = skip_reason(report)
    if not expected_skip(reason, item):
        report.outcome = "failed"
        report.longrepr = f"unexpected skip under CI=true (CI installs every extra): {reason}"


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector: pytest.Collector):
    outcome = yield
    report = outcome.get_result()
    if ci_strict() and report.skipped and not expected_skip(skip_reason(report)):
        report.outcome = "failed"
        report.longrepr = f"unexpected module skip under CI=true (CI installs every extra): {skip_reason(report)}"


DIST_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
"""torch.distributed variables: an in-process test may set them (a DeepSpeed engine, a SLURM export); a
later test's subprocess must not inherit them (it would think it is one rank of a job)."""


@pytest.fixture(autouse=True)
def _seed_and_threads():
    torch.manual_seed(0)
    torch.set_num_threads(2)
    dist_env = {k: os.environ.get(k) for k in DIST_ENV}
    yield
    for key, value in dist_env.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


def write_corpus(root, n_docs: int = 8) -> list[str]:
    """A small local text corpus (real Python source) for fast end-to-end tests.

    Several processes write the same corpus at once (both ranks of a spawned check, every case of a module
    under one ``tmp``), while others read it: a file already holding the text is left alone (its mtime, part
    of the data cache's key, unchanged), any other is written to a temporary file and renamed over, so a
    reader never sees a truncated document (``write_text`` truncates first: under load another rank could
    tokenise half a file, and train on other data than the run it is compared with)."""
    import sysconfig
    from pathlib import Path

    stdlib = Path(sysconfig.get_paths()["stdlib"])
    names = ["argparse.py", "textwrap.py", "string.py", "bisect.py", "heapq.py", "shlex.py", "glob.py", "fnmatch.py"]
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    paths = []
    for name in names[:n_docs]:
        dst = root / name.replace(".py", ".txt")
        text = (stdlib / name).read_text(encoding="utf-8")
        if not dst.is_file() or dst.read_text(encoding="utf-8") != text:
            tmp = dst.with_name(f".{dst.name}.{os.getpid()}.tmp")
            tmp.write_text(text, encoding="utf-8")
            tmp.replace(dst)
        paths.append(str(dst))
    return paths


def cli_corpus_overrides(tmp_path) -> list[str]:
    """Hydra overrides that point ``moetrain-train`` at a fresh :func:`write_corpus` (32-byte sequences)."""
    paths = write_corpus(tmp_path / "corpus")
    return [
        "data=files",
        "data.paths=[" + ",".join(f'"{p}"' for p in paths) + "]",
        "data.seq_len=32",
        "data.val_fraction=0.25",
        "data.max_val_sequences=8",
        f"data.cache_dir={tmp_path / 'cache'}",
    ]


def local_losses(rec):
    """This rank's summed LM and aux losses and micro-batch count from a ``Trainer.forward_backward`` recorder."""
    return rec.values["train/loss"], rec.values["train/aux_loss"], rec.counts["train/loss"]


def tiny_train_config(tmp_path, **trainer_kw):
    """A seconds-long config on a local corpus, W&B off."""
    from moetrain.config import DataConfig, ModelConfig, MoEConfig, TrainConfig, TrainerConfig

    cfg = TrainConfig(
        model=ModelConfig(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden_size=64, first_k_dense=1),
        moe=MoEConfig(num_experts=4, top_k=2, expert_hidden_size=16),
        data=DataConfig(
            source="files",
            paths=write_corpus(tmp_path / "corpus"),
            seq_len=32,
            val_fraction=0.25,
            max_val_sequences=16,
            cache_dir=str(tmp_path / "cache"),
        ),
        trainer=TrainerConfig(
            **{
                "max_steps": 4,
                "global_batch_size": 8,
                "micro_batch_size": 8,
                "log_every": 1,
                "eval_every": 0,
                "progress": False,
                **trainer_kw,
            }
        ),
    )
    cfg.logger.wandb.mode = "disabled"
    return cfg
