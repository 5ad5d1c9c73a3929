#!/usr/bin/env python
"""Fault injection against the real trainer and CLI on tiny settings (the embedded digits, a 2-block DiT, CPU).

    python bench/chaos.py                          # every fault, 3 kills at random points per kill row
    python bench/chaos.py --faults nan --update    # one row again (e.g. once a NaN guard lands), the others kept
    python bench/chaos.py --faults truncate --quick  # the subset the tests run

Faults: kill -9 at random points of training, of checkpoint writing, of latent-cache building, of the final export
and of `dit-hf sample-eval`; truncation and bit flips of each file of a checkpoint; an exploding learning rate (NaN);
two runs on one folder and a rerun into a used one; a full disk while checkpointing and exporting. Every recovery is
checked against an uninterrupted run of the same settings, bit for bit.

Each row of bench/results/chaos.{json,md}: `injected` (faults injected), `recovered` (runs that went on and ended
bit-identical to the uninterrupted run), `stopped` (runs that refused with the expected clear message), `lost`
(completed checkpoints or results destroyed or made unusable: must be 0), and what was seen.
"""

import argparse
import contextlib
import errno
import io
import json
import logging
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "src"))
sys.path.insert(0, ROOT)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

# A 2-block DiT 32 wide on 64 digits: a step takes milliseconds, a whole run a few seconds (mostly imports).
TINY = [
    "--hidden_size", "32", "--depth", "2", "--num_heads", "2", "--train_batch_size", "8",
    "--max_train_samples", "64", "--num_inference_steps", "2", "--num_samples_per_class", "1",
    "--logging_steps", "1", "--report_to", "none", "--validation_steps", "0", "--learning_rate", "1e-3",
]  # fmt: skip
WEIGHTS = os.path.join("transformer", "diffusion_pytorch_model.safetensors")
KILL_FAULTS = ("kill_training", "kill_checkpointing", "kill_cache", "kill_export", "kill_sample_eval")
FAULTS = (*KILL_FAULTS, "truncate", "bitflip", "nan", "two_runs", "used_folder", "disk_full")
QUICK = ("truncate", "used_folder", "disk_full")


def row(fault: str, **values) -> dict:
    base = {"fault": fault, "injected": 0, "recovered": 0, "stopped": 0, "lost": 0, "seen": []}
    return {**base, **values}


# ---- running the trainer ---------------------------------------------------------------------------------------


def child_env() -> dict:
    env = {**os.environ, "PYTHONPATH": os.path.join(ROOT, "src"), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    env.pop("WORLD_SIZE", None)
    return env


def trainer_cmd(out, *extra) -> list[str]:
    return [sys.executable, os.path.join(ROOT, "train_dit.py"), *TINY, "--output_dir", str(out), *extra]


def sample_eval_cmd(pipeline, out) -> list[str]:
    return [sys.executable, "-m", "dit_hf.cli", "sample-eval", str(pipeline), "--num_samples", "200",
            "--batch_size", "4", "--steps", "2", "--labels", "balanced", "--out", str(out)]  # fmt: skip


def run_cmd(cmd, log) -> subprocess.CompletedProcess:
    with open(log, "a") as f:
        return subprocess.run(cmd, env=child_env(), stdout=f, stderr=subprocess.STDOUT, text=True, timeout=900)


def train_in_process(out, *extra) -> dict:
    import train_dit

    return train_dit.main(train_dit.parse_args([*TINY, "--output_dir", str(out), *extra]))


@contextlib.contextmanager
def captured_warnings():
    """The WARNING lines logged meanwhile (the trainer's logger included), as one string."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setLevel(logging.WARNING)
    logging.getLogger().addHandler(handler)
    try:
        yield stream
    finally:
        logging.getLogger().removeHandler(handler)


def same_weights(a_folder, b_folder, name=WEIGHTS) -> bool:
    a, b = load_file(os.path.join(a_folder, name)), load_file(os.path.join(b_folder, name))
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def verified_steps(out) -> set[int]:
    from dit_hf.manifest import CorruptCheckpointError, verify_manifest
    from dit_hf.training import checkpoint_folders

    good = set()
    for step, path in checkpoint_folders(os.path.join(out, "checkpoints")):
        with contextlib.suppress(CorruptCheckpointError, OSError):
            if verify_manifest(path):
                good.add(step)
    return good


def kill_when(cmd, log, ready, delay: float, timeout: float = 300.0) -> bool:
    """Start `cmd`, wait until `ready()` (polled every millisecond), wait `delay` s, SIGKILL it.

    Returns whether the kill landed while the process still ran (False: it had already exited).
    """
    with open(log, "a") as f:
        proc = subprocess.Popen(cmd, env=child_env(), stdout=f, stderr=subprocess.STDOUT)
    deadline = time.time() + timeout
    while not ready() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.001)
    time.sleep(delay)
    landed = proc.poll() is None
    if landed:
        proc.send_signal(signal.SIGKILL)
    proc.wait()
    return landed


def save_tiny_vae(path: str):
    """A randomly initialised 2-level AutoencoderKL (no pretrained weights offline): 16 px -> 4 × 8 × 8 latents."""
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, norm_num_groups=4, layers_per_block=1,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"), block_out_channels=(8, 8), scaling_factor=0.5,
    ).save_pretrained(path)  # fmt: skip


# ---- kill -9 ---------------------------------------------------------------------------------------------------


def logged_steps(out: str) -> int:
    path = os.path.join(out, "metrics.jsonl")
    if not os.path.isfile(path):
        return 0
    with open(path) as f:
        return f.read().count("\n")


def has_tmp_checkpoint(out: str) -> bool:
    folder = os.path.join(out, "checkpoints")
    return os.path.isdir(folder) and any(n.startswith(".tmp-checkpoint") for n in os.listdir(folder))


def kill_settings(fault: str, work: str) -> dict:
    """The killed run's arguments, and per trial: when to kill (a predicate on its folder) and a delay after it."""
    if fault == "kill_training":  # at a random step (every step is logged)
        return {
            "extra": ["--max_train_steps", "40", "--checkpointing_steps", "4"],
            "trial": lambda rng: (lambda out, k=rng.randint(1, 39): logged_steps(out) >= k, 0.0),
        }
    if fault == "kill_checkpointing":  # a checkpoint every step; killed while one is being written, at a random step
        return {
            "extra": ["--max_train_steps", "30", "--checkpointing_steps", "1"],
            "trial": lambda rng: (
                lambda out, k=rng.randint(1, 29): logged_steps(out) >= k and has_tmp_checkpoint(out),
                0.0,
            ),
        }
    if fault == "kill_cache":  # after the cache folder appears
        vae = os.path.join(work, "vae")
        if not os.path.isdir(vae):
            save_tiny_vae(vae)
        extra = ["--vae", vae, "--resolution", "16", "--image_channels", "3", "--max_train_samples", "64",
                 "--max_train_steps", "6", "--checkpointing_steps", "2"]  # fmt: skip
        return {
            "extra": extra,
            "trial": lambda rng: (lambda out: os.path.isdir(os.path.join(out, "cache")), rng.uniform(0, 0.2)),
        }
    if fault == "kill_export":  # after the exported transformer folder appears
        return {
            "extra": ["--max_train_steps", "6", "--checkpointing_steps", "2", "--num_samples_per_class", "4"],
            "trial": lambda rng: (lambda out: os.path.isdir(os.path.join(out, "transformer")), rng.uniform(0, 0.1)),
        }
    raise ValueError(fault)


def kill_point(fault: str, out: str) -> str:
    """Where a kill landed, read from what the killed run left behind."""
    steps = [step for step, _ in checkpoint_steps(out)]
    where = f"after step {logged_steps(out)}, checkpoints {steps[-1] if steps else 'none'}"
    leftovers = sorted(n for n in os.listdir(os.path.join(out, "checkpoints")) if n.startswith(".tmp")) if (
        os.path.isdir(os.path.join(out, "checkpoints"))
    ) else []  # fmt: skip
    if leftovers:
        where += f", mid-write ({leftovers[0]} left behind)"
    if fault == "kill_cache":
        complete = os.path.isfile(os.path.join(out, "cache", "cache_info.json"))
        where += ", cache complete" if complete else ", cache incomplete"
    if fault == "kill_export":
        where += ", export finished" if os.path.isfile(os.path.join(out, "summary.json")) else ", export unfinished"
    return where


def checkpoint_steps(out: str) -> list:
    from dit_hf.training import checkpoint_folders

    return checkpoint_folders(os.path.join(out, "checkpoints"))


def kill_trainer_row(fault: str, work: str, trials: int, rng: random.Random) -> dict:
    settings = kill_settings(fault, work)
    extra = settings["extra"]
    if fault == "kill_cache":
        cache_args = lambda out: ["--cache_latents", os.path.join(out, "cache")]  # noqa: E731
    else:
        cache_args = lambda out: []  # noqa: E731
    reference = os.path.join(work, f"{fault}-reference")
    log = os.path.join(work, f"{fault}.log")
    if run_cmd(trainer_cmd(reference, *extra, *cache_args(reference)), log).returncode != 0:
        raise RuntimeError(f"the uninterrupted run of {fault} failed; see {log}")
    result = row(fault)
    for trial in range(trials):
        out = os.path.join(work, f"{fault}-{trial}")
        armed, delay = settings["trial"](rng)
        cmd = trainer_cmd(out, *extra, *cache_args(out))
        landed = kill_when(cmd, log, lambda out=out, armed=armed: armed(out), delay)
        before = verified_steps(out)
        where = kill_point(fault, out)
        result["injected"] += int(landed)
        resumed = run_cmd(trainer_cmd(out, *extra, *cache_args(out), "--resume_from_checkpoint", "latest"), log)
        after = verified_steps(out)
        exact = resumed.returncode == 0 and same_weights(reference, out)
        result["recovered"] += int(landed and exact)
        result["lost"] += len(before - after)
        outcome = "bit-identical after resume" if exact else f"resume exit {resumed.returncode}, weights differ"
        result["seen"].append(f"kill {where}: {outcome}" if landed else "ran to the end first")
    return result


def kill_sample_eval_row(work: str, trials: int, rng: random.Random) -> dict:
    pipeline = os.path.join(work, "sample-eval-pipeline")
    log = os.path.join(work, "kill_sample_eval.log")
    if not os.path.isfile(os.path.join(pipeline, "model_index.json")):
        run_cmd(trainer_cmd(pipeline, "--max_train_steps", "2"), log)
    reference = os.path.join(work, "sample-eval-reference")
    if run_cmd(sample_eval_cmd(pipeline, reference), log).returncode != 0:
        raise RuntimeError(f"the uninterrupted sample-eval failed; see {log}")
    result = row("kill_sample_eval")
    for trial in range(trials):
        out = os.path.join(work, f"sample-eval-{trial}")
        images = os.path.join(out, "images")
        k = rng.randint(1, 199)  # killed once k of the 200 PNGs are written

        def armed(images=images, k=k):
            return os.path.isdir(images) and len(os.listdir(images)) >= k

        landed = kill_when(sample_eval_cmd(pipeline, out), log, armed, 0.0)
        done = len(os.listdir(images)) if os.path.isdir(images) else 0
        result["injected"] += int(landed)
        resumed = run_cmd(sample_eval_cmd(pipeline, out), log)
        exact = resumed.returncode == 0 and same_npz(reference, out)
        result["recovered"] += int(landed and exact)
        outcome = "same .npz after rerun" if exact else f"rerun exit {resumed.returncode}, samples differ"
        result["seen"].append(f"kill with {done} of 200 PNGs written: {outcome}" if landed else "ran to the end first")
    return result


def same_npz(a_folder, b_folder) -> bool:
    def arrays(folder):
        (name,) = [n for n in os.listdir(folder) if n.endswith(".npz")]
        with np.load(os.path.join(folder, name)) as data:
            return {k: data[k] for k in data.files}

    a, b = arrays(a_folder), arrays(b_folder)
    return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


# ---- damaged checkpoint files ----------------------------------------------------------------------------------


def damage(path: str, how: str):
    with open(path, "rb") as f:
        data = bytearray(f.read())
    if how == "truncate":
        data = data[: len(data) // 2]
    else:
        data[len(data) // 2] ^= 0x10
    with open(path, "wb") as f:
        f.write(bytes(data))


def damage_row(how: str, work: str, quick: bool) -> dict:
    """Each file of the newest checkpoint damaged in turn: `latest` falls back, an explicit path is refused."""
    from dit_hf.manifest import MANIFEST

    common = ["--max_train_steps", "4", "--checkpointing_steps", "2"]
    reference = os.path.join(work, f"{how}-reference")
    if not os.path.isdir(reference):
        train_in_process(reference, *common)
    newest = os.path.join(reference, "checkpoints", "checkpoint-4")
    files = sorted(os.path.relpath(os.path.join(r, n), newest) for r, _, names in os.walk(newest) for n in names)
    if quick:
        files = [name for name in files if name in ("optimizer.bin", WEIGHTS)]
    result = row(how)
    for name in files:
        out = os.path.join(work, f"{how}-{name.replace(os.sep, '_')}")
        shutil.copytree(reference, out)
        target = os.path.join(out, "checkpoints", "checkpoint-4", name)
        damage(target, how)
        result["injected"] += 1
        checkpoint = os.path.join(out, "checkpoints", "checkpoint-4")
        # A damaged manifest may still parse: then the file whose entry no longer matches is the one named.
        expected = checkpoint if name == MANIFEST else target
        try:  # named explicitly: refused with the file
            train_in_process(out, *common, "--resume_from_checkpoint", checkpoint)
            result["seen"].append(f"{name}: the damaged checkpoint named explicitly was accepted")
        except ValueError as err:
            result["stopped"] += int(expected in str(err))
        with captured_warnings() as warnings:
            try:
                train_in_process(out, *common, "--resume_from_checkpoint", "latest")
                named = expected in warnings.getvalue()
                exact = same_weights(reference, out) and same_weights(
                    reference, out, os.path.join("checkpoints", "checkpoint-4", WEIGHTS)
                )
                result["recovered"] += int(named and exact)
                if not (named and exact):
                    result["seen"].append(f"{name}: resumed, file named {named}, bit-identical {exact}")
            except Exception as err:  # noqa: BLE001 - recorded in the table
                result["seen"].append(f"{name}: {type(err).__name__}: {str(err)[:200]}")
        result["lost"] += int(2 not in verified_steps(out))
        shutil.rmtree(out)
    result["seen"].insert(
        0,
        f"{len(files)} files of checkpoint-4: resumed from checkpoint-2 with a warning naming the file, then "
        "checkpoint 4 rewritten exactly; the damaged checkpoint named explicitly is refused with the file",
    )
    return result


# ---- NaN, two runs, used folder, disk full ---------------------------------------------------------------------


def nan_row(work: str) -> dict:
    """4 good steps, then a resume with an exploding learning rate and --checkpoints_total_limit 1.

    Without a non-finite guard the run ends with exit 0 and NaN weights, and the limit prunes the last good
    checkpoint: the row records what happens, so it can be rerun as is (`--faults nan`) once a guard exists.
    """
    from dit_hf.training import list_checkpoints

    out = os.path.join(work, "nan")
    train_in_process(out, "--max_train_steps", "4", "--checkpointing_steps", "2")
    result = row("nan", injected=1)
    try:
        train_in_process(out, "--max_train_steps", "16", "--checkpointing_steps", "2", "--checkpoints_total_limit",
                         "1", "--learning_rate", "1e6", "--resume_from_checkpoint", "latest")  # fmt: skip
        stopped = None
    except Exception as err:  # noqa: BLE001 - recorded in the table
        stopped = f"{type(err).__name__}: {str(err)[:300]}"
    finite = []
    for step, path in list_checkpoints(os.path.join(out, "checkpoints")):
        tensors = load_file(os.path.join(path, WEIGHTS))
        if all(torch.isfinite(t).all() for t in tensors.values()):
            finite.append(step)
    with open(os.path.join(out, "metrics.jsonl")) as f:
        losses = [json.loads(line).get("loss") for line in f]
    bad = [i for i, loss in enumerate(losses) if loss is not None and not np.isfinite(loss)]
    if stopped is not None:
        result["stopped"] = int(bool(re.search(r"finite|nan|NaN", stopped)))
        result["seen"].append(f"stopped: {stopped}")
    else:
        result["seen"].append("exit 0")
    result["seen"].append(
        f"{len(bad)} of {len(losses)} logged losses non-finite; checkpoints with finite weights: {finite}"
    )
    result["lost"] = int(not finite)  # the good state of step 4 is gone when no finite checkpoint remains
    return result


def two_runs_row(work: str) -> dict:
    """A second run (resuming) and a third (--overwrite_output_dir) started on the folder of a running one.

    The first run is long (5,000 steps); once both are refused it is killed, and its checkpoints must all verify,
    its metrics hold each step once.
    """
    out = os.path.join(work, "two-runs")
    log = os.path.join(work, "two_runs.log")
    extra = ["--max_train_steps", "5000", "--checkpointing_steps", "20"]
    with open(log, "a") as f:
        first = subprocess.Popen(trainer_cmd(out, *extra), env=child_env(), stdout=f, stderr=subprocess.STDOUT)
    deadline = time.time() + 300
    while logged_steps(out) < 1 and first.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    result = row("two_runs")
    for flag in ("--resume_from_checkpoint latest", "--overwrite_output_dir"):
        second = subprocess.run(trainer_cmd(out, *extra, *flag.split()), env=child_env(), capture_output=True,
                                text=True, timeout=300)  # fmt: skip
        result["injected"] += 1
        refused = second.returncode == 2 and f"in use by another run (pid {first.pid}" in second.stderr
        result["stopped"] += int(refused and first.poll() is None)
        errors = [line for line in second.stderr.splitlines() if "error:" in line] or ["(no error line)"]
        result["seen"].append(f"second run with {flag}: exit {second.returncode}, {errors[-1][:200]}")
    running = first.poll() is None
    first.send_signal(signal.SIGKILL)
    first.wait()
    with open(os.path.join(out, "metrics.jsonl")) as f:
        steps = [json.loads(line)["step"] for line in f if line.endswith("\n")]
    folders = {step for step, _ in checkpoint_steps(out)}
    result["lost"] = len(folders - verified_steps(out)) + int(steps != sorted(set(steps)))
    result["seen"].append(
        f"first run {'still running' if running else 'ended'} after both; killed at step {len(steps)}: "
        f"{len(folders)} checkpoints, all verified: {folders == verified_steps(out)}, steps logged once: "
        f"{steps == sorted(set(steps))}"
    )
    return result


def used_folder_row(work: str) -> dict:
    """A rerun into a finished run's folder without --resume_from_checkpoint or --overwrite_output_dir."""
    out = os.path.join(work, "used")
    train_in_process(out, "--max_train_steps", "2", "--checkpointing_steps", "2")
    result = row("used_folder", injected=1)
    try:
        train_in_process(out, "--max_train_steps", "4")
        result["seen"].append("accepted: the old run's outputs were overwritten")
    except ValueError as err:
        result["stopped"] = int("--resume_from_checkpoint" in str(err) and "--overwrite_output_dir" in str(err))
        result["seen"].append(str(err)[:200])
    result["lost"] = int(verified_steps(out) != {2})
    return result


@contextlib.contextmanager
def failing(module, name: str, where: str):
    """`module.name(obj, path, ...)` raises ENOSPC for paths containing `where`."""
    real = getattr(module, name)

    def save(obj, path, *args, **kwargs):
        if where in str(path):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(obj, path, *args, **kwargs)

    setattr(module, name, save)
    try:
        yield
    finally:
        setattr(module, name, real)


def disk_full_row(work: str) -> dict:
    """ENOSPC while writing checkpoint 4 (torch.save), then while exporting (safetensors); then resume."""
    import safetensors.torch

    from dit_hf.training import WriteFailedError

    common = ["--max_train_steps", "6", "--checkpointing_steps", "2"]
    reference = os.path.join(work, "disk-full-reference")
    train_in_process(reference, *common)
    result = row("disk_full")
    out = os.path.join(work, "disk-full")
    cases = [
        (torch, "save", ".tmp-checkpoint-4", "checkpoint 4", []),
        (safetensors.torch, "save_file", os.path.join(out, "transformer"), "the final pipeline", ["latest"]),
    ]
    for module, name, where, what, resume in cases:
        result["injected"] += 1
        flags = ["--resume_from_checkpoint", *resume] if resume else []
        with failing(module, name, where):
            try:
                train_in_process(out, *common, *flags)
                result["seen"].append(f"{what}: no error")
            except WriteFailedError as err:
                clear = f"Could not write {what}" in str(err) and "GiB free" in str(err)
                result["stopped"] += int(clear)
                result["seen"].append(str(err)[:240])
        result["lost"] += int(not verified_steps(out))
    train_in_process(out, *common, "--resume_from_checkpoint", "latest")
    result["recovered"] = int(same_weights(reference, out))
    return result


# ---- table ------------------------------------------------------------------------------------------------------


def markdown(rows: list[dict], environment: str) -> str:
    lines = [
        f"Fault injection (bench/chaos.py), {environment}.",
        "",
        "| fault | injected | recovered | stopped with a clear message | data lost | seen |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        seen = "; ".join(r["seen"][:3]).replace("|", "/")
        lines.append(f"| {r['fault']} | {r['injected']} | {r['recovered']} | {r['stopped']} | {r['lost']} | {seen} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--faults", default=",".join(FAULTS), help=f"Comma-separated, of {', '.join(FAULTS)}.")
    parser.add_argument("--trials", type=int, default=3, help="Kills at random points per kill row.")
    parser.add_argument("--quick", action="store_true", help="Only a few files per damage row (for the tests).")
    parser.add_argument("--seed", type=int, default=0, help="Seed of the random kill points.")
    parser.add_argument("--work_dir", default=None, help="Scratch folder (default: a temporary one, deleted).")
    parser.add_argument("--out", default=os.path.join(ROOT, "bench", "results", "chaos.json"))
    parser.add_argument(
        "--update", action="store_true", help="Replace only the rows run now in an existing --out; keep the others."
    )
    args = parser.parse_args(argv)
    faults = [f for f in args.faults.split(",") if f]
    unknown = sorted(set(faults) - set(FAULTS))
    if unknown:
        raise SystemExit(f"--faults: unknown {unknown}; choose from {', '.join(FAULTS)}.")
    torch.set_num_threads(1)
    rng = random.Random(args.seed)
    rows = []
    with contextlib.ExitStack() as stack:
        work = args.work_dir or stack.enter_context(tempfile.TemporaryDirectory(prefix="dit-chaos-"))
        os.makedirs(work, exist_ok=True)
        for fault in faults:
            t0 = time.perf_counter()
            if fault == "kill_sample_eval":
                result = kill_sample_eval_row(work, args.trials, rng)
            elif fault in KILL_FAULTS:
                result = kill_trainer_row(fault, work, args.trials, rng)
            elif fault in ("truncate", "bitflip"):
                result = damage_row(fault, work, args.quick)
            else:
                result = {"nan": nan_row, "two_runs": two_runs_row, "used_folder": used_folder_row,
                          "disk_full": disk_full_row}[fault](work)  # fmt: skip
            result["seen"] = [line.replace(work, "<work>") for line in result["seen"]]
            result["seconds"] = round(time.perf_counter() - t0, 1)
            rows.append(result)
            print(f"{fault}: injected {result['injected']}, recovered {result['recovered']}, stopped "
                  f"{result['stopped']}, lost {result['lost']} ({result['seconds']} s)", flush=True)  # fmt: skip
    from common import environment

    env = environment(torch.device("cpu"))
    if args.update and os.path.isfile(args.out):
        with open(args.out) as f:
            kept = {r["fault"]: r for r in json.load(f)["rows"]}
        kept.update({r["fault"]: {**r, "date": env["date"]} for r in rows})
        rows = [kept[f] for f in FAULTS if f in kept]
    payload = {"environment": env, "settings": vars(args), "rows": rows}
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(payload, f, indent=2)
    table = markdown(rows, f"{env['device']}, torch {env['torch']}, {env['date']}")
    with open(os.path.splitext(args.out)[0] + ".md", "w") as f:
        f.write(table)
    print(table)
    return payload


if __name__ == "__main__":
    main()
