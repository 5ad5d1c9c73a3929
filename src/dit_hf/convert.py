# Copyright the dit-hf authors. Licensed under the Apache License, Version 2.0.
"""Convert DiT weights between the original release, [`DiTModel`] and diffusers' `DiTTransformer2DModel`.

    # facebookresearch/DiT release or train.py checkpoint -> DiTModel folder (the config is read off the shapes;
    # --num_heads is needed only for widths that are not in the paper)
    python -m dit_hf.convert from-original DiT-XL-2-256x256.pt dit-xl-2-256
    python -m dit_hf.convert from-original results/000-DiT-S-2/checkpoints/0400000.pt dit-s-2

    # DiTModel folder -> DiTTransformer2DModel folder, usable as `DiTPipeline(transformer=...)`
    python -m dit_hf.convert to-diffusers dit-xl-2-256 dit-xl-2-256-diffusers

    # DiTTransformer2DModel (folder or a pipeline's `transformer` subfolder) -> DiTModel folder
    python -m dit_hf.convert from-diffusers path/to/DiT-XL-2-256 dit-xl-2-256 --subfolder transformer --no-strict

The two layouts compute the same function except where noted. `strict=True` (the default) refuses any conversion
whose outputs would differ; `strict=False` (`--no-strict`) converts anyway and logs the measured difference:

- timestep features: diffusers fixes `downscale_freq_shift=1`, the original DiT uses 0 (`timestep_freq_shift`);
- the LayerNorm before each MLP: DiT uses eps 1e-6; diffusers' default `norm_eps` is 1e-5;
- conditioning: diffusers gives every block its own timestep + label embedder, DiT shares one.
"""

import argparse
import inspect
import math
import os
from typing import Any

import torch
from diffusers import DiTTransformer2DModel
from diffusers.utils import logging

from .modeling_dit import PLAIN_DIT_OPTIONS, DiTModel, to_2tuple

logger = logging.get_logger(__name__)

# `num_heads` is not stored in a checkpoint; the paper's sizes (Table 1) give it from the width.
NUM_HEADS_BY_HIDDEN_SIZE = {384: 6, 768: 12, 1024: 16, 1152: 16}

# LayerNorm eps of DiT (all norms) and the default `norm_eps` of diffusers' DiT (the norm before each MLP only).
DIT_NORM_EPS = 1e-6
DIFFUSERS_DEFAULT_NORM_EPS = 1e-5

# diffusers' `LabelEmbedding` in `CombinedTimestepLabelEmbeddings` always has this dropout, hence a null row.
DIFFUSERS_CLASS_DROPOUT_PROB = 0.1

QKV_NAMES = ("to_q", "to_k", "to_v")


def _linear(dit_name: str, diffusers_name: str) -> list[tuple[str, str]]:
    return [(f"{dit_name}.weight", f"{diffusers_name}.weight"), (f"{dit_name}.bias", f"{diffusers_name}.bias")]


def _renamed_parameters(depth: int) -> list[tuple[str, str]]:
    """(DiTModel name, DiTTransformer2DModel name) of every parameter that maps one to one."""
    names = (
        _linear("x_embedder.proj", "pos_embed.proj")
        + _linear("final_layer.adaLN_modulation.1", "proj_out_1")
        + _linear("final_layer.linear", "proj_out_2")
    )
    for i in range(depth):
        ours, theirs = f"blocks.{i}", f"transformer_blocks.{i}"
        # Both chunk the modulation as (shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp).
        names += _linear(f"{ours}.adaLN_modulation.1", f"{theirs}.norm1.linear")
        names += _linear(f"{ours}.attn.proj", f"{theirs}.attn1.to_out.0")
        names += _linear(f"{ours}.mlp.fc1", f"{theirs}.ff.net.0.proj")
        names += _linear(f"{ours}.mlp.fc2", f"{theirs}.ff.net.2")
    return names


def _embedder_parameters() -> list[tuple[str, str]]:
    """DiTModel's shared conditioning embedder -> names inside each diffusers block's `norm1.emb`."""
    return (
        _linear("t_embedder.mlp.0", "timestep_embedder.linear_1")
        + _linear("t_embedder.mlp.2", "timestep_embedder.linear_2")
        + [("y_embedder.embedding_table.weight", "class_embedder.embedding_table.weight")]
    )


def _match_placement(converted: torch.nn.Module, source: torch.nn.Module):
    """Give the freshly built `converted` the device, dtype and train/eval mode of `source`."""
    converted.to(device=source.device)
    if source.dtype != converted.dtype:  # diffusers warns about any `dtype` cast, so cast only when needed
        converted.to(dtype=source.dtype)
    converted.train(source.training)


@torch.no_grad()
def _max_output_difference(dit: DiTModel, transformer: DiTTransformer2DModel) -> float:
    """Max abs difference of the two models' outputs on a fixed probe batch (in eval mode, on `dit`'s device)."""
    config = dit.config
    height, width = to_2tuple(config.sample_size)
    generator = torch.Generator().manual_seed(0)
    sample = torch.randn(3, config.in_channels, height, width, generator=generator)
    sample = sample.to(device=dit.device, dtype=dit.dtype)
    timestep = torch.tensor([0, 500, 999], device=dit.device)
    class_labels = torch.tensor([0, config.num_classes - 1, config.num_classes], device=dit.device)  # last: null
    was_training = dit.training, transformer.training
    dit.eval()
    transformer.eval()
    try:
        ours = dit(sample, timestep, class_labels).sample
        theirs = transformer(sample, timestep=timestep, class_labels=class_labels).sample
    finally:
        dit.train(was_training[0])
        transformer.train(was_training[1])
    return (ours.float() - theirs.float()).abs().max().item()


def _check_equivalence(reasons: list[str], strict: bool, dit: DiTModel, transformer: DiTTransformer2DModel):
    """Raise (strict) or warn about conversions that change the outputs, with the difference measured on a probe."""
    if not reasons:
        return
    difference = _max_output_difference(dit, transformer)
    message = (
        f"{' '.join(reasons)} On a probe batch the two models' outputs differ by up to {difference:.3g} (max abs)."
    )
    if strict:
        raise ValueError(f"{message} Pass `strict=False` (`--no-strict` on the command line) to convert anyway.")
    logger.warning(message)


def dit_to_diffusers(model: DiTModel, strict: bool = True) -> DiTTransformer2DModel:
    """
    Export a [`DiTModel`] to diffusers' `DiTTransformer2DModel`, e.g. for `DiTPipeline`.

    The shared timestep + label embedder is copied into every block's `norm1.emb` (diffusers' layout), and the fused
    `qkv` projection is split into `to_q`, `to_k` and `to_v`. The result has `model`'s device, dtype and train/eval
    mode.

    Args:
        model ([`DiTModel`]): A class-conditional model with a square `sample_size`, `mlp_ratio=4`,
            `class_dropout_prob > 0` (diffusers' DiT always has the null class row) and none of the later block
            options (`qk_norm`, `norm_type`, `mlp_type`, `pos_embed_type`, `head_depth`).
        strict (`bool`, defaults to `True`): Raise a `ValueError` if the exported model would not compute the same
            outputs, which happens when `timestep_freq_shift=0` (diffusers fixes the shift to 1). With `False`,
            export anyway and log a warning with the measured output difference.
    """
    config = model.config
    options = {name: config[name] for name, plain in PLAIN_DIT_OPTIONS.items() if config[name] != plain}
    if options:
        raise ValueError(
            f"diffusers' DiTTransformer2DModel has only the plain DiT block, but this model uses {options} "
            f"(the plain values are {PLAIN_DIT_OPTIONS}). Keep it in the DiTModel format: a saved DiTPipeline with it "
            "loads with `DiffusionPipeline.from_pretrained(..., trust_remote_code=True)`."
        )
    height, width = to_2tuple(config.sample_size)
    if height != width:
        raise ValueError(
            f"diffusers' DiTTransformer2DModel supports only square inputs, but `sample_size` is {(height, width)}. "
            "Keep this model in the DiTModel format, or train one with a square `sample_size`."
        )
    if config.num_classes == 0:
        raise ValueError(
            "diffusers' DiTTransformer2DModel is class-conditional only, but this model has `num_classes=0`. "
            "Keep this unconditional model in the DiTModel format."
        )
    if config.class_dropout_prob == 0:
        raise ValueError(
            "This model has `class_dropout_prob=0`, so its label table has no null-class row, which diffusers' "
            "DiTTransformer2DModel (and classifier-free guidance in DiTPipeline) requires. Train with "
            "`class_dropout_prob > 0` to export it."
        )
    if int(config.hidden_size * config.mlp_ratio) != 4 * config.hidden_size:
        raise ValueError(
            f"diffusers' DiTTransformer2DModel fixes the MLP width to 4 * hidden_size, but this model has "
            f"`mlp_ratio={config.mlp_ratio}`. Keep it in the DiTModel format, or train with `mlp_ratio=4.0`."
        )

    transformer = DiTTransformer2DModel(
        num_attention_heads=config.num_heads,
        attention_head_dim=config.hidden_size // config.num_heads,
        in_channels=config.in_channels,
        out_channels=model.out_channels,
        num_layers=config.depth,
        attention_bias=True,
        sample_size=height,
        patch_size=config.patch_size,
        activation_fn="gelu-approximate",
        num_embeds_ada_norm=config.num_classes,
        norm_type="ada_norm_zero",
        norm_elementwise_affine=False,
        norm_eps=DIT_NORM_EPS,  # diffusers' default (1e-5) would change the LayerNorm before each MLP
    )

    ours = model.state_dict()
    theirs = {diffusers_name: ours[dit_name] for dit_name, diffusers_name in _renamed_parameters(config.depth)}
    for i in range(config.depth):
        for dit_name, diffusers_name in _embedder_parameters():
            theirs[f"transformer_blocks.{i}.norm1.emb.{diffusers_name}"] = ours[dit_name]
        for kind in ("weight", "bias"):
            # Rows of the fused projection are ordered (q, k, v), each (heads, head_dim) like to_q/to_k/to_v.
            for name, tensor in zip(QKV_NAMES, ours[f"blocks.{i}.attn.qkv.{kind}"].chunk(3, dim=0)):
                theirs[f"transformer_blocks.{i}.attn1.{name}.{kind}"] = tensor
    transformer.load_state_dict(theirs, strict=True)
    _match_placement(transformer, model)

    reasons = []
    if config.timestep_freq_shift != 1:
        reasons.append(
            f"This model uses `timestep_freq_shift={config.timestep_freq_shift}` (the original DiT's timestep "
            "frequencies), but diffusers' DiTTransformer2DModel fixes the shift to 1 (`downscale_freq_shift=1`), "
            "so the exported model would see slightly different timestep features."
        )
    _check_equivalence(reasons, strict, model, transformer)
    return transformer


def dit_from_diffusers(model: DiTTransformer2DModel, strict: bool = True) -> DiTModel:
    """
    Import diffusers' `DiTTransformer2DModel` as a [`DiTModel`] with `timestep_freq_shift=1`.

    The result has `model`'s device, dtype and train/eval mode, and `class_dropout_prob=0.1` (diffusers' fixed value).

    Args:
        model (`DiTTransformer2DModel`): The model to import. Supported: `norm_type="ada_norm_zero"`,
            `activation_fn="gelu-approximate"`, `norm_elementwise_affine=False` and `norm_eps` 1e-6 or 1e-5.
        strict (`bool`, defaults to `True`): Raise a `ValueError` if the imported model would not compute the same
            outputs. This happens when the per-block timestep/label embedders differ (DiTModel shares one; block 0's
            is taken, as diffusers' final layer does) and when `norm_eps=1e-5` (diffusers' default, used by the
            checkpoints it converted from the DiT release; DiTModel's LayerNorms use 1e-6, which changes the
            outputs slightly). With `False`, import anyway and log a warning with the measured output difference.
    """
    config = model.config
    if config.norm_type != "ada_norm_zero":
        raise ValueError(f"Only `norm_type='ada_norm_zero'` can be imported as a DiTModel, got {config.norm_type!r}.")
    if config.activation_fn != "gelu-approximate":
        raise ValueError(
            f"DiTModel's MLP uses the tanh-approximate GELU (`activation_fn='gelu-approximate'`), got "
            f"{config.activation_fn!r}; this model cannot be imported."
        )
    if config.norm_elementwise_affine:
        raise ValueError(
            "DiTModel's LayerNorms have no affine parameters, but this model has `norm_elementwise_affine=True`; "
            "it cannot be imported."
        )
    if config.norm_eps not in (DIT_NORM_EPS, DIFFUSERS_DEFAULT_NORM_EPS):
        raise ValueError(
            f"DiTModel's LayerNorms use eps {DIT_NORM_EPS}, but this model has `norm_eps={config.norm_eps}`; only "
            f"{DIT_NORM_EPS} (exact) and diffusers' default {DIFFUSERS_DEFAULT_NORM_EPS} (nearly exact) can be "
            "imported."
        )
    if config.dropout > 0:
        logger.warning(
            f"DiTModel has no dropout; the model's `dropout={config.dropout}` is dropped (inference is unchanged)."
        )

    depth = config.num_layers
    hidden_size = config.num_attention_heads * config.attention_head_dim
    in_channels = config.in_channels
    out_channels = in_channels if config.out_channels is None else config.out_channels
    if out_channels not in (in_channels, 2 * in_channels):
        raise ValueError(
            f"DiTModel predicts `in_channels` ({in_channels}) or, with learned sigma, twice as many output channels; "
            f"this model has `out_channels={out_channels}` and cannot be imported."
        )
    theirs = model.state_dict()
    num_classes = config.num_embeds_ada_norm
    table_rows = theirs["transformer_blocks.0.norm1.emb.class_embedder.embedding_table.weight"].shape[0]
    if table_rows != num_classes + 1:
        raise ValueError(
            f"Expected {num_classes} class rows and a null-class row in the label table, found {table_rows} rows."
        )

    dit = DiTModel(
        sample_size=config.sample_size,
        patch_size=config.patch_size,
        in_channels=in_channels,
        hidden_size=hidden_size,
        depth=depth,
        num_heads=config.num_attention_heads,
        mlp_ratio=4.0,
        num_classes=num_classes,
        class_dropout_prob=DIFFUSERS_CLASS_DROPOUT_PROB,
        learn_sigma=out_channels == 2 * in_channels,
        timestep_freq_shift=1,
    )

    ours = {dit_name: theirs[diffusers_name] for dit_name, diffusers_name in _renamed_parameters(depth)}
    for dit_name, diffusers_name in _embedder_parameters():
        # diffusers' final layer conditions on block 0's embedder, so block 0's is the one to keep.
        ours[dit_name] = theirs[f"transformer_blocks.0.norm1.emb.{diffusers_name}"]
    differing_blocks = [
        i
        for i in range(1, depth)
        if not all(
            torch.equal(theirs[f"transformer_blocks.{i}.norm1.emb.{name}"], ours[dit_name])
            for dit_name, name in _embedder_parameters()
        )
    ]
    for i in range(depth):
        prefix = f"transformer_blocks.{i}.attn1"
        ours[f"blocks.{i}.attn.qkv.weight"] = torch.cat([theirs[f"{prefix}.{name}.weight"] for name in QKV_NAMES])
        # `attention_bias=False` has no q/k/v biases, i.e. zero ones.
        biases = [theirs.get(f"{prefix}.{name}.bias") for name in QKV_NAMES]
        weight = ours[f"blocks.{i}.attn.qkv.weight"]
        ours[f"blocks.{i}.attn.qkv.bias"] = torch.cat(
            [weight.new_zeros(hidden_size) if bias is None else bias for bias in biases]
        )
    dit.load_state_dict(ours, strict=True)
    _match_placement(dit, model)

    reasons = []
    if differing_blocks:
        reasons.append(
            f"The per-block timestep/label embedders (`norm1.emb`) of blocks {differing_blocks} differ from block "
            "0's; DiTModel shares one embedder across all blocks, so only block 0's is kept."
        )
    if config.norm_eps != DIT_NORM_EPS:
        reasons.append(
            f"This model normalises before each MLP with `norm_eps={config.norm_eps}`, DiTModel with "
            f"{DIT_NORM_EPS}; everything else is identical."
        )
    _check_equivalence(reasons, strict, dit, model)
    return dit


def _read_checkpoint(path_or_state_dict: str | os.PathLike | dict[str, Any]) -> dict[str, torch.Tensor]:
    if isinstance(path_or_state_dict, dict):
        checkpoint = path_or_state_dict
    else:
        path = os.fspath(path_or_state_dict)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"No checkpoint file at {path!r}.")
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file

            checkpoint = load_file(path, device="cpu")
        else:
            # DiT's train.py also pickles its argparse `args`; allow that one harmless class and nothing else.
            with torch.serialization.safe_globals([argparse.Namespace]):
                checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(checkpoint, dict):
        raise ValueError(f"Expected a state dict (or a train.py checkpoint dict), got a {type(checkpoint).__name__}.")
    # train.py checkpoints: {"model": ..., "ema": ..., "opt": ..., "args": ...}; the EMA weights are the ones to use.
    for key in ("ema", "model"):
        if isinstance(checkpoint.get(key), dict):
            checkpoint = checkpoint[key]
            break
    not_tensors = sorted(key for key, value in checkpoint.items() if not torch.is_tensor(value))
    if not_tensors:
        raise ValueError(
            f"Expected a state dict of tensors (or a train.py checkpoint with 'ema'/'model'), but {not_tensors} "
            "are not tensors."
        )
    return checkpoint


def _infer_config(state_dict: dict[str, torch.Tensor], overrides: dict[str, Any]) -> dict[str, Any]:
    """DiTModel config of an original-layout state dict, read off the tensor shapes; `overrides` win."""
    needed = ["x_embedder.proj.weight", "blocks.0.mlp.fc1.weight", "final_layer.linear.weight", "pos_embed"]
    missing = [key for key in needed if key not in state_dict]
    if missing:
        raise ValueError(
            f"Cannot infer the DiT config: the checkpoint lacks {missing}. Expected a facebookresearch/DiT state dict "
            "(keys like 'x_embedder.proj.weight', 'blocks.0.attn.qkv.weight', 'pos_embed')."
        )
    hidden_size, in_channels, patch_size, _ = state_dict["x_embedder.proj.weight"].shape
    depth = 1 + max(int(key.split(".")[1]) for key in state_dict if key.startswith("blocks."))
    mlp_ratio = state_dict["blocks.0.mlp.fc1.weight"].shape[0] / hidden_size
    out_channels = state_dict["final_layer.linear.weight"].shape[0] // patch_size**2
    if out_channels not in (in_channels, 2 * in_channels):
        raise ValueError(
            f"The final layer predicts {out_channels} channels for {in_channels} input channels; expected "
            f"{in_channels} or {2 * in_channels} (learned sigma). Is this a DiT checkpoint?"
        )

    # The label table has `num_classes` rows plus a null row when trained with label dropout (the DiT release).
    table = state_dict.get("y_embedder.embedding_table.weight")
    rows = 0 if table is None else table.shape[0]
    if "num_classes" in overrides:
        class_dropout_prob = 0.1 if rows == overrides["num_classes"] + 1 else 0.0
    elif overrides.get("class_dropout_prob", 0.1) == 0:
        class_dropout_prob = 0.0
    else:
        class_dropout_prob = 0.1 if rows > 0 else 0.0
    num_classes = rows - int(class_dropout_prob > 0)

    # The original DiT only trains square images, so the token grid is square unless told otherwise.
    num_tokens = state_dict["pos_embed"].shape[1]
    grid = math.isqrt(num_tokens)
    if "sample_size" not in overrides and grid * grid != num_tokens:
        raise ValueError(
            f"`pos_embed` has {num_tokens} tokens, not a square grid; pass `sample_size=(height, width)`."
        )

    num_heads = overrides.get("num_heads", NUM_HEADS_BY_HIDDEN_SIZE.get(hidden_size))
    if num_heads is None:
        raise ValueError(
            f"`hidden_size={hidden_size}` is not a DiT size from the paper, so the number of heads is unknown: pass "
            "`num_heads=...` (`--num_heads` on the command line)."
        )
    config = dict(
        sample_size=grid * patch_size,
        patch_size=patch_size,
        in_channels=in_channels,
        hidden_size=hidden_size,
        depth=depth,
        num_heads=num_heads,
        mlp_ratio=mlp_ratio,
        num_classes=num_classes,
        class_dropout_prob=class_dropout_prob,
        learn_sigma=out_channels == 2 * in_channels,
        timestep_freq_shift=0,  # the original DiT's timestep frequencies
    )
    return {**config, **overrides}


def load_original_dit_checkpoint(
    path_or_state_dict: str | os.PathLike | dict[str, Any], **config_overrides
) -> DiTModel:
    """
    Load a facebookresearch/DiT checkpoint (e.g. `DiT-XL-2-256x256.pt`) as a [`DiTModel`] in eval mode.

    Accepts a release state dict, a `train.py` checkpoint (its "ema" weights, else "model"), a `.pt` file of either
    (read with `weights_only=True`) or a `.safetensors` file. The config is inferred from the tensor shapes, with the
    original timestep frequencies (`timestep_freq_shift=0`); `num_heads` comes from the paper's sizes by
    `hidden_size` (384, 768, 1024, 1152) unless given.

    Args:
        path_or_state_dict (`str`, `os.PathLike` or `dict`): The checkpoint file or its loaded contents.
        config_overrides: [`DiTModel`] config values that replace the inferred ones, e.g. `num_heads=6`.

    Raises:
        `ValueError`: on missing or unexpected keys (all listed), shape mismatches, or a stored `pos_embed` that is not
            the fixed sin-cos embedding the model computes from its config.
    """
    allowed = set(inspect.signature(DiTModel.__init__).parameters) - {"self"}
    unknown = sorted(set(config_overrides) - allowed)
    if unknown:
        raise ValueError(f"Unknown DiTModel config keys {unknown}; choose from {sorted(allowed)}.")
    state_dict = _read_checkpoint(path_or_state_dict)
    model = DiTModel(**_infer_config(state_dict, config_overrides))

    # `pos_embed` is a fixed buffer recomputed from the config, so it is checked rather than loaded.
    expected = {name: tensor.shape for name, tensor in model.state_dict().items()}
    expected["pos_embed"] = model.pos_embed.shape
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    if missing or unexpected:
        raise ValueError(
            f"The checkpoint does not match the inferred DiTModel config ({dict(model.config)}). "
            f"Missing keys: {missing}. Unexpected keys: {unexpected}."
        )
    mismatched = [
        f"{name}: checkpoint {tuple(state_dict[name].shape)} vs model {tuple(shape)}"
        for name, shape in sorted(expected.items())
        if state_dict[name].shape != shape
    ]
    if mismatched:
        raise ValueError(f"Shape mismatches (check the config overrides): {mismatched}.")
    stored = state_dict["pos_embed"]
    difference = (stored.double() - model.pos_embed.double()).abs().max().item()
    # The embedding lies in [-1, 1], so storing it rounds by at most half a unit in the last place: an fp16 or bf16
    # checkpoint differs by up to eps / 2 (5e-4 in fp16) and is still the same embedding.
    tolerance = max(1e-5, torch.finfo(stored.dtype).eps) if stored.is_floating_point() else 1e-5
    if difference > tolerance:
        raise ValueError(
            f"The stored `pos_embed` differs from the fixed 2-D sin-cos embedding for sample_size "
            f"{model.config.sample_size} and patch_size {model.config.patch_size} (max abs difference "
            f"{difference:.3g}). DiTModel recomputes it from the config, so only checkpoints with the original "
            "sin-cos embedding can be loaded; check `sample_size`."
        )
    model.load_state_dict({name: tensor for name, tensor in state_dict.items() if name != "pos_embed"}, strict=True)
    return model.eval()


def build_parser(prog: str = "python -m dit_hf.convert") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)

    original = commands.add_parser("from-original", help="facebookresearch/DiT .pt/.safetensors -> DiTModel folder.")
    original.add_argument("checkpoint", help="A release state dict (DiT-XL-2-256x256.pt) or a train.py checkpoint.")
    original.add_argument("output_dir", help="Where to write the DiTModel (save_pretrained).")
    original.add_argument(
        "--num_heads", type=int, default=None, help="Attention heads; needed when hidden_size is not a paper size."
    )

    to_diffusers = commands.add_parser("to-diffusers", help="DiTModel folder -> DiTTransformer2DModel folder.")
    to_diffusers.add_argument("model_dir", help="A DiTModel save_pretrained folder.")
    to_diffusers.add_argument("output_dir", help="Where to write the DiTTransformer2DModel.")
    to_diffusers.add_argument("--subfolder", default=None, help="E.g. 'transformer' for a saved pipeline folder.")

    from_diffusers = commands.add_parser("from-diffusers", help="DiTTransformer2DModel folder -> DiTModel folder.")
    from_diffusers.add_argument("model_dir", help="A DiTTransformer2DModel folder (or a pipeline with --subfolder).")
    from_diffusers.add_argument("output_dir", help="Where to write the DiTModel.")
    from_diffusers.add_argument("--subfolder", default=None, help="E.g. 'transformer' for a DiTPipeline folder.")

    for command in (to_diffusers, from_diffusers):
        command.add_argument(
            "--no-strict",
            dest="strict",
            action="store_false",
            help="Convert even if the outputs change slightly (the measured difference is logged).",
        )
    return parser


def convert(args: argparse.Namespace) -> str:
    """Run one parsed command; returns the output folder."""
    if args.command == "from-original":
        overrides = {} if args.num_heads is None else {"num_heads": args.num_heads}
        converted = load_original_dit_checkpoint(args.checkpoint, **overrides)
    elif args.command == "to-diffusers":
        model = DiTModel.from_pretrained(args.model_dir, subfolder=args.subfolder)
        converted = dit_to_diffusers(model, strict=args.strict)
    else:
        model = DiTTransformer2DModel.from_pretrained(args.model_dir, subfolder=args.subfolder)
        converted = dit_from_diffusers(model, strict=args.strict)
    converted.save_pretrained(args.output_dir)
    print(f"wrote {type(converted).__name__} to {args.output_dir}")
    return args.output_dir


def main(argv: list[str] | None = None, prog: str = "python -m dit_hf.convert") -> str:
    """Command-line entry point; `prog` names the command in messages (e.g. "dit-hf convert")."""
    parser = build_parser(prog)
    args = parser.parse_args(argv)
    try:
        return convert(args)
    except (ValueError, FileNotFoundError) as err:
        parser.exit(2, f"{parser.prog} {args.command}: error: {err}\n")


if __name__ == "__main__":
    main()
