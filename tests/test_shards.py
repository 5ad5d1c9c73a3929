"""Memory-mapped safetensors shards: rows of any named tensor, any dtype, gathered by global index."""

import pickle

import pytest
import torch
from safetensors.torch import save_file

from dit_hf.shards import ShardedRows, ShardError, read_header, shard_metadata


def write_shards(tmp_path, sizes=(3, 4, 2)) -> tuple[list[str], dict[str, torch.Tensor]]:
    """Shards of contiguous runs with a float32 `latents` (n, 2, 3), a bfloat16 `stats` (n, 5) and int64 `labels`."""
    generator = torch.Generator().manual_seed(0)
    total = sum(sizes)
    whole = {
        "latents": torch.randn(total, 2, 3, generator=generator),
        "stats": torch.randn(total, 5, generator=generator).to(torch.bfloat16),
        "labels": torch.arange(total) * 7,
    }
    paths, start = [], 0
    for k, n in enumerate(sizes):
        part = {key: value[start : start + n].clone() for key, value in whole.items()}
        part["index"] = torch.arange(start, start + n)
        path = str(tmp_path / f"part-{k}.safetensors")
        save_file(part, path, metadata={"note": f"shard {k}"})
        paths.append(path)
        start += n
    return paths, whole


def test_gather_any_tensor_in_any_order(tmp_path):
    paths, whole = write_shards(tmp_path)
    rows = ShardedRows(list(reversed(paths)), num_rows=9)  # the order of the files does not matter
    assert len(rows) == 9 and sorted(rows.names()) == ["index", "labels", "latents", "stats"]
    order = [8, 0, 4, 3, 7, 2]
    assert torch.equal(rows.gather(["latents"], order), whole["latents"][order])
    stats = rows.gather(["stats"], order)
    assert stats.dtype == torch.bfloat16 and torch.equal(stats, whole["stats"][order])
    assert torch.equal(rows.gather(["labels"], order), whole["labels"][order])
    # A choice per item between tensors of one shape: here the same tensor twice, and `labels` vs `index`.
    both = rows.gather(["labels", "index"], order, choice=[0, 1, 0, 1, 0, 1])
    assert both.tolist() == [56, 0, 28, 3, 49, 2]
    assert rows.row_shape("latents") == (2, 3) and rows.dtype("stats") == torch.bfloat16
    with pytest.raises(IndexError):
        rows.gather(["labels"], [9])
    # Pickled without the mapped bytes; the copy maps the files again.
    copy = pickle.loads(pickle.dumps(rows))
    assert torch.equal(copy.gather(["latents"], order), whole["latents"][order])
    assert shard_metadata(paths[1]) == {"note": "shard 1"}


def test_coverage_and_corrupt_files_are_refused(tmp_path):
    paths, _ = write_shards(tmp_path)
    with pytest.raises(ValueError, match="4 of 9 samples are missing and 0 repeated"):
        ShardedRows([paths[0], paths[2]], num_rows=9)
    with pytest.raises(ValueError, match="0 of 9 samples are missing and 3 repeated"):
        ShardedRows(paths + [paths[0]], num_rows=9)
    gap = str(tmp_path / "gap.safetensors")
    save_file({"index": torch.tensor([0, 2])}, gap)
    with pytest.raises(ValueError, match="not one contiguous run"):
        ShardedRows([gap], num_rows=3)
    truncated = str(tmp_path / "truncated.safetensors")
    with open(paths[1], "rb") as f:
        data = f.read()
    with open(truncated, "wb") as f:
        f.write(data[:-8])
    with pytest.raises(ShardError, match="truncated") as err:
        read_header(truncated)
    assert err.value.path == truncated
    with open(truncated, "wb") as f:
        f.write(b"\x01\x00")
    with pytest.raises(ShardError, match="shorter than a safetensors header"):
        ShardedRows([truncated], num_rows=1)
