"""`sample_for_eval` / `dit-hf sample-eval`: many samples for FID, split over processes, resumable."""

import json
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import PIL.Image
import pytest
import torch
from conftest import ID2LABEL, make_pipe, tiny_dit
from test_distributed import ROOT, free_port

from dit_hf import DiTPipeline
from dit_hf.cli import main
from dit_hf.sample_eval import assign_labels, image_seed, sample_for_eval, shard

STEPS = 3
# Guidance and the learned-variance DDPM both on: the per-image generators feed the initial noise and every step.
KW = dict(num_inference_steps=STEPS, guidance_scale=2.0)


def pngs(out_dir) -> dict[str, np.ndarray]:
    arrays = {}
    for name in sorted(os.listdir(out_dir / "images")):
        with PIL.Image.open(out_dir / "images" / name) as img:
            arrays[name] = np.asarray(img)
    return arrays


def pngs_of(npz: str) -> np.ndarray:
    return np.load(npz)["arr_0"]


def direct_sample(pipe: DiTPipeline, label: int | None, index: int, seed: int = 0) -> np.ndarray:
    """The reference: one pipeline call for one image, with the generator seeded from (seed, index)."""
    kwargs = dict(KW, class_labels=[label]) if label is not None else dict(num_images=1, num_inference_steps=STEPS)
    generator = torch.Generator().manual_seed(image_seed(seed, index))
    image = pipe(generator=generator, output_type="np", **kwargs).images[0]
    return (image * 255).round().astype(np.uint8)


@pytest.mark.parametrize("world", [1, 2, 3])
def test_shards_cover_every_index_exactly_once(world):
    for indices in (list(range(10)), [1, 4, 5, 9, 12]):
        shares = [shard(indices, world, rank) for rank in range(world)]
        assert sorted(i for share in shares for i in share) == indices
        assert max(map(len, shares)) - min(map(len, shares)) <= 1


def test_balanced_labels():
    labels = assign_labels(30, 10, "balanced", seed=0)
    assert labels == [i % 10 for i in range(30)]
    assert np.bincount(labels).tolist() == [3] * 10
    with pytest.raises(ValueError, match=r"multiple of the 10 classes, got 25: use 20 or 30, or --labels uniform"):
        assign_labels(25, 10, "balanced", seed=0)
    with pytest.raises(ValueError, match=r"got 5: use 10, or"):
        assign_labels(5, 10, "balanced", seed=0)


def test_uniform_labels_do_not_depend_on_the_global_rng():
    # Processes have different global RNG states: the labels must come from the seed alone.
    torch.manual_seed(1)
    first = assign_labels(200, 10, "uniform", seed=3)
    torch.manual_seed(2)
    torch.rand(5)
    assert assign_labels(200, 10, "uniform", seed=3) == first
    assert assign_labels(200, 10, "uniform", seed=4) != first
    assert min(first) == 0 and max(first) == 9 and len(first) == 200
    assert assign_labels(5, 10, None, seed=3) is None


def test_image_seeds_are_distinct():
    seeds = {image_seed(seed, i) for seed in range(3) for i in range(1000)}
    assert len(seeds) == 3000


def test_samples_match_direct_calls_whatever_the_batch_size(tmp_path):
    pipe = make_pipe(id2label=ID2LABEL)
    npz_one = sample_for_eval(pipe, tmp_path / "one", 5, batch_size=1, **KW)
    npz_three = sample_for_eval(pipe, tmp_path / "three", 5, batch_size=3, **KW)
    labels = assign_labels(5, 10, "uniform", seed=0)
    one, three = pngs(tmp_path / "one"), pngs(tmp_path / "three")
    assert list(one) == [f"{i:06d}.png" for i in range(5)]
    for i, name in enumerate(one):
        np.testing.assert_array_equal(one[name], three[name])
        np.testing.assert_array_equal(one[name], direct_sample(pipe, labels[i], i))
    assert not np.array_equal(one["000000.png"], one["000001.png"])
    np.testing.assert_array_equal(np.load(npz_one)["arr_0"], np.load(npz_three)["arr_0"])


def test_npz_in_the_adm_format(saved_pipeline, tmp_path):
    npz = sample_for_eval(saved_pipeline, tmp_path, 7, batch_size=4, seed=5, **KW)
    assert os.path.basename(npz) == "samples_7x8x8x3.npz"
    data = np.load(npz)
    assert sorted(data.files) == ["arr_0", "arr_1"]
    assert data["arr_0"].dtype == np.uint8 and data["arr_0"].shape == (7, 8, 8, 3)
    assert data["arr_1"].dtype == np.int64 and data["arr_1"].tolist() == assign_labels(7, 10, "uniform", seed=5)
    for i, image in enumerate(pngs(tmp_path).values()):
        np.testing.assert_array_equal(data["arr_0"][i], image)
    settings = json.loads((tmp_path / "sample_eval.json").read_text())
    assert settings["pipeline"] == str(saved_pipeline) and settings["weights"] == "transformer"
    assert settings["labels"] == "uniform" and settings["num_samples"] == 7 and settings["resolution"] == [8, 8]
    assert settings["scheduler"] == "DDPMScheduler" and settings["num_inference_steps"] == STEPS
    assert settings["guidance_scale"] == 2.0 and settings["guidance_interval"] is None and settings["seed"] == 5


def test_unconditional_grayscale_is_repeated_to_rgb(tmp_path):
    pipe = make_pipe(tiny_dit(in_channels=1, num_classes=0))
    data = np.load(sample_for_eval(pipe, tmp_path, 3, num_inference_steps=STEPS))
    assert data.files == ["arr_0"] and data["arr_0"].shape == (3, 8, 8, 3)
    for i, image in enumerate(pngs(tmp_path).values()):
        assert image.shape == (8, 8)  # the PNGs stay grayscale
        reference = direct_sample(pipe, None, i)[..., 0]
        np.testing.assert_array_equal(image, reference)
        for channel in range(3):
            np.testing.assert_array_equal(data["arr_0"][i, ..., channel], reference)


def test_two_processes_make_the_same_samples(saved_pipeline, tmp_path):
    args = ["sample-eval", str(saved_pipeline), "--num_samples", "5", "--steps", str(STEPS), "--guidance_scale", "2"]
    env = {**os.environ, "PYTHONPATH": os.path.join(ROOT, "src"), "HF_HUB_OFFLINE": "1", "ACCELERATE_USE_CPU": "1"}
    env.pop("WORLD_SIZE", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), "-m", "dit_hf.cli", *args, "--batch_size", "2",
           "--out", str(tmp_path / "two")]  # fmt: skip
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("wrote 5 samples") == 1  # printed by the main process only
    # One progress bar, the main process's share (indices 0, 2, 4): the work really was split. (The main process
    # also shows diffusers' bar of the pipeline's components.)
    counts = re.findall(r"sample-eval: .*?\| (\d+/\d+) \[", result.stderr)
    assert "3/3" in counts and "5/5" not in counts and "2/2" not in counts
    main([*args, "--batch_size", "3", "--out", str(tmp_path / "one")])
    two, one = (np.load(tmp_path / name / "samples_5x8x8x3.npz") for name in ("two", "one"))
    np.testing.assert_array_equal(two["arr_0"], one["arr_0"])
    np.testing.assert_array_equal(two["arr_1"], one["arr_1"])


def test_resume_makes_only_missing_or_broken_pngs(tmp_path, monkeypatch):
    pipe = make_pipe(id2label=ID2LABEL)
    sample_for_eval(pipe, tmp_path, 6, batch_size=4, **KW)
    images = tmp_path / "images"
    before = {name: (images / name).read_bytes() for name in sorted(os.listdir(images))}
    (images / "000001.png").unlink()
    (images / "000004.png").unlink()
    (images / "000002.png").write_bytes(before["000002.png"][:40])  # truncated
    (images / "000003.png.123.tmp").write_bytes(b"left by a killed run")
    kept = {name: os.stat(images / name).st_mtime_ns for name in ("000000.png", "000003.png", "000005.png")}

    made = []
    call = DiTPipeline.__call__

    def counting_call(self, class_labels=None, **kwargs):
        made.extend(class_labels)
        return call(self, class_labels=class_labels, **kwargs)

    monkeypatch.setattr(DiTPipeline, "__call__", counting_call)
    sample_for_eval(pipe, tmp_path, 6, batch_size=4, **KW)
    labels = assign_labels(6, 10, "uniform", seed=0)
    assert made == [labels[1], labels[2], labels[4]]
    assert sorted(os.listdir(images)) == [f"{i:06d}.png" for i in range(6)]
    assert {name: (images / name).read_bytes() for name in before} == before
    assert {name: os.stat(images / name).st_mtime_ns for name in kept} == kept

    made.clear()
    sample_for_eval(pipe, tmp_path, 6, batch_size=4, **KW)
    assert made == []


def test_other_settings_are_refused_unless_overwrite(tmp_path):
    pipe = make_pipe(id2label=ID2LABEL)
    sample_for_eval(pipe, tmp_path, 2, **KW)
    with pytest.raises(ValueError, match=r"settings \(guidance_scale: 2\.0 in the folder, 3\.0 now\).*--overwrite"):
        sample_for_eval(pipe, tmp_path, 2, num_inference_steps=STEPS, guidance_scale=3.0)
    with pytest.raises(ValueError, match=r"weights_sha256"):
        sample_for_eval(make_pipe(tiny_dit(seed=1)), tmp_path, 2, **KW)
    with pytest.raises(ValueError, match=r"num_samples: 2 in the folder, 3 now"):
        sample_for_eval(pipe, tmp_path, 3, **KW)

    old = pngs(tmp_path)
    npz = sample_for_eval(pipe, tmp_path, 3, num_inference_steps=STEPS, guidance_scale=3.0, overwrite=True)
    assert sorted(os.listdir(tmp_path)) == ["images", "sample_eval.json", os.path.basename(npz)]
    assert not np.array_equal(pngs(tmp_path)["000000.png"], old["000000.png"])
    assert json.loads((tmp_path / "sample_eval.json").read_text())["guidance_scale"] == 3.0

    stray = tmp_path / "stray"
    (stray / "images").mkdir(parents=True)
    PIL.Image.new("RGB", (8, 8)).save(stray / "images" / "000000.png")
    with pytest.raises(ValueError, match=r"no sample_eval\.json, so their settings are unknown"):
        sample_for_eval(pipe, stray, 2, **KW)


def test_weights_choice_loads_that_subfolder(saved_pipeline, tmp_path):
    folder = tmp_path / "pipe"
    shutil.copytree(saved_pipeline, folder)
    ema = make_pipe(tiny_dit(seed=1), id2label=ID2LABEL)
    ema.transformer.save_pretrained(folder / "transformer_ema_0.999")

    own = pngs_of(sample_for_eval(folder, tmp_path / "own", 2, **KW))
    by_ema = pngs_of(sample_for_eval(folder, tmp_path / "ema", 2, weights="ema", **KW))
    by_name = pngs_of(sample_for_eval(folder, tmp_path / "name", 2, weights="transformer_ema_0.999", **KW))
    labels = assign_labels(2, 10, "uniform", seed=0)
    for i in range(2):
        np.testing.assert_array_equal(own[i], direct_sample(make_pipe(tiny_dit()), labels[i], i))
        np.testing.assert_array_equal(by_ema[i], direct_sample(ema, labels[i], i))
        np.testing.assert_array_equal(by_name[i], by_ema[i])
        assert not np.array_equal(own[i], by_ema[i])
    assert json.loads((tmp_path / "ema" / "sample_eval.json").read_text())["weights"] == "transformer_ema_0.999"

    with pytest.raises(FileNotFoundError, match=r"no transformer_ema_0\.9/ model folder.*\['transformer', "):
        sample_for_eval(folder, tmp_path / "x", 2, weights="transformer_ema_0.9", **KW)
    ema.transformer.save_pretrained(folder / "transformer_ema_0.9999")
    with pytest.raises(ValueError, match=r"ema is ambiguous.*'transformer_ema_0\.999', 'transformer_ema_0\.9999'"):
        sample_for_eval(folder, tmp_path / "x", 2, weights="ema", **KW)
    with pytest.raises(ValueError, match=r"no transformer_ema_<rate>/ folder.*use --weights transformer"):
        sample_for_eval(saved_pipeline, tmp_path / "x", 2, weights="ema", **KW)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(num_samples=0), ValueError, r"`num_samples` must be >= 1, got 0"),
        (dict(batch_size=0), ValueError, r"`batch_size` must be >= 1, got 0"),
        (dict(guidance_interval=(0.6, 0.2)), ValueError, r"0 <= low <= high <= 1.*got \(0\.6, 0\.2\)"),
        (dict(guidance_interval=(0.0, 1.5)), ValueError, r"0 <= low <= high <= 1.*got \(0\.0, 1\.5\)"),
        (dict(pipeline="/nonexistent/dit"), FileNotFoundError, r"'/nonexistent/dit' is neither a local folder"),
        (dict(steps=0), ValueError, r"`num_inference_steps` must be >= 1, got 0"),
        (dict(seed=-1), ValueError, r"`seed` must be >= 0, got -1"),
        (dict(guidance_scale=float("nan")), ValueError, r"`guidance_scale` must be a finite number >= 0, got nan"),
        (dict(guidance_scale=float("inf")), ValueError, r"`guidance_scale` must be a finite number >= 0, got inf"),
        (dict(pipeline="/nonexistent/dit"), FileNotFoundError, r"'/nonexistent/dit' is neither a local folder"),
    ],
)
def test_bad_inputs(saved_pipeline, tmp_path, kwargs, error, match):
    kwargs = {"pipeline": saved_pipeline, "num_samples": 2, **KW, **kwargs}
    kwargs["num_inference_steps"] = kwargs.pop("steps", STEPS)
    with pytest.raises(error, match=match):
        sample_for_eval(out_dir=tmp_path / "out", **kwargs)
    assert not (tmp_path / "out").exists()


def test_unconditional_model_refuses_labels_and_guidance(tmp_path):
    pipe = make_pipe(tiny_dit(num_classes=0))
    with pytest.raises(ValueError, match=r"--labels balanced: this model is unconditional.*drop --labels"):
        sample_for_eval(pipe, tmp_path, 2, labels="balanced", num_inference_steps=STEPS)
    with pytest.raises(ValueError, match=r"unconditional: guidance needs a class-conditional model"):
        sample_for_eval(pipe, tmp_path, 2, guidance_scale=1.5, num_inference_steps=STEPS)
    assert not tmp_path.joinpath("images").exists()


def test_folder_without_model_index_is_not_a_pipeline(tmp_path):
    tiny_dit().save_pretrained(tmp_path / "checkpoint-5" / "transformer")
    with pytest.raises(FileNotFoundError, match=r"no model_index\.json.*--output_dir"):
        sample_for_eval(tmp_path / "checkpoint-5", tmp_path / "out", 2)


def test_cli_reports_bad_input(saved_pipeline, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["sample-eval", str(saved_pipeline), "--num_samples", "2", "--out", str(tmp_path), "--weights", "ema"])
    assert exit_info.value.code == 2
    assert "dit-hf sample-eval: error: --weights ema" in capsys.readouterr().err


def test_cli_passes_every_option(saved_pipeline, tmp_path):
    out = tmp_path / "out"
    npz = main(["sample-eval", str(saved_pipeline), "--num_samples", "20", "--labels", "balanced", "--batch_size",
                "8", "--scheduler", "ddim", "--steps", "2", "--guidance_scale", "1.5", "--guidance_interval", "0.2",
                "0.8", "--seed", "7", "--precision", "bf16", "--device", "cpu", "--out", str(out)])  # fmt: skip
    settings = json.loads((out / "sample_eval.json").read_text())
    assert settings["scheduler"] == "DDIMScheduler" and settings["num_inference_steps"] == 2
    assert settings["guidance_scale"] == 1.5 and settings["guidance_interval"] == [0.2, 0.8]
    assert settings["seed"] == 7 and settings["precision"] == "bf16" and settings["labels"] == "balanced"
    assert np.load(npz)["arr_1"].tolist() == [i % 10 for i in range(20)]
    with pytest.raises(SystemExit):  # same folder, other settings
        main(["sample-eval", str(saved_pipeline), "--num_samples", "2", "--out", str(out)])


def test_a_launch_that_accelerate_does_not_see_is_refused(tmp_path, monkeypatch):
    # torchrun on a machine without GPU, without ACCELERATE_USE_CPU: every process would sample everything.
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match=r"Launched as 2 processes, but accelerate sees 1.*ACCELERATE_USE_CPU=1"):
        sample_for_eval(make_pipe(), tmp_path, 2, **KW)


def test_no_interval_guides_every_step_whatever_the_pipeline_saved(tmp_path):
    """The settings recorded in sample_eval.json are what sampled: a saved default interval does not slip in."""
    pipe = make_pipe(tiny_dit())
    pipe.register_to_config(default_guidance_interval=[0.5, 1.0])

    def images(name, interval):
        npz = sample_for_eval(pipe, tmp_path / name, 4, batch_size=4, guidance_interval=interval, **KW)
        return np.load(npz)["arr_0"]

    unset, every_step, saved = images("unset", None), images("every", (0.0, 1.0)), images("saved", (0.5, 1.0))
    np.testing.assert_array_equal(unset, every_step)
    assert not np.array_equal(unset, saved)
    assert json.loads((tmp_path / "unset" / "sample_eval.json").read_text())["guidance_interval"] is None
