"""The latent cache: encoding matches the VAE, fingerprints guard reuse, shards split across processes, and the cached
dataset and posterior sampling reproduce `vae.encode(x).latent_dist`."""

import json
import os
import pickle
import shutil
import threading

import pytest
import torch
from accelerate import Accelerator
from diffusers import AutoencoderKL
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch.utils.data import DataLoader, Dataset

from dit_hf.latents import (
    BatchedCachedLatents,
    CachedLatentDataset,
    cache_fingerprint,
    check_cache,
    encode_to_cache,
    process_indices,
    sample_latents,
)
from dit_hf.training import SampleIndex, flip_flags

NUM_IMAGES = 10
LATENT_SHAPE = [4, 8, 8]  # two down blocks: one stride-2 downsample, so 16 px -> 8


class ImageDataset(Dataset):
    """Seeded random images in [-1, 1] with labels `i % 3`, shaped like the trainer's (unflipped) items."""

    def __init__(self, num_images: int = NUM_IMAGES, labels: bool = True):
        self.pixel_values = torch.rand(num_images, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
        self.labels = labels

    def __len__(self):
        return len(self.pixel_values)

    def __getitem__(self, i):
        item = {"pixel_values": self.pixel_values[i]}
        if self.labels:
            item["class_labels"] = torch.tensor(i % 3)
        return item


class ThreadAccelerator:
    """The parts of `Accelerator` that `encode_to_cache` uses, for one of several processes simulated by threads."""

    def __init__(self, process_index: int, barrier: threading.Barrier):
        self.process_index, self.num_processes, self.barrier = process_index, barrier.parties, barrier
        self.is_main_process = self.is_local_main_process = process_index == 0

    def wait_for_everyone(self):
        self.barrier.wait()


def tiny_vae() -> AutoencoderKL:
    torch.manual_seed(0)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(8, 16),
        latent_channels=4,
        norm_num_groups=4,
        layers_per_block=1,
        sample_size=16,
    ).eval()


def fingerprint_for(vae, dataset, resolution: int = 16) -> dict:
    return cache_fingerprint("tiny-vae", vae.config, "synthetic-seed-0", resolution, True, len(dataset))


def encode(vae, dataset, cache_dir, accelerator=None, **kwargs) -> str:
    # batch_size 3 and samples_per_shard 4: several shards per process, and a short last batch.
    return encode_to_cache(
        accelerator or Accelerator(cpu=True),
        vae,
        dataset,
        str(cache_dir),
        **{"batch_size": 3, "fingerprint": fingerprint_for(vae, dataset), "samples_per_shard": 4, **kwargs},
    )


@pytest.fixture(scope="module")
def vae():
    return tiny_vae()


@pytest.fixture(scope="module")
def dataset():
    return ImageDataset()


@pytest.fixture(scope="module")
def direct(vae, dataset):
    """Moments straight from the VAE, for the images and their flips."""
    with torch.no_grad():
        plain = vae.encode(dataset.pixel_values).latent_dist
        flipped = vae.encode(torch.flip(dataset.pixel_values, dims=[-1])).latent_dist
    return {"mean": plain.mean, "logvar": plain.logvar, "flip_mean": flipped.mean, "flip_logvar": flipped.logvar}


@pytest.fixture(scope="module")
def cache(vae, dataset, tmp_path_factory):
    """A complete cache shared by the tests of this module (treat it as read-only; copy it to change it)."""
    return encode(vae, dataset, tmp_path_factory.mktemp("latents") / "cache")


def read_shards(cache_dir) -> dict[str, torch.Tensor]:
    """Every shard of a cache, concatenated in dataset order."""
    names = sorted(n for n in os.listdir(cache_dir) if n.endswith(".safetensors"))
    shards = [load_file(os.path.join(cache_dir, n)) for n in names]
    merged = {key: torch.cat([s[key] for s in shards]) for key in shards[0]}
    order = merged["index"].argsort()
    return {key: value[order] for key, value in merged.items()}


def test_cache_matches_direct_encoding(cache, direct, dataset):
    with open(os.path.join(cache, "cache_info.json")) as f:
        info = json.load(f)
    assert info["shards"] == ["shard-000000.safetensors", "shard-000001.safetensors", "shard-000002.safetensors"]
    assert all(os.path.isfile(os.path.join(cache, name)) for name in info["shards"])
    assert info["num_samples"] == NUM_IMAGES and info["latent_shape"] == LATENT_SHAPE and info["dtype"] == "float32"
    assert info["scaling_factor"] == pytest.approx(0.18215) and info["shift_factor"] == 0.0
    assert info["has_labels"] is True and info["fingerprint"]["resolution"] == 16

    stored = read_shards(cache)
    assert torch.equal(stored["index"], torch.arange(NUM_IMAGES))
    assert torch.equal(stored["labels"], torch.arange(NUM_IMAGES) % 3)
    for key in ("mean", "logvar", "flip_mean", "flip_logvar"):
        torch.testing.assert_close(stored[key], direct[key], atol=1e-5, rtol=0)
    # The flip really is a different input: its posterior differs from the image's.
    assert (stored["flip_mean"] - stored["mean"]).abs().max() > 1e-3


def test_check_cache(cache, vae, dataset, tmp_path):
    fingerprint = fingerprint_for(vae, dataset)
    assert check_cache(str(tmp_path / "absent"), fingerprint) is False
    assert check_cache(str(tmp_path), fingerprint) is False  # exists but empty
    assert check_cache(cache, fingerprint) is True

    with pytest.raises(ValueError, match=r"\(resolution differ\).*another --cache_latents directory"):
        check_cache(cache, fingerprint_for(vae, dataset, resolution=32))
    other_vae = dict(vae.config, latent_channels=8)
    with pytest.raises(ValueError, match=r"vae_config\.latent_channels"):
        check_cache(cache, cache_fingerprint("tiny-vae", other_vae, "synthetic-seed-0", 16, True, NUM_IMAGES))

    interrupted = shutil.copytree(cache, tmp_path / "interrupted")
    os.remove(interrupted / "cache_info.json")
    assert check_cache(str(interrupted), fingerprint) is False


def test_rerun_rebuilds_an_interrupted_cache(cache, vae, dataset, direct, tmp_path):
    interrupted = shutil.copytree(cache, tmp_path / "interrupted")
    os.remove(interrupted / "cache_info.json")
    # Leftovers of the older per-process layout, and a half-written shard: a rebuild must not pick these up.
    shutil.copy(interrupted / "shard-000000.safetensors", interrupted / "shard-00003-00000.safetensors")
    (interrupted / "shard-000001.safetensors.tmp").write_bytes(b"partial")
    # A shard of other settings (here: another shard size) is encoded again, not reused.
    other = encode(vae, dataset, tmp_path / "other", samples_per_shard=5)
    shutil.copy(os.path.join(other, "shard-000001.safetensors"), interrupted / "shard-000001.safetensors")

    fingerprint = fingerprint_for(vae, dataset)
    assert not check_cache(str(interrupted), fingerprint)
    encode(vae, dataset, interrupted)
    assert sorted(os.listdir(interrupted)) == [
        "cache_info.json",
        "shard-000000.safetensors",
        "shard-000001.safetensors",
        "shard-000002.safetensors",
    ]
    assert check_cache(str(interrupted), fingerprint)
    torch.testing.assert_close(read_shards(interrupted)["mean"], direct["mean"], atol=1e-5, rtol=0)


def test_complete_cache_is_not_encoded_again(cache, dataset, vae):
    class ExplodingVAE:
        def encode(self, x):
            raise AssertionError("a complete cache must not be encoded again")

    mtimes = {name: os.stat(os.path.join(cache, name)).st_mtime_ns for name in os.listdir(cache)}
    # The trainer's pattern, from the module docstring.
    if not check_cache(cache, fingerprint_for(vae, dataset)):
        encode_to_cache(
            Accelerator(cpu=True), ExplodingVAE(), dataset, cache, fingerprint=fingerprint_for(vae, dataset)
        )
    assert {name: os.stat(os.path.join(cache, name)).st_mtime_ns for name in os.listdir(cache)} == mtimes


@pytest.mark.parametrize("num_samples", [0, 2, 3, 10, 11])
def test_process_indices_cover_every_index_once(num_samples):
    shares = [process_indices(num_samples, p, 3) for p in range(3)]
    assert [i for share in shares for i in share] == list(range(num_samples))  # contiguous, in order, no gaps
    assert max(map(len, shares)) - min(map(len, shares)) <= 1
    if num_samples == 10:
        assert shares == [range(0, 4), range(4, 7), range(7, 10)]
    with pytest.raises(ValueError, match="process_index=3"):
        process_indices(num_samples, 3, 3)


def test_encode_with_three_processes(vae, dataset, direct, tmp_path):
    barrier = threading.Barrier(3, timeout=60)
    errors = []

    def run(process_index):
        try:
            encode(vae, dataset, tmp_path, accelerator=ThreadAccelerator(process_index, barrier))
        except Exception as err:  # surfaced below: an exception in a thread would otherwise be lost
            errors.append(err)
            barrier.abort()

    threads = [threading.Thread(target=run, args=(p,)) for p in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors

    with open(tmp_path / "cache_info.json") as f:
        shards = json.load(f)["shards"]
    # Shards of samples_per_shard=4 items whatever the number of processes: one apiece.
    assert shards == ["shard-000000.safetensors", "shard-000001.safetensors", "shard-000002.safetensors"]
    assert load_file(tmp_path / "shard-000001.safetensors")["index"].tolist() == [4, 5, 6, 7]
    stored = read_shards(tmp_path)
    assert torch.equal(stored["index"], torch.arange(NUM_IMAGES))
    torch.testing.assert_close(stored["flip_logvar"], direct["flip_logvar"], atol=1e-5, rtol=0)


def test_cached_dataset_items(cache, direct):
    ds = CachedLatentDataset(cache)
    assert len(ds) == NUM_IMAGES and ds.scaling_factor == pytest.approx(0.18215) and ds.shift_factor == 0.0
    for i in (0, 7):
        item = ds[i]
        torch.testing.assert_close(item["moments"][0], direct["mean"][i], atol=1e-5, rtol=0)
        torch.testing.assert_close(item["moments"][1], direct["logvar"][i], atol=1e-5, rtol=0)
        assert item["class_labels"].dtype == torch.long and item["class_labels"].item() == i % 3

    batch = next(iter(DataLoader(ds, batch_size=4)))
    assert batch["moments"].shape == (4, 2, *LATENT_SHAPE)
    assert batch["class_labels"].tolist() == [0, 1, 2, 0]


def test_cached_dataset_batches_in_one_gather(cache, direct):
    ds = BatchedCachedLatents(cache)
    loader = DataLoader(ds, batch_size=4, shuffle=False, collate_fn=BatchedCachedLatents.collate)
    batches = list(loader)
    assert [b["moments"].shape[0] for b in batches] == [4, 4, 2]
    moments = torch.cat([b["moments"] for b in batches])
    torch.testing.assert_close(moments, torch.stack([ds[i]["moments"] for i in range(NUM_IMAGES)]), atol=0, rtol=0)
    assert torch.cat([b["class_labels"] for b in batches]).tolist() == [i % 3 for i in range(NUM_IMAGES)]

    flipping = BatchedCachedLatents(cache, random_flip=True)
    plain = torch.stack([direct["mean"], direct["logvar"]], dim=1)
    flipped = torch.stack([direct["flip_mean"], direct["flip_logvar"]], dim=1)
    order = [SampleIndex(i, epoch=1) for i in (5, 1, 9, 6, 2, 0, 3, 8, 7, 4)]
    batch = flipping.__getitems__(order)["moments"]
    is_flip = [torch.allclose(batch[k], flipped[i], atol=1e-5) for k, i in enumerate(order)]
    is_plain = [torch.allclose(batch[k], plain[i], atol=1e-5) for k, i in enumerate(order)]
    assert all(f != p for f, p in zip(is_flip, is_plain)) and 0 < sum(is_flip) < NUM_IMAGES
    # The flips of (seed, epoch, index), whichever way the items are fetched.
    assert is_flip == flipping.flips(order).bool().tolist()
    assert torch.equal(torch.stack([flipping[i]["moments"] for i in order]), batch)
    with pytest.raises(TypeError, match="__getitems__"):
        BatchedCachedLatents.collate([ds[0], ds[1]])


def test_cached_dataset_random_flip_is_seeded(cache, direct):
    ds = CachedLatentDataset(cache, random_flip=True, seed=1)
    plain = torch.stack([direct["mean"], direct["logvar"]], dim=1)
    flipped = torch.stack([direct["flip_mean"], direct["flip_logvar"]], dim=1)

    def flips(epoch=0):
        flags = []
        for i in range(NUM_IMAGES):
            moments = ds[SampleIndex(i, epoch)]["moments"]
            is_flip = torch.allclose(moments, flipped[i], atol=1e-5)
            # Each item is exactly one of its two cached posteriors, mean and logvar together.
            assert is_flip != torch.allclose(moments, plain[i], atol=1e-5)
            flags.append(is_flip)
        return flags

    first = flips()
    assert 0 < sum(first) < NUM_IMAGES  # some items flipped, some not
    torch.manual_seed(123)  # the flips draw nothing from torch's RNG
    assert flips() == first
    assert flips(epoch=1) != first and flips(epoch=2) != first  # another coin per epoch


def test_sample_latents(direct):
    moments = torch.stack([direct["mean"], direct["logvar"]], dim=1)  # (N, 2, C, h, w)
    latents = sample_latents(moments, 0.5, shift_factor=0.1, generator=torch.Generator().manual_seed(0))
    noise = torch.randn(direct["mean"].shape, generator=torch.Generator().manual_seed(0))
    by_hand = (direct["mean"] + torch.exp(0.5 * direct["logvar"]) * noise - 0.1) * 0.5
    torch.testing.assert_close(latents, by_hand)

    # Same generator, same draw as diffusers' DiagonalGaussianDistribution.sample.
    posterior = DiagonalGaussianDistribution(torch.cat([direct["mean"], direct["logvar"]], dim=1))
    posterior_sample = posterior.sample(generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(
        sample_latents(moments, 1.0, generator=torch.Generator().manual_seed(3)), posterior_sample
    )

    # logvar is clamped to [-30, 20] as in diffusers, so a huge logvar cannot overflow.
    extreme = torch.stack([torch.zeros(1, 1, 1), torch.full((1, 1, 1), 1e4)])
    assert torch.isfinite(sample_latents(extreme, 1.0, generator=torch.Generator().manual_seed(0))).all()


def test_cached_dataset_rejects_incomplete_cache(cache, tmp_path):
    missing = shutil.copytree(cache, tmp_path / "missing")
    os.remove(missing / "shard-000001.safetensors")
    with pytest.raises(ValueError, match="incomplete: shard shard-000001.safetensors is missing.*Delete"):
        CachedLatentDataset(str(missing))

    # A shard replaced by another's copy: indices 0-3 twice and 4-7 never.
    duplicated = shutil.copytree(cache, tmp_path / "duplicated")
    shutil.copy(duplicated / "shard-000000.safetensors", duplicated / "shard-000001.safetensors")
    with pytest.raises(ValueError, match="4 of 10 samples are missing and 4 repeated"):
        CachedLatentDataset(str(duplicated))

    truncated = shutil.copytree(cache, tmp_path / "truncated")
    shard = truncated / "shard-000001.safetensors"
    shard.write_bytes(shard.read_bytes()[:100])  # a copy cut short
    with pytest.raises(ValueError, match="corrupt: shard shard-000001.safetensors is unreadable"):
        CachedLatentDataset(str(truncated))

    with pytest.raises(ValueError, match="no complete latent cache"):
        CachedLatentDataset(str(tmp_path))


def test_unconditional_and_float16_caches(vae, direct, tmp_path):
    dataset = ImageDataset(labels=False)
    encode(vae, dataset, tmp_path, storage_dtype=torch.float16)
    ds = CachedLatentDataset(str(tmp_path))
    assert not ds.has_labels and set(ds[0]) == {"moments"}
    assert ds[3]["moments"].dtype == torch.float16
    torch.testing.assert_close(ds[3]["moments"][0].float(), direct["mean"][3], atol=1e-3, rtol=1e-3)
    assert sample_latents(ds[3]["moments"], 1.0).dtype == torch.float32


def test_encode_rejects_bad_arguments(vae, dataset, tmp_path):
    with pytest.raises(ValueError, match="storage_dtype=torch.bfloat16"):
        encode(vae, dataset, tmp_path, storage_dtype=torch.bfloat16)
    # Fewer samples than the fingerprint's are fine (unreadable images dropped); more are not.
    with pytest.raises(ValueError, match="fingerprint is for 4 samples but the data set has 10"):
        encode_to_cache(
            Accelerator(cpu=True), vae, dataset, str(tmp_path), fingerprint=fingerprint_for(vae, ImageDataset(4))
        )


def test_features_are_cached_with_each_image_and_its_flip(vae, dataset, tmp_path):
    def row_means(images):  # a stand-in encoder: per-channel means of each column, (B, 3, W); a flip reverses them
        return images.mean(dim=-2).to(torch.float16)

    cache_dir = encode(vae, dataset, tmp_path / "cache", features_fn=row_means)
    info = json.loads((tmp_path / "cache" / "cache_info.json").read_text())
    assert info["feature_shape"] == [3, dataset.pixel_values.shape[-1]]
    data = CachedLatentDataset(cache_dir)
    expected = row_means(dataset.pixel_values)
    flipped = row_means(torch.flip(dataset.pixel_values, dims=[-1]))
    everything = list(range(NUM_IMAGES))
    assert torch.equal(data.gather(everything, torch.zeros(NUM_IMAGES, dtype=torch.long))["repa_features"], expected)
    assert torch.equal(data.gather(everything, torch.ones(NUM_IMAGES, dtype=torch.long))["repa_features"], flipped)
    assert not torch.equal(expected, flipped)
    assert torch.equal(data[3]["repa_features"], expected[3])
    # Without features_fn there are none, and the fingerprint records which features a cache holds.
    assert "repa_features" not in CachedLatentDataset(encode(vae, dataset, tmp_path / "plain"))[0]
    assert "features" not in fingerprint_for(vae, dataset)
    with_features = cache_fingerprint("tiny-vae", vae.config, "x", 16, True, len(dataset), features="enc at 16")
    assert with_features["features"] == "enc at 16"


def test_mapped_batches_equal_the_in_memory_layout(cache):
    """Batches read from the mapped shards are bit for bit those of the former in-RAM tensor `(N, 2, 2, C, h, w)`."""
    stored = read_shards(cache)
    in_memory = torch.stack(
        [
            torch.stack([stored["mean"], stored["logvar"]], dim=1),
            torch.stack([stored["flip_mean"], stored["flip_logvar"]], dim=1),
        ],
        dim=1,
    )
    ds = BatchedCachedLatents(cache, random_flip=True)
    order = [9, 0, 4, 3, 8, 1, 5, 7]  # across all three shards, out of order
    batch = ds.__getitems__(order)
    flip = flip_flags(0, order).long()  # the flips of seed 0, epoch 0
    assert 0 < int(flip.sum()) < len(order)
    index = torch.tensor(order)
    assert torch.equal(batch["moments"], in_memory[index, flip])
    assert torch.equal(batch["class_labels"], stored["labels"][index])
    assert batch["moments"].is_contiguous() and batch["moments"].dtype == torch.float32
    # The whole-cache view reads the same layout a slice at a time.
    assert ds.moments.shape == in_memory.shape
    assert torch.equal(ds.moments[2:9], in_memory[2:9]) and torch.equal(ds.moments[-1], in_memory[-1])


def test_cached_dataset_holds_no_data_in_memory(vae, tmp_path):
    """The dataset pickles (into DataLoader workers) as paths and headers, whatever the size of the cache."""
    sizes = []
    for n in (10, 40):
        cache_dir = encode(vae, ImageDataset(n), tmp_path / str(n), samples_per_shard=40)
        ds = BatchedCachedLatents(cache_dir)
        ds[0]  # maps the shard
        sizes.append(len(pickle.dumps(ds)))
        copy = pickle.loads(pickle.dumps(ds))
        assert torch.equal(copy.__getitems__([3, 7])["moments"], ds.__getitems__([3, 7])["moments"])
    one_latent = 2 * 2 * 4 * 8 * 8 * 4  # bytes of one item's moments and their flip's
    assert sizes[1] - sizes[0] < one_latent  # 30 more items add (almost) nothing


class CountingVAE:
    """Delegates to a VAE, counting `encode` calls; raises on call `fail_at` (a crash in the middle of a build)."""

    def __init__(self, vae, fail_at: int | None = None):
        self.vae, self.fail_at, self.calls = vae, fail_at, 0
        self.device, self.dtype, self.config = vae.device, vae.dtype, vae.config

    def encode(self, x):
        self.calls += 1
        if self.calls == self.fail_at:
            raise KeyboardInterrupt("killed")
        return self.vae.encode(x)


def run_threads(num_processes: int, fn):
    barrier = threading.Barrier(num_processes, timeout=60)
    errors = []

    def run(process_index):
        try:
            fn(ThreadAccelerator(process_index, barrier))
        except BaseException as err:  # surfaced below: an exception in a thread would otherwise be lost
            errors.append(err)
            barrier.abort()

    threads = [threading.Thread(target=run, args=(p,)) for p in range(num_processes)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return errors


def test_interrupted_build_resumes_with_another_process_count(vae, tmp_path):
    dataset = ImageDataset(22)  # 6 shards of 4 (the last of 2): 2 batches each at batch_size 3, the last 1
    reference = encode(vae, dataset, tmp_path / "reference")

    # One process, killed in its 7th VAE call: shards 0-2 are finished, shard 3 was half encoded.
    crashing = CountingVAE(vae, fail_at=7)
    with pytest.raises(KeyboardInterrupt):
        encode(crashing, dataset, tmp_path / "cache")
    assert sorted(os.listdir(tmp_path / "cache")) == [f"shard-00000{k}.safetensors" for k in range(3)]
    assert not check_cache(str(tmp_path / "cache"), fingerprint_for(vae, dataset))

    # Relaunched on 2 processes: only shards 3, 4 and 5 are encoded (2 + 2 + 1 batches), split between them.
    counters = [CountingVAE(vae), CountingVAE(vae)]
    errors = run_threads(2, lambda acc: encode(counters[acc.process_index], dataset, tmp_path / "cache", acc))
    assert not errors, errors
    assert sum(c.calls for c in counters) == 5 and min(c.calls for c in counters) > 0
    assert check_cache(str(tmp_path / "cache"), fingerprint_for(vae, dataset))
    assert sorted(os.listdir(tmp_path / "cache")) == sorted(os.listdir(reference))
    for name in sorted(os.listdir(reference)):
        if name.endswith(".safetensors"):
            resumed, uninterrupted = load_file(tmp_path / "cache" / name), load_file(os.path.join(reference, name))
            assert all(torch.equal(resumed[key], uninterrupted[key]) for key in uninterrupted), name
    first = BatchedCachedLatents(str(tmp_path / "cache")).__getitems__(list(range(22)))["moments"]
    assert torch.equal(first, BatchedCachedLatents(reference).__getitems__(list(range(22)))["moments"])

    # A complete cache with other settings is not resumed from: every shard is encoded again.
    counting = CountingVAE(vae)
    encode(counting, dataset, tmp_path / "cache", storage_dtype=torch.float16)
    assert counting.calls == 11  # 5 shards of 2 batches and one of 1


def test_cache_of_deterministic_latents_reads_the_tensors_its_info_lists(cache, tmp_path):
    """A cache whose info lists "latent_tensors" ["latents"] (deterministic encoders) gives moments (B, 1, C, h, w)."""
    copy = tmp_path / "latents"
    shutil.copytree(cache, copy)
    for name in (n for n in os.listdir(copy) if n.endswith(".safetensors")):
        with safe_open(str(copy / name), framework="pt") as f:
            shard, metadata = {key: f.get_tensor(key) for key in f.keys()}, f.metadata()
        for prefix in ("", "flip_"):
            shard[prefix + "latents"] = shard.pop(prefix + "mean")
            del shard[prefix + "logvar"]
        save_file(shard, str(copy / name), metadata=metadata)
    info = json.loads((copy / "cache_info.json").read_text())
    (copy / "cache_info.json").write_text(json.dumps({**info, "latent_tensors": ["latents"]}))
    stored = read_shards(cache)
    ds = BatchedCachedLatents(str(copy), random_flip=False)
    assert torch.equal(ds.__getitems__([4, 0])["moments"], stored["mean"][[4, 0]].unsqueeze(1))
    assert ds.moments.shape == (len(ds), 2, 1, *LATENT_SHAPE)
    assert torch.equal(ds.moments[3][1, 0], stored["flip_mean"][3])


def test_channel_statistics_of_a_cache_read_through_the_maps(cache, tmp_path):
    """--latent_norm channel's statistics over the mapped cache equal those of the same moments held in memory."""
    from dit_hf.autoencoders import cached_channel_statistics, channel_statistics

    stored = read_shards(cache)
    in_memory = torch.stack(
        [torch.stack([stored[p + "mean"], stored[p + "logvar"]], dim=1) for p in ("", "flip_")], dim=1
    )
    copy = tmp_path / "cache"
    shutil.copytree(cache, copy)  # the statistics are stored beside the cache
    stats = cached_channel_statistics(str(copy), BatchedCachedLatents(str(copy)), is_main_process=True)
    expected = channel_statistics(in_memory)
    assert stats["mean"] == pytest.approx(expected["mean"], abs=1e-9)
    assert stats["std"] == pytest.approx(expected["std"], abs=1e-9)
    assert any(abs(m) > 1e-3 for m in stats["mean"])
