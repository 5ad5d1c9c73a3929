"""The trainer's extension points on tiny runs: a second auxiliary loss and hooks plug in without loop edits."""

import os

import pytest
import torch
from accelerate import Accelerator
from conftest import tiny_dit
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from diffusers.optimization import get_scheduler

from dit_hf.autoencoders import LatentNorm
from dit_hf.config import resolve_config
from dit_hf.ema import EMAModels
from dit_hf.latents import sample_latents
from dit_hf.objective import make_objective
from dit_hf.trainer import AuxiliaryLoss, Hook, LatentSpace, RunningSums, Trainer, is_due, make_x0, update_step
from dit_hf.training import EpochSampler, StepRandomness, TrainerState, make_adamw


class Images(torch.utils.data.Dataset):
    def __init__(self, n: int = 16):
        g = torch.Generator().manual_seed(0)
        self.pixels = torch.rand(n, 3, 8, 8, generator=g) * 2 - 1
        self.labels = torch.randint(0, 10, (n,), generator=g)

    def __len__(self):
        return len(self.pixels)

    def __getitem__(self, i):
        return {"pixel_values": self.pixels[i], "class_labels": self.labels[i]}


class Scale(ModelMixin, ConfigMixin):
    @register_to_config
    def __init__(self, channels: int = 3):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(channels))

    def forward(self, x):
        return x * self.weight[:, None, None]


class PullToZero(AuxiliaryLoss):
    """A second auxiliary loss: the mean square of a trained per-channel scale of x0."""

    name = "pull"
    weight = 0.25

    def __init__(self):
        self.modules = {"pull_scale": Scale()}

    def loss(self, batch, x0):
        term = self.modules["pull_scale"](x0).pow(2).mean()
        return term, {"pull_loss": term}


def tiny_trainer(tmp_path, max_train_steps=3, hooks=(), aux_losses=()) -> Trainer:
    config = resolve_config(["--config", "smoke", "--output_dir", str(tmp_path), "--max_grad_norm", "1"])
    accelerator = Accelerator(cpu=True)
    model = tiny_dit()
    objective = make_objective("ddpm_eps", learn_sigma=True)
    dataset = Images()
    sampler = EpochSampler(len(dataset), seed=0)
    loader = torch.utils.data.DataLoader(dataset, batch_size=4, sampler=sampler, drop_last=True)
    params = [*model.parameters(), *(p for aux in aux_losses for m in aux.modules.values() for p in m.parameters())]
    optimizer = make_adamw(params, "cpu", lr=1e-2)
    scheduler = get_scheduler("constant", optimizer=optimizer)
    model, optimizer, loader, scheduler = accelerator.prepare(model, optimizer, loader, scheduler)
    randomness = StepRandomness(0, 1000, 4, (3, 8, 8), accelerator.device, label_dropout=0.1)
    ema = EMAModels(model, [0.5])
    return Trainer(config, accelerator, model, objective, optimizer, scheduler, loader, sampler, randomness, ema,
                   max_train_steps, num_epochs=max_train_steps, num_classes=10, aux_losses=list(aux_losses),
                   hooks=list(hooks))  # fmt: skip


class Recorder(Hook):
    """Keeps a copy of the weights after each step, and vetoes the update of `veto_step` (1-based)."""

    def __init__(self, veto_step=None, stop_step=None):
        self.veto_step, self.stop_step = veto_step, stop_step
        self.weights, self.started, self.ended = [], 0, 0

    def on_train_start(self, trainer):
        self.started += 1

    def allow_update(self, trainer, loss, grad_norm):
        assert loss.ndim == 0 and grad_norm is not None  # clipping is on: the norm before it
        return trainer.state.global_step + 1 != self.veto_step

    def on_step_end(self, trainer):
        self.weights.append(trainer.unwrapped.final_layer.linear.weight.detach().clone())
        trainer.stop = trainer.state.global_step == self.stop_step

    def on_train_end(self, trainer):
        self.ended += 1


def test_a_hook_can_veto_an_update_and_the_ema_skips_it_too(tmp_path):
    recorder = Recorder(veto_step=2)
    trainer = tiny_trainer(tmp_path, hooks=[recorder])
    state = trainer.train()
    assert (state.global_step, state.skipped_steps, recorder.started, recorder.ended) == (3, 1, 1, 1)
    first, second, third = recorder.weights
    assert torch.equal(first, second) and not torch.equal(second, third)
    assert trainer.ema._num_updates == 2
    assert trainer.unwrapped.final_layer.linear.weight.grad is None  # the vetoed gradients were dropped


def test_a_hook_can_stop_the_run(tmp_path):
    recorder = Recorder(stop_step=2)
    state = tiny_trainer(tmp_path, max_train_steps=5, hooks=[recorder]).train()
    assert state.global_step == 2 and len(recorder.weights) == 2


def test_a_second_auxiliary_loss_trains_logs_and_checkpoints_without_loop_changes(tmp_path):
    pull = PullToZero()
    trainer = tiny_trainer(tmp_path, aux_losses=[pull])
    batch = next(iter(trainer.dataloader))
    draws = trainer.randomness.rows(0, 0, 4)
    out, loss, metrics = trainer.compute_loss(batch, batch["pixel_values"], draws)
    expected = pull.modules["pull_scale"](batch["pixel_values"]).pow(2).mean()
    assert torch.allclose(loss, out.loss + 0.25 * expected) and torch.equal(metrics["pull_loss"], expected)

    trainer.train()
    scale = pull.modules["pull_scale"].weight
    assert (scale < 1).all()  # optimised with the model, towards zero
    sums = trainer.sums.reduce(trainer.accelerator)
    assert {"loss", "micro_batches", "grad_norm", "pull_loss", "loss_by_quartile"} == set(sums)
    assert sums["micro_batches"].item() == 3 and sums["pull_loss"].item() > 0
    path = trainer.save_checkpoint()
    assert torch.equal(Scale.from_pretrained(os.path.join(path, "pull_scale")).weight, scale.detach())
    assert TrainerState.load(path).global_step == 3


def test_update_step_and_running_sums():
    layer = torch.nn.Linear(2, 1)
    optimizer = torch.optim.SGD(layer.parameters(), lr=1.0)
    before = layer.weight.detach().clone()
    loss = layer(torch.ones(1, 2)).sum()
    grad_norm, applied = update_step(
        loss, optimizer, clip=lambda: torch.tensor(5.0), allow_update=lambda loss, norm: norm.item() < 5, sync=True
    )
    assert (grad_norm.item(), applied) == (5.0, False)
    assert torch.equal(layer.weight, before) and layer.weight.grad is None
    loss = layer(torch.ones(1, 2)).sum()
    assert update_step(loss, optimizer, sync=False) == (None, True)
    assert torch.equal(layer.weight, before - 1.0)  # plain SGD on a gradient of ones

    sums = RunningSums(torch.device("cpu"))
    sums.add("a", torch.tensor(1.5))
    sums.add("a", 2)
    sums.add("q", torch.ones(2, 4))
    reduced = sums.reduce(Accelerator(cpu=True))
    assert reduced["a"].item() == 3.5 and reduced["a"].dtype == torch.float64 and reduced["q"].shape == (2, 4)
    sums.reset()
    assert sums.sums["a"].item() == 0


@pytest.mark.parametrize(
    "step, every, last, due",
    [(4, 2, 9, True), (5, 2, 9, False), (9, 2, 9, True), (3, None, 9, False), (3, 0, None, False)],
)
def test_is_due(step, every, last, due):
    assert is_due(step, every, last) is due


def test_a_run_stopped_by_a_hook_checkpoints_and_skips_the_export(tmp_path, monkeypatch):
    import sys

    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from test_train import run

    import train_dit

    class Preempted(Hook):
        def on_step_end(self, trainer):
            if trainer.state.global_step == 2:
                trainer.save_checkpoint()
                trainer.stop = True

    real_make_hooks = train_dit.make_hooks
    monkeypatch.setattr(train_dit, "make_hooks", lambda *a: {**real_make_hooks(*a), "preempted": Preempted()})
    summary = run(tmp_path, "--max_train_steps", "5", "--checkpointing_steps", "5")
    assert summary == {"steps": 2, "output_dir": str(tmp_path), "stopped": True}
    assert (tmp_path / "checkpoints" / "checkpoint-2").is_dir() and not (tmp_path / "model_index.json").exists()


def test_make_x0_draws_gaussian_moments_as_before_and_normalises_deterministic_latents():
    g = torch.Generator().manual_seed(0)
    moments = torch.randn(2, 2, 4, 3, 3, generator=g)  # [mean, logvar] of a Gaussian posterior
    noise = torch.randn(2, 4, 3, 3, generator=g)
    scale = LatentSpace(LatentNorm("scale", torch.full((4,), 0.1), torch.full((4,), 0.18215)))
    # The VAE path gives exactly what the scalar scaling of `sample_latents` gave before latent normalisation existed.
    assert torch.equal(make_x0({"moments": moments}, scale, noise), sample_latents(moments, 0.18215, 0.1, noise=noise))
    latents = torch.randn(2, 1, 4, 3, 3, generator=g)  # a deterministic encoder's (K = 1): no draw
    mean, std = torch.tensor([0.0, 1.0, -1.0, 2.0]), torch.tensor([1.0, 2.0, 0.5, 4.0])
    channel = LatentSpace(LatentNorm("channel", mean, 1 / std))
    expected = (latents[:, 0] - mean[:, None, None]) / std[:, None, None]
    torch.testing.assert_close(make_x0({"moments": latents}, channel, noise), expected)
    # Encoded at the step when the batch has pixels, not moments.
    encoded = LatentSpace(channel.norm, encode=lambda pixels: latents)
    torch.testing.assert_close(make_x0({"pixel_values": torch.zeros(2, 3, 6, 6)}, encoded, None), expected)
    assert make_x0({"pixel_values": noise}, None, None) is noise
