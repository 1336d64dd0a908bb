"""Triton fused dequantize + GEMM kernels for the SignRound packed format."""
