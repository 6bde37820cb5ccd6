"""Checkpoint layout (issue 27, item 3): ``meta.json``'s step is its directory's, a ``checkpoint.dir`` belongs to
one live run, and ``moetrain-export --from-hf`` neither replaces a run directory nor imports a partial model.

Each test failed on main before this change: a ``meta.json`` whose step disagreed with its ``step_NNNNNN`` was
resumed (steps retrained, a newer checkpoint pruned), a second run took a checkpoint dir another run held, and an
import replaced an existing ``config.yaml`` and left tensors missing from the folder randomly initialised.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from moetrain.config import from_dict, to_dict
from moetrain.train.checkpoint import CheckpointError, read_meta, resume_target
from moetrain.train.rundir import RunDirError, preflight
from moetrain.train.trainer import Trainer
from tests.conftest import tiny_train_config


@pytest.mark.unit
def test_a_meta_json_whose_step_is_not_its_directorys_is_refused(tmp_path):
    """Catches a checkpoint trusted for its step whatever its directory says (main: ``step_000002`` with
    ``"step": 1`` resumed at step 1, retraining step 2, and pruning ranked it as step 2)."""
    cfg = tiny_train_config(tmp_path, max_steps=2)
    cfg.checkpoint.every = 1
    Trainer(cfg, tmp_path / "run").fit()
    ckpt = tmp_path / "run" / "checkpoints" / "step_000002"
    meta = json.loads((ckpt / "meta.json").read_text())
    (ckpt / "meta.json").write_text(json.dumps({**meta, "step": 1}))
    for check in (lambda: read_meta(ckpt), lambda: resume_target(cfg, tmp_path / "run" / "checkpoints")):
        with pytest.raises(CheckpointError) as err:
            check()
        message = str(err.value)
        assert "\n" not in message and message.startswith(str(ckpt / "meta.json"))
        assert "step=1, but its directory is step_000002" in message


@pytest.mark.unit
def test_a_checkpoint_dir_outside_the_run_dir_is_locked_by_its_run(tmp_path):
    """Catches a shared ``checkpoint.dir`` left unlocked (main: the second run's preflight passed). The lock goes
    with the run's (released together); a refused run leaves no directory of its own behind."""
    shared = tmp_path / "shared_ckpts"
    first = tiny_train_config(tmp_path, max_steps=2)
    first.checkpoint.dir = str(shared)
    second = from_dict(to_dict(first))
    lock = preflight(first, tmp_path / "run_a")
    try:
        assert (shared / ".moetrain.lock").is_file()
        with pytest.raises(RunDirError) as err:
            preflight(second, tmp_path / "run_b")
        message = str(err.value)
        assert message.startswith(f"checkpoint.dir {shared}: in use by another run (pid ") and "\n" not in message
        assert message.endswith("choose another checkpoint.dir")
        assert not (tmp_path / "run_b").exists()
    finally:
        lock.release()
    preflight(second, tmp_path / "run_b").release()  # released with the run dir's lock
    inside = tiny_train_config(tmp_path, max_steps=2)
    inside.checkpoint.dir = str(tmp_path / "run_c" / "ckpts")  # inside its run dir: that lock covers it
    preflight(inside, tmp_path / "run_c").release()
    assert not (tmp_path / "run_c" / "ckpts").exists()


def _hf_folder(tmp_path: Path) -> Path:
    from tests.hf.test_transformers_interop import tiny_hf

    folder = tmp_path / "hf"
    tiny_hf("qwen3_moe").save_pretrained(str(folder))
    return folder


def _rewrite_weights(folder: Path, edit) -> None:  # type: ignore[no-untyped-def]
    from safetensors.torch import load_file, save_file

    (path,) = folder.glob("*.safetensors")
    state = load_file(str(path))
    edit(state)
    save_file(state, str(path), metadata={"format": "pt"})


@pytest.mark.unit
def test_from_hf_refuses_an_existing_run_dir_and_keeps_its_config(tmp_path, capsys):
    """Catches an import that writes into a directory holding a run (main: its ``config.yaml`` replaced)."""
    pytest.importorskip("transformers")
    from moetrain.tools.export import main

    folder = _hf_folder(tmp_path)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "config.yaml").write_text("mine: true\n")
    capsys.readouterr()  # transformers' progress bars of saving the folder
    assert main(["--from-hf", str(folder), str(run_dir)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"moetrain-export: {run_dir}: exists and holds config.yaml; import into a new directory " + (
        "(nothing was written)"
    )
    assert (run_dir / "config.yaml").read_text() == "mine: true\n" and sorted(run_dir.iterdir()) == [
        run_dir / "config.yaml"
    ]
    assert main(["--from-hf", str(folder), str(tmp_path / "new")]) == 0  # a new directory imports


@pytest.mark.unit
@pytest.mark.parametrize("damage", ["missing", "unexpected"])
def test_from_hf_refuses_missing_or_unexpected_tensors_naming_them(tmp_path, capsys, damage):
    """Catches an import that trusts ``from_pretrained`` to have found every tensor (main: a folder without
    ``lm_head`` / a ``q_proj`` imported with those weights random, exit 0; an extra tensor dropped silently)."""
    pytest.importorskip("transformers")
    from moetrain.tools.export import main

    folder = _hf_folder(tmp_path)
    if damage == "missing":
        _rewrite_weights(folder, lambda s: [s.pop("lm_head.weight"), s.pop("model.layers.1.self_attn.q_proj.weight")])
        needle = "its checkpoint lacks tensors the model needs: lm_head.weight, model.layers.1.self_attn.q_proj.weight"
    else:
        _rewrite_weights(folder, lambda s: s.__setitem__("model.layers.1.extra.weight", s["lm_head.weight"].clone()))
        needle = "its checkpoint holds tensors the model has no place for: model.layers.1.extra.weight"
    out = tmp_path / "imported"
    capsys.readouterr()
    assert main(["--from-hf", str(folder), str(out)]) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip() and "Loading weights" not in line]
    assert len(lines) == 1 and lines[0].startswith(f"moetrain-export: {folder}: ") and needle in lines[0], lines
    assert not out.exists()
