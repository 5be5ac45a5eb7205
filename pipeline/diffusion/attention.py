"""Prompt-to-Prompt and P2Plus attention control through diffusers' attention-processor API.

Legend (Prompt-to-Prompt, Hertz et al. §3.2, and its reference controllers; StyleDiffusion §3.4):

    M_t, M*_t             cross-attention maps of the source row and of an edit row at step t
    mapped(M_t)           replace: M_t @ mapper (word swap); refine: M_t[:, A] * alpha + M*_t * (1 - alpha);
                          none: M_t (P2P's AttentionReweight without a previous controller)
    c                     equalizer, per target token (re-weighting; 1 = unchanged)
    w_t[j]                cross window: 1 where target token j is injected at step t (tau_c, per word)
    Edit(M_t, M*_t, t)    what an edit row uses:  w_t * (mapped(M_t) * c) + (1 - w_t) * M*_t
                          (re-weighting acts only inside the window, as P2P's controllers compose)
    self window           conditional self-attention of the edit row copied from the source row
    tau_u window          P2Plus: unconditional self-attention copied too

Recorded maps (local blend, edit masks) are the edit rows' maps *after* Edit(...), as P2P's attention
store holds them (its controller edits the stored tensor in place).

Batch layout seen by every attention layer (classifier-free guidance doubles the rows)::

    [ uncond row 0 .. uncond row N-1 | cond row 0 .. cond row N-1 ] x heads

Rows are source rows (an image's reconstruction) and edit rows; `edit_sources[e]` is the source row
of edit row `edit_rows[e]`. Several images, each with several edits, share one UNet call.

Value input (StyleDiffusion §3.3): with `value_input=True` every cross-attention layer receives the
key input and the value input side by side on the token axis, `[c | c~]` of shape (rows, 2L, D); the
key projection reads c and the value projection reads c~, so the attention maps (the "where") come
from c alone while c~ supplies what is drawn. Rows that should attend normally pass `[c | c]`.

Self-attention is controlled only in layers with at most (latent_size / 2)^2 queries, and masks are
read from cross-attention layers at the smallest resolution >= latent_size / 4: for SD 1.5 (64x64
latents) these are P2P's 32x32 and 16x16 choices.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers.models.attention_processor import Attention, AttnProcessor2_0


@dataclass(frozen=True)
class EditPlan:
    """Per-edit attention-control tensors, stacked over the E edits of one UNet batch.

    Attributes:
        num_rows: N, rows per guidance branch.
        edit_rows: (E,) long, edit row indices.
        edit_sources: (E,) long, the source row of each edit.
        cross_matrix: (E, L, L), source token -> target token map (identity for refine's copy and none).
        cross_alpha: (E, L), weight of the mapped source map per target token (refine: 0 for new tokens).
        equalizer: (E, L), re-weighting scale per target token.
        cross_window: (E, S, L), 1 where target token j of edit e is injected at step i.
        self_window: (E, 2) long, [first, last) steps of conditional self-attention injection.
        uncond_self_window: (E, 2) long, [first, last) steps of P2Plus unconditional injection.
    """

    num_rows: int
    edit_rows: torch.Tensor
    edit_sources: torch.Tensor
    cross_matrix: torch.Tensor
    cross_alpha: torch.Tensor
    equalizer: torch.Tensor
    cross_window: torch.Tensor
    self_window: torch.Tensor
    uncond_self_window: torch.Tensor


class AttentionController:
    """Edits attention maps of edit rows from their source rows and records cross-attention maps.

    The sampler sets `step` before each UNet call. Recorded maps (cond branch, after editing, mean
    over heads, summed over layers and steps at `mask_resolution`) feed local blend and the edit masks.
    """

    def __init__(self, plan: EditPlan, latent_size: int, mask_resolution: int):
        self.plan = plan
        self.step = 0
        self.self_max_queries = (latent_size // 2) ** 2
        self.mask_queries = mask_resolution**2
        self.cross_maps: torch.Tensor | None = None  # (N, mask_queries, L)

    def _in_window(self, window: torch.Tensor) -> torch.Tensor:
        """(E,) bool: edits whose [first, last) window holds the current step."""
        return (window[:, 0] <= self.step) & (self.step < window[:, 1])

    def wants_probs(self, is_cross: bool, num_queries: int) -> bool:
        if is_cross:
            return True
        if num_queries > self.self_max_queries:
            return False
        return bool(
            self._in_window(self.plan.self_window).any()
            or self._in_window(self.plan.uncond_self_window).any()
        )

    def __call__(self, probs: torch.Tensor, is_cross: bool, heads: int) -> torch.Tensor:
        """Edit attention probabilities (2N*heads, q, k) of one layer; returns the same shape."""
        rows, queries, keys = 2 * self.plan.num_rows, probs.shape[1], probs.shape[2]
        probs = probs.view(2, self.plan.num_rows, heads, queries, keys).clone()
        if is_cross:
            probs[1] = self._edit_cross(probs[1])
            self._record(probs[1], queries)
        else:
            probs[1] = self._copy_self(probs[1], self.plan.self_window)
            probs[0] = self._copy_self(probs[0], self.plan.uncond_self_window)
        return probs.view(rows * heads, queries, keys)

    def _record(self, cond_probs: torch.Tensor, queries: int) -> None:
        if queries != self.mask_queries:
            return
        layer_maps = cond_probs.mean(dim=1).float()
        self.cross_maps = layer_maps if self.cross_maps is None else self.cross_maps + layer_maps

    def _edit_cross(self, cond_probs: torch.Tensor) -> torch.Tensor:
        plan = self.plan
        if plan.edit_rows.numel() == 0:
            return cond_probs
        own = cond_probs[plan.edit_rows]  # (E, heads, q, L)
        source = cond_probs[plan.edit_sources]
        mapped = torch.einsum("ehqk,ekl->ehql", source, plan.cross_matrix.to(source.dtype))
        alpha = plan.cross_alpha.to(own.dtype)[:, None, None, :]
        injected = (mapped * alpha + own * (1.0 - alpha)) * plan.equalizer.to(own.dtype)[:, None, None, :]
        window = plan.cross_window[:, self.step].to(own.dtype)[:, None, None, :]
        cond_probs[plan.edit_rows] = window * injected + (1.0 - window) * own
        return cond_probs

    def _copy_self(self, branch_probs: torch.Tensor, window: torch.Tensor) -> torch.Tensor:
        plan = self.plan
        if plan.edit_rows.numel() == 0:
            return branch_probs
        active = self._in_window(window)
        if not active.any():
            return branch_probs
        rows, sources = plan.edit_rows[active], plan.edit_sources[active]
        branch_probs[rows] = branch_probs[sources]
        return branch_probs


class ControlledAttnProcessor:
    """diffusers attention processor that exposes attention probabilities to an AttentionController
    and, with `value_input`, feeds the value projection of cross-attention from its own input.

    Computes attention exactly as diffusers' `AttnProcessor`; layers whose maps the controller does
    not need this step (and that take no separate value input) use diffusers' fused `AttnProcessor2_0`.
    The controller is anything with `wants_probs(is_cross, num_queries)` and
    `__call__(probs, is_cross, heads) -> probs`.
    """

    def __init__(self, controller: AttentionController | None, value_input: bool = False):
        self.controller = controller
        self.value_input = value_input
        self.fused = AttnProcessor2_0()

    def __call__(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        **kwargs,
    ) -> torch.Tensor:
        is_cross = encoder_hidden_states is not None
        split = is_cross and self.value_input
        num_queries = hidden_states.shape[1] if hidden_states.ndim == 3 else hidden_states[0, 0].numel()
        wants = self.controller is not None and self.controller.wants_probs(is_cross, num_queries)
        if not wants and not split:
            return self.fused(attn, hidden_states, encoder_hidden_states, attention_mask, temb)
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch_size, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)
        if attn.group_norm is not None:  # before the keys: self-attention attends to the normed input
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        key_states, value_states = key_and_value_inputs(attn, hidden_states, encoder_hidden_states, split)
        batch_size, sequence_length, _ = key_states.shape
        attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
        query = attn.to_q(hidden_states)
        key = attn.head_to_batch_dim(attn.to_k(key_states))
        value = attn.head_to_batch_dim(attn.to_v(value_states))
        probs = attn.get_attention_scores(attn.head_to_batch_dim(query), key, attention_mask)
        if wants:
            probs = self.controller(probs, is_cross, attn.heads)
        hidden_states = attn.batch_to_head_dim(torch.bmm(probs, value))
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


def key_and_value_inputs(
    attn: Attention, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None, split: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """The inputs of the key and of the value projection of one layer.

    Args:
        attn: the layer.
        hidden_states: (rows, q, C) the layer's queries' input (self-attention's keys and values).
        encoder_hidden_states: (rows, L, D), or (rows, 2L, D) `[key input | value input]` when split.
        split: whether the cross-attention input carries a separate value input.
    """
    if encoder_hidden_states is None:
        return hidden_states, hidden_states
    if split:
        key_states, value_states = encoder_hidden_states.chunk(2, dim=1)
    else:
        key_states = value_states = encoder_hidden_states
    if attn.norm_cross:
        key_states = attn.norm_encoder_hidden_states(key_states)
        value_states = attn.norm_encoder_hidden_states(value_states)
    return key_states, value_states


def cross_attention_resolutions(unet: torch.nn.Module, latent_size: int) -> list[int]:
    """Spatial sides of the UNet's cross-attention layers for `latent_size` latents.

    Each level down halves the side rounding up (diffusers' stride-2 convolution with padding 1 maps
    n to ceil(n / 2)), so an odd latent of 18 has layers of 18, 9, 5 and 3.
    """
    sides = set()
    for name in unet.attn_processors:
        if "attn2" not in name:
            continue
        block = name.split(".")[0]
        if block == "mid_block":
            level = len(unet.config.block_out_channels) - 1
        else:
            index = int(name.split(".")[1])
            levels = len(unet.config.block_out_channels)
            level = index if block == "down_blocks" else levels - 1 - index
        side = latent_size
        for _ in range(level):
            side = (side + 1) // 2
        sides.add(side)
    return sorted(sides)


def mask_resolution_for(unet: torch.nn.Module, latent_size: int) -> int:
    """The smallest cross-attention resolution >= latent_size / 4 (SD 1.5: 16)."""
    sides = cross_attention_resolutions(unet, latent_size)
    if not sides:
        raise ValueError("the UNet has no cross-attention layers; attention control needs them")
    candidates = [side for side in sides if 4 * side >= latent_size]
    return min(candidates) if candidates else max(sides)


class use_attention_controller:
    """Context manager: install ControlledAttnProcessor on every attention layer, restore after.

    Nothing is installed when there is neither a controller nor a separate value input.
    """

    def __init__(
        self, unet: torch.nn.Module, controller: AttentionController | None, value_input: bool = False
    ):
        self.unet, self.controller, self.value_input, self.saved = unet, controller, value_input, None

    def __enter__(self) -> AttentionController | None:
        if self.controller is not None or self.value_input:
            self.saved = dict(self.unet.attn_processors)
            self.unet.set_attn_processor(ControlledAttnProcessor(self.controller, self.value_input))
        return self.controller

    def __exit__(self, *exc_info) -> None:
        if self.saved is not None:
            self.unet.set_attn_processor(self.saved)
