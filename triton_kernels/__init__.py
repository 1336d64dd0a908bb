"""Triton fused dequantize + GEMM kernels for the SignRound packed format.

Installed under the import name ``signround_triton`` (the folder is ``triton_kernels/``): the name
``triton_kernels`` belongs to OpenAI's MXFP4 kernels, which vLLM imports when it finds them.
"""
