"""signround-vllm: SignRound checkpoints served by vLLM.

`register` is the `vllm.general_plugins` entry point. The packed format lives in
`signround_vllm.format` and imports only torch.
"""
from signround_vllm.format import (  # noqa: F401
    FORMAT_VERSION, QUANT_METHOD, LayerQuantSpec, PackedLinear, SignRoundConfig, SignRoundFormatError,
    dequantize_packed, pack_int_weights, pack_linear, unpack_int_weights,
)

__version__ = "0.1.0"


def register() -> None:
    """Register the `signround` quantization method with vLLM (idempotent)."""
    from signround_vllm.vllm_plugin import register_with_vllm

    register_with_vllm()
