"""FP8 training matmuls (torchao Float8Linear): which layers convert, numerics, the trainer and the benchmark.

On a CPU torchao emulates the FP8 casts and `torch._scaled_mm`, so every test here runs the real FP8 arithmetic
(e4m3 inputs and weights, e5m2 output gradients, per-tensor scales), only slowly; speed is for bench/ on a GPU.
"""

import copy
import importlib.util
import os
import sys

import pytest
import torch
from conftest import tiny_dit

from dit_hf import DiTModel, DiTPipeline
from dit_hf.fp8 import (
    check_fp8_available,
    convert_to_fp8,
    count_fp8_linears,
    dit_fp8_module_filter,
    is_fp8_linear,
    strip_fp8,
)

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench")


def reset_accelerate():
    # accelerate keeps the first Accelerator's mixed precision for the life of the process: a later run (or test)
    # would inherit fp8.
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    reset_accelerate()
    yield
    reset_accelerate()


def run(output_dir, *extra):
    from test_train import run as run_trainer

    reset_accelerate()
    return run_trainer(output_dir, *extra)


def without_torchao(monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "torchao" else real_find_spec(name, *a)
    )


def fp8_names(model) -> set[str]:
    return {name for name, module in model.named_modules() if is_fp8_linear(module)}


def test_only_the_token_wise_layers_of_the_blocks_convert():
    model = convert_to_fp8(tiny_dit(hidden_size=64, num_heads=4))
    layers = {f"blocks.{i}.{name}" for i in range(2) for name in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")}
    assert fp8_names(model) == layers
    assert count_fp8_linears(model) == (8, 14)  # + 2 timestep-MLP, 2 adaLN, final linear and final adaLN

    # SwiGLU + DDT head: the head's MLP (96 -> 2×256 -> 96) converts; the trunk's (64 -> 2×170 -> 64) has widths
    # that are not multiples of 16, which torch._scaled_mm refuses, and stays in bf16.
    options = dict(hidden_size=64, num_heads=4, mlp_type="swiglu", head_depth=1, head_hidden_size=96, head_num_heads=4)
    model = convert_to_fp8(tiny_dit(**options))
    expected = {f"blocks.{i}.{name}" for i in range(2) for name in ("attn.qkv", "attn.proj")}
    expected |= {f"head_blocks.0.{name}" for name in ("attn.qkv", "attn.proj", "mlp.w12", "mlp.w3")}
    assert fp8_names(model) == expected
    assert not any("adaLN" in n or "embedder" in n or "final" in n or n == "head_cond_proj" for n in fp8_names(model))


def test_filter_rejects_other_modules_and_non_multiples_of_16():
    assert dit_fp8_module_filter(torch.nn.Linear(64, 192), "blocks.3.attn.qkv")
    assert not dit_fp8_module_filter(torch.nn.Linear(64, 200), "blocks.3.attn.qkv")  # 200 % 16 != 0
    assert not dit_fp8_module_filter(torch.nn.Linear(64, 384), "blocks.3.adaLN_modulation.1")
    assert not dit_fp8_module_filter(torch.nn.Linear(64, 64), "final_layer.linear")
    assert not dit_fp8_module_filter(torch.nn.LayerNorm(64), "blocks.3.attn.qkv")


def test_fp8_forward_and_gradients_stay_close_to_full_precision():
    reference = tiny_dit(hidden_size=64, num_heads=4)  # eval mode: no random label dropout between the two passes
    model = convert_to_fp8(copy.deepcopy(reference))
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 3, 8, 8, generator=g)
    t, y = torch.tensor([1, 250, 500, 999]), torch.tensor([0, 3, 5, 9])
    outputs = []
    for m in (reference, model):
        out = m(x, t, y).sample
        out.square().mean().backward()
        outputs.append(out)

    def rel(a, b):
        return ((a - b).norm() / b.norm()).item()

    # FP8 changes the numbers (the layers really run in FP8), by its rounding only: e4m3 keeps 3 mantissa bits, the
    # e5m2 output gradients 2. Measured: 3.7% on the output, at most 7.5% on a gradient; a wrong scale gives ~100%.
    assert 1e-3 < rel(outputs[1], outputs[0]) < 0.1
    for (name, p_ref), p in zip(reference.named_parameters(), model.parameters()):
        assert rel(p.grad, p_ref.grad) < 0.15, name


def test_strip_fp8_gives_back_plain_layers_with_the_same_parameters():
    reference = tiny_dit(hidden_size=64, num_heads=4)
    model = convert_to_fp8(copy.deepcopy(reference))
    params = [p for p in model.parameters()]
    strip_fp8(model)
    assert count_fp8_linears(model) == (0, 14)
    assert all(a is b for a, b in zip(params, model.parameters()))
    x, t, y = torch.randn(2, 3, 8, 8), torch.tensor([10, 900]), torch.tensor([1, 2])
    with torch.no_grad():
        assert torch.equal(model(x, t, y).sample, reference(x, t, y).sample)
    assert model.state_dict().keys() == reference.state_dict().keys()


def test_missing_torchao_and_old_gpus_are_refused_with_the_fix(monkeypatch):
    without_torchao(monkeypatch)
    with pytest.raises(ImportError, match="pip install torchao"):
        check_fp8_available()
    monkeypatch.undo()

    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A100-SXM4-80GB")
    with pytest.raises(ValueError, match=r"A100.*8\.0.*--mixed_precision bf16"):
        check_fp8_available(torch.device("cuda"))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    check_fp8_available(torch.device("cuda"))  # an H100 passes


# ---- the trainer ---------------------------------------------------------------------------------------------


def test_fp8_training_saves_plain_folders_and_resumes_exactly(tmp_path, monkeypatch, caplog):
    from test_train import final_weights, losses

    from dit_hf import hooks

    common = ["--checkpointing_steps", "2", "--mixed_precision", "fp8"]
    sampled_with = []  # the transformers that the trainer's validation and final samples ran

    def make_pipeline(transformer, *a):
        sampled_with.append(count_fp8_linears(transformer))
        return real_make_pipeline(transformer, *a)

    real_make_pipeline = hooks.make_pipeline
    monkeypatch.setattr(hooks, "make_pipeline", make_pipeline)
    with caplog.at_level("INFO"):
        run(tmp_path / "fp8", "--max_train_steps", "4", "--validation_steps", "2", *common)
    assert "FP8 matmuls in 8 of the model's 14 linear layers" in caplog.text
    # Samples come from plain layers, as a user who loads the saved folder gets them, not from FP8 ones.
    assert sampled_with == [(0, 14)] * 3  # validation at steps 0 and 2, final samples
    monkeypatch.undo()
    run(tmp_path / "fp32", "--max_train_steps", "4", "--checkpointing_steps", "2")
    fp8_losses, fp32_losses = losses(tmp_path / "fp8"), losses(tmp_path / "fp32")
    assert fp8_losses.keys() == fp32_losses.keys()
    # Same data and noise: the losses differ by FP8 rounding only.
    assert fp8_losses != fp32_losses
    assert all(abs(fp8_losses[k] - fp32_losses[k]) < 0.05 * fp32_losses[k] for k in fp8_losses)

    # The saved pipeline and checkpoints hold plain DiT weights: they load and sample without torchao layers.
    pipe = DiTPipeline.from_pretrained(tmp_path / "fp8")
    assert count_fp8_linears(pipe.transformer)[0] == 0
    raw = DiTModel.from_pretrained(tmp_path / "fp8" / "checkpoints" / "checkpoint-4" / "transformer")
    assert raw.state_dict().keys() == pipe.transformer.state_dict().keys()

    # Interrupted at step 2 and resumed: the same run, bit for bit.
    run(tmp_path / "split", "--max_train_steps", "2", *common)
    run(tmp_path / "split", "--max_train_steps", "4", "--resume_from_checkpoint", "latest", *common)
    assert losses(tmp_path / "split") == fp8_losses
    a, b = final_weights(tmp_path / "fp8"), final_weights(tmp_path / "split")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_fp8_from_the_accelerate_config_and_bad_setups(tmp_path, monkeypatch, caplog):
    from test_train import TINY_ARGS

    import train_dit

    # `accelerate launch` with mixed_precision: fp8 in its config sets this variable; the trainer follows it.
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "fp8")
    tracked = []
    real_setup_trackers = train_dit.setup_trackers
    monkeypatch.setattr(
        train_dit,
        "setup_trackers",
        lambda record, acc: tracked.append(record["mixed_precision"]) or real_setup_trackers(record, acc),
    )
    with caplog.at_level("INFO"):
        run(tmp_path / "env", "--max_train_steps", "1")
    assert "FP8 matmuls in 8 of" in caplog.text
    assert tracked == ["fp8"]  # the trackers' config (and the Hub card) record the precision in effect
    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION")

    without_torchao(monkeypatch)
    with pytest.raises(ImportError, match="dit-hf\\[fp8\\]"):
        train_dit.parse_args([*TINY_ARGS, "--output_dir", str(tmp_path / "x"), "--mixed_precision", "fp8"])


# ---- the benchmark -------------------------------------------------------------------------------------------


def test_bench_train_fp8_converts_the_same_layers_in_both_models(tmp_path):
    sys.path.insert(0, BENCH)
    import bench_train

    args = bench_train.parse_args(["--batch_size", "2", "--precision", "bf16", "--fp8", "dit-hf,diffusers"])
    models = bench_train.build_models(args)
    for model in models.values():
        bench_train.make_step(args, model, "eager")()
    ours, theirs = models["dit-hf"], models["diffusers"]
    # dit-hf's fused qkv is diffusers' to_q/to_k/to_v: 4 layers per block there, 6 in diffusers.
    depth = ours.config.depth
    assert count_fp8_linears(ours)[0] == 4 * depth and count_fp8_linears(theirs)[0] == 6 * depth
    assert not any("norm1" in n for n, m in theirs.named_modules() if is_fp8_linear(m))

    payload = bench_train.main(
        ["--batch_size", "2", "--precision", "bf16", "--fp8", "dit-hf", "--warmup", "1", "--repeats", "1"]
        + ["--out", str(tmp_path / "t.json")]
    )
    rows = {r["impl"]: r for r in payload["results"]}
    assert rows["dit-hf"]["fp8_layers"] == 4 * depth and rows["diffusers"]["fp8_layers"] == 0
    assert payload["settings"]["fp8"] == ["dit-hf"]
    assert "FP8 matmuls in the blocks of dit-hf" in (tmp_path / "t.md").read_text()

    with pytest.raises(SystemExit, match="--precision bf16"):
        bench_train.parse_args(["--fp8", "dit-hf", "--precision", "fp32"])
    with pytest.raises(SystemExit, match="unknown implementation"):
        bench_train.parse_args(["--fp8", "ours", "--precision", "bf16"])
