"""Checkpoint manifests: the size and SHA-256 of every file of a checkpoint, written last, verified before a resume.

A checkpoint folder counts as complete once it is renamed from its temporary name, but a rename says nothing about
what happened to its files afterwards: a disk that flips bits, a copy cut short, a second run writing into the same
folder, a file edited or planted by hand. `manifest.json` records each file as it was written; [`verify_manifest`]
reads every file back and names the first one that differs. Checkpoints written before manifests existed have none:
they load as *unverified*.
"""

import hashlib
import json
import os

MANIFEST = "manifest.json"
MANIFEST_FORMAT = 1
_CHUNK = 1 << 20


class CorruptCheckpointError(ValueError):
    """A checkpoint whose files do not match its manifest; the message names the file."""


def file_sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _relative_files(directory: str) -> list[str]:
    found = []
    for root, dirs, files in os.walk(directory):
        dirs.sort()
        found.extend(os.path.relpath(os.path.join(root, name), directory) for name in sorted(files))
    return [name for name in found if name != MANIFEST]


def write_manifest(directory: str) -> str:
    """Hash every file below `directory` into `directory/manifest.json` (written to a temporary name, then renamed).

    Call it once everything else is written: a checkpoint whose manifest is missing or stale fails verification.
    """
    files = {}
    for name in _relative_files(directory):
        path = os.path.join(directory, name)
        files[name.replace(os.sep, "/")] = {"size": os.path.getsize(path), "sha256": file_sha256(path)}
    path = os.path.join(directory, MANIFEST)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump({"format": MANIFEST_FORMAT, "files": files}, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path


def read_manifest(directory: str) -> dict[str, dict] | None:
    """The `files` table of `directory`'s manifest; None when it has none (a checkpoint older than manifests)."""
    path = os.path.join(directory, MANIFEST)
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            manifest = json.load(f)
        files = manifest["files"]
        if not isinstance(files, dict) or not all(
            isinstance(v, dict) and isinstance(v.get("size"), int) and isinstance(v.get("sha256"), str)
            for v in files.values()
        ):
            raise TypeError("malformed file table")
    except (ValueError, KeyError, TypeError) as err:
        raise CorruptCheckpointError(f"Checkpoint file {path} is not a readable manifest ({err}).") from None
    return files


def verify_manifest(directory: str) -> bool:
    """Check every file of `directory` against its manifest: True if verified, False if there is no manifest.

    Raises [`CorruptCheckpointError`] naming the first file that is missing, has another size or hash, or is not
    listed (a file added after the checkpoint was written, e.g. by another run or by hand). Sizes are compared
    first, so a truncated file is reported without hashing the rest.
    """
    files = read_manifest(directory)
    if files is None:
        return False
    present = {name.replace(os.sep, "/") for name in _relative_files(directory)}
    for name in sorted(present - set(files)):
        raise CorruptCheckpointError(
            f"Checkpoint file {os.path.join(directory, name)} is not in the checkpoint's manifest: it was added "
            "after the checkpoint was written."
        )
    for name, entry in sorted(files.items()):
        path = os.path.join(directory, name)
        if name not in present:
            raise CorruptCheckpointError(f"Checkpoint file {path} is missing (listed in the manifest).")
        size = os.path.getsize(path)
        if size != entry["size"]:
            raise CorruptCheckpointError(
                f"Checkpoint file {path} has {size} bytes, the manifest says {entry['size']} (truncated or rewritten)."
            )
    for name, entry in sorted(files.items()):
        path = os.path.join(directory, name)
        if file_sha256(path) != entry["sha256"]:
            raise CorruptCheckpointError(
                f"Checkpoint file {path} does not match its SHA-256 in the manifest (corrupted or modified)."
            )
    return True
