"""The inversion-method registry: each method's parameters (with its paper's defaults) and the module
that implements it. Imports no torch, so the job spec, `inversa --help` and `validate` can name and
check methods without loading the maths.

A method is one module under `pipeline/methods/` exposing

    invert(inputs: InversionInputs, params) -> MethodResult

(its MethodResult may carry an EditHook when the method changes how edits are conditioned or
steered; such a module also exposes `edit_hook(params, num_steps) -> EditHook`, which rebuilds the
hook of a stored inversion, `pipeline.inversion_state`), plus one `register(MethodInfo(...))` line
here with its parameter dataclass. A method kept
outside this package registers itself when its module is imported; a job names it as
`package.module:name`, which imports the module (on the driver and in every Ray worker) before the
name is looked up.

`InversionConfig` is what the engine and the job spec share: the method's name, the settings every
method has (steps, guidance, strength) and the method's own parameter dataclass.
"""

from __future__ import annotations

import dataclasses
import importlib
from dataclasses import dataclass
from typing import Any, Literal


@dataclass(frozen=True)
class DDIMParams:
    """DDIM inversion (Song et al.; DiffusionCLIP eq. 12).

    Attributes:
        inversion_guidance: w while DDIM-inverting (1 = source prompt only, 0 = unconditional only).
    """

    inversion_guidance: float = 1.0


@dataclass(frozen=True)
class NullTextParams:
    """Null-text inversion (Mokady et al. §3.2-3.3; the reference notebook's defaults).

    Attributes:
        inversion_guidance: w of the pivotal DDIM inversion (paper: 1).
        inner_steps: N iterations per timestep (paper: 10).
        learning_rate: base Adam lr, decayed as lr * (1 - i / 100) at step i (paper: 1e-2).
        early_stop_epsilon: a timestep stops once its loss < epsilon + i * 2e-5 (paper: 1e-5).
    """

    inversion_guidance: float = 1.0
    inner_steps: int = 10
    learning_rate: float = 1e-2
    early_stop_epsilon: float = 1e-5


@dataclass(frozen=True)
class NullTextVAEParams:
    """Stochastic null-text embeddings (Park et al., "Adding stochastic features in DDIM inversion based
    image editing", §3.1): null-text inversion, then a per-image VAE over its null-text embeddings.

    The paper gives the loss (eq. 1), a sequence-level MLP and cyclical KL annealing (its ref. [8], Fu
    et al.) but no sizes or weights; the sizes, beta and the number of epochs here are inversa's choices.

    Attributes:
        inversion_guidance: w of the pivotal DDIM inversion (null-text: 1).
        inner_steps: null-text's N (10).
        learning_rate: null-text's base Adam lr (1e-2).
        early_stop_epsilon: null-text's epsilon (1e-5).
        latent_dim: size of the VAE's latent space (16).
        reduced_channels: channels per token after the 1x1 reduction of the embedding (4).
        hidden_dim: width of the encoder's and decoder's hidden layer (256).
        epochs: VAE training passes over the S steps of the trajectory, one step per iteration (10).
        vae_learning_rate: Adam lr of the VAE (1e-3).
        alpha: weight of the reconstruction loss (eq. 1's alpha_phi; 1).
        beta: largest weight of the KL loss (eq. 1's beta_phi; 1e-5, the KL of a few nats then
            weighs about as much as the latent MSE of a null-text step).
        kl_cycles: cycles of the annealing schedule over training (Fu et al.: 4).
        kl_ramp: fraction of each cycle over which beta rises linearly from 0 (Fu et al.: 0.5).
        seed: seed of the VAE's initial weights and training noise (every image uses it).
        decoder_base: what the decoder's output is added to: "input", the encoded phi_t itself
            (phi'_t = phi_t + D(u_t), as the conditional VAE's C'' = C' + D(u)), or "mean", phi_bar, the
            mean of phi_t over t (phi'_t = phi_bar + D(u_t): the step-dependent part of phi_t must
            travel through u_t).
        training_path: where each training step starts: "sampled", the VAE's own sampled path from
            z*_T in sampling order (what sampling does), or "null_text", null-text's reconstruction
            path z~_t, steps in a seeded random order.
        vae: URI of a dataset-wide null-text VAE (`inversa train`, kind null_text_vae; the paper's
            amortised option): every image samples from it and no per-image VAE is trained, so the
            VAE's sizes and training settings above are the artefact's, not these. None: one VAE per
            image, trained here.
    """

    inversion_guidance: float = 1.0
    inner_steps: int = 10
    learning_rate: float = 1e-2
    early_stop_epsilon: float = 1e-5
    latent_dim: int = 16
    reduced_channels: int = 4
    hidden_dim: int = 256
    epochs: int = 10
    vae_learning_rate: float = 1e-3
    alpha: float = 1.0
    beta: float = 1e-5
    kl_cycles: int = 4
    kl_ramp: float = 0.5
    seed: int = 0
    decoder_base: Literal["input", "mean"] = "input"
    training_path: Literal["null_text", "sampled"] = "sampled"
    vae: str | None = None


@dataclass(frozen=True)
class NegativePromptParams:
    """Negative-prompt inversion (Miyake et al.): no parameters of its own."""


@dataclass(frozen=True)
class DirectParams:
    """Direct inversion (Ju et al., PnP Inversion, Algorithm 1).

    Attributes:
        inversion_guidance: w of the DDIM inversion whose path the source branch is held on (the
            reference code inverts with the source prompt alone: 1).
    """

    inversion_guidance: float = 1.0


@dataclass(frozen=True)
class PromptTuningParams:
    """Prompt Tuning Inversion (Dong et al., Algorithm 1 and §4 "Implementation details").

    Attributes:
        inner_steps: N iterations per timestep (paper: 1).
        learning_rate: beta (paper: 0.1).
        optimizer: "sgd", plain gradient descent on the squared L2 norm (Algorithm 1, line 9), or
            "adam" on the mean squared error (null-text's optimiser).
    """

    inner_steps: int = 1
    learning_rate: float = 0.1
    optimizer: Literal["sgd", "adam"] = "sgd"


@dataclass(frozen=True)
class StyleDiffusionParams:
    """StyleDiffusion (Li et al., §3.3 and "Implementation details"; reference code sen-mao/StyleDiffusion).

    Attributes:
        learning_rate: Adam lr of the mapping networks (paper: 1e-4).
        betas: Adam's exponential decay rates (paper: (0, 0.999)).
        attention_weight: lambda, weight of the attention loss (eq. 8: 1).
        inner_steps: K, inner iterations of the first timestep; step i runs ceil(K * e^(-decay * i))
            (reference code: K = 100, decay 0.1).
        inner_steps_decay: the decay of the inner-iteration schedule (reference code: 0.1).
        early_stop_epsilon: a timestep ends once an image's loss < epsilon + i * 2e-5 (reference code:
            1e-5); null = always run the scheduled iterations.
        value_steps: tau_v, the fraction of edit steps whose value input comes from M_t before the
            target prompt takes over (reference code: 0.6).
        warm_start: M_t starts from the trained M_{t+1} (reference code); false = every M_t from the
            N(0, 0.01) initialisation.
        seed: seed of the N(0, 0.01) initialisation (the same for every image).
    """

    learning_rate: float = 1e-4
    betas: tuple[float, float] = (0.0, 0.999)
    attention_weight: float = 1.0
    inner_steps: int = 100
    inner_steps_decay: float = 0.1
    early_stop_epsilon: float | None = 1e-5
    value_steps: float = 0.6
    warm_start: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
        problems = []
        if not self.learning_rate > 0:
            problems.append(f"learning_rate={self.learning_rate} must be > 0 (paper: 1e-4)")
        if len(self.betas) != 2 or not all(0.0 <= beta < 1.0 for beta in self.betas):
            problems.append(f"betas={self.betas} must be two numbers in [0, 1) (paper: (0, 0.999))")
        if not self.attention_weight >= 0:
            problems.append(f"attention_weight={self.attention_weight} must be >= 0 (paper: 1)")
        if (
            isinstance(self.inner_steps, bool)
            or not isinstance(self.inner_steps, int)
            or self.inner_steps < 1
        ):
            problems.append(f"inner_steps={self.inner_steps!r} must be an integer >= 1 (paper: 100)")
        if not self.inner_steps_decay >= 0:
            problems.append(f"inner_steps_decay={self.inner_steps_decay} must be >= 0 (paper: 0.1)")
        if not 0.0 <= self.value_steps <= 1.0:
            problems.append(f"value_steps={self.value_steps} must be in [0, 1] (tau_v; reference: 0.6)")
        if problems:
            raise ValueError(f"inversion method 'style_diffusion': {'; '.join(problems)}.")


@dataclass(frozen=True)
class MethodInfo:
    """One registered inversion method.

    Attributes:
        name: the value of `inversion.method`.
        params: frozen dataclass of the method's own parameters; its defaults are the paper's.
        module: import path of the module whose `invert(inputs, params)` implements it.
        summary: one line for help texts.
        optimizes: True when the method optimises with gradients (needs a float32 model).
        default_strength: the fraction of the schedule inverted when the spec sets none.
        default_prompt: which prompt a job inverts with when the spec sets none: the sample's caption
            ("source") or each edit's target prompt ("target").
        needs_image_encoder: True when the method encodes the image itself (a CLIP vision tower).
    """

    name: str
    params: type
    module: str
    summary: str
    optimizes: bool = False
    default_strength: float = 1.0
    default_prompt: Literal["source", "target"] = "source"
    needs_image_encoder: bool = False


_REGISTRY: dict[str, MethodInfo] = {}


class UnknownMethodError(ValueError):
    """An inversion method name that is not registered; the message lists the registered ones."""


def register(info: MethodInfo) -> MethodInfo:
    """Add (or replace) a method."""
    if not dataclasses.is_dataclass(info.params):
        raise TypeError(f"method {info.name!r}: params must be a dataclass, got {info.params!r}")
    _REGISTRY[info.name] = info
    return info


def unregister(name: str) -> None:
    """Remove a method (tests register temporary ones)."""
    _REGISTRY.pop(name, None)


def method_names() -> tuple[str, ...]:
    return tuple(_REGISTRY)


def get_method(name: str) -> MethodInfo:
    """The registered method `name`.

    Raises:
        UnknownMethodError: naming the method and the registered choices.
    """
    if name not in _REGISTRY and ":" in name:
        module = name.split(":", 1)[0]
        try:
            importlib.import_module(module)
        except ImportError as error:
            raise UnknownMethodError(
                f"inversion.method {name!r}: module {module!r} cannot be imported ({error}); "
                "make it importable (PYTHONPATH or an installed package) or choose a registered method."
            ) from None
    if name not in _REGISTRY:
        raise UnknownMethodError(f"inversion.method {name!r} is unknown; choose one of {list(_REGISTRY)}.")
    return _REGISTRY[name]


def load_invert(name: str):
    """The `invert(inputs, params)` function of method `name` (imports its module, and torch)."""
    return importlib.import_module(get_method(name).module).invert


@dataclass(frozen=True)
class InversionConfig:
    """How images are inverted.

    Attributes:
        method: a registered method name (see `method_names()`).
        num_steps: DDIM steps over the full schedule (S).
        guidance_scale: classifier-free guidance w of reconstruction and editing.
        strength: fraction of the schedule inverted; < 1 stops at the return step t0 (DiffusionCLIP,
            Prompt Tuning Inversion's "encoding ratio"). None = the method's default.
        encoder_fit_steps: Adam steps refining each image's latent z_0 = E(x) until the decoder draws the
            image (`pipeline.diffusion.decoder_fit`) before it is inverted; 0 = the encoder's latent.
            For images unlike the VAE's training set: the decoder's reach, not the encoder's, then bounds
            reconstruction. Edits made from fitted latents preserve less (the UNet never saw such
            latents; README, "What the fit does to editing"), so editing keeps 0.
        params: the method's parameter dataclass; None = its paper defaults.
    """

    method: str = "null_text"
    num_steps: int = 50
    guidance_scale: float = 7.5
    strength: float | None = None
    encoder_fit_steps: int = 0
    params: Any = None

    def __post_init__(self) -> None:
        if isinstance(self.encoder_fit_steps, bool) or not isinstance(self.encoder_fit_steps, int):
            raise ValueError(f"encoder_fit_steps must be an integer >= 0, got {self.encoder_fit_steps!r}")
        if self.encoder_fit_steps < 0:
            raise ValueError(
                f"encoder_fit_steps must be >= 0 (0: the encoder's latent), got {self.encoder_fit_steps}"
            )

    @classmethod
    def of(cls, method: str = "null_text", **settings: Any) -> InversionConfig:
        """Build from flat settings: common keys and the method's parameters side by side.

        Raises:
            UnknownMethodError: for an unregistered method.
            TypeError: naming a setting that is neither common nor the method's.
        """
        info = get_method(method)
        common_keys = cls.common_keys()
        param_names = {f.name for f in dataclasses.fields(info.params)}
        unknown = sorted(set(settings) - set(common_keys) - param_names)
        if unknown:
            raise TypeError(
                f"{unknown[0]!r} is not a setting of inversion method {method!r}; "
                f"allowed: {sorted(set(common_keys) | param_names)}"
            )
        common = {key: value for key, value in settings.items() if key in common_keys}
        params = info.params(**{key: value for key, value in settings.items() if key in param_names})
        return cls(method=method, params=params, **common)

    @classmethod
    def common_keys(cls) -> tuple[str, ...]:
        """The settings every method has (all fields but `params`)."""
        return tuple(f.name for f in dataclasses.fields(cls) if f.name != "params")

    @property
    def info(self) -> MethodInfo:
        return get_method(self.method)

    @property
    def method_params(self) -> Any:
        """`params`, or the method's defaults."""
        return self.params if self.params is not None else self.info.params()

    @property
    def resolved_strength(self) -> float:
        return self.strength if self.strength is not None else self.info.default_strength

    def to_mapping(self) -> dict[str, Any]:
        """The flat YAML form: common keys and the method's parameters side by side."""
        mapping = {name: getattr(self, name) for name in self.common_keys()}
        mapping["strength"] = self.resolved_strength
        mapping.update(dataclasses.asdict(self.method_params))
        return mapping


register(MethodInfo("ddim", DDIMParams, "pipeline.methods.ddim_inversion", "plain DDIM inversion"))
register(
    MethodInfo(
        "null_text", NullTextParams, "pipeline.methods.null_text", "null-text inversion", optimizes=True
    )
)
register(
    MethodInfo(
        "null_text_vae",
        NullTextVAEParams,
        "pipeline.methods.null_text_vae",
        "null-text inversion with a VAE over its null-text embeddings: stochastic edits",
        optimizes=True,
    )
)
register(
    MethodInfo(
        "negative_prompt",
        NegativePromptParams,
        "pipeline.methods.negative_prompt",
        "negative-prompt inversion",
    )
)
register(
    MethodInfo(
        "prompt_tuning",
        PromptTuningParams,
        "pipeline.methods.prompt_tuning",
        "prompt tuning inversion",
        optimizes=True,
        default_strength=0.8,
        default_prompt="target",
    )
)
register(
    MethodInfo(
        "direct",
        DirectParams,
        "pipeline.methods.direct",
        "direct inversion (PnP Inversion): the source branch held on the inversion path",
    )
)
register(
    MethodInfo(
        "style_diffusion",
        StyleDiffusionParams,
        "pipeline.methods.style_diffusion",
        "StyleDiffusion: the image mapped into the value input of cross-attention",
        optimizes=True,
        needs_image_encoder=True,
    )
)

__all__ = [
    "DDIMParams",
    "DirectParams",
    "InversionConfig",
    "MethodInfo",
    "NegativePromptParams",
    "NullTextParams",
    "NullTextVAEParams",
    "PromptTuningParams",
    "StyleDiffusionParams",
    "UnknownMethodError",
    "get_method",
    "load_invert",
    "method_names",
    "register",
    "unregister",
]
