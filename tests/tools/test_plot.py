"""moetrain-plot: the expected PNGs from a recorded metrics.jsonl, for one run and for a sweep."""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest

from moetrain.tools.plot import load_matrix, main, moe_layers, read_metrics, series

pytestmark = pytest.mark.unit

# Per test, not per module: the data extraction needs no matplotlib (CI installs it; a skip there fails the run).
needs_matplotlib = pytest.mark.skipif(importlib.util.find_spec("matplotlib") is None, reason="needs the plot extra")


def write_run(run_dir, skew: float) -> None:
    run_dir.mkdir(parents=True)
    lines = []
    for step in range(10, 60, 10):
        loads = {f"moe/layer_{i}/load": [int(100 + skew * step * (e == 0)) for e in range(4)] for i in (1, 2)}
        lines.append(
            {
                "step": step,
                "train/loss": 5.0 - step / 20,
                "moe/maxvio": 0.1,
                "moe/layer_1/maxvio": 0.1,
                "moe/layer_2/maxvio": 0.2,
                "moe/layer_1/drop_frac": 0.0,
                "moe/layer_2/drop_frac": 0.01,
                **loads,
            }
        )
        if step % 20 == 0:
            lines.append({"step": step, "val/loss": 4.9 - step / 20, "val/maxvio_global": 0.1})
    (run_dir / "metrics.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n{cut by a cra")


@needs_matplotlib
def test_plot_one_run_writes_the_figures(tmp_path, capsys):
    run = tmp_path / "run"
    write_run(run, skew=2.0)
    main([str(run)])
    names = {p.name for p in (run / "plots").iterdir()}
    assert names == {"loss.png", "maxvio.png", "load_heatmap.png", "drop_frac.png"}
    for name in names:
        assert (run / "plots" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert capsys.readouterr().out.count(".png") == 4


def test_plot_data_extraction():
    records = [{"step": 10, "moe/layer_3/load": [1, 3], "train/loss": 2.0}, {"step": 20, "moe/layer_3/load": [2, 2]}]
    assert moe_layers(records) == [3]
    steps, share = load_matrix(records, 3)
    assert steps.tolist() == [10, 20]
    np.testing.assert_allclose(share, [[0.25, 0.5], [0.75, 0.5]])
    assert series(records, "train/loss")[1].tolist() == [2.0]


@needs_matplotlib
def test_plot_a_sweep_overlays_runs(tmp_path):
    for j, skew in enumerate((0.0, 3.0)):
        write_run(tmp_path / "sweep" / str(j), skew)
    assert len(read_metrics(tmp_path / "sweep" / "0")) == 7  # 5 train + 2 val; the cut last line is skipped
    main([str(tmp_path / "sweep"), "--out", str(tmp_path / "figs")])
    names = {p.name for p in (tmp_path / "figs").iterdir()}
    assert {"loss.png", "maxvio.png", "load_heatmap_sweep_0.png", "load_heatmap_sweep_1.png"} <= names
    with pytest.raises(SystemExit, match=r"no metrics\.jsonl"):
        main([str(tmp_path / "figs")])


@needs_matplotlib
def test_dropless_run_draws_no_drop_fraction_and_html_report_has_everything(tmp_path, capsys):
    run = tmp_path / "run"
    write_run(run, skew=1.0)
    text = (run / "metrics.jsonl").read_text().replace('"moe/layer_2/drop_frac": 0.01', '"moe/layer_2/drop_frac": 0.0')
    (run / "metrics.jsonl").write_text(text)
    (run / "config.yaml").write_text("optim:\n  lr: 0.002\n")
    main([str(run), "--html"])
    names = {p.name for p in (run / "plots").iterdir()}
    assert "drop_frac.png" not in names and "report.html" in names
    page = (run / "plots" / "report.html").read_text()
    assert page.count("data:image/png;base64,") == len(names) - 1  # every figure embedded
    assert "lr: 0.002" in page and "val/loss" in page and "load heatmap" in page


@needs_matplotlib
def test_step_load_figure_has_one_row_per_layer():
    from moetrain.tools.plot import step_load_figure

    fig = step_load_figure({f"moe/layer_{i}/load": [1, 2, 3, 4] * 16 for i in range(1, 61)}, step=7)
    assert fig.axes[0].images[0].get_array().shape == (60, 64)
