"""Kernel selection in the vLLM plugin: first candidate that can serve a layer, every reason when none can."""
import pytest
import torch

from signround_vllm.format import LayerQuantSpec

kernels = pytest.importorskip("signround_vllm.kernels")


def geometry(bits, device="cpu", k=256, n=128, group_size=32, act_dtype=torch.bfloat16):
    return kernels.LayerGeometry(name="model.layers.0.mlp.down_proj", spec=LayerQuantSpec(bits, group_size, False),
                                 in_features=k, out_features=n, act_dtype=act_dtype, device=torch.device(device))


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_cpu_layers_up_to_4_bits_use_the_int4_pack_kernel(bits, monkeypatch):
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    kernel = kernels.choose_kernel(geometry(bits))
    assert kernel.name == "cpu_int4" and "int4-pack kernel up to" in kernel.describe()
    assert kernel.max_rows == kernels.cpu_int4.max_rows_for(torch.get_num_threads())


@pytest.mark.parametrize("bits,name", [(4, "vllm"), (2, "vllm_4bit")])
def test_on_amx_cpus_vllms_kernel_leads_and_the_int4_pack_kernel_is_forced(bits, name, monkeypatch):
    """vLLM's CPUWNA16 leads on AMX (W4A16; W4A8 only when VLLM_CPU_INT4_W4A8=1 is set); cpu_int4 runs the
    int4-pack kernel there when forced, with AMX's own row threshold, once the process holds the AMX tile
    state, and only the tile path if Linux refuses it."""
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True)
    monkeypatch.delenv("VLLM_CPU_INT4_W4A8", raising=False)
    kernel = kernels.choose_kernel(geometry(bits))
    assert kernel.name == name and kernel.describe() == "CPUWNA16LinearKernel"
    monkeypatch.setenv("VLLM_CPU_INT4_W4A8", "1")
    assert kernels.choose_kernel(geometry(bits)).describe().startswith("CPUWNA16LinearKernel, W4A8")
    monkeypatch.setattr(kernels.cpu_int4, "request_amx_tile_permission", lambda: True)
    kernel = kernels.choose_kernel(geometry(4), forced="cpu_int4")
    assert kernel.max_rows == kernels.cpu_int4.max_rows_for(torch.get_num_threads(), "amx") > 0
    monkeypatch.setattr(kernels.cpu_int4, "request_amx_tile_permission", lambda: False)
    kernel = kernels.choose_kernel(geometry(4), forced="cpu_int4")
    assert kernel.max_rows == 0 and "not allowed the AMX tile state" in kernel.describe()


@pytest.mark.skipif(not torch.cpu._is_amx_tile_supported(), reason="needs a CPU with AMX")
def test_amx_w4a16_layers_keep_the_amx_isa_and_the_process_holds_the_tile_state(monkeypatch):
    """Turning W4A8 off must not also turn AMX off for CPUWNA16's W4A16 GEMM (that ran 0.2x a bf16 GEMM at
    64 rows); and the process must hold the AMX tile state before any AMX kernel runs (else SIGILL)."""
    from benchmarks.cpu_kernel_table import prepared_vllm_layer
    from signround_vllm.format import dequantize_packed, pack_linear

    monkeypatch.delenv("VLLM_CPU_INT4_W4A8", raising=False)
    spec = LayerQuantSpec(4, 32, False)
    g = kernels.LayerGeometry("l", spec, 256, 128, torch.bfloat16, torch.device("cpu"))
    assert kernels.choose_kernel(g).name == "vllm"
    assert kernels.cpu_int4.request_amx_tile_permission()
    gen = torch.Generator().manual_seed(0)
    packed = pack_linear(torch.randint(0, 16, (128, 256), generator=gen), torch.rand(128, 8, generator=gen) * 0.01,
                         torch.randint(0, 16, (128, 8), generator=gen), spec)
    kernel, layer = prepared_vllm_layer(packed, spec, 256, 128)
    assert layer.isa_hint == "amx" and not layer.use_w4a8
    x = torch.randn(64, 256).to(torch.bfloat16)
    ref = x.float() @ dequantize_packed(packed).t()
    assert ((kernel.apply(layer, x).float() - ref).abs().max() / ref.abs().max()).item() < 2 ** -6


def test_cpu_layers_the_int4_pack_kernel_cannot_hold_go_to_vllms_kernel(monkeypatch):
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    # out_features not divisible by 16 (vLLM's CPUWNA16 takes multiples of 32: 96 is one)
    assert kernels.choose_kernel(geometry(4, n=96 + 8)).name == "dense"
    with pytest.MonkeyPatch.context() as mp:  # a group size the int4-pack kernel does not take
        mp.setattr(kernels.cpu_int4, "KERNEL_GROUP_SIZES", (256, 128, 64))
        kernel = kernels.choose_kernel(geometry(4))
        assert kernel.name == "vllm" and kernel.describe() == "CPUWNA16LinearKernel"  # W4A16 without AMX
        kernel = kernels.choose_kernel(geometry(3))
        assert kernel.name == "vllm_4bit" and kernel.describe() == "CPUWNA16LinearKernel"
    with pytest.raises(ValueError, match=r"cpu_int4: activation dtype torch.float32"):
        kernels.choose_kernel(geometry(4, act_dtype=torch.float32), order=("cpu_int4",))


def test_cpu_8_bit_and_odd_sizes_fall_back_to_dense():
    assert kernels.choose_kernel(geometry(8)).name == "dense"
    assert kernels.choose_kernel(geometry(4, n=48 + 8)).name == "dense"


def test_the_exact_cpu_path_is_only_forced():
    assert "cpu_int4_exact" not in kernels.ORDER["cpu"] + kernels.ORDER["cpu_amx"]
    assert kernels.choose_kernel(geometry(4), forced="cpu_int4_exact").name == "cpu_int4_exact"


def test_cuda_layers_use_triton():
    assert kernels.choose_kernel(geometry(3, device="cuda")).name == "triton"


def test_every_ordered_name_is_a_candidate():
    for device, names in kernels.ORDER.items():
        assert names and all(n in kernels.CANDIDATES for n in names), device


def test_forcing_a_kernel_tries_only_it():
    assert kernels.choose_kernel(geometry(4), forced="dense").name == "dense"
    with pytest.raises(ValueError) as e:  # no vLLM CPU kernel takes 8 bits, and forcing allows no fallback
        kernels.choose_kernel(geometry(8), forced="vllm")
    text = str(e.value)
    assert "SIGNROUND_KERNEL=vllm" in text and "no vLLM kernel takes uint8" in text and "dense:" not in text


def test_forcing_an_unknown_kernel_names_the_choices():
    with pytest.raises(ValueError, match=r"SIGNROUND_KERNEL='marlin' names no SignRound kernel.*'triton'"):
        kernels.choose_kernel(geometry(4), forced="marlin")


def test_no_candidate_lists_every_reason():
    with pytest.raises(ValueError) as e:
        kernels.choose_kernel(geometry(8, act_dtype=torch.float32), order=("vllm_4bit", "triton"))
    text = str(e.value)
    assert "model.layers.0.mlp.down_proj" in text and "W8G32asym" in text
    assert "vllm_4bit: " in text and "triton: " in text
    assert "only 2- and 3-bit layers" in text and "activation dtype torch.float32" in text
