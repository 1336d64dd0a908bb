"""The independent pure-torch reference for the fused kernels."""
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
