"""A newcomer's defaults (issue 31): one config that runs on any number of ranks, threads that fit the CPUs
the process may use, and tools that print sizes a person can read."""

from __future__ import annotations

import pytest

from moetrain.config import ConfigError, TrainConfig, default_threads, micro_batch_for, validate, with_micro_batch
from moetrain.config.docs import composed_defaults


@pytest.mark.unit
@pytest.mark.parametrize("world", [1, 2, 4])
def test_the_default_and_smoke_configs_validate_unchanged_on_1_2_and_4_ranks(world):
    """Before: ``micro_batch_size: 16`` with ``global_batch_size: 16`` refused two ranks, so every multi-rank
    command needed a hand-set micro-batch. Catches a default micro-batch that does not follow the world size."""
    for overrides in ([], ["experiment=smoke"]):
        cfg = with_micro_batch(composed_defaults(overrides), world)
        validate(cfg, world_size=world)
        t = cfg.trainer
        assert t.global_batch_size % (t.micro_batch_size * world) == 0
    assert with_micro_batch(composed_defaults([]), world).trainer.micro_batch_size == 16 // world


@pytest.mark.unit
def test_an_unset_micro_batch_is_each_ranks_share_and_a_global_batch_that_does_not_split_is_one_line():
    """Catches an unset micro-batch resolved to the global batch (accumulating nothing but refusing W>1), and
    an uneven global batch that reaches the loader (silently dropping sequences) instead of one line."""
    t = TrainConfig().trainer
    assert t.micro_batch_size is None
    assert [micro_batch_for(t, w) for w in (1, 2, 4, 8, 16)] == [16, 8, 4, 2, 1]
    t.global_batch_size = 6
    with pytest.raises(ConfigError, match=r"^trainer.global_batch_size=6: must be divisible by the world size=4"):
        micro_batch_for(t, 4)
    cfg = TrainConfig()
    cfg.trainer.micro_batch_size = 16
    with pytest.raises(ConfigError, match=r"set trainer.micro_batch_size to a divisor of 8 .* or unset it"):
        validate(cfg, world_size=2)


@pytest.mark.unit
def test_default_threads_share_the_cpus_of_the_affinity_mask_between_the_local_ranks(monkeypatch):
    """Before: torch's default counted the machine's cores (a shared 2-core slice ran 5x slower). Catches a
    default above the CPUs the process may use, or one per rank that oversubscribes them under torchrun."""
    import os

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3}, raising=False)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert [default_threads(n) for n in (1, 2, 4, 8)] == [4, 2, 1, 1]


@pytest.mark.unit
def test_omp_num_threads_set_by_the_user_or_torchrun_wins_over_the_default(monkeypatch):
    """Catches a default that overrides an explicit ``OMP_NUM_THREADS`` (torch honours it; the reference runs of
    ``scripts/metrics_baseline.sh`` set it to 1, and two threads changed their sums in the last bit)."""
    import os

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3}, raising=False)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert [default_threads(n) for n in (1, 2)] == [1, 1]
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert default_threads(1) == 3
    monkeypatch.setenv("OMP_NUM_THREADS", "")  # unset-like values fall back to the affinity mask
    assert default_threads(1) == 4


STOP_AT = (
    "import os, signal; from moetrain.train import hooks\n"
    "class Stop:\n"
    "    def after_step(self, step, **kw):\n"
    "        if step == int(os.environ.get('STOP_AT', -1)): os.kill(os.getpid(), signal.SIGINT)\n"
    "hooks.install(Stop()); import sys; sys.argv[0] = 'moetrain-train'\n"
    "from moetrain.train.cli import main; main()"
)


def _train(tmp_path, args, stop_at=None):  # type: ignore[no-untyped-def]
    import os
    import subprocess
    import sys
    from pathlib import Path

    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2]), "WANDB_MODE": "disabled"}
    env.pop("STOP_AT", None)
    if stop_at is not None:
        env["STOP_AT"] = str(stop_at)
    cmd = [sys.executable, "-c", STOP_AT, *args]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300)


@pytest.mark.e2e
@pytest.mark.parametrize("named", [True, False])
def test_ctrl_c_then_the_printed_command_resumes_the_same_run(tmp_path, named):
    """Before: the stop said "rerun to continue", but the same command started a new ``runs/<time>/``.
    With ``run_name=first`` the printed command is the user's own and rerunning it continues ``runs/first``;
    without a name it adds the ``run_dir=`` to give. Catches a run name that does not fix the directory,
    a printed command that differs from the one that continues, and a rerun that starts afresh."""
    import json
    import shlex

    from tests.conftest import cli_corpus_overrides
    from tests.train.test_guards_and_refusals import TINY_CLI

    args = [*TINY_CLI, *cli_corpus_overrides(tmp_path), "trainer.max_steps=4", "logger=none"]
    args += ["run_name=first"] if named else []
    first = _train(tmp_path, args, stop_at=2)
    assert first.returncode == 130, first.stderr[-2000:]
    said = [line for line in first.stdout.splitlines() if "to continue this run:" in line]
    assert len(said) == 1, first.stdout[-2000:]
    command = shlex.split(said[0].split("to continue this run: ", 1)[1])
    assert command[0] == "moetrain-train"
    if named:
        assert command[1:] == args
    runs = list((tmp_path / "runs").iterdir())
    assert len(runs) == 1 and (not named or runs[0].name == "first")
    again = _train(tmp_path, command[1:])
    assert again.returncode == 0, again.stderr[-2000:]
    assert "resumed from" in again.stdout and list((tmp_path / "runs").iterdir()) == runs
    records = [json.loads(x) for x in (runs[0] / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "train/loss" in r] == [1, 2, 3, 4]
    assert (runs[0] / "summary.json").is_file()


@pytest.mark.unit
def test_resume_latest_picks_the_newest_unfinished_run_of_the_name(tmp_path):
    """Catches ``latest`` choosing a finished run (it would be refused), a run without a checkpoint, or a run of
    another name."""
    import os
    import time

    from moetrain.train.rundir import chosen_run_dir

    def run(name: str, step: int, finished: bool = False) -> None:
        ckpt = tmp_path / name / "checkpoints" / f"step_{step:06d}"
        ckpt.mkdir(parents=True)
        (ckpt / "meta.json").write_text("{}")
        os.utime(ckpt, (time.time() + step, time.time() + step))
        if finished:
            (tmp_path / name / "summary.json").write_text("{}")

    run("a-1", 1)
    run("a-2", 2)
    run("b", 3)
    run("a-3", 4, finished=True)
    (tmp_path / "a-4").mkdir()
    assert chosen_run_dir(None, "a", "latest", tmp_path) == str(tmp_path / "a-2")
    assert chosen_run_dir(None, None, "latest", tmp_path) == str(tmp_path / "b")
    assert chosen_run_dir(None, "c", "latest", tmp_path) == str(tmp_path / "c")
    assert chosen_run_dir("x", "a", "latest", tmp_path) == "x"
    assert chosen_run_dir(None, None, "auto", tmp_path) is None


@pytest.mark.e2e
def test_a_torchrun_sweep_with_one_invalid_job_launches_nothing_and_names_it(tmp_path):
    """Before: all four jobs of a README sweep started, each failed on a config error found only inside its
    ``launcher.log``, then a Hydra traceback. Catches a launcher that starts jobs before checking every job's
    config, one that hides which job is bad, and a traceback instead of one line."""
    import os
    import subprocess
    import sys

    sweep = tmp_path / "sweep"
    env = {**os.environ, "WANDB_MODE": "disabled"}
    cmd = [sys.executable, "-m", "moetrain.train", "-m", "hydra/launcher=torchrun", f"hydra.sweep.dir={sweep}"]
    cmd += ["experiment=smoke", "hydra.launcher.nproc_per_node=2", "optim.lr=1e-3,-1,2e-3"]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = [line for line in proc.stderr.splitlines() if line.startswith("moetrain")]
    assert lines == [
        "moetrain: sweep job #1 (experiment=smoke optim.lr=-1): config error: optim.lr=-1.0: must be > 0",
        "moetrain: config error: 1 of 3 sweep jobs would fail (above); nothing was launched",
    ], proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr + proc.stdout
    assert not sweep.is_dir() or not [p for p in sweep.iterdir() if p.is_dir()]  # no job directory, no job ran


@pytest.mark.unit
def test_a_failed_jobs_cause_is_its_own_one_line_error_and_tokens_per_sec_is_one_median(tmp_path):
    """Catches a failure cause taken from torchrun's noise instead of moetrain's line, and the summary and the
    HTML report averaging tokens/s differently (they disagreed before)."""
    import json

    from moetrain.launch.jobs import failure_cause
    from moetrain.launch.sweep import read_job
    from moetrain.tools.report import final_metrics

    log = tmp_path / "launcher.log"
    log.write_text(
        "python -m torch.distributed.run ...\nmoetrain: config error: trainer.max_steps=0: must be > 0\n"
        "[rank0]: torch.distributed.elastic.multiprocessing.errors.ChildFailedError: boom\nE1206 failed\n"
    )
    assert failure_cause(log) == "moetrain: config error: trainer.max_steps=0: must be > 0"
    records = [{"step": s, "perf/tokens_per_sec": v} for s, v in ((10, 100.0), (20, 400.0), (30, 500.0))]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (tmp_path / "summary.json").write_text(json.dumps({"status": "completed", "metrics": {"perf/tokens_per_sec": 500}}))
    assert read_job(tmp_path)["perf/tokens_per_sec"] == 400.0 == final_metrics(tmp_path)["perf/tokens_per_sec"]


@pytest.mark.e2e
def test_an_imported_models_config_composes_with_every_config_group(tmp_path):
    """Before: the config ``moetrain-export --from-hf`` wrote knew no config group, so ``logger=none`` was read
    as a value ("str is not a subclass of LoggerConfig"). Catches an imported config without the groups, and
    one whose own keys (the imported weights to start from) a group would silently replace."""
    pytest.importorskip("transformers")
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from moetrain.config.docs import register_schema
    from moetrain.tools.export import import_hf
    from tests.hf.test_transformers_interop import tiny_hf

    tiny_hf("qwen2_moe").save_pretrained(str(tmp_path / "hf"))
    ckpt = import_hf(tmp_path / "hf", tmp_path / "imported", seq_len=32)
    register_schema()
    for overrides in (["logger=none", "experiment=smoke"], ["data=files", "parallel=single", "engine=native"]):
        with initialize_config_dir(config_dir=str(ckpt.parent), version_base="1.3"):
            cfg = OmegaConf.to_object(compose("config", overrides=overrides))
        assert cfg.trainer.resume == str(ckpt)
        if "logger=none" in overrides:
            assert cfg.logger.wandb.mode == "disabled" and cfg.trainer.max_steps == 10  # both groups applied
        else:
            assert cfg.data.source == "files" and cfg.data.seq_len == 32 and cfg.model.vocab_size == 320


@pytest.mark.unit
def test_moe_mixtral_export_refusal_names_the_override_for_the_architecture_asked():
    """Before: ``moe=mixtral`` was refused for Mixtral without a fix (the model default ``first_k_dense=1``), and
    ``--hf qwen3_moe`` printed the Mixtral message. Catches a refusal that names no override or another
    architecture's."""
    from moetrain.tools.export import ExportError, checked_arch

    mixtral = composed_defaults(["moe=mixtral"])
    with pytest.raises(ExportError, match=r"to export as Mixtral, train with model.first_k_dense=0$"):
        checked_arch(mixtral, None, "auto")
    with pytest.raises(
        ExportError, match=r"^--hf qwen3_moe: this model does not map to Qwen3-MoE: train with model.qk_norm=true$"
    ):
        checked_arch(mixtral, None, "qwen3_moe")
    assert checked_arch(composed_defaults(["moe=mixtral", "model.first_k_dense=0"]), None, "auto") == "mixtral"
    with pytest.raises(ExportError, match=r"Qwen3-MoE: train with model.qk_norm=true moe.num_shared_experts=0$"):
        checked_arch(composed_defaults([]), None, "qwen3_moe")


@pytest.mark.unit
def test_inspector_text_contrasts_with_every_expert_colour():
    """Before: white text on pale colours (#aec7e8, #edc948) was unreadable. Catches a text colour chosen
    without the background's luminance: every pair must reach WCAG's 3:1 contrast for large text."""
    from moetrain.tools.inspector import PALETTE, text_colour

    def luminance(hex_colour: str) -> float:
        lin = [int(hex_colour[i : i + 2], 16) / 255 for i in (1, 3, 5)]
        lin = [c / 12.92 if c <= 0.04045 else ((c + 0.055) / 1.055) ** 2.4 for c in lin]
        return 0.2126 * lin[0] + 0.7152 * lin[1] + 0.0722 * lin[2]

    for colour in PALETTE:
        text = {"#111": "#111111", "#fff": "#ffffff"}[text_colour(colour)]
        hi, lo = sorted((luminance(colour), luminance(text)), reverse=True)
        assert (hi + 0.05) / (lo + 0.05) >= 3.0, colour


@pytest.mark.e2e
def test_inspect_without_text_writes_statistics_into_the_run_dir_page(tmp_path, capsys):
    """Before: statistics needed ``--text``, stayed off the page, and the page went to the working directory.
    Catches any of the three."""
    from moetrain.tools.inspector import main as inspect_main
    from moetrain.train.trainer import Trainer
    from tests.conftest import tiny_train_config

    Trainer(tiny_train_config(tmp_path, max_steps=2), tmp_path / "run").fit()
    inspect_main([str(tmp_path / "run"), "--corpus", "4", "--threads", "1"])
    out = capsys.readouterr().out
    assert "per-expert statistics over 4 validation sequences" in out
    page = (tmp_path / "run" / "routes.html").read_text()
    assert "per-expert statistics over 4 validation sequences" in page and "e0" in page


@pytest.mark.unit
def test_console_start_tree_step_hardware_closing_summary_and_group_help(tmp_path):
    """Catches a start tree that lists defaults (a wall of keys) or misses a changed one, an MFU that is not a
    percentage, a closing summary without the next commands, and ``--help`` without a group's options."""
    from moetrain.config import to_dict
    from moetrain.config.docs import config_dir
    from moetrain.train.command import group_options
    from moetrain.train.console import closing_summary, config_tree, hardware_text

    cfg = composed_defaults(["experiment=smoke", "moe=switch"])
    tree = config_tree(to_dict(cfg), to_dict(TrainConfig()), tmp_path)
    assert "  model: dim=64" in tree and "max_steps=10" in tree and "optim.lr" not in tree
    assert tree.splitlines()[-1] == f"  (every key: {tmp_path / 'config.yaml'})"
    assert hardware_text({"perf/mfu": 0.4123}).startswith(" | mfu 41.2%")
    done = closing_summary(tmp_path, {"val/loss": 1.5, "train/loss": 1.4}, 5450.0, "moetrain-train run_dir=x")
    assert done.splitlines()[0] == "moetrain: done: val/loss 1.5000 | train/loss 1.4000 | 5,450 tok/s (median)"
    assert f"moetrain-plot {tmp_path} --html" in done and "moetrain-train run_dir=x" in done
    assert "moetrain-export" in done and "moetrain-inspect" in done
    groups = group_options(config_dir())
    assert (
        "  moe: deepseek_v2, deepseek_v2_lite, deepseek_v3, deepseek_v3_671b, default" in groups
        and "  logger: none, wandb" in groups
    )


@pytest.mark.unit
def test_a_misspelled_key_names_the_nearest_known_one_before_hydra():
    """Before: Hydra's "Could not override 'trainer.max_step'" named no fix. Catches a check that refuses groups,
    sections or list/dict values, or one that names no near miss."""
    from moetrain.launch.jobs import check_override_keys

    groups = {"moe", "logger", "experiment", "hydra"}
    check_override_keys(["moe=switch", "trainer.max_steps=3", "hydra/launcher=torchrun", "-m", "run_name=x"], groups)
    check_override_keys(["+trainer.extra=1", "data.paths=[a,b]", "optim.lr=1e-3,3e-3", "trainer=null"], groups)
    with pytest.raises(ConfigError, match=r"^trainer.max_step: unknown key \(did you mean trainer.max_steps\? "):
        check_override_keys(["trainer.max_step=3"], groups)
    with pytest.raises(ConfigError, match=r"did you mean logger\?"):
        check_override_keys(["loger=none"], groups)


@pytest.mark.unit
def test_comparison_pictures_colour_by_run_style_by_split_and_centre_the_load_scale_on_1_over_n():
    """Before: train and val of one run got unrelated colours, legends of long labels covered the curves, and the
    load heatmap's viridis scale hid which experts were over or under 1/N. Catches a colour per line instead of
    per run, a legend inside the axes, and a colour scale not centred on 1/N."""
    import numpy as np

    from moetrain.tools.plot import _pyplot, balance_norm, lines_figure

    def records(scale: float) -> list[dict]:
        return [{"step": s, "moe/maxvio": scale / s, "val/maxvio_global": 2 * scale / s} for s in (1, 2, 3)]

    plt = _pyplot()
    runs = {"moe=switch": records(1.0), "moe=deepseek_v2": records(2.0), "moe=hash": records(3.0)}
    fig = lines_figure(plt, runs, ["moe/maxvio", "val/maxvio_global"], "MaxVio")
    (ax,) = fig.axes  # one overlaid panel
    lines = ax.get_lines()
    assert len(lines) == 6
    for i in range(3):  # per run: train then val, one colour, solid then dashed
        train, val = lines[2 * i], lines[2 * i + 1]
        assert train.get_color() == val.get_color() and (train.get_linestyle(), val.get_linestyle()) == ("-", "--")
    assert len({line.get_color() for line in lines}) == 3
    fig.canvas.draw()
    axes_right = ax.get_window_extent().x1
    legends = fig.legends
    assert len(legends) == 2 and all(leg.get_window_extent().x0 > axes_right for leg in legends)
    assert {t.get_text() for t in legends[-1].get_texts()} == set(runs)
    plt.close(fig)
    norm = balance_norm(np.array([[0.05, 0.3], [0.2, 0.1]]), 8)
    assert norm(1 / 8) == pytest.approx(0.5) and norm(0.0) == 0.0 and norm(0.3) == pytest.approx(1.0)


@pytest.mark.unit
def test_a_running_jobs_progress_line_has_step_total_loss_and_eta(tmp_path):
    """Catches a progress line that repeats an unchanged step, reads a half-written last line, or has no ETA
    once two steps were seen."""
    import json

    from moetrain.launch.jobs import JobProgress

    progress = JobProgress(max_steps=10, every=0.0)
    assert progress.line(3, tmp_path) is None  # nothing logged yet
    path = tmp_path / "metrics.jsonl"
    path.write_text(json.dumps({"step": 2, "train/loss": 3.5}) + "\n" + '{"step": 3, "train/lo')
    assert progress.line(3, tmp_path) == "#3 step 2/10 | loss 3.5000 | eta ?"
    assert progress.line(3, tmp_path) is None  # the same step: nothing new to say
    path.write_text(json.dumps({"step": 2, "train/loss": 3.5}) + "\n" + json.dumps({"step": 6, "train/loss": 3.0}))
    line = progress.line(3, tmp_path)
    assert line is not None and line.startswith("#3 step 6/10 | loss 3.0000 | eta 0:00:0")


@pytest.mark.unit
def test_wandb_says_once_why_it_logs_no_load_pictures(monkeypatch):
    """Before: without matplotlib W&B silently got no heatmaps. Catches silence, and a note repeated at every
    log step."""
    import logging
    import sys

    from moetrain.train import sinks

    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.pyplot", None)
    monkeypatch.setattr(sinks, "_SAID_NO_PICTURES", [])
    notes: list[str] = []
    monkeypatch.setattr(logging.getLogger("moetrain"), "warning", lambda message, *a, **k: notes.append(message))
    for step in (1, 2, 3):
        assert sinks.load_pictures(object(), step, {"moe/layer_1/load": [1.0, 2.0]}) == {}
    assert len(notes) == 1 and "no load pictures" in notes[0] and "matplotlib is missing" in notes[0]
    assert "scripts/setup.sh plot" in notes[0]


@pytest.mark.unit
def test_moetrain_plan_runs_with_no_arguments_and_prints_fitting_units(capsys):
    """Before: ``moetrain-plan`` failed on its own defaults (micro-batch 16 x 8 ranks > global 16) and printed
    ``0.0 GB`` for a small model. Catches either."""
    from moetrain.tools.plan import main

    main([])
    out = capsys.readouterr().out
    assert "6.86M parameters" in out and "micro-batch 2" in out
    assert " 0.0 GB" not in out and "MB" in out
