"""Which attention a UNet's forward pass meets, measured: a diffusers attention processor records the
spatial side of every call's queries and whether it attends to the text, then computes as usual."""

from __future__ import annotations

import torch


class _CallRecorder:
    """An attention processor appending (spatial side, is cross-attention) for every call it serves."""

    def __init__(self, calls: list[tuple[int, bool]]):
        from diffusers.models.attention_processor import AttnProcessor

        self.calls, self.inner = calls, AttnProcessor()

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, *args, **kwargs):
        # hidden_states: (batch, side * side, channels) on every attention of a square latent
        self.calls.append((round(hidden_states.shape[1] ** 0.5), encoder_hidden_states is not None))
        return self.inner(attn, hidden_states, encoder_hidden_states, *args, **kwargs)


def attention_calls(unet, latent_size: int) -> set[tuple[int, bool]]:
    """The (side, is cross-attention) pairs one forward pass of `unet` on a latent_size^2 latent meets.

    Leaves `unet` with the recording processor set; callers own a model built for the test.
    """
    calls: list[tuple[int, bool]] = []
    unet.set_attn_processor(_CallRecorder(calls))
    latents = torch.zeros(1, unet.config.in_channels, latent_size, latent_size)
    text = torch.zeros(1, 3, unet.config.cross_attention_dim)
    with torch.no_grad():
        unet(latents, 1, encoder_hidden_states=text)
    return set(calls)
