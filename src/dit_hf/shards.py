# Copyright the dit-hf authors. Licensed under the Apache License, Version 2.0.
"""Rows of safetensors shards read on demand through memory maps, so that a data set larger than RAM costs no private
memory and the processes of one machine share a single copy in the page cache.

A safetensors file is an 8-byte little-endian header length, a JSON header (`{name: {"dtype", "shape",
"data_offsets"}}` plus an optional `"__metadata__"`) and the raw row-major tensor bytes. Each shard is mapped once,
read-only; a tensor is a numpy view of its bytes, and a gather of rows copies just those rows. Nothing here knows what
the tensors mean: callers name them (the latent cache stores `mean`/`logvar`, other caches other names).

Shards hold contiguous runs of the data set's indices: shard `s` holds items `starts[s] .. starts[s] + rows[s] - 1`
(its `index` tensor, checked when opened), so mapping an index to its shard is one binary search.
"""

import json
import mmap
import os
import struct

import numpy as np
import torch

# safetensors dtype names -> (numpy storage type, torch dtype). bfloat16 has no numpy type: read as int16 and viewed.
DTYPES = {
    "F64": (np.float64, torch.float64),
    "F32": (np.float32, torch.float32),
    "F16": (np.float16, torch.float16),
    "BF16": (np.int16, torch.bfloat16),
    "I64": (np.int64, torch.int64),
    "I32": (np.int32, torch.int32),
    "I16": (np.int16, torch.int16),
    "I8": (np.int8, torch.int8),
    "U8": (np.uint8, torch.uint8),
    "BOOL": (np.bool_, torch.bool),
}


class ShardError(ValueError):
    """A shard file that cannot be read as safetensors (truncated, not safetensors, an unknown dtype)."""

    def __init__(self, message: str, path: str):
        super().__init__(message)
        self.path = path


def read_header(path: str) -> dict:
    """The JSON header of a safetensors file, checked against the file's size; raises `ShardError` if unreadable."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise ShardError(f"{path} is shorter than a safetensors header", path)
            (length,) = struct.unpack("<Q", raw)
            if length > size - 8:
                raise ShardError(f"{path} is truncated: its header claims {length} bytes", path)
            header = json.loads(f.read(length))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ShardError(f"{path} is unreadable ({err})", path) from err
    data_size = size - 8 - length
    for name, spec in header.items():
        if name == "__metadata__":
            continue
        if spec.get("dtype") not in DTYPES:
            raise ShardError(f"{path}: tensor {name!r} has an unsupported dtype {spec.get('dtype')!r}", path)
        begin, end = spec["data_offsets"]
        expected = int(np.prod(spec["shape"], dtype=np.int64)) * np.dtype(DTYPES[spec["dtype"]][0]).itemsize
        if end - begin != expected or end > data_size:
            raise ShardError(f"{path} is truncated or corrupt: tensor {name!r} does not fit in the file", path)
    header["__data_start__"] = 8 + length
    return header


def shard_metadata(path: str) -> dict[str, str]:
    """The string metadata stored in a safetensors file's header (`{}` if none)."""
    return read_header(path).get("__metadata__") or {}


class MappedShard:
    """One safetensors file, mapped read-only on first use; `array(name)` is a zero-copy numpy view of a tensor.

    Pickles as its path and header (a DataLoader worker maps the file again), never as the mapped bytes.
    """

    def __init__(self, path: str, header: dict | None = None):
        self.path = path
        self.header = header if header is not None else read_header(path)
        self._map = None

    def __getstate__(self) -> dict:
        return {"path": self.path, "header": self.header, "_map": None}

    def names(self) -> list[str]:
        return [name for name in self.header if not name.startswith("__")]

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.header[name]["shape"])

    def dtype(self, name: str) -> torch.dtype:
        return DTYPES[self.header[name]["dtype"]][1]

    def array(self, name: str) -> np.ndarray:
        if self._map is None:
            with open(self.path, "rb") as f:
                self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        spec = self.header[name]
        begin, end = (self.header["__data_start__"] + offset for offset in spec["data_offsets"])
        storage = DTYPES[spec["dtype"]][0]
        count = (end - begin) // np.dtype(storage).itemsize
        return np.frombuffer(self._map, dtype=storage, count=count, offset=begin).reshape(spec["shape"])


class ShardedRows:
    """Rows of several shards addressed by a global index, read from memory maps on demand.

    Args:
        paths (`list[str]`): The shard files. Each must hold an integer tensor `index_name` with a contiguous run of
            indices; together the runs must cover `range(num_rows)` exactly once.
        num_rows (`int`): The number of items in the data set.
        index_name (`str`, defaults to `"index"`): The tensor that holds each shard's indices.

    Raises:
        `ShardError`: If a shard is unreadable.
        `ValueError`: If a shard's indices are not one contiguous run, or the runs miss or repeat an index (the
            message counts the missing and repeated ones).
    """

    def __init__(self, paths: list[str], num_rows: int, index_name: str = "index"):
        self.shards = [MappedShard(path) for path in paths]
        self.num_rows = num_rows
        starts, counts = [], []
        for shard in self.shards:
            if index_name not in shard.header:
                raise ShardError(f"{shard.path} has no {index_name!r} tensor", shard.path)
            index = shard.array(index_name)
            start = int(index[0]) if len(index) else 0
            if len(index) and not np.array_equal(index, np.arange(start, start + len(index), dtype=index.dtype)):
                raise ValueError(f"{shard.path} holds indices that are not one contiguous run.")
            starts.append(start)
            counts.append(len(index))
            shard._map = None  # mapped again on first use: a process that never reads this shard keeps no map
        order = np.argsort(starts, kind="stable")
        self.shards = [self.shards[k] for k in order]
        self.starts = np.asarray(starts, dtype=np.int64)[order]
        self.counts = np.asarray(counts, dtype=np.int64)[order]
        self._check_coverage()

    def _check_coverage(self) -> None:
        ends = self.starts + self.counts
        tiled = np.array_equal(self.starts[1:], ends[:-1])
        if tiled and len(ends) and self.starts[0] == 0 and ends[-1] == self.num_rows:
            return
        # Count per index only on failure: a difference array over the runs (memory O(num_rows), freed at once).
        coverage = np.zeros(self.num_rows + 1, dtype=np.int64)
        np.add.at(coverage, np.clip(self.starts, 0, self.num_rows), 1)
        np.add.at(coverage, np.clip(ends, 0, self.num_rows), -1)
        seen = np.cumsum(coverage[:-1])
        missing, repeated = int((seen == 0).sum()), int((seen > 1).sum())
        if missing or repeated or (len(ends) and (self.starts.min() < 0 or ends.max() > self.num_rows)):
            raise ValueError(f"{missing} of {self.num_rows} samples are missing and {repeated} repeated")

    def __len__(self) -> int:
        return self.num_rows

    def names(self) -> list[str]:
        return self.shards[0].names() if self.shards else []

    def row_shape(self, name: str) -> tuple[int, ...]:
        return self.shards[0].shape(name)[1:]

    def dtype(self, name: str) -> torch.dtype:
        return self.shards[0].dtype(name)

    def locate(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The shard and the row within it of each index."""
        indices = np.asarray(indices, dtype=np.int64)
        if indices.size and (indices.min() < 0 or indices.max() >= self.num_rows):
            raise IndexError(f"indices out of range for {self.num_rows} rows")
        shard = np.searchsorted(self.starts, indices, side="right") - 1
        return shard, indices - self.starts[shard]

    def gather(self, names: list[str], indices, choice=None) -> torch.Tensor:
        """Rows `indices` as one new tensor `(len(indices), *row_shape)`, copied out of the maps.

        With `choice` (an integer per index), item k is read from tensor `names[choice[k]]` (e.g. an image or its
        flip); without it, from `names[0]`. All named tensors must share the row shape and dtype.
        """
        indices = np.asarray(indices, dtype=np.int64).reshape(-1)
        choice = np.zeros(len(indices), dtype=np.int64) if choice is None else np.asarray(choice).reshape(-1)
        shape, dtype = self.row_shape(names[0]), self.dtype(names[0])
        out = np.empty((len(indices), *shape), dtype=DTYPES[self.shards[0].header[names[0]]["dtype"]][0])
        shard_of, rows = self.locate(indices)
        for s in np.unique(shard_of):
            for c in np.unique(choice[shard_of == s]):
                picked = np.flatnonzero((shard_of == s) & (choice == c))
                data = self.shards[s].array(names[c])
                out[picked] = data[rows[picked]]
        tensor = torch.from_numpy(out)
        return tensor.view(dtype) if dtype == torch.bfloat16 else tensor
