"""Training plots from metrics.jsonl, `dit-hf plot`, and the steps-to-quality figure."""

import json
import os

import numpy as np
import PIL.Image
import pytest

from dit_hf import plots
from dit_hf.cli import main
from dit_hf.plots import plot_steps_to_quality, read_metrics, write_plots


def write_log(folder, rows) -> str:
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, "metrics.jsonl")
    with open(path, "w") as f:
        for row in rows:
            f.write((row if isinstance(row, str) else json.dumps(row)) + "\n")
    return path


def training_row(step: int, **extra) -> dict:
    row = {"step": step, "loss": 1.0 / step, "lr": 1e-4 * min(1.0, step / 20), "img_per_s": 100.0 + step}
    row.update({f"loss_q{k}": (4 - k) / step for k in range(4)}, epoch=step // 30, skipped_steps=0)
    return {**row, **extra}


def resumed_run() -> list:
    """Steps 10..50, a crash, then a resume from step 30: steps 40 and 50 are logged twice."""
    rows = [training_row(step) for step in (10, 20, 30, 40, 50)]
    rows.insert(3, {"step": 30, "eval/fid": 90.0, "eval/precision": 0.5, "eval/recall": None})
    rows += [training_row(40, loss=0.4), "", training_row(50, loss=0.5), training_row(60)]
    rows.append({"step": 60, "eval/fid": 70.0, "eval/precision": 0.6, "eval/recall": 0.2, "eval/note": "text"})
    rows.append({"step": 60, "eval/class_accuracy": 0.8, "eval/probe_held_out_accuracy": 0.97})
    return rows


def test_read_metrics_keeps_the_last_value_of_each_step(tmp_path):
    series = read_metrics(write_log(tmp_path, resumed_run()))
    steps, loss = series["loss"]
    assert steps.tolist() == [10, 20, 30, 40, 50, 60]
    assert loss.tolist() == pytest.approx([0.1, 0.05, 1 / 30, 0.4, 0.5, 1 / 60])
    assert series["eval/fid"][0].tolist() == [30, 60] and series["eval/fid"][1].tolist() == [90.0, 70.0]
    assert series["eval/recall"][0].tolist() == [60]  # null at step 30: no point
    assert series["eval/class_accuracy"][1].tolist() == [0.8]
    assert "eval/note" not in series and "step" not in series and series["skipped_steps"][1].tolist() == [0] * 6


def test_a_later_null_deletes_the_value_of_that_step(tmp_path):
    path = write_log(tmp_path, [{"step": 5, "grad_norm": 2.0}, {"step": 5, "grad_norm": None}, {"step": 6}])
    assert read_metrics(path) == {}


@pytest.mark.parametrize(
    "line, message",
    [
        ('{"step": 30, "loss": 0.', r"line 3: not valid JSON"),
        ('{"loss": 0.5}', r'line 3: expected a JSON object with an integer "step", got \'{"loss": 0.5}\''),
        ('{"step": "30"}', r'line 3: expected a JSON object with an integer "step"'),
        ("[1, 2]", r'line 3: expected a JSON object with an integer "step"'),
    ],
)
def test_a_bad_line_names_the_file_and_line(tmp_path, line, message):
    path = write_log(tmp_path, [training_row(10), training_row(20), line, training_row(30)])
    with pytest.raises(ValueError, match=f"^{path}, {message}"):
        read_metrics(path)


def test_missing_log_names_the_fix(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"metrics.jsonl' does not exist; train_dit.py writes it"):
        write_plots(str(tmp_path))


def png_pixels(path) -> np.ndarray:
    with PIL.Image.open(path) as image:
        assert image.format == "PNG" and image.size == (640, 400)
        return np.asarray(image.convert("RGB"))


def test_write_plots_draws_one_figure_per_group(tmp_path):
    write_log(tmp_path, resumed_run())
    paths = write_plots(str(tmp_path))
    names = ["loss", "loss_by_timestep", "lr", "img_per_s", "eval_accuracy", "eval_fid", "eval_precision_recall"]
    assert paths == [str(tmp_path / "plots" / f"{name}.png") for name in names]
    assert sorted(os.listdir(tmp_path / "plots")) == sorted(f"{name}.png" for name in names)  # no temporary files
    for path in paths:
        pixels = png_pixels(path)
        assert (pixels < 128).any(axis=-1).mean() > 0.01  # text and lines, not a blank canvas

    # No grad_norm (clipping off) and no eval rows: those figures are not drawn.
    only_training = tmp_path / "training"
    write_log(only_training, [training_row(step) for step in (10, 20)])
    assert [os.path.basename(p) for p in write_plots(str(only_training))] == [
        "loss.png",
        "loss_by_timestep.png",
        "lr.png",
        "img_per_s.png",
    ]
    other = tmp_path / "other"
    write_log(other, [training_row(10, grad_norm=0.5, mfu=0.3), {"step": 10, "eval/inception_score": 5.0}])
    drawn = [os.path.basename(p) for p in write_plots(str(other))]
    assert {"grad_norm.png", "mfu.png", "eval_inception_score.png"} <= set(drawn)


def test_write_plots_redraws_only_what_changed(tmp_path):
    rows = resumed_run()
    write_log(tmp_path, rows)
    write_plots(str(tmp_path))
    before = {name: (tmp_path / "plots" / name).read_bytes() for name in os.listdir(tmp_path / "plots")}
    mtimes = {name: os.stat(tmp_path / "plots" / name).st_mtime_ns for name in before}
    write_log(tmp_path, rows + [training_row(70)])
    write_plots(str(tmp_path))
    changed = {name for name in before if os.stat(tmp_path / "plots" / name).st_mtime_ns != mtimes[name]}
    assert changed == {"loss.png", "loss_by_timestep.png", "lr.png", "img_per_s.png"}
    assert (tmp_path / "plots" / "loss.png").read_bytes() != before["loss.png"]
    os.remove(tmp_path / "plots" / "eval_fid.png")  # a deleted figure is drawn again
    write_plots(str(tmp_path))
    assert (tmp_path / "plots" / "eval_fid.png").read_bytes() == before["eval_fid.png"]


def test_cli_plot(tmp_path, capsys, monkeypatch):
    write_log(tmp_path / "run", resumed_run())
    monkeypatch.setattr(plots, "_drawn", {})
    written = main(["plot", str(tmp_path / "run")])
    assert len(written) == 7 and capsys.readouterr().out.split() == written
    with pytest.raises(SystemExit) as exit_info:
        main(["plot", str(tmp_path / "nowhere")])
    assert exit_info.value.code == 2 and "dit-hf plot: error:" in capsys.readouterr().err


def test_steps_to_quality(tmp_path):
    results = [
        {"variant": "flow", "step": 1000, "class_accuracy": 0.8, "fid": 60.0},
        {"variant": "flow", "step": 500, "class_accuracy": 0.5, "fid": 90.0},
        {"variant": "eps", "step": 500, "class_accuracy": 0.2, "fid": 150.0, "wall_s": 30},
        {"variant": "eps", "step": 1000, "class_accuracy": 0.3},
    ]
    (tmp_path / "results.json").write_text(json.dumps({"results": results}))
    out = tmp_path / "figures" / "steps.png"
    assert plot_steps_to_quality(str(tmp_path / "results.json"), str(out), title="Recipes") == str(out)
    with PIL.Image.open(out) as image:
        assert image.size == (3 * 480, 400)  # class_accuracy, fid, wall_s: one panel each
    two = tmp_path / "two.png"
    plot_steps_to_quality(results, str(two), metrics=["class_accuracy", "fid"])
    with PIL.Image.open(two) as image:
        assert image.size == (2 * 480, 400)
    assert os.listdir(tmp_path / "figures") == ["steps.png"]
    with pytest.raises(ValueError, match=r"results\[1\] needs a \"variant\" and an integer \"step\""):
        plot_steps_to_quality([results[0], {"step": 5, "fid": 1.0}], str(two))
    with pytest.raises(ValueError, match="no numeric metric besides step"):
        plot_steps_to_quality([{"variant": "a", "step": 1}], str(two))
    (tmp_path / "bad.json").write_text("[{")
    with pytest.raises(ValueError, match="bad.json' is not valid JSON"):
        plot_steps_to_quality(str(tmp_path / "bad.json"), str(two))
