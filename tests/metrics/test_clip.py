import json

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image

from pipeline.metrics.clip import ClipScorer, register_model_config, tiny_clip_config

SOURCE_TEXTS = ["a photo of a cat", "a red square on grass", "a dog"]
TARGET_TEXTS = ["a photo of a tiger", "a blue circle on grass", "a wolf"]


def _quantised(batch: int, size: int, generator: torch.Generator) -> torch.Tensor:
    """Images on the uint8 grid, so that PIL and tensor preprocessing see the same pixels."""
    return torch.randint(0, 256, (batch, 3, size, size), generator=generator).float() / 255


def _open_clip_preprocess(images: torch.Tensor, tiny_clip) -> torch.Tensor:
    """open_clip's own PIL eval transform applied image by image."""
    _, _, preprocess = open_clip.create_model_and_transforms(tiny_clip.model_name, pretrained=None)
    pil_images = [
        Image.fromarray((image.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)) for image in images
    ]
    return torch.stack([preprocess(image) for image in pil_images])


def test_tiny_config_has_clip_text_interface(tiny_clip, clip_scorer):
    config = json.loads(tiny_clip.config_path.read_text())
    assert config == tiny_clip_config()
    assert config["text_cfg"]["context_length"] == 77 and config["text_cfg"]["vocab_size"] == 49408
    assert clip_scorer.backbone == f"{tiny_clip.model_name}/{tiny_clip.checkpoint_path}"
    assert clip_scorer.image_size == (32, 32)


def test_checkpoint_weights_are_loaded(tiny_clip, clip_scorer):
    saved = torch.load(tiny_clip.checkpoint_path, weights_only=True)
    for name, tensor in clip_scorer.model.state_dict().items():
        torch.testing.assert_close(tensor, saved[name], rtol=0, atol=0)


def test_preprocess_matches_open_clip_transform_at_model_size(tiny_clip, clip_scorer, generator):
    images = _quantised(2, 32, generator)
    torch.testing.assert_close(clip_scorer.preprocess(images), _open_clip_preprocess(images, tiny_clip))


def test_preprocess_close_to_open_clip_transform_when_resizing(tiny_clip, clip_scorer, generator):
    # Smooth images: bicubic resampling of tensors and of PIL images then agree closely.
    smooth = torch.nn.functional.interpolate(
        torch.rand(2, 3, 6, 6, generator=generator), size=(64, 64), mode="bilinear"
    )
    images = (smooth * 255).round() / 255
    ours, reference = clip_scorer.preprocess(images), _open_clip_preprocess(images, tiny_clip)
    assert ours.shape == reference.shape == (2, 3, 32, 32)
    # within 1.5 uint8 levels (PIL rounds to uint8) after dividing by std ~0.27
    assert (ours - reference).abs().max().item() < 1.5 / 255 / 0.26


def test_embeddings_are_unit_norm(clip_scorer, generator):
    images = torch.rand(3, 3, 40, 48, generator=generator)
    image_embeddings = clip_scorer.image_embeddings(images)
    text_embeddings = clip_scorer.text_embeddings(SOURCE_TEXTS)
    assert image_embeddings.shape == text_embeddings.shape == (3, 32)
    torch.testing.assert_close(image_embeddings.norm(dim=-1), torch.ones(3))
    torch.testing.assert_close(text_embeddings.norm(dim=-1), torch.ones(3))


def test_clip_t_equals_cosine_from_open_clip_encoders(tiny_clip, clip_scorer, generator):
    images = _quantised(3, 32, generator)
    with torch.no_grad():
        image_features = clip_scorer.model.encode_image(_open_clip_preprocess(images, tiny_clip))
        text_features = clip_scorer.model.encode_text(
            open_clip.get_tokenizer(tiny_clip.model_name)(SOURCE_TEXTS)
        )
    expected = torch.nn.functional.cosine_similarity(image_features, text_features, dim=-1)
    torch.testing.assert_close(clip_scorer.clip_t(images, SOURCE_TEXTS), expected, rtol=1e-5, atol=1e-5)


def test_clip_i_is_one_for_same_image_and_symmetric(clip_scorer, generator):
    images_a = torch.rand(3, 3, 32, 32, generator=generator)
    images_b = torch.rand(3, 3, 32, 32, generator=generator)
    torch.testing.assert_close(clip_scorer.clip_i(images_a, images_a), torch.ones(3))
    torch.testing.assert_close(clip_scorer.clip_i(images_a, images_b), clip_scorer.clip_i(images_b, images_a))


def test_clip_dir_matches_paper_direction(clip_scorer, generator):
    sources = torch.rand(3, 3, 32, 32, generator=generator)
    edits = torch.rand(3, 3, 32, 32, generator=generator)
    delta_image = clip_scorer.image_embeddings(edits) - clip_scorer.image_embeddings(sources)
    delta_text = clip_scorer.text_embeddings(TARGET_TEXTS) - clip_scorer.text_embeddings(SOURCE_TEXTS)
    expected = torch.nn.functional.cosine_similarity(delta_image, delta_text, dim=-1)
    values = clip_scorer.clip_dir(sources, edits, SOURCE_TEXTS, TARGET_TEXTS)
    torch.testing.assert_close(values, expected)
    # swapping roles reverses both directions: cos(-a, -b) = cos(a, b); swapping only images negates
    torch.testing.assert_close(clip_scorer.clip_dir(edits, sources, TARGET_TEXTS, SOURCE_TEXTS), values)
    torch.testing.assert_close(clip_scorer.clip_dir(edits, sources, SOURCE_TEXTS, TARGET_TEXTS), -values)


def test_clip_dir_is_zero_without_an_image_or_text_direction(clip_scorer, generator):
    images = torch.rand(3, 3, 32, 32, generator=generator)
    edits = torch.rand(3, 3, 32, 32, generator=generator)
    unchanged = clip_scorer.clip_dir(images, images, SOURCE_TEXTS, TARGET_TEXTS)
    same_prompts = clip_scorer.clip_dir(images, edits, SOURCE_TEXTS, SOURCE_TEXTS)
    for values in (unchanged, same_prompts):
        assert not torch.isnan(values).any()
        torch.testing.assert_close(values, torch.zeros(3))


def test_batch_results_equal_one_by_one(clip_scorer, generator):
    sources = torch.rand(3, 3, 40, 40, generator=generator)
    edits = torch.rand(3, 3, 40, 40, generator=generator)
    batched = {
        "clip_t": clip_scorer.clip_t(edits, TARGET_TEXTS),
        "clip_i": clip_scorer.clip_i(edits, sources),
        "clip_dir": clip_scorer.clip_dir(sources, edits, SOURCE_TEXTS, TARGET_TEXTS),
    }
    for index in range(3):
        one = slice(index, index + 1)
        singles = {
            "clip_t": clip_scorer.clip_t(edits[one], TARGET_TEXTS[one]),
            "clip_i": clip_scorer.clip_i(edits[one], sources[one]),
            "clip_dir": clip_scorer.clip_dir(sources[one], edits[one], SOURCE_TEXTS[one], TARGET_TEXTS[one]),
        }
        for name, value in singles.items():
            torch.testing.assert_close(value, batched[name][one], rtol=1e-5, atol=1e-5, msg=name)


def test_register_model_config_from_dict_and_file(tmp_path):
    assert register_model_config(tiny_clip_config(), name="inversa-test-dict-clip") in open_clip.list_models()
    config_path = tmp_path / "inversa-test-file-clip.json"
    config_path.write_text(json.dumps(tiny_clip_config()))
    assert register_model_config(config_path) == "inversa-test-file-clip"
    assert "inversa-test-file-clip" in open_clip.list_models()


def test_register_model_config_errors(tmp_path):
    with pytest.raises(ValueError, match="needs a name"):
        register_model_config(tiny_clip_config())
    with pytest.raises(ValueError, match="lacks"):
        register_model_config({"embed_dim": 8}, name="broken")
    with pytest.raises(FileNotFoundError, match="not found"):
        register_model_config(tmp_path / "missing.json")
    config_path = tmp_path / "stem.json"
    config_path.write_text(json.dumps(tiny_clip_config()))
    with pytest.raises(ValueError, match="file stem 'stem'"):
        register_model_config(config_path, name="other")


def test_scorer_errors(tiny_clip, tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="unknown open_clip architecture 'no-such-clip'"):
        ClipScorer("no-such-clip", None)
    with pytest.raises(RuntimeError, match="local checkpoint file"):
        ClipScorer(tiny_clip.model_name, str(tmp_path / "missing.pt"))

    def offline(*args, **kwargs):
        raise RuntimeError("no network")

    # open_clip fetches (or finds cached) tagged weights through this function.
    monkeypatch.setattr(open_clip.factory, "download_pretrained", offline)
    with pytest.raises(RuntimeError, match=r"'ViT-B-32' with pretrained='openai'.*pre-cache"):
        ClipScorer("ViT-B-32", "openai")


def test_scoring_errors(clip_scorer):
    images = torch.rand(2, 3, 32, 32)
    with pytest.raises(ValueError, match="2 images"):
        clip_scorer.clip_t(images, ["only one"])
    with pytest.raises(TypeError, match="list of strings"):
        clip_scorer.clip_t(images, "a cat")
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        clip_scorer.image_embeddings(images * 3)
    with pytest.raises(ValueError, match="same number"):
        clip_scorer.clip_i(images, images[:1])


def test_clip_t_edited_scores_the_edited_region_on_black(clip_scorer, generator):
    """PIE-Bench's edited-region CLIP similarity: CLIP-T of the image with the pixels outside the mask set
    to 0, so those pixels do not count; an empty mask has no edited region (NaN)."""
    images = _quantised(3, 32, generator)
    mask = torch.zeros(3, 32, 32, dtype=torch.bool)
    mask[:, 8:24, 4:20] = True
    mask[2] = False
    blacked = images.clone()
    blacked[~mask[:, None].expand_as(images)] = 0.0
    edited = clip_scorer.clip_t_edited(images, SOURCE_TEXTS, mask)
    torch.testing.assert_close(edited[:2], clip_scorer.clip_t(blacked, SOURCE_TEXTS)[:2])
    assert torch.isnan(edited[2])
    # Changing only the pixels outside the region leaves it unchanged, while the whole-image CLIP-T moves.
    repainted = torch.where(mask[:, None], images, torch.rand(images.shape, generator=generator))
    torch.testing.assert_close(clip_scorer.clip_t_edited(repainted, SOURCE_TEXTS, mask)[:2], edited[:2])
    assert not torch.allclose(
        clip_scorer.clip_t(repainted, SOURCE_TEXTS), clip_scorer.clip_t(images, SOURCE_TEXTS)
    )


def test_differentiable_image_embeddings_match_and_carry_gradients_to_the_images(clip_scorer):
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0), requires_grad=True)
    embeddings = clip_scorer.differentiable_image_embeddings(images)
    torch.testing.assert_close(embeddings.detach(), clip_scorer.image_embeddings(images.detach()))
    embeddings[:, 0].sum().backward()
    assert images.grad is not None and float(images.grad.abs().sum()) > 0
    assert all(parameter.grad is None for parameter in clip_scorer.model.parameters())
