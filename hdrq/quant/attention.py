"""``nn.MultiheadAttention`` rebuilt from four ``nn.Linear`` projections, so each can be quantized.

``nn.MultiheadAttention`` keeps its input projection as a packed ``in_proj_weight`` parameter and reads
``out_proj.weight`` directly inside ``F.multi_head_attention_forward``: neither projection goes through a
module call, so swapping in a quantized ``Linear`` would silently change nothing. This module computes the
same function with ``q_proj``, ``k_proj``, ``v_proj`` and ``out_proj`` called as modules (the
decomposition ``torch.ao.nn.quantizable.MultiheadAttention`` also uses), and the attention itself with
``F.scaled_dot_product_attention``.

It also declines the fused fast paths of ``nn.TransformerEncoderLayer`` / ``nn.TransformerEncoder``
(which would read the packed weights): they check ``self_attn._qkv_same_embed_dim`` and
``self_attn.in_proj_bias`` first, and this module reports ``False`` / ``None``.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class DecomposedMultiheadAttention(nn.Module):
    """Drop-in replacement of ``nn.MultiheadAttention`` (same forward signature and results) whose four
    projections are ``nn.Linear`` modules. ``add_bias_kv`` and ``add_zero_attn`` are not supported."""

    # Read by nn.TransformerEncoderLayer / nn.TransformerEncoder before their fused fast path: these values
    # make them take the module path, which calls this module's forward.
    _qkv_same_embed_dim = False
    in_proj_weight = None
    in_proj_bias = None

    def __init__(self, embed_dim: int, num_heads: int, *, kdim: Optional[int] = None, vdim: Optional[int] = None,
                 bias: bool = True, dropout: float = 0.0, batch_first: bool = False):
        super().__init__()
        if embed_dim % num_heads != 0:
            raise ValueError(f"embed_dim {embed_dim} must be divisible by num_heads {num_heads}")
        self.embed_dim, self.num_heads = embed_dim, num_heads
        self.head_dim = embed_dim // num_heads
        self.kdim = kdim if kdim is not None else embed_dim
        self.vdim = vdim if vdim is not None else embed_dim
        self.dropout, self.batch_first = dropout, batch_first
        self.q_proj = nn.Linear(embed_dim, embed_dim, bias=bias)
        self.k_proj = nn.Linear(self.kdim, embed_dim, bias=bias)
        self.v_proj = nn.Linear(self.vdim, embed_dim, bias=bias)
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=bias)

    @classmethod
    @torch.no_grad()
    def from_float(cls, mha: nn.MultiheadAttention) -> "DecomposedMultiheadAttention":
        """The same attention as ``mha`` (weights copied)."""
        if mha.bias_k is not None or mha.add_zero_attn:
            raise NotImplementedError("DecomposedMultiheadAttention does not support add_bias_kv=True or "
                                      "add_zero_attn=True")
        bias = mha.in_proj_bias is not None
        with torch.device(mha.out_proj.weight.device):  # built where the weights are (the meta device too)
            new = cls(mha.embed_dim, mha.num_heads, kdim=mha.kdim, vdim=mha.vdim, bias=bias, dropout=mha.dropout,
                      batch_first=mha.batch_first)
        if mha._qkv_same_embed_dim:
            wq, wk, wv = mha.in_proj_weight.chunk(3, dim=0)
        else:
            wq, wk, wv = mha.q_proj_weight, mha.k_proj_weight, mha.v_proj_weight
        for proj, w in zip((new.q_proj, new.k_proj, new.v_proj), (wq, wk, wv)):
            proj.weight.copy_(w)
        if bias:
            for proj, b in zip((new.q_proj, new.k_proj, new.v_proj), mha.in_proj_bias.chunk(3)):
                proj.bias.copy_(b)
        new.out_proj.weight.copy_(mha.out_proj.weight)
        if new.out_proj.bias is not None:
            if mha.out_proj.bias is not None:
                new.out_proj.bias.copy_(mha.out_proj.bias)
            else:
                new.out_proj.bias.zero_()
        return new.to(device=mha.out_proj.weight.device, dtype=mha.out_proj.weight.dtype).train(mha.training)

    def forward(self, query: Tensor, key: Tensor, value: Tensor, key_padding_mask: Optional[Tensor] = None,
                need_weights: bool = True, attn_mask: Optional[Tensor] = None, average_attn_weights: bool = True,
                is_causal: bool = False) -> tuple[Tensor, Optional[Tensor]]:
        batched = query.dim() == 3
        if batched and not self.batch_first:  # [L, B, E] -> [B, L, E]
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        elif not batched:  # [L, E] -> [1, L, E]; masks gain the batch dimension too
            query, key, value = (t.unsqueeze(0) for t in (query, key, value))
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
            if attn_mask is not None and attn_mask.dim() == 3:
                attn_mask = attn_mask.unsqueeze(0)
        b, tgt, _ = query.shape
        src = key.shape[1]
        h, d = self.num_heads, self.head_dim
        q = self.q_proj(query).view(b, tgt, h, d).transpose(1, 2)
        k = self.k_proj(key).view(b, src, h, d).transpose(1, 2)
        v = self.v_proj(value).view(b, src, h, d).transpose(1, 2)

        if is_causal and attn_mask is None:
            raise RuntimeError("Need attn_mask if specifying the is_causal hint (as nn.MultiheadAttention)")
        mask = None
        if attn_mask is not None:  # [L, S] or [B*H, L, S]; bool True = masked out, float = added
            mask = F._canonical_mask(mask=attn_mask, mask_name="attn_mask", other_type=None, other_name="",
                                     target_type=q.dtype, check_other=False)
            mask = mask.reshape(1, 1, tgt, src) if mask.dim() == 2 else mask.reshape(b, h, tgt, src)
        if key_padding_mask is not None:  # [B, S]
            kpm = F._canonical_mask(mask=key_padding_mask, mask_name="key_padding_mask", other_type=None,
                                    other_name="", target_type=q.dtype, check_other=False)
            kpm = kpm.reshape(b, 1, 1, src)
            mask = kpm if mask is None else mask + kpm
        dropout_p = self.dropout if self.training else 0.0

        weights = None
        if need_weights:
            scores = torch.matmul(q * (1.0 / math.sqrt(d)), k.transpose(-2, -1))
            if mask is not None:
                scores = scores + mask
            weights = torch.softmax(scores, dim=-1)
            if dropout_p > 0.0:
                weights = F.dropout(weights, p=dropout_p)
            attn = torch.matmul(weights, v)
            if average_attn_weights:
                weights = weights.mean(dim=1)
        else:
            attn = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)
        out = self.out_proj(attn.transpose(1, 2).reshape(b, tgt, self.embed_dim))

        if batched and not self.batch_first:
            out = out.transpose(0, 1)
        elif not batched:
            out = out.squeeze(0)
            weights = weights.squeeze(0) if weights is not None else None
        return out, weights

    def extra_repr(self) -> str:
        return f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, batch_first={self.batch_first}"


def decompose_attention(model: nn.Module) -> nn.Module:
    """Replace (in place) every ``nn.MultiheadAttention`` of ``model`` by its
    :class:`DecomposedMultiheadAttention`, and turn off ``nn.TransformerEncoder``'s nested-tensor fast path
    (an optimisation that would read the packed projection weights). Returns ``model``."""
    for name, m in list(model.named_modules()):
        for child_name, child in list(m.named_children()):
            if isinstance(child, nn.MultiheadAttention):
                setattr(m, child_name, DecomposedMultiheadAttention.from_float(child))
        if isinstance(m, nn.TransformerEncoder):
            m.use_nested_tensor = False
    return model
