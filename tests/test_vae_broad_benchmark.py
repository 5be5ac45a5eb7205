"""The VAE breakdown benchmark: its families agree with the vae-broad stage's report, its groups add up."""

import json

import numpy as np
import torch
from diffusers import AutoencoderKL

from benchmarks import vae_broad as bench
from pipeline.models.build import SDArchitecture, build_vae
from pipeline.training import world_data, world_vae
from pipeline.training.world_config import DEFAULT_CONFIG, load_train_config
from pipeline.world import broad


def test_readings_agree_with_the_stage_and_group_every_broad_scene(tmp_path):
    torch.manual_seed(0)
    vae = build_vae(SDArchitecture(image_size=64, vae_channels=(8, 16, 16))).eval()
    vae.save_pretrained(tmp_path / "vae", safe_serialization=True)
    results = bench.main([str(tmp_path / "vae"), "--scenes", "12", "--output", str(tmp_path / "out.json")])
    reading = results[str(tmp_path / "vae")]
    assert json.loads((tmp_path / "out.json").read_text()) == results

    config = load_train_config(DEFAULT_CONFIG, ["vae_broad.heldout_scenes=12"])
    families = world_data.heldout_families(config)
    with torch.no_grad():
        stage = world_vae.reconstruction_report(vae, families)
    for name in ("world", "broad", "near"):
        assert reading["families"][name]["psnr_mean_db"] == stage[f"{name}_psnr_mean_db"]
        assert reading["families"][name]["psnr_min_db"] == stage[f"{name}_psnr_min_db"]

    by_kind = reading["broad_by_background"]
    assert sum(group["scenes"] for group in by_kind.values()) == 12
    # The scene-weighted mean of the kinds' means is the family's mean (to the rounding).
    weighted = sum(group["psnr_mean_db"] * group["scenes"] for group in by_kind.values()) / 12
    assert abs(weighted - reading["families"]["broad"]["psnr_mean_db"]) < 0.01
    assert (
        min(group["psnr_min_db"] for group in by_kind.values()) == reading["families"]["broad"]["psnr_min_db"]
    )
    periodic = sum(by_kind[kind]["scenes"] for kind in ("striped", "checkered") if kind in by_kind)
    assert sum(group["scenes"] for group in reading["broad_periodic_by_width"].values()) == periodic

    worst = reading["broad_worst_scenes"]
    assert [scene["psnr_db"] for scene in worst] == sorted(scene["psnr_db"] for scene in worst)
    assert worst[0]["psnr_db"] == reading["families"]["broad"]["psnr_min_db"]
    first = worst[0]["seed"] - world_data.BROAD_HELDOUT_SEED_OFFSET
    assert np.array_equal(families["broad"][first], broad.broad_scene(worst[0]["seed"]))
    assert by_kind[worst[0]["background"]]["psnr_min_db"] == worst[0]["psnr_db"]

    frame = reading["broad_error_by_ring"]
    assert list(frame["rings"]) == [str(ring) for ring in range(bench.FRAME_RINGS)]
    assert frame["without_frame"]["scenes"] == 12


def test_edge_distance_rings_hold_the_pixels_of_each_frame():
    distance = bench.edge_distance(7, 10)
    for ring in range(4):
        # ring d is the border of a (7 - 2d) x (10 - 2d) rectangle
        height, width = 7 - 2 * ring, 10 - 2 * ring
        expected = 2 * (height + width) - 4 if height > 1 else width
        assert (distance == ring).sum() == expected
    assert distance.max() == 3 and distance[3, 3:7].tolist() == [3, 3, 3, 3]


def test_error_by_ring_splits_the_error_by_distance_from_the_edge():
    images = np.zeros((2, 8, 8, 3), np.uint8)
    distance = bench.edge_distance(8, 8)
    reconstructions = np.where(distance == 0, 4, np.where(distance == 1, 2, 1))[None, :, :, None]
    reconstructions = np.repeat(np.repeat(reconstructions, 2, 0), 3, 3).astype(np.uint8)
    reconstructions[1, distance >= 2] = 3  # the second image's interior is 3 levels off
    reading = bench.error_by_ring(reconstructions, images, rings=2)
    assert reading["interior_mse"] == (1 + 9) / 2
    assert reading["rings"] == {
        "0": {"mse": 16.0, "ratio_to_interior": 3.2},
        "1": {"mse": 4.0, "ratio_to_interior": 0.8},
    }
    interior_psnr = [10 * np.log10(255**2 / 1), 10 * np.log10(255**2 / 9)]
    assert reading["without_frame"] == bench.mean_and_worst(np.array(interior_psnr))

    # With one ring read apart, ring 1 (20 pixels, 2 levels off) joins the 16 centre pixels.
    one_ring = bench.error_by_ring(reconstructions, images, rings=1)
    interior_mse = [(20 * 4 + 16 * 1) / 36, (20 * 4 + 16 * 9) / 36]
    assert one_ring["interior_mse"] == round(sum(interior_mse) / 2, 2)
    assert one_ring["rings"] == {
        "0": {"mse": 16.0, "ratio_to_interior": round(16 / (sum(interior_mse) / 2), 2)}
    }


def _tiny_vae() -> AutoencoderKL:
    torch.manual_seed(0)
    return build_vae(SDArchitecture(image_size=64, vae_channels=(8, 16, 16))).eval().requires_grad_(False)


def test_decoder_reach_without_steps_is_the_encoders_reconstruction():
    vae = _tiny_vae()
    images = broad.broad_images(range(3))
    expected = world_vae.psnr_per_image(world_vae.vae_reconstructions(vae, images), images)
    assert np.array_equal(bench.decoder_reach(vae, images, steps=0), expected)


def test_decoder_reach_finds_latents_the_decoder_can_draw():
    vae = _tiny_vae()
    # Images the decoder drew itself from random latents: some latent reconstructs each of them.
    torch.manual_seed(1)
    with torch.no_grad():
        drawn = vae.decode(torch.randn(3, 4, 16, 16)).sample.clamp(-1, 1)
    images = ((drawn + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    start = bench.decoder_reach(vae, images, steps=0)
    reach = bench.decoder_reach(vae, images, steps=100)
    assert np.all(reach >= start)  # the best latent seen includes the start
    assert np.all(reach > start + 5.0)
    assert not any(parameter.requires_grad for parameter in vae.parameters())


def test_the_worst_scenes_get_the_decoders_reach_on_request(tmp_path):
    vae = _tiny_vae()
    vae.save_pretrained(tmp_path / "vae", safe_serialization=True)
    plain = bench.main([str(tmp_path / "vae"), "--scenes", "8"])[str(tmp_path / "vae")]
    assert "broad_worst_decoder_reach" not in plain
    fitted = bench.main([str(tmp_path / "vae"), "--scenes", "8", "--fit-steps", "3"])[str(tmp_path / "vae")]
    reach = fitted["broad_worst_decoder_reach"]
    assert reach["fit_steps"] == 3
    assert [scene["seed"] for scene in reach["scenes"]] == [
        scene["seed"] for scene in fitted["broad_worst_scenes"]
    ]
    worst = [scene["psnr_db"] for scene in fitted["broad_worst_scenes"]]
    assert all(scene["psnr_db"] >= psnr for scene, psnr in zip(reach["scenes"], worst, strict=True))


def test_the_encoder_fit_reading_is_the_engines_encoding_decoded(tmp_path, tiny_sd):
    """--encoder-fit-steps reads every broad scene as `encode_images(..., fit_steps)` encodes it."""
    import dataclasses

    from pipeline.models.vae import decode_latents, encode_images

    vae = _tiny_vae()
    vae.save_pretrained(tmp_path / "vae", safe_serialization=True)
    arguments = [str(tmp_path / "vae"), "--scenes", "6"]
    plain = bench.main(arguments)[str(tmp_path / "vae")]
    assert "broad_encoder_fit" not in plain
    reading = bench.main([*arguments, "--encoder-fit-steps", "4"])[str(tmp_path / "vae")]["broad_encoder_fit"]

    seeds = range(world_data.BROAD_HELDOUT_SEED_OFFSET, world_data.BROAD_HELDOUT_SEED_OFFSET + 6)
    images = np.stack([broad.broad_scene(seed) for seed in seeds])
    model = dataclasses.replace(tiny_sd, vae=vae)  # the engine's encoding, through the tiny VAE
    decoded = decode_latents(model, encode_images(model, torch.as_tensor(images), fit_steps=4)).numpy()
    psnr = world_vae.psnr_per_image(decoded, images)
    assert reading["steps"] == 4 and reading["broad"]["scenes"] == 6
    assert abs(reading["broad"]["psnr_mean_db"] - psnr.mean()) < 0.01
    assert abs(reading["broad"]["psnr_min_db"] - psnr.min()) < 0.01
    assert reading["broad"]["psnr_min_db"] >= plain["families"]["broad"]["psnr_min_db"]
    assert reading["broad_worst_scenes"][0]["seed"] == seeds[int(np.argmin(psnr))]
