# Copyright the dit-hf authors. Licensed under the Apache License, Version 2.0.
"""The unreadable-image scan, once per data set: its result is stored under a key of the data it looked at, and only
the main process ever scans; the others receive its answer.

Decoding every image costs about one epoch of JPEG decoding (hours on ImageNet). The key is the data set's fingerprint
plus, for every image stored as a file path, the file's path, size and modification time: a file that is repaired,
replaced or touched changes the key, and the scan runs again. Images embedded as bytes are covered by the
fingerprint, which `datasets` derives from the data files.

The trainer skips the scan entirely when it trains from a complete latent cache of the same data set (see
`dit_hf.latents.cache_covers_dataset`): the images are never decoded then.
"""

import hashlib
import json
import logging
import os

import datasets
import pyarrow.compute as pc

from .data import drop_unreadable_images, find_unreadable_images

logger = logging.getLogger(__name__)

STORE_SUBDIR = "dit_hf_image_checks"


def default_store_dir(cache_dir: str | None = None) -> str:
    """Where scan results are kept: `<cache_dir or datasets' cache>/dit_hf_image_checks`."""
    return os.path.join(cache_dir or datasets.config.HF_DATASETS_CACHE, STORE_SUBDIR)


def image_files_key(ds: datasets.Dataset, image_column: str, batch_size: int = 65536) -> str:
    """A hex digest of what decides the scan's answer: fingerprint, row count, and each image file's path, size and
    mtime. Stats the files (no reading, no decoding); a missing file hashes as such, and the scan then reports it."""
    digest = hashlib.sha256(json.dumps([getattr(ds, "_fingerprint", ""), image_column, len(ds)]).encode())
    raw = ds.select_columns([image_column]).cast_column(image_column, datasets.Image(decode=False))
    for table in raw.with_format("arrow").iter(batch_size=batch_size):
        column = table.column(image_column).combine_chunks()
        if column.null_count:
            column = column.fill_null({"bytes": None, "path": None})
        paths = pc.if_else(pc.is_null(column.field("bytes")), column.field("path"), None).to_pylist()
        for path in paths:
            if path is None:
                digest.update(b"\0")
                continue
            try:
                stat = os.stat(path)
                digest.update(f"{path}\0{stat.st_size}\0{stat.st_mtime_ns}\0".encode())
            except OSError:
                digest.update(f"{path}\0missing\0".encode())
    return digest.hexdigest()


def stored_scan(ds: datasets.Dataset, image_column: str, store_dir: str, num_proc: int | None = None):
    """`find_unreadable_images(ds, ...)`, read from `store_dir` when this data set was scanned before.

    Returns:
        `(unreadable, scanned)`: the `[(row index, description), ...]` list, and whether images were decoded now.
    """
    key = image_files_key(ds, image_column)
    path = os.path.join(store_dir, f"{key}.json")
    try:
        with open(path) as f:
            return [tuple(row) for row in json.load(f)["unreadable"]], False
    except (OSError, ValueError, KeyError):
        pass  # never scanned, or a damaged record: scan
    bad = find_unreadable_images(ds, image_column, num_proc=num_proc)
    try:
        os.makedirs(store_dir, exist_ok=True)
        with open(path + f".{os.getpid()}.tmp", "w") as f:
            json.dump({"num_rows": len(ds), "image_column": image_column, "unreadable": bad}, f)
        os.replace(path + f".{os.getpid()}.tmp", path)
    except OSError as err:  # a read-only cache: the run goes on, the next one scans again
        logger.warning("Could not store the image check in %s (%s); the next run will scan again.", store_dir, err)
    return bad, True


def drop_unreadable_images_once(
    accelerator,
    ds: datasets.Dataset,
    image_column: str,
    max_bad_fraction: float = 0.01,
    store_dir: str | None = None,
    num_proc: int | None = None,
):
    """[`dit_hf.data.drop_unreadable_images`] with the scan done by the main process alone, and at most once per data
    set (`stored_scan`); every process of `accelerator` must call it and gets the same clean data set.

    Returns:
        `(clean dataset, [(row index, description), ...])`.
    """
    bad, store_dir = None, store_dir or default_store_dir()
    if accelerator.is_main_process:
        bad, scanned = stored_scan(ds, image_column, store_dir, num_proc=num_proc)
        if not scanned:
            logger.info("Image check of %d rows read from %s (no image decoded).", len(ds), store_dir)
    if accelerator.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        bad = broadcast_object_list([bad], from_process=0)[0]
    return drop_unreadable_images(ds, image_column, max_bad_fraction, unreadable=bad)
