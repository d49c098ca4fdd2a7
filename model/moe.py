"""Mixture-of-experts feed-forward layer shared by GPT-OSS and GraniteMoE: top-k router, grouped experts.

    logits = router(x)                                   (N, E)      N tokens, E experts
    top_logits, experts = topk(logits, k)                (N, k)
    weights = softmax(top_logits)                        (N, k)      softmax over the k chosen logits only
    y_n = sum_j weights[n, j] * expert_{experts[n, j]}(x_n)

Every token reaches all k of its experts: there is no capacity and nothing is dropped. The N * k (token, expert)
pairs are sorted by expert so that each expert's tokens are one contiguous block, the blocks go through one
grouped matrix multiply per projection (torch._grouped_mm on GPUs that have it, with each block padded to 8
rows; a loop over the blocks elsewhere), and the results are scattered back to their tokens with index_add.

Expert weights are stored as one 3-D tensor per projection, each expert in nn.Linear layout (out, in):
    w_gate_up (E, 2 * ffn_dim, dim)  rows [0, ffn_dim) the gate, [ffn_dim, 2 * ffn_dim) the up projection
    w_down    (E, dim, ffn_dim)
    b_gate_up (E, 2 * ffn_dim), b_down (E, dim)  with bias=True (GPT-OSS)

Activations:
    "silu":    silu(gate) * up                                                   (SwiGLU; GraniteMoE)
    "gpt_oss": g = min(gate, limit); u = clamp(up, -limit, limit)
               (u + 1) * g * sigmoid(alpha * g),     alpha 1.702, limit 7          (GPT-OSS's clamped SwiGLU)

Auxiliary losses (returned by forward, zero unless their coefficients are set):
    load balancing (Switch Transformer, Fedus et al. 2021, eq. 4-6, in HF's form with k picks per token):
        E * sum_e f_e * P_e,   f_e = (picks of expert e) / N,   P_e = mean over tokens of softmax(logits)_e
    router z-loss (ST-MoE, Zoph et al. 2022, eq. 5): mean over tokens of logsumexp(logits)^2
The tokens each expert received in the last forward are kept in `tokens_per_expert` (E,) for logging.
"""

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

ACTIVATIONS = ("silu", "gpt_oss")


class RouterLosses(NamedTuple):
    aux_loss: Tensor  # fp32 scalar: aux_loss_coef * load balancing + z_loss_coef * z-loss (0 when both are 0)
    tokens_per_expert: Tensor  # (E,) int64, detached


def grouped_supported(x: Tensor) -> bool:
    """torch._grouped_mm runs (forward and backward) on Hopper-class GPUs and newer, in bfloat16."""
    return (hasattr(torch, "_grouped_mm") and x.is_cuda and x.dtype == torch.bfloat16
            and torch.cuda.get_device_capability(x.device) >= (9, 0))


GROUP_ALIGN = 8  # _grouped_mm wants each expert's rows to start 16-byte aligned in bf16 (torchtitan pads to 8)


def _padded_rows(counts: Tensor, n_rows: int) -> tuple[Tensor, Tensor, int]:
    """Where each of the n_rows sorted rows goes when every expert's block is padded to GROUP_ALIGN rows:
    (dest (n_rows,), padded block ends (E,) int32, padded buffer length). The buffer length is the bound
    n_rows + E * (GROUP_ALIGN - 1), fixed in advance so that nothing waits for the GPU."""
    padded = (counts + GROUP_ALIGN - 1) // GROUP_ALIGN * GROUP_ALIGN  # (E,)
    ends = torch.cumsum(padded, dim=0)  # (E,)
    expert_of_row = torch.repeat_interleave(torch.arange(len(counts), device=counts.device), counts,
                                            output_size=n_rows)  # (n_rows,)
    first_row = torch.cumsum(counts, dim=0) - counts  # (E,) where each block starts, unpadded
    dest = (ends - padded)[expert_of_row] + torch.arange(n_rows, device=counts.device) - first_row[expert_of_row]
    return dest, ends.to(torch.int32), n_rows + len(counts) * (GROUP_ALIGN - 1)


def grouped_mm(x: Tensor, w: Tensor, counts: Tensor, bias: Tensor | None = None,
               use_grouped: bool | None = None) -> Tensor:
    """Rows of x (M, in), sorted so that expert e owns the next counts[e] rows, times that expert's w[e] (out, in)
    transposed, plus its bias[e] (out,) -> (M, out). use_grouped: None = torch._grouped_mm where supported, else a
    loop over the experts' blocks (whose bias gradients, summed block by block, are deterministic on CPU)."""
    if use_grouped is None:
        use_grouped = grouped_supported(x)
    if use_grouped:
        dest, ends, n_padded = _padded_rows(counts, x.shape[0])
        xp = x.new_zeros(n_padded, x.shape[1]).index_copy(0, dest, x)  # (M_pad, in) blocks padded with zero rows
        y = torch._grouped_mm(xp, w.transpose(-2, -1), offs=ends).index_select(0, dest)  # (M, out)
        if bias is not None:
            y = y + bias.repeat_interleave(counts, dim=0, output_size=x.shape[0])  # (M, out)
        return y
    blocks = torch.split(x, counts.tolist())  # one host sync: the block sizes
    # unbind, not w[e]: one autograd node stacks the E gradients, where E indexing ops would each add a
    # zero-filled copy of the whole (E, out, in) tensor in the backward
    weights = w.unbind(0)
    if bias is None:
        return torch.cat([block @ weights[e].T for e, block in enumerate(blocks)])  # (M, out)
    biases = bias.unbind(0)
    return torch.cat([block @ weights[e].T + biases[e] for e, block in enumerate(blocks)])  # (M, out)


class MoE(nn.Module):
    def __init__(self, dim: int, ffn_dim: int, n_experts: int, top_k: int, activation: str = "silu",
                 bias: bool = False, router_bias: bool = False, swiglu_alpha: float = 1.702,
                 swiglu_limit: float = 7.0, aux_loss_coef: float = 0.0, z_loss_coef: float = 0.0):
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"MoE activation {activation!r} unknown; expected one of {ACTIVATIONS}")
        if not 0 < top_k <= n_experts:
            raise ValueError(f"MoE top_k ({top_k}) must be in 1..n_experts ({n_experts})")
        self.n_experts, self.top_k, self.ffn_dim = n_experts, top_k, ffn_dim
        self.activation, self.alpha, self.limit = activation, swiglu_alpha, swiglu_limit
        self.aux_loss_coef, self.z_loss_coef = aux_loss_coef, z_loss_coef
        self.router = nn.Linear(dim, n_experts, bias=router_bias)
        self.w_gate_up = nn.Parameter(torch.empty(n_experts, 2 * ffn_dim, dim))
        self.w_down = nn.Parameter(torch.empty(n_experts, dim, ffn_dim))
        self.b_gate_up = nn.Parameter(torch.empty(n_experts, 2 * ffn_dim)) if bias else None
        self.b_down = nn.Parameter(torch.empty(n_experts, dim)) if bias else None
        self.register_buffer("tokens_per_expert", torch.zeros(n_experts, dtype=torch.int64), persistent=False)

    @torch.no_grad()
    def init_weights(self, std: float, out_std: float) -> None:
        """router and w_gate_up: normal(0, std); w_down: normal(0, out_std) (it writes into the residual
        stream); biases: zeros."""
        nn.init.normal_(self.router.weight, std=std)
        nn.init.normal_(self.w_gate_up, std=std)
        nn.init.normal_(self.w_down, std=out_std)
        for b in (self.router.bias, self.b_gate_up, self.b_down):
            if b is not None:
                nn.init.zeros_(b)
        self.tokens_per_expert.zero_()

    def act(self, h: Tensor) -> Tensor:
        """(M, 2 * ffn_dim) -> (M, ffn_dim)."""
        gate, up = h[:, :self.ffn_dim], h[:, self.ffn_dim:]
        if self.activation == "silu":
            return F.silu(gate) * up
        gate = gate.clamp(max=self.limit)
        up = up.clamp(-self.limit, self.limit)
        return (up + 1) * gate * torch.sigmoid(self.alpha * gate)

    def forward(self, x: Tensor) -> tuple[Tensor, RouterLosses]:
        """x (B, T, dim) -> (B, T, dim), RouterLosses."""
        shape = x.shape
        x = x.reshape(-1, shape[-1])  # (N, dim)
        logits = self.router(x)  # (N, E)
        top_logits, experts = torch.topk(logits, self.top_k, dim=-1)  # (N, k) each
        weights = torch.softmax(top_logits.float(), dim=-1).to(x.dtype)  # (N, k)

        flat_experts = experts.reshape(-1)  # (N*k,) the expert of pair p = n * k + j
        order = torch.argsort(flat_experts, stable=True)  # (N*k,) pairs grouped by expert
        token = order // self.top_k  # (N*k,) the token of each sorted pair
        counts = torch.bincount(flat_experts, minlength=self.n_experts)  # (E,)

        # index_select / index_add (not x[token]): their backward sums duplicates in a fixed order on CPU
        h = grouped_mm(x.index_select(0, token), self.w_gate_up, counts, self.b_gate_up)  # (N*k, 2 * ffn_dim)
        h = grouped_mm(self.act(h), self.w_down, counts, self.b_down)  # (N*k, dim)
        h = h * weights.reshape(-1)[order, None]  # (N*k, dim) weighted by the router
        y = torch.zeros_like(x).index_add_(0, token, h.to(x.dtype))  # (N, dim)

        self.tokens_per_expert = counts.detach()
        aux = torch.zeros((), dtype=torch.float32, device=x.device)
        if self.aux_loss_coef or self.z_loss_coef:
            logits32 = logits.float()
            if self.aux_loss_coef:
                f = counts.float() / x.shape[0]  # (E,) picks per token
                p = torch.softmax(logits32, dim=-1).mean(dim=0)  # (E,)
                aux = aux + self.aux_loss_coef * self.n_experts * (f * p).sum()
            if self.z_loss_coef:
                aux = aux + self.z_loss_coef * torch.logsumexp(logits32, dim=-1).square().mean()
        return y.view(shape), RouterLosses(aux, self.tokens_per_expert)


def moe_ref(moe: MoE, x: Tensor) -> Tensor:
    """The same layer computed token by token, expert by expert: the definition the grouped version is tested
    against. x (B, T, dim) -> (B, T, dim)."""
    flat = x.reshape(-1, x.shape[-1])  # (N, dim)
    logits = moe.router(flat)  # (N, E)
    top_logits, experts = torch.topk(logits, moe.top_k, dim=-1)
    weights = torch.softmax(top_logits.float(), dim=-1).to(x.dtype)
    rows = []
    for n in range(flat.shape[0]):
        y = torch.zeros_like(flat[n])
        for j in range(moe.top_k):
            e = int(experts[n, j])
            h = moe.w_gate_up[e] @ flat[n]
            if moe.b_gate_up is not None:
                h = h + moe.b_gate_up[e]
            h = moe.w_down[e] @ moe.act(h[None])[0]
            if moe.b_down is not None:
                h = h + moe.b_down[e]
            y = y + weights[n, j] * h
        rows.append(y)
    return torch.stack(rows).view(x.shape)


def expert_load(model: nn.Module) -> float | None:
    """The busiest expert's share of tokens relative to a perfectly even split, worst layer of the last forward
    (1.0 = balanced, n_experts = every token on one expert); None for a model without experts. For logging."""
    loads = [m.tokens_per_expert.max().item() * m.n_experts / max(m.tokens_per_expert.sum().item(), 1)
             for m in model.modules() if isinstance(m, MoE)]
    return max(loads) if loads else None
