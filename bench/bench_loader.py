#!/usr/bin/env python
"""Input pipeline throughput: the cached-latent loader the trainer uses, without the model.

Builds a latent cache with `encode_to_cache` (a stand-in encoder that costs nothing, so only the cache format and
loading are measured), then times what the trainer does per batch: `DataLoader(BatchedCachedLatents)` with the
trainer's `EpochSampler`, the copy to the device and `sample_latents` (one draw from each cached posterior).
Compare with the training img/s of `bench_train.py` (`--train_json`): the loader should sustain at least 3× that.

    python bench/bench_loader.py                                    # CPU, 32×32×4 latents (256 px with an SD VAE)
    python bench/bench_loader.py --train_json bench/results/train.json --num_samples 65536 --batch_size 256
"""

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from types import SimpleNamespace

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import environment, markdown_table, synchronize, write_results  # noqa: E402

from dit_hf.latents import BatchedCachedLatents, encode_to_cache, sample_latents  # noqa: E402
from dit_hf.training import EpochSampler  # noqa: E402


class _FreeEncoder:
    """Quacks like an AutoencoderKL for `encode_to_cache`: 3×s×s images -> 4×s×s posterior moments."""

    device, dtype = torch.device("cpu"), torch.float32
    config = SimpleNamespace(scaling_factor=0.18215, shift_factor=None)

    def encode(self, x):
        mean = torch.cat([x, x[:, :1]], dim=1)
        return SimpleNamespace(latent_dist=SimpleNamespace(mean=mean, logvar=torch.full_like(mean, -4.0)))


class _RandomImages(torch.utils.data.Dataset):
    def __init__(self, n: int, size: int):
        self.n, self.size = n, size

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        g = torch.Generator().manual_seed(i)
        return {"pixel_values": torch.rand((3, self.size, self.size), generator=g) * 2 - 1, "class_labels": i % 1000}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--num_samples", type=int, default=8192)
    p.add_argument("--latent_size", type=int, default=32)
    p.add_argument("--batch_size", type=int, default=128)
    p.add_argument("--num_workers", type=int, nargs="+", default=[0, 2])
    p.add_argument("--batches", type=int, default=40, help="Timed batches per setting (after 5 warm-up batches).")
    p.add_argument("--train_json", default=None, help="A bench_train.py result to compare with.")
    p.add_argument("--cache_dir", default=None, help="Default: a temporary directory.")
    p.add_argument("--device", default=None)
    p.add_argument("--out", default="bench/results/loader.json")
    args = p.parse_args(argv)
    args.device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    return args


def measure(args, cache_dir: str, num_workers: int) -> dict:
    dataset = BatchedCachedLatents(cache_dir, random_flip=True)
    sampler = EpochSampler(len(dataset), seed=0)
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_size=args.batch_size,
        sampler=sampler,
        drop_last=True,
        num_workers=num_workers,
        pin_memory=args.device.type == "cuda",
        persistent_workers=num_workers > 0,
        collate_fn=BatchedCachedLatents.collate,
    )
    times, epoch = [], 0
    while len(times) < args.batches + 5:
        sampler.set_position(epoch)
        t0 = time.perf_counter()
        for batch in loader:
            moments = batch["moments"].to(args.device, non_blocking=True)
            labels = batch["class_labels"].to(args.device, non_blocking=True)
            x0 = sample_latents(moments, dataset.scaling_factor, dataset.shift_factor)
            synchronize(args.device)
            del x0, labels
            times.append(time.perf_counter() - t0)
            if len(times) >= args.batches + 5:
                break
            t0 = time.perf_counter()
        epoch += 1
    per_batch = statistics.median(times[5:])
    return {"num_workers": num_workers, "img_per_s": args.batch_size / per_batch, "ms_per_batch": per_batch * 1000}


def main(argv=None) -> dict:
    args = parse_args(argv)
    from accelerate import PartialState

    state = PartialState(cpu=True)
    with tempfile.TemporaryDirectory() as tmp:
        cache_dir = args.cache_dir or os.path.join(tmp, "cache")
        t0 = time.perf_counter()
        encode_to_cache(
            SimpleNamespace(
                is_main_process=True,
                is_local_main_process=state.is_local_main_process,
                process_index=0,
                num_processes=1,
                wait_for_everyone=lambda: None,
            ),
            _FreeEncoder(),
            _RandomImages(args.num_samples, args.latent_size),
            cache_dir,
            batch_size=256,
            fingerprint={"bench": True},
        )
        build_s = time.perf_counter() - t0
        results = [measure(args, cache_dir, w) for w in args.num_workers]
    train_img_s = None
    if args.train_json:
        with open(args.train_json) as f:
            train = json.load(f)
        train_img_s = max(r["img_per_s"] for r in train["results"] if r["impl"] == "dit-hf")
    best = max(r["img_per_s"] for r in results)
    env = environment(args.device)
    rows = [[r["num_workers"], r["img_per_s"], r["ms_per_batch"]] for r in results]
    table = (
        f"Cached-latent loader, {args.num_samples} samples of 2×4×{args.latent_size}² moments, batch {args.batch_size}"
        f" — {env['device']}, torch {env['torch']}\n\n"
        + markdown_table(["DataLoader workers", "img/s", "ms per batch"], rows)
    )
    if train_img_s:
        table += (
            f"\n\n- best loader / dit-hf training img/s: {best / train_img_s:.1f}× ({best:,.0f} vs {train_img_s:,.0f})"
        )
    payload = {
        "environment": env,
        "settings": {k: v for k, v in vars(args).items() if k not in ("device",)},
        "cache_build_s": build_s,
        "results": results,
        "train_img_per_s": train_img_s,
        "loader_over_train": best / train_img_s if train_img_s else None,
    }
    write_results(args.out, payload, table)
    return payload


if __name__ == "__main__":
    main()
