"""Tier 3: the real SmolLM2-135M checkpoint, served by vLLM, against transformers on the same weights."""
import math

import pytest
import torch

from benchmarks.served_perplexity import perplexity_of_engine
from signround_vllm.checkpoint import write_dequantized_copy
from signround_vllm.format import LayerQuantSpec, SignRoundConfig
from offline_tuner.default_model import prepare_default_model
from offline_tuner.evaluation import perplexity_of_model
from offline_tuner.quantize import quantize_checkpoint
from offline_tuner.text_data import token_windows, wikipedia_text
from tests.vllm_utils import run_on

pytestmark = pytest.mark.slow

N_WINDOWS, SEQ_LEN = 4, 512


@pytest.fixture(scope="module")
def smollm2():
    return prepare_default_model()


@pytest.fixture(scope="module")
def eval_windows(smollm2):
    from transformers import AutoTokenizer

    return token_windows(AutoTokenizer.from_pretrained(smollm2), wikipedia_text("evaluation"), N_WINDOWS, SEQ_LEN,
                         seed=None)


def test_served_w4g64_perplexity_matches_transformers(smollm2, eval_windows, tmp_path):
    from transformers import AutoModelForCausalLM

    ckpt = tmp_path / "w4g64"
    quantize_checkpoint(smollm2, ckpt, SignRoundConfig(default=LayerQuantSpec(4, 64, False)))
    deq = write_dequantized_copy(ckpt, tmp_path / "w4g64-deq")
    model = AutoModelForCausalLM.from_pretrained(deq, dtype=torch.bfloat16)
    ppl_transformers = perplexity_of_model(model, eval_windows)
    del model
    ppl_served = run_on(ckpt, lambda llm: perplexity_of_engine(llm, eval_windows), max_model_len=1024)
    print(f"W4G64 perplexity: transformers (dequantized bf16) {ppl_transformers:.3f}, vLLM served {ppl_served:.3f}")
    assert math.isfinite(ppl_served) and 5 < ppl_served < 100
    assert abs(ppl_served / ppl_transformers - 1) < 0.01
