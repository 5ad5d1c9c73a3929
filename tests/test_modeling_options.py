"""The LightningDiT / DiT^DH options of DiTModel, checked against a float64 reference written out from the papers."""

import math

import pytest
import torch
from conftest import TINY_DIT, tiny_dit

from dit_hf import DiTModel
from dit_hf.convert import dit_to_diffusers
from dit_hf.modeling_dit import (
    PLAIN_DIT_OPTIONS,
    RECIPE_PRESETS,
    Attention,
    DiTBlock,
    RMSNorm,
    SwiGLU,
    TimestepEmbedder,
    apply_rope,
    rope_2d,
    swiglu_hidden_size,
)

HEAD = dict(head_depth=2, head_hidden_size=48, head_num_heads=4)  # head_dim 12: a multiple of 4, as RoPE needs
OPTIONS = {
    "plain": {},
    "qk_norm": dict(qk_norm=True),
    "rms": dict(norm_type="rms"),
    "swiglu": dict(mlp_type="swiglu"),
    "rope2d": dict(pos_embed_type="rope2d"),
    "head": HEAD,
    "head_same_width": dict(head_depth=1),
    "all": dict(qk_norm=True, norm_type="rms", mlp_type="swiglu", pos_embed_type="rope2d", **HEAD),
}


def inputs(n=3, channels=3, h=8, w=8, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, channels, h, w, generator=g), torch.tensor([0, 500, 999][:n]), torch.tensor([1, 7, 10][:n])


def silu(x):
    return x * torch.sigmoid(x)


def rms(x, weight, eps=1e-6):
    return x / torch.sqrt(x.square().mean(-1, keepdim=True) + eps) * weight


def rope_angles(head_dim, rows, cols, theta=10000.0):
    """(T, head_dim / 2) angle of each channel pair: pair j < head_dim / 4 turns with the row at frequency
    theta ** (-j / (head_dim / 4)), pair head_dim / 4 + j with the column at the same frequency."""
    quarter = head_dim // 4
    pair = torch.arange(head_dim // 2)
    position = torch.where(pair < quarter, rows[:, None], cols[:, None]).double()
    return position * theta ** (-(pair % quarter).double() / quarter)


def rotate(x, angles):
    """Rotate channel pairs (x[2i], x[2i + 1]) as complex numbers x[2i] + i x[2i + 1] by `angles`."""
    z = torch.complex(x[..., 0::2], x[..., 1::2]) * torch.polar(torch.ones_like(angles), angles)
    return torch.stack([z.real, z.imag], dim=-1).flatten(-2)


def reference_attention(x, qkv_w, qkv_b, proj_w, proj_b, heads, q_scale=None, k_scale=None, angles=None):
    n, t, d = x.shape
    q, k, v = (x @ qkv_w.T + qkv_b).reshape(n, t, 3, heads, d // heads).permute(2, 0, 3, 1, 4)
    if q_scale is not None:
        q, k = rms(q, q_scale), rms(k, k_scale)
    if angles is not None:
        q, k = rotate(q, angles), rotate(k, angles)
    weights = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d // heads), dim=-1)
    return (weights @ v).transpose(1, 2).reshape(n, t, d) @ proj_w.T + proj_b


def reference_forward(model, x, t, y):
    """DiTModel's function in float64 from its state dict: DiT (Peebles & Xie) with LightningDiT's block options and
    RAE's DDT head, written from the formulas rather than from modeling_dit's layers. The fixed sin-cos table and
    the timestep features come from the model (both are checked against formulas in test_modeling.py)."""
    cfg = model.config
    sd = {name: tensor.double() for name, tensor in model.state_dict().items()}
    p = cfg.patch_size
    n, channels, height, width = x.shape
    gh, gw = height // p, width // p
    patches = x.double().reshape(n, channels, gh, p, gw, p).permute(0, 2, 4, 1, 3, 5).reshape(n, gh * gw, -1)
    rows, cols = torch.arange(gh).repeat_interleave(gw), torch.arange(gw).repeat(gh)

    def linear(name, v):
        return v @ sd[f"{name}.weight"].T + sd[f"{name}.bias"]

    def embed(name):  # a stride-p convolution is a linear map of each flattened (C, p, p) patch
        weight = sd[f"{name}.proj.weight"]
        return patches @ weight.reshape(weight.shape[0], -1).T + sd[f"{name}.proj.bias"]

    def norm(name, v):
        if cfg.norm_type == "rms":
            return rms(v, sd[f"{name}.weight"])
        mean = v.mean(-1, keepdim=True)
        return (v - mean) / torch.sqrt((v - mean).square().mean(-1, keepdim=True) + 1e-6)

    def block(name, v, c, heads):
        shift1, scale1, gate1, shift2, scale2, gate2 = linear(f"{name}.adaLN_modulation.1", silu(c)).chunk(6, -1)
        angles = rope_angles(v.shape[-1] // heads, rows, cols) if cfg.pos_embed_type == "rope2d" else None
        scales = [sd[f"{name}.attn.{q_or_k}_norm.weight"] for q_or_k in "qk"] if cfg.qk_norm else [None, None]
        h = norm(f"{name}.norm1", v) * (1 + scale1) + shift1
        attn = [sd[f"{name}.attn.{layer}.{kind}"] for layer in ("qkv", "proj") for kind in ("weight", "bias")]
        v = v + gate1 * reference_attention(h, *attn, heads, *scales, angles)
        h = norm(f"{name}.norm2", v) * (1 + scale2) + shift2
        if cfg.mlp_type == "swiglu":
            a, b = linear(f"{name}.mlp.w12", h).chunk(2, -1)
            mlp = linear(f"{name}.mlp.w3", silu(a) * b)
        else:
            u = linear(f"{name}.mlp.fc1", h)
            mlp = linear(f"{name}.mlp.fc2", 0.5 * u * (1 + torch.tanh(math.sqrt(2 / math.pi) * (u + 0.044715 * u**3))))
        return v + gate2 * mlp

    t_freq = TimestepEmbedder.timestep_embedding(t, 256, cfg.timestep_freq_shift).double()
    t_emb = linear("t_embedder.mlp.2", silu(linear("t_embedder.mlp.0", t_freq)))
    c = t_emb + sd["y_embedder.embedding_table.weight"][y] if y is not None else t_emb
    c = c[:, None]  # (N, 1, D): one condition for every token
    tokens = embed("x_embedder") + model.position_embedding(gh, gw)[0].double()
    for i in range(cfg.depth):
        tokens = block(f"blocks.{i}", tokens, c, cfg.num_heads)
    if cfg.head_depth:
        s = silu(tokens + t_emb[:, None])
        c = linear("head_cond_proj", s) if "head_cond_proj.weight" in sd else s  # (N, T, D_head): one per token
        tokens = embed("head_x_embedder")
        for i in range(cfg.head_depth):
            tokens = block(f"head_blocks.{i}", tokens, c, cfg.head_num_heads or cfg.num_heads)
    shift, scale = linear("final_layer.adaLN_modulation.1", silu(c)).chunk(2, -1)
    out = linear("final_layer.linear", norm("final_layer.norm_final", tokens) * (1 + scale) + shift)
    return out.reshape(n, gh, gw, p, p, -1).permute(0, 5, 1, 3, 2, 4).reshape(n, -1, height, width)


@pytest.mark.parametrize("size", [(8, 8), (8, 12)])
@pytest.mark.parametrize("name", sorted(OPTIONS))
def test_forward_matches_float64_reference(name, size):
    model = tiny_dit(sample_size=size, **OPTIONS[name])
    x, t, y = inputs(h=size[0], w=size[1])
    out = model(x, t, y).sample
    expected = reference_forward(model, x, t, y)
    assert expected.abs().max() > 0.1  # informative weights, not the zero of adaLN-Zero
    torch.testing.assert_close(out.double(), expected, atol=3e-5, rtol=1e-4)


def test_options_off_is_the_plain_dit_bit_for_bit():
    torch.manual_seed(0)
    default = DiTModel(**TINY_DIT)
    torch.manual_seed(0)
    explicit = DiTModel(**TINY_DIT, **PLAIN_DIT_OPTIONS, head_hidden_size=None, head_num_heads=None)
    ours, theirs = default.state_dict(), explicit.state_dict()
    assert list(ours) == list(theirs)
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)  # same layout and the same draws from the RNG
    assert not any(k.startswith("head_") for k in ours) and len(explicit.head_blocks) == 0
    model = tiny_dit()
    explicit.load_state_dict(model.state_dict())
    x, t, y = inputs()
    assert torch.equal(explicit.eval()(x, t, y).sample, model(x, t, y).sample)


def test_rmsnorm_matches_formula_and_keeps_dtype():
    norm = RMSNorm(6)
    with torch.no_grad():
        norm.weight.copy_(torch.linspace(0.5, 2.0, 6))
    x = torch.randn(2, 5, 6, generator=torch.Generator().manual_seed(0)) * 3
    expected = x.double() / torch.sqrt(x.double().square().mean(-1, keepdim=True) + 1e-6) * norm.weight.double()
    torch.testing.assert_close(norm(x).double(), expected, atol=1e-6, rtol=1e-6)
    half = norm(x.bfloat16())
    assert half.dtype == torch.bfloat16  # computed in float32, returned in the input's dtype
    torch.testing.assert_close(half.double(), expected, atol=0.05, rtol=0.02)


@pytest.mark.parametrize("qk_norm", [False, True])
def test_attention_with_qk_norm_matches_float64_reference(qk_norm):
    torch.manual_seed(0)
    attn = Attention(hidden_size=16, num_heads=2, qk_norm=qk_norm)
    with torch.no_grad():
        for param in attn.parameters():
            param.add_(torch.randn_like(param))  # non-trivial q/k scales too
    x = torch.randn(2, 5, 16)
    scales = [attn.q_norm.weight.double(), attn.k_norm.weight.double()] if qk_norm else [None, None]
    weights = [attn.qkv.weight, attn.qkv.bias, attn.proj.weight, attn.proj.bias]
    expected = reference_attention(x.double(), *[w.double() for w in weights], 2, *scales)
    torch.testing.assert_close(attn(x).double(), expected, atol=1e-5, rtol=1e-5)
    if qk_norm:  # the norm changes the function
        plain = reference_attention(x.double(), *[w.double() for w in weights], 2)
        assert (plain - expected).abs().max() > 1e-2


def test_swiglu_width_rule_and_formula():
    # LightningDiT: int(2/3 * int(hidden * mlp_ratio)), truncated, no rounding to a multiple.
    assert swiglu_hidden_size(1152, 4.0) == 3072
    assert swiglu_hidden_size(2048, 4.0) == 5461
    assert swiglu_hidden_size(1024, 4.0) == 2730
    assert swiglu_hidden_size(32, 4.0) == 85
    block = DiTBlock(32, 2, 4.0, mlp_type="swiglu")
    assert block.mlp.w12.weight.shape == (2 * 85, 32) and block.mlp.w3.weight.shape == (32, 85)

    torch.manual_seed(0)
    mlp = SwiGLU(8, 5)
    x = torch.randn(3, 8).double()
    w1, w2 = mlp.w12.weight.double()[:5], mlp.w12.weight.double()[5:]
    b1, b2 = mlp.w12.bias.double()[:5], mlp.w12.bias.double()[5:]
    a = x @ w1.T + b1
    expected = (a * torch.sigmoid(a) * (x @ w2.T + b2)) @ mlp.w3.weight.double().T + mlp.w3.bias.double()
    torch.testing.assert_close(mlp(x.float()).double(), expected, atol=1e-6, rtol=1e-5)


def test_rope_matches_rotation_formula_and_preserves_norms():
    q = torch.randn(1, 2, 15, 16, generator=torch.Generator().manual_seed(0))  # (N, heads, T, head_dim)
    rotated = apply_rope(q, rope_2d(16, 3, 5))
    rows, cols = torch.arange(3).repeat_interleave(5), torch.arange(5).repeat(3)
    torch.testing.assert_close(rotated.double(), rotate(q.double(), rope_angles(16, rows, cols)), atol=1e-5, rtol=0)
    pair_norms = q.unflatten(-1, (-1, 2)).norm(dim=-1)
    torch.testing.assert_close(rotated.unflatten(-1, (-1, 2)).norm(dim=-1), pair_norms, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "grid, pairs",
    [((5, 7), [((0, 0), (2, 3)), ((1, 4), (3, 1))]), ((2, 3), [((0, 0), (1, 2)), ((1, 2), (0, 0)), ((0, 1), (0, 0))])],
)
def test_rope_score_depends_only_on_the_2d_offset(grid, pairs):
    grid_h, grid_w = grid
    q, k = torch.randn(2, 16, generator=torch.Generator().manual_seed(0))
    rope = rope_2d(16, grid_h, grid_w)

    def score(q_pos, k_pos):
        q_rope, k_rope = (rope[:, row * grid_w + col] for row, col in (q_pos, k_pos))  # (2, head_dim) each
        return (apply_rope(q, q_rope) * apply_rope(k, k_rope)).sum()

    def inside(row, col):
        return 0 <= row < grid_h and 0 <= col < grid_w

    checked = 0
    for (qy, qx), (ky, kx) in pairs:
        for dy in range(-grid_h + 1, grid_h):
            for dx in range(-grid_w + 1, grid_w):
                if (dy, dx) != (0, 0) and inside(qy + dy, qx + dx) and inside(ky + dy, kx + dx):
                    shifted = score((qy + dy, qx + dx), (ky + dy, kx + dx))
                    torch.testing.assert_close(shifted, score((qy, qx), (ky, kx)), atol=1e-5, rtol=1e-5)
                    checked += 1
    assert checked >= 3
    # ... and it does depend on the offset, along each axis separately.
    assert (score((0, 0), (1, 0)) - score((0, 0), (0, 0))).abs() > 1e-3
    assert (score((0, 0), (0, 1)) - score((0, 0), (0, 0))).abs() > 1e-3
    assert (score((0, 0), (1, 0)) - score((0, 0), (0, 1))).abs() > 1e-3


def test_rope_rows_and_columns_turn_separate_channels():
    # The same vector at every token of a 2 x 3 grid: only the rotation differs between tokens.
    q = torch.randn(16, generator=torch.Generator().manual_seed(0)).expand(1, 1, 6, 16)
    rope = rope_2d(16, 2, 3)
    assert rope.shape == (2, 6, 16)
    turned = apply_rope(q, rope).reshape(2, 3, 16)  # (rows, cols, head_dim)
    # The first half of the channels turns with the row index only ...
    torch.testing.assert_close(turned[:, :, :8], turned[:, :1, :8].expand(2, 3, 8))
    assert not torch.allclose(turned[0, :, :8], turned[1, :, :8])
    # ... and the second half with the column index only.
    torch.testing.assert_close(turned[:, :, 8:], turned[:1, :, 8:].expand(2, 3, 8))
    assert not torch.allclose(turned[:, 0, 8:], turned[:, 1, 8:])


@pytest.mark.parametrize("size", [(4, 6), (6, 4)])
def test_rope_model_on_non_square_grids(size):
    model = tiny_dit(sample_size=size, pos_embed_type="rope2d")
    x, t, y = inputs(h=size[0], w=size[1])
    out = model(x, t, y).sample
    assert out.shape == (3, 6, *size)
    torch.testing.assert_close(out.double(), reference_forward(model, x, t, y), atol=3e-5, rtol=1e-4)


def test_ddt_head_shapes_and_trunk_tokens_reach_it():
    model = tiny_dit(**HEAD)
    assert len(model.blocks) == 2 and len(model.head_blocks) == 2
    assert model.final_layer.linear.in_features == 48 and model.head_cond_proj.weight.shape == (48, 32)
    trunk_tokens = []
    model.blocks[-1].register_forward_hook(lambda module, args, output: trunk_tokens.append(output))
    x, t, y = inputs()
    out = model(x, t, y).sample
    assert out.shape == (3, 6, 8, 8) and trunk_tokens[0].shape == (3, 16, 32)  # `blocks` stays the trunk

    with torch.no_grad():
        model.blocks[0].mlp.fc2.bias.add_(0.5)
    assert (model(x, t, y).sample - out).abs().max() > 1e-3  # the trunk's tokens condition the head
    # The label enters only through the trunk and still changes the output.
    assert (model(x, t, torch.tensor([2, 3, 4])).sample - model(x, t, y).sample).abs().max() > 1e-3


def test_ddt_head_zero_init_predicts_zero():
    model = DiTModel(**TINY_DIT, pos_embed_type="rope2d", **HEAD)
    x, t, y = inputs()
    assert torch.count_nonzero(model(x, t, y).sample) == 0
    for block in [*model.blocks, *model.head_blocks]:
        assert torch.count_nonzero(block.adaLN_modulation[-1].weight) == 0
    assert torch.count_nonzero(model.final_layer.linear.weight) == 0
    assert torch.count_nonzero(model.head_x_embedder.proj.weight) > 0


def test_head_of_trunk_width_has_no_projection_and_depth_zero_is_plain():
    same = DiTModel(**TINY_DIT, head_depth=1)
    assert isinstance(same.head_cond_proj, torch.nn.Identity)
    assert not any(name.startswith("head_cond_proj") for name in same.state_dict())
    plain = DiTModel(**TINY_DIT, head_depth=0)
    assert plain.head_x_embedder is None and plain.head_cond_proj is None and len(plain.head_blocks) == 0
    assert {k: v.shape for k, v in plain.state_dict().items()} == {
        k: v.shape for k, v in DiTModel(**TINY_DIT).state_dict().items()
    }


def test_guidance_batch_rows_are_independent():
    # Classifier-free guidance runs the conditional and null rows in one batch: per-token head conditions must not mix.
    model = tiny_dit(**OPTIONS["all"])
    x, t, y = inputs()
    null = torch.full_like(y, 10)
    batched = model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, null])).sample
    torch.testing.assert_close(batched[:3], model(x, t, y).sample, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(batched[3:], model(x, t, null).sample, atol=1e-6, rtol=1e-5)


def test_force_drop_ids_learn_sigma_and_unconditional_with_options():
    model = tiny_dit(class_dropout_prob=0.5, **OPTIONS["all"])
    x, t, y = inputs()
    drop = torch.tensor([True, False, True])
    expected = model(x, t, torch.where(drop, 10, y)).sample
    model.train()
    torch.testing.assert_close(model(x, t, y, force_drop_ids=drop).sample, expected)

    flow = tiny_dit(learn_sigma=False, num_classes=0, **OPTIONS["all"])
    out = flow(x, t).sample
    assert out.shape == (3, 3, 8, 8)
    torch.testing.assert_close(out.double(), reference_forward(flow, x, t, None), atol=3e-5, rtol=1e-4)


@pytest.mark.parametrize("name", sorted(OPTIONS))
def test_save_load_round_trip(name, tmp_path):
    model = tiny_dit(sample_size=(8, 12), **OPTIONS[name])
    model.save_pretrained(tmp_path)
    loaded = DiTModel.from_pretrained(tmp_path).eval()
    for key, value in OPTIONS[name].items():
        assert loaded.config[key] == value
    x, t, y = inputs(w=12)
    assert torch.equal(loaded(x, t, y).sample, model(x, t, y).sample)


@pytest.mark.parametrize("option", ["plain", "all"])
def test_gradient_checkpointing_gives_same_gradients(option):
    model = tiny_dit(**OPTIONS[option])
    x, t, y = inputs()

    def grads():
        model.zero_grad()
        model(x, t, y).sample.square().mean().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters()}

    reference = grads()
    model.enable_gradient_checkpointing()
    assert model.gradient_checkpointing
    checkpointed = grads()
    if option == "all":
        assert any(name.startswith("head_blocks.") for name in reference)
    for name in reference:
        torch.testing.assert_close(checkpointed[name], reference[name], atol=1e-6, rtol=1e-5)


def test_bfloat16_forward_keeps_dtype():
    model = tiny_dit(**OPTIONS["all"])
    x, t, y = inputs()
    expected = model(x, t, y).sample
    out = model.to(torch.bfloat16)(x.bfloat16(), t, y).sample
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), expected, atol=0.1, rtol=0.05)


def test_new_layers_are_split_and_compile_units():
    model = tiny_dit(**OPTIONS["all"])
    assert all(type(block).__name__ in DiTModel._repeated_blocks for block in [*model.blocks, *model.head_blocks])
    assert all(type(block).__name__ in DiTModel._no_split_modules for block in model.head_blocks)


TINY_PRESET = dict(sample_size=8, in_channels=3, hidden_size=32, depth=1, num_heads=2, num_classes=10)


@pytest.mark.parametrize("name", sorted(RECIPE_PRESETS))
def test_recipe_presets_build_with_tiny_overrides(name):
    overrides = dict(head_hidden_size=48, head_num_heads=4) if name.startswith("DiTDH") else {}
    model = DiTModel.from_preset(name, **TINY_PRESET, **overrides)
    assert model.config.norm_type == "rms" and model.config.mlp_type == "swiglu"
    assert model.config.pos_embed_type == "rope2d" and not model.config.qk_norm and not model.config.learn_sigma
    assert model.config.patch_size == RECIPE_PRESETS[name]["patch_size"]
    assert model.config.head_depth == (2 if name.startswith("DiTDH") else 0)
    assert model(*inputs()).sample.shape == (3, 3, 8, 8)


# Published sizes: RAE (Zheng et al., 2025) gives 839M for DiT^DH-XL and 676M for its DiT-XL (LightningDiT-XL/1) on
# DINOv2-B latents (768 channels, 16 x 16 tokens); LightningDiT-XL/1 on VA-VAE latents (32 channels) is 675M.
@pytest.mark.parametrize(
    "name, in_channels, expected",
    [("DiTDH-XL", 768, 839e6), ("LightningDiT-XL/1", 768, 676e6), ("LightningDiT-XL/1", 32, 675e6)],
)
def test_recipe_parameter_counts_match_papers(name, in_channels, expected):
    with torch.device("meta"):
        model = DiTModel.from_preset(name, sample_size=16, in_channels=in_channels)
    count = sum(p.numel() for p in model.parameters())
    assert abs(count - expected) < 0.01 * expected, f"{name}: {count / 1e6:.2f}M"
    if name == "DiTDH-XL":
        assert model.head_blocks[0].mlp.w3.in_features == 5461 and model.head_blocks[0].attn.num_heads == 16


@pytest.mark.parametrize("name", [name for name in sorted(OPTIONS) if name != "plain"])
def test_export_to_diffusers_refuses_options(name):
    model = tiny_dit(**OPTIONS[name])
    with pytest.raises(ValueError, match="has only the plain DiT block") as err:
        dit_to_diffusers(model)
    assert next(iter(OPTIONS[name])) in str(err.value)


@pytest.mark.parametrize(
    "overrides, match",
    [
        (dict(qk_norm="yes"), "qk_norm"),
        (dict(norm_type="batch"), "norm_type"),
        (dict(mlp_type="relu"), "mlp_type"),
        (dict(pos_embed_type="rope"), "pos_embed_type"),
        (dict(head_depth=-1), "head_depth"),
        (dict(head_hidden_size=64), "set `head_depth` > 0"),
        (dict(head_depth=1, head_hidden_size=50, head_num_heads=4), "multiple of `head_num_heads`"),
        (dict(pos_embed_type="rope2d", hidden_size=36, num_heads=6), "multiple of 4 channels"),
        (dict(pos_embed_type="rope2d", head_depth=1, head_hidden_size=40, head_num_heads=4), "head_num_heads"),
    ],
)
def test_bad_option_raises(overrides, match):
    with pytest.raises(ValueError, match=match):
        DiTModel(**{**TINY_DIT, **overrides})


def test_block_option_keys_are_config_keys_listed_on_the_model_card():
    import inspect

    from dit_hf.hub import ARCHITECTURE_KEYS
    from dit_hf.modeling_dit import BLOCK_OPTION_KEYS

    assert set(BLOCK_OPTION_KEYS) <= set(inspect.signature(DiTModel.__init__).parameters)
    assert set(BLOCK_OPTION_KEYS) <= set(ARCHITECTURE_KEYS)
    assert {"head_num_heads", "pos_embed_type"} <= set(BLOCK_OPTION_KEYS)
