"""One run owns its output folder: the lock file, a second run refused, a stale lock taken over, a used folder."""

import json
import logging
import os
import re
import socket
import subprocess
import sys

import pytest
from test_distributed import free_port
from test_train import ROOT, TINY_ARGS, losses, run

import train_dit
from dit_hf.ownership import LOCK_FILE, own_output_dir
from dit_hf.training import list_checkpoints


def plant_lock(output_dir, pid: int, host: str | None = None):
    os.makedirs(output_dir, exist_ok=True)
    owner = {"host": host or socket.gethostname(), "pid": pid, "started": "2026-12-01T10:00:00+00:00"}
    (output_dir / LOCK_FILE).write_text(json.dumps(owner))
    return owner


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_the_run_holds_a_lock_naming_itself_and_releases_it(tmp_path, monkeypatch):
    seen = {}
    train = train_dit.train

    def recording_train(args):
        seen["lock"] = json.loads((tmp_path / LOCK_FILE).read_text())
        return train(args)

    monkeypatch.setattr(train_dit, "train", recording_train)
    run(tmp_path, "--max_train_steps", "1")
    assert seen["lock"]["pid"] == os.getpid() and seen["lock"]["host"] == socket.gethostname()
    assert seen["lock"]["started"].startswith("20")
    assert not (tmp_path / LOCK_FILE).exists()


def test_the_lock_is_released_when_the_run_fails(tmp_path, monkeypatch):
    def failing_train(args):
        assert (tmp_path / LOCK_FILE).exists()
        raise RuntimeError("crashed mid-run")

    monkeypatch.setattr(train_dit, "train", failing_train)
    with pytest.raises(RuntimeError, match="crashed mid-run"):
        run(tmp_path, "--max_train_steps", "1")
    assert not (tmp_path / LOCK_FILE).exists()


def test_a_second_run_on_the_folder_is_refused_naming_the_owner(tmp_path):
    # The owner: a live process of this host (this test's parent), as a concurrent run would be.
    owner = plant_lock(tmp_path, os.getppid())
    expected = re.escape(
        f"in use by another run (pid {owner['pid']} on host '{owner['host']}', started {owner['started']}"
    )
    with pytest.raises(ValueError, match=expected):  # up front, before any work
        train_dit.parse_args([*TINY_ARGS, "--output_dir", str(tmp_path), "--resume_from_checkpoint", "latest"])
    with pytest.raises(ValueError, match=expected):  # and when taking the lock (the other run started meanwhile)
        with own_output_dir(str(tmp_path)):
            pass
    # A lock of another host is never taken over (its process cannot be checked), not even by --overwrite_output_dir.
    other = plant_lock(tmp_path, dead_pid(), host="another-machine")
    with pytest.raises(ValueError, match=f"in use by another run \\(pid {other['pid']} on host 'another-machine'"):
        train_dit.parse_args([*TINY_ARGS, "--output_dir", str(tmp_path), "--overwrite_output_dir"])
    assert json.loads((tmp_path / LOCK_FILE).read_text()) == other  # the owner's lock is left alone


def test_a_stale_lock_of_a_dead_run_is_taken_over(tmp_path, caplog):
    plant_lock(tmp_path, dead_pid())
    with caplog.at_level(logging.WARNING):
        summary = run(tmp_path, "--max_train_steps", "1")
    assert summary["steps"] == 1
    assert "Taking over the lock" in caplog.text
    assert not (tmp_path / LOCK_FILE).exists()


def test_a_used_folder_needs_resume_or_overwrite(tmp_path, caplog):
    run(tmp_path, "--max_train_steps", "4", "--checkpointing_steps", "2")
    with pytest.raises(ValueError, match="already holds a run.*--resume_from_checkpoint.*--overwrite_output_dir"):
        run(tmp_path, "--max_train_steps", "2")
    with pytest.raises(ValueError, match="pass only one of them"):
        run(tmp_path, "--max_train_steps", "2", "--overwrite_output_dir", "--resume_from_checkpoint", "latest")
    (tmp_path / "keep.txt").write_text("not the run's")
    with caplog.at_level(logging.WARNING):
        run(tmp_path, "--max_train_steps", "1", "--checkpointing_steps", "1", "--overwrite_output_dir")
    # The old run's checkpoints and metrics are gone: `latest` can no longer pick up the old run.
    assert [step for step, _ in list_checkpoints(tmp_path / "checkpoints")] == [1]
    assert sorted(losses(tmp_path)) == [1]
    assert (
        f"removed {tmp_path / 'checkpoints'}" in caplog.text and f"removed {tmp_path / 'metrics.jsonl'}" in caplog.text
    )
    assert (tmp_path / "keep.txt").read_text() == "not the run's"


LOCKED_SCRIPT = """
import os, sys
from accelerate import PartialState
from dit_hf.ownership import own_output_dir
rank = os.environ["RANK"]
def say(line):  # one write per line: print's separate newline lets the two processes' lines interleave
    sys.stdout.write(line + "\\n")
    sys.stdout.flush()
try:
    with own_output_dir(sys.argv[1]):
        say(f"rank {rank} entered")
except ValueError as err:
    # Only the main process reads the lock: the other one learns the refusal from it.
    say(f"rank {rank} of {PartialState().num_processes} refused: {err}")
"""


@pytest.mark.slow  # two torchrun processes: ~10 s on 2 cores
def test_with_several_processes_all_fail_together_when_the_folder_is_locked(tmp_path):
    owner = plant_lock(tmp_path / "out", os.getppid())
    script = tmp_path / "locked.py"
    script.write_text(LOCKED_SCRIPT)
    env = {**os.environ, "PYTHONPATH": os.path.join(ROOT, "src"), "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
    env.pop("WORLD_SIZE", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), str(script), str(tmp_path / "out")]  # fmt: skip
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = sorted(line for line in result.stdout.splitlines() if line.startswith("rank"))
    assert len(lines) == 2 and "entered" not in result.stdout, result.stdout
    for rank, line in enumerate(lines):
        assert line.startswith(f"rank {rank} of 2 refused:") and f"pid {owner['pid']}" in line
