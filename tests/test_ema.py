import json
import os

import pytest
import torch
from conftest import tiny_dit
from torch import nn

from dit_hf import DiTModel
from dit_hf.ema import EMA_STATE, EMAModels, load_ema, parse_ema_decays, save_ema


def tiny_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Linear(3, 2)


def param_sequence(model: nn.Module, steps: int, seed: int = 1) -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    return [
        {name: torch.randn(p.shape, generator=generator, dtype=torch.float64) for name, p in model.named_parameters()}
        for _ in range(steps)
    ]


@torch.no_grad()
def set_params(model: nn.Module, values: dict[str, torch.Tensor]) -> None:
    for name, p in model.named_parameters():
        p.copy_(values[name])


def closed_form(p0: torch.Tensor, steps: list[torch.Tensor], decay: float) -> torch.Tensor:
    # ema_k = d^k p_0 + sum_j (1 - d) d^(k - j) p_j
    k = len(steps)
    return decay**k * p0 + sum((1 - decay) * decay ** (k - j) * p for j, p in enumerate(steps, start=1))


def averages(ema: EMAModels, index: int) -> dict[str, torch.Tensor]:
    return ema.state_dict()["averages"][index]


def test_two_rates_match_the_closed_form():
    model = tiny_model()
    p0 = {name: p.detach().double().clone() for name, p in model.named_parameters()}
    ema = EMAModels(model, "0.5,0.9")
    single = EMAModels(model, 0.9)
    sequence = param_sequence(model, steps=5)
    for values in sequence:
        set_params(model, values)
        ema.update(model)
        single.update(model)
    assert ema.num_updates == 5 and ema.decays == [0.5, 0.9]
    for index, decay in enumerate(ema.decays):
        for name, average in averages(ema, index).items():
            expected = closed_form(p0[name], [values[name] for values in sequence], decay)
            torch.testing.assert_close(average.double(), expected, rtol=0, atol=1e-6)
    # The rates are independent: the 0.9 average does not depend on the 0.5 one sharing the object.
    for name, average in averages(single, 0).items():
        assert torch.equal(average, averages(ema, 1)[name])


def test_bf16_model_keeps_float32_averages():
    model = tiny_model().to(torch.bfloat16)
    with torch.no_grad():
        model.weight.fill_(1.0)
    ema = EMAModels(model, 0.9999)
    assert all(t.dtype == torch.float32 for t in averages(ema, 0).values())
    with torch.no_grad():
        model.weight.fill_(1.0 + 2**-7)  # the next bf16 value after 1.0
    ema.update(model)
    # 1 + 1e-4 * 2^-7 rounds back to 1.0 in bf16 but not in float32.
    expected = torch.full((2, 3), 1.0 + 1e-4 * 2**-7, dtype=torch.float64)
    torch.testing.assert_close(averages(ema, 0)["weight"].double(), expected, rtol=0, atol=1e-7)
    assert (averages(ema, 0)["weight"] > 1.0).all()

    averaged = ema.averaged_model(model)
    assert averaged.weight.dtype == torch.float32 and model.weight.dtype == torch.bfloat16
    assert torch.equal(averaged.weight, averages(ema, 0)["weight"])
    assert not averaged.weight.requires_grad and not averaged.training

    ema.copy_to(model)  # cast back to the model's dtype
    assert torch.equal(model.weight, averages(ema, 0)["weight"].to(torch.bfloat16))


def test_state_dict_round_trip_continues_identically(tmp_path):
    model = tiny_model()
    ema = EMAModels(model, [0.9, 0.99])
    sequence = param_sequence(model, steps=5)
    for values in sequence[:3]:
        set_params(model, values)
        ema.update(model)
    torch.save(ema.state_dict(), tmp_path / "ema.pt")

    resumed = EMAModels(tiny_model(seed=7), "0.9,0.99")  # different starting weights, overwritten by the load
    resumed.load_state_dict(torch.load(tmp_path / "ema.pt", weights_only=True))
    assert resumed.num_updates == 3
    for values in sequence[3:]:
        set_params(model, values)
        ema.update(model)
        resumed.update(model)
    assert resumed.num_updates == ema.num_updates == 5
    for index in range(2):
        for name, average in averages(ema, index).items():
            assert torch.equal(averages(resumed, index)[name], average)


def test_load_state_dict_refuses_other_decays_or_models():
    state = EMAModels(tiny_model(), "0.9,0.99").state_dict()
    with pytest.raises(ValueError, match=r"differ from --ema_decay \[0\.9999\]; resume with --ema_decay 0\.9,0\.99"):
        EMAModels(tiny_model(), 0.9999).load_state_dict(state)
    with pytest.raises(ValueError, match="different model"):
        EMAModels(nn.Linear(3, 2, bias=False), "0.9,0.99").load_state_dict(state)


def test_averaged_model_holds_the_average_and_leaves_the_model_alone():
    model = tiny_model()
    ema = EMAModels(model, "0.5,0.8")
    for values in param_sequence(model, steps=3):
        set_params(model, values)
        ema.update(model)
    current = {name: p.detach().clone() for name, p in model.named_parameters()}
    for index in range(2):
        averaged = ema.averaged_model(model, index=index)
        for name, p in averaged.named_parameters():
            assert torch.equal(p, averages(ema, index)[name])
            assert not torch.equal(p, current[name])
    for name, p in model.named_parameters():
        assert torch.equal(p, current[name])
    with pytest.raises(ValueError, match="EMA index 2 is out of range"):
        ema.averaged_model(model, index=2)


def test_buffers_are_copied_not_averaged():
    model = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2))
    model.register_buffer("scratch", torch.zeros(2), persistent=False)
    ema = EMAModels(model, 0.9)
    assert set(ema.state_dict()["buffers"]) == {"1.running_mean", "1.running_var", "1.num_batches_tracked"}
    model[1].running_mean.fill_(4.0)
    model[1].num_batches_tracked.fill_(7)
    ema.update(model)
    fresh = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2))
    ema.copy_to(fresh)
    assert torch.equal(fresh[1].running_mean, torch.full((2,), 4.0))
    assert fresh[1].num_batches_tracked.item() == 7


def test_wrapped_models_are_refused():
    model = tiny_model()
    ema = EMAModels(model, 0.9)
    with pytest.raises(ValueError, match=r"unwrap_model.*module\."):
        ema.update(nn.Sequential(model))  # names "0.weight", like DDP's "module.weight"
    compiled = nn.Module()
    compiled._orig_mod = model  # how torch.compile's wrapper names the parameters, without importing dynamo
    with pytest.raises(ValueError, match="_orig_mod"):
        ema.update(compiled)
    assert ema.to("cpu") is ema and ema.num_updates == 0


def test_parse_ema_decays():
    assert parse_ema_decays("0.9999") == [0.9999]
    assert parse_ema_decays(" 0.999, 0.9999 ") == [0.999, 0.9999]
    assert parse_ema_decays(0.5) == [0.5]
    assert parse_ema_decays([0, "0.9"]) == [0.0, 0.9]
    for spec, message in [
        ("1.0", r"must lie in \[0, 1\), got 1\.0"),
        ("-0.1", r"must lie in \[0, 1\)"),
        ("nan", r"must lie in \[0, 1\)"),
        ("0.9,abc", "'abc' is not a number"),
        ("0.9,", "'' is not a number"),
        ("0.9,0.90", "repeats a decay"),
        ([], "gives no decay"),
    ]:
        with pytest.raises(ValueError, match="--ema_decay .*" + message):
            parse_ema_decays(spec)


def trained_ema(decays: str, steps: int = 3) -> tuple[nn.Module, EMAModels]:
    model = tiny_dit()
    ema = EMAModels(model, decays)
    for values in param_sequence(model, steps=steps):
        set_params(model, values)
        ema.update(model)
    return model, ema


def test_save_and_load_ema_restore_the_state_exactly_without_pickles(tmp_path):
    model, ema = trained_ema("0.5,0.9")
    save_ema(ema, str(tmp_path), lambda i: ema.averaged_model(model, i))
    assert sorted(os.listdir(tmp_path)) == ["ema_0.5", "ema_0.9", EMA_STATE]
    assert json.loads((tmp_path / EMA_STATE).read_text()) == {"decays": [0.5, 0.9], "num_updates": 3}
    # Each average is a diffusers folder holding exactly that average.
    reloaded = DiTModel.from_pretrained(tmp_path / "ema_0.9")
    for name, p in reloaded.named_parameters():
        assert torch.equal(p, averages(ema, 1)[name])

    resumed = EMAModels(tiny_dit(seed=7), "0.5,0.9")
    load_ema(resumed, str(tmp_path))
    assert resumed.num_updates == 3
    for index in range(2):
        for name, average in averages(ema, index).items():
            assert torch.equal(averages(resumed, index)[name], average)


def test_load_ema_refuses_other_decays_and_missing_state(tmp_path):
    model, ema = trained_ema("0.5,0.9")
    save_ema(ema, str(tmp_path), lambda i: ema.averaged_model(model, i))
    with pytest.raises(ValueError, match=r"resume with --ema_decay 0\.5,0\.9"):
        load_ema(EMAModels(tiny_dit(), "0.9999"), str(tmp_path))
    (tmp_path / EMA_STATE).unlink()
    with pytest.raises(FileNotFoundError, match=f"{EMA_STATE} is missing"):
        load_ema(EMAModels(tiny_dit(), "0.5,0.9"), str(tmp_path))
    # A checkpoint written before ema_state.json: the averages come from the folders, the count from the caller.
    resumed = EMAModels(tiny_dit(seed=7), "0.5,0.9")
    load_ema(resumed, str(tmp_path), num_updates=3)
    assert resumed.num_updates == 3
    assert all(torch.equal(averages(resumed, 0)[name], t) for name, t in averages(ema, 0).items())
    with pytest.raises(FileNotFoundError, match="ema_0.99 is missing"):
        load_ema(EMAModels(tiny_dit(), "0.5,0.99"), str(tmp_path), num_updates=3)
