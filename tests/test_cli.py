"""`dit-hf sample`: a PNG grid from a saved pipeline."""

from pathlib import Path

import PIL.Image
import pytest
from conftest import ddpm_scheduler, make_pipe, tiny_dit

from dit_hf.cli import main


def sample_args(folder, out, *extra):
    return ["sample", str(folder), "--steps", "2", "--out", str(out), *extra]


def test_sample_writes_a_deterministic_grid(saved_pipeline, tmp_path):
    first, second = tmp_path / "a.png", tmp_path / "nested" / "b.png"
    extra = ("--labels", "1", "2", "3", "--scheduler", "ddim", "--scale", "2", "--seed", "3")
    assert main(sample_args(saved_pipeline, first, *extra)) == str(first)
    main(sample_args(saved_pipeline, second, *extra))
    with PIL.Image.open(first) as grid:
        # 3 images -> 2 columns x 2 rows of 8 x 8 samples, upscaled 2x.
        assert grid.size == (2 * 8 * 2, 2 * 8 * 2) and grid.mode == "RGB"
        assert grid.getextrema() != ((0, 0), (0, 0), (0, 0))
        # The missing 4th image leaves its cell black; the 3 samples are not.
        assert grid.crop((16, 16, 32, 32)).getextrema() == ((0, 0), (0, 0), (0, 0))
    assert first.read_bytes() == second.read_bytes()

    other_seed = tmp_path / "c.png"
    main(sample_args(saved_pipeline, other_seed, *extra[:-1], "4"))
    assert other_seed.read_bytes() != first.read_bytes()


def test_sample_with_label_names(saved_pipeline, tmp_path, capsys):
    by_name, by_id = tmp_path / "names.png", tmp_path / "ids.png"
    main(sample_args(saved_pipeline, by_name, "--labels", "tabby cat", "goldfish", "--cols", "1"))
    main(sample_args(saved_pipeline, by_id, "--labels", "0", "2", "--cols", "1"))
    assert by_name.read_bytes() == by_id.read_bytes()
    with PIL.Image.open(by_name) as grid:
        assert grid.size == (8, 16)
    assert "wrote 2 samples" in capsys.readouterr().out


def test_bad_label_name_exits_with_the_valid_names(saved_pipeline, tmp_path, capsys):
    out = tmp_path / "never.png"
    with pytest.raises(SystemExit) as exit_info:
        main(sample_args(saved_pipeline, out, "--labels", "1", "platypus"))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "'platypus'" in err and all(f"'{name}'" in err for name in ("tabby", "golden retriever", "goldfish"))
    assert not out.exists()


def test_dpm_scheduler_on_4_channel_latents(tmp_path):
    # The saved DDPM config has variance_type="learned_range", which DPM-Solver reads as "keep 3 noise channels".
    folder, out = tmp_path / "pipe", tmp_path / "dpm.png"
    make_pipe(tiny_dit(in_channels=4)).save_pretrained(folder)
    main(sample_args(folder, out, "--labels", "1", "2", "--scheduler", "dpm"))
    with PIL.Image.open(out) as grid:
        # No VAE: the 4 latent channels become an RGBA image.
        assert grid.size == (16, 8) and grid.mode == "RGBA"
        assert grid.getextrema()[0] != (0, 0)


def test_scheduler_family_follows_the_objective(tmp_path, capsys):
    from dit_hf import DiTPipeline
    from dit_hf.objective import make_objective, make_scheduler

    folder = tmp_path / "flow"
    pipe = DiTPipeline(tiny_dit(learn_sigma=False), make_scheduler(make_objective("flow")), objective="flow")
    pipe.save_pretrained(folder)
    for family in ("euler", "heun"):
        out = tmp_path / f"{family}.png"
        main(sample_args(folder, out, "--labels", "1", "2", "--scheduler", family))
        assert out.is_file()
    # A DDPM family cannot sample a flow model: refused with the families that can.
    with pytest.raises(SystemExit) as exit_info:
        main(sample_args(folder, tmp_path / "never.png", "--labels", "1", "--scheduler", "ddim"))
    assert exit_info.value.code == 2
    assert "'ddim'" in capsys.readouterr().err


def test_console_script_exits_with_status_0(saved_pipeline, tmp_path, monkeypatch):
    import configparser
    import importlib

    config = configparser.ConfigParser()
    config.read(Path(__file__).resolve().parents[1] / "setup.cfg")
    target = config["options.entry_points"]["console_scripts"].split("=", 1)[1].strip()
    module, function = target.split(":")
    entry = getattr(importlib.import_module(module), function)
    out = tmp_path / "grid.png"
    monkeypatch.setattr("sys.argv", ["dit-hf", *sample_args(saved_pipeline, out, "--labels", "1")])
    # A console script passes the return value to sys.exit: anything but 0/None would be a failure status.
    assert entry() in (0, None) and out.is_file()


def test_sample_uses_the_saved_sampling_defaults(tmp_path):
    from dit_hf import DiTPipeline

    folder = tmp_path / "pipe"
    DiTPipeline(
        tiny_dit(), ddpm_scheduler(), default_num_inference_steps=2, default_guidance_scale=1.0
    ).save_pretrained(folder)
    saved, explicit, other = tmp_path / "saved.png", tmp_path / "explicit.png", tmp_path / "other.png"
    main(["sample", str(folder), "--labels", "1", "2", "--out", str(saved)])
    main(
        ["sample", str(folder), "--labels", "1", "2", "--steps", "2", "--guidance_scale", "1", "--out", str(explicit)]
    )
    main(["sample", str(folder), "--labels", "1", "2", "--steps", "2", "--guidance_scale", "4", "--out", str(other)])
    assert saved.read_bytes() == explicit.read_bytes() != other.read_bytes()


@pytest.mark.parametrize("scale", ["nan", "inf"])
def test_sample_refuses_a_non_finite_guidance_scale(saved_pipeline, tmp_path, capsys, scale):
    with pytest.raises(SystemExit) as exit_info:
        main(sample_args(saved_pipeline, tmp_path / "g.png", "--labels", "1", "--guidance_scale", scale))
    assert exit_info.value.code == 2
    assert f"`guidance_scale` must be a finite number >= 0, got {scale}" in capsys.readouterr().err
    assert not (tmp_path / "g.png").exists()
