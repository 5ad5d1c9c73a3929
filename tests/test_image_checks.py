"""The unreadable-image scan runs once per data set, and not at all when training reads a complete latent cache."""

import os

import datasets
import pytest
from PIL import Image
from test_train import run, tiny_vae

import dit_hf.data
from dit_hf.data import drop_unreadable_images, load_image_dataset
from dit_hf.image_checks import drop_unreadable_images_once, image_files_key, stored_scan


@pytest.fixture
def decodes(monkeypatch):
    """Counts the images the scan decodes (it runs in this process: num_proc=None)."""
    count = {"rows": 0}
    original = dit_hf.data._unreadable_in_batch

    def counting(batch, indices, column):
        count["rows"] += len(indices)
        return original(batch, indices, column)

    monkeypatch.setattr(dit_hf.data, "_unreadable_in_batch", counting)
    return count


def image_folder(root, broken: bool = True):
    for cls in ("cats", "dogs"):
        (root / cls).mkdir(parents=True)
        for i in range(8):
            Image.new("RGB", (16, 16), (30 * i, 100 if cls == "cats" else 200, 30)).save(root / cls / f"{i}.png")
    if broken:
        (root / "dogs" / "broken.png").write_bytes(b"not a png at all")
    return root


class MainProcess:
    is_main_process, num_processes = True, 1


def test_scan_is_stored_and_redone_when_a_file_changes(tmp_path, decodes):
    ds = load_image_dataset(train_data_dir=str(image_folder(tmp_path / "data")), cache_dir=str(tmp_path / "hf"))
    store = tmp_path / "store"
    bad, scanned = stored_scan(ds, "image", str(store))
    assert scanned and decodes["rows"] == 17 and len(bad) == 1 and bad[0][1].endswith("broken.png")
    assert stored_scan(ds, "image", str(store)) == (bad, False) and decodes["rows"] == 17  # no decode the 2nd time
    assert len(os.listdir(store)) == 1

    # Repairing the broken file changes its size and mtime, hence the key: scanned again, now clean.
    broken = bad[0][1]
    Image.new("RGB", (16, 16)).save(broken, format="PNG")
    assert stored_scan(ds, "image", str(store)) == ([], True) and decodes["rows"] == 34
    # Same answer as the scan without a store, and the same clean data set.
    (tmp_path / "data" / "dogs" / "late.png").write_bytes(b"broken too")
    ds = load_image_dataset(train_data_dir=str(tmp_path / "data"), cache_dir=str(tmp_path / "hf"))
    once, bad_once = drop_unreadable_images_once(MainProcess(), ds, "image", 0.2, str(store))
    plain, bad_plain = drop_unreadable_images(ds, "image", 0.2)
    assert bad_once == bad_plain and len(bad_once) == 1 and len(once) == len(plain) == 17
    assert once._fingerprint == plain._fingerprint


def test_key_covers_paths_sizes_mtimes_and_embedded_bytes(tmp_path):
    folder = image_folder(tmp_path / "data", broken=False)
    ds = load_image_dataset(train_data_dir=str(folder), cache_dir=str(tmp_path / "hf"))
    key = image_files_key(ds, "image")
    assert image_files_key(ds, "image", batch_size=3) == key  # independent of how the column is read
    os.utime(folder / "cats" / "3.png", ns=(1, 1))
    assert image_files_key(ds, "image") != key
    embedded = datasets.Dataset.from_dict({"image": [Image.new("L", (4, 4))]}, features=datasets.Features(
        {"image": datasets.Image()}))  # fmt: skip
    assert len(image_files_key(embedded, "image")) == 64


def test_trainer_checks_images_once_and_never_with_a_complete_latent_cache(tmp_path, decodes, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf"))
    data = image_folder(tmp_path / "data")
    vae = tiny_vae(tmp_path / "vae")
    common = ["--train_data_dir", str(data), "--resolution", "16", "--model", "DiT-S/2", "--max_train_steps", "1",
              "--max_bad_image_fraction", "0.2", "--cache_dir", str(tmp_path / "hf"), "--vae", str(vae)]  # fmt: skip
    run(tmp_path / "a", *common)
    assert decodes["rows"] == 17  # the first run scans
    run(tmp_path / "b", *common)
    assert decodes["rows"] == 17  # the stored answer is reused
    cache = tmp_path / "cache"
    run(tmp_path / "c", *common, "--cache_latents", str(cache))
    assert decodes["rows"] == 17
    # Once the latent cache is complete, nothing is decoded even without the stored scan.
    for name in os.listdir(tmp_path / "hf" / "dit_hf_image_checks"):
        os.remove(tmp_path / "hf" / "dit_hf_image_checks" / name)
    summary = run(tmp_path / "d", *common, "--cache_latents", str(cache))
    assert decodes["rows"] == 17 and summary["steps"] == 1
