"""Net2WiderNet for AutoencoderKL: the wider VAE (or wider code) computes the old one's function and can learn past it."""

import pytest
import torch
from diffusers import AutoencoderKL

from pipeline.models.build import SDArchitecture, build_vae
from pipeline.models.widen import (
    LATENT_READERS,
    channel_source,
    outgoing_split,
    widen_autoencoder,
    widen_latent,
)


@pytest.fixture(scope="module")
def trained_like_vae() -> AutoencoderKL:
    """A small VAE with four channels per GroupNorm group and every weight, norm affine included, random."""
    torch.manual_seed(0)
    vae = build_vae(SDArchitecture(image_size=32, vae_channels=(16, 32, 32), norm_groups=4))
    with torch.no_grad():
        for module in vae.modules():
            if isinstance(module, torch.nn.GroupNorm):
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.5, 0.5)
        # Sharper attention than at initialisation, so a wrong query scale shows in the output.
        for name, parameter in vae.named_parameters():
            if "to_q" in name or "to_k" in name:
                parameter.mul_(4.0)
    return vae.eval()


@pytest.mark.parametrize("factor", [2, 3])
def test_the_wider_vae_encodes_and_decodes_as_the_old_one(trained_like_vae, factor):
    wide = widen_autoencoder(trained_like_vae, factor)
    assert list(wide.config.block_out_channels) == [16 * factor, 32 * factor, 32 * factor]
    assert wide.config.latent_channels == 4
    assert wide.config.scaling_factor == trained_like_vae.config.scaling_factor
    images = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1
    with torch.no_grad():
        old, new = trained_like_vae.encode(images).latent_dist, wide.encode(images).latent_dist
        assert torch.allclose(new.mean, old.mean, atol=1e-5)
        assert torch.allclose(new.logvar, old.logvar, atol=1e-4)
        assert torch.allclose(
            wide.decode(old.mean).sample, trained_like_vae.decode(old.mean).sample, atol=1e-5
        )
    assert sum(p.numel() for p in wide.parameters()) > 3 * sum(
        p.numel() for p in trained_like_vae.parameters()
    )


def test_each_old_channel_is_copied_factor_times_into_its_own_group():
    source = channel_source(width=8, factor=3, groups=2)
    assert torch.equal(torch.bincount(source), torch.full((8,), 3))
    new_group = torch.arange(24) // 12  # 2 groups of 12 new channels
    assert torch.equal(source // 4, new_group)  # 2 groups of 4 old channels
    with pytest.raises(ValueError, match="10 channels"):
        channel_source(width=10, factor=2, groups=4)


def test_the_outgoing_split_sums_to_one_per_old_channel_and_differs_between_copies():
    source = channel_source(width=8, factor=2, groups=2)
    split = outgoing_split(source, torch.Generator().manual_seed(0))
    totals = torch.zeros(8, dtype=split.dtype).index_add_(0, source, split)
    assert torch.allclose(totals, torch.ones(8, dtype=split.dtype))
    assert (split > 0).all()
    first_copy, second_copy = (source == 0).nonzero().flatten()
    assert split[first_copy] != split[second_copy]


def test_copies_get_different_gradients_so_training_can_use_them(trained_like_vae):
    wide = widen_autoencoder(trained_like_vae, 2).train()
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(2)) * 2 - 1
    wide.decode(wide.encode(images).latent_dist.mean).sample.sub(images).pow(2).mean().backward()
    conv = wide.decoder.up_blocks[1].resnets[0].conv1
    source = channel_source(conv.out_channels // 2, 2, 4)
    first_copy, second_copy = (source == 0).nonzero().flatten()
    assert torch.equal(conv.weight[first_copy], conv.weight[second_copy])  # copies start equal...
    assert not torch.allclose(conv.weight.grad[first_copy], conv.weight.grad[second_copy])  # ...and part


def test_factor_one_is_a_copy_and_a_factor_below_one_is_refused(trained_like_vae):
    same = widen_autoencoder(trained_like_vae, 1)
    old = trained_like_vae.state_dict()
    assert all(torch.equal(tensor, old[name]) for name, tensor in same.state_dict().items())
    with pytest.raises(ValueError, match="integer >= 1"):
        widen_autoencoder(trained_like_vae, 0)


def test_the_wider_vae_saves_and_loads_as_a_plain_autoencoder(trained_like_vae, tmp_path):
    wide = widen_autoencoder(trained_like_vae, 2)
    wide.save_pretrained(tmp_path / "vae", safe_serialization=True)
    loaded = AutoencoderKL.from_pretrained(tmp_path / "vae")
    images = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(3)) * 2 - 1
    with torch.no_grad():
        assert torch.allclose(
            loaded.encode(images).latent_dist.mean,
            trained_like_vae.encode(images).latent_dist.mean,
            atol=1e-5,
        )


def _latent_and_image(vae: AutoencoderKL, images: torch.Tensor, nudge_new_channels: float = 0.0):
    """The posterior, and the image decoded from its mode with channels 4.. moved by `nudge_new_channels`."""
    posterior = vae.encode(images).latent_dist
    latents = posterior.mode().clone()
    latents[:, 4:] += nudge_new_channels
    return posterior, vae.decode(latents).sample


@pytest.mark.parametrize("factor", [2, 3])
def test_the_wider_code_keeps_the_old_channels_and_decodes_as_the_old_one(trained_like_vae, factor):
    torch.manual_seed(7)
    grown = widen_latent(trained_like_vae, factor)
    assert grown.config.latent_channels == 4 * factor
    assert list(grown.config.block_out_channels) == [16, 32, 32]
    assert grown.config.scaling_factor == trained_like_vae.config.scaling_factor
    images = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(4)) * 2 - 1
    with torch.no_grad():
        old, old_image = _latent_and_image(trained_like_vae, images)
        new, new_image = _latent_and_image(grown, images)
        assert torch.allclose(new.mean[:, :4], old.mean, atol=1e-5)
        # Every channel's log-variance is old channel j mod 4's: the new channels are as sure as the old.
        assert torch.allclose(new.logvar, old.logvar.repeat(1, factor, 1, 1), atol=1e-4)
        assert torch.allclose(new_image, old_image, atol=1e-5)
        # The new means are fresh features of the image, not copies of the old ones.
        flat = new.mean.transpose(0, 1).flatten(1)
        correlation = torch.corrcoef(flat)[4:, :4].abs()
        assert correlation.max() < 0.99 and flat[4:].std(dim=1).min() > 0
        # Nothing reads them yet: the decoded image does not move with them.
        _, nudged_image = _latent_and_image(grown, images, nudge_new_channels=3.0)
        assert torch.allclose(nudged_image, old_image, atol=1e-5)


def test_only_the_layers_at_the_latent_change_and_the_rest_are_the_old_weights(trained_like_vae):
    grown, old = widen_latent(trained_like_vae, 2).state_dict(), trained_like_vae.state_dict()
    assert grown.keys() == old.keys()
    at_latent = ("encoder.conv_out", *LATENT_READERS)
    changed = {
        name
        for name in old
        if grown[name].shape != old[name].shape or not torch.equal(grown[name], old[name])
    }
    assert {name.rsplit(".", 1)[0] for name in changed} == set(at_latent)


def test_training_puts_the_new_channels_to_use(trained_like_vae):
    torch.manual_seed(8)
    grown = widen_latent(trained_like_vae, 2).train()
    new_mean_rows = grown.encoder.conv_out.weight[4:8].detach().clone()
    images = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(6)) * 2 - 1
    optimizer = torch.optim.Adam(grown.parameters(), lr=1e-3)
    for _ in range(3):
        optimizer.zero_grad()
        grown.decode(grown.encode(images).latent_dist.mode()).sample.sub(images).pow(2).mean().backward()
        optimizer.step()
    # The decoder reads the new channels now, and their encoder rows have moved with them.
    assert grown.decoder.conv_in.weight[:, 4:].abs().min() > 0
    with torch.no_grad():
        _, image = _latent_and_image(grown.eval(), images)
        _, nudged_image = _latent_and_image(grown, images, nudge_new_channels=3.0)
    assert (nudged_image - image).abs().max() > 1e-3
    assert not torch.allclose(grown.encoder.conv_out.weight[4:8], new_mean_rows)


def test_a_latent_factor_of_one_is_a_copy_and_below_one_is_refused(trained_like_vae, tmp_path):
    same = widen_latent(trained_like_vae, 1)
    old = trained_like_vae.state_dict()
    assert all(torch.equal(tensor, old[name]) for name, tensor in same.state_dict().items())
    with pytest.raises(ValueError, match="latent widening factor must be an integer >= 1"):
        widen_latent(trained_like_vae, 0)
    widen_latent(trained_like_vae, 2).save_pretrained(tmp_path / "vae", safe_serialization=True)
    assert AutoencoderKL.from_pretrained(tmp_path / "vae").config.latent_channels == 8
