"""Scaled dot-product attention behind one function, four backends, and the features each can serve.

    attention(q, k, v) = softmax(mask(softcap(q @ k^T * scale)) [, sink]) @ v,    scale = 1 / sqrt(head_dim) by default

q is (B, n_heads, Tq, head_dim); k and v are (B, n_kv_heads, Tk, head_dim) with n_heads a multiple of n_kv_heads
(grouped-query attention, Ainslie et al. 2023: query head h reads kv head h // (n_heads // n_kv_heads)). When
Tk > Tq (a KV cache) query i sits at absolute key index i + Tk - Tq.

Features are arguments of the call, not properties of a backend:
    causal      query at absolute index a sees keys j <= a
    window      sliding window of `window` keys: also a - j < window (Gemma2, GPT-OSS; HF's `sliding_window`)
    documents   cu_seqlens (n_docs + 1,) int32: offsets of packed documents in the flattened (B * T) tokens; a
                query sees only keys of its own document (rows are separate sequences whatever cu_seqlens says)
    softcap     scores -> softcap * tanh(scores / softcap) before masking (Gemma2's attn_logit_softcapping)
    sinks       (n_heads,) one learned logit per head that joins the softmax denominator and no value (GPT-OSS):
                p_j = exp(s_j) / (exp(sink) + sum_j' exp(s_j'))
    mask        explicit boolean (B or 1, 1 or n_heads, Tq, Tk), True = may attend (padding in generation)
    fp32        inputs in a dtype other than fp16/bf16 (flash kernels take only those two)

Backends and what they serve (FEATURES):
    "eager": the reference. Explicit math in fp32, kv heads repeated; every feature. (B, H, Tq, Tk) in memory.
    "sdpa":  F.scaled_dot_product_attention; window, documents and padding become a boolean mask. No softcap,
             no sinks (sdpa has no hook for either).
    "flex":  FlexAttention (torch.compile'd): causal/window/documents as a BlockMask (skipped blocks cost nothing),
             softcap as a score_mod, sinks by rescaling with the log-sum-exp it returns:
                 out_sink = out * Z / (Z + e^sink) = out * sigmoid(lse - sink),    lse = log Z
             and gradients flow through lse to q, k and the sinks. No explicit masks, no KV cache (a
             compiled kernel per decode length would recompile every step: decoding uses sdpa or eager). CUDA (CPU
             FlexAttention has neither a backward nor the log-sum-exp).
    "flash": flash-attn's flash_attn_varlen_func (window, softcap) when installed, else PyTorch's own
             varlen_attn (window where the installed version has it, no softcap). Documents are native
             (cu_seqlens); no sinks, no explicit masks, no KV cache. CUDA only.
    "auto":  the first of flash, flex, sdpa, eager (CUDA) or sdpa, eager (CPU) that serves every feature the
             call needs; the choice is printed once per distinct need.

A backend asked for a feature it lacks raises an error naming the feature and the backends that have it: it is
never swapped for another silently.

Planned once per forward (AttentionPlan). A model builds one plan before its first layer (CausalLM.attention_plan)
and hands it to every layer: the rotary cos/sin, the padding mask, and for packed batches the document layout,
computed from the host cu_seqlens and validated once (DocumentLayout: the offsets with every row start merged in,
on the device as flash takes them, their longest segment as a host int, the (B, T) document index of every token,
and the offsets as a host tuple keying flex's BlockMask cache). The boolean masks eager and sdpa take are built on
first use and cached in the plan by (Tq, Tk, causal, window), so a model with sliding and global layers builds two
per forward, not one per layer. No layer reads a device tensor back: the only host read is cu_seqlens' values,
once per forward, and none at all when it is on the host, where the loaders keep it. A direct attention() call
without a plan gets one of its own.
"""

import functools
import inspect
import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kernels import KernelConfig
from model.rope import apply_rope

BACKENDS = ("auto", "eager", "sdpa", "flex", "flash")
ALL_FEATURES = frozenset({"window", "documents", "softcap", "sinks", "mask", "kv_cache", "fp32"})
FEATURES: dict[str, frozenset[str]] = {
    "eager": ALL_FEATURES,
    "sdpa": frozenset({"window", "documents", "mask", "kv_cache", "fp32"}),
    "flex": frozenset({"window", "documents", "softcap", "sinks", "fp32"}),
    "flash": frozenset({"window", "documents", "softcap"}),
}


# ----------------------------------------------------------------------------- backend choice


@functools.cache
def flash_attn_varlen():
    """flash-attn's flash_attn_varlen_func, or None when the package is not installed."""
    try:
        from flash_attn import flash_attn_varlen_func
    except ImportError:
        return None
    return flash_attn_varlen_func


@functools.cache
def torch_varlen_attn():
    """(varlen_attn, has_window) from torch.nn.attention.varlen, or (None, False) where this torch lacks it."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None, False
    return varlen_attn, "window_size" in inspect.signature(varlen_attn).parameters


def backend_features(backend: str) -> frozenset[str]:
    """What `backend` serves in this installation (flash without flash-attn loses softcap, maybe window)."""
    if backend == "flash" and flash_attn_varlen() is None:
        _, has_window = torch_varlen_attn()
        return frozenset({"documents", "window"} if has_window else {"documents"})
    return FEATURES[backend]


def available(backend: str, device: torch.device) -> bool:
    if backend in ("eager", "sdpa"):
        return True
    if device.type != "cuda":
        return False
    return backend == "flex" or flash_attn_varlen() is not None or torch_varlen_attn()[0] is not None


_announced: set = set()


def resolve_backend(requested: str, needs: frozenset[str], device: torch.device) -> str:
    """The backend that runs a call needing `needs` (subset of ALL_FEATURES); errors name what is missing."""
    if requested not in BACKENDS:
        raise ValueError(f"unknown attention backend {requested!r}; expected one of {BACKENDS}")
    if requested == "auto":
        order = ("flash", "flex", "sdpa", "eager") if device.type == "cuda" else ("sdpa", "eager")
        chosen = next(b for b in order if available(b, device) and needs <= backend_features(b))
        key = (device.type, needs, chosen)
        if key not in _announced:
            _announced.add(key)
            print(f"attention: auto -> {chosen} on {device.type} (needs: {', '.join(sorted(needs)) or 'causal only'})")
        return chosen
    missing = needs - backend_features(requested)
    if missing:
        able = [b for b in FEATURES if needs <= backend_features(b)]
        raise ValueError(f"attention backend {requested!r} does not support {', '.join(sorted(missing))} "
                         f"(this call needs {', '.join(sorted(needs))}); backends that do: {', '.join(able)}, "
                         f"or 'auto' to pick one")
    if not available(requested, device):
        raise ValueError(f"attention backend {requested!r} is not available on {device.type}"
                         + ("" if device.type == "cuda" else " (flex and flash need CUDA for training)"))
    return requested


# ----------------------------------------------------------------------------- masks


def doc_ids_from_cu_seqlens(cu_seqlens: Tensor, batch: int, seq_len: int) -> Tensor:
    """(B, T) int: the document index of every token of a packed batch (cu_seqlens over the flattened B * T)."""
    flat = torch.arange(batch * seq_len, device=cu_seqlens.device)  # (B*T,)
    return (torch.searchsorted(cu_seqlens.to(torch.int64), flat, right=True) - 1).view(batch, seq_len)


def causal_padding_mask(q_start: int, q_len: int, key_valid: Tensor | None, device: torch.device) -> Tensor:
    """Boolean mask (B or 1, 1, q_len, q_start + q_len): query at absolute position q_start + i may attend key j
    when j <= q_start + i and key j is a real token (key_valid (B, >= Tk), 1 = token, 0 = padding).

    A query that is itself padding would then see no key at all and its softmax would be 0/0; it is allowed to
    attend itself, so every row stays finite (its output is never used).
    """
    k_len = q_start + q_len
    q_pos = torch.arange(q_start, k_len, device=device)[:, None]  # (Tq, 1)
    k_pos = torch.arange(k_len, device=device)[None, :]  # (1, Tk)
    allowed = (k_pos <= q_pos)[None, None]  # (1, 1, Tq, Tk)
    if key_valid is not None:
        valid = key_valid[:, None, None, :k_len].bool()  # (B, 1, 1, Tk)
        allowed = (allowed & valid) | (k_pos == q_pos)  # (B, 1, Tq, Tk)
    return allowed


def allowed_mask(t_q: int, t_k: int, device: torch.device, causal: bool, window: int, doc_ids: Tensor | None,
                 mask: Tensor | None) -> Tensor | None:
    """Boolean (B or 1, 1 or H, Tq, Tk), True where query i may attend key j, or None when nothing is masked."""
    q_abs = torch.arange(t_k - t_q, t_k, device=device)[:, None]  # (Tq, 1) absolute key index of each query
    k_idx = torch.arange(t_k, device=device)[None, :]  # (1, Tk)
    allowed = None

    def both(a: Tensor | None, b: Tensor) -> Tensor:
        return b if a is None else a & b

    if causal:
        allowed = both(allowed, (k_idx <= q_abs)[None, None])  # (1, 1, Tq, Tk)
    if window:
        allowed = both(allowed, (q_abs - k_idx < window)[None, None])
    if doc_ids is not None:
        same_doc = doc_ids[:, t_k - t_q:, None] == doc_ids[:, None, :]  # (B, Tq, Tk)
        allowed = both(allowed, same_doc[:, None])  # (B, 1, Tq, Tk)
    if mask is not None:
        allowed = both(allowed, mask.bool())
    return allowed


# ----------------------------------------------------------------------------- the plan of one forward


class DocumentLayout(NamedTuple):
    """Packed documents of a (B, T) batch as the backends take them, from the offsets' host values."""
    key: tuple[int, ...]  # offsets with every row start merged in, host ints: hashable, keys flex's BlockMask cache
    cu_seqlens: Tensor  # (n_segments + 1,) int32 on the device: the same offsets, flash's varlen layout
    max_seqlen: int  # the longest segment (a document, or the part of one that lies in one row)
    doc_ids: Tensor  # (B, T) int64 on the device: the segment of every token (eager and sdpa's masks, flex)


def document_layout(cu_seqlens: Tensor, batch: int, seq_len: int, device: torch.device) -> DocumentLayout:
    """Validate packed-document offsets cu_seqlens (n_docs + 1,) over the flattened B * T tokens and lay them out.

    Only host values are read: loaders keep cu_seqlens on the host. One that arrives on a GPU (a caller moved it,
    or FSDP2's root moved a Batch's tensors) is read back here, once per forward, never per layer. Rows are separate
    sequences whatever cu_seqlens says: each row start is merged in as the start of a segment.
    """
    total = batch * seq_len
    offsets = cu_seqlens.tolist() if cu_seqlens.dim() == 1 else []  # (a device-to-host copy if on a GPU)
    if not offsets or offsets[0] != 0 or offsets[-1] != total:
        raise ValueError(f"cu_seqlens must be 1-D offsets from 0 to B * T = {total}; got {cu_seqlens.tolist()}")
    if any(end < start for start, end in zip(offsets, offsets[1:])):
        raise ValueError(f"cu_seqlens must be 1-D offsets from 0 to B * T = {total}, non-decreasing; got {offsets}")
    merged = sorted(set(offsets) | set(range(0, total + 1, seq_len)))  # empty documents drop out
    max_seqlen = max(end - start for start, end in zip(merged, merged[1:]))
    cu = torch.tensor(merged, dtype=torch.int32).to(device, non_blocking=True)  # (n_segments + 1,)
    return DocumentLayout(tuple(merged), cu, max_seqlen, doc_ids_from_cu_seqlens(cu, batch, seq_len))


class AttentionPlan:
    """What the attention layers of one forward share, computed once before the first layer:

        cos, sin      (B or 1, T, head_dim / 2) fp32 rotary angles (None when attention() is called directly)
        mask          explicit boolean mask (B or 1, 1 or H, Tq, Tk), True = may attend (padding), or None
        documents     the DocumentLayout of packed documents (from cu_seqlens), or None
        allowed(...)  the boolean mask eager and sdpa take, built on first use, cached by (Tq, Tk, causal, window)
        flash_offsets()  (cu_seqlens, max_seqlen) for the varlen kernels: the documents', else one per row

    A plain object, neither a dataclass nor a tuple: FSDP2's input casting rebuilds those at every block, which
    would copy the mask cache per layer and cast cos and sin to the parameters' dtype.
    """

    def __init__(self, batch: int, seq_len: int, device: torch.device, *, cos: Tensor | None = None,
                 sin: Tensor | None = None, mask: Tensor | None = None, cu_seqlens: Tensor | None = None):
        self.batch, self.seq_len, self.device = batch, seq_len, device  # the queries of this forward: (B, T)
        self.cos, self.sin, self.mask = cos, sin, mask
        self.documents = None if cu_seqlens is None else document_layout(cu_seqlens, batch, seq_len, device)
        self._allowed: dict[tuple[int, int, bool, int], Tensor | None] = {}
        self._row_offsets: Tensor | None = None

    def allowed(self, t_q: int, t_k: int, causal: bool, window: int) -> Tensor | None:
        """allowed_mask for these settings with the plan's documents and padding mask, built once per forward."""
        key = (t_q, t_k, causal, window)
        if key not in self._allowed:
            doc_ids = None if self.documents is None else self.documents.doc_ids
            self._allowed[key] = allowed_mask(t_q, t_k, self.device, causal, window, doc_ids, self.mask)
        return self._allowed[key]

    def flash_offsets(self) -> tuple[Tensor, int]:
        """(cu_seqlens (n + 1,) int32 on the device, max_seqlen): the documents, or every row its own sequence."""
        if self.documents is not None:
            return self.documents.cu_seqlens, self.documents.max_seqlen
        if self._row_offsets is None:
            self._row_offsets = torch.arange(0, self.batch * self.seq_len + 1, self.seq_len, device=self.device,
                                             dtype=torch.int32)  # (B + 1,)
        return self._row_offsets, self.seq_len


# ----------------------------------------------------------------------------- backends


def eager_attention(q: Tensor, k: Tensor, v: Tensor, *, causal: bool = True, scale: float | None = None,
                    window: int = 0, softcap: float = 0.0, sinks: Tensor | None = None,
                    doc_ids: Tensor | None = None, mask: Tensor | None = None,
                    plan: AttentionPlan | None = None) -> Tensor:
    """Reference attention in fp32. q (B, H, Tq, D), k/v (B, H_kv, Tk, D) -> (B, H, Tq, D) in q.dtype.

    The mask comes from the plan when one is given (its documents and padding), else from doc_ids and mask."""
    b, n_heads, t_q, d = q.shape
    t_k = k.shape[2]
    n_rep = n_heads // k.shape[1]
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    q32 = q.float()  # (B, H, Tq, D)
    k32 = k.float().repeat_interleave(n_rep, dim=1)  # (B, H, Tk, D)
    v32 = v.float().repeat_interleave(n_rep, dim=1)  # (B, H, Tk, D)
    scores = torch.einsum("bhqd,bhkd->bhqk", q32, k32) * scale  # (B, H, Tq, Tk)
    if softcap:
        scores = softcap * torch.tanh(scores / softcap)
    if plan is not None:
        allowed = plan.allowed(t_q, t_k, causal, window)  # (B or 1, 1, Tq, Tk), shared by the layers
    else:
        allowed = allowed_mask(t_q, t_k, q.device, causal, window, doc_ids, mask)
    if allowed is not None:
        scores = scores.masked_fill(~allowed, float("-inf"))
    if sinks is None:
        probs = torch.softmax(scores, dim=-1)  # (B, H, Tq, Tk)
    else:
        sink = sinks.float()[None, :, None, None].expand(b, n_heads, t_q, 1)  # (B, H, Tq, 1)
        probs = torch.softmax(torch.cat([scores, sink], dim=-1), dim=-1)[..., :-1]  # (B, H, Tq, Tk): sink dropped
    out = torch.einsum("bhqk,bhkd->bhqd", probs, v32)  # (B, H, Tq, D)
    return out.to(q.dtype)


def sdpa_attention(q: Tensor, k: Tensor, v: Tensor, *, causal: bool = True, scale: float | None = None,
                   window: int = 0, doc_ids: Tensor | None = None, mask: Tensor | None = None,
                   plan: AttentionPlan | None = None) -> Tensor:
    """F.scaled_dot_product_attention. q (B, H, Tq, D), k/v (B, H_kv, Tk, D) -> (B, H, Tq, D). The mask comes
    from the plan when one is given, else from doc_ids and mask."""
    gqa = q.shape[1] != k.shape[1]
    t_q, t_k = q.shape[2], k.shape[2]
    if plan is not None:
        doc_ids = None if plan.documents is None else plan.documents.doc_ids
        mask = plan.mask
    if not (window or doc_ids is not None or mask is not None) and (not causal or t_q == t_k):
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale, enable_gqa=gqa)
    # sdpa's is_causal aligns to the top-left corner and knows no windows or documents: an explicit mask does all
    if plan is not None:
        allowed = plan.allowed(t_q, t_k, causal, window)  # (B or 1, 1, Tq, Tk), shared by the layers
    else:
        allowed = allowed_mask(t_q, t_k, q.device, causal, window, doc_ids, mask)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, scale=scale, enable_gqa=gqa)


try:
    from torch.nn.attention.flex_attention import AuxRequest
except ImportError:
    AuxRequest = None


@functools.cache
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


@functools.lru_cache(maxsize=64)
def _flex_block_mask(t_q: int, t_k: int, causal: bool, window: int, docs: tuple | None, batch: int,
                     device: str):
    """A BlockMask for these settings, cached: every layer of a forward (and every step of a fixed packing)
    reuses it. docs: DocumentLayout.key (the offsets as a hashable tuple of host ints), or None."""
    from torch.nn.attention.flex_attention import create_block_mask

    offset = t_k - t_q
    doc_ids = None
    if docs is not None:
        cu = torch.tensor(docs, dtype=torch.int64, device=device)
        doc_ids = doc_ids_from_cu_seqlens(cu, batch, t_k)  # (B, T)

    def mask_mod(b, h, q_idx, kv_idx):
        q_abs = q_idx + offset
        ok = (kv_idx <= q_abs) if causal else (kv_idx >= 0)
        if window:
            ok = ok & (q_abs - kv_idx < window)
        if doc_ids is not None:
            ok = ok & (doc_ids[b, q_abs] == doc_ids[b, kv_idx])
        return ok

    return create_block_mask(mask_mod, batch if doc_ids is not None else None, None, t_q, t_k, device=device)


def flex_attention(q: Tensor, k: Tensor, v: Tensor, *, causal: bool = True, scale: float | None = None,
                   window: int = 0, softcap: float = 0.0, sinks: Tensor | None = None,
                   cu_seqlens: Tensor | None = None, plan: AttentionPlan | None = None) -> Tensor:
    """FlexAttention (CUDA for training). q (B, H, Tq, D), k/v (B, H_kv, Tk, D) -> (B, H, Tq, D). Documents from
    the plan, or from cu_seqlens when called without one."""
    b, _, t_q, _ = q.shape
    if plan is None and cu_seqlens is not None:
        plan = AttentionPlan(b, t_q, q.device, cu_seqlens=cu_seqlens)
    docs = plan.documents.key if plan is not None and plan.documents is not None else None  # host ints
    block_mask = _flex_block_mask(t_q, k.shape[2], causal, window, docs, b, str(q.device))
    def capped(score, b, h, q_idx, kv_idx):
        return softcap * torch.tanh(score / softcap)

    kwargs = dict(score_mod=capped if softcap else None, block_mask=block_mask, scale=scale, enable_gqa=q.shape[1] != k.shape[1])
    if sinks is None:
        return _compiled_flex()(q, k, v, **kwargs)
    if AuxRequest is not None:
        out, aux = _compiled_flex()(q, k, v, return_aux=AuxRequest(lse=True), **kwargs)
        lse = aux.lse  # (B, H, Tq), natural log, fp32
    else:  # torch versions before return_aux
        out, lse = _compiled_flex()(q, k, v, return_lse=True, **kwargs)
    keep = torch.sigmoid(lse - sinks.float()[None, :, None])  # (B, H, Tq): Z / (Z + e^sink)
    return (out.float() * keep[..., None]).to(q.dtype)


def flash_attention(q: Tensor, k: Tensor, v: Tensor, *, causal: bool = True, scale: float | None = None,
                    window: int = 0, softcap: float = 0.0, cu_seqlens: Tensor | None = None,
                    plan: AttentionPlan | None = None) -> Tensor:
    """flash-attn varlen (or PyTorch's varlen_attn). q (B, H, T, D), k/v (B, H_kv, T, D) -> (B, H, T, D).
    Documents from the plan, or from cu_seqlens when called without one."""
    b, n_heads, t, d = q.shape
    if k.shape[2] != t:
        raise ValueError("flash backend: needs as many queries as keys (no KV cache); use sdpa or eager to decode")
    if plan is None:
        plan = AttentionPlan(b, t, q.device, cu_seqlens=cu_seqlens)
    cu, max_len = plan.flash_offsets()  # (n + 1,) int32 on the device with every row start, a host int
    qf, kf, vf = (x.transpose(1, 2).reshape(b * t, x.shape[1], d) for x in (q, k, v))  # (B*T, heads, D)
    left = window - 1 if window else -1  # keys i - (window - 1) .. i
    flash = flash_attn_varlen()
    if flash is not None:
        out = flash(qf, kf, vf, cu, cu, max_len, max_len, softmax_scale=scale, causal=causal,
                    window_size=(left, 0 if causal else -1), softcap=softcap)
    else:
        varlen, has_window = torch_varlen_attn()
        if has_window:
            out = varlen(qf, kf, vf, cu, cu, max_len, max_len, scale=scale, window_size=(left, 0 if causal else -1),
                         enable_gqa=kf.shape[1] != n_heads)
        else:
            out = varlen(qf, kf, vf, cu, cu, max_len, max_len, is_causal=causal, scale=scale)
    return out.view(b, t, n_heads, d).transpose(1, 2)  # (B, H, T, D)


# ----------------------------------------------------------------------------- the one entry point


def _check(q: Tensor, k: Tensor, v: Tensor, window: int, softcap: float, sinks: Tensor | None,
           documents: bool) -> None:
    """Shape and argument checks from host values only (cu_seqlens' own are the plan's, document_layout)."""
    if q.dim() != 4 or k.shape != v.shape or k.dim() != 4:
        raise ValueError(f"expected q (B, H, T, D) and k, v (B, H_kv, T, D); got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    if q.shape[0] != k.shape[0] or q.shape[3] != k.shape[3] or q.shape[1] % k.shape[1] != 0:
        raise ValueError(f"q {tuple(q.shape)} and k/v {tuple(k.shape)} disagree on batch or head_dim, or "
                         "n_heads is not a multiple of n_kv_heads")
    if window < 0 or softcap < 0:
        raise ValueError(f"window ({window}) and softcap ({softcap}) must be >= 0 (0 = off)")
    if sinks is not None and sinks.shape != (q.shape[1],):
        raise ValueError(f"sinks must have one logit per query head, shape ({q.shape[1]},); got {tuple(sinks.shape)}")
    if documents and q.shape[2] != k.shape[2]:
        raise ValueError("packed documents (cu_seqlens) cannot be combined with a KV cache")


def attention(q: Tensor, k: Tensor, v: Tensor, *, backend: str = "sdpa", causal: bool = True,
              scale: float | None = None, window: int = 0, softcap: float = 0.0, sinks: Tensor | None = None,
              cu_seqlens: Tensor | None = None, mask: Tensor | None = None,
              plan: AttentionPlan | None = None) -> Tensor:
    """Attention of q (B, n_heads, Tq, head_dim) over k, v (B, n_kv_heads, Tk, head_dim) -> (B, n_heads, Tq, head_dim).

    window: sliding-window size in keys (0 = off); softcap: tanh cap on the scores (0 = off); sinks: (n_heads,)
    logits; cu_seqlens: packed-document offsets over the flattened B * T tokens; mask: boolean, broadcastable to
    (B, n_heads, Tq, Tk), True = may attend, combined with the causal (and window, document) rule.
    plan: the forward's AttentionPlan, which then holds the documents and the mask (a model's layers pass it;
    cu_seqlens and mask go into it, not beside it). Without one, this call plans for itself.
    """
    if plan is not None and (cu_seqlens is not None or mask is not None):
        raise ValueError("attention: with a plan, cu_seqlens and mask belong to the plan (AttentionPlan(...)), "
                         "not to the call")
    documents = cu_seqlens is not None or (plan is not None and plan.documents is not None)
    _check(q, k, v, window, softcap, sinks, documents)
    if plan is None:
        plan = AttentionPlan(q.shape[0], q.shape[2], q.device, mask=mask, cu_seqlens=cu_seqlens)
    elif documents and (plan.batch, plan.seq_len) != (q.shape[0], q.shape[2]):
        raise ValueError(f"attention: the plan's documents cover {plan.batch} x {plan.seq_len} tokens but q is "
                         f"{tuple(q.shape)}")
    needs = {name for name, on in (("window", window), ("softcap", softcap), ("sinks", sinks is not None),
                                   ("documents", documents), ("mask", plan.mask is not None),
                                   ("kv_cache", k.shape[2] != q.shape[2]),
                                   ("fp32", q.dtype not in (torch.float16, torch.bfloat16))) if on}
    chosen = resolve_backend(backend, frozenset(needs), q.device)
    if chosen == "flash":
        return flash_attention(q, k, v, causal=causal, scale=scale, window=window, softcap=softcap, plan=plan)
    if chosen == "flex":
        return flex_attention(q, k, v, causal=causal, scale=scale, window=window, softcap=softcap, sinks=sinks,
                              plan=plan)
    if chosen == "sdpa":
        return sdpa_attention(q, k, v, causal=causal, scale=scale, window=window, plan=plan)
    return eager_attention(q, k, v, causal=causal, scale=scale, window=window, softcap=softcap, sinks=sinks,
                           plan=plan)


# ----------------------------------------------------------------------------- the layer around it


class SelfAttention(nn.Module):
    """Grouped-query self-attention with rotary embeddings and a KV cache: the projections around attention().

        q, k, v = x @ wq, x @ wk, x @ wv  (+ biases)    rotated by RoPE (plan.cos, plan.sin), k, v appended to the cache
        out = attention(q, k, v, window, softcap, sinks, plan) @ wo  (+ bias)      plan: documents, padding mask

    The families differ only in arguments: Qwen2 has q/k/v biases, GPT-OSS biases on all four and sinks,
    Gemma2 a softcap and its own scale, GraniteMoE its attention multiplier as the scale; Gemma2 and GPT-OSS
    slide a window on some layers.
    """

    def __init__(self, dim: int, n_heads: int, n_kv_heads: int, head_dim: int, layer_id: int, backend: str = "sdpa",
                 *, qkv_bias: bool = False, out_bias: bool = False, scale: float | None = None, window: int = 0,
                 softcap: float = 0.0, sinks: bool = False, kernels: KernelConfig | None = None):
        super().__init__()
        self.kernels = kernels or KernelConfig()  # RoPE by the Triton kernel where kernels.use("rope", q)
        self.layer_id = layer_id  # its slot in a KVCache
        self.n_heads, self.n_kv_heads, self.head_dim = n_heads, n_kv_heads, head_dim
        self.backend, self.scale, self.window, self.softcap = backend, scale, window, softcap
        self.wq = nn.Linear(dim, n_heads * head_dim, bias=qkv_bias)
        self.wk = nn.Linear(dim, n_kv_heads * head_dim, bias=qkv_bias)
        self.wv = nn.Linear(dim, n_kv_heads * head_dim, bias=qkv_bias)
        self.wo = nn.Linear(n_heads * head_dim, dim, bias=out_bias)
        self.sinks = nn.Parameter(torch.empty(n_heads)) if sinks else None  # (n_heads,) one logit per head

    def forward(self, x: Tensor, plan: AttentionPlan, cache=None) -> Tensor:
        B, T, _ = x.shape
        cos, sin = plan.cos, plan.sin  # (B or 1, T, head_dim / 2)
        q = self.wq(x).view(B, T, self.n_heads, self.head_dim)  # (B, T, n_heads, head_dim)
        k = self.wk(x).view(B, T, self.n_kv_heads, self.head_dim)  # (B, T, n_kv_heads, head_dim)
        v = self.wv(x).view(B, T, self.n_kv_heads, self.head_dim)  # (B, T, n_kv_heads, head_dim)
        if self.kernels.use("rope", q):
            from kernels.rope import rope  # imports triton, which CPU installs may lack

            q, k = rope(q, k, cos, sin)  # q and k in one launch
        else:
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, heads, T, head_dim)
        if cache is not None:
            k, v = cache.append(self.layer_id, k, v)  # (B, n_kv_heads, past + T, head_dim)
        y = attention(q, k, v, backend=self.backend, scale=self.scale, window=self.window, softcap=self.softcap,
                      sinks=self.sinks, plan=plan)  # (B, n_heads, T, head_dim)
        y = y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim)  # (B, T, n_heads * head_dim)
        return self.wo(y)  # (B, T, dim)
