"""StyleDiffusion (Li et al., "StyleDiffusion: Prompt-Embedding Inversion for Text-Based Editing",
§3.3-3.4, Algorithm 1, Table 1; reference code sen-mao/StyleDiffusion).

The keys of every cross-attention layer keep the source prompt's embedding c (the "where"); the
image itself, mapped per timestep, is the input of the value projection (the "what").

Legend:

    z^_0 .. z^_T       trajectory: DDIM inversion of z^_0 = ENC(x) with the source prompt (w = 1)
    E(x)               (N_img, D') all last-layer tokens of the frozen CLIP vision tower (CLS included)
    M_t                the mapping network of sampling step i (Table 1): 1x1 convs over the token axis
                       N_img -> L, L -> L, BatchNorm, LeakyReLU, L -> L, then (only when D' differs
                       from the text width D) a 1x1 conv over the width D' -> D; weights N(0, 0.01)
    c~_t               M_t(E(x)), (L, D): the value input of the conditional branch at step i
    eps(z, t, c, c~)   the UNet with keys from c and values from c~; the unconditional branch uses
                       the empty-prompt embedding for both
    z~_{t-1}           one guided DDIM step (w = guidance_scale) from z~_t with c~_t (eq. 6)
    a~_t, a^_t         cross-attention maps per layer and head at the mask resolution (SD: 16x16), of
                       eps(z~_t, t, c, c~_t) and of eps(z^_t, t, c, c) on the inversion path (eq. 7)
    loss               ||z^_{t-1} - z~_{t-1}||^2 + lambda * sum_layers ||a^_t - a~_t||^2   (eqs. 5-8; MSE
                       per image, as the reference code's mse_loss terms)
    K_i                ceil(K * e^(-0.1 i)) Adam iterations at step i (K = 100), lr 1e-4, betas (0, 0.999);
                       a step ends early once loss < epsilon + i * 2e-5 (reference code)
    warm start         M_t starts from the trained M_{t+1} (reference code)
    editing            value input c~_t for the first tau_v * S steps, then the target prompt's c*
                       (§3.4, Fig. 6 III); keys follow P2P as for every method

Batching: image b has its own leaf tensors (its networks) and its own Adam state; the summed loss
gives each image exactly its own gradient (UNet rows, mapping networks and their per-image batch
normalisation are independent), and an image that stopped early takes no part in the forward pass,
so it gets no gradient and torch.optim skips it. B images trained together equal B separate runs.

Deviations, each for a stated reason: a^_t is evaluated on z^_t at the sampling step's own timestep
(the reference records it while inverting, one grid step earlier: DDIM inversion's usual eps
approximation); BatchNorm always normalises with the image's own statistics (the reference keeps the
networks in training mode with a batch of one image, so running statistics are never used).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from pipeline.diffusion.attention import mask_resolution_for, use_attention_controller
from pipeline.diffusion.precision import fixed_branch_noise, optimised_branch_noise
from pipeline.diffusion.trajectory import EditHook, InversionInputs, MethodResult, nonfinite_errors, per_step
from pipeline.methods import StyleDiffusionParams
from pipeline.methods.ddim_inversion import ddim_trajectory

INIT_STD = 0.01
NORM_EPS = 1e-5
LEAKY_SLOPE = 0.01
LOOP = "StyleDiffusion mapping-network training"


def inner_iterations(inner_steps: int, decay: float, num_steps: int) -> list[int]:
    """K_i = ceil(K * e^(-decay * i)) for i = 0..S-1 (the reference code's schedule)."""
    return [math.ceil(inner_steps * math.exp(-decay * index)) for index in range(num_steps)]


def init_mapping(
    num_image_tokens: int, image_width: int, num_tokens: int, text_width: int, seed: int
) -> dict[str, torch.Tensor]:
    """One mapping network's parameters: conv weights N(0, 0.01), biases 0, BatchNorm affine (1, 0).

    Args:
        num_image_tokens: N_img, tokens of E(x).
        image_width: D', width of E(x).
        num_tokens: L, tokens of the text embedding.
        text_width: D, width of the text embedding.
        seed: seed of the normal initialisation.
    """
    generator = torch.Generator().manual_seed(seed)

    def normal(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator) * INIT_STD

    weights = {
        "conv0_weight": normal(num_tokens, num_image_tokens),
        "conv0_bias": torch.zeros(num_tokens),
        "conv1_weight": normal(num_tokens, num_tokens),
        "conv1_bias": torch.zeros(num_tokens),
        "norm_weight": torch.ones(num_tokens),
        "norm_bias": torch.zeros(num_tokens),
        "conv2_weight": normal(num_tokens, num_tokens),
        "conv2_bias": torch.zeros(num_tokens),
    }
    if image_width != text_width:
        weights["width_weight"] = normal(text_width, image_width)
        weights["width_bias"] = torch.zeros(text_width)
    return weights


def map_tokens(weights: dict[str, torch.Tensor], tokens: torch.Tensor) -> torch.Tensor:
    """c~ = M(E(x)) for a batch of images, each with its own network.

    Args:
        weights: each parameter stacked over the batch, (B, ...) (see `init_mapping`).
        tokens: E(x), (B, N_img, D').

    Returns:
        (B, L, D).
    """

    def token_conv(name: str, x: torch.Tensor) -> torch.Tensor:
        return torch.einsum("bon,bnd->bod", weights[f"{name}_weight"], x) + weights[f"{name}_bias"][..., None]

    hidden = token_conv("conv1", token_conv("conv0", tokens))
    mean = hidden.mean(dim=2, keepdim=True)
    variance = hidden.var(dim=2, unbiased=False, keepdim=True)
    hidden = (hidden - mean) / torch.sqrt(variance + NORM_EPS)
    hidden = hidden * weights["norm_weight"][..., None] + weights["norm_bias"][..., None]
    hidden = token_conv("conv2", F.leaky_relu(hidden, LEAKY_SLOPE))
    if "width_weight" in weights:
        hidden = (
            torch.einsum("bld,bed->ble", hidden, weights["width_weight"]) + weights["width_bias"][:, None]
        )
    return hidden


class CrossAttentionRecorder:
    """Keeps the cross-attention probabilities (rows, heads, q, L) of every layer with `queries` queries."""

    def __init__(self, queries: int):
        self.queries = queries
        self.maps: list[torch.Tensor] = []

    def wants_probs(self, is_cross: bool, num_queries: int) -> bool:
        return is_cross and num_queries == self.queries

    def __call__(self, probs: torch.Tensor, is_cross: bool, heads: int) -> torch.Tensor:
        self.maps.append(probs.view(-1, heads, *probs.shape[1:]))
        return probs

    def take(self) -> list[torch.Tensor]:
        maps, self.maps = self.maps, []
        return maps


def step_loss(
    landed: torch.Tensor,
    pivot: torch.Tensor,
    maps: list[torch.Tensor],
    pivot_maps: list[torch.Tensor],
    attention_weight: float,
) -> torch.Tensor:
    """Eq. 8 per image: MSE(z^_{t-1}, z~_{t-1}) + lambda * sum over layers of MSE(a^_t, a~_t).

    Args:
        landed: z~_{t-1}, (B, C, h, w).
        pivot: z^_{t-1}, (B, C, h, w).
        maps: a~_t, per layer (B, heads, q, L).
        pivot_maps: a^_t, per layer (B, heads, q, L).
        attention_weight: lambda.

    Returns:
        (B,) losses.
    """
    latent_loss = (landed - pivot).pow(2).flatten(1).mean(dim=1)
    attention_loss = sum(
        ((own - target).pow(2).flatten(1).mean(dim=1) for own, target in zip(maps, pivot_maps, strict=True)),
        torch.zeros_like(latent_loss),
    )
    return latent_loss + attention_weight * attention_loss


class StyleDiffusionEditHook(EditHook):
    """Edit rows take c~_t as value input for the first `value_steps` steps, then the target prompt."""

    def __init__(self, value_steps: int):
        self.value_steps = value_steps

    def edit_value_embeddings(
        self, reconstruction_values: torch.Tensor, target_embeddings: torch.Tensor, request
    ) -> torch.Tensor:
        del request
        values = target_embeddings.expand_as(reconstruction_values).clone()
        values[: self.value_steps] = reconstruction_values[: self.value_steps]
        return values


def invert(inputs: InversionInputs, params: StyleDiffusionParams) -> MethodResult:
    """DDIM inversion, then per-step mapping-network training along it, all B images at once."""
    if inputs.image_encoder is None or inputs.images is None:
        raise ValueError("style_diffusion needs the images and an image encoder (a CLIP vision tower)")
    errors: list[str | None] = [None] * inputs.batch_size
    trajectory = ddim_trajectory(
        inputs.unet,
        inputs.schedule,
        inputs.clean_latents,
        inputs.cond_embeddings,
        inputs.uncond_embeddings,
        1.0,
        errors,
    )
    with torch.no_grad():
        tokens = inputs.image_encoder(inputs.images).to(inputs.clean_latents.device, torch.float32)
    trained = train_mapping_networks(inputs, params, trajectory, tokens, errors)
    steps = inputs.schedule.num_steps
    return MethodResult(
        trajectory=trajectory,
        uncond_embeddings=per_step(inputs.uncond_embeddings, steps),
        cond_embeddings=per_step(inputs.cond_embeddings, steps),
        reconstruction=trained.reconstruction,
        errors=trained.errors,
        edit_hook=edit_hook(params, steps),
        iterations=trained.iterations,
        value_embeddings=trained.values,
        kept={
            f"mapping.{step}.{name}": weight
            for step, weights in enumerate(trained.weights)
            for name, weight in weights.items()
        },
    )


def edit_hook(params: StyleDiffusionParams, num_steps: int) -> StyleDiffusionEditHook:
    """The edit hook of an inversion restored from its stored state (`pipeline.inversion_state`)."""
    return StyleDiffusionEditHook(round(params.value_steps * num_steps))


class TrainedMappings:
    """What `train_mapping_networks` returns.

    Attributes:
        values: (S, B, L, D) c~_t per step.
        weights: per step, the networks' parameters stacked over the batch.
        reconstruction: (B, C, h, w) z~_0.
        iterations: (S, B) Adam steps per timestep and image.
        losses: (S, B) the loss of each image's last iteration per timestep (NaN where none ran).
        errors: per image, None or where it failed.
    """

    def __init__(self, values, weights, reconstruction, iterations, losses, errors):
        self.values, self.weights = values, weights
        self.reconstruction, self.iterations, self.losses, self.errors = (
            reconstruction,
            iterations,
            losses,
            errors,
        )


def train_mapping_networks(
    inputs: InversionInputs,
    params: StyleDiffusionParams,
    trajectory: torch.Tensor,
    tokens: torch.Tensor,
    errors: list[str | None],
) -> TrainedMappings:
    """Algorithm 1: train M_t at every timestep T -> 1 so the guided step lands on the trajectory.

    Args:
        inputs: the batch (unet, schedule, c, empty-prompt embedding, w).
        params: the method's parameters.
        trajectory: (S+1, B, C, h, w) z^_0 .. z^_T.
        tokens: E(x), (B, N_img, D').
        errors: per-image error slots (images already failed are skipped).
    """
    unet, schedule = inputs.unet, inputs.schedule
    steps, batch = schedule.num_steps, inputs.batch_size
    cond, uncond = inputs.cond_embeddings, inputs.uncond_embeddings
    errors = list(errors)
    latent_size = trajectory.shape[-1]
    recorder = CrossAttentionRecorder(mask_resolution_for(unet, latent_size) ** 2)
    initial = init_mapping(tokens.shape[1], tokens.shape[2], cond.shape[1], cond.shape[2], params.seed)
    current = [{k: v.to(tokens.device) for k, v in initial.items()} for _ in range(batch)]
    schedule_k = inner_iterations(params.inner_steps, params.inner_steps_decay, steps)
    latents = trajectory[steps]
    values_per_step, weights_per_step = [], []
    iterations = torch.zeros(steps, batch, dtype=torch.long)
    last_losses = torch.full((steps, batch), float("nan"))
    with use_attention_controller(unet, recorder, value_input=True):
        for step_index, timestep in enumerate(schedule.timesteps.tolist()):
            if not params.warm_start:
                current = [{k: v.to(tokens.device) for k, v in initial.items()} for _ in range(batch)]
            leaves = [{k: v.clone().requires_grad_(True) for k, v in net.items()} for net in current]
            pivot = trajectory[steps - step_index - 1]
            with torch.no_grad():
                uncond_noise = fixed_branch_noise(unet, latents, timestep, _pair(uncond, uncond))
                recorder.take()  # only the conditional branch's maps enter the loss
                fixed_branch_noise(unet, trajectory[steps - step_index], timestep, _pair(cond, cond))
                pivot_maps = recorder.take()
            optimizer = torch.optim.Adam(
                [p for net in leaves for p in net.values()], lr=params.learning_rate, betas=params.betas
            )
            active = [image for image in range(batch) if errors[image] is None]
            for _ in range(schedule_k[step_index]):
                if not active:
                    break
                index = torch.tensor(active, device=latents.device)
                values = map_tokens(_stack([leaves[i] for i in active]), tokens[index])
                cond_noise = optimised_branch_noise(
                    unet, latents[index], timestep, _pair(cond[index], values)
                )
                noise = uncond_noise[index] + inputs.guidance_scale * (cond_noise - uncond_noise[index])
                landed = schedule.step(noise, timestep, latents[index])
                maps = recorder.take()
                losses = step_loss(
                    landed, pivot[index], maps, [m[index] for m in pivot_maps], params.attention_weight
                )
                optimizer.zero_grad(set_to_none=True)
                losses.sum().backward()
                optimizer.step()
                iterations[step_index, index.cpu()] += 1
                last_losses[step_index, index.cpu()] = losses.detach().cpu()
                active = _still_active(active, losses.detach().tolist(), step_index, timestep, params, errors)
            current = [{k: v.detach() for k, v in net.items()} for net in leaves]
            with torch.no_grad():
                weights = _stack(current)
                values = map_tokens(weights, tokens)
                cond_noise = fixed_branch_noise(unet, latents, timestep, _pair(cond, values))
                recorder.take()
                noise = uncond_noise + inputs.guidance_scale * (cond_noise - uncond_noise)
                latents = schedule.step(noise, timestep, latents)
            values_per_step.append(values)
            weights_per_step.append(weights)
            nonfinite_errors(latents, step_index, timestep, errors, f"{LOOP} (reconstruction step)")
    return TrainedMappings(
        torch.stack(values_per_step), weights_per_step, latents, iterations, last_losses, errors
    )


def _pair(keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """`[key input | value input]` on the token axis, as the value-input processors read it."""
    return torch.cat([keys, values], dim=1)


def _stack(networks: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return {name: torch.stack([net[name] for net in networks]) for name in networks[0]}


def _still_active(
    active: list[int],
    losses: list[float],
    step_index: int,
    timestep: int,
    params: StyleDiffusionParams,
    errors: list[str | None],
) -> list[int]:
    still = []
    for image, loss in zip(active, losses, strict=True):
        if not math.isfinite(loss):
            errors[image] = (
                f"image {image}: non-finite loss in {LOOP} at step {step_index} (timestep {timestep})"
            )
        elif params.early_stop_epsilon is None or loss >= params.early_stop_epsilon + step_index * 2e-5:
            still.append(image)
    return still


__all__ = [
    "CrossAttentionRecorder",
    "StyleDiffusionEditHook",
    "init_mapping",
    "inner_iterations",
    "invert",
    "map_tokens",
    "step_loss",
    "train_mapping_networks",
]
