"""``torch.ops.signround.dequant_gemm``: the fused kernel as a custom operator.

torch.compile (and so vLLM's compiled graphs) treats the operator as one opaque call whose
output shape comes from the fake implementation below; it never traces into Triton. The
operator does not check its operands: callers check them once (``dequant_gemm.check_operands``)
when a layer is prepared, not on every call.
"""
from typing import Optional

import torch

OP_NAME = "signround::dequant_gemm"


@torch.library.custom_op(OP_NAME, mutates_args=())
def dequant_gemm_op(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, qzeros: Optional[torch.Tensor],
                    bias: Optional[torch.Tensor], bits: int, group_size: int) -> torch.Tensor:
    """y [..., N] = x [..., K] @ W^T (+ bias); group_size -1 when one group spans K."""
    from signround_triton import dequant_gemm  # looked up per call: the interpreter tests reload it

    return dequant_gemm.launch(x, qweight, scales, qzeros, bits, group_size, bias)


@dequant_gemm_op.register_fake
def _(x, qweight, scales, qzeros, bias, bits, group_size):
    return x.new_empty((*x.shape[:-1], qweight.shape[1]))
