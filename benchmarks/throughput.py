"""Inversion throughput: the reference loop against inversa's batched engine and its GPU precisions.

On the same images and device, in one run, for each method (DDIM, negative-prompt, null-text, prompt
tuning, direct inversion) and each way:

    reference  batch 1, fp32 (TF32 off), one image after another, as the reference notebook runs
    reference-tf32  the same loop with TF32 matmuls and convolutions: the notebook under PyTorch's
               defaults (cuDNN convolutions in TF32, matmuls in fp32) runs between the two
    fp32       batch B, fp32
    tf32       batch B, float32 on the TF32 matrix units                          (CUDA only)
    mixed      batch B, tf32 + bf16 autocast for the branches no gradient flows through (CUDA only)
    bf16       batch B, mixed + the optimised branch in bf16 autocast, fp32 embeddings and optimiser
               (CUDA only; methods that optimise)

A way may name its batch, `mixed@32`; otherwise it runs at --batch. For each, it prints seconds per image, images/s and the ratio to the reference; the UNet FLOPs per image
(measured with torch's FlopCounterMode on one forward and one forward+backward, times the rows the
UNet saw) and the FLOP/s achieved against the device's measured bf16 matrix peak; the peak memory;
the largest batch that fits (fitted from peaks at two batch sizes); and how far each way's
reconstruction is from the reference's (relative latent error, mean absolute pixel difference).
Inner iterations are fixed (early stop disabled) so every way does equal work. Results go to JSON
with the device's name.

    python benchmarks/throughput.py --model shapes --batch 8                   # CPU: shapes world
    python benchmarks/throughput.py --model reduced-sd --batch 4               # CPU: reduced SD architecture
    python benchmarks/throughput.py --model sd15-random --device cuda          # GPU: SD 1.5 at 512x512
    python benchmarks/throughput.py --model /models/stable-diffusion-v1-5 --device cuda
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import platform
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from pipeline.engine import InversionConfig, invert
from pipeline.models.build import SD15_ARCHITECTURE, SDArchitecture, build_random_sd
from pipeline.models.device import largest_batch
from pipeline.models.loading import DiffusionModel, load_diffusion_model

ROOT = Path(__file__).resolve().parents[1]
SHAPES_SD = ROOT / "pipeline" / "world" / "assets" / "shapes-sd"
# SD 1.5's layout (4 UNet levels, 2 layers each, 8 heads, 4 VAE levels) at a tenth of its widths,
# 256x256 pixels: small enough to time on two CPU cores.
REDUCED_SD_ARCHITECTURE = dataclasses.replace(
    SD15_ARCHITECTURE,
    image_size=256,
    unet_channels=(32, 64, 128, 128),
    vae_channels=(32, 64, 64, 64),
    text_width=128,
    text_layers=2,
    text_heads=4,
    text_intermediate=256,
    norm_groups=16,
)
RANDOM_MODELS = {"sd15-random": SD15_ARCHITECTURE, "reduced-sd": REDUCED_SD_ARCHITECTURE}
METHODS = ("null_text", "direct", "ddim", "negative_prompt", "prompt_tuning")
OPTIMISING = {"null_text", "prompt_tuning"}
GPU_WAYS = ("tf32", "mixed", "bf16")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _load(name: str, device: str, folder: str) -> tuple[DiffusionModel, str]:
    if name == "shapes":
        return load_diffusion_model(SHAPES_SD, device=device), "shapes world (shipped)"
    if name in RANDOM_MODELS:
        arch: SDArchitecture = RANDOM_MODELS[name]
        started = time.perf_counter()
        # A small output scale gives a random UNet a smooth, trained-like eps (see build_random_sd).
        build_random_sd(folder, arch, unet_output_scale=0.05)
        print(f"built {name} in {time.perf_counter() - started:.0f} s", flush=True)
        return load_diffusion_model(folder, device=device), f"{name} (random weights)"
    return load_diffusion_model(name, device=device), name


def _images(count: int, size: int) -> torch.Tensor:
    """Smooth images (a disc on a gradient), uint8 (count, size, size, 3): random noise would be an
    unnatural input for the VAE and make reconstruction errors meaningless."""
    generator = torch.Generator().manual_seed(0)
    grid = torch.linspace(-1, 1, size)
    y, x = torch.meshgrid(grid, grid, indexing="ij")
    batch = []
    for _ in range(count):
        center = torch.rand(2, generator=generator) - 0.5
        disc = ((x - center[0]) ** 2 + (y - center[1]) ** 2 < 0.2).float()[..., None]
        background = (x[..., None] + 1) / 4 * torch.rand(3, generator=generator)
        image = background * (1 - disc) + torch.rand(3, generator=generator) * disc
        batch.append((image * 255).round().to(torch.uint8))
    return torch.stack(batch)


class GpuBusy:
    """Samples the GPU's utilisation (NVML, every 20 ms) while a way runs; None without NVML."""

    def __init__(self, device: torch.device):
        self.samples: list[int] = []
        self.handle = None
        if device.type == "cuda":
            with contextlib.suppress(ImportError, OSError, RuntimeError):
                import pynvml

                pynvml.nvmlInit()
                self.nvml = pynvml
                self.handle = pynvml.nvmlDeviceGetHandleByIndex(device.index or 0)

    @contextlib.contextmanager
    def sampling(self):
        self.samples = []
        if self.handle is None:
            yield
            return
        stop = threading.Event()

        def sample():
            while not stop.wait(0.02):
                self.samples.append(self.nvml.nvmlDeviceGetUtilizationRates(self.handle).gpu)

        thread = threading.Thread(target=sample, daemon=True)
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join()

    def mean(self) -> float | None:
        return sum(self.samples) / len(self.samples) / 100 if self.samples else None


class UNetRows:
    """Counts the rows the UNet saw, split by whether autograd recorded the call."""

    def __init__(self, unet: torch.nn.Module):
        self.forward_rows = self.gradient_rows = 0
        self.handle = unet.register_forward_hook(self._count)

    def _count(self, module, args, output):
        del module, output
        if torch.is_grad_enabled():
            self.gradient_rows += args[0].shape[0]
        else:
            self.forward_rows += args[0].shape[0]

    def reset(self) -> None:
        self.forward_rows = self.gradient_rows = 0


def unet_flops(model: DiffusionModel) -> tuple[int, int]:
    """FLOPs of one UNet row: a forward, and a forward + backward to the text embedding."""
    latents = torch.randn(1, model.latent_channels, model.latent_size, model.latent_size, device=model.device)
    width = model.unet.config.cross_attention_dim
    embeddings = torch.randn(1, model.tokenizer.model_max_length, width, device=model.device)
    with FlopCounterMode(display=False) as forward, torch.no_grad():
        model.unet(latents, 500, encoder_hidden_states=embeddings)
    embeddings.requires_grad_(True)
    with FlopCounterMode(display=False) as both:
        model.unet(latents, 500, encoder_hidden_states=embeddings).sample.sum().backward()
    return forward.get_total_flops(), both.get_total_flops()


def matmul_peak(device: torch.device, dtype: torch.dtype, size: int = 8192, repeats: int = 10) -> float:
    """Measured dense matmul FLOP/s on the device (random operands, warm, the median of repeats)."""
    left = torch.randn(size, size, device=device, dtype=dtype)
    right = torch.randn(size, size, device=device, dtype=dtype)
    for _ in range(3):
        left @ right
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        left @ right
        end.record()
        torch.cuda.synchronize(device)
        times.append(start.elapsed_time(end) / 1000)
    return 2 * size**3 / sorted(times)[len(times) // 2]


def _config(method: str, steps: int, inner_steps: int, guidance: float) -> InversionConfig:
    settings = {"num_steps": steps, "guidance_scale": guidance}
    if method == "null_text":
        settings |= {"inner_steps": inner_steps, "early_stop_epsilon": -1.0}
    return InversionConfig.of(method, **settings)


@dataclasses.dataclass
class Way:
    name: str
    policy: str
    batch: int


def _way(name: str, batch: int) -> Way:
    """'reference', 'reference-tf32', or a precision policy with an optional '@B' batch size."""
    if name.startswith("reference"):
        return Way(name, name.removeprefix("reference").removeprefix("-") or "fp32", 1)
    policy, _, size = name.partition("@")
    return Way(name, policy, int(size) if size else batch)


def _timed_invert(model, images, prompts, config, batch: int):
    """Invert `images` in chunks of `batch`; returns (seconds, reconstruction latents, pixels)."""
    _sync(model.device)
    started = time.perf_counter()
    latents, pixels = [], []
    for first in range(0, images.shape[0], batch):
        result = invert(model, images[first : first + batch], prompts[first : first + batch], config)
        latents.append(result.latents.reconstruction.float())
        pixels.append(result.reconstructions)
    _sync(model.device)
    return time.perf_counter() - started, torch.cat(latents), torch.cat(pixels)


def _peak_memory(model, images, prompts, config, batch: int) -> int | None:
    if model.device.type != "cuda":
        return None
    torch.cuda.reset_peak_memory_stats(model.device)
    invert(model, images[:batch], prompts[:batch], config)
    return torch.cuda.max_memory_allocated(model.device)


class Benchmark:
    def __init__(self, model: DiffusionModel, args, peak_flops: float | None):
        self.model, self.args, self.peak_flops = model, args, peak_flops
        self.rows = UNetRows(model.unet)
        self.busy = GpuBusy(model.device)
        self.forward_flops, self.gradient_flops = unet_flops(model)
        count = max(args.batch, *(way.batch for way in args.parsed_ways))
        self.images = _images(count, model.image_size)
        self.prompts = [f"a photo of a disc number {index} on a background" for index in range(count)]
        self.results: list[dict] = []
        self.started = time.perf_counter()

    def warm_up(self, ways: list[Way]) -> None:
        """One short null-text inversion per precision and batch size: kernels load, the allocator
        grows, cuDNN picks its algorithms, all outside the timings."""
        for policy, batch in {(way.policy, way.batch) for way in ways}:
            model = dataclasses.replace(self.model, precision=policy)
            config = _config("null_text", 2, 1, self.args.guidance)
            invert(model, self.images[:batch], self.prompts[:batch], config)
        self.started = time.perf_counter()

    def over_budget(self) -> bool:
        return time.perf_counter() - self.started > self.args.budget_seconds

    def run_way(self, method: str, way: Way, reference: dict | None) -> dict:
        model = dataclasses.replace(self.model, precision=way.policy)
        config = _config(method, self.args.steps, self.args.inner_steps, self.args.guidance)
        count = self.args.reference_images if way.batch == 1 else way.batch
        images, prompts = self.images[:count], self.prompts[:count]
        self.rows.reset()
        with self.busy.sampling():
            seconds, latents, pixels = _timed_invert(model, images, prompts, config, way.batch)
        flops = self.forward_flops * self.rows.forward_rows + self.gradient_flops * self.rows.gradient_rows
        record = {
            "method": method,
            "way": way.name,
            "precision": way.policy,
            "batch": way.batch,
            "images": count,
            "seconds": seconds,
            "seconds_per_image": seconds / count,
            "images_per_second": count / seconds,
            "unet_rows_per_image": (self.rows.forward_rows + self.rows.gradient_rows) / count,
            "unet_tflop_per_image": flops / count / 1e12,
            "achieved_tflops": flops / seconds / 1e12,
            "fraction_of_bf16_peak": flops / seconds / self.peak_flops if self.peak_flops else None,
            "gpu_busy": self.busy.mean(),
        }
        if reference is not None:
            shared = reference["latents"].shape[0]
            reference_latents = reference["latents"]
            record["speedup_vs_reference"] = record["images_per_second"] / reference["images_per_second"]
            record["latent_relative_error_vs_reference"] = float(
                (latents[:shared] - reference_latents).norm() / reference_latents.norm()
            )
            record["pixel_mean_abs_diff_vs_reference"] = float(
                (pixels[:shared].float() - reference["pixels"].float()).abs().mean()
            )
        if way.batch > 1 and self.model.device.type == "cuda":
            probe = _config(method, 2, 1, self.args.guidance)
            peaks = {size: _peak_memory(model, images, prompts, probe, size) for size in (1, way.batch)}
            capacity = torch.cuda.get_device_properties(self.model.device).total_memory
            record["peak_memory_bytes"] = peaks[way.batch]
            record["peak_memory_bytes_batch_1"] = peaks[1]
            with contextlib.suppress(ValueError):
                record["largest_batch_that_fits"] = largest_batch(peaks, capacity)
        return record | {"_latents": latents, "_pixels": pixels}

    def run(self, methods, ways: list[Way]) -> None:
        for method in methods:
            reference = None
            for way in ways:
                if way.policy == "bf16" and method not in OPTIMISING:
                    continue  # without an optimised branch bf16 is the mixed way
                if self.over_budget():
                    self._record({"method": method, "way": way.name, "skipped": "time budget spent"})
                    continue
                record = self.run_way(method, way, reference)
                latents, pixels = record.pop("_latents"), record.pop("_pixels")
                if way.name == "reference":
                    reference = {"latents": latents, "pixels": pixels} | record
                self._record(record)

    def _record(self, record: dict) -> None:
        self.results.append(record)
        print(json.dumps(record), flush=True)
        if self.args.json_out:
            self.args.json_out.write_text(json.dumps(self.report(), indent=2))

    def report(self) -> dict:
        device = self.model.device
        return {
            "device": torch.cuda.get_device_name(device)
            if device.type == "cuda"
            else platform.processor() or "cpu",
            "torch": torch.__version__,
            "commit": _commit(),
            "model": self.args.model_label,
            "image_size": self.model.image_size,
            "steps": self.args.steps,
            "null_text_inner_steps": self.args.inner_steps,
            "guidance_scale": self.args.guidance,
            "unet_tflop_per_forward_row": self.forward_flops / 1e12,
            "unet_tflop_per_forward_backward_row": self.gradient_flops / 1e12,
            "measured_bf16_matmul_tflops": self.peak_flops and self.peak_flops / 1e12,
            "results": self.results,
        }


def _commit() -> str | None:
    try:
        return subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def _percent(fraction: float | None) -> str:
    return "" if fraction is None else f"{100 * fraction:.0f}%"


def print_table(report: dict) -> None:
    print(
        f"\n{report['model']} on {report['device']}, {report['steps']} steps, "
        f"null-text {report['null_text_inner_steps']} inner steps, w={report['guidance_scale']}"
    )
    print(
        f"{'method':<16}{'way':<16}{'B':>3}{'s/img':>9}{'img/s':>9}{'vs ref':>8}{'TFLOP/s':>9}"
        f"{'%peak':>7}{'lat err':>9}{'px diff':>8}{'peak GiB':>9}{'fits B':>7}"
    )
    for row in report["results"]:
        if "skipped" in row:
            print(f"{row['method']:<16}{row['way']:<16} skipped: {row['skipped']}")
            continue
        fraction = row.get("fraction_of_bf16_peak")
        memory = row.get("peak_memory_bytes")
        print(
            f"{row['method']:<16}{row['way']:<16}{row['batch']:>3}{row['seconds_per_image']:>9.3f}"
            f"{row['images_per_second']:>9.3f}{row.get('speedup_vs_reference', 1.0):>7.2f}x"
            f"{row['achieved_tflops']:>9.2f}{'' if fraction is None else f'{100 * fraction:.1f}':>7}"
            f"{row.get('latent_relative_error_vs_reference', 0.0):>9.1e}"
            f"{row.get('pixel_mean_abs_diff_vs_reference', 0.0):>8.2f}"
            f"{'' if memory is None else f'{memory / 2**30:.1f}':>9}"
            f"{row.get('largest_batch_that_fits', ''):>7}"
            f"{_percent(row.get('gpu_busy')):>6}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--model", default="shapes", help="shapes | reduced-sd | sd15-random | folder | hub id"
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, default=8, help="B of the batched ways")
    parser.add_argument("--reference-images", type=int, default=4, help="images the reference loop runs")
    parser.add_argument("--steps", type=int, default=10, help="DDIM steps S")
    parser.add_argument("--inner-steps", type=int, default=5, help="null-text iterations per step")
    parser.add_argument("--guidance", type=float, default=7.5)
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument(
        "--ways", default=None, help="default: reference,fp32 (+ tf32,mixed,bf16 on CUDA); e.g. mixed@32"
    )
    parser.add_argument("--budget-seconds", type=float, default=float("inf"), help="skip ways after this")
    parser.add_argument("--json-out", type=Path, default=None)
    args = parser.parse_args()
    if args.reference_images > args.batch:
        parser.error("--reference-images must be at most --batch (they are the batch's first images)")
    device = torch.device(args.device)
    names = (
        args.ways.split(",")
        if args.ways
        else ["reference", "fp32"] + (list(GPU_WAYS) if device.type == "cuda" else [])
    )
    ways = [_way(name, args.batch) for name in names]
    args.parsed_ways = ways
    if ways[0].name != "reference":
        parser.error("--ways must start with reference: every ratio is against it")
    with tempfile.TemporaryDirectory() as folder:
        model, args.model_label = _load(args.model, args.device, folder)
    peak = matmul_peak(device, torch.bfloat16) if device.type == "cuda" else None
    benchmark = Benchmark(model, args, peak)
    benchmark.warm_up(ways)
    benchmark.run(args.methods.split(","), ways)
    report = benchmark.report()
    if args.json_out:
        args.json_out.write_text(json.dumps(report, indent=2))
    print_table(report)


if __name__ == "__main__":
    main()
