"""Shared helpers for the tests: tiny, seeded DiTs and pipelines that run in well under a second on a CPU."""

import os

# Set before diffusers / huggingface_hub are imported: both read these once, at import time.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["WANDB_MODE"] = "disabled"

import pytest  # noqa: E402
import torch  # noqa: E402
from diffusers import DDPMScheduler  # noqa: E402

from dit_hf import DiTModel, DiTPipeline  # noqa: E402

# The test tensors are tiny: with 2 cores, intra-op threads spend more time waiting on each other than computing.
torch.set_num_threads(1)

TINY_DIT = dict(sample_size=8, patch_size=2, in_channels=3, hidden_size=32, depth=2, num_heads=2, num_classes=10)
ID2LABEL = {0: "tabby, tabby cat", 1: "golden retriever", 2: "goldfish"}


def tiny_dit(seed: int = 0, std: float = 0.1, **overrides) -> DiTModel:
    """A tiny DiT with every parameter perturbed by seeded noise.

    A freshly initialised DiT predicts exactly zero (adaLN-Zero), which would make most pipeline tests vacuous. The
    initialisation itself draws from the global RNG: seed it too, without disturbing other tests.
    """
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = DiTModel(**{**TINY_DIT, **overrides})
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(std * torch.randn(param.shape, generator=generator))
    return model.eval()


def ddpm_scheduler() -> DDPMScheduler:
    """The DiT training schedule (linear betas) with the learned-range variance of improved DDPM."""
    return DDPMScheduler(
        beta_schedule="linear", beta_start=1e-4, beta_end=0.02, clip_sample=False, variance_type="learned_range"
    )


def make_pipe(transformer=None, scheduler=None, vae=None, id2label=None) -> DiTPipeline:
    """A DiTPipeline of tiny parts (defaults: `tiny_dit()`, `ddpm_scheduler()`), without progress bars."""
    pipe = DiTPipeline(
        transformer=transformer if transformer is not None else tiny_dit(),
        scheduler=scheduler if scheduler is not None else ddpm_scheduler(),
        vae=vae,
        id2label=id2label,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.fixture
def pipe() -> DiTPipeline:
    return make_pipe(id2label=ID2LABEL)


@pytest.fixture(scope="module")
def saved_pipeline(tmp_path_factory):
    """A tiny pipeline saved with `save_pretrained`, shared by the tests of one module (treat it as read-only)."""
    folder = tmp_path_factory.mktemp("pipeline") / "tiny-dit"
    make_pipe(id2label=ID2LABEL).save_pretrained(folder)
    return folder
