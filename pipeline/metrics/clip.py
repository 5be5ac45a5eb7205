"""CLIP scores of edits with open_clip: CLIP-T, CLIP-I and directional CLIP similarity.

With E_I, E_T CLIP's image and text encoders and ê = e / ||e|| (unit-norm embeddings):

    CLIP-T(x, y)  = <ê_I(x), ê_T(y)>                      image-text agreement of an edit
    CLIP-I(x, x') = <ê_I(x), ê_I(x')>                     image-image similarity (edit vs source)
    CLIP-dir      = cos(ΔI, ΔT),  ΔI = ê_I(x_edit) - ê_I(x_src),  ΔT = ê_T(y_tgt) - ê_T(y_src)
    CLIP-T_edited = CLIP-T(x ⊙ m, y)                      PIE-Bench's "CLIP similarity, edited": the
                                                          pixels outside the edit mask m set to 0 (black)

CLIP-dir is the direction of DiffusionCLIP's directional loss (papers/004 eq. 9-10:
L_direction = 1 - cos(ΔI, ΔT)). When the image direction vanishes (the edit did not change the
image's embedding, ||ΔI|| < ZERO_DIRECTION_NORM) or the text direction does (same prompts), the
direction is undefined and CLIP-dir is defined as 0 ("no aligned change"), never NaN.

Images are float (B, 3, H, W) in [0, 1]; they are resized and normalised in torch, on the batch,
with the model's own preprocessing constants (open_clip's preprocess config: size, mean, std,
interpolation, resize mode), matching open_clip's PIL preprocessing up to resampling differences.

Models are named as in open_clip: `model_name` is an architecture ("ViT-B-32", or a custom one
registered with `register_model_config`), `pretrained` a tag ("openai", "laion2b_s34b_b79k") or a
local checkpoint file. Tags download weights, so offline machines use checkpoint paths.
`tiny_clip_config` and `build_random_clip` make a small random-weight model in CLIP's real
architecture and tokenizer, for tests and demos.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import NamedTuple

import open_clip
import torch
from torchvision.transforms.v2 import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from pipeline.metrics.validation import check_image_pair, check_images, check_mask

# Below this norm a difference of unit-norm float32 embeddings is numerical noise, not a direction.
ZERO_DIRECTION_NORM = 1e-6
TINY_CLIP_NAME = "inversa-tiny-clip"
_REQUIRED_CONFIG_KEYS = ("embed_dim", "vision_cfg", "text_cfg")
_INTERPOLATIONS = {"bicubic": InterpolationMode.BICUBIC, "bilinear": InterpolationMode.BILINEAR}


def tiny_clip_config() -> dict:
    """A small open_clip ViT config with CLIP's real text interface, for tests and demos.

    32x32 images in 8x8 patches, 2-layer 32-wide towers, embedding size 32; the text tower keeps
    CLIP's BPE vocabulary (49,408 tokens) and context length 77, so any prompt tokenizes exactly as
    for a full-size CLIP.
    """
    return {
        "embed_dim": 32,
        "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "head_width": 16, "patch_size": 8},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
    }


def register_model_config(config: str | os.PathLike | dict, name: str | None = None) -> str:
    """Register a custom open_clip architecture (via `open_clip.add_model_config`).

    open_clip knows architectures by name from JSON configs; this makes a custom one loadable by
    `open_clip.create_model_and_transforms(name, ...)` and `open_clip.get_tokenizer(name)`. The
    registry is per process: call it in every worker (ClipScorer's `model_config` does).

    Args:
        config: a JSON config file (registered under its file stem) or a config dict (written to a
            temporary JSON file, since open_clip registers files).
        name: the architecture name; required for a dict, must equal the file stem for a file.

    Returns:
        The registered architecture name.

    Raises:
        ValueError: missing name, name/stem mismatch, or a config lacking embed_dim/vision_cfg/text_cfg.
        FileNotFoundError: the config file does not exist.
    """
    if isinstance(config, dict):
        if not name:
            raise ValueError("register_model_config needs a name for a config dict, e.g. name='my-clip'")
        _check_config_keys(config, f"config dict '{name}'")
        config_path = Path(tempfile.mkdtemp(prefix="open_clip_config_")) / f"{name}.json"
        config_path.write_text(json.dumps(config))
    else:
        config_path = Path(config)
        if not config_path.is_file():
            raise FileNotFoundError(f"open_clip model config file not found: {config_path}")
        if name is not None and name != config_path.stem:
            raise ValueError(
                f"open_clip registers a config file under its file stem '{config_path.stem}', not '{name}'; "
                f"rename the file to {name}.json or drop name"
            )
        _check_config_keys(json.loads(config_path.read_text()), f"config file {config_path}")
    open_clip.add_model_config(config_path)
    return config_path.stem


def _check_config_keys(config: dict, what: str) -> None:
    missing = [key for key in _REQUIRED_CONFIG_KEYS if key not in config]
    if missing:
        # open_clip silently skips such files; fail loudly instead.
        raise ValueError(
            f"open_clip {what} lacks {missing}; a model config needs {list(_REQUIRED_CONFIG_KEYS)}"
        )


class RandomClip(NamedTuple):
    """Where `build_random_clip` put a model: pass model_name and str(checkpoint_path) to ClipScorer."""

    model_name: str
    config_path: Path
    checkpoint_path: Path


def build_random_clip(
    folder: str | os.PathLike, config: dict | None = None, name: str = TINY_CLIP_NAME, seed: int = 0
) -> RandomClip:
    """Write a random-weight open_clip model (config JSON + checkpoint) and register it.

    For tests and demos: the files load through the same path as real weights,
    `ClipScorer(name, str(checkpoint_path), model_config=config_path)`.

    Args:
        folder: destination folder (created); gets `{name}.json` and `{name}.pt`.
        config: open_clip model config; `tiny_clip_config()` when None.
        name: architecture name to register.
        seed: torch seed for the random initialisation.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config_path = folder / f"{name}.json"
    config_path.write_text(json.dumps(config or tiny_clip_config(), indent=2))
    register_model_config(config_path)
    torch.manual_seed(seed)
    model = open_clip.create_model(name, pretrained=None)
    checkpoint_path = folder / f"{name}.pt"
    torch.save(model.state_dict(), checkpoint_path)
    return RandomClip(name, config_path, checkpoint_path)


class ClipScorer:
    """An open_clip model with batch scoring of images (B, 3, H, W) in [0, 1] and prompts.

    Attributes:
        backbone: f"{model_name}/{pretrained}", recorded with the metrics.
        model: the open_clip model (eval mode, frozen).
        tokenizer: open_clip's tokenizer for the model.
        image_size: (height, width) the image encoder takes.
        device: where the model runs; results are returned there.
    """

    def __init__(
        self,
        model_name: str,
        pretrained: str | None,
        device: str | torch.device = "cpu",
        *,
        model_config: str | os.PathLike | dict | None = None,
    ) -> None:
        """Load the model and tokenizer.

        Args:
            model_name: open_clip architecture name, e.g. "ViT-B-32".
            pretrained: weights tag (e.g. "openai") or local checkpoint path; None = random weights.
            device: torch device for the model.
            model_config: optional custom architecture config (JSON file or dict) registered under
                `model_name` first, for architectures open_clip does not ship.
        """
        if model_config is not None:
            register_model_config(model_config, name=model_name)
        if model_name.replace("/", "-") not in open_clip.list_models() and ":" not in model_name:
            raise ValueError(
                f"unknown open_clip architecture '{model_name}'; use one of open_clip.list_models() "
                "(e.g. 'ViT-B-32') or pass model_config with a custom config"
            )
        self.device = torch.device(device)
        self.model = _create_model(model_name, pretrained, self.device)
        self.model.eval().requires_grad_(False)
        self.tokenizer = open_clip.get_tokenizer(model_name)
        self.backbone = f"{model_name}/{pretrained}"
        self._set_preprocessing(open_clip.get_model_preprocess_cfg(self.model))

    def _set_preprocessing(self, preprocess_cfg: dict) -> None:
        """Take size, mean, std, interpolation and resize mode from open_clip's preprocess config."""
        size = preprocess_cfg["size"]
        self.image_size = (size, size) if isinstance(size, int) else tuple(size)
        self.resize_mode = preprocess_cfg.get("resize_mode", "shortest")
        if self.resize_mode not in ("shortest", "squash"):
            raise ValueError(
                f"CLIP model {self.backbone} uses resize_mode '{self.resize_mode}', which ClipScorer does not "
                "implement; supported: 'shortest' (resize + centre crop) and 'squash'"
            )
        # open_clip's eval transform uses bicubic for anything but "bilinear" (e.g. "random").
        interpolation = preprocess_cfg.get("interpolation", "bicubic")
        self.interpolation = _INTERPOLATIONS.get(interpolation, InterpolationMode.BICUBIC)
        self.mean = torch.tensor(preprocess_cfg["mean"], device=self.device).view(1, 3, 1, 1)
        self.std = torch.tensor(preprocess_cfg["std"], device=self.device).view(1, 3, 1, 1)

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """Resize, crop and normalise a batch as open_clip's eval transform does.

        Args:
            images: (B, 3, H, W) float in [0, 1].

        Returns:
            (B, 3, *image_size) normalised float32 on the model's device.
        """
        check_images(images)
        images = images.to(self.device, torch.float32)
        if self.resize_mode == "squash":
            images = TF.resize(
                images, list(self.image_size), interpolation=self.interpolation, antialias=True
            )
        else:
            images = self._resize_shortest(images)
            images = TF.center_crop(images, list(self.image_size))
        # Bicubic overshoots; PIL's uint8 output is clipped to [0, 1] the same way.
        return (images.clamp(0, 1) - self.mean) / self.std

    def _resize_shortest(self, images: torch.Tensor) -> torch.Tensor:
        height, width = self.image_size
        if height == width:  # torchvision's shorter-edge resize, as open_clip uses for square inputs
            return TF.resize(images, [height], interpolation=self.interpolation, antialias=True)
        scale = max(height / images.shape[2], width / images.shape[3])
        new_size = [round(images.shape[2] * scale), round(images.shape[3] * scale)]
        return TF.resize(images, new_size, interpolation=self.interpolation, antialias=True)

    @torch.inference_mode()
    def image_embeddings(self, images: torch.Tensor) -> torch.Tensor:
        """Unit-norm image embeddings ê_I.

        Args:
            images: (B, 3, H, W) float in [0, 1].

        Returns:
            (B, D) float32.
        """
        return self.model.encode_image(self.preprocess(images), normalize=True)

    def differentiable_image_embeddings(self, images: torch.Tensor) -> torch.Tensor:
        """Unit-norm image embeddings ê_I with gradients w.r.t. `images` (DiffusionCLIP's loss).

        The same computation as `image_embeddings`, outside inference mode; the model's weights stay
        frozen, so gradients reach only the images.

        Args:
            images: (B, 3, H, W) float in [0, 1].

        Returns:
            (B, D) float32.
        """
        return self.model.encode_image(self.preprocess(images), normalize=True)

    @torch.no_grad()
    def image_tokens(self, images: torch.Tensor) -> torch.Tensor:
        """E(x): every last-layer token of the vision tower (CLS included), after its final LayerNorm
        and before the projection, as StyleDiffusion's reference code takes them (ViT towers only).

        Args:
            images: (B, 3, H, W) float in [0, 1].

        Returns:
            (B, 1 + patches, width) float32.
        """
        visual = self.model.visual
        hidden = visual.transformer(visual._embeds(self.preprocess(images)))
        return visual.ln_post(hidden).float()

    @torch.inference_mode()
    def text_embeddings(self, texts: list[str]) -> torch.Tensor:
        """Unit-norm text embeddings ê_T of `texts` (B prompts) -> (B, D) float32."""
        if isinstance(texts, str) or not all(isinstance(text, str) for text in texts):
            raise TypeError("texts must be a list of strings (one prompt per image), not a single string")
        if len(texts) == 0:
            raise ValueError("texts is empty; give one prompt per image")
        tokens = self.tokenizer(list(texts)).to(self.device)
        return self.model.encode_text(tokens, normalize=True)

    def clip_t(self, images: torch.Tensor, texts: list[str]) -> torch.Tensor:
        """CLIP-T: cosine of each image with its prompt.

        Args:
            images: (B, 3, H, W) float in [0, 1].
            texts: B prompts.

        Returns:
            (B,) cosine similarities in [-1, 1].
        """
        _check_count(texts, images, "texts")
        return (self.image_embeddings(images) * self.text_embeddings(texts)).sum(dim=-1)

    def clip_t_edited(self, images: torch.Tensor, texts: list[str], mask: torch.Tensor) -> torch.Tensor:
        """CLIP-T of the edited region only (PIE-Bench): the image with every pixel outside `mask` black.

        Args:
            images: (B, 3, H, W) float in [0, 1].
            texts: B prompts.
            mask: (B, H, W) bool, True = edited pixel.

        Returns:
            (B,) cosine similarities; NaN where the mask selects no pixel (no edited region).
        """
        check_mask(mask, images)
        scores = self.clip_t(images * mask[:, None].to(images.dtype), texts)
        empty = ~mask.flatten(1).any(dim=1).to(scores.device)
        return torch.where(empty, torch.full_like(scores, float("nan")), scores)

    def clip_i(self, images_a: torch.Tensor, images_b: torch.Tensor) -> torch.Tensor:
        """CLIP-I: cosine of the image embeddings of each pair.

        Args:
            images_a: (B, 3, H, W) float in [0, 1].
            images_b: (B, 3, H', W') float in [0, 1] (sizes may differ from images_a).

        Returns:
            (B,) cosine similarities in [-1, 1].
        """
        _check_same_batch(images_a, images_b)
        return (self.image_embeddings(images_a) * self.image_embeddings(images_b)).sum(dim=-1)

    def clip_dir(
        self,
        source_images: torch.Tensor,
        edited_images: torch.Tensor,
        source_texts: list[str],
        target_texts: list[str],
    ) -> torch.Tensor:
        """Directional CLIP similarity cos(ΔI, ΔT) (DiffusionCLIP eq. 10 direction).

        Args:
            source_images: (B, 3, H, W) float in [0, 1].
            edited_images: (B, 3, H, W) float in [0, 1].
            source_texts: B source prompts y_src.
            target_texts: B target prompts y_tgt.

        Returns:
            (B,) in [-1, 1]; 0 where ΔI or ΔT is (numerically) zero.
        """
        check_image_pair(source_images, edited_images)
        _check_count(source_texts, source_images, "source_texts")
        _check_count(target_texts, source_images, "target_texts")
        image_direction = self.image_embeddings(edited_images) - self.image_embeddings(source_images)
        text_direction = self.text_embeddings(target_texts) - self.text_embeddings(source_texts)
        return _direction_cosine(image_direction, text_direction)


def _create_model(model_name: str, pretrained: str | None, device: torch.device) -> torch.nn.Module:
    """open_clip.create_model_and_transforms with an error that says how to get weights offline."""
    try:
        model, _, _ = open_clip.create_model_and_transforms(model_name, pretrained=pretrained, device=device)
    except RuntimeError as error:
        raise RuntimeError(
            f"could not load CLIP model '{model_name}' with pretrained='{pretrained}' ({error}). A tag "
            "(e.g. 'openai') downloads weights at first use: pre-cache them where there is internet "
            "(same call, then copy the Hugging Face cache) or pass the path of a local checkpoint file "
            "as pretrained; see open_clip.list_pretrained() for the valid (model, tag) pairs."
        ) from error
    return model


def _direction_cosine(directions_a: torch.Tensor, directions_b: torch.Tensor) -> torch.Tensor:
    """Row-wise cosine of (B, D) directions; 0 where either direction's norm is below the noise level."""
    norms_a, norms_b = directions_a.norm(dim=-1), directions_b.norm(dim=-1)
    defined = (norms_a >= ZERO_DIRECTION_NORM) & (norms_b >= ZERO_DIRECTION_NORM)
    cosine = (directions_a * directions_b).sum(dim=-1) / (norms_a * norms_b).clamp_min(ZERO_DIRECTION_NORM**2)
    return torch.where(defined, cosine, torch.zeros_like(cosine))


def _check_count(texts: list[str], images: torch.Tensor, name: str) -> None:
    if isinstance(texts, str):
        raise TypeError(f"{name} must be a list of strings (one prompt per image), not a single string")
    if len(texts) != images.shape[0]:
        raise ValueError(f"{name} has {len(texts)} prompts for {images.shape[0]} images; give one per image")


def _check_same_batch(images_a: torch.Tensor, images_b: torch.Tensor) -> None:
    check_images(images_a, "images_a")
    check_images(images_b, "images_b")
    if images_a.shape[0] != images_b.shape[0]:
        raise ValueError(
            f"images_a and images_b must hold the same number of images, got {images_a.shape[0]} and "
            f"{images_b.shape[0]}"
        )
