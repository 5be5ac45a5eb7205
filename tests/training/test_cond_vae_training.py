"""Conditional-embedding VAE training on Ray Train with tiny models: the kept edits are the engine's
edits, only the VAE trains, runs are seeded and resume, and the artefact loads for jobs."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from training_runs import assert_resumes_to_the_same_result, train

from pipeline.metrics.clip import build_random_clip
from pipeline.models.loading import fingerprint_modules
from pipeline.training.artefact import read_artefact
from pipeline.training.cond_vae import CondVAEConfig, CondVAETask
from pipeline.training.diffusion_clip import ClipSpec, WorldData
from pipeline.training.ray_train import history_of

ITERATIONS = 3


@pytest.fixture(scope="module")
def task_config(tiny_sd_path, tmp_path_factory) -> CondVAEConfig:
    clip = build_random_clip(tmp_path_factory.mktemp("clip"))
    return CondVAEConfig(
        model=tiny_sd_path,
        clip=ClipSpec(clip.model_name, str(clip.checkpoint_path), str(clip.config_path)),
        data=WorldData(scenes=3, attribute="shape", value="star"),
        inversion="ddim",
        steps=3,
        samples=2,
        latent_dim=4,
        reduced_channels=2,
        hidden_dim=8,
        lr=1e-2,
        batch=2,
        kl_cycle=2,
    )


@pytest.fixture(scope="module")
def set_up_task(task_config) -> CondVAETask:
    task = CondVAETask(task_config)
    task.setup(torch.device("cpu"), 0, 1)
    return task


def _train(config: CondVAEConfig, output) -> dict:
    return train("cond_vae", config, output, ITERATIONS)


@pytest.fixture(scope="module")
def one_worker_run(ray_local, task_config, tmp_path_factory) -> dict:
    return _train(task_config, tmp_path_factory.mktemp("cond-vae-one-worker"))


def test_the_kept_latents_are_the_engines_prompt_to_prompt_edits(set_up_task, task_config, tiny_sd):
    from pipeline import engine
    from pipeline.diffusion.control import AttentionControl
    from pipeline.diffusion.editing import EditRequest
    from pipeline.methods import InversionConfig
    from pipeline.training.diffusion_clip import _at_resolution, world_training_texts

    images, references, targets = world_training_texts(task_config.data)
    images = _at_resolution(images, tiny_sd.image_size)
    inversion = engine.invert(
        tiny_sd,
        torch.as_tensor(images),
        references,
        InversionConfig.of("ddim", num_steps=3, guidance_scale=5.0),
    )
    control = AttentionControl(mode="replace", cross_replace_steps=0.8, self_replace_steps=0.4)
    results = engine.edit(tiny_sd, inversion, [EditRequest(i, t, control) for i, t in enumerate(targets)])
    kept = set_up_task.kept
    assert kept.shape[:2] == (4, 3)
    assert torch.allclose(kept[0], inversion.latents.trajectory[-1])
    assert torch.allclose(kept[-1], torch.stack([result.latents for result in results]), atol=1e-5)


def test_a_step_trains_the_vae_and_leaves_the_diffusion_model_unchanged(task_config):
    task = CondVAETask(task_config)
    task.setup(torch.device("cpu"), 0, 1)
    before = fingerprint_modules(task.model.unet, task.model.vae, task.model.text_encoder)
    assert before == task.base_fingerprint
    terms = [task.step(iteration, lambda: None) for iteration in range(2)]
    assert fingerprint_modules(task.model.unet, task.model.vae, task.model.text_encoder) == before
    assert float(task.vae.expand_weight.detach().abs().max()) > 0.0  # the zero-initialised last layer moved
    assert terms[0]["diversity"] == 0.0  # an untrained VAE's samples are all C'
    assert terms[0]["beta"] == 0.0 and terms[1]["beta"] == pytest.approx(task_config.beta)  # cycle of 2


def test_training_is_seeded(task_config):
    weights = []
    for _ in range(2):
        task = CondVAETask(task_config)
        task.setup(torch.device("cpu"), 0, 1)
        for iteration in range(2):
            task.step(iteration, lambda: None)
        weights.append(task.state_dict()["weights"])
    assert all(torch.equal(weights[0][name], weights[1][name]) for name in weights[0])


def test_each_worker_takes_its_share_of_the_same_draw(set_up_task):
    def draw(rank: int, world_size: int) -> tuple[set[int], int]:
        task = CondVAETask(dataclasses.replace(set_up_task.config, batch=2))
        task.rank, task.world_size, task.kept = rank, world_size, set_up_task.kept
        rows, step = task.draws(iteration=5)
        return set(rows.tolist()), step

    (first, step_a), (second, step_b), (whole, step) = draw(0, 2), draw(1, 2), draw(0, 1)
    assert first | second == whole and len(first) == len(second) == 1
    assert step_a == step_b == step


def test_the_artefact_holds_the_vae_and_loads_for_jobs(one_worker_run, tiny_sd):
    from pipeline.editors import load_embedding_vae

    assert one_worker_run["kind"] == "cond_vae"
    assert one_worker_run["base_model_fingerprint"] == tiny_sd.fingerprint
    history = history_of(one_worker_run)
    assert len(history) == ITERATIONS
    assert all(set(record) == {"loss", "beta", "clip", "kl", "diversity"} for record in history)
    artefact = read_artefact(one_worker_run["uri"])
    vae = load_embedding_vae(tiny_sd, one_worker_run["uri"])
    assert vae.version == artefact.version
    assert all(torch.equal(vae.state_dict()[name], tensor) for name, tensor in artefact.weights.items())
    prompt = torch.zeros(3, artefact.config["tokens"], artefact.config["channels"])
    timesteps = torch.tensor([900, 500, 100])
    assert not torch.allclose(
        vae.sample_sequence(prompt, timesteps, 0, 1.0), vae.sample_sequence(prompt, timesteps, 1, 1.0)
    )


def test_a_run_killed_after_a_checkpoint_resumes_to_the_same_result(
    ray_local, one_worker_run, task_config, tmp_path
):
    assert_resumes_to_the_same_result(
        "cond_vae", task_config, tmp_path, ITERATIONS, one_worker_run, killed_after=1
    )


def test_the_config_refuses_what_eqs_3_and_4_cannot_use():
    with pytest.raises(ValueError, match="at least 2"):
        CondVAEConfig(samples=1)
    with pytest.raises(ValueError, match="gamma <= 0"):
        CondVAEConfig(gamma=0.5)
    with pytest.raises(ValueError, match="templates"):
        CondVAEConfig(templates=("a star",))


def test_caption_texts_give_each_image_its_own_target_caption(task_config):
    from pipeline.training.diffusion_clip import world_training_texts

    task = CondVAETask(dataclasses.replace(task_config, text="captions"))
    task.setup(torch.device("cpu"), 0, 1)
    _, _, targets = world_training_texts(task_config.data)
    assert torch.allclose(task.class_text, task.clip.text_embeddings(targets))
    batch, _ = task.batch(iteration=0)
    rows, _ = task.draws(iteration=0)
    assert torch.equal(batch.class_text, task.class_text[torch.as_tensor(rows)])
    assert task.step(0, lambda: None)["clip"] > 0


def test_relative_clip_and_model_paths_become_absolute(task_config, tmp_path):
    # The cond-VAE config names one CLIP and no extra ones: every ClipSpec field resolves by its type.
    clip_file, config_file, model_dir = tmp_path / "clip.safetensors", tmp_path / "clip.json", tmp_path / "sd"
    clip_file.touch(), config_file.touch(), model_dir.mkdir()
    relative = dataclasses.replace(
        task_config,
        model="sd",
        clip=ClipSpec("tiny-clip", "clip.safetensors", "clip.json"),
    )
    resolved = relative.with_absolute_paths(tmp_path)
    assert resolved.clip == ClipSpec("tiny-clip", str(clip_file), str(config_file))
    assert resolved.model == str(model_dir)
    # A tag or a file that is not there stays as written.
    tagged = dataclasses.replace(relative, clip=ClipSpec("ViT-B-32", "laion2b_s34b_b79k", None))
    assert tagged.with_absolute_paths(tmp_path).clip == tagged.clip
