"""Non-finite steps and stop signals: skipped on every process, counted, stopped or rolled back, never checkpointed."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from accelerate.utils import load as accelerate_load
from inject_nonfinite import install
from safetensors.torch import load_file, save_file
from test_distributed import free_port
from test_train import ROOT, TINY_ARGS, final_weights, losses, run

import train_dit
from dit_hf.guards import (
    EXIT_NONFINITE,
    EXIT_PREEMPTED,
    NonFiniteStop,
    StepGuard,
    StopSignals,
    checkpoint_finite,
    newest_finite_checkpoint,
    parse_signals,
    trim_metrics,
)
from dit_hf.training import TrainerState, list_checkpoints, prune_checkpoints

WEIGHTS = os.path.join("transformer", "diffusion_pytorch_model.safetensors")


def rows(output_dir) -> list[dict]:
    return [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]


def checkpoint_weights(output_dir, step: int) -> dict:
    return load_file(output_dir / "checkpoints" / f"checkpoint-{step}" / WEIGHTS)


def equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_nonfinite_steps_are_skipped_counted_and_kept_from_the_ema(tmp_path, monkeypatch):
    seen = install(monkeypatch.setattr, {2, 3}, module=train_dit)
    run(tmp_path, "--max_train_steps", "5", "--checkpointing_steps", "1", "--ema_decay", "0.9")
    # Steps 2 and 3 changed nothing: step 4 starts from the weights step 2 started from; step 5 from new ones.
    assert equal(seen["weights"][4], seen["weights"][2]) and not equal(seen["weights"][5], seen["weights"][4])
    log = {row["step"]: row for row in rows(tmp_path)}
    assert [log[s]["nonfinite_steps"] for s in range(1, 6)] == [0, 1, 2, 2, 2]
    assert "loss" not in log[2] and "grad_norm" not in log[3] and all(map(torch.isfinite, map(torch.tensor, [
        log[s]["loss"] for s in (1, 4, 5)])))  # fmt: skip
    # No checkpoint of the steps inside the non-finite run; the counters are in the trainer state.
    assert [step for step, _ in list_checkpoints(tmp_path / "checkpoints")] == [1, 4, 5]
    ckpt = tmp_path / "checkpoints" / "checkpoint-5"
    state = TrainerState.load(ckpt)
    # skipped_steps counts every step not applied (the trainer's count); nonfinite_steps those the guard vetoed.
    assert (state.global_step, state.nonfinite_steps, state.skipped_steps) == (5, 2, 2)
    # Three updates reached the optimizer, the LR schedule and the EMA, not five.
    optimizer = accelerate_load(ckpt / "optimizer.bin", weights_only=True)
    assert {float(s["step"]) for s in optimizer["state"].values()} == {3.0}
    assert accelerate_load(ckpt / "scheduler.bin", weights_only=True)["_step_count"] == 4  # 1 at creation + 3
    assert json.loads((ckpt / "ema_state.json").read_text())["num_updates"] == 3
    assert all(torch.isfinite(t).all() for t in final_weights(tmp_path).values())


EXPLODING = [
    "--learning_rate",
    "30",
    "--max_train_steps",
    "30",
    "--checkpointing_steps",
    "1",
    "--max_nonfinite_steps",
    "3",
]


def test_no_checkpoint_is_written_from_non_finite_weights(tmp_path, monkeypatch, caplog):
    class BrokenEMA(train_dit.EMAModels):
        def update(self, model):
            super().update(model)
            if self.num_updates == 3:  # the average goes NaN; training itself stays finite
                next(iter(self.state_dict()["averages"][0].values())).fill_(float("nan"))

    monkeypatch.setattr(train_dit, "EMAModels", BrokenEMA)
    last_good = tmp_path / "checkpoints" / "checkpoint-2"
    with pytest.raises(NonFiniteStop, match=f"not finite after step 4: nothing exported.*checkpoint is {last_good}"):
        run(tmp_path, "--max_train_steps", "4", "--checkpointing_steps", "1", "--checkpoints_total_limit", "1")
    assert not (tmp_path / "model_index.json").exists()
    assert [step for step, _ in list_checkpoints(tmp_path / "checkpoints")] == [2]
    assert "Step 3: the weights are not finite; no checkpoint written." in caplog.text
    assert checkpoint_finite(tmp_path / "checkpoints" / "checkpoint-2")


def test_divergence_stops_naming_the_last_good_checkpoint(tmp_path):
    """An exploding learning rate: the loss goes to 1e5, then NaN; the run stops and names checkpoint-2."""
    last_good = tmp_path / "checkpoints" / "checkpoint-2"
    with pytest.raises(NonFiniteStop, match=f"3 steps in a row up to step 5.*last good checkpoint is {last_good}"):
        run(tmp_path, *EXPLODING)
    assert [step for step, _ in list_checkpoints(tmp_path / "checkpoints")] == [1, 2]
    assert all(checkpoint_finite(path) for _, path in list_checkpoints(tmp_path / "checkpoints"))
    assert not (tmp_path / "model_index.json").exists()  # no export of a diverged model
    assert [row["nonfinite_steps"] for row in rows(tmp_path)] == [0, 0, 1, 2, 3]


@pytest.mark.slow  # a subprocess: about 20 s on 2 busy cores
def test_divergence_exits_with_its_own_status(tmp_path):
    env = {**os.environ, "PYTHONPATH": os.path.join(ROOT, "src"), "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, os.path.join(ROOT, "train_dit.py"), *TINY_ARGS, "--output_dir", str(tmp_path), *EXPLODING]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == EXIT_NONFINITE, result.stderr[-2000:]
    assert f"The last good checkpoint is {tmp_path / 'checkpoints' / 'checkpoint-2'}" in result.stderr


def test_rollback_reloads_the_last_good_checkpoint_with_a_lower_lr(tmp_path, monkeypatch):
    seen = install(monkeypatch.setattr, {4, 5}, module=train_dit)
    run(tmp_path, "--max_train_steps", "8", "--checkpointing_steps", "2", "--max_nonfinite_steps", "2",
        "--on_nonfinite", "rollback", "--rollback_lr_factor", "0.5", "--learning_rate", "1e-3")  # fmt: skip
    # After step 5 (the second non-finite step in a row) the weights are checkpoint-2's again.
    assert equal(seen["weights"][6], checkpoint_weights(tmp_path, 2))
    assert not equal(seen["weights"][6], seen["weights"][4])
    log = {row["step"]: row for row in rows(tmp_path)}
    assert [log[s]["lr"] for s in range(1, 9)] == [1e-3] * 5 + [5e-4] * 3
    assert set(losses(tmp_path)) == {1, 2, 3, 6, 7, 8}
    state = TrainerState.load(tmp_path / "checkpoints" / "checkpoint-8")
    assert (state.global_step, state.nonfinite_steps, state.rollbacks) == (8, 2, 1)
    # The lowered rate is part of the scheduler state: a resume keeps it.
    scheduler = accelerate_load(tmp_path / "checkpoints" / "checkpoint-8" / "scheduler.bin", weights_only=True)
    assert scheduler["base_lrs"] == [5e-4]


def test_rollback_without_a_checkpoint_stops(tmp_path, monkeypatch):
    install(monkeypatch.setattr, {1, 2}, module=train_dit)
    with pytest.raises(NonFiniteStop, match="no checkpoint to roll back to.*No checkpoint with finite weights"):
        run(tmp_path, "--max_train_steps", "4", "--max_nonfinite_steps", "2", "--on_nonfinite", "rollback")


def fake_checkpoint(checkpoints_dir, step: int, value: float):
    folder = checkpoints_dir / f"checkpoint-{step}"
    (folder / "transformer").mkdir(parents=True)
    save_file({"w": torch.full((2, 2), value), "steps": torch.tensor([step])}, folder / WEIGHTS)
    TrainerState(global_step=step).save(folder)
    return str(folder)


def test_pruning_never_deletes_the_newest_finite_checkpoint(tmp_path):
    paths = [fake_checkpoint(tmp_path, step, value) for step, value in ((1, 1.0), (2, 2.0), (3, float("nan")))]
    paths.append(fake_checkpoint(tmp_path, 4, float("inf")))
    assert [checkpoint_finite(p) for p in paths] == [True, True, False, False]
    newest = newest_finite_checkpoint(str(tmp_path))
    assert newest == paths[1]
    # A limit of 1 keeps the newest checkpoint and, besides, the newest finite one.
    assert prune_checkpoints(str(tmp_path), 1, keep=newest) == [paths[0], paths[2]]
    assert [path for _, path in list_checkpoints(str(tmp_path))] == [paths[1], paths[3]]
    # A corrupt weights file is no fallback either.
    (tmp_path / "checkpoint-2" / WEIGHTS).write_bytes(b"truncated")
    assert newest_finite_checkpoint(str(tmp_path)) is None


class FakeAccelerator:
    """What StepGuard uses of an Accelerator, for one process."""

    num_processes, process_index, is_main_process, device = 1, 0, True, torch.device("cpu")

    def __init__(self, scaler=None):
        self.scaler = scaler

    def unscale_gradients(self):
        pass


def test_step_guard_decisions_and_the_fp16_scaler():
    guard = StepGuard(FakeAccelerator(), None, max_nonfinite_steps=2, on_nonfinite="stop")
    guard.observe_loss(torch.tensor(1.0))
    assert not guard.check(torch.tensor(3.0)).skip
    guard.observe_loss(torch.tensor(float("nan")))
    guard.observe_loss(torch.tensor(1.0))  # a later finite micro-batch does not clear the step's flag
    check = guard.check(torch.tensor(3.0))
    assert check.skip and check.nonfinite_loss_ranks == [0] and check.nonfinite_grad_ranks == []
    assert not guard.record(check, 1, 1) and guard.record(guard.check(torch.tensor(float("inf"))), 2, 2)
    assert not guard.check(torch.tensor(1.0)).skip  # the flag is per step
    assert guard.weights_finite([torch.ones(2)], [torch.zeros(3)])
    assert not guard.weights_finite([torch.ones(2)], [torch.tensor([0.0, float("nan")])])

    class Scaler:
        updates = 0

        def update(self):
            self.updates += 1

    # fp16: inf gradients are the scaler's overflows (it skips them, counted as skipped_steps); the loss is watched.
    scaler = Scaler()
    fp16 = StepGuard(FakeAccelerator(scaler), None, max_nonfinite_steps=2, on_nonfinite="stop")
    assert not fp16.check(torch.tensor(float("inf"))).skip
    fp16.observe_loss(torch.tensor(float("inf")))
    assert fp16.check(torch.tensor(float("inf"))).skip
    fp16.skip_update()
    assert scaler.updates == 1  # the scaler closes the step it unscaled, as after an overflow


def test_a_skipped_step_leaves_a_real_grad_scaler_ready_for_the_next():
    """fp16 bookkeeping with torch's GradScaler (on the CPU here): skip after unscaling, then train on."""
    layer = torch.nn.Linear(2, 1)
    optimizer = torch.optim.AdamW(layer.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)

    class Accelerator(FakeAccelerator):
        def unscale_gradients(self):
            scaler.unscale_(optimizer)

    guard = StepGuard(Accelerator(scaler), None, max_nonfinite_steps=5, on_nonfinite="stop")
    before = [p.detach().clone() for p in layer.parameters()]
    for poisoned in (True, False):
        loss = layer(torch.ones(1, 2)).sum() * (float("nan") if poisoned else 1.0)
        scaler.scale(loss).backward()
        guard.observe_loss(loss)
        check = guard.check(guard.grad_norm(layer.parameters()))  # unscales, as clipping would
        assert check.skip == poisoned
        if check.skip:
            guard.skip_update()
            assert all(torch.equal(p, b) for p, b in zip(layer.parameters(), before))
            assert scaler.get_scale() == 512.0  # closed as an overflow: the scale halves
        else:
            scaler.step(optimizer)  # no "unscale_() has already been called": the skipped step was closed
            scaler.update()
            assert not all(torch.equal(p, b) for p, b in zip(layer.parameters(), before))
        optimizer.zero_grad(set_to_none=True)


def test_stop_signals(tmp_path):
    assert parse_signals(["SIGUSR1", "usr2", "SIGTERM"]) == [signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2]
    for bad in ("SIGKILL", "NOPE", "SIG_IGN"):
        with pytest.raises(ValueError, match="--save_on_signal"):
            parse_signals([bad])
    with pytest.raises(ValueError, match="--save_on_signal"):
        train_dit.parse_args(["--save_on_signal", "KILL", "--output_dir", str(tmp_path)])
    signals = StopSignals(["SIGUSR1"])
    previous = signal.getsignal(signal.SIGUSR1)
    signals.install()
    try:
        os.kill(os.getpid(), signal.SIGUSR1)
        guard = StepGuard(FakeAccelerator(), signals, 5, "stop")
        assert guard.check(torch.tensor(1.0)).stop == "SIGUSR1"
    finally:
        signals.restore()
    assert signal.getsignal(signal.SIGUSR1) is previous


def test_trim_metrics(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\n{"step": 2}\n{"step": 2, "eval/fid": 3.0}\n{"step": 3}\n{"step": 4, "lo')
    assert trim_metrics(str(path), 2) == 2
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [1, 2, 2]
    assert trim_metrics(str(tmp_path / "missing.jsonl"), 2) == 0


def wait_for_step(output_dir, step: int, proc, timeout: float = 300):
    deadline = time.time() + timeout
    metrics = output_dir / "metrics.jsonl"
    while not (metrics.is_file() and any(json.loads(line)["step"] >= step for line in metrics.read_text().splitlines()
                                         if line.endswith("}"))):  # fmt: skip
        assert proc.poll() is None and time.time() < deadline, "trainer died or never reached the step"
        time.sleep(0.05)


def test_sigterm_checkpoints_and_the_resume_is_exact(tmp_path):
    # A long constant-lr run, stopped by SIGTERM; its resume to step K + 3 must equal a straight K + 3 step run.
    out = tmp_path / "preempted"
    env = {**os.environ, "PYTHONPATH": os.path.join(ROOT, "src"), "HF_HUB_OFFLINE": "1"}
    common = ["--checkpointing_steps", "1000", "--random_flip"]
    proc = subprocess.Popen(
        [
            sys.executable,
            os.path.join(ROOT, "train_dit.py"),
            *TINY_ARGS,
            *common,
            "--max_train_steps",
            "5000",
            "--output_dir",
            str(out),
        ],  # fmt: skip
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    wait_for_step(out, 3, proc)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == EXIT_PREEMPTED, stderr[-2000:]
    ((stopped, checkpoint),) = list_checkpoints(out / "checkpoints")
    assert f"SIGTERM received: stopped after step {stopped} and wrote checkpoint {checkpoint}" in stderr
    assert max(losses(out)) == stopped and not (out / "model_index.json").exists()
    run(out, *common, "--max_train_steps", str(stopped + 3), "--resume_from_checkpoint", "latest")
    run(tmp_path / "straight", *common, "--max_train_steps", str(stopped + 3))
    assert losses(out) == losses(tmp_path / "straight")
    assert equal(final_weights(out), final_weights(tmp_path / "straight"))


def launch_two(output_dir, *extra, nonfinite_steps: str = "2,3") -> subprocess.Popen:
    """2 CPU processes (torchrun, gloo), process 1 with a NaN output at `nonfinite_steps`."""
    env = {**os.environ, "PYTHONPATH": os.path.join(ROOT, "src"), "HF_HUB_OFFLINE": "1", "ACCELERATE_USE_CPU": "1",
           "NONFINITE_STEPS": nonfinite_steps, "NONFINITE_RANK": "1"}  # fmt: skip
    env.pop("WORLD_SIZE", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), os.path.join(ROOT, "tests", "inject_nonfinite.py"), *TINY_ARGS,
           "--train_batch_size", "4", "--random_flip", "--checkpointing_steps", "1000", "--output_dir",
           str(output_dir), *extra]  # fmt: skip
    return subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def worker_of_rank(parent_pid: int, rank: int) -> int:
    """The pid of the torchrun worker with RANK=rank."""
    for _ in range(200):
        for child in open(f"/proc/{parent_pid}/task/{parent_pid}/children").read().split():
            environ = open(f"/proc/{child}/environ", "rb").read().split(b"\0")
            if f"RANK={rank}".encode() in environ:
                return int(child)
        time.sleep(0.05)
    raise AssertionError(f"no worker of rank {rank}")


@pytest.mark.slow  # three 2-process runs: about 80 s on 2 cores
@pytest.mark.skipif(not os.path.isdir("/proc"), reason="finds the torchrun workers through /proc")
def test_two_processes_skip_together_and_stop_together_on_a_signal_to_one(tmp_path):
    out = tmp_path / "preempted"
    proc = launch_two(out, "--max_train_steps", "5000")
    wait_for_step(out, 5, proc)
    os.kill(worker_of_rank(proc.pid, 1), signal.SIGTERM)  # one process only
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode != 0  # torchrun reports the workers' status, below
    ((stopped, checkpoint),) = list_checkpoints(out / "checkpoints")
    # Both processes stopped after the same step and wrote one checkpoint together, each with its RNG state.
    assert stderr.count(f"SIGTERM received: stopped after step {stopped} and wrote checkpoint {checkpoint}") == 2
    assert f"exitcode  : {EXIT_PREEMPTED}" in stderr
    assert {"random_states_0.pkl", "random_states_1.pkl"} <= set(os.listdir(checkpoint))
    # The NaN of process 1 skipped steps 2 and 3 on both processes (the weights are replicated and finite).
    assert "Step 2: non-finite loss on process(es) [1]" in stderr
    assert rows(out)[-1]["nonfinite_steps"] == 2 and checkpoint_finite(checkpoint)

    end = str(stopped + 2)
    resumed = launch_two(out, "--max_train_steps", end, "--resume_from_checkpoint", "latest")
    straight = launch_two(tmp_path / "straight", "--max_train_steps", end)
    for p in (resumed, straight):
        _, stderr = p.communicate(timeout=600)
        assert p.returncode == 0, stderr[-3000:]
    assert losses(out) == losses(tmp_path / "straight")
    assert equal(final_weights(out), final_weights(tmp_path / "straight"))


@pytest.mark.slow  # a 2-process run: about 30 s on 2 cores
def test_two_processes_stop_together_after_non_finite_steps_on_one(tmp_path):
    proc = launch_two(tmp_path, "--max_train_steps", "50", "--max_nonfinite_steps", "2", nonfinite_steps="3,4,5")
    _, stderr = proc.communicate(timeout=300)
    # Both processes stop at step 4 with the same message and status; nothing is exported.
    assert stderr.count("Training diverged: 2 steps in a row up to step 4") == 2, stderr[-3000:]
    assert stderr.count(f"exitcode  : {EXIT_NONFINITE}") >= 1 and not (tmp_path / "model_index.json").exists()
