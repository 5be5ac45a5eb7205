"""The inversion and editing engine's public interface: invert a batch once, edit it many times.

Pure tensor code: no Ray, no files. Typical use::

    model = load_diffusion_model("runwayml/stable-diffusion-v1-5", device="cuda")
    inversion = invert(model, images, ["a cat on a sofa", ...], InversionConfig(method="null_text"))
    results = edit(model, inversion, [EditRequest(0, "a dog on a sofa", AttentionControl("replace")), ...])

`images` are uint8 tensors (B, H, W, 3) at the model's resolution (`model.image_size`). One inversion
serves any number of edit requests; requests of all images run batched.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

InversionMethod = Literal["ddim", "null_text", "negative_prompt", "prompt_tuning"]
INVERSION_METHODS: tuple[str, ...] = ("ddim", "null_text", "negative_prompt", "prompt_tuning")
ControlMode = Literal["none", "replace", "refine"]


class EngineInputError(ValueError):
    """An argument the engine cannot use; the message names the argument and the fix."""


@dataclass(frozen=True)
class InversionConfig:
    """How images are inverted.

    Attributes:
        method: ddim | null_text | negative_prompt | prompt_tuning.
        num_steps: DDIM steps over the full schedule (T in the papers' step units).
        guidance_scale: classifier-free guidance w used to reconstruct and edit.
        inversion_guidance: w while DDIM-inverting (1 = source prompt only; prompt_tuning uses 0).
        strength: fraction of the schedule inverted; < 1 stops at the return step t0 (DiffusionCLIP).
        inner_steps: optimisation iterations per timestep (null-text N=10, prompt tuning N=1..5).
        learning_rate: null-text base lr (decays as lr * (1 - i/100)); prompt tuning's beta.
        early_stop_epsilon: null-text stops a timestep once loss < epsilon + i * 2e-5.
        prompt_tuning_optimizer: "adam" (same optimiser as null-text) or "sgd" (Algorithm 1 literally).
    """

    method: InversionMethod = "null_text"
    num_steps: int = 50
    guidance_scale: float = 7.5
    inversion_guidance: float = 1.0
    strength: float = 1.0
    inner_steps: int = 10
    learning_rate: float = 1e-2
    early_stop_epsilon: float = 1e-5
    prompt_tuning_optimizer: Literal["adam", "sgd"] = "adam"


@dataclass(frozen=True)
class AttentionControl:
    """Prompt-to-Prompt / P2Plus attention control for one edit.

    Attributes:
        mode: none | replace (word swap, same word count) | refine (words added or removed).
        cross_replace_steps: fraction of steps whose cross-attention maps come from the source.
        self_replace_steps: fraction of steps whose self-attention maps come from the source.
        reweight: (word, scale) pairs scaling the target prompt's cross-attention to that word.
        blend_words: words whose cross-attention defines the local-blend mask; empty = no blend.
        blend_threshold: local-blend mask threshold on the max-normalised attention map.
        unconditional_self_replace_steps: P2Plus tau_u, fraction of steps in which self-attention
            of the unconditional branch is also injected; 0 = plain P2P.
    """

    mode: ControlMode = "replace"
    cross_replace_steps: float = 0.8
    self_replace_steps: float = 0.4
    reweight: tuple[tuple[str, float], ...] = ()
    blend_words: tuple[str, ...] = ()
    blend_threshold: float = 0.3
    unconditional_self_replace_steps: float = 0.0


@dataclass(frozen=True)
class EditRequest:
    """One edit of one inverted image.

    Attributes:
        image_index: row of the inverted batch this edit starts from.
        target_prompt: the edit prompt.
        control: attention control.
        eta: prompt tuning's interpolation weight (eq. 9/10); ignored by other methods.
        latent_interpolation: prompt tuning's eq. 10 variant instead of eq. 9.
        seed: recorded for reproducibility; deterministic methods do not draw noise.
    """

    image_index: int
    target_prompt: str
    control: AttentionControl = field(default_factory=AttentionControl)
    eta: float = 0.9
    latent_interpolation: bool = False
    seed: int = 0
