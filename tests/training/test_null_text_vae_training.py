"""Dataset-wide null-text VAE training on Ray Train with tiny models: the kept inversions are the engine's
null-text inversions, a step is eq. 1 along the VAE's own sampled path, only the VAE trains, runs are
seeded and resume, and the artefact loads for jobs."""

from __future__ import annotations

import dataclasses
import io
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image
from training_runs import assert_resumes_to_the_same_result, train

from pipeline.models.loading import fingerprint_modules
from pipeline.training.artefact import read_artefact
from pipeline.training.null_text_vae import (
    NullTextVAEConfig,
    NullTextVAEData,
    NullTextVAETask,
    config_from_mapping,
    training_images,
)
from pipeline.training.ray_train import history_of

ITERATIONS = 3
STEPS = 3


@pytest.fixture(scope="module")
def task_config(tiny_sd_path) -> NullTextVAEConfig:
    return NullTextVAEConfig(
        model=tiny_sd_path,
        data=NullTextVAEData(images=3, first_seed=5),
        steps=STEPS,
        guidance_scale=5.0,
        inner_steps=2,
        latent_dim=4,
        reduced_channels=2,
        hidden_dim=8,
        lr=1e-2,
        beta=0.5,
        kl_cycle=4,
        batch=2,
    )


@pytest.fixture(scope="module")
def set_up_task(task_config) -> NullTextVAETask:
    task = NullTextVAETask(task_config)
    task.setup(torch.device("cpu"), 0, 1)
    return task


@pytest.fixture(scope="module")
def one_worker_run(ray_local, task_config, tmp_path_factory) -> dict:
    return train("null_text_vae", task_config, tmp_path_factory.mktemp("null-text-vae"), ITERATIONS)


def test_the_kept_inversions_are_the_engines_null_text_inversions(set_up_task, task_config, tiny_sd):
    from pipeline import engine
    from pipeline.methods import InversionConfig

    images, captions, skipped = training_images(task_config.data, tiny_sd.image_size)
    assert skipped == 0 and len(captions) == 3
    inversion = engine.invert(
        tiny_sd,
        torch.as_tensor(images),
        captions,
        InversionConfig.of("null_text", **task_config.inversion_settings()),
    )
    assert torch.equal(set_up_task.trajectory, inversion.latents.trajectory)
    assert torch.equal(set_up_task.null_text, inversion.latents.uncond_embeddings)
    assert torch.equal(set_up_task.cond_embeddings, inversion.latents.cond_embeddings[0])


def test_an_untrained_step_walks_null_texts_reconstruction_and_scores_eq_1(task_config):
    """With lr 0 the VAE keeps its zero last layer, so phi'_t = phi_t and the walk from z*_T is null-text's
    own reconstruction path: the step's L_rec is the mean over steps of ||z~_{t-1} - z*_{t-1}||^2 of that
    path (re-derived with the sampler), and L_phi = alpha L_rec + beta_k KL."""
    from pipeline.diffusion.sampling import sample
    from pipeline.methods.null_text_vae import kl_divergence

    task = NullTextVAETask(dataclasses.replace(task_config, lr=0.0, kl_cycle=10_000, beta=0.0))
    task.setup(torch.device("cpu"), 0, 1)
    rows, noise = task.draws(0)
    terms = task.step(0, lambda: None)
    trajectory = task.trajectory[:, rows]
    path = []

    def record(step: int, latents: torch.Tensor) -> torch.Tensor:
        path.append(latents)
        return latents

    sample(
        task.model.unet,
        task.schedule,
        trajectory[-1],
        task.cond_embeddings[rows][None].expand(STEPS, -1, -1, -1),
        task.null_text[:, rows],
        task_config.guidance_scale,
        after_step=record,
    )
    errors = [
        (path[step] - trajectory[STEPS - step - 1]).pow(2).flatten(1).mean(dim=1).mean()
        for step in range(STEPS)
    ]
    assert terms["reconstruction"] == pytest.approx(float(torch.stack(errors).mean()), rel=1e-4)
    assert terms["loss"] == pytest.approx(task_config.alpha * terms["reconstruction"], rel=1e-6)
    assert terms["beta"] == 0.0
    # The KL is the encoder's at each step (beta 0 leaves it out of the loss, not out of the record).
    timesteps = task.schedule.timesteps
    images = torch.zeros(len(rows), dtype=torch.long)
    with torch.no_grad():
        kls = [
            kl_divergence(
                *task.vae.encode(task.null_text[step, rows], timesteps[step].repeat(len(rows)), images)
            )
            for step in range(STEPS)
        ]
    assert terms["kl"] == pytest.approx(float(torch.stack(kls).mean()), rel=1e-4)
    assert noise.shape == (STEPS, 2, task_config.latent_dim)


def test_a_step_trains_the_vae_and_leaves_the_diffusion_model_unchanged(task_config):
    task = NullTextVAETask(task_config)
    task.setup(torch.device("cpu"), 0, 1)
    before = fingerprint_modules(task.model.unet, task.model.vae, task.model.text_encoder)
    assert before == task.base_fingerprint
    terms = [task.step(iteration, lambda: None) for iteration in range(2)]
    assert fingerprint_modules(task.model.unet, task.model.vae, task.model.text_encoder) == before
    assert float(task.vae.expand_weight.detach().abs().max()) > 0.0  # the zero-initialised last layer moved
    # beta per Adam step (0..2, then 3..5) of a 4-step cycle with ramp 0.5: 0, 1/2, 1 then 1, 0, 1/2 of beta.
    assert terms[0]["beta"] == pytest.approx((0 + 0.5 + 1) * task_config.beta / 3)
    assert terms[1]["beta"] == pytest.approx((1 + 0 + 0.5) * task_config.beta / 3)


def test_syncs_before_every_adam_step(task_config, set_up_task):
    task = NullTextVAETask(task_config)
    task.setup(torch.device("cpu"), 0, 1)
    calls = []
    task.step(0, lambda: calls.append(task.vae.expand_weight.grad.clone()))
    assert len(calls) == STEPS
    assert float(calls[0].abs().max()) > 0  # the gradient is there when sync runs (before the step)


def test_training_is_seeded(task_config):
    weights = []
    for _ in range(2):
        task = NullTextVAETask(task_config)
        task.setup(torch.device("cpu"), 0, 1)
        for iteration in range(2):
            task.step(iteration, lambda: None)
        weights.append(task.state_dict()["weights"])
    assert all(torch.equal(weights[0][name], weights[1][name]) for name in weights[0])


def test_each_worker_takes_its_share_of_the_same_draw(set_up_task):
    def draw(rank: int, world_size: int):
        task = NullTextVAETask(set_up_task.config)
        task.rank, task.world_size, task.trajectory = rank, world_size, set_up_task.trajectory
        return task.draws(iteration=5)

    (first, first_noise), (second, second_noise), (whole, whole_noise) = draw(0, 2), draw(1, 2), draw(0, 1)
    assert [*first, *second] == list(whole)
    assert torch.equal(torch.cat([first_noise, second_noise], dim=1), whole_noise)
    _, later_noise = set_up_task.draws(6)
    assert not torch.equal(later_noise, whole_noise)


def test_the_artefact_holds_the_vae_and_loads_for_jobs(one_worker_run, tiny_sd, task_config):
    from pipeline.editors import load_null_text_vae

    assert one_worker_run["kind"] == "null_text_vae"
    assert one_worker_run["base_model_fingerprint"] == tiny_sd.fingerprint
    history = history_of(one_worker_run)
    assert len(history) == ITERATIONS
    assert all(set(record) == {"loss", "reconstruction", "kl", "beta"} for record in history)
    artefact = read_artefact(one_worker_run["uri"])
    assert artefact.config["training_images"] == 3 and artefact.config["skipped_samples"] == 0
    assert config_from_mapping(
        {
            key: value
            for key, value in artefact.config.items()
            if key in NullTextVAEConfig.__dataclass_fields__
        }
    ) == dataclasses.replace(task_config)
    vae = load_null_text_vae(tiny_sd, one_worker_run["uri"])
    assert vae.version == artefact.version and vae.add_input
    assert all(torch.equal(vae.state_dict()[name], tensor) for name, tensor in artefact.weights.items())


def test_jobs_invert_with_the_artefact_and_sample_different_edits(one_worker_run, tiny_sd, images):
    from pipeline.editors import load_null_text_vae
    from pipeline.engine import AttentionControl, EditRequest, InversionConfig, edit, invert

    vae = load_null_text_vae(tiny_sd, one_worker_run["uri"])
    config = InversionConfig.of(
        "null_text_vae", num_steps=STEPS, guidance_scale=5.0, inner_steps=2, vae=one_worker_run["uri"]
    )
    source = "a red circle on a white background"
    inversion = invert(tiny_sd, images[:2], [source, source], config, embedding_vae=vae)
    target = "a red square on a white background"
    requests = [
        EditRequest(0, target, AttentionControl("replace"), seed=s, sample_temperature=1.0) for s in (1, 2)
    ]
    first, second = edit(tiny_sd, inversion, requests)
    assert not torch.allclose(first.latents, second.latents)


def test_a_run_killed_after_a_checkpoint_resumes_to_the_same_result(
    ray_local, one_worker_run, task_config, tmp_path
):
    assert_resumes_to_the_same_result(
        "null_text_vae", task_config, tmp_path, ITERATIONS, one_worker_run, killed_after=1
    )


def test_two_workers_follow_the_one_worker_loss_curve(ray_local, one_worker_run, task_config, tmp_path):
    """Each worker walks its share of the batch with the noise of the whole draw; the averaged gradients
    are the whole batch's, so the loss curve (averaged over the workers) is the one-worker curve."""
    two = train("null_text_vae", task_config, tmp_path, ITERATIONS, workers=2)
    assert two["metrics"]["workers"] == 2
    for single, double in zip(history_of(one_worker_run), history_of(two), strict=True):
        for name in ("loss", "reconstruction", "kl"):
            assert double[name] == pytest.approx(single[name], rel=1e-3, abs=1e-7), name
    one, both = read_artefact(one_worker_run["uri"]).weights, read_artefact(two["uri"]).weights
    moved = float(one["expand_weight"].abs().max())
    assert moved > 1e-4 and float((one["expand_weight"] - both["expand_weight"]).abs().max()) < 1e-2 * moved


def _shard(path, samples: list[tuple[str, dict[str, bytes]]]) -> str:
    with tarfile.open(path, "w") as tar:
        for key, members in samples:
            for extension, data in members.items():
                info = tarfile.TarInfo(f"{key}.{extension}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return str(path)


def _png(value: int, size: int = 12) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.full((size, size + 4, 3), value, dtype=np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def test_shards_give_their_first_readable_images_and_count_the_skipped(tmp_path):
    first = _shard(
        tmp_path / "a-000.tar",
        [
            ("s1", {"png": _png(10), "txt": b"a red circle"}),
            ("s2", {"png": _png(20)}),  # no caption
            ("s3", {"png": b"not a png", "txt": b"a blue square"}),
        ],
    )
    _shard(tmp_path / "a-001.tar", [("s4", {"png": _png(40), "txt": b"a green star"}), ("s5", {"txt": b"x"})])
    data = NullTextVAEData(shards=(str(tmp_path / "a-{000..001}.tar"),), images=2)
    images, captions, skipped = training_images(data, 8)
    assert captions == ["a red circle", "a green star"] and skipped == 2
    assert images.shape == (2, 8, 8, 3) and images[0].max() == 10 and images[1].min() == 40
    with pytest.raises(
        ValueError, match="hold 2 readable images with captions \\(3 unreadable\\), fewer than"
    ):
        training_images(dataclasses.replace(data, images=3), 8)
    assert first.endswith("a-000.tar")


def test_the_config_refuses_sizes_below_one_and_a_batch_beyond_the_data():
    with pytest.raises(ValueError, match="at least 1"):
        NullTextVAEConfig(latent_dim=0)
    with pytest.raises(ValueError, match="batch=8 is more than data.images=4"):
        NullTextVAEConfig(batch=8, data=NullTextVAEData(images=4))
