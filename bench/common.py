"""Shared pieces of the benchmark scripts: timing, environment description, result files.

Timing follows one rule everywhere: warm-up iterations first (they include compilation and allocator growth), then
each measured iteration is timed on its own — with CUDA events on a GPU, `time.perf_counter` around a synchronised
call on CPU — and the median is reported with the spread (min, max).
"""

import contextlib
import importlib.util
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable

import torch

# A checkout that was never `pip install`ed (a GPU machine with torch and diffusers alone): use its source tree.
if importlib.util.find_spec("dit_hf") is None:
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "src"))

# Dense bf16 matmul peak (TFLOP/s) used for MFU when --peak_tflops is not given: data-sheet numbers, no sparsity.
PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 125.0, "RTX 4090": 165.0}


# Names for `torch.nn.attention.SDPBackend`; "auto" leaves PyTorch's own choice.
SDPA_BACKENDS = ("auto", "flash", "efficient", "cudnn", "math")


def sdpa_context(backend: str):
    """A context that restricts `F.scaled_dot_product_attention` to one backend (both models call it)."""
    if backend == "auto":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    names = {
        "flash": SDPBackend.FLASH_ATTENTION,
        "efficient": SDPBackend.EFFICIENT_ATTENTION,
        "cudnn": SDPBackend.CUDNN_ATTENTION,
        "math": SDPBackend.MATH,
    }
    if backend not in names:
        raise SystemExit(f"--sdpa: unknown backend {backend!r}; use one of {', '.join(SDPA_BACKENDS)}.")
    return sdpa_kernel(names[backend])


def add_model_args(p, batch_help: str, precisions: tuple[str, ...], precision_help: str):
    """The model, latent size, batch and precision options that every benchmark takes (unset: the device defaults)."""
    p.add_argument("--model", default=None, help="A DiT preset (default: DiT-XL/2 on CUDA, a tiny DiT-S/2 on CPU).")
    p.add_argument("--latent_size", type=int, default=None, help="Default: 32 on CUDA (256 px), 8 on CPU.")
    p.add_argument("--batch_size", type=int, default=None, help=batch_help)
    p.add_argument("--precision", choices=precisions, default=None, help=precision_help)


def sdpa_refused(error: RuntimeError) -> bool:
    """Whether an error says that the chosen attention backend does not take this shape, dtype or device."""
    return any(m in str(error) for m in ("No available kernel", "No viable backend"))


def apply_device_defaults(args, batch_size: tuple[int, int], precision: tuple[str, str], modes: tuple[str, ...]):
    """Fill the arguments left unset: the paper's DiT-XL/2 at 256 px on CUDA, a tiny DiT-S/2 on CPU.

    `batch_size` and `precision` are (CUDA, CPU) pairs; `modes` are the accepted --modes values.
    """
    args.device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    on_gpu = args.device.type == "cuda"
    args.model = args.model or ("DiT-XL/2" if on_gpu else "DiT-S/2")
    args.latent_size = args.latent_size or (32 if on_gpu else 8)
    args.batch_size = args.batch_size or batch_size[0 if on_gpu else 1]
    args.precision = args.precision or precision[0 if on_gpu else 1]
    # The embedded default's width with 1000 classes, when a CPU run keeps the default model.
    args.overrides = {} if on_gpu or args.model != "DiT-S/2" else dict(hidden_size=128, depth=4, num_heads=4)
    args.impls = [s for s in args.impls.split(",") if s]
    args.modes = [s for s in args.modes.split(",") if s]
    for mode in args.modes:
        if mode not in modes:
            raise SystemExit(f"--modes: unknown mode {mode!r}; use one of {', '.join(modes)}.")
    return args


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpu = platform.processor() or platform.machine()
    return f"CPU ({cpu}, {os.cpu_count()} cores, {torch.get_num_threads()} threads)"


def default_peak_tflops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, value in PEAK_BF16_TFLOPS.items():
        if key in name:
            return value
    return None


def environment(device: torch.device) -> dict:
    import diffusers

    return {
        "device": device_name(device),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "diffusers": diffusers.__version__,
        "python": platform.python_version(),
        "date": time.strftime("%Y-%m-%d"),
    }


def synchronize(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_once(fn: Callable[[], object], device: torch.device) -> float:
    """Seconds of one call: CUDA events around it on a GPU, a synchronised clock on CPU."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1000.0
    t0 = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - t0


def summarize(times: list[float]) -> dict:
    return {"median_s": statistics.median(times), "min_s": min(times), "max_s": max(times), "repeats": len(times)}


def time_iterations(fn: Callable[[], object], device: torch.device, warmup: int, repeats: int) -> dict:
    """Run `fn` `warmup` times untimed, then `repeats` times timed one by one. Seconds per call."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    return summarize([time_once(fn, device) for _ in range(repeats)])


def time_interleaved(fns: dict[str, Callable[[], object]], device: torch.device, warmup: int, repeats: int) -> dict:
    """`time_iterations` for several functions at once, taking turns call by call, so that a slow drift of the
    machine (other load, clock changes) reaches all of them alike instead of whichever happened to run then."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    synchronize(device)
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            times[name].append(time_once(fn, device))
    return {name: summarize(t) for name, t in times.items()}


def reset_memory(device: torch.device):
    import gc

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_gib(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    return torch.cuda.max_memory_allocated(device) / 2**30


def write_results(path: str, payload: dict, table: str):
    """`path` gets the JSON; the Markdown table goes next to it (`.md`) and to stdout."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(payload, f, indent=2)
    with open(os.path.splitext(path)[0] + ".md", "w") as f:
        f.write(table + "\n")
    print(table)
    print(f"\nwrote {path}")


def markdown_table(header: list[str], rows: list[list]) -> str:
    def fmt(value):
        if value is None:
            return "–"
        if isinstance(value, float):
            return f"{value:.3g}" if abs(value) < 10 else f"{value:,.1f}"
        return str(value)

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)
