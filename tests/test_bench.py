"""The benchmark scripts run on CPU (tiny configs) and write what the README table needs."""

import json
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"
sys.path.insert(0, str(BENCH))


def test_bench_train_compares_both_models_on_the_same_step(tmp_path):
    import bench_train

    out = tmp_path / "train.json"
    payload = bench_train.main(["--batch_size", "4", "--warmup", "1", "--repeats", "2", "--out", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(payload))
    assert (tmp_path / "train.md").read_text().startswith("Training step, DiT-S/2")
    results = {r["impl"]: r for r in payload["results"]}
    assert set(results) == {"dit-hf", "diffusers"}
    # Same weights, but diffusers' blocks each own a timestep/label embedder: more parameters.
    assert results["diffusers"]["params_m"] > results["dit-hf"]["params_m"]
    ratio = results["dit-hf"]["img_per_s"] / results["diffusers"]["img_per_s"]
    assert payload["ratios"]["dit-hf/diffusers eager"] == pytest.approx(ratio)
    assert payload["environment"]["torch"] and payload["settings"]["precision"] == "fp32"


def test_bench_sample_pipelines_agree(tmp_path):
    import bench_sample

    payload = bench_sample.main(
        ["--batch_size", "2", "--steps", "3", "--warmup", "0", "--repeats", "1", "--out", str(tmp_path / "s.json")]
    )
    # Same weights, noise and DDIM steps with guidance: the two pipelines' images agree to float32 rounding.
    assert payload["max_diff"]["eager"] < 1e-4
    assert {r["impl"] for r in payload["results"]} == {"dit-hf", "diffusers"}
    assert all(r["images_per_s"] > 0 for r in payload["results"])


def test_bench_loader_reports_ratio_to_training(tmp_path):
    import bench_loader

    train = tmp_path / "train.json"
    train.write_text(json.dumps({"results": [{"impl": "dit-hf", "img_per_s": 100.0}]}))
    payload = bench_loader.main(
        [
            "--num_samples",
            "64",
            "--latent_size",
            "4",
            "--batch_size",
            "16",
            "--num_workers",
            "0",
            "--batches",
            "3",
            "--train_json",
            str(train),
            "--out",
            str(tmp_path / "loader.json"),
        ]
    )
    best = max(r["img_per_s"] for r in payload["results"])
    assert payload["loader_over_train"] == pytest.approx(best / 100.0)
