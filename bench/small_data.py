"""Small real data in pixel space: does the README command give recognisable samples, and how fast?

For each variant of the offline glyphs data set (28×28 grayscale, 32×32 RGB; `dit_hf.glyphs`), this script

1. writes the data set (train and held-out test image folders) unless it exists;
2. fits the judge (`dit_hf.evaluation.ImageClassifier`, a small CNN) on the train split and reports its held-out
   accuracy;
3. runs the README's small-data command verbatim (the line after `<!-- small-data-command -->`, with DATA_DIR and
   OUT_DIR substituted) and times it;
4. samples the saved pipeline with its default call (`pipe(class_labels)`), class-balanced, and scores class accuracy
   by the judge and FID against the held-out images; the reference is real train images against the same held-out
   images at the same N (the FID floor at that N);
5. scores the EMA weights of every checkpoint the same way (quality over steps) and, with `--paper`, does the same for
   a run that changes only the objective to the DiT paper's (ε-prediction, learned σ, uniform timesteps, DDPM sampler).

Results go to bench/results/small-data.json and .md, and the steps-to-quality figure to bench/results/small-data.png.

    python bench/small_data.py                       # both variants, recipe and paper objective (about 2 h)
    python bench/small_data.py --variants rgb32 --runs recipe    # one variant and run (merged into the results)
    python bench/small_data.py --variants gray28 --num_eval 300
    python bench/small_data.py eval OUT_DIR --data outputs/glyphs/gray28   # score one finished run
"""

import argparse
import json
import os
import shlex
import subprocess
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))

from dit_hf import DiTModel, DiTPipeline  # noqa: E402
from dit_hf.class_probe import ClassProbe, fit_probe_on_features  # noqa: E402
from dit_hf.evaluation import ImageClassifier  # noqa: E402
from dit_hf.glyphs import make_glyphs_dataset  # noqa: E402
from dit_hf.metrics import InceptionExtractor, compute_stats, fid_from_stats  # noqa: E402

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
RESULTS = os.path.join(ROOT, "bench", "results")
VARIANTS = {"gray28": dict(resolution=28, channels=1), "rgb32": dict(resolution=32, channels=3)}
# What the DiT paper's objective changes, all else equal (for the comparison rows).
PAPER_FLAGS = (
    "--objective ddpm_eps --timestep_sampling uniform --learn_sigma --sample_scheduler ddpm --guidance_interval 0 1"
)


def readme_command() -> str:
    with open(os.path.join(ROOT, "README.md")) as f:
        lines = f.read().splitlines()
    for i, line in enumerate(lines):
        if line.strip() == "<!-- small-data-command -->":
            body = [s for s in lines[i + 1 : i + 4] if s.strip() and not s.startswith("```")]
            return body[0].strip()
    raise ValueError("README.md has no line after <!-- small-data-command -->.")


def load_folder(folder: str) -> tuple[np.ndarray, np.ndarray]:
    """An image folder of class subfolders -> uint8 images (N, H, W, C) and labels, classes in sorted order."""
    from PIL import Image

    images, labels = [], []
    for label, name in enumerate(sorted(os.listdir(folder))):
        for file in sorted(os.listdir(os.path.join(folder, name))):
            images.append(np.asarray(Image.open(os.path.join(folder, name, file))))
            labels.append(label)
    images = np.stack(images)
    return (images[..., None] if images.ndim == 3 else images), np.asarray(labels)


def prepare(data_dir: str, resolution: int, channels: int) -> dict:
    if not os.path.isdir(os.path.join(data_dir, "test")):
        make_glyphs_dataset(data_dir, resolution=resolution, channels=channels)
    train, test = load_folder(os.path.join(data_dir, "train")), load_folder(os.path.join(data_dir, "test"))
    judge_path = os.path.join(data_dir, "judge.pt")
    if os.path.isfile(judge_path):
        judge = ImageClassifier.load(judge_path)
    else:
        judge = ImageClassifier.fit(*train)
        judge.save(judge_path)
    return {"dir": data_dir, "train": train, "test": test, "judge": judge, "judge_accuracy": judge.accuracy(*test)}


def inception_probe(data: dict, extractor: InceptionExtractor, num_images: int = 1000) -> ClassProbe:
    """A second, independent judge: the linear probe of `dit-hf evaluate` on the Inception features of real training
    images (fitted once, kept beside the data as inception_probe.npz). Unlike the CNN judge it shares neither
    architecture nor training with anything the trainer may fit (`--repa_encoder classifier`)."""
    path = os.path.join(data["dir"], "inception_probe.npz")
    if os.path.isfile(path):
        return ClassProbe.load(path)
    images, labels = data["train"]
    chosen = np.random.default_rng(1).permutation(len(labels))[:num_images]
    probe = fit_probe_on_features(extractor(images[chosen]), labels[chosen])
    probe.save(path)
    return probe


def balanced_labels(num_classes: int, n: int) -> list[int]:
    return [i % num_classes for i in range(n)]


def generate(pipe: DiTPipeline, labels: list[int], batch_size: int = 100, seed: int = 0, **call) -> np.ndarray:
    pipe.set_progress_bar_config(disable=True)
    generator = torch.Generator().manual_seed(seed)
    out = []
    for start in range(0, len(labels), batch_size):
        images = pipe(labels[start : start + batch_size], generator=generator, output_type="np", **call).images
        out.append((images * 255).round().clip(0, 255).astype(np.uint8))
    return np.concatenate(out)


class Scorer:
    """Judge accuracy and FID against the held-out images, with the real-vs-real floor at the same N."""

    def __init__(self, data: dict, num_eval: int):
        self.data, self.n = data, num_eval
        self.extractor = InceptionExtractor(batch_size=50)
        rng = np.random.default_rng(0)
        test_idx = rng.permutation(len(data["test"][0]))[:num_eval]
        train_idx = rng.permutation(len(data["train"][0]))[:num_eval]
        self.reference = compute_stats(data["test"][0][test_idx], self.extractor)
        real = compute_stats(data["train"][0][train_idx], self.extractor)
        self.real_fid = fid_from_stats(real, self.reference)
        self.num_classes = int(data["train"][1].max()) + 1
        self.probe = inception_probe(data, self.extractor)

    def __call__(self, pipe: DiTPipeline, **call) -> dict:
        labels = balanced_labels(self.num_classes, self.n)
        start = time.perf_counter()
        images = generate(pipe, labels, **call)
        seconds = time.perf_counter() - start
        stats = compute_stats(images, self.extractor)
        fid = fid_from_stats(stats, self.reference)
        accuracy = self.data["judge"].accuracy(images, labels)
        probe_accuracy = self.probe.accuracy(stats, labels)
        return {
            "accuracy": accuracy,
            "probe_accuracy": probe_accuracy,
            "fid": fid,
            "fid_ratio": fid / self.real_fid,
            "sample_s": round(seconds, 1),
        }


def score_checkpoints(run_dir: str, scorer: Scorer) -> list[dict]:
    """The EMA weights of each checkpoint, sampled with the run's saved pipeline settings."""
    pipe = DiTPipeline.from_pretrained(run_dir)
    rows = []
    checkpoints = os.path.join(run_dir, "checkpoints")
    for name in sorted(os.listdir(checkpoints), key=lambda n: int(n.split("-")[-1])):
        ema = sorted(d for d in os.listdir(os.path.join(checkpoints, name)) if d.startswith("ema_"))[0]
        pipe.transformer = DiTModel.from_pretrained(os.path.join(checkpoints, name, ema))
        rows.append({"step": int(name.split("-")[-1]), **scorer(pipe)})
        print(f"  {run_dir} step {rows[-1]['step']}: {rows[-1]}", flush=True)
    return rows


def run_command(command: str, data_dir: str, out_dir: str, extra: str = "") -> float:
    command = command.replace("DATA_DIR", shlex.quote(data_dir)).replace("OUT_DIR", shlex.quote(out_dir))
    # A rerun of the benchmark measures afresh: the previous run's outputs in out_dir are replaced, not resumed.
    command = f"{command} {extra} --overwrite_output_dir".strip()
    print(f"+ {command}", flush=True)
    start = time.time()
    env = {**os.environ, "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1"}
    subprocess.run(command, shell=True, check=True, cwd=ROOT, env=env)
    return time.time() - start


def bench_variant(name: str, args) -> dict:
    spec = VARIANTS[name]
    data_dir = os.path.join(args.data_root, name)
    data = prepare(data_dir, spec["resolution"], spec["channels"])
    print(f"{name}: judge {data['judge_accuracy']:.1%} on held-out real images", flush=True)
    scorer = Scorer(data, args.num_eval)
    result = {"variant": name, **spec, "judge_accuracy": data["judge_accuracy"], "real_fid": scorer.real_fid}
    runs = {
        "recipe": "",
        "paper": f"{PAPER_FLAGS} --max_train_steps {args.paper_steps}" if args.paper_steps else PAPER_FLAGS,
    }
    for run in args.runs:
        extra = runs[run]
        out_dir = os.path.join(args.out_root, f"{name}-{run}")
        seconds = run_command(args.command or readme_command(), os.path.join(data_dir, "train"), out_dir, extra)
        final = scorer(DiTPipeline.from_pretrained(out_dir))
        print(f"{name} {run}: {seconds:.0f} s, default call {final}", flush=True)
        result[run] = {"wall_s": round(seconds, 1), "final": final, "steps": score_checkpoints(out_dir, scorer)}
        with open(os.path.join(out_dir, "summary.json")) as f:
            search = json.load(f).get("guidance_search")
        if search:  # checkpoints and the final call all sample at the scale the trainer chose
            result[run]["guidance_search"] = search
    return result


def load_results(path: str) -> list[dict]:
    if not os.path.isfile(path + ".json"):
        return []
    with open(path + ".json") as f:
        return json.load(f)


def write_results(results: list[dict], path: str) -> None:
    with open(path + ".json", "w") as f:
        json.dump(results, f, indent=2)
    lines = [
        "| data | run | step | class accuracy | FID | FID / real-vs-real | wall time |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results:
        for run in ("recipe", "paper"):
            if run not in r:
                continue
            for row in r[run]["steps"]:
                lines.append(
                    f"| {r['variant']} | {run} | {row['step']} | {row['accuracy']:.1%} | {row['fid']:.1f} | "
                    f"{row['fid_ratio']:.2f} | {r[run]['wall_s'] / 60:.1f} min |"
                )
            search = r[run].get("guidance_search")
            if search:
                trials = ", ".join(f"{t['scale']:g}: {t['accuracy']:.1%}" for t in search["trials"])
                lines.append(
                    f"| {r['variant']} | {run}: guidance {search['chosen']:g} chosen by the trainer's CNN "
                    f"({trials}) | | | | | |"
                )
        lines.append(
            f"| {r['variant']} | real vs real | | {r['judge_accuracy']:.1%} (judge) | {r['real_fid']:.1f} | 1 | |"
        )
    with open(path + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")
    from dit_hf.plots import plot_steps_to_quality

    rows = [
        {"variant": f"{r['variant']} {run}", "step": s["step"], "class accuracy": s["accuracy"], "FID": s["fid"]}
        for r in results
        for run in ("recipe", "paper")
        if run in r
        for s in r[run]["steps"]
    ]
    plot_steps_to_quality(rows, path + ".png", metrics=("class accuracy", "FID"))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--data_root", default=os.path.join(ROOT, "outputs", "glyphs"))
    parser.add_argument("--out_root", default=os.path.join(ROOT, "outputs", "small-data"))
    parser.add_argument("--num_eval", type=int, default=300, help="Samples (and real images) per FID / accuracy.")
    parser.add_argument("--runs", nargs="+", default=["recipe", "paper"], choices=("recipe", "paper"))
    parser.add_argument("--paper_steps", type=int, default=None, help="Train the paper-objective run this long.")
    parser.add_argument("--command", default=None, help="Instead of README's small-data command.")
    parser.add_argument("--results", default=os.path.join(RESULTS, "small-data"))
    args = parser.parse_args(argv)
    torch.set_num_threads(os.cpu_count() or 1)
    results = {r["variant"]: r for r in load_results(args.results)}
    for name in args.variants:
        new = bench_variant(name, args)
        results[name] = {**results.get(name, {}), **new}  # runs measured earlier are kept
    results = [results[name] for name in VARIANTS if name in results]
    write_results(results, args.results)
    print(open(args.results + ".md").read())


def eval_main(argv):
    parser = argparse.ArgumentParser(prog="small_data.py eval")
    parser.add_argument("run_dir")
    parser.add_argument("--data", required=True, help="A glyphs variant folder (with train/ and test/).")
    parser.add_argument("--num_eval", type=int, default=300)
    parser.add_argument("--checkpoints", action="store_true", help="Also score every checkpoint's EMA.")
    parser.add_argument("--call", default="{}", help="JSON of pipeline call arguments, e.g. guidance_scale.")
    args = parser.parse_args(argv)
    name = os.path.basename(os.path.normpath(args.data))
    data = prepare(args.data, VARIANTS[name]["resolution"], VARIANTS[name]["channels"])
    scorer = Scorer(data, args.num_eval)
    print(
        f"judge {data['judge_accuracy']:.1%}, Inception probe {scorer.probe.held_out_accuracy:.1%} on held-out real "
        f"images, real-vs-real FID {scorer.real_fid:.1f}",
        flush=True,
    )
    print("default call:", scorer(DiTPipeline.from_pretrained(args.run_dir), **json.loads(args.call)), flush=True)
    if args.checkpoints:
        score_checkpoints(args.run_dir, scorer)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "eval":
        eval_main(sys.argv[2:])
    else:
        main()
