#!/usr/bin/env python
"""Quality of a digits pipeline across guidance scales: FID, precision/recall, class accuracy, classifier score.

For each guidance scale, `sample_for_eval` draws N class-balanced samples (seeded per image), which are scored
against all 1,797 real digits with the FID Inception network, and classified by an SVM fitted on the real digits.
A row for N real digits (a seeded subset) gives the floor that FID reaches at this N: FID is biased upwards at small
N, so compare rows with each other and with that floor, not with ImageNet numbers.

    accelerate launch train_dit.py                         # the embedded default run -> outputs/dit-digits
    python bench/digits_quality.py --pipeline outputs/dit-digits --scales 1 1.5 2 4
"""

import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import environment, markdown_table, write_results  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pipeline", default="outputs/dit-digits")
    p.add_argument("--scales", type=float, nargs="+", default=[1.0, 1.5, 2.0, 4.0])
    p.add_argument("--num_samples", type=int, default=500, help="A multiple of 10 (class-balanced).")
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--samples_dir", default="outputs/eval/digits-guidance")
    p.add_argument("--inception", default=None)
    p.add_argument("--out", default="bench/results/digits-guidance.json")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    import torch

    from dit_hf.evaluation import digits_accuracy, digits_classifier_score
    from dit_hf.metrics import InceptionExtractor, evaluate_samples, open_image_source
    from dit_hf.sample_eval import sample_for_eval

    args = parse_args(argv)
    extractor = InceptionExtractor(path=args.inception)
    rows, results = [], []

    real = open_image_source("digits").subset(args.num_samples, seed=args.seed)
    real_images = np.concatenate(list(real.batches(256)))
    scores = evaluate_samples(real_images, "digits", extractor=extractor)
    real_row = {"guidance_scale": None, "source": f"{args.num_samples} real digits", **scores}
    real_row["classifier_score"] = digits_classifier_score(real_images, splits=1)[0]
    results.append(real_row)

    for scale in args.scales:
        npz = sample_for_eval(
            args.pipeline,
            os.path.join(args.samples_dir, f"guidance-{scale:g}"),
            args.num_samples,
            labels="balanced",
            num_inference_steps=args.steps,
            guidance_scale=scale,
            seed=args.seed,
        )
        data = np.load(npz)
        images, labels = data["arr_0"], data["arr_1"]
        scores = evaluate_samples(images, "digits", extractor=extractor)
        row = {"guidance_scale": scale, "source": npz, **scores}
        row["digits_accuracy"] = digits_accuracy(images, labels)
        row["classifier_score"] = digits_classifier_score(images, splits=1)[0]
        results.append(row)
        print(f"guidance {scale:g}: FID {row['fid']:.2f}, accuracy {row['digits_accuracy']:.1%}", flush=True)

    for r in results:
        scale = "real digits" if r["guidance_scale"] is None else f"{r['guidance_scale']:g}"
        rows.append([scale, r["fid"], r["precision"], r["recall"], r.get("digits_accuracy"), r["classifier_score"]])
    env = environment(torch.device("cpu"))
    table = (
        f"Digits, {args.num_samples} class-balanced samples per row vs all 1,797 real digits, {args.steps} DDPM "
        f"steps, pipeline {args.pipeline} — {env['device']}, torch {env['torch']}\n\n"
        + markdown_table(["guidance", "FID", "precision", "recall", "class accuracy", "classifier score"], rows)
    )
    payload = {"environment": env, "settings": vars(args), "results": results}
    write_results(args.out, payload, table)
    return payload


if __name__ == "__main__":
    main()
