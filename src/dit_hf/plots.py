# Copyright the dit-hf authors. Licensed under the Apache License, Version 2.0.
"""Training curves as PNG files, drawn from an output folder's `metrics.jsonl`: readable without wandb or TensorBoard.

`metrics.jsonl` holds one JSON object per line with an integer "step": the training rows (loss, loss_q0..loss_q3,
lr, grad_norm, img_per_s, ...) and the evaluation rows (keys prefixed "eval/", e.g. eval/fid). [`write_plots`]
writes one figure per metric group under `OUTPUT_DIR/plots/`; `dit-hf plot OUTPUT_DIR` calls it.
[`plot_steps_to_quality`] draws benchmark results (quality against training steps, one line per variant).

Figures are drawn on matplotlib's Agg canvas directly (no pyplot, so no global backend or figure state) and written
atomically, so a viewer never sees half a file while training redraws them.
"""

import hashlib
import json
import os

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure, SubplotParams

METRICS_FILE = "metrics.jsonl"
PLOTS_DIR = "plots"

# Training figures: (file name, title, y label, keys, log scale). Drawn when the log holds any of the keys.
TRAINING_FIGURES = (
    ("loss", "Training loss", "loss (mean over the logging window)", ("loss",), True),
    (
        "loss_by_timestep",
        "Training loss by timestep quartile",
        "loss (mean over the logging window)",
        ("loss_q0", "loss_q1", "loss_q2", "loss_q3"),
        True,
    ),
    ("lr", "Learning rate", "learning rate", ("lr",), False),
    ("grad_norm", "Gradient norm (before clipping)", "global L2 norm", ("grad_norm",), True),
    ("img_per_s", "Training throughput", "images / s", ("img_per_s",), False),
    ("repa_loss", "REPA alignment loss", "loss", ("repa_loss",), False),
    ("mfu", "Model FLOPs utilisation", "MFU (fraction of --peak_tflops)", ("mfu",), False),
    ("peak_mem_gib", "Peak accelerator memory", "GiB", ("peak_mem_gib",), False),
)
KEY_LABELS = {
    "loss_q0": "q0: t < T/4 (least noise)",
    "loss_q1": "q1: T/4 ≤ t < T/2",
    "loss_q2": "q2: T/2 ≤ t < 3T/4",
    "loss_q3": "q3: t ≥ 3T/4 (most noise)",
    "eval/probe_held_out_accuracy": "probe on held-out real images (ceiling)",
}
REFERENCE_LINES = {"eval/probe_held_out_accuracy"}  # drawn dashed: a level to read the others against
# Evaluation figures: metrics that share a scale share a figure; any other eval/ key gets its own.
EVAL_GROUPS = (
    ("eval_fid", "FID against the reference (lower is better)", "FID", lambda name: name.startswith("fid")),
    ("eval_precision_recall", "Precision and recall", "fraction", lambda name: name in ("precision", "recall")),
    ("eval_accuracy", "Class accuracy of samples", "fraction of samples", lambda name: name.endswith("accuracy")),
)


def read_metrics(path: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """`{key: (steps, values)}` of every numeric key in a `metrics.jsonl`, sorted by step.

    A resumed run logs again the steps after its last checkpoint: for a step seen more than once, the last value
    wins (a `null` deletes the earlier one). Keys a line lacks are simply absent at that step; non-numeric values
    are skipped. A line that is not a JSON object with an integer "step" raises ValueError naming the file and line.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path!r} does not exist; train_dit.py writes it into --output_dir as it logs.")
    series: dict[str, dict[int, float]] = {}
    with open(path) as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(
                    f"{path}, line {number}: not valid JSON ({err.msg}, column {err.colno}); repair or delete "
                    "the line."
                ) from err
            step = row.get("step") if isinstance(row, dict) else None
            if not isinstance(step, int) or isinstance(step, bool):
                raise ValueError(
                    f'{path}, line {number}: expected a JSON object with an integer "step", got '
                    f"{line.strip()[:80]!r}; repair or delete the line."
                )
            for key, value in row.items():
                if value is None:
                    series.get(key, {}).pop(step, None)
                elif key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                    series.setdefault(key, {})[step] = float(value)
    return {
        key: (np.array(sorted(values), np.int64), np.array([values[s] for s in sorted(values)], np.float64))
        for key, values in series.items()
        if values
    }


def _save(figure: Figure, path: str) -> str:
    """Write a PNG through a temporary file and a rename: readers see the old figure or the new one, never half."""
    temporary = f"{path}.{os.getpid()}.tmp"
    FigureCanvasAgg(figure).print_png(temporary)
    os.replace(temporary, path)
    return path


def _draw(path: str, title: str, ylabel: str, lines: list[tuple[str, np.ndarray, np.ndarray]], log: bool) -> str:
    # Fixed margins: a constrained layout would more than double the time to draw.
    figure = Figure(
        figsize=(6.4, 4.0), dpi=100, subplotpars=SubplotParams(left=0.12, right=0.97, bottom=0.12, top=0.92)
    )
    axes = figure.add_subplot()
    for key, steps, values in lines:
        label = KEY_LABELS.get(key, key.removeprefix("eval/"))
        if key in REFERENCE_LINES:
            axes.plot(steps, values, label=label, ls="--", color="0.4")
        else:  # markers where points are sparse (evaluations), so a single point still shows
            axes.plot(steps, values, label=label, marker="o" if len(steps) <= 30 else None)
    finite = np.concatenate([values[np.isfinite(values)] for _, _, values in lines])
    if log and len(finite) and finite.min() > 0 and finite.max() > 10 * finite.min():
        axes.set_yscale("log")
    axes.set(title=title, xlabel="training step", ylabel=ylabel)
    axes.grid(alpha=0.3, which="both")
    if len(lines) > 1:
        axes.legend()
    return _save(figure, path)


def _eval_figures(series: dict) -> list[tuple[str, str, str, list[str]]]:
    """`(file name, title, y label, keys)` of the eval/ metrics present, grouped by `EVAL_GROUPS`."""
    figures = {}
    for key in sorted(k for k in series if k.startswith("eval/")):
        name = key[len("eval/") :]
        stem, title, ylabel = next(
            ((s, t, y) for s, t, y, member in EVAL_GROUPS if member(name)),
            (f"eval_{name}", f"Evaluation: {name}", name),
        )
        figures.setdefault(stem, (stem, title, ylabel, []))[3].append(key)
    return list(figures.values())


# What this process last drew into each file: a figure whose data has not changed is not drawn again.
_drawn: dict[str, str] = {}


def _digest(title: str, lines: list[tuple[str, np.ndarray, np.ndarray]]) -> str:
    digest = hashlib.sha256(title.encode())
    for key, steps, values in lines:
        digest.update(key.encode() + steps.tobytes() + values.tobytes())
    return digest.hexdigest()


def write_plots(output_dir: str) -> list[str]:
    """Draw `output_dir/metrics.jsonl` into `output_dir/plots/*.png`; returns the paths of the figures.

    One figure per group present: loss, loss by timestep quartile, lr, grad norm, img/s (and REPA loss, MFU, peak
    memory when logged), then the evaluation metrics: FID, precision and recall, class accuracy (with the probe's
    held-out accuracy as its ceiling), and one figure for each other eval/ key.

    Cheap enough for every logging step: a figure costs about 45 ms of CPU, and a figure this process already drew
    from the same data is left as it is (so a logging step redraws the training figures, an evaluation the
    evaluation ones). Call it on the main process only.
    """
    series = read_metrics(os.path.join(output_dir, METRICS_FILE))
    folder = os.path.join(output_dir, PLOTS_DIR)
    os.makedirs(folder, exist_ok=True)
    figures = [(stem, title, ylabel, keys, log) for stem, title, ylabel, keys, log in TRAINING_FIGURES]
    figures += [(stem, title, ylabel, keys, False) for stem, title, ylabel, keys in _eval_figures(series)]
    paths = []
    for stem, title, ylabel, keys, log in figures:
        lines = [(key, *series[key]) for key in keys if key in series]
        if not lines:
            continue
        path = os.path.abspath(os.path.join(folder, f"{stem}.png"))
        digest = _digest(title, lines)
        if _drawn.get(path) != digest or not os.path.isfile(path):
            _draw(path, title, ylabel, lines, log)
            _drawn[path] = digest
        paths.append(path)
    return paths


def _load_results(results) -> list[dict]:
    if isinstance(results, (str, os.PathLike)):
        with open(results) as f:
            try:
                results = json.load(f)
            except json.JSONDecodeError as err:
                raise ValueError(f"{os.fspath(results)!r} is not valid JSON ({err}).") from err
    if isinstance(results, dict) and "results" in results:
        results = results["results"]
    if not isinstance(results, list) or not results:
        raise ValueError("Steps-to-quality results must be a non-empty list of {variant, step, metric: value} rows.")
    for index, row in enumerate(results):
        if not isinstance(row, dict) or "variant" not in row or not isinstance(row.get("step"), int):
            raise ValueError(f'results[{index}] needs a "variant" and an integer "step", got {row!r}.')
    return results


def plot_steps_to_quality(results, path: str, metrics: list[str] | None = None, title: str | None = None) -> str:
    """Quality against training steps, one line per variant and one panel per metric; returns `path`.

    Args:
        results: a list of rows `{"variant": str, "step": int, <metric>: number, ...}`, or the path of a JSON file
            holding that list (or an object with it under "results"), as benchmark scripts write them.
        path (`str`): the PNG to write.
        metrics (`list[str]`, *optional*): the panels, in order; default every numeric key of the rows.
        title (`str`, *optional*): the figure's title.
    """
    rows = _load_results(results)
    if metrics is None:
        metrics = list(
            dict.fromkeys(
                key
                for row in rows
                for key, value in row.items()
                if key not in ("variant", "step") and isinstance(value, (int, float)) and not isinstance(value, bool)
            )
        )
    if not metrics:
        raise ValueError('The results hold no numeric metric besides step; add e.g. "fid" or "class_accuracy".')
    variants = list(dict.fromkeys(str(row["variant"]) for row in rows))
    figure = Figure(figsize=(4.8 * len(metrics), 4.0), dpi=100, layout="constrained")
    for axes, metric in zip(figure.subplots(1, len(metrics), squeeze=False)[0], metrics):
        for variant in variants:
            points = sorted(
                (row["step"], row[metric])
                for row in rows
                if str(row["variant"]) == variant and isinstance(row.get(metric), (int, float))
            )
            if points:
                axes.plot(*zip(*points), marker="o", label=variant)
        better = " (lower is better)" if metric.startswith("fid") else ""
        better = " (higher is better)" if metric.endswith("accuracy") else better
        axes.set(title=f"{metric}{better}", xlabel="training step", ylabel=metric)
        axes.grid(alpha=0.3)
        axes.legend()
    if title:
        figure.suptitle(title)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    return _save(figure, path)
