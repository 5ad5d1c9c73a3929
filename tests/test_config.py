"""The training config: layers (defaults <- recipe <- --config file <- flags), recipe files, freezing, round trip."""

import dataclasses
import json
import os
import sys

import pytest

from dit_hf.config import CONFIG_NAME, TrainConfig, build_parser, load_config, resolve_config
from dit_hf.recipes import NAMED_RECIPES, read_recipe_file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def resolve(tmp_path, *argv):
    return resolve_config([*argv, "--output_dir", str(tmp_path / "out")])


def test_no_arguments_is_the_digits_default(tmp_path):
    config = resolve(tmp_path)
    assert (config.recipe, config.recipe_picked, config.model, config.hidden_size, config.depth) == (
        "digits", True, "DiT-S/2", 128, 4,
    )  # fmt: skip
    assert (config.learning_rate, config.max_train_steps, config.ema_decay, config.learn_sigma) == (
        1e-3, 3000, "0.999", True,
    )  # fmt: skip
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.seed = 1  # nothing changes a resolved config


def test_layers_recipe_then_file_then_flags(tmp_path):
    config = resolve(tmp_path, "--config", "smoke", "--hidden_size", "48", "--no-cache_images")
    assert config.hidden_size == 48  # flag over file
    assert (config.depth, config.max_train_steps, config.report_to) == (2, 20, "none")  # file over recipe
    assert (config.learning_rate, config.model, config.recipe) == (1e-3, "DiT-S/2", "digits")  # the recipe beneath
    assert config.cache_images is False  # a boolean a file set to true can be switched off on the command line
    assert config.mlp_ratio == 4.0  # untouched field default


def test_a_runs_config_yaml_repeats_it(tmp_path):
    config = resolve(tmp_path, "--config", "smoke", "--seed", "3", "--ema_decay", "0.9,0.99", "--objective", "flow")
    path = config.save(str(tmp_path))
    assert os.path.basename(path) == CONFIG_NAME
    assert resolve_config(["--config", path]) == config
    assert load_config(path) == config
    # A flag still overrides the saved value, and the rest stays.
    again = resolve_config(["--config", path, "--seed", "4"])
    assert dataclasses.replace(again, seed=3) == config


@pytest.mark.parametrize("name", NAMED_RECIPES)
def test_every_shipped_recipe_resolves(tmp_path, name):
    latent = name in ("paper", "fast-dit", "lightningdit", "repa", "rae-dit-dh")
    config = resolve(tmp_path, "--config", name, *(["--vae", "some/vae"] if latent else []))
    assert isinstance(config, TrainConfig)
    assert config.recipe == read_recipe_file(name)[1]["recipe"]
    if config.objective in ("flow", "flow_x"):
        assert not config.learn_sigma and config.sample_scheduler in ("euler", "heun")


def test_recipe_files_set_what_their_comments_say(tmp_path):
    vae = ["--vae", "some/vae"]
    lightning = resolve(tmp_path, "--config", "lightningdit", *vae)
    assert (lightning.model, lightning.objective, lightning.timestep_sampling, lightning.adam_beta2) == (
        "LightningDiT-XL/2", "flow", "logit_normal", 0.95,
    )  # fmt: skip
    assert (lightning.train_batch_size, lightning.ema_decay, lightning.resolution) == (32, "0.9999", 256)  # paper's
    repa = resolve(tmp_path, "--config", "repa", *vae)
    assert (repa.repa_depth, repa.repa_coeff, repa.learn_sigma) == (8, 0.5, False)
    dh = resolve(tmp_path, "--config", "rae-dit-dh", *vae)
    assert (dh.model, dh.time_shift) == ("DiTDH-XL", "auto")
    fast = resolve(tmp_path, "--config", "recipes/fast-dit.yaml", *vae)  # the repository path works from anywhere
    assert (fast.cache_latents, fast.cache_images, fast.mixed_precision) == ("outputs/latent-cache-256", False, "bf16")


def test_repa_depth_defaults_to_a_third_of_the_model(tmp_path):
    assert resolve(tmp_path, "--repa_encoder", "enc").repa_depth == 1  # depth 4
    assert resolve(tmp_path, "--config", "paper", "--vae", "v", "--repa_encoder", "enc").repa_depth == 9  # XL: 28


@pytest.mark.parametrize(
    "text, error, match",
    [
        ("learning_rat: 0.1\n", ValueError, "unknown setting 'learning_rat'. Did you mean 'learning_rate'"),
        ("cache_images: 3\n", ValueError, "cache_images must be true or false"),
        ("depth: four\n", ValueError, "depth must be a number"),
        ("objective: diffusion\n", ValueError, "objective must be one of"),
        ("- a list\n", ValueError, "setting: value"),
    ],
)
def test_bad_config_files_name_the_setting(tmp_path, text, error, match):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(error, match=match):
        resolve(tmp_path, "--config", str(path))


def test_yaml_numbers_take_the_fields_type(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("learning_rate: 1e-4\nema_decay: 0.9999\nmax_grad_norm: 2\ntime_shift: 3\n")
    config = resolve(tmp_path, "--config", str(path))
    assert (config.learning_rate, config.ema_decay, config.max_grad_norm, config.time_shift) == (
        1e-4, "0.9999", 2.0, "3",
    )  # fmt: skip


def test_missing_config_file_lists_the_recipes(tmp_path):
    with pytest.raises(FileNotFoundError, match="smoke"):
        resolve(tmp_path, "--config", "nonexistent.yaml")


def test_every_field_but_the_derived_one_is_a_flag():
    parser = build_parser()
    flags = {action.dest for action in parser._actions} - {"help", "config"}
    assert flags == {f.name for f in dataclasses.fields(TrainConfig)} - {"recipe_picked"}


def test_train_dit_help_lists_the_recipes(capsys):
    sys.path.insert(0, ROOT)
    import train_dit

    with pytest.raises(SystemExit):
        train_dit.parse_args(["--help"])
    out = capsys.readouterr().out
    assert "lightningdit" in out and "--no-cache_images" in out


def test_config_yaml_of_a_run_repeats_it_bit_for_bit_and_checkpoints_record_it(tmp_path):
    sys.path.insert(0, os.path.join(ROOT, "tests"))
    from test_train import final_weights, losses, run

    import train_dit

    first = tmp_path / "first"
    run(first, "--max_train_steps", "3", "--checkpointing_steps", "3", "--seed", "5")
    saved = load_config(str(first / CONFIG_NAME))
    assert (saved.seed, saved.max_train_steps, saved.hidden_size) == (5, 3, 32)
    again = tmp_path / "again"
    train_dit.main(train_dit.parse_args(["--config", str(first / CONFIG_NAME), "--output_dir", str(again)]))
    assert losses(again) == losses(first)
    a, b = final_weights(first), final_weights(again)
    assert a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a)
    recorded = json.loads((first / "checkpoints" / "checkpoint-3" / "training_config.json").read_text())
    assert recorded["seed"] == 5 and recorded["mixed_precision"] == "no"  # the precision accelerate chose


def test_one_dtype_map_and_one_ema_folder_naming():
    from dit_hf import sample_eval
    from dit_hf.config import FIELDS
    from dit_hf.ema import ema_folder_name, export_folder_name
    from dit_hf.precision import PRECISION_DTYPES

    assert set(FIELDS["mixed_precision"].metadata["choices"]) - {"auto"} <= set(PRECISION_DTYPES)  # auto: resolved
    assert PRECISION_DTYPES["fp8"] is PRECISION_DTYPES["bf16"]  # FP8 runs the other layers in bf16
    assert sample_eval.PRECISIONS == {k: PRECISION_DTYPES[k] for k in ("fp32", "bf16", "fp16")}
    assert (ema_folder_name(0.99), export_folder_name(0.99)) == ("ema_0.99", "transformer_ema_0.99")
    assert sample_eval.EMA_PREFIX == "transformer_ema_"


@pytest.mark.parametrize("module", ["config", "objective", "trainer", "training", "recipes/__init__"])
def test_training_code_takes_the_scheduling_rules_not_the_pipeline(module):
    # The objective <-> scheduler rules live in scheduling_dit.py, which the pipeline file carries as Hub code.
    with open(os.path.join(ROOT, "src", "dit_hf", f"{module}.py")) as f:
        text = f.read()
    assert "pipeline_dit" not in text
