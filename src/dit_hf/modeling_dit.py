# Copyright the dit-hf authors. Licensed under the Apache License, Version 2.0.
"""DiT (Peebles & Xie, 2023, "Scalable Diffusion Models with Transformers") as a diffusers model.

This file is self-contained on purpose: it imports only torch and diffusers, so it can travel inside a saved
pipeline folder and be loaded with ``trust_remote_code=True`` by a Python that does not have dit_hf installed.
Parameter names follow the original ``models.py`` (``x_embedder``, ``t_embedder``, ``y_embedder``, ``blocks.N``,
``final_layer``) so the released checkpoints map onto this module one to one.

Later block designs are options of the same model, off by default: QK-norm, RMSNorm, SwiGLU and 2-D rotary position
embeddings as in LightningDiT (Yao et al., 2025, "Reconstruction vs. Generation"), and the wide, shallow DDT head of
RAE's DiT^DH (Zheng et al., 2025, "Diffusion Transformers with Representation Autoencoders"). Their parameter names
follow LightningDiT's (``attn.q_norm``, ``attn.k_norm``, ``mlp.w12``, ``mlp.w3``).
"""

import math
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from diffusers.utils import BaseOutput
from torch import nn

# The paper's model sizes (Table 1). Each combines with a patch size of 2, 4 or 8: "DiT-XL/2", "DiT-S/8", ...
DIT_SIZES = {
    "S": dict(depth=12, hidden_size=384, num_heads=6),
    "B": dict(depth=12, hidden_size=768, num_heads=12),
    "L": dict(depth=24, hidden_size=1024, num_heads=16),
    "XL": dict(depth=28, hidden_size=1152, num_heads=16),
}
DIT_PRESETS = {
    f"DiT-{size}/{patch}": dict(patch_size=patch, **dims) for size, dims in DIT_SIZES.items() for patch in (2, 4, 8)
}

# Later recipes built from the same blocks, for `DiTModel.from_preset`. Both are velocity (flow) models without a
# variance output, hence `learn_sigma=False`; `in_channels` and `sample_size` follow the autoencoder, so pass them.
# LightningDiT: the DiT sizes with the released recipe (configs/lightningdit_xl_vavae_f16d32.yaml: use_rmsnorm,
# use_swiglu and use_rope on, use_qknorm off) and the names of its model registry.
LIGHTNING_DIT_OPTIONS = dict(norm_type="rms", mlp_type="swiglu", pos_embed_type="rope2d", learn_sigma=False)
# DiT^DH: a LightningDiT trunk of each DiT size plus "a 2-layer, 2048-dim DDT head for all models" (RAE, Sec. 4);
# the head's 16 attention heads are from RAE's configs/training/ImageNet256/DiTDH-{S,XL}_DINOv2-B.yaml, which also
# set patch_size 1 and use_qknorm false.
DDT_HEAD = dict(head_depth=2, head_hidden_size=2048, head_num_heads=16)
RECIPE_PRESETS = {
    **{
        f"LightningDiT-{size}/{patch}": dict(patch_size=patch, **DIT_SIZES[size], **LIGHTNING_DIT_OPTIONS)
        for size, patch in (("B", 1), ("B", 2), ("L", 2), ("XL", 1), ("XL", 2))
    },
    **{
        f"DiTDH-{size}": dict(patch_size=1, **dims, **LIGHTNING_DIT_OPTIONS, **DDT_HEAD)
        for size, dims in DIT_SIZES.items()
    },
}

# The options of later designs and the values that give the plain DiT of the paper.
PLAIN_DIT_OPTIONS = dict(qk_norm=False, norm_type="layer", mlp_type="gelu", pos_embed_type="sincos", head_depth=0)
# Every config key of those designs, the DDT head's sizes included: the trainer's flags and the model card list these.
BLOCK_OPTION_KEYS = (*PLAIN_DIT_OPTIONS, "head_hidden_size", "head_num_heads")


@dataclass
class DiTModelOutput(BaseOutput):
    """
    Output of [`DiTModel`].

    Args:
        sample (`torch.Tensor` of shape `(batch_size, out_channels, height, width)`):
            The prediction: ε (first `in_channels` channels) followed, when `learn_sigma`, by the variance
            interpolation values.
    """

    sample: torch.Tensor


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale) + shift


def adaln_chunks(modulation: torch.Tensor, n: int) -> tuple[torch.Tensor, ...]:
    """Split adaLN parameters into `n` parts that broadcast over (N, T, D) tokens.

    The condition is one vector per sample, (N, n * D), in the trunk, or one per token, (N, T, n * D), in the DDT head.
    """
    if modulation.dim() == 2:
        modulation = modulation.unsqueeze(1)  # (N, 1, n * D)
    return modulation.chunk(n, dim=-1)


def to_2tuple(size: int | tuple[int, int] | list[int]) -> tuple[int, int]:
    if isinstance(size, int):
        return (size, size)
    if len(size) != 2:
        raise ValueError(f"`sample_size` must be an int or a (height, width) pair, got {size!r}.")
    return (int(size[0]), int(size[1]))


def sincos_1d(embed_dim: int, pos: torch.Tensor) -> torch.Tensor:
    """Transformer sin-cos embedding of positions `pos` (M,) -> (M, embed_dim), float64 for exactness."""
    omega = torch.arange(embed_dim // 2, dtype=torch.float64) / (embed_dim / 2.0)
    omega = 1.0 / 10000**omega  # (D/2,)
    out = pos.reshape(-1).to(torch.float64)[:, None] * omega[None]  # (M, D/2)
    return torch.cat([torch.sin(out), torch.cos(out)], dim=1)  # (M, D)


def sincos_2d(embed_dim: int, grid_h: int, grid_w: int) -> torch.Tensor:
    """Fixed 2-D position embedding for a row-major (grid_h, grid_w) token grid -> (grid_h * grid_w, embed_dim).

    As in MAE and DiT, the first half of the channels encodes the column and the second half the row.
    """
    if embed_dim % 4 != 0:
        raise ValueError(f"`hidden_size` must be divisible by 4 for the 2-D sin-cos embedding, got {embed_dim}.")
    rows, cols = torch.meshgrid(
        torch.arange(grid_h, dtype=torch.float64), torch.arange(grid_w, dtype=torch.float64), indexing="ij"
    )
    return torch.cat([sincos_1d(embed_dim // 2, cols), sincos_1d(embed_dim // 2, rows)], dim=1)


def rope_2d(
    head_dim: int, grid_h: int, grid_w: int, theta: float = 10000.0, device: torch.device | None = None
) -> torch.Tensor:
    """(2, T, head_dim) cosines and sines of the axial 2-D rotary angles for a row-major (grid_h, grid_w) token grid.

    Channels rotate in adjacent pairs (2i, 2i + 1). The first half of the pairs turns with the token's row index and
    the second half with its column index, each axis with the frequencies theta ** (-j / (head_dim / 4)), j < head_dim
    / 4 (RoFormer's 1-D rotation applied per axis, as in EVA-02 and LightningDiT). Positions are integer indices on
    any grid, so a new resolution extends the grid rather than interpolating it.
    """
    quarter = head_dim // 4
    freqs = theta ** (-torch.arange(quarter, dtype=torch.float32, device=device) / quarter)  # (head_dim / 4,)
    rows = torch.arange(grid_h, dtype=torch.float32, device=device).repeat_interleave(grid_w)  # (T,)
    cols = torch.arange(grid_w, dtype=torch.float32, device=device).repeat(grid_h)  # (T,)
    angles = torch.cat([rows[:, None] * freqs, cols[:, None] * freqs], dim=1)  # (T, head_dim / 2)
    angles = angles.repeat_interleave(2, dim=1)  # (T, head_dim): both channels of a pair share one angle
    return torch.stack([angles.cos(), angles.sin()])


def apply_rope(x: torch.Tensor, rope: torch.Tensor) -> torch.Tensor:
    """Rotate each channel pair (x[2i], x[2i + 1]) of x (N, heads, T, head_dim) by its angle from `rope_2d`."""
    cos, sin = rope.unbind(0)  # each (T, head_dim)
    pairs = x.unflatten(-1, (-1, 2))
    rotated = torch.stack([-pairs[..., 1], pairs[..., 0]], dim=-1).flatten(-2)  # (-x[2i + 1], x[2i])
    return (x * cos + rotated * sin).to(x.dtype)


def swiglu_hidden_size(hidden_size: int, mlp_ratio: float) -> int:
    """SwiGLU width: 2/3 of the GELU MLP's, truncated to an int as in LightningDiT, so the three matrices hold about
    as many parameters as the two of the GELU MLP (e.g. 3072 for hidden_size 1152, 5461 for 2048 at ratio 4)."""
    return int(2 / 3 * int(hidden_size * mlp_ratio))


class PatchEmbed(nn.Module):
    """(N, C, H, W) image -> (N, T, D) tokens with a strided convolution, T = H * W / patch_size ** 2."""

    def __init__(self, patch_size: int, in_channels: int, hidden_size: int):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, hidden_size, kernel_size=patch_size, stride=patch_size, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Contiguous tokens: the residual stream inherits the layout of the embedding (an elementwise result takes its
        # first operand's strides), and a transposed stream made every LayerNorm and linear layer copy its input,
        # forward and backward, in every block.
        return self.proj(x).flatten(2).transpose(1, 2).contiguous()


class TimestepEmbedder(nn.Module):
    """Sinusoidal features of a (possibly fractional) timestep followed by a two-layer MLP."""

    def __init__(self, hidden_size: int, frequency_embedding_size: int = 256, freq_shift: int = 0):
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(frequency_embedding_size, hidden_size, bias=True),
            nn.SiLU(),
            nn.Linear(hidden_size, hidden_size, bias=True),
        )
        self.frequency_embedding_size = frequency_embedding_size
        self.freq_shift = freq_shift

    @staticmethod
    def timestep_embedding(t: torch.Tensor, dim: int, freq_shift: int = 0, max_period: float = 10000.0):
        """Cosines then sines of t * f_i with f_i = max_period ** (-i / (dim / 2 - freq_shift)).

        freq_shift=0 is the original DiT; diffusers' DiT uses freq_shift=1 (its `downscale_freq_shift`).
        """
        half = dim // 2
        exponent = -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device)
        exponent = exponent / (half - freq_shift)
        args = t[:, None].float() * torch.exp(exponent)[None]
        embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        if dim % 2:
            embedding = torch.cat([embedding, torch.zeros_like(embedding[:, :1])], dim=-1)
        return embedding

    def forward(self, t: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        """`dtype` is the dtype the model computes in (its input's); the weights' own dtype when not given. They
        differ under diffusers' layerwise casting, which stores the weights in e.g. float16 or float8 and upcasts them
        only inside each layer's forward."""
        t_freq = self.timestep_embedding(t, self.frequency_embedding_size, self.freq_shift)
        return self.mlp(t_freq.to(dtype or self.mlp[0].weight.dtype))


class LabelEmbedder(nn.Module):
    """Class-label table with one extra "null" row at index `num_classes` for classifier-free guidance."""

    def __init__(self, num_classes: int, hidden_size: int, dropout_prob: float):
        super().__init__()
        use_cfg_embedding = int(dropout_prob > 0)
        self.embedding_table = nn.Embedding(num_classes + use_cfg_embedding, hidden_size)
        self.num_classes = num_classes
        self.dropout_prob = dropout_prob

    def forward(self, labels: torch.Tensor, train: bool, force_drop_ids: torch.Tensor | None = None) -> torch.Tensor:
        if force_drop_ids is not None or (train and self.dropout_prob > 0):
            if self.dropout_prob == 0:
                raise ValueError("`force_drop_ids` needs a null class: build the model with `class_dropout_prob` > 0.")
            # Label dropout teaches the unconditional model used by classifier-free guidance.
            drop = force_drop_ids
            if drop is None:
                drop = torch.rand(labels.shape[0], device=labels.device) < self.dropout_prob
            labels = torch.where(drop.to(labels.device, torch.bool), self.num_classes, labels)
        return self.embedding_table(labels)


class RMSNorm(nn.Module):
    """x / sqrt(mean(x²) + eps) times a learned per-channel scale (Zhang & Sennrich, 2019), computed in float32."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(dim=-1, keepdim=True) + self.eps)
        return (normed * self.weight.float()).to(x.dtype)


def make_norm(norm_type: str, dim: int) -> nn.Module:
    """The norm before each adaLN modulation: DiT's LayerNorm has no affine part, since adaLN supplies the scale."""
    if norm_type == "rms":
        return RMSNorm(dim, eps=1e-6)
    return nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)


class Attention(nn.Module):
    def __init__(self, hidden_size: int, num_heads: int, qk_norm: bool = False):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(hidden_size, 3 * hidden_size, bias=True)
        # QK-norm bounds the attention logits, which keeps low-precision training stable.
        self.q_norm = RMSNorm(hidden_size // num_heads) if qk_norm else None
        self.k_norm = RMSNorm(hidden_size // num_heads) if qk_norm else None
        self.proj = nn.Linear(hidden_size, hidden_size, bias=True)

    def forward(self, x: torch.Tensor, rope: torch.Tensor | None = None) -> torch.Tensor:
        n, t, d = x.shape
        qkv = self.qkv(x).reshape(n, t, 3, self.num_heads, d // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # each (N, heads, T, head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            q, k = apply_rope(q, rope), apply_rope(k, rope)
        x = F.scaled_dot_product_attention(q, k, v)  # (N, heads, T, head_dim)
        return self.proj(x.transpose(1, 2).reshape(n, t, d))


class Mlp(nn.Module):
    def __init__(self, hidden_size: int, mlp_hidden_size: int):
        super().__init__()
        self.fc1 = nn.Linear(hidden_size, mlp_hidden_size, bias=True)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(mlp_hidden_size, hidden_size, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class SwiGLU(nn.Module):
    """w3(SiLU(x W1) * x W2) (Shazeer, 2020), with W1 and W2 fused into one projection `w12`."""

    def __init__(self, hidden_size: int, mlp_hidden_size: int):
        super().__init__()
        self.w12 = nn.Linear(hidden_size, 2 * mlp_hidden_size, bias=True)
        self.w3 = nn.Linear(mlp_hidden_size, hidden_size, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, value = self.w12(x).chunk(2, dim=-1)
        return self.w3(F.silu(gate) * value)


class DiTBlock(nn.Module):
    """Transformer block with adaLN-Zero conditioning: every residual branch is scaled by a gate that starts at 0."""

    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        mlp_ratio: float,
        qk_norm: bool = False,
        norm_type: str = "layer",
        mlp_type: str = "gelu",
    ):
        super().__init__()
        self.norm1 = make_norm(norm_type, hidden_size)
        self.attn = Attention(hidden_size, num_heads, qk_norm)
        self.norm2 = make_norm(norm_type, hidden_size)
        if mlp_type == "swiglu":
            self.mlp = SwiGLU(hidden_size, swiglu_hidden_size(hidden_size, mlp_ratio))
        else:
            self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size, bias=True))

    def forward(self, x: torch.Tensor, c: torch.Tensor, rope: torch.Tensor | None = None) -> torch.Tensor:
        """x (N, T, D); c (N, D) for the whole sample or (N, T, D) per token; rope (2, T, head_dim) or None."""
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = adaln_chunks(self.adaLN_modulation(c), 6)
        x = x + gate_msa * self.attn(modulate(self.norm1(x), shift_msa, scale_msa), rope)
        x = x + gate_mlp * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))
        return x


class FinalLayer(nn.Module):
    def __init__(self, hidden_size: int, patch_size: int, out_channels: int, norm_type: str = "layer"):
        super().__init__()
        self.norm_final = make_norm(norm_type, hidden_size)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels, bias=True)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size, bias=True))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = adaln_chunks(self.adaLN_modulation(c), 2)
        return self.linear(modulate(self.norm_final(x), shift, scale))


class DiTModel(ModelMixin, ConfigMixin):
    r"""
    Class-conditional Diffusion Transformer with adaLN-Zero blocks.

    With the default options this is the DiT of the paper. The options add the block designs of LightningDiT and
    RAE's DiT^DH (presets: [`RECIPE_PRESETS`]):

    - `qk_norm`: RMSNorm with a learned scale on each head's queries and keys, before attention (and before RoPE).
    - `norm_type="rms"`: RMSNorm with a learned scale instead of the non-affine LayerNorm, in every block and the
      final layer.
    - `mlp_type="swiglu"`: SwiGLU MLP of hidden width `int(2 / 3 * int(hidden_size * mlp_ratio))`, LightningDiT's
      rule, which keeps the parameter count of the GELU MLP (3072 for hidden_size 1152).
    - `pos_embed_type="rope2d"`: axial 2-D rotary embedding of the queries and keys in every attention layer (half of
      each head's channels turn with the token's row, half with its column; see `rope_2d`). As in LightningDiT and
      RAE, the fixed sin-cos table is still added to the trunk's input tokens.
    - DDT head (`head_depth > 0`), after RAE's DiT^DH: the trunk above computes tokens s (N, T, D) from the noisy
      input, t and y as usual, without a final layer. The head re-embeds the noisy input with its own patch
      embedding at width `head_hidden_size` (no absolute position table; RoPE when `pos_embed_type="rope2d"`) and
      runs `head_depth` blocks whose adaLN condition is per token: c_head = Linear(SiLU(s + t_emb)), the trunk's
      tokens plus the timestep embedding (the label enters through the trunk), projected to the head width (no
      projection when the widths are equal). The final layer works at the head width, conditioned on c_head too.
      Differences from RAE's code: its trunk feeds SiLU(t_emb + y_emb) to blocks that apply SiLU again, and its
      timestep features are Gaussian Fourier features; here the trunk is the plain DiT trunk. All linear layers
      start Xavier-uniform as in DiT, and adaLN-Zero zeroes every block's modulation and the final layer, so a new
      model predicts exactly zero, with or without a head.

    `blocks` is always the trunk (hooks on `blocks[k]` read its tokens); the head's blocks are `head_blocks`.

    Parameters:
        sample_size (`int` or `(int, int)`, defaults to 32): Height and width of the input (latent) image; an int
            means a square input. Non-square inputs get a position embedding for their own token grid.
        patch_size (`int`, defaults to 2): Side of the square patches that become tokens.
        in_channels (`int`, defaults to 4): Channels of the input image.
        hidden_size (`int`, defaults to 1152): Token width.
        depth (`int`, defaults to 28): Number of DiT blocks.
        num_heads (`int`, defaults to 16): Attention heads; must divide `hidden_size`.
        mlp_ratio (`float`, defaults to 4.0): MLP hidden width as a multiple of `hidden_size`.
        num_classes (`int`, defaults to 1000): Number of classes; 0 builds an unconditional model.
        class_dropout_prob (`float`, defaults to 0.1): Probability of replacing a label by the null class
            (index `num_classes`) in training. Must be > 0 for classifier-free guidance.
        learn_sigma (`bool`, defaults to `True`): Also predict the variance interpolation (improved DDPM), which
            doubles the output channels.
        timestep_freq_shift (`int`, defaults to 0): Frequency convention of the timestep features: 0 as in the
            original DiT, 1 as in diffusers' `DiTTransformer2DModel` (needed for an exact export to it).
        qk_norm (`bool`, defaults to `False`): RMSNorm on the per-head queries and keys.
        norm_type (`str`, defaults to `"layer"`): `"layer"` (DiT's non-affine LayerNorm) or `"rms"` (RMSNorm).
        mlp_type (`str`, defaults to `"gelu"`): `"gelu"` (DiT's tanh-GELU MLP) or `"swiglu"`.
        pos_embed_type (`str`, defaults to `"sincos"`): `"sincos"` (the fixed table only) or `"rope2d"` (the table
            plus 2-D rotary embeddings in attention); `"rope2d"` needs a head width divisible by 4.
        head_depth (`int`, defaults to 0): Blocks of the DDT head; 0 builds no head.
        head_hidden_size (`int`, *optional*): Width of the DDT head; defaults to `hidden_size`.
        head_num_heads (`int`, *optional*): Attention heads of the DDT head; defaults to `num_heads`.
    """

    _supports_gradient_checkpointing = True
    _no_split_modules = ["DiTBlock"]
    _repeated_blocks = ["DiTBlock"]  # `compile_repeated_blocks()` compiles one block graph and reuses it
    _skip_layerwise_casting_patterns = ["x_embedder", "norm"]

    @register_to_config
    def __init__(
        self,
        sample_size: int | tuple[int, int] = 32,
        patch_size: int = 2,
        in_channels: int = 4,
        hidden_size: int = 1152,
        depth: int = 28,
        num_heads: int = 16,
        mlp_ratio: float = 4.0,
        num_classes: int = 1000,
        class_dropout_prob: float = 0.1,
        learn_sigma: bool = True,
        timestep_freq_shift: int = 0,
        qk_norm: bool = False,
        norm_type: str = "layer",
        mlp_type: str = "gelu",
        pos_embed_type: str = "sincos",
        head_depth: int = 0,
        head_hidden_size: int | None = None,
        head_num_heads: int | None = None,
    ):
        super().__init__()
        height, width = to_2tuple(sample_size)
        if height % patch_size or width % patch_size:
            raise ValueError(
                f"`sample_size` {(height, width)} must be divisible by `patch_size` {patch_size}; "
                "pick a patch size that divides both sides."
            )
        if hidden_size % num_heads:
            raise ValueError(f"`hidden_size` ({hidden_size}) must be divisible by `num_heads` ({num_heads}).")
        if num_classes < 0:
            raise ValueError(f"`num_classes` must be >= 0 (0 = unconditional), got {num_classes}.")
        if not 0 <= class_dropout_prob < 1:
            raise ValueError(f"`class_dropout_prob` must be in [0, 1), got {class_dropout_prob}.")
        if timestep_freq_shift not in (0, 1):
            raise ValueError(
                f"`timestep_freq_shift` must be 0 (original DiT) or 1 (diffusers), got {timestep_freq_shift}."
            )
        if not isinstance(qk_norm, bool):
            raise ValueError(f"`qk_norm` must be True or False, got {qk_norm!r}.")
        for name, value, choices in (
            ("norm_type", norm_type, ("layer", "rms")),
            ("mlp_type", mlp_type, ("gelu", "swiglu")),
            ("pos_embed_type", pos_embed_type, ("sincos", "rope2d")),
        ):
            if value not in choices:
                raise ValueError(f"`{name}` must be one of {choices}, got {value!r}.")
        if not isinstance(head_depth, int) or head_depth < 0:
            raise ValueError(f"`head_depth` must be an int >= 0 (0 = no DDT head), got {head_depth!r}.")
        if head_depth == 0 and (head_hidden_size is not None or head_num_heads is not None):
            raise ValueError(
                "`head_hidden_size` and `head_num_heads` configure the DDT head: set `head_depth` > 0 to build one, "
                "or leave them None."
            )
        head_hidden_size = hidden_size if head_hidden_size is None else head_hidden_size
        head_num_heads = num_heads if head_num_heads is None else head_num_heads
        if head_hidden_size <= 0 or head_num_heads <= 0 or head_hidden_size % head_num_heads:
            raise ValueError(
                f"`head_hidden_size` ({head_hidden_size}) must be a positive multiple of `head_num_heads` "
                f"({head_num_heads})."
            )
        if pos_embed_type == "rope2d":
            for name, head_dim in (("", hidden_size // num_heads), ("head_", head_hidden_size // head_num_heads)):
                if head_dim % 4:
                    raise ValueError(
                        f"`pos_embed_type='rope2d'` rotates channel pairs along rows and columns, so each attention "
                        f"head needs a multiple of 4 channels, but `{name}hidden_size / {name}num_heads` is "
                        f"{head_dim}; change `{name}num_heads`."
                    )

        self.out_channels = in_channels * 2 if learn_sigma else in_channels
        self.gradient_checkpointing = False
        block_options = dict(qk_norm=qk_norm, norm_type=norm_type, mlp_type=mlp_type)

        self.x_embedder = PatchEmbed(patch_size, in_channels, hidden_size)
        self.t_embedder = TimestepEmbedder(hidden_size, freq_shift=timestep_freq_shift)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size, class_dropout_prob) if num_classes > 0 else None
        # Fixed, not learned, and recomputed from the config: kept out of the state dict.
        pos_embed = sincos_2d(hidden_size, height // patch_size, width // patch_size).float()
        self.register_buffer("pos_embed", pos_embed.unsqueeze(0), persistent=False)  # (1, T, D)
        self.blocks = nn.ModuleList(
            [DiTBlock(hidden_size, num_heads, mlp_ratio, **block_options) for _ in range(depth)]
        )
        self.head_x_embedder, self.head_cond_proj = None, None
        if head_depth:
            self.head_x_embedder = PatchEmbed(patch_size, in_channels, head_hidden_size)
            # RAE projects the trunk's tokens only when the widths differ.
            self.head_cond_proj = nn.Identity()
            if head_hidden_size != hidden_size:
                self.head_cond_proj = nn.Linear(hidden_size, head_hidden_size, bias=True)
        self.head_blocks = nn.ModuleList(
            [DiTBlock(head_hidden_size, head_num_heads, mlp_ratio, **block_options) for _ in range(head_depth)]
        )
        final_size = head_hidden_size if head_depth else hidden_size
        self.final_layer = FinalLayer(final_size, patch_size, self.out_channels, norm_type)
        self.initialize_weights()

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "DiTModel":
        """Build a named model, e.g. `DiTModel.from_preset("DiT-XL/2", sample_size=32, num_classes=1000)` (the paper's
        sizes, `DIT_PRESETS`) or `DiTModel.from_preset("DiTDH-XL", sample_size=16, in_channels=768)` (later recipes,
        `RECIPE_PRESETS`)."""
        presets = {**DIT_PRESETS, **RECIPE_PRESETS}
        if name not in presets:
            raise ValueError(f"Unknown DiT preset {name!r}; choose one of {sorted(presets)}.")
        return cls(**{**presets[name], **overrides})

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        """[`ModelMixin.from_pretrained`] that refuses weights files lacking some of the model's parameters.

        diffusers only warns about missing weights and leaves them uninitialised (on the meta device with the
        default low-memory loading), so the model fails later with an error that names neither cause nor file.
        """
        output_loading_info = kwargs.pop("output_loading_info", False)
        model, info = super().from_pretrained(pretrained_model_name_or_path, *args, output_loading_info=True, **kwargs)
        missing = sorted(info["missing_keys"])
        if missing:
            where = str(pretrained_model_name_or_path)
            if kwargs.get("subfolder"):
                where = os.path.join(where, kwargs["subfolder"])
            raise ValueError(
                f"The weights in {where!r} lack {len(missing)} of {cls.__name__}'s parameters ({missing[:5]}"
                f"{' ...' if len(missing) > 5 else ''}): the weights file is incomplete, or belongs to another "
                "configuration than its config.json. Save the model again, or load a complete folder."
            )
        return (model, info) if output_loading_info else model

    def initialize_weights(self):
        # Transformer layers: Xavier-uniform weights, zero biases (as in ViT).
        def _basic_init(module):
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

        self.apply(_basic_init)

        # Patch embeddings initialised like a linear layer over the flattened patch.
        for embedder in (self.x_embedder, self.head_x_embedder):
            if embedder is not None:
                w = embedder.proj.weight
                nn.init.xavier_uniform_(w.view(w.shape[0], -1))
                nn.init.zeros_(embedder.proj.bias)

        if self.y_embedder is not None:
            nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)

        # adaLN-Zero: every block starts as the identity and the model predicts zero.
        for block in [*self.blocks, *self.head_blocks]:
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].weight)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.linear.weight)
        nn.init.zeros_(self.final_layer.linear.bias)

    def position_embedding(self, grid_h: int, grid_w: int) -> torch.Tensor:
        """(1, T, D) embedding for a token grid; the stored one when it fits, else computed for the new grid."""
        height, width = to_2tuple(self.config.sample_size)
        p = self.config.patch_size
        if (grid_h, grid_w) == (height // p, width // p):
            return self.pos_embed
        pos = sincos_2d(self.config.hidden_size, grid_h, grid_w)
        return pos.to(device=self.pos_embed.device, dtype=self.pos_embed.dtype).unsqueeze(0)

    def rotary_embedding(
        self, grid_h: int, grid_w: int, device: torch.device, head: bool = False
    ) -> torch.Tensor | None:
        """(2, T, head_dim) rotary angles of the trunk's (or the DDT head's) attention, None without RoPE."""
        if self.config.pos_embed_type != "rope2d":
            return None
        config = self.config
        if head:
            width, heads = config.head_hidden_size or config.hidden_size, config.head_num_heads or config.num_heads
        else:
            width, heads = config.hidden_size, config.num_heads
        return rope_2d(width // heads, grid_h, grid_w, device=device)

    def run_blocks(
        self, blocks: nn.ModuleList, x: torch.Tensor, c: torch.Tensor, rope: torch.Tensor | None
    ) -> torch.Tensor:
        for block in blocks:
            if torch.is_grad_enabled() and self.gradient_checkpointing:
                x = self._gradient_checkpointing_func(block, x, c, rope)
            else:
                x = block(x, c, rope)  # (N, T, D)
        return x

    def unpatchify(self, x: torch.Tensor, grid_h: int, grid_w: int) -> torch.Tensor:
        """(N, T, p * p * C) -> (N, C, H, W)."""
        p, c = self.config.patch_size, self.out_channels
        x = x.reshape(x.shape[0], grid_h, grid_w, p, p, c)
        x = torch.einsum("nhwpqc->nchpwq", x)
        return x.reshape(x.shape[0], c, grid_h * p, grid_w * p)

    def embed_condition(
        self,
        timestep: torch.Tensor,
        class_labels: torch.Tensor | None,
        force_drop_ids: torch.Tensor | None = None,
        dtype: torch.dtype | None = None,
    ) -> torch.Tensor:
        """Conditioning vector c = t_emb + y_emb, computed once per forward and shared by every trunk block; `dtype`
        is the computation dtype (see `TimestepEmbedder.forward`)."""
        c = self.t_embedder(timestep, dtype)  # (N, D)
        if self.y_embedder is not None:
            if class_labels is None:
                raise ValueError(
                    f"This model is class-conditional (num_classes={self.config.num_classes}): pass `class_labels`, "
                    f"using {self.config.num_classes} for the null (unconditional) class."
                )
            c = c + self.y_embedder(class_labels, train=self.training, force_drop_ids=force_drop_ids)
        elif class_labels is not None:
            raise ValueError("This model is unconditional (num_classes=0): pass `class_labels=None`.")
        return c

    def forward(
        self,
        hidden_states: torch.Tensor,
        timestep: torch.Tensor | float | int,
        class_labels: torch.Tensor | None = None,
        return_dict: bool = True,
        force_drop_ids: torch.Tensor | None = None,
    ) -> DiTModelOutput | tuple[torch.Tensor]:
        """
        Args:
            hidden_states (`torch.Tensor` of shape `(N, in_channels, H, W)`): Noisy input.
            timestep (`torch.Tensor` of shape `(N,)`, a scalar tensor or a number): Diffusion timesteps.
            class_labels (`torch.LongTensor` of shape `(N,)`, *optional*): Class ids; `num_classes` is the null class.
            return_dict (`bool`, defaults to `True`): Return a [`DiTModelOutput`] instead of a tuple.
            force_drop_ids (`torch.BoolTensor` of shape `(N,)`, *optional*): Replace exactly these labels by the null
                class, instead of the random label dropout of training mode (lets a trainer draw the dropout from
                its own generator).
        """
        n, _, height, width = hidden_states.shape
        p = self.config.patch_size
        if hidden_states.shape[1] != self.config.in_channels:
            raise ValueError(
                f"`hidden_states` has {hidden_states.shape[1]} channels but the model expects "
                f"{self.config.in_channels}."
            )
        if height % p or width % p:
            raise ValueError(f"Input size {(height, width)} must be divisible by the patch size {p}.")
        grid_h, grid_w = height // p, width // p

        if not torch.is_tensor(timestep):
            timestep = torch.tensor([timestep], device=hidden_states.device)
        timestep = timestep.to(hidden_states.device).reshape(-1).expand(n)
        if class_labels is not None:
            class_labels = torch.as_tensor(class_labels, device=hidden_states.device).reshape(-1).expand(n)

        pos = self.position_embedding(grid_h, grid_w).to(hidden_states.dtype)
        x = self.x_embedder(hidden_states) + pos  # (N, T, D), where T = H * W / patch_size ** 2
        c = self.embed_condition(timestep, class_labels, force_drop_ids, x.dtype).to(x.dtype)  # (N, D)
        x = self.run_blocks(self.blocks, x, c, self.rotary_embedding(grid_h, grid_w, x.device))
        if self.head_blocks:
            # DDT head: per-token condition from the trunk's tokens and t, applied to a fresh embedding of the input.
            t_emb = self.t_embedder(timestep, x.dtype).to(x.dtype)  # (N, D)
            c = self.head_cond_proj(F.silu(x + t_emb.unsqueeze(1)))  # (N, T, D_head)
            x = self.head_x_embedder(hidden_states)  # (N, T, D_head)
            x = self.run_blocks(self.head_blocks, x, c, self.rotary_embedding(grid_h, grid_w, x.device, head=True))
        x = self.final_layer(x, c)  # (N, T, p * p * out_channels)
        output = self.unpatchify(x, grid_h, grid_w)  # (N, out_channels, H, W)

        if not return_dict:
            return (output,)
        return DiTModelOutput(sample=output)
