"""Rotary attention through PyTorch's fused scaled_dot_product_attention (flash / memory-efficient kernels)
instead of transformers' written-out RoFormer attention: the same result, faster and smaller."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    import transformers


def rotary_sdpa_attention(
    self: torch.nn.Module,
    hidden_states: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    sinusoidal_pos: torch.Tensor | None = None,
    **_: Any,
) -> tuple[torch.Tensor, None]:
    """RoFormer's self-attention with the same weights and rotations, computed by `scaled_dot_product_attention`.

    transformers' RoFormer writes attention out (QKᵀ, softmax, dropout, ·V: the [tokens x tokens] matrices of every
    head go through memory three times, forward and backward). Rotating q and k first and handing them to PyTorch's
    fused kernel (flash attention on GPUs, a fused kernel on CPUs) computes the same function in one pass.
    """
    batch_shape = (*hidden_states.shape[:-1], -1, self.attention_head_size)
    query, key, value = (
        projection(hidden_states).view(batch_shape).transpose(1, 2) for projection in (self.query, self.key, self.value)
    )
    if self.rotary_value:
        query, key, value = self.apply_rotary_position_embeddings(sinusoidal_pos, query, key, value)
    else:
        query, key = self.apply_rotary_position_embeddings(sinusoidal_pos, query, key)
    context = F.scaled_dot_product_attention(
        query, key, value, attn_mask=attention_mask, dropout_p=self.dropout.p if self.training else 0.0
    )
    return context.transpose(1, 2).flatten(2), None


def use_fused_rotary_attention(model: "transformers.PreTrainedModel") -> None:
    """Make every RoFormer self-attention layer of `model` run `rotary_sdpa_attention` (parameters, their names and
    the saved checkpoints stay RoFormer's own, so `from_pretrained` loads them into the stock class)."""
    from transformers.models.roformer.modeling_roformer import RoFormerSelfAttention

    for module in model.modules():
        if isinstance(module, RoFormerSelfAttention):
            module.forward = rotary_sdpa_attention.__get__(module)


def freeze_sinusoid_positions(model: "transformers.PreTrainedModel") -> None:
    """Keep RoFormer's sinusoid position table fixed: `from_pretrained` makes it trainable (a no-op for others)."""
    if model.config.model_type == "roformer":
        model.base_model.encoder.embed_positions.requires_grad_(False)
