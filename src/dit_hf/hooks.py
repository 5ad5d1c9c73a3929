# Copyright the dit-hf authors. Licensed under the Apache License, Version 2.0.
"""The periodic work of a training run, as [`dit_hf.trainer.Hook`]s, in the order `train_dit.py` runs them:

- [`LogHook`]: every `--logging_steps` (and at the last step) the named running sums become means: `loss`, each
  auxiliary loss's metrics, `grad_norm`, `loss_q0..3` (by timestep quartile), `lr`, `img_per_s`, `mfu`; logged to the
  trackers and appended to `metrics.jsonl`.
- [`CheckpointHook`]: every `--checkpointing_steps` (and at the last step) an atomic checkpoint of finite weights,
  pruning to `--checkpoints_total_limit` (never the newest finite checkpoint), and with `--push_checkpoints` an
  upload.
- [`GuardHook`]: one collective decision per optimizer step (`dit_hf.guards`): a non-finite loss or gradient norm on
  any process vetoes the update everywhere and counts it (`nonfinite_steps`); after `--max_nonfinite_steps` in a row
  it stops the run or rolls back; a stop signal on any process ends the run after this step's checkpoint.
- [`SampleGridHook`]: every `--validation_steps`, a grid of EMA samples (`samples/step-*.png`, and the trackers).
- [`EvalHook`]: every `--eval_steps` (and at the last step), FID / precision / recall / class consistency of EMA
  samples.
- [`PlotHook`]: redraws `plots/*.png` from `metrics.jsonl` after logs (at most every 30 s) and evaluations.
"""

import contextlib
import functools
import json
import math
import os
import time
from dataclasses import dataclass

import torch
from accelerate.logging import get_logger

from .ema import load_ema
from .guards import NonFiniteStop, Preempted, StepGuard, StopSignals, newest_finite_checkpoint
from .pipeline_dit import DiTPipeline, image_grid
from .trainer import Hook, Trainer, is_due

logger = get_logger(__name__)


@dataclass
class Sampling:
    """What a pipeline of the run is made of besides its transformer: for grids, evaluations and the export."""

    objective: object
    vae: object | None
    id2label: dict | None
    config: object  # dit_hf.config.TrainConfig
    latent_norm: object | None = None  # dit_hf.autoencoders.LatentNorm, undone by the pipeline before decoding

    def pipeline(self, transformer) -> DiTPipeline:
        return make_pipeline(transformer, self.objective, self.vae, self.id2label, self.config, self.latent_norm)


def make_pipeline(model, objective, vae, id2label, config, latent_norm=None) -> DiTPipeline:
    from .objective import make_scheduler

    return DiTPipeline(
        transformer=model,
        scheduler=make_scheduler(objective, config.sample_scheduler),
        vae=vae,
        id2label=id2label,
        objective=objective.name,
        default_num_inference_steps=config.num_inference_steps,
        default_guidance_scale=config.guidance_scale,
        default_guidance_interval=config.guidance_interval,
        **(latent_norm.pipeline_config() if latent_norm is not None else {}),
    )


def sample_grid(pipe, classes: list[int] | None, per_class: int, config, device, guidance_scale=None, seed: int = 0):
    """One row per class (or one row of unconditional samples), same seed every time; at `guidance_scale` (default:
    --guidance_scale)."""
    from .evaluation import sample_in_batches

    pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    generator = torch.Generator().manual_seed(seed)
    # At most --eval_batch_size images per forward, however many classes the grid has.
    batches = dict(batch_size=config.eval_batch_size, num_inference_steps=config.num_inference_steps,
                   generator=generator)  # fmt: skip
    if classes:
        labels = [c for c in classes for _ in range(per_class)]
        scale = config.guidance_scale if guidance_scale is None else guidance_scale
        images = sample_in_batches(pipe, labels, guidance_scale=scale, **batches)
    else:
        labels = None
        images = sample_in_batches(pipe, num_images=per_class, **batches)
    grid = image_grid(images, cols=per_class)
    # Tiny images (8×8 digits) are enlarged with nearest neighbour so the grid is viewable.
    scale = max(1, 64 // images[0].height)
    if scale > 1:
        grid = grid.resize((grid.width * scale, grid.height * scale), resample=0)
    return images, labels, grid


def log_image(accelerator, grid, step: int, name: str = "samples"):
    import numpy as np

    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            tracker.writer.add_image(name, np.asarray(grid.convert("RGB")), step, dataformats="HWC")
        elif tracker.name == "wandb":
            import wandb

            tracker.log({name: [wandb.Image(grid)]}, step=step)


def append_metrics(output_dir: str, row: dict) -> None:
    with open(os.path.join(output_dir, "metrics.jsonl"), "a") as f:
        f.write(json.dumps(row) + "\n")


class LogHook(Hook):
    """Means of the running sums since the last log; `flops_per_sample` gives the MFU with `--peak_tflops`."""

    def __init__(self, flops_per_sample: float):
        self.flops_per_sample = flops_per_sample
        self.t0 = time.perf_counter()
        self.logged = False  # whether this step logged (PlotHook redraws then)

    def on_train_start(self, trainer: Trainer) -> None:
        self.t0 = time.perf_counter()

    def on_step_end(self, trainer: Trainer) -> None:
        config, acc, step = trainer.config, trainer.accelerator, trainer.state.global_step
        self.logged = is_due(step, config.logging_steps, trainer.max_train_steps)
        if not self.logged:
            return
        imgs_per_s = trainer.window["samples"] / (time.perf_counter() - self.t0)
        totals = trainer.sums.reduce(acc)
        micro_batches = totals.pop("micro_batches")
        logs = {
            "lr": trainer.lr_scheduler.get_last_lr()[0],
            "img_per_s": imgs_per_s,
            "epoch": trainer.state.epoch,
            "skipped_steps": trainer.state.skipped_steps,  # not applied: fp16 overflows and vetoes
            "nonfinite_steps": trainer.state.nonfinite_steps,  # of which the non-finite guard's
        }
        quartiles = totals.pop("loss_by_quartile")
        grad_norm = totals.pop("grad_norm", None)
        if micro_batches > 0:  # else every step since the last log was vetoed: no loss to average
            logs["loss"] = (totals.pop("loss") / micro_batches).item()
            logs.update({name: (value / micro_batches).item() for name, value in totals.items() if name != "loss"})
        if grad_norm is not None and trainer.window["applied"] > 0:
            # Every process clips the same all-reduced gradients: average over the applied steps only.
            logs["grad_norm"] = (grad_norm / acc.num_processes / trainer.window["applied"]).item()
        for k in range(4):
            if quartiles[1, k] > 0:
                logs[f"loss_q{k}"] = (quartiles[0, k] / quartiles[1, k]).item()
        if config.peak_tflops:
            logs["mfu"] = imgs_per_s * self.flops_per_sample / (config.peak_tflops * 1e12 * acc.num_processes)
        if torch.cuda.is_available():
            logs["peak_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
        acc.log(logs, step=step)
        trainer.progress.set_postfix(loss=f"{logs.get('loss', math.nan):.4f}", img_s=f"{imgs_per_s:.0f}")
        if acc.is_main_process:
            append_metrics(config.output_dir, {"step": step, **logs})
        trainer.window.update(sync=0, applied=0, samples=0)
        trainer.sums.reset()
        self.t0 = time.perf_counter()


class CheckpointHook(Hook):
    """A checkpoint when due, except while `guard` counts non-finite steps in a row: the weights that led into them
    are no state to return to."""

    def __init__(self, guard: "GuardHook | None" = None):
        self.guard = guard

    def on_step_end(self, trainer: Trainer) -> None:
        config, step = trainer.config, trainer.state.global_step
        if not is_due(step, config.checkpointing_steps, trainer.max_train_steps):
            return
        if self.guard is not None and self.guard.in_a_row:
            logger.warning("Step %d: not checkpointed during non-finite steps.", step)
            return
        from .training import prune_checkpoints

        path = trainer.save_checkpoint()
        if path is None:  # not finite: the older checkpoints stay as they are
            return
        if trainer.accelerator.is_main_process:
            keep = newest_finite_checkpoint(trainer.checkpoints_dir) if config.checkpoints_total_limit else None
            for removed in prune_checkpoints(trainer.checkpoints_dir, config.checkpoints_total_limit, keep=keep):
                logger.info("Removed old checkpoint %s", removed)
            if config.push_to_hub and config.push_checkpoints:
                from .hub import push_checkpoint

                push_checkpoint(path, config.hub_model_id, private=config.hub_private_repo)


class GuardHook(Hook):
    """The non-finite and stop-signal guard of `dit_hf.guards` as a hook. It decides and counts in `allow_update`, so
    every `on_step_end` of the step sees the counts; put it after the logs and checkpoints, as it acts after them: it
    stops or rolls back after `--max_nonfinite_steps`, and on a stop signal writes the step's checkpoint (unless
    [`CheckpointHook`] just did) and sets `trainer.stop`.

    Run the loop inside [`signals_handled`] and call [`finish`] after it: it raises [`NonFiniteStop`] when the final
    weights are not finite and [`Preempted`] after a stop signal (the exit statuses of `train_dit.py`).
    """

    def __init__(self, config):
        self.config = config
        self.signals = StopSignals(config.save_on_signal)
        self.guard: StepGuard | None = None  # made with the trainer's accelerator
        self.check = None  # this step's decision
        self.diverged = False  # --max_nonfinite_steps reached at this step
        self.stopped_by: str | None = None

    @property
    def in_a_row(self) -> int:
        return self.guard.in_a_row if self.guard is not None else 0

    @contextlib.contextmanager
    def signals_handled(self):
        """Stop signals only noted (the run stops after the step) inside; their usual effect outside."""
        self.signals.install()
        try:
            yield
        finally:
            self.signals.restore()

    def on_train_start(self, trainer: Trainer) -> None:
        config = self.config
        self.guard = StepGuard(trainer.accelerator, self.signals, config.max_nonfinite_steps, config.on_nonfinite)
        self.params = [p for module in trainer.trained_modules() for p in module.parameters()]

    def allow_update(self, trainer: Trainer, loss: torch.Tensor, grad_norm: torch.Tensor | None) -> bool:
        # The loss sums are finite when a step starts (a vetoed step's are put back): a non-finite one now is a
        # non-finite earlier micro-batch of this step. (Not the gradient norms: fp16 overflows are the scaler's.)
        for name, value in trainer.sums.sums.items():
            if name != "grad_norm":
                self.guard.observe_loss(value)
        self.guard.observe_loss(loss)
        if grad_norm is None:  # no clipping: the norm is still checked
            grad_norm = self.guard.grad_norm(self.params)
        # Non-finite loss or gradients on any process, or a stop signal: one decision for all (one host sync).
        self.check = self.guard.check(grad_norm)
        if self.check.skip:
            self.guard.skip_update()  # nothing reaches the weights, the optimizer state or the LR schedule
            trainer.state.nonfinite_steps += 1  # also counted in skipped_steps, as every vetoed step
        step = trainer.state.global_step + 1  # the optimizer step this decides
        self.diverged = self.guard.record(self.check, step, trainer.state.nonfinite_steps)
        return not self.check.skip

    def on_step_end(self, trainer: Trainer) -> None:
        state = trainer.state
        if self.diverged:  # raises NonFiniteStop, or rolls back to the last good checkpoint and goes on
            load_ema_state = functools.partial(load_ema, trainer.ema)
            self.guard.act_on_divergence(state.global_step, trainer.checkpoints_dir, trainer.lr_scheduler,
                                         self.config.rollback_lr_factor, load_ema_state)  # fmt: skip
            state.rollbacks += 1
        if self.check.stop:
            this_step = os.path.join(trainer.checkpoints_dir, f"checkpoint-{state.global_step}")
            if trainer.last_checkpoint != this_step:  # CheckpointHook wrote none at this step
                trainer.save_checkpoint()
            self.stopped_by = self.check.stop
            trainer.stop = True

    def finish(self, trainer: Trainer) -> None:
        """After the loop, on every process: raise if the weights are not finite or a signal stopped the run."""
        finite = trainer.weights_finite()
        # A barrier after the guard's all-reduces (of tensors made in Python): a gloo process group torn down while its
        # threads still release such a tensor can deadlock on the GIL at exit.
        trainer.accelerator.wait_for_everyone()
        if not finite:
            last_good = newest_finite_checkpoint(trainer.checkpoints_dir)
            fallback = (
                f"The last good checkpoint is {last_good}." if last_good else "No checkpoint has finite weights."
            )
            raise NonFiniteStop(
                f"The weights are not finite after step {trainer.state.global_step}: nothing exported. {fallback}"
            )
        if self.stopped_by is not None:
            raise Preempted(trainer.state.global_step, trainer.last_checkpoint, self.stopped_by)


class SampleGridHook(Hook):
    """A grid of EMA samples of `classes` (one row each), every `--validation_steps`, on the main process."""

    def __init__(self, sampling: Sampling, classes: list[int] | None):
        self.sampling = sampling
        self.classes = classes

    def on_step_end(self, trainer: Trainer) -> None:
        config, acc, step = trainer.config, trainer.accelerator, trainer.state.global_step
        if not (is_due(step, config.validation_steps) and acc.is_main_process):
            return
        pipe = self.sampling.pipeline(trainer.ema_model(0))
        _, _, grid = sample_grid(pipe, self.classes, config.num_samples_per_class, config, acc.device)
        os.makedirs(os.path.join(config.output_dir, "samples"), exist_ok=True)
        grid.save(os.path.join(config.output_dir, "samples", f"step-{step:07d}.png"))
        log_image(acc, grid, step)


def eval_reference(config) -> str:
    return config.eval_reference or config.train_data_dir or config.dataset_name or "digits"


def load_evaluator(config, device, labelled: bool) -> dict:
    """The Inception network, the reference statistics and (for labelled data) the class probe, each computed once
    and cached on disk (keyed by the data and the network): later runs reuse them."""
    from .class_probe import fit_class_probe
    from .metrics import InceptionExtractor, NoLabelsError, reference_stats

    extractor = InceptionExtractor(path=config.inception, device=device)
    reference = eval_reference(config)
    # Real images are cropped and resized like the training data; digits and .npz are as stored.
    resolution = None if reference == "digits" or reference.endswith(".npz") else config.resolution
    stats = reference_stats(reference, extractor, resolution=resolution)
    probe = None
    if labelled:
        try:
            probe = fit_class_probe(reference, extractor, resolution=resolution, features=stats)
        except NoLabelsError as err:
            logger.warning("No class-consistency probe: %s", err)
    return {"extractor": extractor, "reference": stats, "probe": probe}


def evaluate_pipeline(pipe, config, num_classes: int, device, evaluator: dict) -> dict:
    """FID, precision/recall and class consistency (the probe of the real images; on digits also the digits SVM) of
    `config.eval_samples` class-balanced samples; same seed every time."""
    import numpy as np

    from .evaluation import sample_in_batches
    from .metrics import evaluate_samples

    pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    generator = torch.Generator().manual_seed(config.seed + 1)
    labels = [i % num_classes for i in range(config.eval_samples)] if num_classes else None
    call = dict(batch_size=config.eval_batch_size, num_inference_steps=config.num_inference_steps,
                generator=generator)  # fmt: skip
    if labels:
        images = sample_in_batches(pipe, labels, guidance_scale=config.guidance_scale, output_type="np", **call)
    else:
        images = sample_in_batches(pipe, num_images=config.eval_samples, output_type="np", **call)
    images = (np.asarray(images) * 255).round().clip(0, 255).astype(np.uint8)
    probe = evaluator["probe"] if labels else None
    result = evaluate_samples(
        images, evaluator["reference"], extractor=evaluator["extractor"], labels=labels, class_probe=probe
    )
    metrics = {k: result[k] for k in ("fid", "precision", "recall")}
    if probe is not None:
        metrics["class_accuracy"] = result["class_accuracy"]
        metrics["probe_held_out_accuracy"] = result["probe_held_out_accuracy"]
    if eval_reference(config) == "digits" and labels is not None:
        from .evaluation import digits_accuracy

        metrics["digits_accuracy"] = digits_accuracy(images, labels)
    return metrics


class EvalHook(Hook):
    """FID and friends of EMA samples every `--eval_steps` and at the last step; `last` keeps the latest scores."""

    def __init__(self, sampling: Sampling, num_classes: int):
        self.sampling = sampling
        self.num_classes = num_classes
        self.evaluator = None  # loaded at the first evaluation
        self.last = None
        self.evaluated = False

    def on_step_end(self, trainer: Trainer) -> None:
        config, acc, step = trainer.config, trainer.accelerator, trainer.state.global_step
        self.evaluated = bool(config.eval_steps) and is_due(step, config.eval_steps, trainer.max_train_steps)
        if not self.evaluated:
            return
        if acc.is_main_process:
            if self.evaluator is None:
                self.evaluator = load_evaluator(config, acc.device, labelled=self.num_classes > 0)
            pipe = self.sampling.pipeline(trainer.ema_model(0))
            scores = evaluate_pipeline(pipe, config, self.num_classes, acc.device, self.evaluator)
            self.last = {"step": step, **scores}
            logger.info("Evaluation at step %d: %s", step, scores)
            acc.log({f"eval/{k}": v for k, v in scores.items() if v is not None}, step)
            append_metrics(config.output_dir, {"step": step, **{f"eval/{k}": v for k, v in scores.items()}})
        acc.wait_for_everyone()


class PlotHook(Hook):
    """Redraw plots/*.png from metrics.jsonl: at evaluations and the end, after other logs at most every `every_s`
    seconds (a redraw costs about 50 ms per changed figure, which at every log step would slow a small CPU run by a
    tenth)."""

    def __init__(self, log: LogHook, evaluation: EvalHook, every_s: float = 30.0):
        self.log, self.evaluation, self.every_s = log, evaluation, every_s
        self.last = -math.inf

    def refresh(self, output_dir: str, force: bool = False) -> None:
        from .plots import write_plots

        now = time.monotonic()
        if force or now - self.last >= self.every_s:
            write_plots(output_dir)
            self.last = now

    def on_step_end(self, trainer: Trainer) -> None:
        if trainer.accelerator.is_main_process and (self.log.logged or self.evaluation.evaluated):
            self.refresh(trainer.config.output_dir, force=self.evaluation.evaluated)

    def on_train_end(self, trainer: Trainer) -> None:
        if trainer.accelerator.is_main_process:
            self.refresh(trainer.config.output_dir, force=True)


def setup_trackers(record: dict, accelerator) -> None:
    """Start the trackers of `--report_to` with the run's resolved config (`record`); wandb without a key logs to
    disk."""
    report_to, output_dir = record["report_to"], record["output_dir"]
    if report_to == "none":
        return
    init_kwargs = {}
    if report_to in ("wandb", "all"):
        try:
            import wandb  # noqa: F401
        except ImportError as err:
            raise ValueError(
                "--report_to wandb needs `pip install wandb` (or use --report_to tensorboard|none)."
            ) from err
        from .training import wandb_has_credentials

        # Passed to wandb.init rather than set in os.environ: the caller's environment is not ours to change.
        init_kwargs["wandb"] = {"dir": os.environ.get("WANDB_DIR") or output_dir}
        if not os.environ.get("WANDB_MODE") and not wandb_has_credentials():
            # No key: log to disk instead of failing or waiting for a login prompt.
            init_kwargs["wandb"]["mode"] = "offline"
            logger.info(
                "wandb: no API key found, logging offline under %s; upload later with `wandb sync %s`",
                os.path.join(output_dir, "wandb"),
                os.path.join(output_dir, "wandb", "offline-run-*"),
                main_process_only=True,
            )
    config = {k: v for k, v in record.items() if isinstance(v, (int, float, str, bool))}
    accelerator.init_trackers(record["tracker_project_name"], config=config, init_kwargs=init_kwargs)
