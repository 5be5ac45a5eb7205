"""DiffusionCLIP training on Ray Train with tiny models: checkpoints, resume after a failure, two
data-parallel workers against one, the artefact, and editing with what was trained."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from training_runs import assert_resumes_to_the_same_result, train

from pipeline.diffusion.tokens import encode_prompts
from pipeline.metrics.clip import build_random_clip
from pipeline.models.vae import encode_images
from pipeline.training import diffusion_clip as dc_training
from pipeline.training.artefact import read_artefact
from pipeline.training.diffusion_clip import ClipSpec, DiffusionClipConfig, DiffusionClipTask, WorldData
from pipeline.training.prior import PRIOR_FIRST_STEP, PriorConfig
from pipeline.training.ray_train import history_of

ITERATIONS = 4


@pytest.fixture(scope="module")
def task_config(tiny_sd_path, tmp_path_factory) -> DiffusionClipConfig:
    clip = build_random_clip(tmp_path_factory.mktemp("clip"))
    return DiffusionClipConfig(
        model=tiny_sd_path,
        clip=ClipSpec(clip.model_name, str(clip.checkpoint_path), str(clip.config_path)),
        data=WorldData(scenes=4, attribute="shape", value="star"),
        return_step=400,
        forward_steps=4,
        generative_steps=2,
        inference_forward_steps=4,
        inference_generative_steps=2,
        lr=1e-3,
        batch=2,
        adapter="lora",
        lora_rank=2,
        lora_alpha=2.0,
    )


def _train(config: DiffusionClipConfig, output, workers: int = 1) -> dict:
    return train("diffusion_clip", config, output, ITERATIONS, workers=workers)


@pytest.fixture(scope="module")
def one_worker_run(ray_local, task_config, tmp_path_factory) -> dict:
    return _train(task_config, tmp_path_factory.mktemp("one-worker"))


def test_the_artefact_records_the_base_model_config_and_losses(one_worker_run, tiny_sd, task_config):
    assert one_worker_run["kind"] == "diffusion_clip"
    assert one_worker_run["base_model_fingerprint"] == tiny_sd.fingerprint
    assert one_worker_run["config"]["adapter_resolved"] == "lora"
    assert one_worker_run["config"]["return_step"] == task_config.return_step
    history = history_of(one_worker_run)
    assert len(history) == ITERATIONS and one_worker_run["metrics"]["workers"] == 1
    assert one_worker_run["metrics"]["resumed_from"] == 0
    assert all(set(record) == {"loss", "direction", "l1"} for record in history)


def test_a_run_killed_after_a_checkpoint_resumes_to_the_same_result(
    ray_local, one_worker_run, task_config, tmp_path
):
    assert_resumes_to_the_same_result(
        "diffusion_clip", task_config, tmp_path, ITERATIONS, one_worker_run, killed_after=2
    )


def test_two_workers_follow_the_one_worker_loss_curve(ray_local, one_worker_run, task_config, tmp_path):
    two = _train(task_config, tmp_path, workers=2)
    assert two["metrics"]["workers"] == 2
    for single, double in zip(history_of(one_worker_run), history_of(two), strict=True):
        assert double["loss"] == pytest.approx(single["loss"], rel=1e-4, abs=1e-6)
    # The adapters' B matrices start at zero: how far they moved is what the workers must agree on.
    one, both = read_artefact(one_worker_run["uri"]).weights, read_artefact(two["uri"]).weights
    moved = max(float(one[name].abs().max()) for name in one if "lora_B" in name)
    apart = max(float((one[name] - both[name]).abs().max()) for name in one if "lora_B" in name)
    assert moved > 1e-4 and apart < 1e-2 * moved


def test_each_worker_takes_its_share_of_the_same_batch(task_config):
    shares = []
    for rank in range(2):
        task = DiffusionClipTask(dataclasses.replace(task_config, batch=4))
        task.rank, task.world_size, task.start_latents = rank, 2, torch.zeros(4)
        shares.append(set(task.rows(iteration=3).tolist()))
    whole = DiffusionClipTask(dataclasses.replace(task_config, batch=4))
    whole.rank, whole.world_size, whole.start_latents = 0, 1, torch.zeros(4)
    assert shares[0] | shares[1] == set(whole.rows(iteration=3).tolist()) and not shares[0] & shares[1]


def test_the_trained_editor_loads_and_a_zero_weight_leaves_the_original_model(
    one_worker_run, tiny_sd, images, tmp_path
):
    from pipeline.editors import EditSettings, forward_to_return_step, generate_with_editors, load_editor

    uri = one_worker_run["uri"]
    editor = load_editor(tiny_sd, uri)
    settings = EditSettings.of(editor)
    start = forward_to_return_step(tiny_sd, images, settings)
    original = generate_with_editors(tiny_sd, start, [], [], settings)
    assert torch.equal(generate_with_editors(tiny_sd, start, [editor], [0.0], settings), original)
    edited = generate_with_editors(tiny_sd, start, [editor], [1.0], settings)
    assert not torch.equal(edited, original)  # the adapters changed the model


def test_an_editor_trained_on_another_base_model_is_refused(one_worker_run, tiny_sd):
    from pipeline.editors import load_editor
    from pipeline.training.artefact import ArtefactError

    other = dataclasses.replace(tiny_sd, fingerprint="0" * 64)
    with pytest.raises(ArtefactError, match="trained on base model"):
        load_editor(other, one_worker_run["uri"])


def test_auto_adapter_trains_lora_only_for_large_unets(tiny_sd, monkeypatch):
    from pipeline.training import diffusion_clip

    config = DiffusionClipConfig(adapter="auto")
    assert diffusion_clip.resolved_adapter(config, tiny_sd.unet) == "full"
    monkeypatch.setattr(diffusion_clip, "AUTO_LORA_PARAMETERS", 1000)
    assert diffusion_clip.resolved_adapter(config, tiny_sd.unet) == "lora"
    assert (
        diffusion_clip.resolved_adapter(dataclasses.replace(config, adapter="full"), tiny_sd.unet) == "full"
    )


def test_world_texts_change_only_the_attribute_and_skip_scenes_that_have_the_value():
    from pipeline.training.diffusion_clip import world_training_texts
    from pipeline.world import generator

    images, references, targets = world_training_texts(WorldData(scenes=12, attribute="color", value="blue"))
    assert images.shape == (12, 64, 64, 3)
    for reference, target in zip(references, targets, strict=True):
        source, edited = generator.parse_caption(reference), generator.parse_caption(target)
        assert source["objects"][0]["color"] != "blue" and edited["objects"][0]["color"] == "blue"
        assert source["objects"][0]["shape"] == edited["objects"][0]["shape"]
        assert source["background"] == edited["background"]


@pytest.mark.parametrize(("variant", "optimizer_steps"), [("full_backprop", 1), ("memory_efficient", 2)])
def test_an_iteration_steps_the_optimiser_once_or_once_per_generative_step(
    task_config, variant, optimizer_steps
):
    task = DiffusionClipTask(dataclasses.replace(task_config, variant=variant))
    task.setup(torch.device("cpu"), rank=0, world_size=1)
    synced = []
    metrics = task.step(0, lambda: synced.append(True))
    assert set(metrics) == {"loss", "direction", "l1"} and len(synced) == optimizer_steps
    assert {int(state["step"]) for state in task.optimizer.state.values()} == {optimizer_steps}


def test_the_learning_rate_grows_by_the_papers_factor_every_so_many_iterations(task_config):
    task = DiffusionClipTask(dataclasses.replace(task_config, lr=1e-4, lr_growth=1.2, lr_growth_every=50))
    expected = {0: 1e-4, 49: 1e-4, 50: 1.2e-4, 99: 1.2e-4, 100: 1.44e-4, 310: 1e-4 * 1.2**6}
    for iteration, lr in expected.items():
        assert task.learning_rate(iteration) == pytest.approx(lr)
    assert DiffusionClipTask(task_config).learning_rate(1000) == task_config.lr  # no growth by default


def test_each_iteration_runs_at_its_own_learning_rate_and_the_log_form_trains(task_config):
    config = dataclasses.replace(task_config, lr_growth=2.0, lr_growth_every=1, direction_form="log")
    task = DiffusionClipTask(config)
    task.setup(torch.device("cpu"), rank=0, world_size=1)
    logged = task.step(3, lambda: None)
    assert task.optimizer.param_groups[0]["lr"] == pytest.approx(task_config.lr * 8)
    cosine_task = DiffusionClipTask(task_config)
    cosine_task.setup(torch.device("cpu"), rank=0, world_size=1)
    cosine = cosine_task.step(3, lambda: None)
    # The same batch before any step: eq. 9's terms agree, the trained loss is the log form's (convex in
    # L, so its mean is at least its value at the mean L).
    assert logged["direction"] == pytest.approx(cosine["direction"]) and logged["l1"] == pytest.approx(
        cosine["l1"]
    )
    assert cosine["loss"] == pytest.approx(cosine["direction"] + task_config.l1_weight * cosine["l1"])
    log_term = logged["loss"] - task_config.l1_weight * logged["l1"]
    assert log_term >= -math.log(1 - logged["direction"] / 2) - 1e-6 and log_term != pytest.approx(
        logged["direction"]
    )
    with pytest.raises(ValueError, match="lr_growth"):
        dataclasses.replace(task_config, lr_growth=0.0)
    with pytest.raises(ValueError, match="direction_floor"):
        dataclasses.replace(task_config, direction_floor=2.0)
    # A floor above every image's L_direction leaves only the L1 term to train on.
    floored = DiffusionClipTask(dataclasses.replace(task_config, direction_floor=1.99))
    floored.setup(torch.device("cpu"), rank=0, world_size=1)
    metrics = floored.step(3, lambda: None)
    assert metrics["loss"] == pytest.approx(task_config.l1_weight * metrics["l1"])


def test_text_directions_per_image_and_their_mean_unit_direction():
    import torch.nn.functional as F

    from pipeline.training.diffusion_clip import text_directions

    table = {"a": torch.tensor([1.0, 0.0]), "b": torch.tensor([0.0, 2.0]), "c": torch.tensor([3.0, 4.0])}

    class Texts:
        def text_embeddings(self, texts):
            return torch.stack([table[text] for text in texts])

    per_image = text_directions(Texts(), ["a", "a"], ["b", "c"], "per_image")
    assert torch.equal(per_image, torch.tensor([[-1.0, 2.0], [2.0, 4.0]]))
    mean = text_directions(Texts(), ["a", "a"], ["b", "c"], "mean")
    expected = (
        F.normalize(torch.tensor([-1.0, 2.0]), dim=0) + F.normalize(torch.tensor([2.0, 4.0]), dim=0)
    ) / 2
    assert torch.allclose(mean, expected.expand(2, 2))


def test_attribute_changes_pair_each_caption_lacking_a_value_with_the_caption_changed_to_it():
    from pipeline.training.diffusion_clip import attribute_changes
    from pipeline.world import generator

    captions = ["a red circle on a white background", "a blue square on a gray background"]
    changes = attribute_changes(captions, "color")
    assert len(changes) == len(generator.COLORS)
    for value, (references, targets) in zip(generator.COLORS, changes, strict=True):
        assert references == [caption for caption in captions if f" {value} " not in caption]
        for reference, target in zip(references, targets, strict=True):
            changed = [(a, b) for a, b in zip(reference.split(), target.split(), strict=True) if a != b]
            assert changed == [(generator.parse_caption(reference)["objects"][0]["color"], value)]
    # a value every caption already has gives no pair (its mean direction would be empty)
    assert len(attribute_changes(captions[:1], "color")) == len(generator.COLORS) - 1
    backgrounds = attribute_changes(captions, "background")
    assert [targets for _, targets in backgrounds][0] == ["a blue square on a white background"]


def test_kept_directions_are_mean_unit_directions_per_value_and_one_per_text_pair():
    import torch.nn.functional as F

    from pipeline.training.diffusion_clip import kept_directions

    class Texts:
        def text_embeddings(self, texts):
            # the colour word's index as one coordinate, the shape word's as another
            from pipeline.world import generator

            rows = []
            for text in texts:
                words = text.split()
                colour = list(generator.COLORS).index(words[1]) if words[1] in generator.COLORS else 0
                shape = list(generator.SHAPES).index(words[2]) if words[2] in generator.SHAPES else 0
                rows.append(torch.tensor([float(colour), float(shape), float(len(words))]))
            return torch.stack(rows)

    captions = ["a red circle on a white background", "a green square on a white background"]
    kept = kept_directions(Texts(), captions, ("color",), (("a red x", "a green star"),))
    assert kept.shape == (6 + 1, 3)
    # to red: only the green square changes (index 1 -> 0); to blue: both (0 -> 2 and 1 -> 2)
    assert torch.allclose(kept[0], torch.tensor([-1.0, 0.0, 0.0]))
    assert torch.allclose(kept[2], torch.tensor([1.0, 0.0, 0.0]))
    assert torch.allclose(kept[-1], F.normalize(torch.tensor([1.0, 3.0, 0.0]), dim=0))
    assert kept_directions(Texts(), captions, (), ()) is None


def test_keeping_colour_removes_the_colour_directions_from_every_training_direction(task_config):
    from pipeline.methods import diffusion_clip as dc
    from pipeline.training.diffusion_clip import (
        kept_directions,
        load_clip,
        training_images_and_directions,
        world_training_texts,
    )

    clip = load_clip(task_config.clip, torch.device("cpu"))
    _, captions, _ = world_training_texts(task_config.data)
    kept = kept_directions(clip, captions, ("color",), ())
    _, plain = training_images_and_directions(task_config, clip)
    config = dataclasses.replace(task_config, keep_attributes=("color",))
    images, directions = training_images_and_directions(config, clip)
    assert images.shape[0] == task_config.data.scenes and directions.shape == plain.shape
    torch.testing.assert_close(directions, dc.without_kept_directions(plain, kept))
    torch.testing.assert_close(
        directions @ kept.T, torch.zeros(len(directions), len(kept)), atol=1e-5, rtol=0
    )
    assert (plain @ kept.T).abs().max() > 1e-3  # the random CLIP's directions did carry colour


@pytest.mark.parametrize(
    ("keep", "message"), [(("shape",), "is the attribute being edited"), (("size",), "is not one of")]
)
def test_a_kept_attribute_must_be_another_world_attribute(task_config, keep, message):
    from pipeline.training.zip_encoder import ZipEncoderConfig

    with pytest.raises(ValueError, match=message):
        dataclasses.replace(task_config, keep_attributes=keep)
    with pytest.raises(ValueError, match=message):
        ZipEncoderConfig(data=task_config.data, keep_attributes=keep)


def test_kept_attributes_and_texts_survive_the_json_form_workers_receive(task_config):
    import json

    from pipeline.training import zip_encoder
    from pipeline.training.diffusion_clip import config_from_mapping

    config = dataclasses.replace(
        task_config, keep_attributes=("color", "background"), keep_texts=(("a red x", "a blue x"),)
    )
    assert config_from_mapping(json.loads(json.dumps(dataclasses.asdict(config)))) == config
    zip_config = zip_encoder.ZipEncoderConfig(keep_attributes=("color",), keep_texts=(("a", "b"),))
    mapping = json.loads(json.dumps(dataclasses.asdict(zip_config)))
    assert zip_encoder.config_from_mapping(mapping) == zip_config


def test_clip_views_see_source_and_edit_through_the_same_views_drawn_per_iteration(task_config, monkeypatch):
    from pipeline.methods import diffusion_clip as dc

    plain = DiffusionClipTask(task_config)
    plain.setup(torch.device("cpu"), rank=0, world_size=1)
    rows = torch.as_tensor(plain.rows(0))
    embed, sources, directions = plain.direction_terms(rows, 0)
    assert torch.equal(sources, plain.source_embeddings[0, rows]) and torch.equal(
        directions, plain.text_directions[0, rows]
    )

    task = DiffusionClipTask(dataclasses.replace(task_config, clip_views=3, clip_view_shift=2))
    task.setup(torch.device("cpu"), rank=0, world_size=1)
    embed, sources, directions = task.direction_terms(rows, 0)
    source_pixels = (task.source_images[rows] + 1.0) / 2.0
    assert sources.shape == (3 * len(rows), sources.shape[1])
    torch.testing.assert_close(directions, torch.cat([task.text_directions[0, rows]] * 3))
    # the edit's embedding function sees the sources' views: an unchanged image has no direction
    torch.testing.assert_close(embed(source_pixels), sources)
    # the views are those of (seed, iteration): the same again for this iteration, others for the next
    _, again, _ = task.direction_terms(rows, 0)
    _, following, _ = task.direction_terms(rows, 1)
    assert torch.equal(again, sources) and not torch.allclose(following, sources)
    views_seen = []
    original = dc.apply_views
    monkeypatch.setattr(
        dc, "apply_views", lambda images, views: views_seen.append(views) or original(images, views)
    )
    task.direction_terms(rows, 0)
    assert len(views_seen[0]) == 3 and all(abs(v.dx) <= 2 and abs(v.dy) <= 2 for v in views_seen[0])
    with pytest.raises(ValueError, match="clip_views=-1"):
        dataclasses.replace(task_config, clip_views=-1)


def test_extra_clips_each_give_their_own_directions_and_embeddings_member_major(task_config, tmp_path):
    import json

    from pipeline.metrics.clip import tiny_clip_config
    from pipeline.training.diffusion_clip import (
        config_from_mapping,
        load_clip,
        training_images_and_directions,
    )

    other = build_random_clip(
        tmp_path, tiny_clip_config() | {"embed_dim": 24}, name="tiny-clip-other", seed=1
    )
    relative = ClipSpec(other.model_name, other.checkpoint_path.name, other.config_path.name)
    config = dataclasses.replace(
        task_config, extra_clips=(relative,), keep_attributes=("color",), clip_views=2, clip_view_shift=1
    )
    config = config.with_absolute_paths(tmp_path)
    spec = ClipSpec(other.model_name, str(other.checkpoint_path), str(other.config_path))
    assert config.extra_clips == (spec,)
    assert config_from_mapping(json.loads(json.dumps(dataclasses.asdict(config)))) == config

    task = DiffusionClipTask(config)
    task.setup(torch.device("cpu"), rank=0, world_size=1)
    single = DiffusionClipTask(dataclasses.replace(config, extra_clips=()))
    single.setup(torch.device("cpu"), rank=0, world_size=1)
    width = single.text_directions.shape[-1]
    assert width > 24 and task.text_directions.shape == (2, config.data.scenes, width)
    # member 0 is the first CLIP's ΔT_keep, member 1 the other CLIP's own, zero-padded to the wider one
    torch.testing.assert_close(task.text_directions[0], single.text_directions[0])
    _, own = training_images_and_directions(config, load_clip(spec, torch.device("cpu")))
    torch.testing.assert_close(task.text_directions[1, :, :24], own)
    assert not task.text_directions[1, :, 24:].any()

    rows = torch.as_tensor(task.rows(0))
    embed, sources, directions = task.direction_terms(rows, 0)
    _, single_sources, single_directions = single.direction_terms(rows, 0)
    views_rows = 2 * len(rows)  # member-major, then view-major within each member
    assert sources.shape == directions.shape == (2 * views_rows, width)
    torch.testing.assert_close(sources[:views_rows], single_sources)
    torch.testing.assert_close(directions[:views_rows], single_directions)
    torch.testing.assert_close(directions[views_rows:, :24], own[rows].repeat(2, 1))
    torch.testing.assert_close(embed((task.source_images[rows] + 1.0) / 2.0), sources)


def test_the_prior_scores_with_a_frozen_copy_of_the_original_unet_and_a_worker_invariant_draw(task_config):
    config = dataclasses.replace(task_config, prior=PriorConfig(weight=5.0), adapter="full")
    one = DiffusionClipTask(config)
    one.setup(torch.device("cpu"), 0, 1)
    original = {name: value.clone() for name, value in one.prior.unet.state_dict().items()}
    draw = one.prior_term(iteration=3)
    assert (draw.weight, draw.noise.shape[0]) == (5.0, config.batch)
    assert PRIOR_FIRST_STEP <= draw.timestep <= config.return_step
    assert draw.alpha == float(one.model.scheduler.alphas_cumprod[draw.timestep])
    # The same (seed, iteration) gives the same draw; each of two workers takes its rows' noise.
    again = one.prior_term(iteration=3)
    assert again.timestep == draw.timestep and torch.equal(again.noise, draw.noise)
    other = one.prior_term(iteration=4)
    assert not torch.equal(other.noise, draw.noise)
    second = DiffusionClipTask(config)
    second.setup(torch.device("cpu"), 1, 2)
    assert torch.equal(second.prior_term(iteration=3).noise, draw.noise[1::2])
    # A step trains the UNet and leaves the prior's copy as it was.
    one.step(0, lambda: None)
    assert all(torch.equal(one.prior.unet.state_dict()[name], value) for name, value in original.items())
    moved = any(not torch.equal(one.model.unet.state_dict()[name], value) for name, value in original.items())
    assert moved and not any(parameter.requires_grad for parameter in one.prior.unet.parameters())
    assert DiffusionClipTask(task_config).prior_term(iteration=3) is None  # off by default


def test_the_delta_prior_on_texts_reads_each_rows_captions_and_its_source(task_config):
    """prior condition texts + form delta: the frozen model at each row's y_tar on z_t and at its
    y_ref on the source latent noised alike, both guided by w against ""."""
    config = dataclasses.replace(
        task_config, prior=PriorConfig(weight=2.0, condition="texts", form="delta", guidance=3.0)
    )
    task = DiffusionClipTask(config)
    task.setup(torch.device("cpu"), 0, 1)
    images, references, targets = dc_training.world_training_texts(config.data)
    rows = torch.as_tensor(task.rows(5))
    draw = task.prior_term(iteration=5)
    model = task.model
    torch.testing.assert_close(
        draw.reference.latents,
        encode_images(model, torch.as_tensor(dc_training._at_resolution(images, model.image_size)))[rows],
    )

    def expected(texts: list[str], latents: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            conditions = encode_prompts(
                model.tokenizer, model.text_encoder, [texts[int(row)] for row in rows]
            )
            none = encode_prompts(model.tokenizer, model.text_encoder, [""]).expand(len(rows), -1, -1)
            unet = task.prior.unet
            conditional = unet(latents, draw.timestep, encoder_hidden_states=conditions).sample
            unconditional = unet(latents, draw.timestep, encoder_hidden_states=none).sample
        return unconditional + 3.0 * (conditional - unconditional)

    latents = torch.randn_like(draw.noise)
    torch.testing.assert_close(draw.noise_fn(latents, draw.timestep), expected(targets, latents))
    torch.testing.assert_close(draw.reference.noise_fn(latents, draw.timestep), expected(references, latents))
    assert references != targets
    # The plain prior scores with the editor's prompt and the drawn eps as its baseline.
    plain = DiffusionClipTask(dataclasses.replace(task_config, prior=PriorConfig(weight=2.0)))
    plain.setup(torch.device("cpu"), 0, 1)
    assert plain.prior_term(iteration=5).reference is None
    with torch.no_grad():
        prompt = plain.prior.unet(
            latents, draw.timestep, encoder_hidden_states=plain.condition.expand(2, -1, -1)
        )
    torch.testing.assert_close(plain.prior_term(iteration=5).noise_fn(latents, draw.timestep), prompt.sample)


def test_the_prior_needs_full_backprop(task_config):
    with pytest.raises(ValueError, match="prior.weight=1.0 needs variant full_backprop"):
        dataclasses.replace(task_config, prior=PriorConfig(weight=1.0), variant="memory_efficient")
