"""Which torch device a model runs on, and how large a batch fits its memory."""

from __future__ import annotations

import torch


def resolve_device(device: str) -> str:
    """The torch device for a configured device name.

    Args:
        device: auto | cpu | cuda (or any torch device string).

    Returns:
        For auto, cuda when this process sees a GPU, else cpu; any other name unchanged.
    """
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def largest_batch(peak_bytes: dict[int, int], capacity_bytes: int, headroom: float = 0.9) -> int:
    """The largest batch whose peak memory fits, from peaks measured at two or more batch sizes.

    Peak memory of a batched inversion is affine in the batch size B: the weights and workspace
    (fixed) plus per-image activations. A least-squares line through the measurements is
    extrapolated to `headroom * capacity_bytes`.

    Args:
        peak_bytes: {batch size: measured peak bytes}, at least two distinct sizes.
        capacity_bytes: the device's memory.
        headroom: fraction of the capacity the batch may use (the rest absorbs fragmentation).

    Returns:
        The largest B >= 0 predicted to fit (0 when even the fixed part does not).

    Raises:
        ValueError: with fewer than two sizes, or peaks that do not grow with B.
    """
    if len(peak_bytes) < 2:
        raise ValueError("largest_batch needs peaks measured at two or more batch sizes")
    sizes = list(peak_bytes)
    mean_size = sum(sizes) / len(sizes)
    mean_peak = sum(peak_bytes.values()) / len(sizes)
    spread = sum((size - mean_size) ** 2 for size in sizes)
    per_image = sum((size - mean_size) * (peak - mean_peak) for size, peak in peak_bytes.items()) / spread
    if per_image <= 0:
        raise ValueError(f"peak memory does not grow with the batch size: {peak_bytes}")
    fixed = mean_peak - per_image * mean_size
    return max(0, int((headroom * capacity_bytes - fixed) // per_image))
