"""Tier 1-2: the fused dequant-GEMM Triton kernel against the pure-torch reference.

Without CUDA the kernel runs in Triton's interpreter on CPU tensors, set up as
tests/triton_interpreter.py explains.
"""
import functools
import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.triton_interpreter import CUDA, interpreter_env, random_x, require_interpreted_triton
from tests.triton_interpreter import check_close as shared_check_close

DEVICE = "cuda" if CUDA else "cpu"


with interpreter_env():
    import signround_triton.dequant_gemm as dg

    if not CUDA and not dg.is_interpreted():
        dg = importlib.reload(dg)

require_interpreted_triton()

from signround_vllm.format import LayerQuantSpec, PackedLinear, SignRoundFormatError, pack_linear  # noqa: E402
from signround_triton.reference import reference_linear  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
BITS = (2, 3, 4, 8)
GROUPS = (32, 64, 128, -1)
DTYPES = (torch.float16, torch.bfloat16)
# Max |y - reference| relative to max |reference|. bf16 is looser: its 8-bit mantissa, and the
# interpreter truncates (not rounds) fp32 -> bf16 on store.
TOLERANCE = {torch.float16: 1e-2, torch.bfloat16: 2e-2}


@pytest.fixture(autouse=True, scope="module")
def _interpreter_for_this_module():
    with interpreter_env():
        yield


# ----------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------
def make_layer(bits: int, group_size: int, sym: bool, n: int, k: int, seed: int,
               scale_sign: str = "mixed") -> PackedLinear:
    """A random packed layer; scales of both signs (or all negative)."""
    gen = torch.Generator().manual_seed(seed)
    spec = LayerQuantSpec(bits, group_size, sym)
    groups = k // spec.effective_group_size(k)
    q = torch.randint(0, 1 << bits, (n, k), generator=gen)
    magnitude = (torch.rand(n, groups, generator=gen) + 0.5) * (0.1 / (1 << bits))
    if scale_sign == "negative":
        sign = -torch.ones(n, groups)
    else:
        sign = torch.where(torch.rand(n, groups, generator=gen) < 0.5, -1.0, 1.0)
    zeros = None if sym else torch.randint(0, 1 << bits, (n, groups), generator=gen)
    return pack_linear(q, magnitude * sign, zeros, spec)


def on_device(packed: PackedLinear):
    z = packed.qzeros.to(DEVICE) if packed.qzeros is not None else None
    return packed.qweight.to(DEVICE), packed.scales.to(DEVICE), z


def run_kernel(x, packed: PackedLinear, bias=None, config=None):
    qweight, scales, qzeros = on_device(packed)
    if config is None and CUDA:
        # On a GPU the matrix of cases runs the bucket's default, not the autotuner (which
        # would compile every candidate for every case); test_autotuned_on_gpu covers tuning.
        config = dg.default_config(x.reshape(-1, x.shape[-1]).shape[0], x.shape[-1])
    y = dg.dequant_gemm(x.to(DEVICE), qweight, scales, qzeros, packed.spec.bits, packed.spec.group_size,
                        bias=None if bias is None else bias.to(DEVICE), config=config)
    return y.cpu()


check_close = functools.partial(shared_check_close, tolerance=TOLERANCE)


# ----------------------------------------------------------------------------
# Tier 2: kernel vs reference, tolerance by dtype
# ----------------------------------------------------------------------------
@pytest.mark.parametrize("m", [1, 17, 64])
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp16", "bf16"])
@pytest.mark.parametrize("sym", [False, True], ids=["asym", "sym"])
@pytest.mark.parametrize("group_size", GROUPS)
@pytest.mark.parametrize("bits", BITS)
def test_matches_reference(bits, group_size, sym, dtype, m):
    # N is never a multiple of the tile; K = 512 lets the M = 1 default split K in four.
    n, k = (200, 512) if m != 17 else (72, 384)
    seed = hash((bits, group_size, sym, m)) % 2**31
    packed = make_layer(bits, group_size, sym, n, k, seed)
    x = random_x(m, k, dtype, seed + 1)
    check_close(run_kernel(x, packed), reference_linear(x, packed), dtype,
                f"W{bits}G{group_size}{'sym' if sym else 'asym'} {dtype} M={m}")


@pytest.mark.parametrize("gather_words", [False, True], ids=["packed-words", "gather-words"])
@pytest.mark.parametrize("split_k", [1, 4])
@pytest.mark.parametrize("sym", [False, True], ids=["asym", "sym"])
@pytest.mark.parametrize("group_size", GROUPS)
@pytest.mark.parametrize("bits", BITS)
def test_exact_on_exact_inputs(bits, group_size, sym, split_k, gather_words):
    """Inputs whose products and sums are exact in fp16/fp32: any wrong bit shows."""
    n, k, m = 40, 256, 5
    gen = torch.Generator().manual_seed(1000 + bits * 10 + (group_size % 7))
    spec = LayerQuantSpec(bits, group_size, sym)
    groups = k // spec.effective_group_size(k)
    q = torch.randint(0, 1 << bits, (n, k), generator=gen)
    scales = torch.where(torch.rand(n, groups, generator=gen) < 0.5, -1.0, 1.0) * \
        2.0 ** -torch.randint(2, 5, (n, groups), generator=gen).float()
    zeros = None if sym else torch.randint(0, 1 << bits, (n, groups), generator=gen)
    packed = pack_linear(q, scales, zeros, spec)
    x = (torch.randint(-1, 2, (m, k), generator=gen) * (torch.rand(m, k, generator=gen) < 0.25)).to(torch.float16)
    config = dg.GemmConfig(16, 32, 64, split_k=split_k, gather_words=gather_words)
    y = run_kernel(x, packed, config=config)
    ref = reference_linear(x, packed)
    assert not torch.isnan(y).any()
    torch.testing.assert_close(y, ref.to(torch.float16), rtol=0, atol=0)


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("sym", [False, True], ids=["asym", "sym"])
def test_negative_scales(bits, sym):
    n, k, m = 96, 256, 3
    packed = make_layer(bits, 64, sym, n, k, seed=bits, scale_sign="negative")
    assert (packed.scales < 0).all()
    x = random_x(m, k, torch.float16, seed=7)
    check_close(run_kernel(x, packed), reference_linear(x, packed), torch.float16, "negative scales")


def _bucket_m(config: dg.GemmConfig) -> int:
    """A batch size in the bucket that lists `config`, not a multiple of its tile."""
    for name, max_m, configs in dg.CONFIGS:
        if config in configs:
            if max_m is not None and max_m <= 8:
                return max(1, max_m - 1)
            return {"small": 7, "medium": 40}.get(name, 130)
    raise AssertionError(config)


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("block_m", [1, 2, 4, 8])
def test_decode_tiles_of_fewer_than_16_rows(bits, block_m):
    """FMA tiles (BLOCK_M < 16): a partial last M tile, split K, a tail in N, bias, bf16."""
    m, n, k = block_m + 1, 72, 256
    packed = make_layer(bits, 64, bits % 2 == 0, n, k, seed=300 + bits * 10 + block_m)
    x = random_x(m, k, torch.bfloat16, seed=block_m)
    bias = torch.randn(n, generator=torch.Generator().manual_seed(bits)).to(torch.bfloat16)
    config = dg.GemmConfig(block_m, 64, 64, split_k=2)
    check_close(run_kernel(x, packed, bias=bias, config=config), reference_linear(x, packed, bias),
                torch.bfloat16, f"BLOCK_M={block_m} W{bits}")


@pytest.mark.parametrize("index", range(len(dg.all_configs())))
def test_every_listed_config_runs(index):
    """Each candidate the autotuner may pick, forced, on a shape with tails in M and N."""
    config = dg.all_configs()[index]
    bits = BITS[index % 4]
    group_size = GROUPS[(index // 4) % 4]
    sym = index % 3 == 0
    dtype = DTYPES[index % 2]
    m, n, k = _bucket_m(config), 200, 512
    packed = make_layer(bits, group_size, sym, n, k, seed=index)
    x = random_x(m, k, dtype, seed=index + 100)
    bias = torch.randn(n, generator=torch.Generator().manual_seed(index)).to(dtype) if index % 2 else None
    check_close(run_kernel(x, packed, bias=bias, config=config), reference_linear(x, packed, bias), dtype,
                f"{config} W{bits}G{group_size}")


@pytest.mark.parametrize("gather_words", [False, True], ids=["packed-words", "gather-words"])
@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("block_k,split_k", [(64, 1), (128, 2), (256, 1)])
@pytest.mark.parametrize("group_size", [32, 64, -1])
def test_k_not_a_multiple_of_block_k(group_size, block_k, split_k, bits, gather_words):
    """K = 320: the last K tile is partial (masked along K, groups included)."""
    n, k, m = 72, 320, 9
    packed = make_layer(bits, group_size, False, n, k, seed=bits + block_k)
    x = random_x(m, k, torch.float16, seed=3)
    config = dg.GemmConfig(16, 64, block_k, split_k=split_k, gather_words=gather_words)
    check_close(run_kernel(x, packed, config=config), reference_linear(x, packed), torch.float16,
                f"K=320 BLOCK_K={block_k}")


def test_more_splits_than_k_tiles_and_bias():
    n, k, m = 50, 128, 2
    packed = make_layer(3, 32, False, n, k, seed=11)
    x = random_x(m, k, torch.bfloat16, seed=12)
    bias = torch.randn(n, generator=torch.Generator().manual_seed(13))  # fp32 bias, bf16 activations
    config = dg.GemmConfig(16, 32, 32, split_k=8)  # 4 K tiles, 8 splits
    check_close(run_kernel(x, packed, bias=bias, config=config), reference_linear(x, packed, bias),
                torch.bfloat16, "split_k > K tiles")


def test_leading_dims_strided_inputs_and_sharded_weights():
    """x [2, 3, K] as a strided view; qweight/scales/qzeros a column slice (a tensor-parallel shard)."""
    n_full, n, k = 160, 56, 256
    full = make_layer(4, 128, False, n_full, k, seed=21)
    cols = slice(40, 40 + n)
    shard = PackedLinear(full.qweight[:, cols], full.scales[:, cols], full.qzeros[:, cols], full.spec)
    assert not shard.qweight.is_contiguous()
    base = random_x(6, 2 * k, torch.float16, seed=22)
    x = base.view(2, 3, 2 * k)[..., ::2]  # [2, 3, K], stride 2 along K
    assert x.stride(-1) == 2
    bias = torch.randn(n, generator=torch.Generator().manual_seed(23)).to(torch.float16)
    ref = reference_linear(x, shard, bias)
    y = run_kernel(x, shard, bias=bias)
    assert y.shape == (2, 3, n)
    check_close(y, ref, torch.float16, "strided x, sharded weights")


def test_per_channel_group_given_as_k():
    """vLLM passes the effective group size: G == K means one group per channel."""
    n, k = 64, 256
    packed = make_layer(4, -1, True, n, k, seed=31)
    x = random_x(4, k, torch.float16, seed=32)
    qweight, scales, _ = on_device(packed)
    config = dg.GemmConfig(16, 64, 64)
    y = dg.dequant_gemm(x.to(DEVICE), qweight, scales, None, 4, k, config=config).cpu()
    check_close(y, reference_linear(x, packed), torch.float16, "group_size == K")


def test_empty_batch():
    packed = make_layer(4, 128, False, 32, 128, seed=41)
    qweight, scales, qzeros = on_device(packed)
    y = dg.dequant_gemm(torch.zeros(0, 128, dtype=torch.float16, device=DEVICE), qweight, scales, qzeros, 4, 128)
    assert y.shape == (0, 32) and y.dtype == torch.float16


def test_config_forced_by_environment(monkeypatch):
    packed = make_layer(2, 32, True, 40, 256, seed=51)
    x = random_x(3, 256, torch.float16, seed=52)
    qweight, scales, _ = on_device(packed)

    def run():
        return dg.dequant_gemm(x.to(DEVICE), qweight, scales, None, 2, 32).cpu()

    try:
        monkeypatch.setenv(dg.CONFIG_ENV_VAR, "BLOCK_M=16,BLOCK_N=32,BLOCK_K=64,SPLIT_K=2,num_warps=2,num_stages=2")
        dg.forced_config.cache_clear()
        check_close(run(), reference_linear(x, packed), torch.float16, "config from env")
        monkeypatch.setenv(dg.CONFIG_ENV_VAR, "BLOCK_M=16,BLOCK_N=32,BLOCK_K=48")
        dg.forced_config.cache_clear()
        with pytest.raises(ValueError, match="block_k=48"):
            run()
    finally:
        monkeypatch.delenv(dg.CONFIG_ENV_VAR)
        dg.forced_config.cache_clear()


# ----------------------------------------------------------------------------
# The registered operator: what torch.compile (and so vLLM) calls
# ----------------------------------------------------------------------------
def _op_args(bits=3, group_size=32, sym=False, m=5, n=40, k=128, with_bias=True):
    packed = make_layer(bits, group_size, sym, n, k, seed=71)
    x = random_x(m, k, torch.bfloat16, seed=72).to(DEVICE)
    bias = torch.randn(n, generator=torch.Generator().manual_seed(73)).to(torch.bfloat16).to(DEVICE)
    qweight, scales, qzeros = on_device(packed)
    return packed, (x, qweight, scales, qzeros, bias if with_bias else None, bits, group_size)


def test_operator_matches_reference_and_passes_opcheck():
    import signround_triton.ops  # noqa: F401  registers the operator

    packed, args = _op_args()
    y = torch.ops.signround.dequant_gemm(*args).cpu()
    check_close(y, reference_linear(args[0].cpu(), packed, args[4].cpu()), torch.bfloat16, "operator")
    # Schema, fake (meta) implementation against the real one, and dispatch under AOT autograd.
    torch.library.opcheck(torch.ops.signround.dequant_gemm.default, args,
                          test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"))


def test_operator_is_captured_whole_by_torch_compile():
    import signround_triton.ops  # noqa: F401

    packed, args = _op_args(bits=2, sym=True, m=3, with_bias=False)
    x, rest = args[0], args[1:]

    def linear(x):
        return torch.ops.signround.dequant_gemm(x * 2, *rest) + 1

    compiled = torch.compile(linear, fullgraph=True, backend="aot_eager")  # fullgraph: a graph break fails
    for m in (3, 7):  # a second batch size goes through the dynamic-shape graph
        xm = random_x(m, x.shape[-1], torch.bfloat16, seed=74 + m).to(DEVICE)
        check_close(compiled(xm).cpu(), linear(xm).cpu(), torch.bfloat16, f"compiled, M={m}")


# ----------------------------------------------------------------------------
# Errors a caller can act on
# ----------------------------------------------------------------------------
def _operands(bits=4, group_size=32, sym=False, n=24, k=128):
    packed = make_layer(bits, group_size, sym, n, k, seed=61)
    x = random_x(2, k, torch.float16, seed=62).to(DEVICE)
    return (x, *on_device(packed))


def test_error_k_not_multiple_of_32():
    x, qweight, scales, qzeros = _operands()
    with pytest.raises(ValueError, match=r"K=100 .*not a multiple of 32"):
        dg.dequant_gemm(x[:, :100], qweight, scales, qzeros, 4, 32)


def test_error_activation_dtype():
    x, qweight, scales, qzeros = _operands()
    with pytest.raises(TypeError, match=r"x has dtype torch.float32; expected torch.float16 or torch.bfloat16"):
        dg.dequant_gemm(x.float(), qweight, scales, qzeros, 4, 32)


@pytest.mark.parametrize("tensor,bad,pattern", [
    ("scales", lambda t: t.float(), r"scales: found torch.float32 \(4, 24\), expected torch.float16 \(4, 24\)"),
    ("qzeros", lambda t: t[:, :20], r"qzeros: found torch.uint8 \(4, 20\), expected torch.uint8 \(4, 24\)"),
    ("qweight", lambda t: t[:8], r"qweight: found torch.int32 \(8, 24\), expected torch.int32 \(16, 24\)"),
    ("qweight", lambda t: t.to(torch.int64), r"qweight: found torch.int64"),
])
def test_error_names_tensor_found_and_expected(tensor, bad, pattern):
    x, qweight, scales, qzeros = _operands()
    ops = {"qweight": qweight, "scales": scales, "qzeros": qzeros}
    ops[tensor] = bad(ops[tensor])
    with pytest.raises(SignRoundFormatError, match=pattern):
        dg.dequant_gemm(x, ops["qweight"], ops["scales"], ops["qzeros"], 4, 32)


def test_error_group_and_bits_and_bias():
    x, qweight, scales, qzeros = _operands(group_size=-1, k=96)  # 96: not a multiple of 64
    with pytest.raises(SignRoundFormatError, match="group_size=64 does not divide in_features=96"):
        dg.dequant_gemm(x, qweight, scales, qzeros, 4, 64)
    with pytest.raises(ValueError, match=r"bits=5; expected one of \[2, 3, 4, 8\]"):
        dg.dequant_gemm(x, qweight, scales, qzeros, 5, -1)
    short_bias = torch.zeros(23, dtype=torch.float16, device=DEVICE)
    with pytest.raises(ValueError, match=r"bias: found torch.float16 \(23,\), expected a floating tensor "
                                         r"of shape \(24,\)"):
        dg.dequant_gemm(x, qweight, scales, qzeros, 4, -1, bias=short_bias)


def test_error_cpu_tensors_without_interpreter(monkeypatch):
    x, qweight, scales, qzeros = _operands()
    monkeypatch.setattr(dg, "is_interpreted", lambda: False)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        dg.dequant_gemm(x.cpu(), qweight.cpu(), scales.cpu(), qzeros.cpu(), 4, 32)


# ----------------------------------------------------------------------------
# The configuration table
# ----------------------------------------------------------------------------
def test_config_table_rules():
    names = [name for name, _, _ in dg.CONFIGS]
    assert names == ["m1", "m2", "m4", "m8", "small", "medium", "large"] and dg.CONFIGS[-1][1] is None
    assert [dg.bucket_for(m)[0] for m in (1, 2, 3, 4, 5, 8, 9, 16, 17, 64, 65, 4096)] == \
        ["m1", "m2", "m4", "m4", "m8", "m8", "small", "small", "medium", "medium", "large", "large"]
    for name, max_m, configs in dg.CONFIGS:
        assert configs, name
        if max_m is not None and max_m <= 16:
            assert configs[0].split_k > 1, f"{name}: small batches should split K by default"
        if max_m is not None and max_m <= 8:  # decode: the default tile holds the batch, not 16 rows
            assert configs[0].block_m == max_m, name
    for config in dg.all_configs():
        assert config.block_k % 32 == 0
        for group_size in (32, 64, 128, -1):
            dg.check_config(config, group_size)  # raises if the BLOCK_K rule fails
        assert dg.GemmConfig.parse(str(config)) == config
    # the rule itself
    with pytest.raises(ValueError, match="BLOCK_K=64 neither divides nor is a multiple of group_size=96"):
        dg.check_config(dg.GemmConfig(16, 32, 64), 96)
    with pytest.raises(ValueError, match="multiple of 32"):
        dg.GemmConfig(16, 32, 16)
    with pytest.raises(ValueError, match="block_m=3 must be a power of two >= 1"):
        dg.GemmConfig(3, 32, 64)
    assert dg.GemmConfig.parse("BLOCK_M=16,BLOCK_N=32,BLOCK_K=64,GATHER_WORDS=1").gather_words


# ----------------------------------------------------------------------------
# Ahead-of-time compilation for an H100 (no GPU needed)
# ----------------------------------------------------------------------------
def _run_aot_check(*args: str) -> list[dict]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    proc = subprocess.run([sys.executable, "-m", "signround_triton.aot_check", "--jobs", str(os.cpu_count() or 1),
                           *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800)
    records = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    failed = [r for r in records if not r["ok"]]
    assert proc.returncode == 0 and not failed, \
        f"rc={proc.returncode}\n" + "\n".join(f"{r['case']}: {r['error']}" for r in failed[:10]) + proc.stderr[-3000:]
    return records


def test_every_autotune_candidate_compiles_for_sm90():
    """Every candidate x every bit width compiles for sm_90 within the shared memory of a block.

    Group size (32, 128), symmetry, dtype, K-tail masking and bias are dealt round-robin
    (each bit width meets every group x symmetry x dtype across the candidates), which keeps
    this at ~90 compilations, about a minute on 2 cores; test_..._full compiles the product.
    """
    from signround_triton.aot_check import aot_cases

    records = _run_aot_check()
    assert len(records) == len(aot_cases()) == len(dg.all_configs()) * len(BITS)
    assert all(r.get("local_bytes", 0) == 0 for r in records), [r for r in records if r.get("local_bytes")]


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("SIGNROUND_AOT_FULL") != "1",
                    reason="the full product (704 compilations, ~8 min here) runs with SIGNROUND_AOT_FULL=1")
def test_every_autotune_candidate_compiles_for_sm90_full():
    from signround_triton.aot_check import aot_cases

    assert len(_run_aot_check("--full")) == len(aot_cases(full=True))


# ----------------------------------------------------------------------------
# The benchmark script: parses its arguments anywhere, refuses without CUDA
# ----------------------------------------------------------------------------
def test_benchmark_script_help_and_refusal_without_cuda():
    script = ROOT / "benchmarks" / "kernel_bench.py"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, str(script), "--help"], capture_output=True, text=True, env=env)
    assert proc.returncode == 0 and "--out" in proc.stdout, proc.stderr
    if not CUDA:
        proc = subprocess.run([sys.executable, str(script), "--batches", "1"], capture_output=True, text=True,
                              env=env)
        assert proc.returncode == 2 and "needs a CUDA GPU" in proc.stderr, proc.stderr


# ----------------------------------------------------------------------------
# GPU only
# ----------------------------------------------------------------------------
gpu = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("m", [1, 16, 48, 300])
@pytest.mark.parametrize("bits", BITS)
def test_autotuned_on_gpu(bits, m):
    n, k = 1000, 2048
    packed = make_layer(bits, 128, bits % 2 == 0, n, k, seed=bits * 1000 + m)
    x = random_x(m, k, torch.bfloat16, seed=m)
    qweight, scales, qzeros = on_device(packed)
    y = dg.dequant_gemm(x.to(DEVICE), qweight, scales, qzeros, bits, 128).cpu()
    check_close(y, reference_linear(x, packed), torch.bfloat16, f"autotuned W{bits} M={m}")
    chosen = dg.tuned_config(m)
    assert chosen is not None and dg.GemmConfig.parse(chosen) in dg.bucket_for(m)[1]
    # the tuned choice is cached: a second call gives the same result up to split-K atomics order
    y2 = dg.dequant_gemm(x.to(DEVICE), qweight, scales, qzeros, bits, 128).cpu()
    torch.testing.assert_close(y2, y, rtol=2e-2, atol=1e-2)
