"""Make chosen optimizer steps of train_dit.py non-finite, for the fault tests.

In a test: `install(monkeypatch.setattr, {2, 3})`. As a launcher (e.g. under torchrun):
`NONFINITE_STEPS=2,3 NONFINITE_RANK=1 python tests/inject_nonfinite.py <train_dit.py arguments>`.
A forward hook multiplies the model's output by NaN on the listed 1-based optimizer steps (on every process, or only
on process `rank`); the step comes from the trainer's own `StepRandomness.rows(step, ...)` call, so it counts across
a resume.
"""

import os
import runpy
import sys

import dit_hf.training
from dit_hf import DiTModel

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def install(set_attribute, steps: set[int], rank: int | None = None, module=dit_hf.training) -> dict:
    """Patch `module.StepRandomness` and `DiTModel.from_preset` with `set_attribute` (setattr or monkeypatch's)."""
    current = {"step": 0, "weights": {}}
    real_randomness, real_from_preset = module.StepRandomness, DiTModel.from_preset

    class Recording(real_randomness):
        def rows(self, step, offset, batch_size):
            current["step"] = step + 1  # draws for step `step` (0-based) are made as optimizer step step + 1 starts
            return super().rows(step, offset, batch_size)

    def poison(layer, inputs, output):
        if current["step"] in steps and (rank is None or int(os.environ.get("RANK", "0")) == rank):
            return output * float("nan")

    def snapshot(model, args, kwargs):
        # The weights each step starts from (first micro-batch of the step), to check what skipped steps left.
        current["weights"].setdefault(current["step"], {k: v.detach().clone() for k, v in model.state_dict().items()})

    def from_preset(name, **overrides):
        model = real_from_preset(name, **overrides)
        model.final_layer.register_forward_hook(poison)
        model.register_forward_pre_hook(snapshot, with_kwargs=True)
        return model

    set_attribute(module, "StepRandomness", Recording)
    set_attribute(DiTModel, "from_preset", from_preset)
    return current


if __name__ == "__main__":
    rank = os.environ.get("NONFINITE_RANK")
    install(setattr, {int(s) for s in os.environ["NONFINITE_STEPS"].split(",")}, None if rank is None else int(rank))
    sys.argv = [os.path.join(ROOT, "train_dit.py"), *sys.argv[1:]]
    runpy.run_path(sys.argv[0], run_name="__main__")
