"""ZIP attribute-encoder training on Ray Train with tiny models: the base model stays frozen, the
artefact carries the head and its references, resume and two workers match one uninterrupted worker,
and editing with what was trained."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
from training_runs import assert_resumes_to_the_same_result, train

from pipeline.metrics.clip import build_random_clip
from pipeline.models.loading import fingerprint_modules
from pipeline.training.artefact import read_artefact
from pipeline.training.diffusion_clip import ClipSpec, WorldData
from pipeline.training.prior import PriorConfig
from pipeline.training.ray_train import history_of
from pipeline.training.zip_encoder import (
    REFERENCES_NAME,
    TeacherConfig,
    ZipEncoderConfig,
    ZipEncoderTask,
    config_from_mapping,
    styled_targets,
)

ITERATIONS = 3


@pytest.fixture(scope="module")
def task_config(tiny_sd_path, tmp_path_factory) -> ZipEncoderConfig:
    clip = build_random_clip(tmp_path_factory.mktemp("clip"))
    return ZipEncoderConfig(
        model=tiny_sd_path,
        clip=ClipSpec(clip.model_name, str(clip.checkpoint_path), str(clip.config_path)),
        data=WorldData(scenes=4, attribute="shape", value="star"),
        reference_prompt="a star",
        references=2,
        reference_steps=2,
        return_step=600,
        zip_step=300,
        forward_steps=3,
        generative_steps=3,
        inference_forward_steps=3,
        inference_generative_steps=3,
        hidden=8,
        lr=1e-2,
        batch=2,
    )


def _train(config: ZipEncoderConfig, output, workers: int = 1) -> dict:
    return train("zip_encoder", config, output, ITERATIONS, workers=workers)


@pytest.fixture(scope="module")
def one_worker_run(ray_local, task_config, tmp_path_factory) -> dict:
    return _train(task_config, tmp_path_factory.mktemp("zip-one-worker"))


def test_the_artefact_holds_the_head_the_references_and_the_base_fingerprint(one_worker_run, tiny_sd):
    assert one_worker_run["kind"] == "zip_encoder"
    assert one_worker_run["base_model_fingerprint"] == tiny_sd.fingerprint
    history = history_of(one_worker_run)
    assert len(history) == ITERATIONS and all(set(r) == {"loss", "direction", "l1"} for r in history)
    weights = read_artefact(one_worker_run["uri"]).weights
    references = weights[REFERENCES_NAME]
    assert references.dtype == torch.uint8 and references.shape == (
        2,
        tiny_sd.image_size,
        tiny_sd.image_size,
        3,
    )
    last = weights["head.layers.8.weight"]  # the zero-initialised output layer moved
    assert float(last.abs().max()) > 0.0


@pytest.mark.parametrize("prior", [PriorConfig(), PriorConfig(weight=5.0, condition="texts", form="delta")])
def test_training_leaves_the_diffusion_model_unchanged(task_config, prior):
    task = ZipEncoderTask(dataclasses.replace(task_config, prior=prior))
    task.setup(torch.device("cpu"), 0, 1)
    before = fingerprint_modules(task.model.unet, task.model.vae, task.model.text_encoder)
    assert before == task.base_fingerprint
    for iteration in range(2):
        task.step(iteration, lambda: None)
    assert fingerprint_modules(task.model.unet, task.model.vae, task.model.text_encoder) == before
    assert all(not parameter.requires_grad for parameter in task.model.unet.parameters())
    assert float(task.head.layers[-1].weight.detach().abs().max()) > 0.0  # ...while the head did train


def test_a_run_killed_after_a_checkpoint_resumes_to_the_same_result(
    ray_local, one_worker_run, task_config, tmp_path
):
    assert_resumes_to_the_same_result(
        "zip_encoder", task_config, tmp_path, ITERATIONS, one_worker_run, killed_after=1
    )


def test_two_workers_follow_the_one_worker_loss_curve(ray_local, one_worker_run, task_config, tmp_path):
    two = _train(task_config, tmp_path, workers=2)
    assert two["metrics"]["workers"] == 2
    # The first pass starts at Δh = 0, where ΔI = 0 and L_direction's gradient is ΔT / eps (huge);
    # Adam's first update is lr * sign(g) per weight, so weights whose gradient is at rounding level
    # there step differently in a batch of 2 and two batches of 1: the curves agree to 1e-2, not 1e-4.
    for single, double in zip(history_of(one_worker_run), history_of(two), strict=True):
        assert double["loss"] == pytest.approx(single["loss"], rel=1e-2, abs=1e-6)
    one, both = read_artefact(one_worker_run["uri"]).weights, read_artefact(two["uri"]).weights
    name = "head.layers.8.weight"
    moved = float(one[name].abs().max())
    assert moved > 1e-4 and float((one[name] - both[name]).abs().max()) < 0.1 * moved


def test_each_worker_takes_its_share_of_the_same_draw(task_config):
    def draw(rank: int, world_size: int) -> list[tuple[int, int]]:
        task = ZipEncoderTask(dataclasses.replace(task_config, batch=4))
        task.rank, task.world_size = rank, world_size
        task.start_latents, task.codes = torch.zeros(4), torch.zeros(2, 1)
        rows, references = task.draw(iteration=5)
        return list(zip(rows.tolist(), references.tolist(), strict=True))

    shares = [set(draw(rank, 2)) for rank in range(2)]
    assert shares[0] | shares[1] == set(draw(0, 1)) and len(shares[0]) == len(shares[1]) == 2


def test_the_encoder_edits_and_a_zero_scale_is_the_models_own_reconstruction(one_worker_run, tiny_sd, images):
    from pipeline.editors import (
        EditSettings,
        ZipEncoder,
        edit_with_editors,
        edit_with_zip,
        forward_to_return_step,
        generate_with_editors,
        load_editor,
        zip_reference_code,
    )

    encoder = load_editor(tiny_sd, one_worker_run["uri"])
    assert isinstance(encoder, ZipEncoder)
    settings = EditSettings.of(encoder)
    start = forward_to_return_step(tiny_sd, images, settings)
    reconstruction = generate_with_editors(tiny_sd, start, [], [], settings)
    assert torch.equal(edit_with_zip(tiny_sd, images, encoder, scale=0.0), reconstruction)
    edited = edit_with_editors(tiny_sd, images, [encoder], [1.0])
    assert torch.equal(edited, edit_with_zip(tiny_sd, images, encoder))
    assert not torch.equal(edited, reconstruction)
    # Which reference steers the edit: its code (how far three iterations move the edit with it is
    # below a grey level on the tiny model; tests/test_zip_world_benchmark.py measures that effect).
    own, other = (zip_reference_code(tiny_sd, encoder, image) for image in encoder.reference_images)
    assert torch.equal(own, zip_reference_code(tiny_sd, encoder, None))
    assert not torch.allclose(own, other)


def test_a_zip_encoder_edits_alone_and_only_on_its_base_model(one_worker_run, tiny_sd, images):
    from pipeline.editors import edit_with_editors, load_editor
    from pipeline.training.artefact import ArtefactError

    encoder = load_editor(tiny_sd, one_worker_run["uri"])
    with pytest.raises(ArtefactError, match="edits alone"):
        edit_with_editors(tiny_sd, images, [encoder, encoder], [0.5, 0.5])
    with pytest.raises(ArtefactError, match="takes no timestep window: its steps are set by its t_zip"):
        edit_with_editors(tiny_sd, images, [encoder], [1.0], windows=[(0, 300)])
    other = dataclasses.replace(tiny_sd, fingerprint="0" * 64)
    with pytest.raises(ArtefactError, match="trained on base model"):
        load_editor(other, one_worker_run["uri"])


def test_zip_step_must_lie_below_the_return_step():
    with pytest.raises(ValueError, match="zip_step"):
        ZipEncoderConfig(return_step=300, zip_step=300)


def test_extra_clips_give_the_loss_each_clips_own_directions_member_major(task_config, tmp_path, monkeypatch):
    from pipeline.methods import zip_attribute as za
    from pipeline.metrics.clip import tiny_clip_config
    from pipeline.training.diffusion_clip import load_clip, training_images_and_directions

    other = build_random_clip(
        tmp_path, tiny_clip_config() | {"embed_dim": 24}, name="tiny-clip-zip-other", seed=1
    )
    spec = ClipSpec(other.model_name, str(other.checkpoint_path), str(other.config_path))
    config = dataclasses.replace(task_config, extra_clips=(spec,))
    task = ZipEncoderTask(config)
    task.setup(torch.device("cpu"), 0, 1)
    width = task.text_directions.shape[-1]
    assert task.text_directions.shape == (2, config.data.scenes, width) and width > 24
    _, first = training_images_and_directions(config, task.clip)
    _, own = training_images_and_directions(config, load_clip(spec, torch.device("cpu")))
    torch.testing.assert_close(task.text_directions[0], first)
    torch.testing.assert_close(task.text_directions[1, :, :24], own)

    seen = {}
    original = za.full_pass_loss

    def recording(*arguments, **keywords):
        seen["embed"], seen["directions"] = arguments[6], arguments[7]
        return original(*arguments, **keywords)

    monkeypatch.setattr(za, "full_pass_loss", recording)
    task.step(0, lambda: None)
    rows = torch.as_tensor(task.draw(0)[0])
    torch.testing.assert_close(
        seen["directions"], torch.cat([first[rows], torch.nn.functional.pad(own[rows], (0, width - 24))])
    )
    images = torch.rand(len(rows), 3, 64, 64)
    assert seen["embed"](images).shape == (2 * len(rows), width)


def test_the_prior_scores_the_edited_pass_with_the_models_own_unet_and_the_rows_sources(
    task_config, monkeypatch
):
    from pipeline.methods import zip_attribute as za
    from pipeline.models.vae import encode_images
    from pipeline.training import diffusion_clip as dct

    config = dataclasses.replace(task_config, prior=PriorConfig(weight=4.0, condition="texts", form="delta"))
    task = ZipEncoderTask(config)
    task.setup(torch.device("cpu"), 0, 1)
    assert task.prior.unet is task.model.unet  # frozen already: no copy
    seen, original = {}, za.full_pass_loss

    def recording(*arguments, prior=None, **keywords):
        seen["prior"] = prior
        return original(*arguments, prior=prior, **keywords)

    monkeypatch.setattr(za, "full_pass_loss", recording)
    task.step(3, lambda: None)
    rows = torch.as_tensor(task.draw(3)[0])
    images = dct._at_resolution(dct.training_texts(config)[0], task.model.image_size)
    assert seen["prior"].weight == 4.0
    torch.testing.assert_close(
        seen["prior"].reference.latents, encode_images(task.model, torch.as_tensor(images))[rows]
    )
    assert seen["prior"].timestep == task.prior.term(3, rows).timestep
    with pytest.raises(ValueError, match="needs variant full_backprop"):
        dataclasses.replace(config, variant="per_step")
    assert ZipEncoderTask(task_config).config.prior.weight == 0.0


def test_the_teacher_is_the_frozen_models_own_word_swap_of_each_training_image(task_config, monkeypatch):
    from pipeline.engine import AttentionControl, EditRequest, InversionConfig, edit, invert
    from pipeline.methods import zip_attribute as za
    from pipeline.training import diffusion_clip as dct

    teacher = TeacherConfig(weight=2.5, steps=2, cross_replace=0.5, self_replace=0.25)
    config = dataclasses.replace(task_config, teacher=teacher)
    task = ZipEncoderTask(config)
    task.setup(torch.device("cpu"), 0, 1)
    before = fingerprint_modules(task.model.unet, task.model.vae, task.model.text_encoder)
    # By hand: each training image inverted with its caption and word-swapped to its caption with "star".
    images, captions, _ = dct.world_training_texts(config.data)
    assert all(
        "star" in target and "star" not in caption for caption, target in zip(captions, _, strict=True)
    )
    images = dct._at_resolution(images, task.model.image_size)
    inversion = invert(
        task.model, torch.as_tensor(images), captions, InversionConfig.of("direct", num_steps=2)
    )
    control = AttentionControl("replace", cross_replace_steps=0.5, self_replace_steps=0.25)
    results = edit(task.model, inversion, [EditRequest(i, target, control) for i, target in enumerate(_)])
    by_hand = torch.stack([torch.as_tensor(result.image) for result in results]).permute(0, 3, 1, 2)
    assert task.teacher_images.shape[0] == 1  # one group: nothing is copied from the references
    torch.testing.assert_close(task.teacher_images[0], by_hand.float() / 127.5 - 1.0)
    seen, original = {}, za.full_pass_loss

    def recording(*arguments, teacher=None, **keywords):
        seen["teacher"] = teacher
        return original(*arguments, teacher=teacher, **keywords)

    monkeypatch.setattr(za, "full_pass_loss", recording)
    terms = task.step(3, lambda: None)
    rows = torch.as_tensor(task.draw(3)[0])
    assert seen["teacher"].weight == 2.5
    torch.testing.assert_close(seen["teacher"].images, task.teacher_images[0, rows])
    assert set(terms) == {"loss", "direction", "l1", "teacher"}
    assert fingerprint_modules(task.model.unet, task.model.vae, task.model.text_encoder) == before


def test_a_teacher_needs_the_full_pass_and_a_non_negative_weight(task_config):
    from pipeline.training.zip_encoder import config_from_mapping

    with pytest.raises(ValueError, match="teacher.weight=1.0 needs variant full_backprop"):
        dataclasses.replace(task_config, teacher=TeacherConfig(weight=1.0), variant="per_step")
    with pytest.raises(ValueError, match="teacher.weight=-1"):
        TeacherConfig(weight=-1.0)
    with pytest.raises(ValueError, match="teacher.steps=0"):
        TeacherConfig(weight=1.0, steps=0)
    mapping = dataclasses.asdict(dataclasses.replace(task_config, teacher=TeacherConfig(weight=1.0, steps=3)))
    assert config_from_mapping(mapping).teacher == TeacherConfig(weight=1.0, steps=3)
    assert ZipEncoderTask(task_config).config.teacher.weight == 0.0


def test_a_training_image_the_teacher_cannot_edit_is_named(tiny_sd, images, monkeypatch):
    import types

    from pipeline import engine
    from pipeline.training.zip_encoder import teacher_edits

    def failing(model, inversion, requests):
        fine = types.SimpleNamespace(error=None, image=images[0].numpy())
        broken = types.SimpleNamespace(error="non-finite latents", image=None)
        return [fine if request.image_index == 0 else broken for request in requests]

    monkeypatch.setattr(engine, "edit", failing)
    captions = ["a red circle", "a blue square"]
    with pytest.raises(
        ValueError, match=r"training image 1 \('a blue square'\) could not be edited: non-finite"
    ):
        teacher_edits(
            tiny_sd,
            images[:2].numpy(),
            captions,
            ["a red star", "a blue star"],
            TeacherConfig(weight=1.0, steps=1),
        )


def steps_with_teacher_groups(
    task, monkeypatch, iterations: int, group_of_reference, weight: float
) -> set[int]:
    """Run `iterations` steps, checking that each step's teacher term holds, for every (image, reference)
    it drew, the teacher image of the reference's group `group_of_reference[reference]`, with `weight`.

    Returns:
        the references drawn.
    """
    from pipeline.methods import zip_attribute as za

    seen, original = [], za.full_pass_loss

    def recording(*arguments, teacher=None, **keywords):
        seen.append(teacher)
        return original(*arguments, teacher=teacher, **keywords)

    monkeypatch.setattr(za, "full_pass_loss", recording)
    drawn = set()
    for iteration in range(iterations):
        task.step(iteration, lambda: None)
        rows, references = task.draw(iteration)
        drawn.update(int(reference) for reference in references)
        expected = [
            task.teacher_images[group_of_reference[int(reference)], int(row)]
            for row, reference in zip(rows, references, strict=True)
        ]
        torch.testing.assert_close(seen[-1].images, torch.stack(expected))
        assert seen[-1].weight == weight
    return drawn


def test_styled_targets_take_each_prompts_copied_attributes():
    targets = ["a green star on a black background", "a red star on a striped background"]
    prompts = ("a blue star on a white background", "a red star on a gray background")
    assert styled_targets(targets, prompts, ()) == [targets]
    assert styled_targets(targets, prompts, ("color",)) == [
        ["a blue star on a black background", "a blue star on a striped background"],
        ["a red star on a black background", "a red star on a striped background"],
    ]
    assert styled_targets(targets, prompts, ("color", "background")) == [
        ["a blue star on a white background"] * 2,
        ["a red star on a gray background"] * 2,
    ]


def test_a_styled_teacher_teaches_each_image_its_references_colour(task_config, monkeypatch):
    from pipeline.training import diffusion_clip as dct
    from pipeline.training.zip_encoder import render_references, teacher_edits

    prompts = ("a blue star on a white background", "a red star on a white background")
    teacher = TeacherConfig(weight=1.5, steps=2, copy_attributes=("color",))
    config = dataclasses.replace(task_config, reference_prompts=prompts, teacher=teacher)
    task = ZipEncoderTask(config)
    task.setup(torch.device("cpu"), 0, 1)
    # References rendered prompt after prompt, `references` (2) from each.
    by_prompt = [
        render_references(task.model, prompt, [0, 1], 2, config.reference_guidance) for prompt in prompts
    ]
    assert torch.equal(task.reference_images, torch.cat(by_prompt))
    # One teacher group per prompt: each image's caption with "star" and the prompt's colour, by hand.
    images, captions, targets = dct.world_training_texts(config.data)
    images = dct._at_resolution(images, task.model.image_size)
    assert task.teacher_images.shape[:2] == (2, len(images))
    for group, colour in enumerate(["blue", "red"]):
        recoloured = [" ".join(["a", colour, *target.split()[2:]]) for target in targets]
        by_hand = teacher_edits(task.model, images, captions, recoloured, teacher)
        torch.testing.assert_close(task.teacher_images[group], by_hand)
    drawn = steps_with_teacher_groups(task, monkeypatch, 6, [0, 0, 1, 1], weight=1.5)
    assert drawn == {0, 1, 2, 3}  # every reference of both prompts was paired with some image


def test_copied_attributes_need_a_teacher_other_attributes_and_one_object_prompts(task_config):
    styled = TeacherConfig(weight=1.0, copy_attributes=("color",))
    with pytest.raises(ValueError, match="copy_attributes needs a teacher"):
        dataclasses.replace(task_config, teacher=TeacherConfig(copy_attributes=("color",)))
    with pytest.raises(ValueError, match="'shape' is not one of"):
        dataclasses.replace(task_config, teacher=TeacherConfig(weight=1.0, copy_attributes=("shape",)))
    with pytest.raises(ValueError, match="'size' is not one of"):
        dataclasses.replace(task_config, teacher=TeacherConfig(weight=1.0, copy_attributes=("size",)))
    with pytest.raises(ValueError, match="'a star' does not follow"):
        dataclasses.replace(task_config, teacher=styled)  # the fixture's reference_prompt
    two_objects = "a red star and a blue circle on a white background"
    with pytest.raises(ValueError, match="needs one-object captions"):
        dataclasses.replace(task_config, reference_prompts=(two_objects,), teacher=styled)
    with pytest.raises(ValueError, match="unset reference_text"):
        dataclasses.replace(
            task_config,
            reference_prompts=("a red star on a white background",),
            reference_text="a circle",
            target_text="a star",
            teacher=styled,
        )
    config = dataclasses.replace(
        task_config, reference_prompts=("a red star on a white background",), teacher=styled
    )
    assert config.prompts == ("a red star on a white background",)
    assert (
        config_from_mapping(json.loads(json.dumps(dataclasses.asdict(config)))) == config
    )  # as artefacts keep it
    assert task_config.prompts == ("a star",)


def test_several_reference_prompts_without_copying_share_one_teacher(task_config, monkeypatch):

    prompts = ("a blue star on a white background", "a red star on a white background")
    config = dataclasses.replace(
        task_config, reference_prompts=prompts, teacher=TeacherConfig(weight=1.0, steps=2)
    )
    task = ZipEncoderTask(config)
    task.setup(torch.device("cpu"), 0, 1)
    assert len(task.reference_images) == 4 and task.teacher_images.shape[0] == 1
    # draws reach the second prompt's references, which have no group of their own
    assert {2, 3} & steps_with_teacher_groups(task, monkeypatch, 4, [0, 0, 0, 0], weight=1.0)


def test_standardised_reference_codes_travel_with_the_head(task_config):
    from pipeline.training.zip_encoder import load_head, reference_codes_of

    prompts = ("a blue star on a white background", "a red star on a white background")
    config = dataclasses.replace(task_config, reference_prompts=prompts, reference_norm="standardise")
    task = ZipEncoderTask(config)
    task.setup(torch.device("cpu"), 0, 1)
    codes = reference_codes_of(task.model, task.reference_images)  # the four references' r, read again
    torch.testing.assert_close(task.head.code_mean, codes.mean(dim=0))
    torch.testing.assert_close(task.head.code_scale, (codes - codes.mean(dim=0)).pow(2).mean().sqrt())
    weights, artefact_config, _ = task.artefact()
    head = load_head(weights, json.loads(json.dumps(artefact_config)))
    torch.testing.assert_close(head.code_mean, task.head.code_mean)
    torch.testing.assert_close(head.code_scale, task.head.code_scale)
    # An artefact written before codes could be standardised reads r as it is.
    older = {name: tensor for name, tensor in weights.items() if "code_" not in name}
    identity = load_head(older, artefact_config)
    assert torch.equal(identity.code_mean, torch.zeros_like(head.code_mean))
    assert float(identity.code_scale) == 1.0
    with pytest.raises(RuntimeError, match="Unexpected key"):  # ...but a weight the head lacks is refused
        load_head(weights | {"head.extra.weight": torch.zeros(1)}, artefact_config)
    plain = ZipEncoderTask(dataclasses.replace(config, reference_norm="none"))
    plain.setup(torch.device("cpu"), 0, 1)
    assert float(plain.head.code_scale) == 1.0 and not plain.head.code_mean.any()


def test_teacher_groups_follow_the_copied_values_of_every_references_prompt(task_config):
    from pipeline.training.zip_encoder import GivenReference, teacher_groups

    prompts = ("a blue star on a white background", "a red star on a white background")
    given = (
        GivenReference("red.png", "a red star on a black background"),  # red again: the red group
        GivenReference("green.png", "a green star on a white background"),  # a colour not rendered
    )
    styled = TeacherConfig(weight=1.0, copy_attributes=("color",))
    config = dataclasses.replace(
        task_config, reference_prompts=prompts, given_references=given, teacher=styled
    )
    assert config.prompt_of_each_reference == (prompts[0], prompts[0], prompts[1], prompts[1]) + tuple(
        reference.prompt for reference in given
    )
    assert teacher_groups(config) == (
        (prompts[0], prompts[1], given[1].prompt),
        (0, 0, 1, 1, 1, 2),
    )
    both = dataclasses.replace(
        config, teacher=TeacherConfig(weight=1.0, copy_attributes=("color", "background"))
    )
    assert teacher_groups(both)[1] == (0, 0, 1, 1, 2, 3)
    unstyled = dataclasses.replace(config, teacher=TeacherConfig(weight=1.0))
    assert teacher_groups(unstyled) == ((prompts[0],), (0,) * 6)
    with pytest.raises(ValueError, match="'a star' does not follow"):  # a given prompt is checked too
        dataclasses.replace(config, given_references=(GivenReference("x.png", "a star"),))


def test_given_references_are_trained_on_with_the_teacher_of_their_prompt(task_config, tmp_path, monkeypatch):
    from PIL import Image

    from pipeline.training import diffusion_clip as dct
    from pipeline.training.zip_encoder import GivenReference, render_references, teacher_edits
    from pipeline.world import generator

    drawn = {}
    for color, background in (("red", "black"), ("green", "white")):
        star = generator.SceneObject(shape="star", color=color, center=(30.0, 34.0), radius=14.0)
        scene = generator.Scene(objects=(star,), background=background, seed=3)
        drawn[color] = generator.render(scene).image
        Image.fromarray(drawn[color]).save(tmp_path / f"{color}.png")
    prompts = ("a blue star on a white background", "a red star on a white background")
    teacher = TeacherConfig(weight=1.0, steps=2, copy_attributes=("color",))
    spec_config = dataclasses.replace(
        task_config,
        reference_prompts=prompts,
        given_references=(
            GivenReference("red.png", "a red star on a black background"),
            GivenReference("green.png", "a green star on a white background"),
        ),
        teacher=teacher,
    )
    assert (
        config_from_mapping(json.loads(json.dumps(dataclasses.asdict(spec_config)))) == spec_config
    )  # as artefacts keep it
    # relative paths are read against `base` (the working folder for `inversa train`)
    config = spec_config.with_absolute_paths(tmp_path)
    assert config.given_references[1].image == str(tmp_path / "green.png")
    task = ZipEncoderTask(config)
    task.setup(torch.device("cpu"), 0, 1)
    size = task.model.image_size
    resized = {
        color: torch.as_tensor(
            np.array(Image.fromarray(image).resize((size, size), Image.Resampling.LANCZOS))
        )
        for color, image in drawn.items()
    }
    rendered = [
        render_references(task.model, prompt, [0, 1], 2, config.reference_guidance) for prompt in prompts
    ]
    given = [resized["red"][None], resized["green"][None]]
    assert torch.equal(task.reference_images, torch.cat(rendered + given))
    # Three teacher groups: blue, red (the rendered red references and the given red one), green.
    assert task.teacher_images.shape[0] == 3
    images, captions, targets = dct.world_training_texts(config.data)
    images = dct._at_resolution(images, size)
    green = [" ".join(["a", "green", *target.split()[2:]]) for target in targets]
    torch.testing.assert_close(
        task.teacher_images[2], teacher_edits(task.model, images, captions, green, teacher)
    )
    reached = steps_with_teacher_groups(task, monkeypatch, 8, [0, 0, 1, 1, 1, 2], weight=1.0)
    assert {4, 5} <= reached  # both given references were drawn
    weights, _, _ = task.artefact()
    assert torch.equal(weights[REFERENCES_NAME][-1], resized["green"])  # they travel with the encoder
