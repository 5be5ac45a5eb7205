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

The latent code grows differently (`widen_latent`). Copies of a latent channel, split as above, stay
copies under Adam: their incoming weights get gradients in the fixed ratio of their splits, which
Adam's per-weight normalisation turns into equal updates (a 32x32x4 VAE grown so to 8 channels and
trained 766 steps kept each copy at correlation 1.0 with its original). So the N = (factor - 1) * C new
channels are fresh: the encoder's new mean rows keep their random initialisation (new features of the
image), the log-variance of new channel j is old channel j mod C's, and every weight from a new channel
into the old code and the decoder is zero (`quant_conv` and `post_quant_conv` pass the new channels on
unchanged). The decoded image is the old one exactly, at the mode and at a sample; the zero weights get
gradients at once (their inputs are not zero), and through them the new channels' encoder rows. A code
of more channels is the lever SD3 and FLUX took for reconstruction (16 channels against SD's 4); a UNet
trained on the old latent space must be retrained.

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


def widen_latent(vae: AutoencoderKL, factor: int) -> AutoencoderKL:
    """An AutoencoderKL with `factor` times the latent channels whose code decodes as `vae`'s does.

    Latent channels 0..C-1 are the old code; channels C..factor*C-1 are new, read by nothing yet (legend
    in the module docstring). Every block width is kept.

    Args:
        vae: the trained autoencoder; unchanged.
        factor: latent channel multiplier, an integer >= 1.

    Returns:
        The autoencoder with factor * C latent channels (float32, eval mode) and vae's scaling factor;
        the new encoder rows are drawn from torch's global generator (seed it for a repeatable growth).

    Raises:
        ValueError: factor below 1.
    """
    if factor < 1:
        raise ValueError(f"vae latent widening factor must be an integer >= 1, got {factor}")
    old_channels = int(vae.config.latent_channels)
    config = {key: value for key, value in vae.config.items() if not key.startswith("_")}
    config["latent_channels"] = old_channels * factor
    wide = AutoencoderKL.from_config(config)
    old_modules = dict(vae.named_modules())
    with torch.no_grad():
        for name, module in wide.named_modules():
            if name != "encoder.conv_out" and name not in LATENT_READERS and not list(module.children()):
                module.load_state_dict(old_modules[name].state_dict())
        _grow_moments(wide.encoder.conv_out, vae.encoder.conv_out, old_channels)
        if vae.quant_conv is not None:
            _grow_moments_reader(wide.quant_conv, vae.quant_conv, old_channels)
        if vae.post_quant_conv is not None:
            _grow_code_reader(wide.post_quant_conv, vae.post_quant_conv, pass_new_on=True)
        _grow_code_reader(wide.decoder.conv_in, vae.decoder.conv_in, pass_new_on=False)
    return wide.eval()


def _moment_positions(old_channels: int, new_channels: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Where the old means and log-variances sit among the 2 * new_channels moments: (C,) long each."""
    return torch.arange(old_channels), new_channels + torch.arange(old_channels)


def _grow_moments(module: nn.Conv2d, old: nn.Conv2d, old_channels: int) -> None:
    """The encoder's last layer: old mean rows kept, log-variance row j copied from old channel j mod C,
    new mean rows left at their random initialisation; in place."""
    new_channels = module.out_channels // 2
    logvar_rows = new_channels + torch.arange(new_channels)
    for rows, old_rows in (
        (torch.arange(old_channels), torch.arange(old_channels)),
        (logvar_rows, old_channels + torch.arange(new_channels) % old_channels),
    ):
        module.weight[rows] = old.weight[old_rows]
        module.bias[rows] = old.bias[old_rows]


def _grow_moments_reader(module: nn.Conv2d, old: nn.Conv2d, old_channels: int) -> None:
    """quant_conv (1x1 over the moments): the old map among the old moments, the new means passed on
    unchanged, each new log-variance computed as old channel j mod C's; zero from every new input."""
    new_channels = module.out_channels // 2
    means, logvars = _moment_positions(old_channels, new_channels)
    old_inputs = torch.cat([means, logvars])
    weight = torch.zeros_like(module.weight)
    bias = torch.zeros_like(module.bias)
    out_source = torch.cat(
        [torch.arange(old_channels), -torch.ones(new_channels - old_channels, dtype=torch.long)]
    )
    out_source = torch.cat([out_source, old_channels + torch.arange(new_channels) % old_channels])
    for row, source in enumerate(out_source.tolist()):
        if source >= 0:
            weight[row, old_inputs] = old.weight[source]
            bias[row] = old.bias[source]
        else:
            weight[row, row] = 1.0  # a new mean, passed on
    module.weight.copy_(weight)
    module.bias.copy_(bias)


def _grow_code_reader(module: nn.Conv2d, old: nn.Conv2d, pass_new_on: bool) -> None:
    """post_quant_conv or the decoder's conv_in: old weights on the old channels, zero on the new ones;
    with `pass_new_on` (post_quant_conv, square) the new channels also go out unchanged."""
    old_channels = old.in_channels
    weight = torch.zeros_like(module.weight)
    bias = torch.zeros_like(module.bias)
    weight[: old.out_channels, :old_channels] = old.weight
    bias[: old.out_channels] = old.bias
    if pass_new_on:
        for channel in range(old_channels, module.in_channels):
            weight[channel, channel] = 1.0
    module.weight.copy_(weight)
    module.bias.copy_(bias)
