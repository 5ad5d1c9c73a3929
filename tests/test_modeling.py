import math

import numpy as np
import pytest
import torch
from conftest import make_pipe, tiny_dit

from dit_hf import DIT_PRESETS, DiTModel
from dit_hf.modeling_dit import LabelEmbedder, TimestepEmbedder

TINY = dict(sample_size=8, patch_size=2, in_channels=3, hidden_size=32, depth=2, num_heads=2, num_classes=10)


def perturbed(model: DiTModel, seed: int = 0, std: float = 0.1) -> DiTModel:
    """A fresh DiT predicts exactly zero (adaLN-Zero); random weights make outputs informative."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)
    return model.eval()


def inputs(n=3, channels=3, h=8, w=8, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, channels, h, w, generator=g), torch.tensor([0, 500, 999][:n]), torch.tensor([1, 7, 10][:n])


# Paper, Table 1 (DiT-S/B/L/XL): 33M, 130M, 458M, 675M parameters.
@pytest.mark.parametrize("name", sorted(DIT_PRESETS))
def test_preset_parameter_counts_match_paper(name):
    expected = {"S": 33e6, "B": 130e6, "L": 458e6, "XL": 675e6}[name.split("-")[1].split("/")[0]]
    with torch.device("meta"):
        model = DiTModel.from_preset(name)
    count = sum(p.numel() for p in model.parameters())
    assert abs(count - expected) < 0.01 * expected, f"{name}: {count / 1e6:.2f}M"


def test_unknown_preset_lists_valid_names():
    with pytest.raises(ValueError, match="DiT-XL/2"):
        DiTModel.from_preset("DiT-XXL/2")


def test_zero_init_predicts_zero_and_adaln_is_zero():
    model = DiTModel(**TINY)
    x, t, y = inputs()
    assert torch.count_nonzero(model(x, t, y).sample) == 0
    for block in model.blocks:
        assert torch.count_nonzero(block.adaLN_modulation[-1].weight) == 0
    assert torch.count_nonzero(model.final_layer.linear.weight) == 0
    assert model.y_embedder.embedding_table.weight.shape == (11, 32)  # null class row at index num_classes


def test_expected_output_slice():
    torch.manual_seed(0)
    model = perturbed(DiTModel(**TINY))
    x, t, y = inputs()
    out = model(x, t, y).sample
    assert out.shape == (3, 6, 8, 8)  # learn_sigma doubles the channels
    expected = torch.tensor([0.2725, 0.0574, 0.8298, 0.1896, 0.7264, 0.6353])
    torch.testing.assert_close(out[0, 0, 0, :6], expected, atol=2e-4, rtol=0)


def np_sincos_2d(embed_dim, grid_h, grid_w):
    """The MAE / DiT `get_2d_sincos_pos_embed` recipe, written independently in numpy."""

    def one_d(dim, pos):
        omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2.0))
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    grid = np.meshgrid(np.arange(grid_w, dtype=np.float64), np.arange(grid_h, dtype=np.float64))  # (w, h) order
    return np.concatenate([one_d(embed_dim // 2, grid[0]), one_d(embed_dim // 2, grid[1])], axis=1)


@pytest.mark.parametrize("size", [8, (8, 12)])
def test_position_embedding_matches_reference(size):
    model = DiTModel(**{**TINY, "sample_size": size})
    h, w = (size, size) if isinstance(size, int) else size
    expected = np_sincos_2d(32, h // 2, w // 2)
    np.testing.assert_allclose(model.pos_embed[0].numpy(), expected, atol=1e-6)
    assert "pos_embed" not in model.state_dict()  # fixed, rebuilt from the config


@pytest.mark.parametrize("shift", [0, 1])
def test_timestep_embedding_formula(shift):
    t = torch.tensor([0.0, 3.0, 999.0])
    emb = TimestepEmbedder.timestep_embedding(t, 256, freq_shift=shift).double()
    half = 128
    freqs = torch.tensor([math.exp(-math.log(10000) * i / (half - shift)) for i in range(half)], dtype=torch.float64)
    args = t.double()[:, None] * freqs[None]
    torch.testing.assert_close(emb, torch.cat([args.cos(), args.sin()], 1), atol=2e-4, rtol=0)


def test_non_square_latents_and_resolution_change():
    model = perturbed(DiTModel(**{**TINY, "sample_size": (8, 12)}))
    x, t, y = inputs(h=8, w=12)
    out = model(x, t, y).sample
    assert out.shape == (3, 6, 8, 12)
    # Rows and columns are not interchangeable: transposing the input does not transpose the output.
    out_t = DiTModel.from_config({**model.config, "sample_size": (12, 8)})
    out_t.load_state_dict(model.state_dict())
    assert not torch.allclose(out_t.eval()(x.transpose(2, 3), t, y).sample, out.transpose(2, 3), atol=1e-3)
    # A model run on another input size builds that grid's embedding.
    square = perturbed(DiTModel(**TINY))
    assert square(x, t, y).sample.shape == (3, 6, 8, 12)


def test_label_dropout_uses_null_class_from_config():
    embedder = LabelEmbedder(num_classes=5, hidden_size=4, dropout_prob=0.5)
    labels = torch.arange(5).repeat(20)
    torch.manual_seed(0)
    dropped = embedder(labels, train=True)
    torch.manual_seed(0)
    mask = torch.rand(labels.shape[0]) < 0.5
    expected = embedder.embedding_table(torch.where(mask, 5, labels))
    torch.testing.assert_close(dropped, expected)
    assert 20 < mask.sum() < 80
    torch.testing.assert_close(embedder(labels, train=False), embedder.embedding_table(labels))


def test_train_mode_drops_labels_eval_mode_does_not():
    model = perturbed(DiTModel(**{**TINY, "class_dropout_prob": 0.5}))
    x, t, y = inputs()
    null = model(x, t, torch.full_like(y, 10)).sample
    cond = model(x, t, y).sample
    model.train()
    outs = [model(x, t, y).sample for _ in range(8)]
    # Each row is either the conditional or the null-class prediction.
    for out in outs:
        for i in range(3):
            assert torch.allclose(out[i], cond[i], atol=1e-6) or torch.allclose(out[i], null[i], atol=1e-6)
    assert any(torch.allclose(out[0], null[0], atol=1e-6) for out in outs)


def test_unconditional_model():
    model = perturbed(DiTModel(**{**TINY, "num_classes": 0}))
    assert model.y_embedder is None
    x, t, _ = inputs()
    assert model(x, t).sample.shape == (3, 6, 8, 8)
    with pytest.raises(ValueError, match="unconditional"):
        model(x, t, torch.tensor([1, 2, 3]))
    cond = perturbed(DiTModel(**TINY))
    with pytest.raises(ValueError, match="class_labels"):
        cond(x, t)


def test_scalar_timestep_broadcasts():
    model = perturbed(DiTModel(**TINY))
    x, _, y = inputs()
    torch.testing.assert_close(model(x, 500, y).sample, model(x, torch.tensor([500] * 3), y).sample)


def test_return_dict_false_and_learn_sigma_off():
    model = perturbed(DiTModel(**{**TINY, "learn_sigma": False}))
    x, t, y = inputs()
    (out,) = model(x, t, y, return_dict=False)
    assert isinstance(out, torch.Tensor) and out.shape == (3, 3, 8, 8)
    torch.testing.assert_close(out, model(x, t, y).sample)


def test_save_load_round_trip_is_bit_identical(tmp_path):
    model = perturbed(DiTModel(**{**TINY, "sample_size": (8, 12)}))
    model.save_pretrained(tmp_path)
    assert (tmp_path / "diffusion_pytorch_model.safetensors").exists()
    loaded = DiTModel.from_pretrained(tmp_path).eval()
    assert tuple(loaded.config.sample_size) == (8, 12)
    x, t, y = inputs(w=12)
    assert torch.equal(loaded(x, t, y).sample, model(x, t, y).sample)


@pytest.mark.parametrize(
    "overrides, match",
    [
        (dict(sample_size=9), "divisible by `patch_size`"),
        (dict(hidden_size=30, num_heads=4), "divisible by `num_heads`"),
        (dict(num_classes=-1), "num_classes"),
        (dict(class_dropout_prob=1.0), "class_dropout_prob"),
        (dict(timestep_freq_shift=2), "timestep_freq_shift"),
        (dict(sample_size=(8, 8, 8)), "sample_size"),
    ],
)
def test_bad_config_raises(overrides, match):
    with pytest.raises(ValueError, match=match):
        DiTModel(**{**TINY, **overrides})


def test_bad_inputs_raise():
    model = DiTModel(**TINY)
    with pytest.raises(ValueError, match="channels"):
        model(torch.randn(1, 4, 8, 8), 1, torch.tensor([1]))
    with pytest.raises(ValueError, match="divisible by the patch size"):
        model(torch.randn(1, 3, 9, 8), 1, torch.tensor([1]))


def test_force_drop_ids_replaces_exactly_those_labels():
    model = perturbed(DiTModel(**{**TINY, "class_dropout_prob": 0.5}))
    x, t, y = inputs()
    drop = torch.tensor([True, False, True])
    expected = model(x, t, torch.where(drop, 10, y)).sample
    model.train()  # forced drops replace the random ones
    torch.testing.assert_close(model(x, t, y, force_drop_ids=drop).sample, expected)
    with pytest.raises(ValueError, match="class_dropout_prob"):
        perturbed(DiTModel(**{**TINY, "class_dropout_prob": 0.0}))(x, t, y, force_drop_ids=drop)


@pytest.mark.parametrize("head_depth", [0, 1])
def test_residual_stream_is_contiguous(head_depth):
    # A transposed token layout would make every LayerNorm and linear layer copy its input, forward and backward.
    model = DiTModel(
        sample_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=2, num_heads=2, head_depth=head_depth
    )
    seen = []
    blocks = list(model.blocks) + list(model.head_blocks or [])
    for block in blocks:
        block.register_forward_pre_hook(lambda module, inputs: seen.append(inputs[0].is_contiguous()))
    model(torch.randn(2, 4, 8, 8), torch.tensor([1, 500]), torch.tensor([3, 7]))
    assert seen == [True] * len(blocks)


def test_from_pretrained_refuses_missing_weights(tmp_path):
    from safetensors.torch import load_file, save_file

    from dit_hf import DiTPipeline

    make_pipe().save_pretrained(tmp_path)
    weights = tmp_path / "transformer" / "diffusion_pytorch_model.safetensors"
    state_dict = load_file(weights)
    del state_dict["blocks.1.attn.proj.weight"], state_dict["final_layer.linear.bias"]
    save_file(state_dict, weights, metadata={"format": "pt"})
    match = r"transformer' lack 2 of DiTModel's parameters \(\['blocks.1.attn.proj.weight', 'final_layer.linear.bias'"
    with pytest.raises(ValueError, match=match):
        DiTModel.from_pretrained(tmp_path / "transformer")
    with pytest.raises(ValueError, match=match):
        DiTModel.from_pretrained(tmp_path, subfolder="transformer")
    with pytest.raises(ValueError, match="lack 2 of DiTModel's parameters"):
        DiTPipeline.from_pretrained(tmp_path)
    # A complete folder loads as before, loading info included on request.
    complete = tmp_path / "complete"
    tiny_dit().save_pretrained(complete)
    model, info = DiTModel.from_pretrained(complete, output_loading_info=True)
    assert info["missing_keys"] == [] and isinstance(model, DiTModel)
    assert all(p.device.type == "cpu" for p in DiTModel.from_pretrained(complete).parameters())
