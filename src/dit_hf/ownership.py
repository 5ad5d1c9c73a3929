"""One run owns its output folder: a lock file names the owner, and a used folder is not silently reused.

Two runs writing one `--output_dir` interleave checkpoints and metrics, and a rerun that forgets
`--resume_from_checkpoint` overwrites part of the old run, after which `latest` resumes the old one. So a run takes
`OUTPUT_DIR/.dit-hf.lock` (host, pid, start time) before writing anything, refuses a folder another live run holds,
takes over the lock of a dead run on the same host (with a warning), and releases it at the end, also on error.
A folder that already holds a run needs `--resume_from_checkpoint` (continue it) or `--overwrite_output_dir` (clear
the old run's outputs first).
"""

import datetime
import glob
import json
import logging
import os
import shutil
import socket
import tempfile
from contextlib import contextmanager

logger = logging.getLogger(__name__)

LOCK_FILE = ".dit-hf.lock"
# What shows that a folder holds a run: its checkpoints, logged metrics, or an exported result.
RUN_MARKERS = ("checkpoints", "metrics.jsonl", "summary.json", "model_index.json")
# What a run writes into its folder and --overwrite_output_dir removes (nothing else is touched).
RUN_OUTPUTS = (
    "checkpoints",
    "metrics.jsonl",
    "summary.json",
    "samples",
    "samples.png",
    "plots",
    "logs",
    "model_index.json",
    "pipeline_dit.py",
    "transformer",
    "scheduler",
    "vae",
    "transformer_ema_*",
)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # a live process of another user
        return True
    return True


def describe_owner(owner: dict) -> str:
    return f"pid {owner.get('pid')} on host {owner.get('host')!r}, started {owner.get('started')}"


class OutputDirLock:
    """`OUTPUT_DIR/.dit-hf.lock`, created complete and atomically (written aside, then hard-linked into place)."""

    def __init__(self, output_dir: str):
        self.path = os.path.join(output_dir, LOCK_FILE)
        self.owner = None

    def read_owner(self) -> dict | None:
        """The lock's owner, None if there is no lock; an unreadable lock reads as an unknown owner."""
        try:
            with open(self.path) as f:
                owner = json.load(f)
            return owner if isinstance(owner, dict) else {}
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            return {}

    def is_stale(self, owner: dict) -> bool:
        """A lock of this host whose process is gone (killed, crashed, machine rebooted)."""
        pid = owner.get("pid")
        return owner.get("host") == socket.gethostname() and isinstance(pid, int) and not _pid_alive(pid)

    def refusal(self, owner: dict) -> str:
        if not owner:
            return (
                f"--output_dir {os.path.dirname(self.path)!r} is locked by {self.path}, which cannot be read. If no "
                "run uses this folder, delete that file; otherwise choose another --output_dir."
            )
        return (
            f"--output_dir {os.path.dirname(self.path)!r} is in use by another run ({describe_owner(owner)}; lock "
            f"file {self.path}). Wait for it to finish or choose another --output_dir; if that run is gone (e.g. "
            "on another machine that was shut down), delete the lock file."
        )

    def acquire(self) -> None:
        """Take the lock, or raise ValueError naming the owner; a stale lock is taken over with a warning."""
        directory = os.path.dirname(self.path)
        os.makedirs(directory, exist_ok=True)
        started = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        self.owner = {"host": socket.gethostname(), "pid": os.getpid(), "started": started}
        fd, tmp = tempfile.mkstemp(prefix=".dit-hf.lock.", dir=directory)
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(self.owner, f)
            for _ in range(2):
                try:
                    os.link(tmp, self.path)  # fails if the lock exists: no window where two runs both take it
                    return
                except FileExistsError:
                    owner = self.read_owner()
                    if owner is None:
                        continue  # released in between
                    if not self.is_stale(owner):
                        raise ValueError(self.refusal(owner)) from None
                    logger.warning(
                        "Taking over the lock %s of a run that is gone (%s).", self.path, describe_owner(owner)
                    )
                    os.remove(self.path)
            raise ValueError(self.refusal(self.read_owner() or {}))
        finally:
            os.remove(tmp)

    def release(self) -> None:
        """Remove the lock if it is still this run's."""
        if self.owner is not None and self.read_owner() == self.owner:
            os.remove(self.path)
        self.owner = None


def holds_a_run(output_dir: str) -> list[str]:
    """The files and folders of `output_dir` that show an earlier run (an empty checkpoints/ folder does not)."""
    found = []
    for name in RUN_MARKERS:
        path = os.path.join(output_dir, name)
        if os.path.isdir(path) and os.listdir(path) or os.path.isfile(path):
            found.append(name)
    return found


def check_previous_run(output_dir: str, resume_from_checkpoint: str | None, overwrite: bool) -> None:
    """Refuse a folder holding an earlier run unless the flags say what to do with it (continue or delete)."""
    if resume_from_checkpoint and overwrite:
        raise ValueError(
            "--resume_from_checkpoint continues the run in --output_dir and --overwrite_output_dir deletes it: pass "
            "only one of them (--no-overwrite_output_dir turns off one set in a --config file)."
        )
    found = holds_a_run(output_dir)
    if found and not resume_from_checkpoint and not overwrite:
        raise ValueError(
            f"--output_dir {output_dir!r} already holds a run ({', '.join(found)}). Pass --resume_from_checkpoint "
            "latest to continue it, --overwrite_output_dir to delete its outputs and start over, or choose another "
            "--output_dir."
        )


def check_output_dir_use(output_dir: str, resume_from_checkpoint: str | None, overwrite: bool) -> None:
    """Before any work: refuse a folder a live run holds, or one with an earlier run and neither flag given.

    Only reads; [`own_output_dir`] takes the lock and decides for good.
    """
    lock = OutputDirLock(output_dir)
    owner = lock.read_owner()
    if owner is not None and not lock.is_stale(owner):
        raise ValueError(lock.refusal(owner))
    check_previous_run(output_dir, resume_from_checkpoint, overwrite)


def clear_run_outputs(output_dir: str) -> list[str]:
    """Delete what an earlier run wrote into `output_dir` ([`RUN_OUTPUTS`] only); returns the removed paths."""
    removed = []
    for pattern in RUN_OUTPUTS:
        for path in sorted(glob.glob(os.path.join(glob.escape(output_dir), pattern))):
            if os.path.isdir(path) and not os.path.islink(path):
                shutil.rmtree(path)
            else:
                os.remove(path)
            removed.append(path)
    return removed


def _claim(output_dir: str, resume_from_checkpoint: str | None, overwrite: bool) -> OutputDirLock:
    lock = OutputDirLock(output_dir)
    lock.acquire()
    try:
        check_previous_run(output_dir, resume_from_checkpoint, overwrite)
        if overwrite:
            for path in clear_run_outputs(output_dir):
                logger.warning("--overwrite_output_dir: removed %s of the earlier run", path)
    except BaseException:
        lock.release()
        raise
    return lock


@contextmanager
def own_output_dir(output_dir: str, resume_from_checkpoint: str | None = None, overwrite: bool = False):
    """Hold `output_dir` for the duration of the block: lock it, check or clear an earlier run, release at the end.

    Only the main process takes the lock and decides; with several processes the decision is broadcast, so either
    all of them go on or all raise the same ValueError.
    """
    from accelerate import PartialState
    from accelerate.utils import broadcast_object_list, parse_flag_from_env

    # Initialised as the Accelerator created later will find it (it reuses this state rather than making its own).
    state = PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"))
    lock, error = None, None
    if state.is_main_process:
        try:
            lock = _claim(output_dir, resume_from_checkpoint, overwrite)
        except (ValueError, OSError) as err:
            error = str(err)
    if state.num_processes > 1:
        error = broadcast_object_list([error])[0]
        # A barrier last: a gloo group torn down (a refused run exits) while its threads still release the broadcast's
        # buffers aborts the process ("terminate called without an active exception").
        state.wait_for_everyone()
    if error is not None:
        raise ValueError(error)
    try:
        yield lock
    finally:
        if lock is not None:
            lock.release()
