# Copyright the dit-hf authors. Licensed under the Apache License, Version 2.0.
"""At which noise levels does a small-data model decide the class? A diagnostic for a saved flow_x pipeline.

Held-out real images (class-balanced) are noised to a level s on the straight path, x_s = (1 - s) x_0 + s ε, and
integrated back to s = 0 with the pipeline's Euler steps below s and its saved guidance (scale and interval). Each
start is denoised twice: towards its own class and towards the next class (label + 1 mod classes). The judge scores
both against the class asked for:

- own class: how well the model keeps (or, from high s, rebuilds) a character of the right class;
- next class: how much the class label still decides the shape from that level on. Near 0 at low s (the shape is
  already fixed by the image), at s = 1 the model's plain accuracy from noise.

    python bench/small_data_levels.py outputs/small-data/rgb32-recipe --data outputs/glyphs/rgb32 --plot levels.png
"""

import argparse
import json
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from small_data import balanced_labels, prepare  # noqa: E402

from dit_hf import DiTPipeline  # noqa: E402

LEVELS = (0.2, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)


@torch.no_grad()
def denoise_from(pipe: DiTPipeline, x: torch.Tensor, labels: torch.Tensor, level: float) -> torch.Tensor:
    """Euler integration of a flow_x model from noise level `level` to 0: the noise levels of the pipeline's own
    scheduler at its default number of steps that lie below `level`, with its saved guidance scale and interval (from
    level 1 this is the pipeline's default call)."""
    config = pipe.config
    steps = config.get("default_num_inference_steps") or 50
    scale = config.get("default_guidance_scale") or 4.0
    interval = config.get("default_guidance_interval") or (0.0, 1.0)
    pipe.scheduler.set_timesteps(steps)
    below = [float(s) for s in pipe.scheduler.sigmas if float(s) < level - 1e-6]
    sigmas = [level, *below]
    null = torch.full_like(labels, pipe.num_classes)
    model, channels = pipe.transformer.eval(), x.shape[1]
    for sigma, following in zip(sigmas[:-1], sigmas[1:]):
        t = torch.full((len(x),), sigma * pipe.scheduler.config.num_train_timesteps)
        x0 = model(x, t, labels).sample[:, :channels]
        if scale != 1.0 and interval[0] <= sigma <= interval[1]:
            uncond = model(x, t, null).sample[:, :channels]
            x0 = uncond + scale * (x0 - uncond)
        velocity = (x - x0) / max(sigma, 1e-4)
        x = x + (following - sigma) * velocity
    return x


def plot_levels(runs: dict[str, list[dict]], path: str) -> None:
    """Accuracy towards the own and the next class against the start level, one colour per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    for (name, rows), colour in zip(runs.items(), ("tab:green", "tab:blue", "tab:orange", "tab:red")):
        levels = [row["level"] for row in rows]
        ax.plot(levels, [row["own"] for row in rows], "o-", color=colour, label=f"{name}: own class")
        ax.plot(levels, [row["next"] for row in rows], "o--", color=colour, label=f"{name}: next class")
    ax.set_xlabel("start level s (1 = pure noise)")
    ax.set_ylabel("judge accuracy towards the class asked for")
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title("real images noised to s, then denoised")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run")
    parser.add_argument("--data", required=True, help="the folder with train/, test/ and judge.pt")
    parser.add_argument("--num", type=int, default=200, help="held-out images per level")
    parser.add_argument("--levels", type=float, nargs="+", default=LEVELS)
    parser.add_argument("--plot", help="also draw the two curves into this PNG")
    args = parser.parse_args(argv)
    if not os.path.isdir(os.path.join(args.data, "test")):
        raise SystemExit(f"--data {args.data} has no test/ folder: point it at a data set `bench/small_data.py` made.")
    data = prepare(args.data, resolution=0, channels=0)  # an existing data set: nothing is written
    pipe = DiTPipeline.from_pretrained(args.run)
    if pipe.config.objective != "flow_x":
        raise ValueError(f"{args.run} is a {pipe.config.objective} model; this diagnostic integrates flow_x models.")
    images, classes = data["test"]
    wanted = balanced_labels(pipe.num_classes, args.num)
    by_class = {c: list(np.flatnonzero(classes == c)) for c in range(pipe.num_classes)}
    fewest = min(len(found) for found in by_class.values())
    if args.num > fewest * pipe.num_classes:
        raise SystemExit(f"--num {args.num}: the held-out split has {fewest} images of its rarest class; "
                         f"pass at most {fewest * pipe.num_classes}.")  # fmt: skip
    index = [by_class[c].pop(0) for c in wanted]
    x0 = torch.from_numpy(images[index]).permute(0, 3, 1, 2).float() / 127.5 - 1
    own = torch.tensor(wanted)
    other = (own + 1) % pipe.num_classes
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(0))
    rows = []
    for level in args.levels:
        xs = (1 - level) * x0 + level * noise
        row = {"level": level}
        for name, labels in (("own", own), ("next", other)):
            out = denoise_from(pipe, xs, labels, level)
            pixels = ((out / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
            row[name] = data["judge"].accuracy(pixels, labels.tolist())
        rows.append(row)
        print(json.dumps(row), flush=True)
    if args.plot:
        plot_levels({os.path.basename(os.path.normpath(args.run)): rows}, args.plot)
    return rows


if __name__ == "__main__":
    main()
