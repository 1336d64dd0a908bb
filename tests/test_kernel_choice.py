"""Kernel selection in the vLLM plugin: first candidate that can serve a layer, every reason when none can."""
import pytest
import torch

from signround_vllm.format import LayerQuantSpec

kernels = pytest.importorskip("signround_vllm.kernels")


def geometry(bits, device="cpu", k=256, n=128, group_size=32):
    return kernels.LayerGeometry(name="model.layers.0.mlp.down_proj", spec=LayerQuantSpec(bits, group_size, False),
                                 in_features=k, out_features=n, act_dtype=torch.bfloat16,
                                 device=torch.device(device))


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_cpu_uses_vllm_int4_kernel_up_to_4_bits(bits):
    assert type(kernels.choose_kernel(geometry(bits))).__name__ == "CpuWna16"


def test_cpu_8_bit_and_odd_sizes_fall_back_to_dense():
    assert type(kernels.choose_kernel(geometry(8))).__name__ == "DenseDequantized"
    assert type(kernels.choose_kernel(geometry(4, n=48))).__name__ == "DenseDequantized"


def test_cuda_layers_use_triton():
    assert type(kernels.choose_kernel(geometry(3, device="cuda"))).__name__ == "TritonDequantGemm"


def test_no_candidate_lists_every_reason(monkeypatch):
    monkeypatch.setenv("SIGNROUND_DISABLE_DENSE_FALLBACK", "1")
    with pytest.raises(ValueError) as e:
        kernels.choose_kernel(geometry(8))
    text = str(e.value)
    assert "model.layers.0.mlp.down_proj" in text and "W8G32asym" in text
    for name in ("TritonDequantGemm: ", "CpuWna16: ", "DenseDequantized: "):
        assert name in text
    assert "8-bit integers do not fit" in text and "needs a CUDA device" in text
