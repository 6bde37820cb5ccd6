"""Every numeric key of ``optim.*`` and ``trainer.*`` with a bad but finite value stops the real command line
(``moetrain-train``, :func:`moetrain.train.cli.main` in-process) with one line naming the key and the value,
exit 2, no traceback, before any work (``moetrain.config.limits`` says why each bound is where it is).

Before: ``optim.lr=1e38`` (or ``optim.lr=1e23`` with ``optim.beta1`` near 1) passed validation and the first
AdamW step raised "value cannot be converted to type float without overflow"; ``optim.weight_decay=1e38``
likewise; ``trainer.seed=2**64`` raised "Overflow when unpacking long long" while the trainer was built;
``optim.lr=100`` or ``optim.eps=10`` trained on without a word (a model of noise, or no update)."""

from __future__ import annotations

import logging
import sys

import pytest

from moetrain.config import ConfigError, TrainConfig, validate

pytestmark = pytest.mark.unit

CASES = [  # (overrides, the key named, what the line says)
    (["optim.lr=1e38"], "optim.lr", "must be <= 10: AdamW moves every weight by about lr"),
    (["optim.lr=11"], "optim.lr", "must be <= 10"),
    (["optim.lr=1e23", "optim.beta1=0.9999999999999999"], "optim.lr", "must be <= 10"),
    (["optim.lr=0"], "optim.lr", "must be > 0"),
    (["optim.lr=-1e-3"], "optim.lr", "must be > 0"),
    (["optim.min_lr_ratio=2"], "optim.min_lr_ratio", "must be in [0, 1]"),
    (["optim.warmup_steps=-5"], "optim.warmup_steps", "must be >= 0"),
    (["optim.weight_decay=-0.1"], "optim.weight_decay", "must be >= 0"),
    (["optim.weight_decay=1e38"], "optim.weight_decay", "optim.lr x optim.weight_decay must be <= 1"),
    (["optim.lr=10", "optim.weight_decay=0.2"], "optim.weight_decay", "must be <= 1 (here 2)"),
    (["optim.beta1=1.0"], "optim.beta1", "must be in [0, 1)"),
    (["optim.beta1=1.5"], "optim.beta1", "must be in [0, 1)"),
    (["optim.beta2=-0.5"], "optim.beta2", "must be in [0, 1)"),
    (["optim.eps=0"], "optim.eps", "must be > 0"),
    (["optim.eps=-1e-8"], "optim.eps", "must be > 0"),
    (["optim.eps=10"], "optim.eps", "must be <= 1: eps is added to the gradients' running RMS"),
    (["optim.grad_clip=-1"], "optim.grad_clip", "must be >= 0"),
    (["trainer.max_steps=0"], "trainer.max_steps", "must be > 0"),
    (["trainer.global_batch_size=-8"], "trainer.global_batch_size", "must be > 0"),
    (["trainer.micro_batch_size=0"], "trainer.micro_batch_size", "must be > 0"),
    (["trainer.log_every=0"], "trainer.log_every", "must be > 0"),
    (["trainer.eval_every=-1"], "trainer.eval_every", "must be >= 0"),
    (["trainer.seed=-1"], "trainer.seed", "must be in [0, 2**63 - 1]"),
    (["trainer.seed=18446744073709551616"], "trainer.seed", "must be in [0, 2**63 - 1]"),
    (["trainer.peak_tflops=0"], "trainer.peak_tflops", "must be > 0"),
    (["trainer.num_threads=0"], "trainer.num_threads", "must be > 0"),
    (["trainer.nonfinite_max_skips=-1"], "trainer.nonfinite_max_skips", "must be >= 0"),
]


@pytest.fixture(autouse=True)
def _root_logging_restored():
    """``cli.main()`` in-process lets Hydra configure logging: its handlers on the root logger hold this test's
    captured stderr, closed after the test, and a later test's warning (transformers' load report) written
    through them failed with "I/O operation on closed file". Put the root logger back as it was."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    for handler in list(root.handlers):
        if handler not in handlers:
            root.removeHandler(handler)
    root.setLevel(level)


@pytest.mark.parametrize(("overrides", "key", "rule"), CASES, ids=[" ".join(c[0]) for c in CASES])
def test_bad_optim_and_trainer_numbers_stop_the_command_with_one_line(tmp_path, monkeypatch, capsys, overrides, key,
                                                                       rule):  # fmt: skip
    """Catches a bound missing from validation (the run starts: no exit 2, files in the run dir) or a rule that
    names another key, or a traceback instead of the line."""
    from moetrain.train import cli

    run_dir = tmp_path / "run"
    argv = ["moetrain-train", "experiment=smoke", "logger=none", f"run_dir={run_dir}", *overrides]
    monkeypatch.setattr(sys, "argv", argv)
    monkeypatch.setenv("MOETRAIN_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("MOETRAIN_DEBUG", raising=False)
    monkeypatch.setenv("HYDRA_FULL_ERROR", "1")  # main() sets it: restored after the test
    monkeypatch.setattr(cli, "USER_ARGS", None)
    monkeypatch.setattr(cli, "FAILURE", [])
    with pytest.raises(SystemExit) as exc:
        cli.main()
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert exc.value.code == 2 and "Traceback" not in err, err[-2000:]
    assert len(lines) == 1 and lines[0].startswith(f"moetrain: config error: {key}="), lines
    assert rule in lines[0], lines[0]
    assert not run_dir.exists()  # before any work: nothing written


def test_the_bounds_themselves_are_valid():
    """Catches a bound off by one the other way (``<`` for ``<=``): the edges are runs someone may mean."""
    cfg = TrainConfig()
    cfg.optim.lr, cfg.optim.weight_decay, cfg.optim.eps, cfg.optim.beta1 = 10.0, 0.1, 1.0, 0.0
    cfg.trainer.seed = 2**63 - 1
    validate(cfg)
    cfg.optim.lr, cfg.optim.weight_decay = 0.5, 2.0  # lr x weight_decay = 1
    validate(cfg)
    cfg.optim.weight_decay = 2.5
    with pytest.raises(ConfigError, match=r"^optim\.weight_decay=2\.5: optim\.lr x optim\.weight_decay"):
        validate(cfg)
