"""Fine-tuning from released weights: --init_from with original .pt, diffusers and dit-hf sources, and class maps."""

import json
import os
import sys

import pytest
import torch
from diffusers import DDPMScheduler
from safetensors.torch import load_file

from dit_hf import DiTModel, DiTPipeline
from dit_hf.convert import dit_to_diffusers
from dit_hf.init_from import init_from_weights, parse_class_map

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import train_dit  # noqa: E402

# The released model in miniature: 10 classes plus the null row, learned sigma, 1-channel 8×8 inputs (the digits).
RELEASED = dict(sample_size=8, patch_size=2, in_channels=1, hidden_size=32, depth=2, num_heads=2, num_classes=10)
TABLE = "y_embedder.embedding_table.weight"
NEW_CLASSES = ["zero", "one", "seven"]


def released_model(**overrides) -> DiTModel:
    with torch.random.fork_rng():
        torch.manual_seed(1)
        model = DiTModel(**{**RELEASED, **overrides})
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for param in model.parameters():  # a fresh DiT predicts zeros (adaLN-Zero): make every weight matter
            param.add_(0.1 * torch.randn(param.shape, generator=generator))
    return model.eval()


def save_original(model: DiTModel, path) -> str:
    """The facebookresearch/DiT release layout: a plain state dict that also stores the sin-cos `pos_embed`."""
    torch.save({**model.state_dict(), "pos_embed": model.pos_embed.clone()}, path)
    return str(path)


def save_diffusers(model: DiTModel, path) -> str:
    dit_to_diffusers(model).save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """The same released weights in the three accepted formats (diffusers' needs timestep_freq_shift=1)."""
    folder = tmp_path_factory.mktemp("released")
    original = released_model()
    shifted = released_model(timestep_freq_shift=1)
    DiTPipeline(transformer=original, scheduler=DDPMScheduler()).save_pretrained(folder / "pipeline")
    return {
        "original": (save_original(original, folder / "DiT-tiny.pt"), original),
        "diffusers": (save_diffusers(shifted, folder / "diffusers"), shifted),
        "pipeline": (str(folder / "pipeline"), original),
    }


def fresh_model(**overrides) -> DiTModel:
    with torch.random.fork_rng():
        torch.manual_seed(2)
        return DiTModel(**{**RELEASED, **overrides})


def assert_same_except_table(model: DiTModel, source: DiTModel):
    ours, theirs = model.state_dict(), source.state_dict()
    assert set(ours) == set(theirs)
    for name in ours:
        if name != TABLE:
            assert torch.equal(ours[name], theirs[name]), name


@pytest.mark.parametrize("kind", ["original", "diffusers", "pipeline"])
def test_three_class_subset_maps_rows_and_starts_the_rest_from_the_null_row(sources, kind):
    path, source = sources[kind]
    model = fresh_model(num_classes=3, timestep_freq_shift=source.config.timestep_freq_shift)
    counts = init_from_weights(model, path, {"zero": 0, "seven": 7}, NEW_CLASSES)
    assert counts == {"mapped": 2, "null": 1}
    old, new = source.state_dict()[TABLE], model.state_dict()[TABLE]
    assert new.shape == (4, 32)
    assert torch.equal(new[0], old[0]) and torch.equal(new[2], old[7])
    assert torch.equal(new[1], old[10])  # "one" is unmapped: the old null-class row
    assert torch.equal(new[3], old[10])  # the null row of guidance is kept
    assert_same_except_table(model, source)


def test_unmapped_rows_fresh_keep_their_initialisation_and_the_null_row_is_kept(sources):
    path, source = sources["original"]
    model = fresh_model(num_classes=3)
    initial = model.state_dict()[TABLE].clone()
    counts = init_from_weights(model, path, parse_class_map("7=7"), ["0", "1", "7"], unmapped="fresh")
    assert counts == {"mapped": 1, "fresh": 2}
    old, new = source.state_dict()[TABLE], model.state_dict()[TABLE]
    assert torch.equal(new[:2], initial[:2]) and not torch.equal(new[0], old[10])
    assert torch.equal(new[2], old[7]) and torch.equal(new[3], old[10])


def test_same_classes_without_a_map_give_the_same_outputs(sources):
    path, source = sources["original"]
    model = fresh_model()
    assert init_from_weights(model, path) == {"mapped": 10}
    sample = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    timestep, labels = torch.tensor([10, 500, 990]), torch.tensor([0, 9, 10])
    with torch.no_grad():
        assert torch.equal(model.eval()(sample, timestep, labels).sample, source(sample, timestep, labels).sample)


def test_an_unconditional_model_starts_as_the_null_class_prediction(sources):
    path, source = sources["original"]
    model = fresh_model(num_classes=0, class_dropout_prob=0.0)
    init_from_weights(model, path)
    sample = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    timestep = torch.tensor([100, 900])
    with torch.no_grad():
        expected = source(sample, timestep, torch.tensor([10, 10])).sample
        torch.testing.assert_close(model.eval()(sample, timestep).sample, expected, rtol=0, atol=1e-6)


def test_a_conditional_model_from_an_unconditional_one_starts_as_its_prediction(tmp_path):
    source = released_model(num_classes=0, class_dropout_prob=0.0)
    source.save_pretrained(tmp_path / "unconditional")
    model = fresh_model(num_classes=3)
    assert init_from_weights(model, str(tmp_path / "unconditional")) == {"null (unconditional checkpoint)": 4}
    sample = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    timestep = torch.tensor([100, 300, 600, 900])
    with torch.no_grad():
        expected = source(sample, timestep).sample
        torch.testing.assert_close(model.eval()(sample, timestep, torch.arange(4)).sample, expected, rtol=0, atol=0)
    with pytest.raises(ValueError, match="is unconditional, it has no label table"):
        init_from_weights(fresh_model(num_classes=3), str(tmp_path / "unconditional"), {"zero": 0}, NEW_CLASSES)


def test_shape_and_config_mismatches_are_listed(sources):
    path, _ = sources["original"]
    with pytest.raises(ValueError) as err:
        init_from_weights(fresh_model(hidden_size=64, num_heads=2), path)
    message = str(err.value)
    assert "--init_from" in message and "hidden_size 32 vs 64" in message
    assert "x_embedder.proj.weight: checkpoint (32, 1, 2, 2), model (64, 1, 2, 2)" in message
    assert "... and" in message  # every tensor differs: the listing is cut after 20 lines
    with pytest.raises(ValueError, match=r"final_layer.linear.weight: checkpoint \(8, 32\), model \(4, 32\)"):
        init_from_weights(fresh_model(learn_sigma=False), path)
    # Heads do not change any shape; a saved config records them (an original .pt does not: its width's heads, or
    # --num_heads for widths outside the paper, are taken).
    with pytest.raises(ValueError, match=r"config num_heads: checkpoint 2, model 4 \(set --num_heads\)"):
        init_from_weights(fresh_model(num_heads=4), sources["pipeline"][0])
    # diffusers' timestep frequencies are another function of the same weights.
    with pytest.raises(ValueError, match="timestep_freq_shift: checkpoint 1, model 0"):
        init_from_weights(fresh_model(), sources["diffusers"][0])


@pytest.mark.parametrize(
    "class_map, error, match",
    [
        ({"three": 3}, ValueError, r"\['three'\], which are not classes of the training data"),
        ({"zero": 10}, ValueError, r"\['zero=10'\].*classes 0..9"),
        (None, ValueError, "has 10 classes, the training data 3. Pass --class_map"),
    ],
)
def test_bad_class_maps_name_the_input(sources, class_map, error, match):
    with pytest.raises(error, match=match):
        init_from_weights(fresh_model(num_classes=3), sources["original"][0], class_map, NEW_CLASSES)


@pytest.mark.parametrize(
    "spec, match",
    [
        ("zero:0", r"entry 'zero:0' is not NEW_CLASS=OLD_INDEX"),
        ("zero=0,zero=1", "names class 'zero' twice"),
        ("zero=first", r"maps 'zero' to 'first'"),
        ("zero=-1", r"maps 'zero' to '-1'"),
    ],
)
def test_class_map_syntax_errors(spec, match):
    with pytest.raises(ValueError, match=match):
        parse_class_map(spec)


def test_class_map_json_file(tmp_path):
    path = tmp_path / "map.json"
    path.write_text(json.dumps({"golden retriever": 207, "tabby": 281}))
    assert parse_class_map(str(path)) == {"golden retriever": 207, "tabby": 281}
    path.write_text('{"tabby": 281, "tabby": 282}')
    with pytest.raises(ValueError, match="names class 'tabby' twice"):
        parse_class_map(str(path))
    path.write_text("[281]")
    with pytest.raises(ValueError, match="must hold one JSON object"):
        parse_class_map(str(path))
    with pytest.raises(FileNotFoundError, match="missing.json"):
        parse_class_map(str(tmp_path / "missing.json"))


@pytest.mark.filterwarnings("ignore:The `local_dir_use_symlinks` argument is deprecated")
def test_missing_sources_name_the_input(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such file or folder"):
        init_from_weights(fresh_model(), str(tmp_path / "DiT-XL-2-256x256.pt"))
    with pytest.raises(FileNotFoundError, match="has no config.json"):
        init_from_weights(fresh_model(), str(tmp_path))
    # A Hub id goes through diffusers' loading; offline (as in the tests) it fails with the id and the fix.
    with pytest.raises(FileNotFoundError, match=r"'facebook/DiT-XL-2-256' is not a local file.*HF_HUB_OFFLINE"):
        init_from_weights(fresh_model(), "facebook/DiT-XL-2-256")


def digit_folder(root, per_class: int = 8):
    """A 3-class image folder of 8×8 digits (0, 1 and 7), in the `zero`, `one`, `seven` subfolders."""
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    for name, digit in zip(NEW_CLASSES, (0, 1, 7)):
        (root / name).mkdir(parents=True)
        images = digits.images[digits.target == digit][:per_class]
        for i, image in enumerate(images):
            Image.fromarray((image * 255 / 16).astype("uint8"), mode="L").save(root / name / f"{i}.png")
    return root


TRAIN = [
    "--recipe", "digits", "--resolution", "8", "--image_channels", "1", "--hidden_size", "32", "--depth", "2",
    "--num_heads", "2", "--train_batch_size", "8", "--num_inference_steps", "2", "--num_samples_per_class", "1",
    "--logging_steps", "1", "--report_to", "none", "--validation_steps", "0", "--checkpointing_steps", "1",
    "--learning_rate", "0", "--resume_from_checkpoint", "latest",
]  # fmt: skip


def test_trainer_fine_tunes_a_released_checkpoint_to_three_classes_and_resume_wins(sources, tmp_path, monkeypatch):
    path, source = sources["original"]
    data = digit_folder(tmp_path / "data")
    command = [*TRAIN, "--train_data_dir", str(data), "--output_dir", str(tmp_path / "out"), "--init_from", path]
    # With lr 0 the trained weights stay the loaded ones, exactly.
    train_dit.main(train_dit.parse_args([*command, "--class_map", "seven=7,zero=0", "--max_train_steps", "1"]))
    weights = load_file(
        tmp_path / "out" / "checkpoints" / "checkpoint-1" / "transformer" / "diffusion_pytorch_model.safetensors"
    )
    old, new = source.state_dict()[TABLE], weights[TABLE]
    pipe = DiTPipeline.from_pretrained(tmp_path / "out")
    ids = pipe.labels  # name -> label id (folders in sorted order)
    assert ids == {"one": 0, "seven": 1, "zero": 2}
    assert torch.equal(new[ids["zero"]], old[0]) and torch.equal(new[ids["seven"]], old[7])
    assert torch.equal(new[ids["one"]], old[10]) and torch.equal(new[3], old[10])  # unmapped, and the null row
    assert all(torch.equal(weights[name], tensor) for name, tensor in source.state_dict().items() if name != TABLE)
    # The EMA (the saved pipeline) starts from the loaded weights too.
    ema = pipe.transformer.state_dict()
    assert all(torch.allclose(ema[name], weights[name], rtol=0, atol=1e-6) for name in weights)

    # The same command again resumes its checkpoint: --init_from is not applied a second time.
    def not_again(*args, **kwargs):
        raise AssertionError("--init_from applied although a checkpoint was resumed")

    monkeypatch.setattr("dit_hf.init_from.init_from_weights", not_again)
    summary = train_dit.main(
        train_dit.parse_args([*command, "--class_map", "seven=7,zero=0", "--max_train_steps", "2"])
    )
    assert summary["steps"] == 2


def test_trainer_refuses_a_class_map_without_init_from(tmp_path):
    with pytest.raises(ValueError, match="--class_map maps the classes of an --init_from checkpoint"):
        train_dit.parse_args([*TRAIN, "--output_dir", str(tmp_path), "--class_map", "zero=0"])
    with pytest.raises(ValueError, match="is not NEW_CLASS=OLD_INDEX"):
        train_dit.parse_args([*TRAIN, "--output_dir", str(tmp_path), "--init_from", "x.pt", "--class_map", "zero"])


def test_init_flags_are_config_fields_read_from_a_config_file_and_checked(tmp_path):
    from dit_hf.config import resolve_config

    path = tmp_path / "finetune.yaml"
    path.write_text(
        "recipe: digits\ninit_from: DiT-XL-2-256x256.pt\nclass_map: tabby=281\nclass_map_unmapped: fresh\n"
    )
    config = resolve_config(["--config", str(path), "--output_dir", str(tmp_path / "out")])
    assert (config.init_from, config.class_map, config.class_map_unmapped) == (
        "DiT-XL-2-256x256.pt",
        "tabby=281",
        "fresh",
    )
    assert resolve_config(["--recipe", "digits", "--output_dir", str(tmp_path / "out")]).class_map_unmapped == "null"
    path.write_text("recipe: digits\ninit_from: x.pt\nclass_map_unmapped: zero\n")
    with pytest.raises(ValueError, match=r"class_map_unmapped must be one of \['null', 'fresh'\], got 'zero'"):
        resolve_config(["--config", str(path), "--output_dir", str(tmp_path / "out")])
    path.write_text("recipe: digits\nclass_map: tabby=281\n")
    with pytest.raises(ValueError, match="--class_map maps the classes of an --init_from checkpoint"):
        resolve_config(["--config", str(path), "--output_dir", str(tmp_path / "out")])
