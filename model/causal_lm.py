"""What the top-level module of every family shares: RoPE buffers, tied heads, the attention plan of a forward, KV
caches, parameter and FLOP counts. The forward, trunk(), the blocks and init_weights() stay in each family's own file.

A subclass sets, in its __init__: self.config (with n_layers, n_heads, n_kv_heads, head_dim, rope_theta,
rope_scaling, tie_embeddings), self.tok_embeddings, self.layers (blocks whose `.attn` is a SelfAttention) and
self.output, then calls self.register_rope_buffer().

Every family's forward takes the same arguments and returns by the same rules:

    model(idx)                                   logits (B, T, V)
    model(idx, labels=..., position_ids=..., cache=..., attention_mask=..., cu_seqlens=...)
                                                 LossOutput with labels, else logits (generation, HF parity, eval)
    model(batch)                                 LossOutput of a model.batch.Batch (its labels, position_ids,
                                                 cu_seqlens and loss_weights): the training step and evaluation
    model(..., reduction="none")                 LossOutput with token_losses, sample_losses, sample_tokens too
    model(..., return_hidden=True)               Trunk(hidden (B, T, dim) after the final norm, aux_loss)
    model.logits(hidden)                         the LM head's logits of some hidden states (B, ..., dim): what
                                                 model(idx) returns at those positions (softcap, scaling included)

return_hidden goes through forward, so FSDP2's forward hooks run; trunk() itself is the same computation for
code that calls it inside another module's forward (classification and policy heads attach there).
"""

import dataclasses
import math
from typing import NamedTuple

import torch
from torch import Tensor, nn

from model.attention import BACKENDS, AttentionPlan, causal_padding_mask
from model.batch import Batch
from model.kv_cache import KVCache
from model.moe import MoE
from model.rope import rope_cos_sin, rope_inv_freq_for


class Trunk(NamedTuple):
    """What a family computes before its LM head: where other heads (classification, policy) attach."""
    hidden: Tensor  # (B, T, dim) the final hidden states, after the final norm
    aux_loss: Tensor | float = 0.0  # fp32 scalar, a mean over layers: router losses of mixture-of-experts models


class Inputs(NamedTuple):
    """A forward's arguments, from a Batch or from the tensors given one by one (see forward_inputs)."""
    idx: Tensor  # (B, T) int64
    labels: Tensor | None  # (B, T) int64, or None: logits, not a loss
    position_ids: Tensor | None  # (B, T), or None: past..past+T-1
    cu_seqlens: Tensor | None  # (n_samples + 1,) int32 on the host, or None
    loss_weights: Tensor | None  # (B, T) float, or None


def forward_inputs(idx: Tensor | Batch, labels: Tensor | None, position_ids: Tensor | None,
                   cu_seqlens: Tensor | None, reduction: str) -> Inputs:
    """The arguments of a family's forward: a Batch's fields, or the tensors as given (then no loss weights)."""
    if isinstance(idx, Batch):
        if labels is not None or position_ids is not None or cu_seqlens is not None:
            raise ValueError("forward: a Batch carries its own labels, position_ids and cu_seqlens; pass none beside it")
        inputs = Inputs(idx.input_ids, idx.labels, idx.position_ids, idx.cu_seqlens, idx.loss_weights)
    else:
        inputs = Inputs(idx, labels, position_ids, cu_seqlens, None)
    if inputs.labels is None and reduction != "sum":
        raise ValueError(f"forward: reduction={reduction!r} is a loss option; it needs labels (or a Batch)")
    return inputs


class CausalLM(nn.Module):
    def register_rope_buffer(self) -> None:
        # RoPE inverse frequencies: derived from the config, never saved (filled by init_buffers()).
        self.register_buffer("inv_freq", torch.empty(self.config.head_dim // 2, dtype=torch.float32),
                             persistent=False)
        if self.config.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight

    def _apply(self, fn, recurse: bool = True):
        # nn.Module._apply (behind to_empty(), to(), cuda()) may give every module a new Parameter, e.g. when
        # moving off the meta device, which would untie the output head from the embedding: tie them again.
        # It also casts buffers with the weights (to(bfloat16)): recompute inv_freq, which must stay fp32.
        super()._apply(fn, recurse)
        if self.config.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight
        self.init_buffers()
        return self

    @torch.no_grad()
    def init_buffers(self) -> None:
        """(Re)compute the non-persistent buffers on their current device: RoPE inverse frequencies, fp32.

        Part of the contract for callers that fill the weights themselves after to_empty(); to_empty(), to()
        and cuda() also call it (see _apply), so inv_freq survives a cast of the model to bfloat16.
        """
        c = self.config
        self.inv_freq = rope_inv_freq_for(c.head_dim, c.rope_theta, c.rope_scaling, device=self.inv_freq.device)

    def attention_plan(self, idx: Tensor, position_ids: Tensor | None = None, cache: KVCache | None = None,
                       attention_mask: Tensor | None = None, cu_seqlens: Tensor | None = None) -> AttentionPlan:
        """The AttentionPlan every layer of a forward over idx (B, T) shares, built once before the first layer:
        cos, sin (B or 1, T, head_dim / 2) of the rotary angles (positions default to past..past+T-1, past = the
        cached length), the padding mask (B, 1, T, past + T) from attention_mask (B, past + T), and the document
        layout of packed batches from cu_seqlens (kept on the host by the loaders: no device read-back)."""
        B, T = idx.shape
        past = cache.length if cache is not None else 0
        if position_ids is None:
            position_ids = torch.arange(past, past + T, device=idx.device)[None, :]  # (1, T)
        cos, sin = rope_cos_sin(self.inv_freq, position_ids, self.config.rope_scaling.cos_sin_scale())
        mask = None if attention_mask is None else causal_padding_mask(past, T, attention_mask, idx.device)
        return AttentionPlan(B, T, idx.device, cos=cos, sin=sin, mask=mask, cu_seqlens=cu_seqlens)

    def logits(self, hidden: Tensor) -> Tensor:
        """The LM head on hidden states (..., dim) from trunk(): logits (..., vocab_size), as forward computes them.
        Scoring a few positions (the last token of each prompt) this way never builds the other positions' logits."""
        return self.output(hidden)

    def new_cache(self, batch_size: int, max_len: int, dtype: torch.dtype | None = None) -> KVCache:
        """An empty KVCache for this model: batch_size rows of up to max_len positions."""
        c = self.config
        weight = self.tok_embeddings.weight
        return KVCache(c.n_layers, batch_size, c.n_kv_heads, c.head_dim, max_len, dtype or weight.dtype, weight.device)

    def _inactive_expert_params(self) -> int:
        """Expert parameters a token does not compute with: (n_experts - top_k) / n_experts of every MoE's."""
        n = 0
        for moe in (m for m in self.modules() if isinstance(m, MoE)):
            experts = sum(p.numel() for name, p in moe.named_parameters() if not name.startswith("router"))
            n += experts * (moe.n_experts - moe.top_k) // moe.n_experts
        return n

    def num_params(self, non_embedding: bool = False, active: bool = False) -> int:
        """Number of unique parameters (a tied embedding counts once). non_embedding=True leaves out the token
        embedding table (Kaplan et al. 2020's N; an untied output head stays in); active=True counts only the
        top_k experts of each mixture a token goes through."""
        n = sum(p.numel() for p in self.parameters())
        if active:
            n -= self._inactive_expert_params()
        if non_embedding:
            n -= self.tok_embeddings.weight.numel()
        return n

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token (forward + backward), PaLM (Chowdhery et al. 2022) appendix B:
        6 * N_matmul + 12 * n_heads * head_dim * (keys a query sees, summed over layers).

        N_matmul counts the weights of every matrix multiply a token goes through: the attention and MLP
        projections, the routers and the top_k of n_experts experts of each mixture, and the output head. The
        embedding table is a lookup, so it is left out, except that a tied table is the output head's weight and
        is counted once as such. Biases and norm weights are not matmul weights. A query sees seq_len keys, or
        min(window, seq_len) on a sliding-window layer.
        """
        c = self.config
        n_matmul = sum(m.weight.numel() for m in self.modules() if isinstance(m, nn.Linear))
        for moe in (m for m in self.modules() if isinstance(m, MoE)):
            n_matmul += moe.top_k * (moe.w_gate_up[0].numel() + moe.w_down[0].numel())
        keys = sum(min(layer.attn.window or seq_len, seq_len) for layer in self.layers)
        return 6.0 * n_matmul + 12.0 * c.n_heads * c.head_dim * keys


def check_config(c, positive: tuple[str, ...], non_negative: tuple[str, ...] = ()) -> None:
    """The checks every family's config.validate() makes: ValueError naming the first inconsistent field.

    Every float field must be finite; the `positive` fields (and norm_eps and rope_theta, which every family has)
    must be > 0, the `non_negative` ones (and init_std) >= 0."""
    name = type(c).__name__
    for f in dataclasses.fields(c):
        value = getattr(c, f.name)
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"{name}.{f.name} must be a finite number, got {value}")
    for field in (*positive, "norm_eps", "rope_theta"):
        if not getattr(c, field) > 0:
            raise ValueError(f"{name}.{field} must be positive, got {getattr(c, field)}")
    for field in (*non_negative, "init_std"):
        if not getattr(c, field) >= 0:
            raise ValueError(f"{name}.{field} must be >= 0, got {getattr(c, field)}")
    if c.head_dim <= 0 or c.head_dim % 2:
        raise ValueError(f"{name}: head_dim ({c.head_dim}) must be a positive even integer for RoPE "
                         f"(check dim, n_heads and head_dim)")
    if c.n_heads % c.n_kv_heads:
        raise ValueError(f"{name}.n_heads ({c.n_heads}) must be a multiple of n_kv_heads ({c.n_kv_heads})")
    if getattr(c, "top_k", 0) > getattr(c, "n_experts", 0) > 0:
        raise ValueError(f"{name}.top_k ({c.top_k}) exceeds n_experts ({c.n_experts})")
    if getattr(c, "sliding_window", 0) > c.max_seq_len:
        raise ValueError(f"{name}.sliding_window ({c.sliding_window}) is larger than the context max_seq_len "
                         f"({c.max_seq_len}): lower sliding_window or raise max_seq_len")
    if c.attn_backend not in BACKENDS:
        raise ValueError(f"{name}.attn_backend {c.attn_backend!r} unknown; expected one of {BACKENDS}")
    c.rope_scaling.validate()


def check_layer_types(c, allowed: tuple[str, ...]) -> None:
    if c.layer_types and (len(c.layer_types) != c.n_layers or set(c.layer_types) - set(allowed)):
        raise ValueError(f"{type(c).__name__}.layer_types must list one of {allowed} per layer ({c.n_layers})")
