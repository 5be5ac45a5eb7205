"""A wider AutoencoderKL that computes the same function as a trained one (Net2WiderNet).

Chen, Goodfellow & Shlens, "Net2Net: Accelerating Learning via Knowledge Transfer" (ICLR 2016), §2.1:
a layer is widened by copying units; the next layer divides each copied unit's outgoing weights among
its copies, so the network's output is unchanged and training continues from the trained function with
more capacity. Here every internal width of an AutoencoderKL (`block_out_channels`) is multiplied by
`factor`; the image and latent channels keep their sizes, so the latent space a UNet was trained on is
the one the wider encoder starts in.

Legend (one layer, Net2Net's notation):

    C, C' = factor * C    the old and new width of an activation
    g(j)                  `channel_source`: the old channel that new channel j copies
    W'[o, j]              = W[g(o), g(j)] * a_j, with sum over the copies j of one old channel of a_j = 1
    a_j                   the split of an outgoing weight among copies: random (not 1/factor) so that
                          copies receive different gradients and do not stay identical in training

Two AutoencoderKL details keep the function exact:

- GroupNorm: the copies of a group's channels are placed in the same (wider) group, so each group's
  mean and variance are those of the old group (`channel_source` orders them so).
- The mid-block attention has one head whose width is the block width, so q'.k' = factor * q.k while
  the softmax scale falls only by sqrt(factor): the query projection is divided by sqrt(factor).

The same copies grow the latent code (`widen_latent`): each of the C latent channels (their mean and
log-variance, as the encoder's `conv_out` and `quant_conv` give them) is copied `factor` times, and the
layers that read the latent (`quant_conv`'s input, `post_quant_conv`, the decoder's `conv_in`) split each
old channel's weights among its copies. The mode decodes to the same image; a sample does too in mean,
with less noise (each copy draws its own, and the split averages them). A code of more channels is the
lever SD3 and FLUX took for reconstruction (16 channels against SD's 4); a UNet trained on the old latent
space must be retrained.

Pure tensor maths: no files, no paths.
"""

from __future__ import annotations

import math

import torch
from diffusers import AutoencoderKL
from torch import nn


def channel_source(width: int, factor: int, groups: int) -> torch.Tensor:
    """g: for each of factor * width new channels, the old channel it copies, (factor * width,) long.

    New group k holds the old group k's channels, factor times over, so GroupNorm statistics are kept.
    """
    if width % groups:
        raise ValueError(f"a width of {width} channels does not split into {groups} groups")
    per_group = width // groups
    new = torch.arange(factor * width)
    group, position = new // (factor * per_group), new % (factor * per_group)
    return group * per_group + position % per_group


def outgoing_split(source: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """a: a random positive share per new channel, summing to 1 over the copies of each old channel."""
    share = torch.rand(source.shape, generator=generator, dtype=torch.float64) + 0.5
    total = torch.zeros(int(source.max()) + 1, dtype=torch.float64).index_add_(0, source, share)
    return share / total[source]


def widen_autoencoder(vae: AutoencoderKL, factor: int, seed: int = 0) -> AutoencoderKL:
    """An AutoencoderKL with every block width times `factor` that encodes and decodes as `vae` does.

    Args:
        vae: the trained autoencoder; unchanged.
        factor: width multiplier, an integer >= 1.
        seed: seeds the splits a_j (the function does not depend on it; training does).

    Returns:
        The wider autoencoder (float32, eval mode), with the same latent channels and scaling factor.

    Raises:
        ValueError: factor below 1.
    """
    if factor < 1:
        raise ValueError(f"vae widening factor must be an integer >= 1, got {factor}")
    config = {key: value for key, value in vae.config.items() if not key.startswith("_")}
    config["block_out_channels"] = [width * factor for width in config["block_out_channels"]]
    wide = AutoencoderKL.from_config(config)
    groups = config["norm_num_groups"]
    generator = torch.Generator().manual_seed(seed)
    old_modules = dict(vae.named_modules())
    with torch.no_grad():
        for name, module in wide.named_modules():
            old = old_modules[name]
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                _widen_projection(module, old, factor, groups, generator)
                if name.endswith("to_q"):
                    module.weight.div_(math.sqrt(factor))
                    module.bias.div_(math.sqrt(factor))
            elif isinstance(module, nn.GroupNorm):
                source = _source(old.num_channels, module.num_channels, factor, groups)
                module.weight.copy_(old.weight[source])
                module.bias.copy_(old.bias[source])
    return wide.eval()


def _source(old_width: int, new_width: int, factor: int, groups: int) -> torch.Tensor:
    """g for one dimension: identity where the width is kept (image and latent channels)."""
    if new_width == old_width:
        return torch.arange(old_width)
    return channel_source(old_width, factor, groups)


def _widen_projection(
    module: nn.Conv2d | nn.Linear,
    old: nn.Conv2d | nn.Linear,
    factor: int,
    groups: int,
    generator: torch.Generator,
) -> None:
    """W'[o, j] = W[g(o), g(j)] * a_j and b'[o] = b[g(o)], in place on `module`."""
    new_out, new_in = module.weight.shape[:2]
    old_out, old_in = old.weight.shape[:2]
    out_source = _source(old_out, new_out, factor, groups)
    in_source = _source(old_in, new_in, factor, groups)
    split = outgoing_split(in_source, generator).to(old.weight.dtype)
    weight = old.weight[out_source][:, in_source] * split.view(1, -1, *[1] * (old.weight.dim() - 2))
    module.weight.copy_(weight)
    if module.bias is not None:
        module.bias.copy_(old.bias[out_source])


LATENT_READERS = ("quant_conv", "post_quant_conv", "decoder.conv_in")  # layers whose input is the latent


def widen_latent(vae: AutoencoderKL, factor: int, seed: int = 0) -> AutoencoderKL:
    """An AutoencoderKL with `factor` times the latent channels whose mode decodes as `vae`'s does.

    Latent channel j' of the new code copies old channel j' mod C (C = vae's latent channels), in the
    mean and the log-variance alike; every block width is kept.

    Args:
        vae: the trained autoencoder; unchanged.
        factor: latent channel multiplier, an integer >= 1.
        seed: seeds the splits a_j (the function does not depend on it; training does).

    Returns:
        The autoencoder with factor * C latent channels (float32, eval mode) and vae's scaling factor.

    Raises:
        ValueError: factor below 1.
    """
    if factor < 1:
        raise ValueError(f"vae latent widening factor must be an integer >= 1, got {factor}")
    latent = int(vae.config.latent_channels)
    config = {key: value for key, value in vae.config.items() if not key.startswith("_")}
    config["latent_channels"] = latent * factor
    wide = AutoencoderKL.from_config(config)
    copies = torch.arange(factor * latent) % latent  # g(j) for the latent channels
    moments = torch.cat([copies, latent + copies])  # mean channels, then log-variance channels
    sources = {2 * latent: moments, latent: copies}
    generator = torch.Generator().manual_seed(seed)
    old_modules = dict(vae.named_modules())
    with torch.no_grad():
        for name, module in wide.named_modules():
            old = old_modules[name]
            if name == "encoder.conv_out" or name in LATENT_READERS:
                _grow_latent_projection(
                    module, old, sources, split=name in LATENT_READERS, generator=generator
                )
            elif not list(module.children()):
                module.load_state_dict(old.state_dict())
    return wide.eval()


def _grow_latent_projection(
    module: nn.Conv2d,
    old: nn.Conv2d,
    sources: dict[int, torch.Tensor],
    split: bool,
    generator: torch.Generator,
) -> None:
    """W'[o, j] = W[g(o), g(j)] * a_j (a_j = 1 where the input is not the latent), b'[o] = b[g(o)], in place.

    Args:
        module: the grown layer, written in place.
        old: the trained layer.
        sources: g for a latent-sized dimension, keyed by its old size (C: the code; 2C: mean and log-variance).
        split: whether the layer's input is the latent (its weights are then split among the copies).
        generator: draws the splits.
    """
    old_out, old_in = old.weight.shape[:2]
    new_out, new_in = module.weight.shape[:2]
    out_source = sources[old_out] if new_out != old_out else torch.arange(old_out)
    in_source = sources[old_in] if split else torch.arange(old_in)
    share = torch.ones(new_in, dtype=torch.float64)
    if split:
        # Copies of mean and log-variance channels are split apart (each old input channel's a_j sum to 1).
        share = outgoing_split(in_source, generator)
    weight = old.weight[out_source][:, in_source] * share.to(old.weight.dtype).view(1, -1, 1, 1)
    module.weight.copy_(weight)
    if module.bias is not None:
        module.bias.copy_(old.bias[out_source])
