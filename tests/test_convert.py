import argparse
import logging

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL, DDIMScheduler, DiTPipeline, DiTTransformer2DModel
from safetensors.torch import save_file

from dit_hf.convert import dit_from_diffusers, dit_to_diffusers, load_original_dit_checkpoint, main
from dit_hf.modeling_dit import DiTModel

TINY = dict(
    sample_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=2, num_heads=2, num_classes=10,
    timestep_freq_shift=1,
)  # fmt: skip
TINY_DIFFUSERS = dict(
    num_attention_heads=2, attention_head_dim=16, num_layers=2, sample_size=8, patch_size=2, in_channels=4,
    out_channels=8, num_embeds_ada_norm=10, norm_eps=1e-6,
)  # fmt: skip


def perturb_(model: torch.nn.Module, seed: int = 0, std: float = 0.2) -> torch.nn.Module:
    """A fresh DiT predicts zeros (adaLN-Zero); random weights make the comparisons meaningful."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn(param.shape, generator=generator) * std)
    return model.eval()


def tiny_dit(seed: int = 0, **overrides) -> DiTModel:
    return perturb_(DiTModel(**{**TINY, **overrides}), seed)


def tiny_diffusers(share_embedder: bool = True, **overrides) -> DiTTransformer2DModel:
    model = perturb_(DiTTransformer2DModel(**{**TINY_DIFFUSERS, **overrides}))
    if share_embedder:
        shared = model.transformer_blocks[0].norm1.emb.state_dict()
        for block in model.transformer_blocks[1:]:
            block.norm1.emb.load_state_dict(shared)
    return model


def probe(num_classes: int = 10, in_channels: int = 4):
    generator = torch.Generator().manual_seed(1)
    sample = torch.randn(4, in_channels, 8, 8, generator=generator)
    timestep = torch.tensor([0, 1, 500, 999])
    class_labels = torch.tensor([0, 3, num_classes - 1, num_classes])  # the last is the null class
    return sample, timestep, class_labels


@torch.no_grad()
def max_difference(ours: DiTModel, theirs: DiTTransformer2DModel) -> float:
    sample, timestep, class_labels = probe(ours.config.num_classes, ours.config.in_channels)
    expected = ours(sample, timestep, class_labels).sample
    assert expected.abs().max() > 1.0  # a zero output would make every comparison pass
    actual = theirs(sample, timestep=timestep, class_labels=class_labels).sample
    return (actual - expected).abs().max().item()


def assert_same_state_dict(a: torch.nn.Module, b: torch.nn.Module):
    a, b = a.state_dict(), b.state_dict()
    assert sorted(a) == sorted(b)
    for name in a:
        assert torch.equal(a[name], b[name]), name


# ---------------------------------------------------------------------------------------------------------------------
# DiTModel -> diffusers


@pytest.mark.parametrize("learn_sigma", [True, False])
def test_export_matches_outputs(learn_sigma):
    model = tiny_dit(learn_sigma=learn_sigma)
    exported = dit_to_diffusers(model)
    assert not exported.training
    assert exported.config.out_channels == (8 if learn_sigma else 4)
    assert exported.config.norm_eps == 1e-6
    assert exported.config.num_embeds_ada_norm == 10
    assert max_difference(model, exported) <= 1e-5


def test_round_trip_gives_identical_state_dict():
    model = tiny_dit()
    round_tripped = dit_from_diffusers(dit_to_diffusers(model))
    assert_same_state_dict(model, round_tripped)
    for key in ("sample_size", "hidden_size", "depth", "num_heads", "num_classes", "learn_sigma"):
        assert round_tripped.config[key] == model.config[key]
    assert round_tripped.config.timestep_freq_shift == 1


def test_exported_model_runs_in_dit_pipeline(tmp_path, monkeypatch):
    # DiTPipeline hard-codes 1000 as the null class, so the tiny model needs 1000 classes for guidance.
    model = tiny_dit(num_classes=1000)
    dit_to_diffusers(model).save_pretrained(tmp_path / "transformer")
    transformer = DiTTransformer2DModel.from_pretrained(tmp_path / "transformer")
    vae = AutoencoderKL(
        block_out_channels=(8,),
        down_block_types=("DownEncoderBlock2D",),
        up_block_types=("UpDecoderBlock2D",),
        latent_channels=4,
        norm_num_groups=8,
        sample_size=8,
    ).eval()
    pipe = DiTPipeline(transformer=transformer, vae=vae, scheduler=DDIMScheduler())
    pipe.set_progress_bar_config(disable=True)

    def generate():
        generator = torch.Generator().manual_seed(0)
        return pipe([1, 999], num_inference_steps=2, generator=generator, output_type="np").images

    exported_images = generate()
    assert exported_images.shape == (2, 8, 8, 3)
    assert exported_images.std() > 1e-3

    # The same pipeline with the round-tripped and re-exported model gives the same images...
    pipe.transformer.load_state_dict(dit_to_diffusers(dit_from_diffusers(transformer)).state_dict())
    assert np.array_equal(generate(), exported_images)

    # ...and so does our own model denoising in its place (DiTPipeline only reads the config of `transformer`).
    def ours(hidden_states, timestep, class_labels, **kwargs):
        return model(hidden_states, timestep, class_labels)

    monkeypatch.setattr(pipe.transformer, "forward", ours)
    np.testing.assert_allclose(generate(), exported_images, atol=1e-5)


def test_export_of_original_frequencies_needs_strict_false(caplog):
    model = tiny_dit(timestep_freq_shift=0)
    with pytest.raises(ValueError, match="timestep_freq_shift=0.*strict=False"):
        dit_to_diffusers(model)

    with caplog.at_level(logging.WARNING, logger="dit_hf.convert"):
        exported = dit_to_diffusers(model, strict=False)
    assert "differ by up to" in caplog.text
    assert max_difference(model, exported) > 1e-3
    # Exactly the same weights with diffusers' frequencies.
    shifted = DiTModel(**{**TINY, "timestep_freq_shift": 1})
    shifted.load_state_dict(model.state_dict())
    assert max_difference(shifted.eval(), exported) <= 1e-5


@pytest.mark.parametrize(
    "overrides, match",
    [
        (dict(sample_size=(8, 4)), "square"),
        (dict(num_classes=0), "class-conditional"),
        (dict(class_dropout_prob=0.0), "null-class"),
        (dict(mlp_ratio=2.0), "mlp_ratio"),
    ],
)
def test_export_rejects_what_diffusers_cannot_represent(overrides, match):
    with pytest.raises(ValueError, match=match):
        dit_to_diffusers(DiTModel(**{**TINY, **overrides}))


# ---------------------------------------------------------------------------------------------------------------------
# diffusers -> DiTModel


@pytest.mark.parametrize("attention_bias", [True, False])
def test_import_matches_outputs(attention_bias):
    transformer = tiny_diffusers(attention_bias=attention_bias)
    model = dit_from_diffusers(transformer)
    assert not model.training
    assert model.config.timestep_freq_shift == 1
    assert model.config.learn_sigma
    assert model.config.class_dropout_prob == 0.1
    assert max_difference(model, transformer) <= 1e-5


def test_import_of_differing_block_embedders(caplog):
    transformer = tiny_diffusers(share_embedder=False)
    with pytest.raises(ValueError, match=r"blocks \[1\].*strict=False"):
        dit_from_diffusers(transformer)

    with caplog.at_level(logging.WARNING, logger="dit_hf.convert"):
        model = dit_from_diffusers(transformer, strict=False)
    assert "differ by up to" in caplog.text
    block0 = transformer.transformer_blocks[0].norm1.emb
    assert torch.equal(model.t_embedder.mlp[0].weight, block0.timestep_embedder.linear_1.weight)
    assert torch.equal(model.y_embedder.embedding_table.weight, block0.class_embedder.embedding_table.weight)


def test_import_of_diffusers_default_norm_eps(caplog):
    transformer = tiny_diffusers(norm_eps=1e-5)
    with pytest.raises(ValueError, match="norm_eps=1e-05.*strict=False"):
        dit_from_diffusers(transformer)

    with caplog.at_level(logging.WARNING, logger="dit_hf.convert"):
        model = dit_from_diffusers(transformer, strict=False)
    assert "norm_eps" in caplog.text
    assert 0 < max_difference(model, transformer) <= 1e-2


@pytest.mark.parametrize(
    "overrides, match",
    [
        (dict(activation_fn="gelu"), "gelu-approximate"),
        (dict(norm_eps=1e-4), "norm_eps=0.0001"),
        (dict(norm_elementwise_affine=True), "norm_elementwise_affine"),
        (dict(out_channels=5), "out_channels=5"),
    ],
)
def test_import_rejects_unsupported_configs(overrides, match):
    with pytest.raises(ValueError, match=match):
        dit_from_diffusers(DiTTransformer2DModel(**{**TINY_DIFFUSERS, **overrides}))


# ---------------------------------------------------------------------------------------------------------------------
# facebookresearch/DiT checkpoints


def original_pos_embed(embed_dim: int, grid_size: int) -> np.ndarray:
    """get_2d_sincos_pos_embed of MAE/DiT, written out independently of the package."""
    grid_w, grid_h = np.meshgrid(np.arange(grid_size, dtype=np.float64), np.arange(grid_size, dtype=np.float64))
    omega = 1.0 / 10000 ** (np.arange(embed_dim // 4, dtype=np.float64) / (embed_dim / 4))

    def embed_1d(pos):
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    # The first half of the channels encodes grid[0] of meshgrid(w, h), i.e. the column.
    return np.concatenate([embed_1d(grid_w), embed_1d(grid_h)], axis=1)


def original_state_dict(model: DiTModel) -> dict[str, torch.Tensor]:
    state_dict = dict(model.state_dict())
    pos_embed = original_pos_embed(model.config.hidden_size, model.config.sample_size // model.config.patch_size)
    state_dict["pos_embed"] = torch.from_numpy(pos_embed).float().unsqueeze(0)
    return state_dict


@pytest.fixture
def original_model():
    return tiny_dit(timestep_freq_shift=0)


@pytest.fixture
def original_checkpoint(tmp_path, original_model):
    path = tmp_path / "DiT-tiny-2-64x64.pt"
    torch.save(original_state_dict(original_model), path)
    return path


@torch.no_grad()
def assert_same_outputs(a: DiTModel, b: DiTModel):
    sample, timestep, class_labels = probe()
    expected = a(sample, timestep, class_labels).sample
    assert expected.abs().max() > 1.0
    torch.testing.assert_close(b(sample, timestep, class_labels).sample, expected, rtol=0, atol=0)


def test_load_original_checkpoint(original_checkpoint, original_model):
    model = load_original_dit_checkpoint(original_checkpoint, num_heads=2)
    assert not model.training
    inferred = {key: model.config[key] for key in TINY}
    assert inferred == {**TINY, "timestep_freq_shift": 0}
    assert model.config.learn_sigma and model.config.class_dropout_prob == 0.1 and model.config.mlp_ratio == 4.0
    assert_same_state_dict(model, original_model)
    assert_same_outputs(original_model, model)


def test_load_original_errors_name_the_fix(tmp_path, original_checkpoint):
    with pytest.raises(ValueError, match="pass `num_heads=...`"):
        load_original_dit_checkpoint(original_checkpoint)
    with pytest.raises(ValueError, match=r"Unknown DiTModel config keys \['heads'\]"):
        load_original_dit_checkpoint(original_checkpoint, heads=2)
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        load_original_dit_checkpoint(tmp_path / "missing.pt", num_heads=2)


def test_load_train_checkpoint_prefers_ema(tmp_path, original_model):
    raw = tiny_dit(seed=1, timestep_freq_shift=0)
    checkpoint = {
        "model": original_state_dict(raw),
        "ema": original_state_dict(original_model),
        "opt": torch.optim.AdamW(raw.parameters()).state_dict(),
        "args": argparse.Namespace(model="DiT-tiny/2", image_size=64),  # as DiT's train.py pickles it
    }
    torch.save(checkpoint, tmp_path / "0000100.pt")
    model = load_original_dit_checkpoint(tmp_path / "0000100.pt", num_heads=2)
    assert_same_state_dict(model, original_model)


def test_load_original_safetensors(tmp_path, original_model):
    save_file(original_state_dict(original_model), tmp_path / "dit.safetensors")
    model = load_original_dit_checkpoint(tmp_path / "dit.safetensors", num_heads=2)
    assert_same_state_dict(model, original_model)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_load_original_half_precision_checkpoint(tmp_path, original_model, dtype):
    state_dict = {name: tensor.to(dtype) for name, tensor in original_state_dict(original_model).items()}
    torch.save(state_dict, tmp_path / "dit-half.pt")
    model = load_original_dit_checkpoint(tmp_path / "dit-half.pt", num_heads=2)
    for name, tensor in model.state_dict().items():
        assert tensor.dtype == torch.float32 and torch.equal(tensor, state_dict[name].float()), name
    # A wrong embedding is still refused at that precision.
    state_dict["pos_embed"] = state_dict["pos_embed"] + 0.05
    with pytest.raises(ValueError, match="pos_embed"):
        load_original_dit_checkpoint(state_dict, num_heads=2)


def test_load_original_lists_missing_and_unexpected_keys(original_model):
    state_dict = original_state_dict(original_model)
    del state_dict["blocks.1.mlp.fc2.bias"]
    state_dict["blocks.1.extra.weight"] = torch.zeros(1)
    with pytest.raises(ValueError, match=r"Missing keys: \['blocks.1.mlp.fc2.bias'\]") as error:
        load_original_dit_checkpoint(state_dict, num_heads=2)
    assert "Unexpected keys: ['blocks.1.extra.weight']" in str(error.value)


def test_load_original_rejects_a_different_pos_embed(original_model):
    state_dict = original_state_dict(original_model)
    state_dict["pos_embed"] = state_dict["pos_embed"] + 1e-3
    with pytest.raises(ValueError, match="pos_embed"):
        load_original_dit_checkpoint(state_dict, num_heads=2)


# ---------------------------------------------------------------------------------------------------------------------
# Command line


def test_cli_converts_between_all_formats(tmp_path, capsys, original_checkpoint, original_model):
    main(["from-original", str(original_checkpoint), str(tmp_path / "dit"), "--num_heads", "2"])
    model = DiTModel.from_pretrained(tmp_path / "dit")
    assert_same_state_dict(model, original_model)

    with pytest.raises(SystemExit) as exit_info:
        main(["to-diffusers", str(tmp_path / "dit"), str(tmp_path / "diffusers")])
    assert exit_info.value.code == 2
    assert "--no-strict" in capsys.readouterr().err
    main(["to-diffusers", str(tmp_path / "dit"), str(tmp_path / "diffusers"), "--no-strict"])
    transformer = DiTTransformer2DModel.from_pretrained(tmp_path / "diffusers")

    main(["from-diffusers", str(tmp_path / "diffusers"), str(tmp_path / "back")])
    back = DiTModel.from_pretrained(tmp_path / "back")
    assert_same_state_dict(back, original_model)
    assert back.config.timestep_freq_shift == 1
    assert max_difference(back, transformer) <= 1e-5
