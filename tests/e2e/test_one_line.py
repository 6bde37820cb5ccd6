"""One line, never a traceback (docs/checkpoints.md, "What moetrain guarantees"), for the cases issue 27 found: float
values outside float32 and thread counts beyond the machine, tools' arguments out of range, a
transformers folder that does not load, bad lines of ``metrics.jsonl``, a failed sweep job. Each test
names the behaviour of the code before the fix that it catches."""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from moetrain.config import ConfigError, TrainConfig, validate
from moetrain.config.world import usable_cpus
from moetrain.train.trainer import Trainer
from tests.conftest import tiny_train_config

REPO = Path(__file__).resolve().parents[2]


def _set(cfg: TrainConfig, key: str, value: object) -> None:
    *parents, leaf = key.split(".")
    obj = cfg
    for p in parents:
        obj = getattr(obj, p)
    setattr(obj, leaf, value)


def err_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.strip()]


# ------------------------------------------------------------------ float bounds and thread counts
@pytest.mark.unit
@pytest.mark.parametrize(
    ("key", "value", "rule"),
    [
        ("optim.lr", 1e39, "must be 0 or within float32's range"),
        ("moe.balance.z_loss_coef", 1e39, "must be 0 or within float32's range"),
        ("moe.balance.expert_coef", -1e40, "must be 0 or within float32's range"),
        ("optim.eps", 1e-50, "must be 0 or within float32's range"),
        ("trainer.num_threads", 100000, "CPUs this process may use"),
    ],
)
def test_floats_beyond_float32_and_more_threads_than_cpus_are_refused(key, value, rule):
    """Before: ``optim.lr=1e39`` passed validation and AdamW raised "value cannot be converted to type float
    without overflow" mid-step; ``trainer.num_threads=100000`` passed and crashed the process (threads
    exhausted its memory); ``optim.eps=1e-50`` became 0 in float32."""
    cfg = TrainConfig()
    _set(cfg, key, value)
    with pytest.raises(ConfigError) as err:
        validate(cfg)
    assert str(err.value).startswith(f"{key}=") and rule in str(err.value), err.value
    ok = TrainConfig()
    ok.moe.balance.expert_coef, ok.trainer.num_threads, ok.moe.balance.z_loss_coef = 3.0e38, usable_cpus(), 0.0
    validate(ok)  # the edges themselves are fine


# ------------------------------------------------------------------ tools' arguments
TOOL_ARGV = {
    "plan": ["trainer.micro_batch_size=1"],  # a config valid on the default 8 GPUs, so only the flag is wrong
    "generate": ["X", "--prompt", "a"],  # X: a checkpoint that does not exist (never looked up)
}
TOOL_CASES = [  # (moetrain.tools.<tool>, the bad flag, what its one line says)
    ("plan", "--nodes 0", "moetrain-plan: argument error: --nodes=0: must be >= 1"),
    ("plan", "--gpus-per-node -8", "moetrain-plan: argument error: --gpus-per-node=-8: must be >= 1"),
    ("plan", "--mfu 0", "moetrain-plan: argument error: --mfu=0.0: must be a fraction in (0, 1]"),
    ("plan", "--mfu nan", "moetrain-plan: argument error: --mfu=nan: must be a fraction in (0, 1]"),
    ("plan", "--tflops inf", "moetrain-plan: argument error: --tflops=inf: must be a finite"),
    ("generate", "--top-p 0", "argument error: --top-p=0.0: must be in (0, 1]"),
    ("generate", "--top-k -3", "argument error: --top-k=-3: must be >= 1"),
    ("generate", "--temperature nan", "argument error: --temperature=nan"),
    ("generate", "--max-new-tokens 0", "argument error: --max-new-tokens=0"),
]


@pytest.mark.unit
@pytest.mark.parametrize(("tool", "flag", "line"), TOOL_CASES, ids=[f"{t} {f}" for t, f, _ in TOOL_CASES])
def test_tool_arguments_out_of_range_are_one_line_before_any_work(tmp_path, capsys, tool, flag, line):
    """Before: ``--nodes 0`` / ``--mfu 0`` divided by zero (traceback), ``--mfu nan`` printed a plan of nan;
    ``--top-p 0`` dropped every token (NaN probabilities, traceback in multinomial), ``--top-k -3`` failed
    inside ``topk``. Now each is refused first (for generate even before the checkpoint ``X`` is looked up)."""
    main = importlib.import_module(f"moetrain.tools.{tool}").main
    argv = [str(tmp_path / "nope") if a == "X" else a for a in TOOL_ARGV[tool]]
    with pytest.raises(SystemExit) as exc:
        main([*argv, *flag.split()])
    assert exc.value.code == 2
    lines = err_lines(capsys.readouterr().err)
    assert len(lines) == 1 and line in lines[0], lines


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("ckpt")
    cfg = tiny_train_config(tmp, max_steps=1)
    Trainer(cfg, tmp / "run").fit()
    return tmp / "run"


@pytest.mark.parity
def test_generate_says_when_it_caps_max_new_tokens(tiny_checkpoint, capsys):
    """Before: ``--max-new-tokens 100000`` was cut to the model's context without a word."""
    from moetrain.tools.generate import main

    main([str(tiny_checkpoint), "--prompt", "ab", "--max-new-tokens", "100000", "--temperature", "0"])
    lines = err_lines(capsys.readouterr().err)
    assert lines == [
        "moetrain-generate: note: --max-new-tokens=100000 capped at 30 (the model's context of 32 tokens less "
        "the prompt's 2)"
    ]


# ------------------------------------------------------------------ a transformers folder that does not load
def _hf_cases(root: Path) -> dict[str, Path]:
    """A tiny Qwen3-MoE folder and four broken copies of it."""
    import shutil

    from safetensors.torch import load_file, save_file

    from tests.hf.test_transformers_interop import tiny_hf

    good = root / "good"
    tiny_hf("qwen3_moe").save_pretrained(good)
    cases = {}
    for name in ("no_weights", "intermediate", "expert", "garbled"):
        cases[name] = root / name
        shutil.copytree(good, cases[name])
    for f in cases["no_weights"].glob("*.safetensors"):
        f.unlink()
    config = json.loads((good / "config.json").read_text())
    (cases["intermediate"] / "config.json").write_text(json.dumps({**config, "moe_intermediate_size": 24}))
    weights = next(cases["expert"].glob("*.safetensors"))
    state = {k: v for k, v in load_file(weights).items() if ".layers.1.mlp.experts.3." not in k}
    save_file(state, weights, metadata={"format": "pt"})
    (cases["garbled"] / "config.json").write_text('{"model_type": "qwen3_moe", "hidden')
    return cases


@pytest.mark.parity
def test_a_transformers_folder_that_does_not_load_is_one_line(tmp_path, capsys):
    """Before: each case was transformers' traceback (an OSError for no weights or a garbled config.json, a
    RuntimeError pointing at a logged table for changed sizes or an expert missing); now one line naming
    the folder and, for mismatched tensors, the tensors and their shapes."""
    pytest.importorskip("transformers")
    pytest.importorskip("safetensors")
    from moetrain.tools.export import main

    cases = _hf_cases(tmp_path)
    capsys.readouterr()
    expected = {
        "no_weights": "cannot load it with transformers: Error no file named model.safetensors",
        "intermediate": "model.layers.{1, 2}.mlp.experts.down_proj (file [4, 32, 16] vs config.json [4, 32, 24])",
        "expert": "model.layers.1.mlp.experts.gate_up_proj (file [3, 32, 32] vs config.json [4, 32, 32])",
        "garbled": "is not a valid JSON file",
    }
    for name, folder in cases.items():
        code = main(["--from-hf", str(folder), str(tmp_path / f"out_{name}")])
        lines = err_lines(capsys.readouterr().err)
        assert code == 2 and len(lines) == 1, (name, lines)
        assert lines[0].startswith(f"moetrain-export: {folder}: ") and expected[name] in lines[0], lines
        assert not (tmp_path / f"out_{name}" / "config.yaml").exists()


# ------------------------------------------------------------------ metrics readers
BAD_LINES = [b"\x00\xff\xfe binary \x80", b"[1, 2, 3]", b'{"step": "ten", "train/loss": 1.0}',
             b'{"step": 30, "train/loss": "low"}', b'{"step": 40, "moe/layer_1/load": [1, "x"]}', b"{cut by a cra"]  # fmt: skip


def _write_metrics(run: Path) -> None:
    good = [{"step": 10, "train/loss": 2.0, "perf/tokens_per_sec": 100.0}, {"step": 20, "val/loss": "nan"}]
    run.mkdir(parents=True)
    lines = [json.dumps(g).encode() for g in good]
    (run / "metrics.jsonl").write_bytes(b"\n".join([lines[0], *BAD_LINES, lines[1]]) + b"\n")


@pytest.mark.unit
def test_metrics_readers_skip_and_count_bad_lines_with_one_warning(tmp_path, capsys):
    """Before: a binary line raised UnicodeDecodeError (the whole file was decoded at once), and a list or a
    mistyped value was kept as a record and failed later inside the plot or the summary."""
    from moetrain.launch.sweep import main as summary_main
    from moetrain.tools.run_records import read_metrics

    run = tmp_path / "sweep" / "0"
    _write_metrics(run)
    records = read_metrics(run, "moetrain-plot")
    assert [r["step"] for r in records] == [10, 20]
    lines = err_lines(capsys.readouterr().err)
    assert lines == [
        f"moetrain-plot: warning: {run / 'metrics.jsonl'}: skipped {len(BAD_LINES)} bad lines "
        "(not a JSON object with an int step and numeric values)"
    ]
    summary_main([str(tmp_path / "sweep")])
    captured = capsys.readouterr()
    assert len(err_lines(captured.err)) == 1 and "moetrain-sweep-summary: warning:" in captured.err
    assert "| 0 | incomplete | (defaults) | nan | — | 100 |" in captured.out  # tokens/s: whole tokens


@pytest.mark.unit
def test_plot_skips_bad_lines(tmp_path, capsys):
    """Before: ``moetrain-plot`` of a run with a binary line in its metrics was a UnicodeDecodeError traceback."""
    pytest.importorskip("matplotlib")
    from moetrain.tools.plot import main

    _write_metrics(tmp_path / "run")
    main([str(tmp_path / "run")])
    lines = err_lines(capsys.readouterr().err)
    assert len(lines) == 1 and lines[0].startswith("moetrain-plot: warning: ") and "skipped 6 bad lines" in lines[0]
    assert (tmp_path / "run" / "plots" / "loss.png").is_file()


# ------------------------------------------------------------------ a basic-launcher sweep with a failed job
@pytest.mark.e2e
def test_a_basic_sweep_goes_on_after_a_failed_job_and_writes_its_summary(tmp_path):
    """Before: the first job's one-line error ended the whole process (``sys.exit`` inside Hydra's basic
    launcher), so job 1 never ran and no summary was written. Now the failed job is a row, the others
    run, the summary is written and the sweep exits 1 naming the failed job."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "MOETRAIN_CACHE": str(tmp_path / "cache")}
    sweep = tmp_path / "sweep"
    cmd = [sys.executable, "-m", "moetrain.train", "-m", f"hydra.sweep.dir={sweep}", "experiment=smoke"]
    cmd += ["trainer.max_steps=2", "trainer.eval_every=0", "data.max_val_sequences=4", "logger=none"]
    proc = subprocess.run([*cmd, "optim.lr=-1,1e-3"], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert "moetrain: config error: optim.lr=-1.0: must be > 0" in proc.stderr
    assert err_lines(proc.stderr)[-1] == "moetrain: 1 of 2 sweep jobs failed: #0 (exit 2)"
    rows = json.loads((sweep / "summary.json").read_text())
    assert [(r["job"], r["status"]) for r in rows] == [(0, "failed (exit 2)"), (1, "completed")]
    assert rows[1]["val/loss"] is not None and (sweep / "summary.md").is_file()


# ------------------------------------------------------------------ environment errors through their causes
@pytest.mark.unit
def test_wrapped_environment_errors_are_recognised_through_their_causes_and_bugs_are_not():
    """Before: only the outermost exception was looked at, so an ENOSPC inside DCP's ``CheckpointException``
    (and an OSError re-raised ``from``) was not a user error. A bug raised while handling an OSError
    (``__context__``, not ``__cause__``) must stay a bug."""
    import errno

    from torch.distributed.checkpoint.api import CheckpointException

    from moetrain.errors import user_error

    enospc = OSError(errno.ENOSPC, "No space left on device", "/ckpt/step_000004.tmp/__0_0.distcp")
    wrapped = CheckpointException("save", {1: (enospc, None)})
    assert user_error(wrapped) == ("file", "/ckpt/step_000004.tmp/__0_0.distcp: no space left on the device")
    try:
        raise RuntimeError("could not create the output dir") from OSError(errno.EROFS, "Read-only", "/ro/run")
    except RuntimeError as e:
        assert user_error(e) == ("file", "/ro/run: read-only file system")
    try:
        try:
            raise FileNotFoundError(errno.ENOENT, "No such file", "/x")
        except FileNotFoundError:
            _ = 1 / 0
    except ZeroDivisionError as e:
        assert user_error(e) is None
