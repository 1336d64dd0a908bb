"""Serve a compressed-tensors checkpoint with vLLM's own loader on CPU, where no vLLM kernel takes 2, 3
or 8 bits: vLLM's `CompressedTensorsWNA16` declares and loads every tensor as on a GPU, and a stand-in
kernel (plain torch, independent of this project's code) dequantizes what vLLM loaded.
    python tests/ct_served_by_stub_kernel.py CKPT PROMPTS_JSON MAX_TOKENS   (prints TOKENS=..., KERNELS=...)
"""
import json
import sys

import numpy as np
import torch


def unpack_rows(words: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """int32 [R, W], each row one little-endian bit stream -> its first `count` integers, int64 [R, count]."""
    raw = words.contiguous().cpu().numpy().astype("<i4").view(np.uint8)
    stream = np.unpackbits(raw, axis=1, bitorder="little")[:, : count * bits]
    return torch.from_numpy((stream.reshape(len(stream), count, bits).astype(np.int64) << np.arange(bits)).sum(2))


class DequantizingStandIn:
    """Implements vLLM's MPLinearKernel interface by dequantizing the loaded tensors once."""

    used = []

    @classmethod
    def get_min_capability(cls):
        return -1

    @classmethod
    def can_implement(cls, c):
        return True, None

    def __init__(self, c, w_q_param_name, w_s_param_name, w_zp_param_name=None):
        self.c, self.names = c, (w_q_param_name, w_s_param_name, w_zp_param_name)

    def process_weights_after_loading(self, layer):
        q_name, s_name, z_name = self.names
        bits = self.c.weight_type.size_bits
        k, n = self.c.partition_weight_shape
        q = unpack_rows(getattr(layer, q_name).data, bits, k)  # [N, K]
        s = getattr(layer, s_name).data.float()  # [N, K / G]
        if self.c.zero_points:
            z = unpack_rows(getattr(layer, z_name).data.t(), bits, n).t()  # [N, K / G]
        else:
            z = torch.full(s.shape, 1 << (bits - 1), dtype=torch.int64)
        g = k // s.shape[1]
        w = (q - z.repeat_interleave(g, 1)).float() * s.repeat_interleave(g, 1)
        layer.dense_weight = torch.nn.Parameter(w.to(self.c.act_type), requires_grad=False)
        DequantizingStandIn.used.append(str(self.c.weight_type))

    def apply_weights(self, layer, x, bias=None):
        return torch.nn.functional.linear(x, layer.dense_weight, bias)


if __name__ == "__main__":
    from vllm.model_executor.layers.quantization.compressed_tensors.schemes import compressed_tensors_wNa16

    compressed_tensors_wNa16.choose_mp_linear_kernel = lambda config: DequantizingStandIn
    from tests.vllm_utils import greedy_tokens_and_logprobs, make_llm

    path, prompts, n = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3])
    llm = make_llm(path)
    print("KERNELS=" + json.dumps(sorted(set(DequantizingStandIn.used))), flush=True)
    print("TOKENS=" + json.dumps(greedy_tokens_and_logprobs(llm, prompts, n)), flush=True)
