#!/usr/bin/env python
"""Scale: what a launch costs as the data set grows, with a complete latent cache, on 1, 2 and 4 processes.

For each N (default 10k, 100k and 1M tiny 8×8 RGB images in 1,000 classes, stored as a local parquet data set like a
Hub image data set), it

1. writes the data set and builds its latent cache with `encode_to_cache` and a tiny random `AutoencoderKL` (4×4×4
   latents), exactly as `train_dit.py --cache_latents` would (same fingerprint): cache-building throughput;
2. launches `train_dit.py` with `torchrun --nproc_per_node P` (P = 1, 2, 4) on that cache and measures the time from
   launch to the first optimizer step (the first line of `metrics.jsonl`) and each process's USS/PSS/RSS
   (`/proc/PID/smaps_rollup`) at that moment; the launch is stopped there;
3. starts P reader processes that each read every item of the cache through the trainer's loader
   (`BatchedCachedLatents` + `EpochSampler`), as after several epochs: loader throughput, and USS/PSS once every page
   of the cache has been read — the page cache is shared, so the PSS summed over the processes stays near one copy;
4. fits each measure as `a + b·N` and extrapolates to ImageNet-1k (1,281,167 images, SD-VAE 4×32×32 float32 latents
   with flips: 64 KiB an image) on one 8-process node.

    python bench/bench_scale.py                          # all of it: ~30 min on 2 CPU cores
    python bench/bench_scale.py --sizes 10000 100000 --processes 1 2

Results: bench/results/scale.json, scale.md and scale.png. The machine's page cache is not dropped between runs (that
needs root): times are warm-cache times, which is what a relaunch on the same node sees.
"""

import argparse
import io
import multiprocessing as mp
import os
import signal
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import environment, markdown_table, write_results  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IMAGENET_IMAGES = 1_281_167
IMAGENET_ITEM_BYTES = 4 * (4 * 32 * 32) * 4  # mean, logvar and their flips, 4×32×32 float32
RESOLUTION = 8
TRAIN_ARGS = [
    "--resolution", str(RESOLUTION), "--image_channels", "3", "--model", "DiT-S/2", "--hidden_size", "32",
    "--depth", "2", "--num_heads", "2", "--train_batch_size", "8", "--max_train_steps", "100000",
    "--logging_steps", "1", "--report_to", "none", "--validation_steps", "0", "--checkpointing_steps", "100000",
    "--overwrite_output_dir",  # a rerun into the same --work_dir measures afresh
]  # fmt: skip


def tiny_vae(path: str) -> str:
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, norm_num_groups=4, layers_per_block=1,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"), block_out_channels=(8, 8),
    )  # fmt: skip
    vae.save_pretrained(path)
    return path


def write_dataset(folder: str, n: int, chunk: int = 100_000) -> float:
    """N PNG images (256 distinct ones, reused) with labels i % 1000, as parquet files; returns seconds taken."""
    import datasets
    from PIL import Image

    start = time.perf_counter()
    pngs = []
    for k in range(256):
        buffer = io.BytesIO()
        Image.new("RGB", (RESOLUTION, RESOLUTION), (k, 255 - k, (7 * k) % 256)).save(buffer, format="PNG")
        pngs.append(buffer.getvalue())
    features = datasets.Features(
        {"image": datasets.Image(), "label": datasets.ClassLabel(names=[f"c{i}" for i in range(1000)])}
    )
    os.makedirs(folder, exist_ok=True)
    for part, first in enumerate(range(0, n, chunk)):
        rows = range(first, min(n, first + chunk))
        data = {"image": [{"bytes": pngs[i % 256], "path": None} for i in rows], "label": [i % 1000 for i in rows]}
        datasets.Dataset.from_dict(data, features=features).to_parquet(
            os.path.join(folder, f"part-{part:04d}.parquet")
        )
    return time.perf_counter() - start


def build_cache(data_dir: str, hf_cache: str, vae_path: str, cache_dir: str) -> dict:
    """The trainer's own steps up to the cache (same fingerprint), timed; one process."""
    from accelerate import Accelerator
    from diffusers import AutoencoderKL

    from dit_hf.data import ImageLabelDataset, build_transform, load_image_dataset, resolve_columns, select_subset
    from dit_hf.latents import cache_fingerprint, encode_to_cache

    t0 = time.perf_counter()
    ds = select_subset(load_image_dataset(data_dir, None, None, cache_dir=hf_cache), None)
    image_column, label_column = resolve_columns(ds)
    t1 = time.perf_counter()
    vae = AutoencoderKL.from_pretrained(vae_path)
    fingerprint = cache_fingerprint(vae_path, dict(vae.config), ds._fingerprint, RESOLUTION, True, len(ds))
    dataset = ImageLabelDataset(ds, image_column, label_column, build_transform(RESOLUTION, True, False, 3))
    encode_to_cache(Accelerator(cpu=True), vae, dataset, cache_dir, batch_size=256, fingerprint=fingerprint)
    t2 = time.perf_counter()
    size = sum(os.path.getsize(os.path.join(cache_dir, f)) for f in os.listdir(cache_dir))
    return {"load_dataset_s": t1 - t0, "cache_build_s": t2 - t1, "cache_items_per_s": len(ds) / (t2 - t1),
            "cache_bytes": size}  # fmt: skip


def memory(pid: int) -> dict:
    """USS (private pages), PSS (shared pages split between their users), RSS, and the anonymous part, in MiB."""
    fields = {}
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            parts = line.split()
            if len(parts) == 3 and parts[2] == "kB":
                fields[parts[0].rstrip(":")] = int(parts[1]) / 1024
    uss = fields.get("Private_Clean", 0) + fields.get("Private_Dirty", 0)
    return {"uss_mib": uss, "pss_mib": fields.get("Pss", 0), "rss_mib": fields.get("Rss", 0),
            "anon_mib": fields.get("Anonymous", 0)}  # fmt: skip


def descendants(pid: int) -> list[int]:
    children = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def launch_to_first_step(nproc: int, data_dir: str, hf_cache: str, vae: str, cache_dir: str, out: str) -> dict:
    """Seconds from `torchrun` to the first optimizer step, and each training process's memory then."""
    env = {**os.environ, "PYTHONPATH": os.path.join(ROOT, "src"), "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled",
           "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}  # fmt: skip
    port = 29700 + (os.getpid() + nproc) % 200
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_addr",
           "127.0.0.1", "--master_port", str(port), os.path.join(ROOT, "train_dit.py"), *TRAIN_ARGS,
           "--dataset_name", data_dir, "--cache_dir", hf_cache, "--vae", vae, "--cache_latents", cache_dir,
           "--output_dir", out]  # fmt: skip
    info_mtime = os.stat(os.path.join(cache_dir, "cache_info.json")).st_mtime_ns
    metrics = os.path.join(out, "metrics.jsonl")
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    try:
        while not (os.path.exists(metrics) and os.path.getsize(metrics) > 0):
            if proc.poll() is not None:
                raise RuntimeError(f"train_dit.py exited with {proc.returncode}: {proc.stderr.read()[-3000:]}")
            if time.perf_counter() - start > 900:
                raise RuntimeError("no optimizer step within 900 s")
            time.sleep(0.05)
        elapsed = time.perf_counter() - start
        workers = [p for p in descendants(proc.pid) if _is_trainer(p)]
        per_process = [memory(p) for p in workers]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    if os.stat(os.path.join(cache_dir, "cache_info.json")).st_mtime_ns != info_mtime:
        raise RuntimeError("the trainer rebuilt the cache: the benchmark's fingerprint differs from the trainer's")
    return {"first_step_s": elapsed, "processes": per_process}


def _is_trainer(pid: int) -> bool:
    """A training process, not the torchrun launcher whose command line also names train_dit.py."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmdline = f.read()
    except OSError:
        return False
    return b"train_dit.py" in cmdline and b"torch.distributed.run" not in cmdline


def _read_everything(cache_dir: str, batch_size: int, done, release, results, rank: int) -> None:
    """One reader process: every item of the cache once, in the trainer's shuffled order and batches."""
    torch.set_num_threads(1)
    from dit_hf.latents import BatchedCachedLatents
    from dit_hf.training import EpochSampler

    dataset = BatchedCachedLatents(cache_dir, random_flip=True)
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, sampler=EpochSampler(len(dataset), seed=rank), collate_fn=dataset.collate
    )
    start, total = time.perf_counter(), 0
    for batch in loader:
        total += batch["moments"].shape[0]
    results[rank] = {"items": total, "seconds": time.perf_counter() - start}
    done.wait()  # everyone has read everything: now the parent measures
    release.wait()


def loader_epoch(nproc: int, cache_dir: str, batch_size: int = 256) -> dict:
    ctx = mp.get_context("spawn")
    done, release = ctx.Barrier(nproc + 1), ctx.Barrier(nproc + 1)
    results = ctx.Manager().dict()
    procs = [ctx.Process(target=_read_everything, args=(cache_dir, batch_size, done, release, results, r))
             for r in range(nproc)]  # fmt: skip
    for p in procs:
        p.start()
    done.wait()
    per_process = [memory(p.pid) for p in procs]
    release.wait()
    for p in procs:
        p.join()
    rates = [results[r]["items"] / results[r]["seconds"] for r in range(nproc)]
    return {"items_per_s_per_process": rates, "processes": per_process}


def fit(ns: list[int], values: list[float]) -> dict:
    """Least squares `value = a + b·N`; `per_million` is b × 1e6; `ratio` the largest over the smallest value."""
    b, a = np.polyfit(np.asarray(ns, dtype=float), np.asarray(values, dtype=float), 1)
    return {"a": float(a), "per_million": float(b * 1e6), "ratio": float(max(values) / max(min(values), 1e-9)),
            "imagenet": float(a + b * IMAGENET_IMAGES)}  # fmt: skip


def summarize(runs: dict, sizes: list[int], processes: list[int]) -> dict:
    summary = {}
    for p in processes:
        rows = [runs[str(n)] for n in sizes]
        first = [r["launch"][str(p)] for r in rows]
        epoch = [r["loader"][str(p)] for r in rows]
        summary[str(p)] = {
            "first_step_s": fit(sizes, [f["first_step_s"] for f in first]),
            "first_step_uss_mib": fit(sizes, [max(q["uss_mib"] for q in f["processes"]) for f in first]),
            "epoch_uss_mib": fit(sizes, [max(q["uss_mib"] for q in e["processes"]) for e in epoch]),
            "epoch_anon_mib": fit(sizes, [max(q["anon_mib"] for q in e["processes"]) for e in epoch]),
            "epoch_pss_sum_minus_cache_mib": fit(
                sizes,
                [
                    sum(q["pss_mib"] for q in e["processes"]) - r["build"]["cache_bytes"] / 2**20
                    for e, r in zip(epoch, rows)
                ],  # fmt: skip
            ),
        }
    build = [runs[str(n)]["build"] for n in sizes]
    summary["cache_items_per_s"] = [b["cache_items_per_s"] for b in build]
    summary["cache_bytes_per_item"] = build[-1]["cache_bytes"] / sizes[-1]
    return summary


def markdown(results: dict) -> str:
    sizes, processes, runs, summary = results["sizes"], results["processes"], results["runs"], results["summary"]
    rows = []
    for n in sizes:
        run = runs[str(n)]
        for p in processes:
            first, epoch = run["launch"][str(p)], run["loader"][str(p)]
            rows.append([
                f"{n:,}", p, f"{first['first_step_s']:.1f}",
                f"{max(q['uss_mib'] for q in first['processes']):.0f}",
                f"{min(epoch['items_per_s_per_process']):,.0f}",
                f"{max(q['uss_mib'] for q in epoch['processes']):.0f}",
                f"{max(q['anon_mib'] for q in epoch['processes']):.0f}",
                f"{sum(q['pss_mib'] for q in epoch['processes']):.0f}",
                f"{run['build']['cache_bytes'] / 2**20:.0f}",
            ])  # fmt: skip
    measured = markdown_table(
        ["N", "processes", "launch → 1st step (s)", "USS at 1st step (MiB, max)", "loader items/s (per process)",
         "USS after reading all (MiB, max)", "anon (MiB, max)", "PSS summed (MiB)", "cache (MiB)"],
        rows,
    )  # fmt: skip
    builds = [runs[str(n)]["build"] for n in sizes]
    build_rows = [
        [f"{n:,}", f"{b['cache_build_s']:.0f}", f"{b['cache_items_per_s']:,.0f}", f"{b['load_dataset_s']:.1f}"]
        for n, b in zip(sizes, builds)
    ]
    fit_rows = []
    for p in processes:
        for key, label in (("first_step_s", "launch → 1st step (s)"), ("first_step_uss_mib", "USS at 1st step (MiB)"),
                           ("epoch_uss_mib", "USS after reading all (MiB)"),
                           ("epoch_pss_sum_minus_cache_mib", "PSS summed − one cache copy (MiB)")):  # fmt: skip
            f = summary[str(p)][key]
            fit_rows.append([p, label, f"{f['a']:.1f}", f"{f['per_million']:+.1f}", f"{f['ratio']:.2f}",
                             f"{f['imagenet']:.1f}"])  # fmt: skip
    imagenet = results["imagenet"]
    return "\n".join(
        [
            "# Scale: launch cost and memory against data set size (complete latent cache)",
            "",
            results["environment_line"],
            "",
            "## Measured",
            "",
            measured,
            "",
            "USS: pages only this process maps; PSS: each shared page divided between the processes that map it. "
            "Pages of the memory-mapped cache read by one process alone count in its USS (they are clean page cache, "
            "dropped under memory pressure, not anonymous memory); 'anon' is the process's own heap.",
            "",
            "## Cache building (1 process, tiny random VAE, 8×8 images)",
            "",
            markdown_table(["N", "build (s)", "items/s", "load data set (s)"], build_rows),
            "",
            "## Fits `a + b·N` (largest process)",
            "",
            markdown_table(
                ["processes", "measure", "a", "b per 1M items", "max/min over N", "at N = 1,281,167"], fit_rows
            ),
            "",  # fmt: skip
            "## ImageNet-1k on one 8-process node (extrapolated)",
            "",
            f"- Latent cache: {imagenet['cache_gb']:.1f} GB (SD-VAE 256 px, float32 with flips), one copy in the page "
            f"cache shared by all 8 processes; before the memory map every process held its own: "
            f"{imagenet['old_private_gb']:.0f} GB of private memory on the node.",
            f"- Private memory per process beyond the model: {imagenet['private_mib']:.0f} MiB (fit of the anonymous "
            "memory after reading the whole cache).",
            f"- Launch → first step: {imagenet['first_step_s']:.0f} s here (fit, 1 process; python and torch imports "
            "dominate), no image decoded.",
            "",
        ]
    )


def draw(results: dict, path: str) -> str:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    sizes, runs = results["sizes"], results["runs"]
    figure = Figure(figsize=(12, 3.8), layout="constrained")
    axes = figure.subplots(1, 3)
    for p in results["processes"]:
        first = [runs[str(n)]["launch"][str(p)] for n in sizes]
        epoch = [runs[str(n)]["loader"][str(p)] for n in sizes]
        axes[0].plot(sizes, [f["first_step_s"] for f in first], marker="o", label=f"{p} processes")
        axes[1].plot(sizes, [max(q["uss_mib"] for q in e["processes"]) for e in epoch], marker="o", label=f"{p}")
        axes[2].plot(sizes, [sum(q["pss_mib"] for q in e["processes"]) for e in epoch], marker="o", label=f"{p}")
    cache = [runs[str(n)]["build"]["cache_bytes"] / 2**20 for n in sizes]
    axes[2].plot(sizes, cache, linestyle="--", color="black", label="one cache copy")
    titles = ("launch → first step (s)", "USS per process after a full read (MiB)", "PSS summed over processes (MiB)")
    for ax, title in zip(axes, titles):
        ax.set_xscale("log")
        ax.set_xlabel("data set size N")
        ax.set_title(title, fontsize=10)
        ax.legend(fontsize=8)
    FigureCanvasAgg(figure).print_png(path)
    return path


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--processes", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--work_dir", default=None, help="Where data sets and caches go (default: a temporary one).")
    parser.add_argument("--out", default=os.path.join(ROOT, "bench", "results", "scale"))
    args = parser.parse_args()
    work = args.work_dir or tempfile.mkdtemp(prefix="bench-scale-")
    vae = tiny_vae(os.path.join(work, "vae"))
    runs = {}
    for n in args.sizes:
        data_dir, cache_dir = os.path.join(work, f"data-{n}"), os.path.join(work, f"cache-{n}")
        hf_cache = os.path.join(work, "hf")
        run = {"write_dataset_s": write_dataset(data_dir, n)}
        run["build"] = build_cache(data_dir, hf_cache, vae, cache_dir)
        print(n, "cache", run["build"], flush=True)
        run["launch"], run["loader"] = {}, {}
        for p in args.processes:
            out = os.path.join(work, f"out-{n}-{p}")
            run["launch"][str(p)] = launch_to_first_step(p, data_dir, hf_cache, vae, cache_dir, out)
            run["loader"][str(p)] = loader_epoch(p, cache_dir)
            print(n, p, run["launch"][str(p)]["first_step_s"], run["loader"][str(p)], flush=True)
        runs[str(n)] = run
    summary = summarize(runs, args.sizes, args.processes)
    first = summary[str(args.processes[0])]
    env = environment(torch.device("cpu"))
    results = {
        "sizes": args.sizes,
        "processes": args.processes,
        "environment": env,
        "environment_line": f"{os.cpu_count()} CPU cores, torch {torch.__version__}, {time.strftime('%Y-%m-%d')}",
        "runs": runs,
        "summary": summary,
        "imagenet": {
            "images": IMAGENET_IMAGES,
            "cache_gb": IMAGENET_IMAGES * IMAGENET_ITEM_BYTES / 1e9,
            "old_private_gb": 8 * IMAGENET_IMAGES * IMAGENET_ITEM_BYTES / 1e9,
            "private_mib": summary[str(args.processes[-1])]["epoch_anon_mib"]["imagenet"],
            "first_step_s": first["first_step_s"]["imagenet"],
        },
    }
    write_results(args.out + ".json", results, markdown(results))
    print(draw(results, args.out + ".png"))


if __name__ == "__main__":
    main()
