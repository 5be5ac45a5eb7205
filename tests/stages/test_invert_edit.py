"""The invert/edit actor (called directly, no Ray) against the engine run by hand on the same inputs:
which prompt each image is inverted with, and that every edit equals the engine's own edit of it."""

from __future__ import annotations

import json

import numpy as np
import pytest

from pipeline import engine
from pipeline.config import EditSpec, JobInversionConfig, MetricsConfig
from pipeline.engine import EditRequest, EngineInputError
from pipeline.stages import invert_edit
from pipeline.stages.invert_edit import InvertEditActor
from pipeline.stages.rows import NO_FAILURES, Failure, decode_failures

SPECS = (
    EditSpec(target_class="square", source_classes=("circle", "star"), seeds=(0, 1), eta=0.8),
    EditSpec(target_class="triangle", source_classes=("circle",)),
)
# Row 0 gets three edits under two target prompts, row 1 two under one, row 2 none (its class is not edited).
CLASSES = ["circle", "star", "square"]


def source_batch(images, prompts) -> dict[str, np.ndarray]:
    """Three preprocessed ok rows, as the preprocess stage hands them to the actor."""
    count = len(CLASSES)

    def objects(values):
        return np.array(values, dtype=object)

    return {
        "status": objects(["ok"] * count),
        "failures": objects([NO_FAILURES] * count),
        "image": images[:count].numpy(),
        "caption": objects([prompts[0], prompts[2], prompts[1]]),
        "source_id": objects([f"shard.tar#{index}" for index in range(count)]),
        "source_class": objects(CLASSES),
        "meta": objects(["{}"] * count),
        "stage_seconds": np.zeros(count),
    }


def run_actor(model_path, batch, inversion, monkeypatch) -> tuple[dict, list[list[str]]]:
    """The actor's output and the prompts of every engine.invert call it made."""
    calls = []
    original = engine.invert

    def recording_invert(model, images, prompts, config, *args):
        calls.append(list(prompts))
        return original(model, images, prompts, config, *args)

    monkeypatch.setattr(invert_edit.engine, "invert", recording_invert)
    actor = InvertEditActor(model_path, "cpu", "float32", inversion, SPECS, MetricsConfig(), 8)
    return actor(batch), calls


def reference_edit(model, image, inversion_prompt, record, inversion, spec, cache: dict):
    """The engine alone: invert one image with one prompt (once per image and prompt), then edit it."""
    key = (image.numpy().tobytes(), inversion_prompt)
    if key not in cache:
        cache[key] = engine.invert(model, image[None], [inversion_prompt], inversion)
    request = EditRequest(0, record["target_prompt"], spec.control, spec.eta, spec.latent_interpolation)
    return cache[key], engine.edit(model, cache[key], [request])[0]


def spec_of(record) -> EditSpec:
    return next(spec for spec in SPECS if spec.target_class == record["target_class"])


@pytest.mark.parametrize("method", ["prompt_tuning", "null_text"])
def test_target_prompt_inversion_inverts_each_image_once_per_target_prompt(
    tiny_sd_path, tiny_sd, images, prompts, method, monkeypatch
):
    inversion = JobInversionConfig.of(
        method=method, num_steps=4, inner_steps=2, guidance_scale=3.0, prompt="target"
    )
    batch = source_batch(images, prompts)
    output, calls = run_actor(tiny_sd_path, batch, inversion, monkeypatch)

    square_0, triangle_0 = prompts[0].replace("circle", "square"), prompts[0].replace("circle", "triangle")
    square_1 = prompts[2].replace("star", "square")
    # One batched call: row 0 under its two target prompts, row 1 under one, row 2 under its caption.
    assert calls == [[square_0, triangle_0, square_1, prompts[1]]]
    records = [json.loads(output["edits_json"][row]) for row in range(3)]
    assert [len(row_records) for row_records in records] == [3, 2, 0]
    assert all(decode_failures(failures) == [] for failures in output["failures"])
    inversions = {}
    for row, row_records in enumerate(records[:2]):
        for position, record in enumerate(row_records):
            _, expected = reference_edit(
                tiny_sd, images[row], record["target_prompt"], record, inversion, spec_of(record), inversions
            )
            difference = np.abs(output["edit_images"][row][position].astype(int) - expected.image.numpy())
            assert difference.max() <= 2, (row, record["target_prompt"], difference.max())
    # A row's reconstruction is that of its first target prompt's inversion.
    first, _ = reference_edit(tiny_sd, images[0], square_0, records[0][0], inversion, SPECS[0], inversions)
    assert np.abs(output["recon"][0].astype(int) - first.reconstructions[0].numpy()).max() <= 2
    assert (output["status"] == "ok").all() and np.isfinite(output["invert_seconds"]).all()


def test_source_prompt_inversion_inverts_each_image_once_with_its_caption(
    tiny_sd_path, tiny_sd, images, prompts, monkeypatch
):
    inversion = JobInversionConfig.of(method="null_text", num_steps=4, inner_steps=2, guidance_scale=3.0)
    batch = source_batch(images, prompts)
    output, calls = run_actor(tiny_sd_path, batch, inversion, monkeypatch)

    assert calls == [list(batch["caption"])]
    records = json.loads(output["edits_json"][0])
    assert len(records) == 3
    inversions = {}
    for position, record in enumerate(records):
        _, expected = reference_edit(
            tiny_sd, images[0], prompts[0], record, inversion, spec_of(record), inversions
        )
        assert np.abs(output["edit_images"][0][position].astype(int) - expected.image.numpy()).max() <= 2


def rejecting(prompt: str, monkeypatch) -> str:
    """Make the engine raise on any inversion call holding `prompt`; returns the failure's message."""
    original = engine.invert

    def invert(model, images, prompts, config, *args):
        if prompt in prompts:
            raise EngineInputError(f"prompt {prompt!r} rejected")
        return original(model, images, prompts, config, *args)

    monkeypatch.setattr(invert_edit.engine, "invert", invert)
    return f"EngineInputError: prompt {prompt!r} rejected"


TARGET_DDIM = JobInversionConfig(method="ddim", num_steps=4, guidance_scale=3.0, prompt="target")


def test_a_rejected_image_fails_alone_and_the_others_keep_every_edit(
    tiny_sd_path, images, prompts, monkeypatch
):
    """The engine rejects the batch for row 1's prompt: images are inverted one by one, row 1 fails and
    row 0 keeps the edits of both its target prompts, which now live in two engine results."""
    message = rejecting(prompts[2].replace("star", "square"), monkeypatch)
    actor = InvertEditActor(tiny_sd_path, "cpu", "float32", TARGET_DDIM, SPECS, MetricsConfig(), 8)
    output = actor(source_batch(images, prompts))

    assert list(output["status"]) == ["ok", "invert_failed", "ok"]
    assert decode_failures(output["failures"][1]) == [Failure("invert", "InversionError", message)]
    records = json.loads(output["edits_json"][0])
    assert sorted(record["target_class"] for record in records) == ["square", "square", "triangle"]
    assert output["edit_images"][0].shape == (3, 32, 32, 3) and output["edit_masks"][0].shape == (3, 32, 32)
    assert decode_failures(output["failures"][0]) == [] and json.loads(output["edits_json"][1]) == []
    assert np.isnan(output["invert_seconds"][1]) and not output["recon"][1].any()


def test_a_rejected_target_prompt_fails_the_edits_it_serves(tiny_sd_path, images, prompts, monkeypatch):
    message = rejecting(prompts[0].replace("circle", "triangle"), monkeypatch)
    actor = InvertEditActor(tiny_sd_path, "cpu", "float32", TARGET_DDIM, SPECS, MetricsConfig(), 8)
    output = actor(source_batch(images, prompts))

    assert list(output["status"]) == ["ok", "ok", "ok"]
    [failure] = decode_failures(output["failures"][0])
    records = json.loads(output["edits_json"][0])
    assert [record["target_class"] for record in records] == ["square", "square"]
    assert (failure.stage, failure.error_type, failure.message) == ("invert", "InversionError", message)
    assert failure.edit_id is not None and failure.edit_id not in {record["edit_id"] for record in records}


def test_the_job_specs_model_precision_reaches_the_actors_model(tiny_sd_path, tmp_path):
    """Every key the dataflow hands the actor is one of its parameters, and model.precision arrives."""
    from pipeline.config import load_config
    from pipeline.dataflow import invert_edit_arguments

    spec = {
        "input": {"shards": "data/shard-000000.tar"},
        "model": {"path": tiny_sd_path, "device": "cpu", "precision": "mixed"},
        "edits": [{"target_class": "square"}],
        "output": {"path": str(tmp_path / "out")},
    }
    path = tmp_path / "job.yaml"
    path.write_text(json.dumps(spec))
    actor = InvertEditActor(**invert_edit_arguments(load_config(path)))
    assert actor.model.precision == "mixed"


def test_stochastic_samples_are_rows_of_one_edit_call_and_equal_the_engines_samples(
    tiny_sd_path, tiny_sd, images, prompts, monkeypatch
):
    """samples: K gives K edits per image with distinct sample_index and edit_id, all of both images in
    one engine.edit call, each equal to the engine's edit drawn with its sample_seed."""
    spec = EditSpec(
        target_class="square",
        source_classes=("circle", "star"),
        seeds=(4,),
        samples=3,
        stochastic="null_text_vae",
        temperature=30.0,  # the tiny model's noise depends weakly on the embedding: make it show in uint8
    )
    inversion = JobInversionConfig.of(
        method="null_text_vae", num_steps=3, inner_steps=1, guidance_scale=7.5, epochs=1, hidden_dim=8
    )
    edit_calls = []
    original_edit = engine.edit

    def recording_edit(model, result, requests):
        edit_calls.append(list(requests))
        return original_edit(model, result, requests)

    monkeypatch.setattr(invert_edit.engine, "edit", recording_edit)
    actor = InvertEditActor(tiny_sd_path, "cpu", "float32", inversion, (spec,), MetricsConfig(), 8)
    output = actor(source_batch(images, prompts))
    records = [json.loads(output["edits_json"][row]) for row in range(3)]
    assert [len(row_records) for row_records in records] == [3, 3, 0]
    assert len(edit_calls) == 1 and len(edit_calls[0]) == 6
    for row_records in records[:2]:
        assert [r["sample_index"] for r in row_records] == [0, 1, 2]
        assert [r["sample_seed"] for r in row_records] == [12, 13, 14]
        assert len({r["sample_group"] for r in row_records}) == 1
    assert len({r["edit_id"] for row_records in records for r in row_records}) == 6
    for row in range(2):
        reference = engine.invert(tiny_sd, images[row][None], [str(output["caption"][row])], inversion)
        for position, record in enumerate(records[row]):
            request = EditRequest(
                0, record["target_prompt"], spec.control, seed=record["sample_seed"], sample_temperature=30.0
            )
            expected = engine.edit(tiny_sd, reference, [request])[0]
            difference = np.abs(output["edit_images"][row][position].astype(int) - expected.image.numpy())
            assert difference.max() <= 2, (row, position, difference.max())
    # The samples differ from each other.
    assert not np.array_equal(output["edit_images"][0][0], output["edit_images"][0][1])


def assert_samples_from_a_trained_vae_equal_the_engines(
    model, output, spec, references, uri: str, version: str, embedding_vae=None
) -> None:
    """Each of rows 0 and 1's samples records the VAE's URI and version and equals the engine's edit of
    `references[row]` (the row's own inversion) with its sample seed (and `embedding_vae`, cond_vae)."""
    records = [json.loads(output["edits_json"][row]) for row in range(3)]
    assert [len(row_records) for row_records in records] == [spec.samples, spec.samples, 0]
    for row in range(2):
        for position, record in enumerate(records[row]):
            params = json.loads(record["params"])["stochastic"]
            assert params == {
                "method": spec.stochastic,
                "samples": spec.samples,
                "temperature": spec.temperature,
                "vae": uri,
                "version": version,
            }
            request = EditRequest(
                0,
                record["target_prompt"],
                spec.control,
                seed=record["sample_seed"],
                sample_temperature=spec.temperature,
                embedding_vae=embedding_vae,
            )
            expected = engine.edit(model, references[row], [request])[0]
            difference = np.abs(output["edit_images"][row][position].astype(int) - expected.image.numpy())
            assert difference.max() <= 2, (row, position, difference.max())
    assert not np.array_equal(output["edit_images"][0][0], output["edit_images"][0][1])


def test_cond_vae_samples_equal_the_engines_samples_and_record_the_vae(
    tiny_sd_path, tiny_sd, images, prompts, tmp_path
):
    """stochastic: cond_vae draws each sample's C'' from the spec's VAE (any inversion method); each row
    equals the engine's edit with that VAE and sample seed, and params name the VAE's URI and version."""
    from editor_artefact import write_random_cond_vae

    from pipeline.editors import load_embedding_vae

    uri = str(tmp_path / "vae")
    version = write_random_cond_vae(tiny_sd, uri, seed=1)
    spec = EditSpec(
        target_class="square",
        source_classes=("circle", "star"),
        seeds=(4,),
        samples=2,
        stochastic="cond_vae",
        vae=uri,
        temperature=2.0,
    )
    inversion = JobInversionConfig.of(method="ddim", num_steps=3, guidance_scale=7.5)
    actor = InvertEditActor(tiny_sd_path, "cpu", "float32", inversion, (spec,), MetricsConfig(), 8)
    output = actor(source_batch(images, prompts))
    references = [
        engine.invert(tiny_sd, images[row][None], [str(output["caption"][row])], inversion)
        for row in range(2)
    ]
    vae = load_embedding_vae(tiny_sd, uri)
    assert_samples_from_a_trained_vae_equal_the_engines(
        tiny_sd, output, spec, references, uri, version, embedding_vae=vae
    )


def test_a_dataset_null_text_vae_is_loaded_once_and_its_samples_equal_the_engines(
    tiny_sd_path, tiny_sd, images, prompts, tmp_path
):
    """inversion.vae: the actor loads the dataset-wide null-text VAE once and inverts every batch with it
    (no VAE is trained per image); each sample equals the engine's edit with the loaded VAE and its sample
    seed, and params name the VAE's URI and version."""
    from editor_artefact import write_random_null_text_vae

    from pipeline.editors import load_null_text_vae

    uri = str(tmp_path / "vae")
    version = write_random_null_text_vae(tiny_sd, uri, seed=2, settings={"steps": 3, "inner_steps": 1})
    spec = EditSpec(
        target_class="square",
        source_classes=("circle", "star"),
        seeds=(4,),
        samples=2,
        stochastic="null_text_vae",
        temperature=30.0,
    )
    inversion = JobInversionConfig.of(
        method="null_text_vae", num_steps=3, inner_steps=1, guidance_scale=5.0, vae=uri
    )
    actor = InvertEditActor(tiny_sd_path, "cpu", "float32", inversion, (spec,), MetricsConfig(), 8)
    assert actor.inversion_vae.version == version
    output = actor(source_batch(images, prompts))
    vae = load_null_text_vae(tiny_sd, uri)
    references = [
        engine.invert(tiny_sd, images[row][None], [str(output["caption"][row])], inversion, None, vae)
        for row in range(2)
    ]
    assert all(r.latents.edit_hook.vae is vae and r.latents.edit_hook.history is None for r in references)
    assert_samples_from_a_trained_vae_equal_the_engines(tiny_sd, output, spec, references, uri, version)


def test_style_diffusion_encodes_images_with_the_vision_tower_of_the_jobs_clip():
    import torch

    from pipeline.config import ClipMetricConfig
    from pipeline.metrics.clip import ClipScorer
    from pipeline.world.clip_model import SHAPES_CLIP_CONFIG, SHAPES_CLIP_NAME, SHAPES_CLIP_WEIGHTS

    metrics = MetricsConfig(
        clip=ClipMetricConfig(SHAPES_CLIP_NAME, str(SHAPES_CLIP_WEIGHTS), str(SHAPES_CLIP_CONFIG))
    )
    device = torch.device("cpu")
    assert invert_edit._image_encoder(JobInversionConfig(method="null_text"), metrics, device) is None
    encoder = invert_edit._image_encoder(JobInversionConfig(method="style_diffusion"), metrics, device)
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    expected = ClipScorer(SHAPES_CLIP_NAME, str(SHAPES_CLIP_WEIGHTS)).image_tokens(images)
    torch.testing.assert_close(encoder(images), expected)


def test_editor_edits_equal_the_editors_applied_by_hand_and_record_what_made_them(
    tiny_sd_path, tiny_sd, images, prompts, tmp_path
):
    """An edit with editors is the DiffusionCLIP edit of the source image (not of the inversion), all
    rows of one combination in one call; its params name each editor's URI, weight and version."""
    from editor_artefact import write_perturbed_editor

    from pipeline.config import EditorRef
    from pipeline.editors import edit_with_editors, load_editor

    star, blue = str(tmp_path / "star"), str(tmp_path / "blue")
    versions = {
        star: write_perturbed_editor(tiny_sd, star, 1),
        blue: write_perturbed_editor(tiny_sd, blue, 2),
    }
    specs = (
        EditSpec(target_class="square", source_classes=("circle", "star"), editors=(EditorRef(star, 0.7),)),
        EditSpec(target_class="triangle", editors=(EditorRef(star, 0.5), EditorRef(blue, 0.5))),
        SPECS[1],  # a Prompt-to-Prompt edit beside them
    )
    inversion = JobInversionConfig.of(method="ddim", num_steps=3)
    actor = InvertEditActor(tiny_sd_path, "cpu", "float32", inversion, specs, MetricsConfig(), 8)
    output = actor(source_batch(images, prompts))
    records = [json.loads(output["edits_json"][row]) for row in range(3)]
    assert [[r["target_class"] for r in row] for row in records] == [
        ["triangle", "square", "triangle"],
        ["square", "triangle"],
        ["triangle"],
    ]
    loaded = {uri: load_editor(tiny_sd, uri) for uri in (star, blue)}
    by_hand = {
        "square": edit_with_editors(tiny_sd, images[:2], [loaded[star]], [0.7]),
        "triangle": edit_with_editors(tiny_sd, images[:3], [loaded[star], loaded[blue]], [0.5, 0.5]),
    }
    for row, row_records in enumerate(records):
        for position, record in enumerate(row_records):
            params = json.loads(record["params"])
            if "editors" not in params:
                assert "control" in params  # the P2P edit keeps its own record
                continue
            assert params["method"] == "diffusion_clip" and "inversion" not in params
            assert all(entry["version"] == versions[entry["uri"]] for entry in params["editors"])
            assert not record["has_mask"] and output["edit_masks"][row][position].all()
            expected = by_hand[record["target_class"]][row].numpy()
            assert np.array_equal(output["edit_images"][row][position], expected)
    gammas = [[e["gamma"] for e in json.loads(r["params"]).get("editors", [])] for r in records[0]]
    assert gammas == [[], [0.7], [0.5, 0.5]]  # Prompt-to-Prompt edits first, then the editors'


def test_editors_with_timestep_windows_hand_over_as_edit_with_editors_does_and_record_their_windows(
    tiny_sd_path, tiny_sd, images, prompts, tmp_path
):
    """Eq. 14 with piecewise-constant gamma_i(t): the star editor on t >= 300 (the first of the two
    generative steps, t = 400), the blue editor below (t = 200)."""
    from editor_artefact import write_perturbed_editor

    from pipeline.config import EditorRef
    from pipeline.editors import edit_with_editors, load_editor

    star, blue = str(tmp_path / "star"), str(tmp_path / "blue")
    write_perturbed_editor(tiny_sd, star, 1)
    write_perturbed_editor(tiny_sd, blue, 2)
    refs = (EditorRef(star, 1.0, window=(300, 999)), EditorRef(blue, 1.0, window=(0, 299)))
    specs = (EditSpec(target_class="triangle", editors=refs),)
    actor = InvertEditActor(
        tiny_sd_path,
        "cpu",
        "float32",
        JobInversionConfig.of(method="ddim", num_steps=3),
        specs,
        MetricsConfig(),
        8,
    )
    output = actor(source_batch(images, prompts))
    loaded = [load_editor(tiny_sd, uri) for uri in (star, blue)]
    windows = [(300, 999), (0, 299)]
    by_hand = edit_with_editors(tiny_sd, images[:3], loaded, [1.0, 1.0], windows=windows)
    star_only = edit_with_editors(tiny_sd, images[:3], loaded[:1], [1.0])
    for row in range(3):
        (record,) = json.loads(output["edits_json"][row])
        assert [entry["window"] for entry in json.loads(record["params"])["editors"]] == [
            [300, 999],
            [0, 299],
        ]
        assert np.array_equal(output["edit_images"][row][0], by_hand[row].numpy())
        assert not np.array_equal(output["edit_images"][row][0], star_only[row].numpy())  # blue took a step


def test_a_conjunction_of_editors_adds_both_editors_in_full_as_edit_with_editors_does_and_says_so(
    tiny_sd_path, tiny_sd, images, prompts, tmp_path
):
    """Star and blue at gamma 1 each (the base model at -1, which eq. 14's convex weights refuse) beside
    the star editor alone: each equals edit_with_editors by hand, and only the conjunction records it."""
    from editor_artefact import write_perturbed_editor

    from pipeline.config import EditorRef
    from pipeline.editors import edit_with_editors, load_editor

    star, blue = str(tmp_path / "star"), str(tmp_path / "blue")
    write_perturbed_editor(tiny_sd, star, 1)
    write_perturbed_editor(tiny_sd, blue, 2)
    both = (EditorRef(star, 1.0), EditorRef(blue, 1.0))
    specs = (
        EditSpec(target_class="triangle", editors=both[:1]),
        EditSpec(
            target_class="square", source_classes=("circle", "star"), editors=both, combination="conjunction"
        ),
    )
    inversion = JobInversionConfig.of(method="ddim", num_steps=3)
    actor = InvertEditActor(tiny_sd_path, "cpu", "float32", inversion, specs, MetricsConfig(), 8)
    output = actor(source_batch(images, prompts))
    loaded = [load_editor(tiny_sd, uri) for uri in (star, blue)]
    by_hand = {
        "triangle": edit_with_editors(tiny_sd, images[:2], loaded[:1], [1.0]),
        "square": edit_with_editors(tiny_sd, images[:2], loaded, [1.0, 1.0], combination="conjunction"),
    }
    assert not np.array_equal(by_hand["triangle"].numpy(), by_hand["square"].numpy())
    for row in range(2):  # the two rows (circle, star) that both edits apply to
        records = json.loads(output["edits_json"][row])
        assert sorted(record["target_class"] for record in records) == ["square", "triangle"]
        for position, record in enumerate(records):
            expected = by_hand[record["target_class"]][row].numpy()
            assert np.array_equal(output["edit_images"][row][position], expected)
            combination = json.loads(record["params"]).get("combination")
            assert combination == ("conjunction" if record["target_class"] == "square" else None)


def test_zip_encoder_edits_equal_edit_with_zip_by_hand_with_and_without_a_user_reference(
    tiny_sd_path, tiny_sd, images, prompts, tmp_path
):
    from editor_artefact import write_random_zip_encoder
    from PIL import Image

    from pipeline.config import EditorRef
    from pipeline.editors import edit_with_zip, load_editor, read_reference_image

    uri = str(tmp_path / "zip")
    version = write_random_zip_encoder(tiny_sd, uri, seed=3)
    reference = tmp_path / "reference.png"
    pixels = np.random.default_rng(0).integers(0, 256, (48, 48, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(reference)  # another size: resized to the model's
    specs = (
        EditSpec(target_class="triangle", editors=(EditorRef(uri, 0.8),)),
        EditSpec(target_class="hexagon", editors=(EditorRef(uri, 1.0, str(reference)),)),
    )
    inversion = JobInversionConfig.of(method="ddim", num_steps=3)
    actor = InvertEditActor(tiny_sd_path, "cpu", "float32", inversion, specs, MetricsConfig(), 8)
    output = actor(source_batch(images, prompts))
    encoder = load_editor(tiny_sd, uri)
    user = read_reference_image(str(reference), tiny_sd.image_size)
    by_hand = {
        "triangle": edit_with_zip(tiny_sd, images[:3], encoder, scale=0.8),
        "hexagon": edit_with_zip(tiny_sd, images[:3], encoder, reference=user),
    }
    assert not np.array_equal(by_hand["triangle"].numpy(), by_hand["hexagon"].numpy())
    for row in range(3):
        records = json.loads(output["edits_json"][row])
        assert [record["target_class"] for record in records] == ["triangle", "hexagon"]
        for position, record in enumerate(records):
            params = json.loads(record["params"])
            assert params["method"] == "zip" and params["editors"][0]["version"] == version
            expected = by_hand[record["target_class"]][row].numpy()
            assert np.array_equal(output["edit_images"][row][position], expected)
        assert "reference" not in json.loads(records[0]["params"])["editors"][0]
        assert json.loads(records[1]["params"])["editors"][0]["reference"] == str(reference)


def test_an_editor_trained_on_another_model_is_refused_when_the_actor_starts(tiny_sd_path, tiny_sd, tmp_path):
    from editor_artefact import write_perturbed_editor

    from pipeline.config import EditorRef
    from pipeline.training.artefact import ArtefactError

    uri = str(tmp_path / "other")
    write_perturbed_editor(tiny_sd, uri, 1, fingerprint="0" * 64)
    spec = EditSpec(target_class="square", editors=(EditorRef(uri),))
    inversion = JobInversionConfig.of(method="ddim", num_steps=3)
    with pytest.raises(ArtefactError, match="trained on base model"):
        InvertEditActor(tiny_sd_path, "cpu", "float32", inversion, (spec,), MetricsConfig(), 8)
