"""Tier 2-3: SignRound checkpoints served by vLLM (CPU, in-process) against their own dequantized weights."""
import json
import os
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from signround_vllm.checkpoint import write_dequantized_copy
from signround_vllm.format import LayerQuantSpec, SignRoundConfig
from offline_tuner.default_model import make_tiny_model
from offline_tuner.quantize import quantize_checkpoint
from tests.vllm_utils import (
    TIE_TOLERANCE, check_greedy_agreement, greedy_tokens_and_logprobs, prompt_logprobs, run_on, run_reporting_script,
)

pytestmark = pytest.mark.slow

VOCAB = 500  # vLLM pads the vocabulary to a multiple of 64: a quantized lm_head loads with padding
PROMPTS = [[int(t) for t in torch.randint(3, VOCAB, (n,), generator=torch.Generator().manual_seed(n))]
           for n in (5, 11, 17, 23)]
MAX_TOKENS = 12


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "model", seed=0, num_layers=2, hidden=128,
                           intermediate=256, heads=4, kv_heads=2, vocab_size=VOCAB)


def quantize_pair(model_dir, root: Path, spec: LayerQuantSpec, **config_kwargs):
    ckpt = root / f"ckpt-{spec.short_name()}"
    quantize_checkpoint(model_dir, ckpt, SignRoundConfig(default=spec, **config_kwargs))
    return ckpt, write_dequantized_copy(ckpt, root / f"deq-{spec.short_name()}")


# Each bit width once, symmetric and asymmetric alternating: the kernels' numerics are checked for every bit
# width in both forms by the kernel tests (tests/test_cpu_int4.py, the Triton tests); here the serving path.
# Two of them quantize lm_head too (tied in the source, stored apart), so it is served packed.
@pytest.mark.parametrize("bits,sym,lm_head", [(2, False, False), (3, True, False), (4, False, True), (8, True, True)])
def test_served_tokens_match_dequantized_bf16(tiny_model, tmp_path, bits, sym, lm_head):
    spec = LayerQuantSpec(bits, 32 if bits != 8 else 64, sym)
    ckpt, deq = quantize_pair(tiny_model, tmp_path, spec, **({"modules_to_not_convert": ()} if lm_head else {}))
    with safe_open(ckpt / "model.safetensors", "pt") as f:
        assert ("lm_head.qweight" in f.keys()) == lm_head
    assert_same_greedy_as(ckpt, deq)


def test_exact_cpu_path_serves_through_dequantized_tiles(tiny_model, tmp_path, monkeypatch):
    """SIGNROUND_KERNEL=cpu_int4_exact: every forward goes through the tile path (the one `cpu_int4` takes
    for large batches), with float32 scales; served tokens and log-probabilities are the dequantized model's."""
    monkeypatch.setenv("SIGNROUND_KERNEL", "cpu_int4_exact")
    ckpt, deq = quantize_pair(tiny_model, tmp_path, LayerQuantSpec(4, 32, False))
    assert_same_greedy_as(ckpt, deq)


def assert_same_greedy_as(ckpt, reference, out=None):
    """The checkpoint's greedy tokens are the reference's (up to near-ties), with close log-probabilities.

    `out` (per prompt: tokens, logprobs) is computed here from `ckpt` unless given.
    """
    if out is None:
        out = run_on(ckpt, lambda llm: greedy_tokens_and_logprobs(llm, PROMPTS, MAX_TOKENS))
    quant_tokens, quant_logprobs = [t for t, _ in out], [lp for _, lp in out]
    ref = run_on(reference, lambda llm: prompt_logprobs(llm, [p + t for p, t in zip(PROMPTS, quant_tokens)]))
    agreement = check_greedy_agreement(quant_tokens, PROMPTS, ref, quant_logprobs)
    assert agreement.exact + agreement.ties == agreement.positions, agreement
    assert agreement.exact >= 0.75 * agreement.positions, agreement
    assert agreement.max_logprob_diff <= TIE_TOLERANCE, agreement


def test_fused_layers_with_different_settings_are_refused(tiny_model, tmp_path):
    spec = LayerQuantSpec(4, 32, False)
    ckpt = tmp_path / "ckpt"
    config = SignRoundConfig(default=spec, layer_overrides={"model.layers.0.self_attn.k_proj": LayerQuantSpec(8, 32, False)})
    quantize_checkpoint(tiny_model, ckpt, config)
    with pytest.raises(Exception) as e:
        run_on(ckpt, lambda llm: None)
    text = str(e.value)
    assert "model.layers.0.self_attn.qkv_proj" in text and "same quantization settings" in text


def test_unsupported_setting_in_config_is_refused_at_load(tiny_model, tmp_path):
    ckpt, _ = quantize_pair(tiny_model, tmp_path, LayerQuantSpec(4, 32, False))
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["quantization_config"]["bits"] = 5
    (ckpt / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(Exception) as e:
        run_on(ckpt, lambda llm: None)
    assert "bits=5" in str(e.value) and "supported" in str(e.value)


def test_mixed_bit_checkpoint_is_served(tmp_path, calibration_text):
    """--avg-bits: per-layer settings chosen to a 3.25-bit budget (several bit widths and group sizes, as
    layer overrides) are served with the dequantized weights' tokens."""
    from offline_tuner.allocation import Allocation
    from offline_tuner.default_model import prepare_default_model
    from offline_tuner.quantize import Calibration

    model = make_tiny_model(tmp_path / "model", seed=0, num_layers=2, hidden=128, intermediate=256, heads=4,
                            kv_heads=2, tokenizer_from=prepare_default_model())
    ckpt = tmp_path / "ckpt"
    result = quantize_checkpoint(model, ckpt, SignRoundConfig(), allocation=Allocation(3.25, n_windows=2, seq_len=64),
                                 calibration=Calibration(text_file=str(calibration_text)))
    config = json.loads((ckpt / "config.json").read_text())["quantization_config"]
    assert config["layer_overrides"] and result.run_log["allocation"]["achieved_bits"] <= 3.25
    assert_same_greedy_as(ckpt, write_dequantized_copy(ckpt, tmp_path / "deq"))


TP_SCRIPT = r"""
import json, sys
from tests.vllm_utils import greedy_tokens_and_logprobs, make_llm
if __name__ == "__main__":
    path, prompts, n = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3])
    llm = make_llm(path, tensor_parallel_size=2, distributed_executor_backend="mp")
    print("TOKENS=" + json.dumps(greedy_tokens_and_logprobs(llm, prompts, n)), flush=True)
"""


@pytest.mark.parametrize("spec", [LayerQuantSpec(4, 32, False), LayerQuantSpec(3, -1, True)],
                         ids=lambda s: s.short_name())
def test_tensor_parallel_2_matches_single_rank(tiny_model, tmp_path, spec):
    """Row- and column-parallel shards of packed tensors load correctly (TP=2 on CPU); so does a quantized
    lm_head split by vocabulary (the second rank's part ends in padding)."""
    ckpt, deq = quantize_pair(tiny_model, tmp_path, spec, modules_to_not_convert=())
    assert_same_greedy_as(ckpt, deq, out=greedy_with_tensor_parallel_2(ckpt, tmp_path))


def greedy_with_tensor_parallel_2(ckpt, tmp_path):
    """Greedy tokens and log-probabilities of PROMPTS from `ckpt` served with tensor_parallel_size=2 on CPU."""
    env = dict(os.environ, VLLM_CPU_OMP_THREADS_BIND="0|1", VLLM_ENABLE_V1_MULTIPROCESSING="1",
               PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    script = tmp_path / "tp.py"
    script.write_text(TP_SCRIPT)
    found, _ = run_reporting_script([sys.executable, str(script), str(ckpt), json.dumps(PROMPTS), str(MAX_TOKENS)],
                                    ("TOKENS",), env, timeout=600)
    return found["TOKENS"]


COMPILED_SCRIPT = r"""
import json, sys
from tests.vllm_utils import greedy_tokens_and_logprobs, make_llm
import signround_triton.dequant_gemm as kernel

launches = 0
launch = kernel.launch


def counted_launch(*args, **kwargs):
    global launches
    launches += 1
    return launch(*args, **kwargs)


kernel.launch = counted_launch  # the registered operator looks it up on every call
if __name__ == "__main__":
    path, prompts, n = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3])
    llm = make_llm(path, enforce_eager=False)  # vLLM's torch.compile on
    launches = 0
    out = greedy_tokens_and_logprobs(llm, prompts, n)
    print("LAUNCHES=" + json.dumps(launches), flush=True)
    print("TOKENS=" + json.dumps(out), flush=True)
"""


def test_compiled_engine_served_by_triton_operator(tiny_model, tmp_path):
    """vLLM with compilation on, the Triton kernel forced (in the interpreter): the compiled graph
    calls `signround::dequant_gemm`, and the tokens are those of the dequantized weights."""
    ckpt, deq = quantize_pair(tiny_model, tmp_path, LayerQuantSpec(3, 32, False))
    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, TRITON_INTERPRET="1", SIGNROUND_KERNEL="triton", PYTHONPATH=str(root))
    script = tmp_path / "compiled.py"
    script.write_text(COMPILED_SCRIPT)
    found, proc = run_reporting_script([sys.executable, str(script), str(ckpt), json.dumps(PROMPTS),
                                        str(MAX_TOKENS)], ("LAUNCHES", "TOKENS"), env, timeout=900)
    log = proc.stdout + proc.stderr
    assert "use kernel 'triton' (forced by SIGNROUND_KERNEL=triton)" in log
    assert "saved AOT compiled function" in log or "Directly load AOT compilation" in log, log[-4000:]
    # Two blocks of four linear layers (qkv, o, gate_up, down), at least once per forward step.
    assert found["LAUNCHES"] >= 8 * MAX_TOKENS, found["LAUNCHES"]
    assert_same_greedy_as(ckpt, deq, out=found["TOKENS"])
