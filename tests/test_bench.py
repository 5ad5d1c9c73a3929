"""The benchmark scripts run on CPU (tiny configs) and write what the README table needs."""

import functools
import json
import os
import sys
from pathlib import Path

import pytest
import torch

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


def test_bench_ceiling_limit_is_the_sum_of_the_step_products(tmp_path):
    import bench_ceiling

    payload = bench_ceiling.main(
        ["--batch_size", "4", "--matmul_size", "64", "--copy_mib", "1", "--warmup", "0", "--repeats", "1"]
        + ["--out", str(tmp_path / "ceiling.json")]
    )
    s = payload["settings"]
    assert (s["hidden"], s["depth"], s["heads"], s["tokens"]) == (128, 4, 4, 16)  # bench_train's tiny DiT-S/2
    m, d = 4 * 16, 128
    shapes = {(g["layer"], g["role"]): g["shape"] for g in payload["gemms"]}
    assert len(shapes) == 12
    assert shapes[("qkv", "forward")] == [m, d, 3 * d]
    assert shapes[("fc1", "grad input")] == [m, 4 * d, d]
    assert shapes[("fc2", "grad weight")] == [4 * d, m, d]
    # The math backend takes any shape; the best backend is the fastest one measured.
    backends = {a["backend"]: a["s"] for a in payload["attention"]}
    assert "math" in backends and "cudnn" not in backends  # cuDNN attention exists on CUDA only
    assert backends[payload["best_attention_backend"]] == min(backends.values())
    step_s = s["depth"] * (sum(g["s"] for g in payload["gemms"]) + min(backends.values()))
    assert payload["shape_limited_img_per_s"] == pytest.approx(4 / step_s)
    # The FP8 square product (torch._scaled_mm, emulated on CPU) and the step it would allow.
    fp8 = payload["fp8_matmul_tflops"]
    assert fp8 > 0
    assert payload["fp8_matmul_limited_img_per_s"] == pytest.approx(fp8 * 1e12 / payload["flops_per_sample"])
    assert "fp8 (e4m3, `torch._scaled_mm`)" in (tmp_path / "ceiling.md").read_text()
    assert payload["matmul_limited_img_per_s"] == pytest.approx(
        payload["matmul_tflops"] * 1e12 / payload["flops_per_sample"]
    )


def test_bench_train_reports_shares_of_the_ceiling_and_per_backend_ratios(tmp_path):
    import bench_train

    ceiling = {
        "settings": {"model": "DiT-S/2", "batch_size": 4, "precision": "fp32"},
        "matmul_tflops": 2.0,
        "matmul_limited_img_per_s": 1000.0,
        "shape_limited_img_per_s": 500.0,
    }
    path = tmp_path / "ceiling.json"
    path.write_text(json.dumps(ceiling))
    args = ["--batch_size", "4", "--warmup", "0", "--repeats", "1", "--out", str(tmp_path / "t.json")]
    payload = bench_train.main(args + ["--sdpa", "math,cudnn", "--ceiling_json", str(path)])
    # cuDNN attention is refused on CPU: those runs are skipped, the math ones reported.
    assert {(r["impl"], r["sdpa"]) for r in payload["results"]} == {("dit-hf", "math"), ("diffusers", "math")}
    for r in payload["results"]:
        assert r["of_shape_limit"] == pytest.approx(r["img_per_s"] / 500.0)
        assert r["of_matmul_ceiling"] == pytest.approx(r["achieved_tflops"] / 2.0)
    assert set(payload["ratios"]) == {"dit-hf/diffusers eager sdpa=math", "best dit-hf / best diffusers"}

    # A ceiling measured for another batch is refused, naming the option and the rerun that fixes it.
    with pytest.raises(SystemExit, match=r"--ceiling_json .*batch_size.*rerun bench_ceiling.py .*--batch_size 8"):
        bench_train.main(["--batch_size", "8", "--ceiling_json", str(path), "--out", str(tmp_path / "u.json")])
    with pytest.raises(SystemExit, match="--sdpa: unknown backend 'fast'"):
        bench_train.main(args + ["--sdpa", "fast"])


def test_profile_step_phases_and_categories(tmp_path):
    import profile_step

    payload = profile_step.main(
        ["--batch_size", "4", "--warmup", "1", "--repeats", "2", "--profiled_steps", "1", "--top", "5"]
        + ["--out", str(tmp_path / "p.json")]
    )
    assert [(r["impl"], r["mode"]) for r in payload["runs"]] == [("dit-hf", "eager"), ("diffusers", "eager")]
    for run in payload["runs"]:
        assert list(run["phases_ms"]) == ["forward", "backward", "optimizer", "ema"]
        assert all(ms > 0 for ms in run["phases_ms"].values())
        shares = [c["share"] for c in run["categories"].values()]
        assert sum(shares) == pytest.approx(1.0)
        assert run["total_ms"] == pytest.approx(sum(c["ms"] for c in run["categories"].values()))
        assert run["categories"]["matmul"]["ms"] > 0 and run["categories"]["attention"]["ms"] > 0
        assert len(run["top"]) == 5 and run["top"][0]["ms"] >= run["top"][-1]["ms"]
    assert "Operator categories" in (tmp_path / "p.md").read_text()


@pytest.mark.parametrize(
    "name, category",
    [
        ("nvjet_tst_256x128_64x4_1x2_h_bz_coopA_TNT", "matmul"),
        ("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x256x64", "matmul"),
        ("triton_tem_fused_addmm_0", "matmul"),
        ("aten::addmm", "matmul"),
        ("void pytorch_flash::flash_bwd_dq_dk_dv_loop_seqk_parallel_kernel<Flash_bwd_kernel_traits<72>>", "attention"),
        ("cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_knob_3_64x64x128_4x1x1", "attention"),
        ("aten::_scaled_dot_product_flash_attention_for_cpu_backward", "attention"),
        (
            "void at::native::(anonymous namespace)::multi_tensor_apply_kernel<FusedAdamMathFunctor<float, 4>>",
            "optimizer + EMA",
        ),
        ("aten::_foreach_lerp_", "optimizer + EMA"),
        (
            "void at::native::(anonymous namespace)::vectorized_layer_norm_kernel<c10::BFloat16, float>",
            "normalization",
        ),
        ("triton_per_fused_native_layer_norm_0", "normalization"),
        ("triton_poi_fused_add_mul_silu_3", "fused (Inductor)"),
        (
            "void at::native::vectorized_elementwise_kernel<4, at::native::GeluCUDAKernelImpl>",
            "elementwise / activation",
        ),
        ("void at::native::unrolled_elementwise_kernel<at::native::direct_copy_kernel_cuda>", "copy / cast"),
        (
            "void at::native::(anonymous namespace)::distribution_elementwise_grid_stride_kernel<normal>",
            "random numbers",
        ),
        ("Memcpy DtoD (Device -> Device)", "copy / cast"),
        ("cudaLaunchKernel", "other"),
    ],
)
def test_profile_categories(name, category):
    import profile_step

    assert profile_step.categorize(name) == category


@pytest.mark.slow
def test_bench_sample_compiled_modes_match_eager(tmp_path):
    import bench_sample

    payload = bench_sample.main(
        ["--modes", "eager,regional,compile", "--batch_size", "2", "--steps", "3", "--warmup", "0", "--repeats", "1"]
        + ["--out", str(tmp_path / "s.json")]
    )
    assert {(r["impl"], r["mode"]) for r in payload["results"]} == {
        ("dit-hf", "eager"),
        ("diffusers", "eager"),
        ("dit-hf", "regional"),
        ("dit-hf", "compile"),
        ("diffusers", "compile"),
    }
    assert payload["max_diff"]["dit-hf regional vs eager"] < 1e-4
    assert payload["max_diff"]["dit-hf compile vs eager"] < 1e-4
    assert payload["max_diff"]["compile"] < 1e-4


def test_bench_scripts_import_without_the_training_only_packages():
    # GPU machines often carry torch + diffusers alone: the benchmarks must not need datasets, wandb or scikit-learn.
    import subprocess

    code = f"""
import sys
BLOCKED = {{"datasets", "wandb", "sklearn", "scipy", "torchmetrics"}}

class Hide:
    def __init__(self, finder):
        self.finder = finder

    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED or not hasattr(self.finder, "find_spec"):
            return None
        return self.finder.find_spec(name, path, target)

    def find_distributions(self, context=None):
        found = getattr(self.finder, "find_distributions", lambda context: [])(context)
        names = {{"datasets", "wandb", "scikit-learn", "scipy", "torchmetrics"}}
        return [d for d in found if (d.metadata["Name"] or "").lower() not in names]

    def invalidate_caches(self):
        getattr(self.finder, "invalidate_caches", lambda: None)()

sys.meta_path[:] = [Hide(f) for f in sys.meta_path]
sys.path.insert(0, {str(BENCH)!r})
import bench_ceiling, bench_loader, bench_memory, bench_sample, bench_train, profile_step
loaded = sorted(BLOCKED & {{m.split(".")[0] for m in sys.modules}})
assert not loaded, loaded
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]


def test_bench_scripts_run_from_a_checkout_that_was_not_installed(tmp_path):
    import subprocess

    code = f"""
import os, sys
# Forget the installed package: no path entry that holds dit_hf, no module already loaded.
sys.path[:] = [p for p in sys.path if not os.path.isdir(os.path.join(p or ".", "dit_hf"))]
sys.path.insert(0, {str(BENCH)!r})
import bench_ceiling
import dit_hf
assert os.path.dirname(os.path.dirname(dit_hf.__file__)) == os.path.join(os.path.dirname({str(BENCH)!r}), "src")
bench_ceiling.main(["--matmul_size", "32", "--copy_mib", "1", "--warmup", "0", "--repeats", "1",
                    "--batch_size", "2", "--out", {str(tmp_path / "c.json")!r}])
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert (tmp_path / "c.json").exists()


def test_bench_train_gradient_checkpointing_recomputes_blocks_in_both_models(tmp_path):
    import bench_train

    args = bench_train.parse_args(["--batch_size", "2", "--gradient_checkpointing"])
    for name, model in bench_train.build_models(args).items():
        calls = []
        block = model.blocks[0] if name == "dit-hf" else model.transformer_blocks[0]
        block.register_forward_pre_hook(functools.partial(lambda seen, module, inputs: seen.append(1), calls))
        bench_train.make_step(args, model, "eager")()
        assert model.is_gradient_checkpointing
        assert len(calls) == 2, name  # the forward, then again in the backward
    payload = bench_train.main(
        ["--batch_size", "2", "--warmup", "0", "--repeats", "1", "--gradient_checkpointing"]
        + ["--out", str(tmp_path / "t.json")]
    )
    assert payload["settings"]["gradient_checkpointing"] is True
    assert "gradient checkpointing" in (tmp_path / "t.md").read_text().splitlines()[0]


def test_saved_tensor_bytes_counts_each_storage_once_without_parameters():
    import bench_memory

    w = torch.nn.Parameter(torch.randn(16, 16))
    x = torch.randn(8, 16, requires_grad=True)

    def forward():
        h = x @ w  # saves x (512 bytes) and w (a parameter: not counted)
        return (h.sin() * h.cos()).sum()  # sin and cos both save h (one storage, 512 bytes), mul saves sin, cos

    params = {w.untyped_storage().data_ptr()}
    assert bench_memory.saved_tensor_bytes(forward, params) == 4 * 512


def test_bench_memory_predicts_both_models_and_checkpointing_saves_activations(tmp_path):
    import bench_memory

    common = ["--model", "DiT-S/2", "--latent_size", "8", "--batch_size", "4", "--precision", "fp32"]
    plain = bench_memory.main(common + ["--out", str(tmp_path / "m.json")])
    rows = {r["impl"]: r for r in plain["results"]}
    ours, theirs = rows["dit-hf"], rows["diffusers"]
    # 20 bytes per parameter: float32 weights, gradients, two AdamW moments and the EMA.
    assert ours["model_states_gib"] == pytest.approx(20 * ours["params_m"] * 1e6 / 2**30)
    assert theirs["model_states_gib"] > ours["model_states_gib"]  # diffusers' per-block embedders
    # In float32 the two models save the same activations, to a few percent.
    assert ours["activations_mib_per_image"] == pytest.approx(theirs["activations_mib_per_image"], rel=0.05)
    predicted = ours["model_states_gib"] + ours["saved_fixed_gib"] + 128 * ours["activations_mib_per_image"] / 1024
    assert ours["predicted_gib"] == pytest.approx(predicted)
    assert (tmp_path / "m.md").read_text().startswith("Training memory, DiT-S/2")

    checkpointed = bench_memory.main(common + ["--gradient_checkpointing", "--out", str(tmp_path / "c.json")])
    for r in checkpointed["results"]:
        # Only each block's input stays; the rest is recomputed in the backward.
        assert r["activations_mib_per_image"] < rows[r["impl"]]["activations_mib_per_image"] / 4, r["impl"]
        assert r["max_batch"] > rows[r["impl"]]["max_batch"]


def test_bench_scale_reads_memory_and_fits_growth(tmp_path):
    import bench_scale

    # Exact lines come back exactly; a flat measure has ratio 1 and no growth.
    fitted = bench_scale.fit([10_000, 100_000, 1_000_000], [2.0 + 3e-6 * n for n in (10_000, 100_000, 1_000_000)])
    assert fitted["a"] == pytest.approx(2.0) and fitted["per_million"] == pytest.approx(3.0)
    assert fitted["imagenet"] == pytest.approx(2.0 + 3e-6 * bench_scale.IMAGENET_IMAGES)
    assert bench_scale.fit([1, 2, 3], [5.0, 5.0, 5.0])["ratio"] == pytest.approx(1.0)
    # This process's memory from /proc: a private heap that grows when we allocate and touch 64 MiB.
    before = bench_scale.memory(os.getpid())
    block = torch.ones(16 * 2**20)  # 64 MiB, written
    after = bench_scale.memory(os.getpid())
    assert 0 < before["uss_mib"] <= before["rss_mib"] and before["pss_mib"] > 0
    assert after["anon_mib"] - before["anon_mib"] > 48
    del block
    # The data set the launches read is a parquet image data set with labels i % 1000.
    bench_scale.write_dataset(str(tmp_path / "data"), 1500, chunk=1000)
    from dit_hf.data import load_image_dataset

    ds = load_image_dataset(str(tmp_path / "data"), cache_dir=str(tmp_path / "hf"))
    assert len(ds) == 1500 and ds[1234]["label"] == 234 and ds[3]["image"].size == (8, 8)


def test_small_data_levels_from_pure_noise_is_the_pipelines_default_call():
    """The noise-level diagnostic integrates like the saved pipeline: from level 1 it reproduces `pipe(labels)` (same
    noise, steps, guidance scale and interval), and from a lower level it runs only the scheduler's steps below it."""
    from conftest import tiny_dit
    from diffusers import FlowMatchEulerDiscreteScheduler
    from small_data_levels import denoise_from

    from dit_hf import DiTPipeline

    pipe = DiTPipeline(tiny_dit(learn_sigma=False), FlowMatchEulerDiscreteScheduler(), objective="flow_x")
    pipe.register_to_config(
        default_num_inference_steps=4, default_guidance_scale=3.0, default_guidance_interval=[0.2, 0.8]
    )
    pipe.set_progress_bar_config(disable=True)
    noise = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([1, 2])
    expected = pipe(labels.tolist(), latents=noise, output_type="pt").images
    ours = (denoise_from(pipe, noise, labels, 1.0) / 2 + 0.5).clamp(0, 1)
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=0)
    calls = []
    handle = pipe.transformer.register_forward_hook(lambda module, args, out: calls.append(float(args[1][0])))
    try:
        denoise_from(pipe, noise, labels, 0.5)
    finally:
        handle.remove()
    # The scheduler's levels at 4 steps are 1, 0.667, 0.334 and 0.001: from 0.5 the steps start at 0.5 and 0.334
    # (guided, in the interval: two calls each), then 0.001 (unguided).
    assert [round(t) for t in calls] == [500, 500, 334, 334, 1]
