"""``torch.ops.signround.dequant_gemm`` and ``torch.ops.signround.fused_experts``: the fused
kernels as custom operators.

torch.compile (and so vLLM's compiled graphs and CUDA graphs) treats each operator as one opaque
call whose output shape comes from its fake implementation below; it never traces into Triton.
The operators do not check their operands: callers check them once (``dequant_gemm.check_operands``,
``fused_moe.check_fused_experts``) when a layer is prepared, not on every call.
"""
from typing import Optional

import torch

OP_NAME = "signround::dequant_gemm"
MOE_OP_NAME = "signround::fused_experts"


@torch.library.custom_op(OP_NAME, mutates_args=())
def dequant_gemm_op(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, qzeros: Optional[torch.Tensor],
                    bias: Optional[torch.Tensor], bits: int, group_size: int) -> torch.Tensor:
    """y [..., N] = x [..., K] @ W^T (+ bias); group_size -1 when one group spans K."""
    from signround_triton import dequant_gemm  # looked up per call: the interpreter tests reload it

    return dequant_gemm.launch(x, qweight, scales, qzeros, bits, group_size, bias)


@dequant_gemm_op.register_fake
def _(x, qweight, scales, qzeros, bias, bits, group_size):
    return x.new_empty((*x.shape[:-1], qweight.shape[1]))


@torch.library.custom_op(MOE_OP_NAME, mutates_args=())
def fused_experts_op(x: torch.Tensor, w13_qweight: torch.Tensor, w13_scales: torch.Tensor,
                     w13_qzeros: Optional[torch.Tensor], w13_bits: int, w13_group_size: int,
                     w2_qweight: torch.Tensor, w2_scales: torch.Tensor, w2_qzeros: Optional[torch.Tensor],
                     w2_bits: int, w2_group_size: int, topk_weights: torch.Tensor,
                     topk_ids: torch.Tensor) -> torch.Tensor:
    """out [M, hidden] of the mixture-of-experts MLP; see ``fused_moe.fused_experts``."""
    from signround_triton import fused_moe  # looked up per call: the interpreter tests reload it

    w13 = fused_moe.PackedExperts(w13_qweight, w13_scales, w13_qzeros, w13_bits, w13_group_size)
    w2 = fused_moe.PackedExperts(w2_qweight, w2_scales, w2_qzeros, w2_bits, w2_group_size)
    return fused_moe.launch_fused_experts(x, w13, w2, topk_weights, topk_ids)


@fused_experts_op.register_fake
def _(x, w13_qweight, w13_scales, w13_qzeros, w13_bits, w13_group_size, w2_qweight, w2_scales, w2_qzeros,
      w2_bits, w2_group_size, topk_weights, topk_ids):
    return x.new_empty((x.shape[0], w2_qweight.shape[-1]))
