"""The independent pure-torch references for the fused kernels (dense linear, mixture of experts)."""
from __future__ import annotations

import torch

from signround_vllm.format import PackedLinear, dequantize_packed


def reference_linear(x: torch.Tensor, packed: PackedLinear, bias: torch.Tensor | None = None) -> torch.Tensor:
    """fp32 y [..., N] = x [..., K] @ W^T (+ bias), W [N, K] from format.dequantize_packed."""
    w = dequantize_packed(packed, torch.float32)  # [N, K]
    y = x.float() @ w.t()
    if bias is not None:
        y = y + bias.float()
    return y


def reference_experts(x: torch.Tensor, w13_experts: list[PackedLinear], w2_experts: list[PackedLinear],
                      topk_weights: torch.Tensor, topk_ids: torch.Tensor) -> torch.Tensor:
    """fp32 out [M, hidden] of a mixture-of-experts MLP, expert by expert.

    x [M, hidden]; w13_experts[e] is expert e's gate and up projection, [2I, hidden] as a linear
    (the first I outputs gate, the next I up); w2_experts[e] its down projection [hidden, I];
    topk_weights / topk_ids [M, top_k]. Token t gets sum_j topk_weights[t, j] *
    down_e(silu(gate_e(x_t)) * up_e(x_t)) over e = topk_ids[t, j]; ids outside [0, E) add nothing.
    """
    xf = x.float()
    out = torch.zeros(x.shape[0], w2_experts[0].out_features if w2_experts else 0, dtype=torch.float32,
                      device=x.device)
    for e, (w13, w2) in enumerate(zip(w13_experts, w2_experts)):
        tokens, slots = torch.nonzero(topk_ids == e, as_tuple=True)
        if tokens.numel() == 0:
            continue
        h = reference_linear(xf[tokens], w13)  # [T, 2I]
        gate, up = h.chunk(2, dim=-1)
        y = reference_linear(torch.nn.functional.silu(gate) * up, w2)  # [T, hidden]
        out.index_add_(0, tokens, y * topk_weights[tokens, slots].float()[:, None])
    return out
