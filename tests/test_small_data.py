"""The offline glyphs data set, its judge, the small-data recipe and EMA warm-up."""

import glob
import logging
import os
import sys

import numpy as np
import pytest
import torch
from accelerate import PartialState
from diffusers import FlowMatchHeunDiscreteScheduler

from dit_hf import DiTPipeline
from dit_hf.ema import EMAModels
from dit_hf.evaluation import ImageClassifier
from dit_hf.glyphs import DEFAULT_CLASSES, font_paths, make_glyphs_dataset, render_glyphs
from dit_hf.modeling_dit import RMSNorm, SwiGLU
from dit_hf.recipes import choose_recipe, estimate_hours, small_patch_size, token_warning

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from test_train import tiny_vae  # noqa: E402

import train_dit  # noqa: E402


def test_glyphs_are_deterministic_balanced_and_the_splits_differ():
    images, labels = render_glyphs(20, resolution=28)
    again, _ = render_glyphs(20, resolution=28)
    test, _ = render_glyphs(20, resolution=28, split="test")
    assert images.shape == (20, 28, 28) and images.dtype == np.uint8
    assert np.array_equal(images, again)
    assert not any(np.array_equal(a, b) for a in images for b in test)
    assert np.bincount(labels).tolist() == [2] * len(DEFAULT_CLASSES)
    # Every image holds a glyph: white strokes on black, neither empty nor filled.
    ink = (images > 127).mean(axis=(1, 2))
    assert ink.min() > 0.01 and ink.max() < 0.6
    rgb, _ = render_glyphs(10, resolution=16, channels=3)
    assert rgb.shape == (10, 16, 16, 3) and rgb.std(axis=(1, 2)).mean() > 10


def test_glyph_fonts_ship_with_matplotlib_and_draw_every_class():
    from PIL import Image, ImageDraw, ImageFont

    for path in font_paths():
        font = ImageFont.truetype(path, 40)
        for char in DEFAULT_CLASSES:
            canvas = Image.new("L", (64, 64))
            ImageDraw.Draw(canvas).text((8, 4), char, fill=255, font=font)
            assert np.asarray(canvas).sum() > 0, (os.path.basename(path), char)


def test_glyphs_bad_arguments():
    with pytest.raises(ValueError, match="split"):
        render_glyphs(2, split="val")
    with pytest.raises(ValueError, match="channels"):
        render_glyphs(2, channels=2)


def test_make_glyphs_writes_image_folders_and_refuses_a_used_folder(tmp_path):
    paths = make_glyphs_dataset(str(tmp_path / "g"), resolution=12, num_train=20, num_test=10)
    classes = sorted(os.listdir(paths["train"]))
    assert len(classes) == 10 and classes[0] == "0_A"
    assert sum(len(os.listdir(os.path.join(paths["test"], c))) for c in classes) == 10
    with pytest.raises(ValueError, match="not empty"):
        make_glyphs_dataset(str(tmp_path / "g"), resolution=12, num_train=20, num_test=10)


def test_image_classifier_judges_held_out_glyphs_and_not_shuffled_labels(tmp_path):
    images, labels = render_glyphs(1000, resolution=28)
    test, test_labels = render_glyphs(200, resolution=28, split="test")
    judge = ImageClassifier.fit(images, labels, epochs=4)
    accuracy = judge.accuracy(test, test_labels)
    assert accuracy > 0.8
    shuffled = np.random.default_rng(0).permutation(test_labels)
    assert judge.accuracy(test, shuffled) < 0.3
    judge.save(str(tmp_path / "judge.safetensors"))
    loaded = ImageClassifier.load(str(tmp_path / "judge.safetensors"))
    assert np.array_equal(loaded.predict(test), judge.predict(test))
    with pytest.raises(ValueError, match="1-channel 28 px"):
        judge.predict(np.zeros((2, 8, 8), dtype=np.uint8))


def test_recipe_choice_by_data_and_resolution():
    assert choose_recipe("auto", has_data=False, has_vae=False, resolution=None, native=None) == "digits"
    assert choose_recipe("auto", has_data=True, has_vae=True, resolution=None, native=512) == "paper"
    assert choose_recipe("auto", has_data=True, has_vae=False, resolution=None, native=28) == "small"
    assert choose_recipe("auto", has_data=True, has_vae=False, resolution=64, native=500) == "small"
    with pytest.raises(ValueError, match="No recipe trains 256 px images in pixel space: pass --vae"):
        choose_recipe("auto", has_data=True, has_vae=False, resolution=None, native=256)
    assert choose_recipe("paper", has_data=True, has_vae=False, resolution=None, native=256) == "paper"
    assert [small_patch_size(r) for r in (8, 16, 28, 32, 48, 64)] == [1, 2, 4, 4, 6, 8]


def test_few_tokens_warn_with_the_fix():
    assert token_warning(8, 2) is None  # the digits default: 16 tokens
    assert "use --patch_size 2" in token_warning(8, 4)
    # DiT-XL/2 on 28 px for a day's worth of steps: 710 GFLOP-class steps at a CPU's 100 GFLOP/s are days.
    assert estimate_hours(7.1e11, 400_000 * 256, 1e11) > 24


def test_small_data_recipe_is_picked_for_a_folder_of_small_images(tmp_path):
    paths = make_glyphs_dataset(str(tmp_path / "g"), resolution=16, num_train=40, num_test=10)
    args = train_dit.parse_args(["--train_data_dir", paths["train"], "--output_dir", str(tmp_path / "out")])
    assert (args.recipe, args.resolution, args.image_channels, args.patch_size) == ("small", 16, 1, 2)
    assert (args.objective, args.learn_sigma, args.ema_warmup, args.random_flip) == ("flow_x", False, True, False)
    assert (args.sample_scheduler, args.guidance_scale, args.guidance_interval) == ("euler", 4.0, [0.2, 0.8])
    assert (args.repa_encoder, args.repa_projector_dim, args.repa_coeff, args.repa_depth) == ("auto", 256, 4.0, 2)
    assert args.guidance_search == [4.0, 6.0, 8.0, 12.0]
    assert args.max_train_steps == 4000  # grayscale
    # LightningDiT's block with q/k norm, built as such: RMSNorm, a SwiGLU MLP and rotary angles in every block.
    model = train_dit.build_model(args, num_classes=10, in_channels=1, sample_size=16)
    assert model.blocks[0].mlp.w3.in_features == 512  # mlp_ratio 6: int(2 / 3 * 768)
    assert (model.config.norm_type, model.config.mlp_type, model.config.pos_embed_type) == ("rms", "swiglu", "rope2d")
    assert model.config.qk_norm and model.rotary_embedding(8, 8, torch.device("cpu")) is not None
    block = model.blocks[0]
    assert isinstance(block.norm1, RMSNorm) and isinstance(block.attn.q_norm, RMSNorm)
    assert isinstance(block.mlp, SwiGLU)
    # A flag still gives the plain DiT block back.
    plain = train_dit.parse_args(
        ["--train_data_dir", paths["train"], "--output_dir", str(tmp_path / "p"), "--norm_type", "layer"]
    )
    assert (plain.norm_type, plain.mlp_type) == ("layer", "swiglu")
    # An explicit flag wins over the recipe, and a sampler that cannot sample the objective is refused.
    args = train_dit.parse_args(
        ["--train_data_dir", paths["train"], "--output_dir", str(tmp_path / "o"), "--objective", "ddpm_eps"]
    )
    assert (args.objective, args.learn_sigma, args.sample_scheduler) == ("ddpm_eps", True, "ddpm")
    with pytest.raises(ValueError, match="cannot sample a flow_x model"):
        train_dit.parse_args(
            ["--train_data_dir", paths["train"], "--output_dir", str(tmp_path / "o"), "--sample_scheduler", "ddim"]
        )


def test_small_recipe_aligns_with_a_fitted_classifier_only_where_one_can_be_fitted(tmp_path, caplog):
    paths = make_glyphs_dataset(str(tmp_path / "g"), resolution=16, num_train=20, num_test=10)
    base = ["--train_data_dir", paths["train"], "--output_dir", str(tmp_path / "out")]
    auto = train_dit.parse_args(base)
    PartialState()  # the trainer's logger needs accelerate's state
    caplog.set_level(logging.INFO, logger="train_dit")
    assert train_dit.repa_encoder_name(auto, 10) == "classifier"
    for num_classes, reason in ((0, "no class labels"), (1, "one class")):
        caplog.clear()
        assert train_dit.repa_encoder_name(auto, num_classes) is None
        assert reason in caplog.text
    uncached = train_dit.parse_args([*base, "--no-cache_images"])  # `classifier` itself refuses this combination
    assert train_dit.repa_encoder_name(uncached, 10) is None and "--no-cache_images" in caplog.text
    latent = train_dit.parse_args([*base, "--recipe", "small", "--vae", "x", "--resolution", "16"])
    assert (latent.repa_encoder, train_dit.repa_encoder_name(latent, 10)) == ("auto", None)
    # Named by the user, an encoder is used as given (and `classifier` on unlabelled data is refused when fitted).
    named = train_dit.parse_args([*base, "--repa_encoder", "classifier"])
    assert train_dit.repa_encoder_name(named, 0) == "classifier"
    assert train_dit.repa_encoder_name(
        train_dit.parse_args(base + ["--repa_encoder", "facebook/dinov2-small"]), 0
    ) == ("facebook/dinov2-small")
    assert train_dit.parse_args([*base, "--repa_encoder", "none"]).repa_encoder is None


def test_small_recipe_trains_with_repa_on_a_labelled_folder_and_without_on_an_unlabelled_one(tmp_path):
    import json
    import shutil

    from dit_hf.repa import CLASSIFIER_FILE

    paths = make_glyphs_dataset(str(tmp_path / "g"), resolution=16, num_train=30, num_test=10)
    flat = tmp_path / "flat"  # the same images, no class folders
    flat.mkdir()
    for i, path in enumerate(sorted(glob.glob(os.path.join(paths["train"], "*", "*.png")))):
        shutil.copy(path, flat / f"{i:03d}.png")
    tiny = ["--hidden_size", "32", "--depth", "2", "--num_heads", "2", "--train_batch_size", "8"]
    tiny += ["--report_to", "none", "--max_train_steps", "2", "--num_inference_steps", "2"]
    tiny += ["--guidance_search_samples", "10"]
    aligned, searched = {}, {}
    for name, folder in (("labelled", paths["train"]), ("unlabelled", str(flat))):
        out = tmp_path / name
        train_dit.main(train_dit.parse_args(["--train_data_dir", folder, "--output_dir", str(out), *tiny]))
        rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        aligned[name] = ((out / CLASSIFIER_FILE).is_file(), any("repa_loss" in row for row in rows if "loss" in row))
        summary = json.loads((out / "summary.json").read_text())
        searched[name] = [trial["scale"] for trial in summary.get("guidance_search", {}).get("trials", [])]
    assert aligned == {"labelled": (True, True), "unlabelled": (False, False)}
    # The guidance search needs the fitted classifier: the recipe's scales on labelled data, none without labels.
    assert searched == {"labelled": [4.0, 6.0, 8.0, 12.0], "unlabelled": []}


def test_guidance_search_stores_the_chosen_scale_as_the_pipeline_default(tmp_path, monkeypatch):
    import json

    import dit_hf.guidance_search as guidance_search

    paths = make_glyphs_dataset(str(tmp_path / "g"), resolution=16, num_train=30, num_test=10)
    tiny = ["--hidden_size", "32", "--depth", "2", "--num_heads", "2", "--train_batch_size", "8"]
    tiny += ["--report_to", "none", "--max_train_steps", "2", "--num_inference_steps", "2"]
    tiny += ["--guidance_search", "1", "3", "--guidance_search_samples", "10", "--guidance_search_tolerance", "0.5"]
    seen = []
    # Whatever the two-step model scores, the trial the rule returns is what the pipeline keeps.
    choose = lambda trials, **options: seen.append((trials, options)) or trials[-1]  # noqa: E731
    monkeypatch.setattr(guidance_search, "choose_guidance", choose)
    out = tmp_path / "out"
    train_dit.main(train_dit.parse_args(["--train_data_dir", paths["train"], "--output_dir", str(out), *tiny]))
    ((trials, options),) = seen
    assert options == {"distance_tolerance": 0.5}
    assert [t.scale for t in trials] == [1.0, 3.0]
    assert all(0 <= t.accuracy <= 1 and t.feature_distance >= 0 for t in trials)
    assert DiTPipeline.from_pretrained(out).config.default_guidance_scale == 3.0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["guidance_search"]["chosen"] == 3.0 and len(summary["guidance_search"]["trials"]) == 2
    # A scale given on the command line is kept: no search.
    base = ["--train_data_dir", paths["train"], "--output_dir", str(tmp_path / "o")]
    assert train_dit.parse_args([*base, "--guidance_scale", "2"]).guidance_search is None
    assert train_dit.parse_args([*base, "--guidance_scale", "2", "--guidance_search", "2", "5"]).guidance_search == [
        2.0,
        5.0,
    ]
    with pytest.raises(ValueError, match="guidance_scale"):
        train_dit.parse_args([*base, "--guidance_search", "4", "nan"])
    for bad in ("-0.1", "nan"):
        with pytest.raises(ValueError, match="--guidance_search_tolerance must be >= 0"):
            train_dit.parse_args([*base, "--guidance_search_tolerance", bad])


def test_paper_recipe_on_a_cpu_is_refused_when_picked_automatically(tmp_path, monkeypatch):
    paths = make_glyphs_dataset(str(tmp_path / "g"), resolution=16, num_train=20, num_test=10)
    vae = tiny_vae(tmp_path / "vae")
    common = ["--train_data_dir", paths["train"], "--vae", str(vae), "--resolution", "16", "--report_to", "none"]
    common += ["--train_batch_size", "4"]
    with pytest.raises(ValueError, match="'paper' recipe's DiT-XL/2 .* would take about .* on 1 CPU"):
        train_dit.main(
            train_dit.parse_args([*common, "--output_dir", str(tmp_path / "a"), "--max_train_steps", "100000"])
        )


def test_ema_warmup_follows_the_schedule_and_is_off_by_default():
    model = torch.nn.Linear(2, 1, bias=False)
    torch.nn.init.zeros_(model.weight)
    plain, warm = EMAModels(model, "0.999"), EMAModels(model, "0.999", warmup=True)
    assert [warm.decay_at(0.999, n) for n in (0, 90, 10_000)] == [0.1, 0.91, 0.999]
    assert plain.decay_at(0.999, 0) == 0.999
    with torch.no_grad():
        model.weight.fill_(1.0)
    plain.update(model)
    warm.update(model)
    assert plain.averaged_model(model).weight[0, 0].item() == pytest.approx(0.001)
    assert warm.averaged_model(model).weight[0, 0].item() == pytest.approx(0.9)


def test_saved_pipeline_samples_with_the_settings_the_run_validated_with(tmp_path):
    paths = make_glyphs_dataset(str(tmp_path / "g"), resolution=16, num_train=32, num_test=10)
    out = tmp_path / "out"
    tiny = [
        "--hidden_size",
        "32",
        "--depth",
        "2",
        "--num_heads",
        "2",
        "--train_batch_size",
        "8",
        "--report_to",
        "none",
    ]
    settings = ["--num_inference_steps", "3", "--guidance_scale", "1.5", "--sample_scheduler", "heun"]
    settings += ["--guidance_interval", "0.5", "1"]
    train_dit.main(
        train_dit.parse_args(
            ["--train_data_dir", paths["train"], "--output_dir", str(out), "--max_train_steps", "2", *tiny, *settings]
        )
    )
    # diffusers checks the saved values against the constructor's annotations and warns on a mismatch.
    loader_logger = logging.getLogger("diffusers.pipelines.pipeline_utils")
    warnings_seen = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda record: warnings_seen.append(record.getMessage())
    loader_logger.addHandler(handler)
    try:
        pipe = DiTPipeline.from_pretrained(out)
    finally:
        loader_logger.removeHandler(handler)
    assert not [message for message in warnings_seen if "Expected types" in message], warnings_seen
    assert (pipe.config.default_num_inference_steps, pipe.config.default_guidance_scale) == (3, 1.5)
    assert pipe.config.default_guidance_interval == [0.5, 1.0]
    assert isinstance(pipe.scheduler, FlowMatchHeunDiscreteScheduler)
    with torch.no_grad():  # two steps of real weights, perturbed so that guidance changes the images
        for param in pipe.transformer.parameters():
            param.add_(0.1 * torch.randn(param.shape, generator=torch.Generator().manual_seed(param.numel())))
    default = pipe([0, 1], generator=torch.Generator().manual_seed(0), output_type="np").images
    explicit = pipe(
        [0, 1],
        num_inference_steps=3,
        guidance_scale=1.5,
        guidance_interval=(0.5, 1.0),
        generator=torch.Generator().manual_seed(0),
        output_type="np",
    ).images
    every_step = pipe(
        [0, 1], guidance_interval=(0.0, 1.0), generator=torch.Generator().manual_seed(0), output_type="np"
    )
    assert not np.allclose(default, every_step.images)
    other = pipe(
        [0, 1],
        num_inference_steps=50,
        guidance_scale=4.0,
        generator=torch.Generator().manual_seed(0),
        output_type="np",
    ).images
    assert np.array_equal(default, explicit) and not np.allclose(default, other)


def test_auto_precision_is_bf16_only_where_the_device_computes_it(tmp_path, monkeypatch, caplog):
    from dit_hf import precision
    from dit_hf.config import requested_precision

    if os.path.exists("/proc/cpuinfo"):  # the CPU check agrees with what the kernel reports
        flags = set(open("/proc/cpuinfo").read().split())
        assert precision.native_bf16("cpu") == bool(flags & {"avx512_bf16", "amx_tile"})
    assert precision.native_bf16("mps") is False
    # The device is accelerate's once its state exists; before, a visible GPU unless the launch asked for the CPU.
    assert precision.training_device_type() == PartialState(cpu=True).device.type == "cpu"
    monkeypatch.setattr(PartialState, "_shared_state", {})
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setenv("ACCELERATE_USE_CPU", "true")
    assert precision.training_device_type() == "cpu"
    monkeypatch.delenv("ACCELERATE_USE_CPU")
    assert precision.training_device_type() == "cuda"
    monkeypatch.undo()
    monkeypatch.setattr(precision, "native_bf16", lambda device_type: device_type == "cuda")
    assert precision.auto_precision(None, "cuda") == "bf16"
    assert precision.auto_precision("no", "cpu") == "no"
    assert precision.auto_precision("fp16", "cpu") == "fp16"  # what the accelerate config names wins
    paths = make_glyphs_dataset(str(tmp_path / "g"), resolution=16, num_train=20, num_test=10)
    base = ["--train_data_dir", paths["train"], "--output_dir", str(tmp_path / "out")]
    args = train_dit.parse_args(base)
    assert args.mixed_precision == "auto"  # the small recipe's
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "no")  # what `accelerate launch` exports by default
    for native, expected in ((True, "bf16"), (False, "no")):
        monkeypatch.setattr(precision, "native_bf16", lambda device_type, native=native: native)
        assert requested_precision(args) == expected
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "fp8")
    assert requested_precision(args) == "fp8"
    assert requested_precision(train_dit.parse_args([*base, "--mixed_precision", "no"])) == "no"
    # The trainer says what auto chose, and why.
    PartialState()
    caplog.set_level(logging.INFO, logger="train_dit")
    for precision_, launcher, expected in (("bf16", "no", "bf16, which the cpu computes natively"),
                                           ("no", "no", "float32: the cpu has no native bf16"),
                                           ("fp8", "fp8", "fp8, the accelerate config's")):  # fmt: skip
        monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", launcher)
        caplog.clear()
        train_dit.log_auto_precision(precision_, "cpu")
        assert f"--mixed_precision auto: {expected}." in caplog.text


def test_runs_of_another_precision_follow_each_other_in_one_process(tmp_path, monkeypatch):
    """A notebook (or a test session) may train twice with different precisions: the second run gets its own."""
    from dit_hf import precision
    from dit_hf.trainer import saved_training_config

    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION", raising=False)
    monkeypatch.setattr(precision, "native_bf16", lambda device_type: True)
    paths = make_glyphs_dataset(str(tmp_path / "g"), resolution=16, num_train=20, num_test=10)
    tiny = ["--hidden_size", "32", "--depth", "2", "--num_heads", "2", "--train_batch_size", "8", "--report_to"]
    tiny += ["none", "--max_train_steps", "2", "--num_inference_steps", "2", "--repa_encoder", "none"]
    for i, (flag, expected) in enumerate((("no", "no"), ("auto", "bf16"), ("no", "no"))):
        out = tmp_path / f"run{i}"
        args = train_dit.parse_args(["--train_data_dir", paths["train"], "--output_dir", str(out), *tiny,
                                     "--mixed_precision", flag])  # fmt: skip
        train_dit.main(args)
        (checkpoint,) = glob.glob(str(out / "checkpoints" / "checkpoint-*"))
        assert saved_training_config(checkpoint)["mixed_precision"] == expected


def test_cpu_threads_raise_only_accelerates_default_of_one(monkeypatch):
    """`accelerate launch` exports OMP_NUM_THREADS=1 for a CPU process; the trainer gives it the cores instead."""
    from types import SimpleNamespace

    from accelerate import PartialState

    PartialState(cpu=True)  # the trainer logs through accelerate
    accelerator = SimpleNamespace(device=torch.device("cpu"), num_processes=1)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    before = torch.get_num_threads()
    try:
        monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
        monkeypatch.setenv("OMP_NUM_THREADS", "1")
        torch.set_num_threads(1)
        train_dit.set_cpu_threads(None, accelerator)
        assert torch.get_num_threads() == cores
        # Two processes on this machine share the cores.
        torch.set_num_threads(1)
        monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
        train_dit.set_cpu_threads(None, accelerator)
        assert torch.get_num_threads() == max(1, cores // 2)
        # A thread count the user chose another way is kept; an explicit flag wins.
        monkeypatch.setenv("OMP_NUM_THREADS", "3")
        torch.set_num_threads(1)
        train_dit.set_cpu_threads(None, accelerator)
        assert torch.get_num_threads() == 1
        train_dit.set_cpu_threads(2, accelerator)
        assert torch.get_num_threads() == 2
        # Nothing changes on a GPU process.
        torch.set_num_threads(1)
        train_dit.set_cpu_threads(4, SimpleNamespace(device=torch.device("cuda", 0), num_processes=1))
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
    with pytest.raises(ValueError, match="--cpu_threads"):
        train_dit.parse_args(["--cpu_threads", "0"])


def test_guidance_interval_flag_and_yaml_values_are_checked(tmp_path):
    with pytest.raises(ValueError, match="--guidance_interval"):
        train_dit.parse_args(["--guidance_interval", "0.8", "0.2"])
    with pytest.raises(ValueError, match="--guidance_interval"):
        train_dit.parse_args(["--guidance_interval", "0", "1.5"])
    config = tmp_path / "c.yaml"
    config.write_text("guidance_interval: [0, 1]\n")  # YAML integers are read as the noise levels they are
    assert train_dit.parse_args(["--config", str(config)]).guidance_interval == [0.0, 1.0]
    config.write_text("guidance_interval: [low, 1]\n")
    with pytest.raises(ValueError, match="guidance_interval must be a list of numbers"):
        train_dit.parse_args(["--config", str(config)])


def test_small_recipe_length_follows_the_channels_and_gives_way_to_the_user(tmp_path):
    gray = make_glyphs_dataset(str(tmp_path / "g"), resolution=16, channels=1, num_train=20, num_test=10)
    colour = make_glyphs_dataset(str(tmp_path / "c"), resolution=16, channels=3, num_train=20, num_test=10)

    def parse(paths, *flags):
        return train_dit.parse_args(["--train_data_dir", paths["train"], "--output_dir", str(tmp_path / "o"), *flags])

    assert (parse(gray).max_train_steps, parse(colour).max_train_steps) == (4000, 6000)
    assert parse(colour, "--max_train_steps", "300").max_train_steps == 300
    by_epochs = parse(colour, "--num_train_epochs", "3")  # epochs given: the trainer counts the steps from them
    assert (by_epochs.max_train_steps, by_epochs.num_train_epochs) == (None, 3)
    # The recipe's REPA block is for its own 4-block model; another depth takes REPA's depth // 3.
    assert parse(colour).repa_depth == 2 and parse(colour, "--depth", "9").repa_depth == 3
    assert parse(colour, "--depth", "9", "--repa_depth", "7").repa_depth == 7
    with pytest.raises(ValueError, match="--repa_depth 7 is not a block of this 4-block model: choose 1 to 4"):
        parse(colour, "--repa_depth", "7")
