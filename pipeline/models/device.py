"""Which torch device a model runs on."""

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
