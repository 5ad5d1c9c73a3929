# Copyright the dit-hf authors. Licensed under the Apache License, Version 2.0.
"""RAE stage 1 at toy scale: a frozen DINOv2-architecture encoder plus a ViT decoder trained to invert it.

A Representation Autoencoder (Zheng et al., 2025, "Diffusion Transformers with Representation Autoencoders") keeps a
pretrained representation encoder frozen and trains only a decoder, with a reconstruction loss and noise added to
the encoder's tokens (`noise_tau`: σ ~ U[0, τ] per image, so the decoder also accepts the slightly off latents a
diffusion model samples). Stage 2 then trains a DiT^DH on the encoder's latents (`train_dit.py --vae <this folder>`).

No pretrained DINOv2 can be downloaded offline, so `train_digits_rae` builds the whole thing on scikit-learn's
digits: the digits DINOv2 of `dit_hf.repa.train_digits_encoder` (1 head of 64, 4 registers, the layout diffusers'
`AutoencoderRAE` expects) becomes the encoder of an `AutoencoderRAE`, and its decoder learns, with L1 + L2 losses, to
turn the 4×4×64 token grid of a digit upscaled to 16 px back into the 8×8 digit. The per-channel mean and std of the
training tokens are saved as the RAE's `latents_mean` / `latents_std`, as the released RAEs ship theirs, so that its
`encode` gives normalised latents (train stage 2 with `--latent_norm scale`). The result is a folder that
`AutoencoderRAE.from_pretrained` loads; the real DINOv2-B RAE goes through the same code path.

    python -m dit_hf.rae make-digits-rae --output outputs/digits-rae      # or: dit-hf train-rae --output ...
"""

import argparse
import json
import math
import os
import time

import torch
import torch.nn.functional as F

# Digits at 8 px are fed to the encoder at 16 px (a 4×4 grid of patches 4): the digits encoder's own input size.
DIGITS_SIZE = 8
ENCODER_INPUT_SIZE = 16
ENCODER_PATCH_SIZE = 4
ENCODER_WIDTH = 64  # AutoencoderRAE builds DINOv2 heads of 64: a 64-wide encoder has one head
NUM_REGISTERS = 4  # AutoencoderRAE drops 1 class + 4 register tokens from a DINOv2's output
SUMMARY_FILE = "stage1_summary.json"


def _digits_rgb() -> tuple[torch.Tensor, torch.Tensor]:
    """The digits as the trainer sees them with `--image_channels 3`: (1797, 3, 8, 8) in [0, 1], and the labels."""
    from .repa import _digits_images

    images, labels = _digits_images()
    return ((images + 1) / 2).expand(-1, 3, -1, -1).contiguous(), labels


def _transplant_encoder(rae, encoder_dir: str) -> None:
    """Loads the digits encoder's weights into the RAE's DINOv2. The RAE builds its DINOv2 for 518 px inputs, so the
    encoder's 4×4 grid of position embeddings is resized (bicubic) to the RAE's grid; DINOv2 resizes them back for a
    16 px input. The final layer norm keeps no affine parameters in an RAE (diffusers drops them)."""
    from transformers import AutoModel

    source = AutoModel.from_pretrained(encoder_dir).state_dict()
    target = rae.encoder.state_dict()
    key = "embeddings.position_embeddings"
    cls_pos, grid_pos = source[key][:, :1], source[key][:, 1:]
    side, new_side = math.isqrt(grid_pos.shape[1]), math.isqrt(target[key].shape[1] - 1)
    grid = grid_pos.reshape(1, side, side, -1).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=(new_side, new_side), mode="bicubic", align_corners=False)
    source[key] = torch.cat([cls_pos, grid.permute(0, 2, 3, 1).reshape(1, new_side * new_side, -1)], dim=1)
    source = {k: v for k, v in source.items() if k in target}
    missing = sorted(set(target) - set(source))
    if missing:
        raise ValueError(f"The encoder in {encoder_dir!r} lacks {missing}: it is not a DINOv2 with registers.")
    rae.encoder.load_state_dict(source)


def build_digits_rae(encoder_dir: str, mean: list[float], std: list[float], noise_tau: float, **decoder):
    """An `AutoencoderRAE` around the digits encoder, with the encoder's pixel mean/std and a fresh decoder."""
    from diffusers import AutoencoderRAE

    rae = AutoencoderRAE(
        encoder_type="dinov2",
        encoder_hidden_size=ENCODER_WIDTH,
        encoder_patch_size=ENCODER_PATCH_SIZE,
        encoder_num_hidden_layers=decoder.pop("encoder_num_hidden_layers"),
        encoder_input_size=ENCODER_INPUT_SIZE,
        patch_size=DIGITS_SIZE // (ENCODER_INPUT_SIZE // ENCODER_PATCH_SIZE),
        image_size=DIGITS_SIZE,
        encoder_norm_mean=mean,
        encoder_norm_std=std,
        noise_tau=noise_tau,
        **decoder,
    )
    _transplant_encoder(rae, encoder_dir)
    return rae


def train_digits_rae(
    output_dir: str,
    encoder_dir: str | None = None,
    decoder_hidden_size: int = 64,
    decoder_num_hidden_layers: int = 3,
    decoder_num_attention_heads: int = 4,
    noise_tau: float = 0.3,
    max_steps: int = 3000,
    encoder_steps: int = 1800,
    batch_size: int = 64,
    learning_rate: float = 1e-3,
    test_fraction: float = 0.2,
    seed: int = 0,
) -> dict:
    """Trains a tiny RAE on scikit-learn's digits and saves it to `output_dir` (see the module docstring).

    Args:
        output_dir (`str`): Where to save the `AutoencoderRAE`, a README and `stage1_summary.json` with the measured
            figures.
        encoder_dir (`str`, *optional*): A digits encoder from `train_digits_encoder(..., num_heads=1,
            num_register_tokens=4)`; `None` trains one (`encoder_steps` steps, about a minute for the default 1800)
            into `output_dir/encoder`.
        noise_tau (`float`, defaults to 0.3): The largest σ of the noise added to the encoder's tokens in training.
        max_steps, batch_size, learning_rate: The decoder's AdamW training (cosine schedule with warm-up).
        test_fraction (`float`, defaults to 0.2): Stratified share of the digits held out to measure reconstruction.

    Returns:
        A dict with the held-out reconstruction MSE (pixels in [0, 1]), that of predicting the mean image (a scale
        for it), the encoder's held-out accuracy and the run times.
    """
    from sklearn.model_selection import train_test_split

    start = time.perf_counter()
    images, labels = _digits_rgb()
    train_idx, test_idx = train_test_split(
        torch.arange(len(labels)).numpy(), test_size=test_fraction, random_state=seed, stratify=labels.numpy()
    )
    os.makedirs(output_dir, exist_ok=True)
    encoder_summary = {}
    if encoder_dir is None:
        encoder_dir = os.path.join(output_dir, "encoder")
        encoder_summary = _train_encoder(encoder_dir, encoder_steps, seed)
    mean, std, encoder_layers = _encoder_layout(encoder_dir)
    decoder = dict(
        encoder_num_hidden_layers=encoder_layers,
        decoder_hidden_size=decoder_hidden_size,
        decoder_num_hidden_layers=decoder_num_hidden_layers,
        decoder_num_attention_heads=decoder_num_attention_heads,
        decoder_intermediate_size=4 * decoder_hidden_size,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        rae = build_digits_rae(encoder_dir, mean, std, noise_tau, **decoder)
    rae.eval()
    with torch.no_grad():
        tokens = torch.cat([rae.encode(chunk).latent for chunk in images.split(256)])  # (N, 64, 4, 4)
    latents_mean, latents_std = _token_statistics(tokens[train_idx])

    stage_start = time.perf_counter()
    _train_decoder(rae, tokens[train_idx], images[train_idx], noise_tau, max_steps, batch_size, learning_rate, seed)
    decoder_time = time.perf_counter() - stage_start

    rae = _with_statistics(rae, latents_mean, latents_std)
    summary = {
        **_reconstruction_scores(rae, images[train_idx], images[test_idx]),
        "noise_tau": noise_tau,
        "max_steps": max_steps,
        "encoder_test_accuracy": encoder_summary.get("test_accuracy"),
        "decoder_train_time_s": round(decoder_time, 1),
        "total_time_s": round(time.perf_counter() - start, 1),
    }
    rae.save_pretrained(output_dir)
    _write_readme(output_dir, summary)
    with open(os.path.join(output_dir, SUMMARY_FILE), "w") as f:
        json.dump(summary, f, indent=2)
    return summary


def _reconstruction_scores(rae, train_images: torch.Tensor, test_images: torch.Tensor) -> dict:
    """Held-out reconstruction MSE (pixels in [0, 1]) and, as its scale, that of predicting the training mean."""
    with torch.no_grad():
        reconstructed = rae.decode(rae.encode(test_images).latent).sample.clamp(0, 1)
    mean_image = train_images.mean(0, keepdim=True).expand_as(test_images)
    return {
        "reconstruction_mse": F.mse_loss(reconstructed, test_images).item(),
        "mean_image_mse": F.mse_loss(mean_image, test_images).item(),
        "num_test": len(test_images),
    }


def _train_encoder(encoder_dir: str, steps: int, seed: int) -> dict:
    """The digits DINOv2 of `dit_hf.repa` in the layout `AutoencoderRAE` expects (a head per 64 channels)."""
    from .repa import train_digits_encoder

    return train_digits_encoder(
        encoder_dir,
        image_size=ENCODER_INPUT_SIZE,
        patch_size=ENCODER_PATCH_SIZE,
        hidden_size=ENCODER_WIDTH,
        num_heads=ENCODER_WIDTH // 64,
        num_register_tokens=NUM_REGISTERS,
        max_steps=steps,
        seed=seed,
    )


def _encoder_layout(encoder_dir: str) -> tuple[list[float], list[float], int]:
    """The saved encoder's input normalisation (mean, std) and depth."""
    with open(os.path.join(encoder_dir, "preprocessor_config.json")) as f:
        processor = json.load(f)
    with open(os.path.join(encoder_dir, "config.json")) as f:
        layers = json.load(f)["num_hidden_layers"]
    return processor["image_mean"], processor["image_std"], layers


def _token_statistics(tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean/std of (N, C, h, w) encoder tokens, as (C, 1, 1): the released RAEs normalise latents with
    statistics of the training set's encoder outputs, and so does this one."""
    flat = tokens.transpose(0, 1).reshape(tokens.shape[1], -1)
    return flat.mean(1).reshape(-1, 1, 1), flat.std(1).reshape(-1, 1, 1)


def _train_decoder(rae, tokens, targets, noise_tau, max_steps, batch_size, learning_rate, seed) -> None:
    """L1 + L2 reconstruction from the encoder's (precomputed, frozen) tokens with σ ~ U[0, noise_tau] noise."""
    params = list(rae.decoder.parameters())
    for p in params:
        p.requires_grad_(True)
    optimizer = torch.optim.AdamW(params, lr=learning_rate, weight_decay=0.01)
    warmup = max(1, max_steps // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda step: min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(1.0, step / max_steps))),
    )
    generator = torch.Generator().manual_seed(seed)
    rae.decoder.train()
    for _ in range(max_steps):
        batch = torch.randint(0, len(tokens), (batch_size,), generator=generator)
        z = tokens[batch]
        sigma = noise_tau * torch.rand(batch_size, 1, 1, 1, generator=generator)
        z = z + sigma * torch.randn(z.shape, generator=generator)
        out = rae.decode(z).sample
        loss = F.l1_loss(out, targets[batch]) + F.mse_loss(out, targets[batch])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
    rae.decoder.eval()
    rae.requires_grad_(False)


def _with_statistics(rae, latents_mean: torch.Tensor, latents_std: torch.Tensor):
    """`rae` with `latents_mean` / `latents_std` in its config (a new instance: they size its buffers).

    The decoder was trained on raw tokens; the new RAE's `decode` denormalises first, so it reconstructs the same.
    """
    config = {k: v for k, v in rae.config.items() if not k.startswith("_")}
    config.update(latents_mean=latents_mean.tolist(), latents_std=latents_std.tolist())
    with torch.random.fork_rng(devices=[]):
        final = type(rae).from_config(config)
    state = {k: v for k, v in rae.state_dict().items() if k not in ("_latents_mean", "_latents_std")}
    missing, unexpected = final.load_state_dict(state, strict=False)
    if sorted(missing) != ["_latents_mean", "_latents_std"] or unexpected:
        raise RuntimeError(f"Unexpected RAE state: missing {missing}, unexpected {unexpected}.")
    final.requires_grad_(False)
    return final.eval()


def _write_readme(output_dir: str, summary: dict) -> None:
    with open(os.path.join(output_dir, "README.md"), "w") as f:
        f.write(
            "# Digits RAE\n\n"
            "An `AutoencoderRAE` for scikit-learn's 8x8 digits (as RGB): a frozen 2-layer, 64-wide DINOv2-with-"
            "registers encoder trained on the digits by `dit_hf.repa`, reading the digits at 16 px, and a ViT "
            f"decoder trained with L1 + L2 losses and noise_tau {summary['noise_tau']}. Latents: 64 x 4 x 4, "
            "normalised by the RAE itself (`latents_mean` / `latents_std` of the training tokens).\n\n"
            f"Held-out reconstruction MSE {summary['reconstruction_mse']:.4f} (pixels in [0, 1]; predicting the "
            f"mean image: {summary['mean_image_mse']:.4f}) on {summary['num_test']} digits.\n\n"
            f"```json\n{json.dumps(summary, indent=2)}\n```\n"
        )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--output", required=True, metavar="DIR", help="Folder to save the AutoencoderRAE to.")
    parser.add_argument("--encoder", default=None, metavar="DIR", help="A digits encoder; default: train one.")
    parser.add_argument("--max_steps", type=int, default=3000, help="Decoder training steps.")
    parser.add_argument("--encoder_steps", type=int, default=1800, help="Steps of the digits encoder, if trained.")
    parser.add_argument("--noise_tau", type=float, default=0.3)
    parser.add_argument("--seed", type=int, default=0)


def run(args: argparse.Namespace) -> dict:
    if args.max_steps < 1 or args.encoder_steps < 1:
        raise ValueError(f"--max_steps and --encoder_steps must be >= 1, got {args.max_steps}, {args.encoder_steps}.")
    if args.noise_tau < 0:
        raise ValueError(f"--noise_tau must be >= 0, got {args.noise_tau}.")
    summary = train_digits_rae(
        args.output,
        args.encoder,
        noise_tau=args.noise_tau,
        max_steps=args.max_steps,
        encoder_steps=args.encoder_steps,
        seed=args.seed,
    )
    print(
        f"Saved the digits RAE to {args.output}: held-out reconstruction MSE {summary['reconstruction_mse']:.4f} "
        f"(mean image {summary['mean_image_mse']:.4f}), {summary['total_time_s']:.0f} s."
    )
    return summary


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m dit_hf.rae", description="RAE stage 1 on the digits.")
    subparsers = parser.add_subparsers(dest="command", required=True)
    add_arguments(subparsers.add_parser("make-digits-rae", help="Train a tiny RAE on scikit-learn's digits."))
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    main()
