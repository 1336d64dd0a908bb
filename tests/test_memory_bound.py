"""The tuner never holds the whole model: peak anonymous memory of `signround quantize` on a model many
times larger than one block stays below a bound computed from one block, the activation streams and an
idle interpreter's baseline. Measured from outside (the parent polls the child's /proc status), so the
tuner's own accounting is not trusted. Sharded output (tiny shards) is checked on the way.
"""
import json
import shutil
import sys
from pathlib import Path

import pytest

from benchmarks.benchlib import idle_baseline_bytes, run_measured
from offline_tuner.default_model import make_tiny_model, prepare_default_model
from offline_tuner.text_data import wikipedia_text
from signround_vllm.checkpoint import validate_checkpoint

pytestmark = pytest.mark.slow

HIDDEN, INTERMEDIATE, BLOCKS, HEADS = 768, 2048, 100, 12
N_SAMPLES, SEQ = 4, 64
MiB = 2**20


# What any run imports before it touches a weight: the tool and the model's transformers module.
BASELINE_IMPORTS = ("torch, transformers, safetensors, accelerate, transformers.models.llama.modeling_llama, "
                    "offline_tuner.quantize, offline_tuner.blockwise")


@pytest.fixture(scope="module")
def big_model(tmp_path_factory):
    # 1.4 GB on disk: removed when the module is done, so the rest of the suite does not carry it.
    folder = tmp_path_factory.mktemp("big")
    yield make_tiny_model(folder / "m", seed=0, num_layers=BLOCKS, hidden=HIDDEN, intermediate=INTERMEDIATE,
                          heads=HEADS, kv_heads=HEADS, tie_word_embeddings=False,
                          tokenizer_from=prepare_default_model())
    shutil.rmtree(folder, ignore_errors=True)


@pytest.mark.parametrize("iters", [0, 2], ids=["rtn", "signround"])
def test_peak_memory_is_bounded_by_one_block(big_model, tmp_path, iters):
    text = tmp_path / "calib.txt"
    text.write_text(wikipedia_text("calibration")[:20000])
    baseline = idle_baseline_bytes(sys.executable, BASELINE_IMPORTS)
    out = tmp_path / "ckpt"
    cmd = [str(Path(sys.executable).with_name("signround")), "quantize", str(big_model), "--out", str(out),
           "--bits", "4", "--group-size", "64", "--iters", str(iters), "--n-samples", str(N_SAMPLES),
           "--seq-len", str(SEQ), "--batch-size", "2", "--calibration", str(text), "--max-shard-size", "50MB"]
    try:
        _check_run(big_model, tmp_path, out, cmd, baseline)
    finally:
        shutil.rmtree(out, ignore_errors=True)  # a few hundred MB of shards


def _check_run(big_model, tmp_path, out, cmd, baseline):
    measured = run_measured(cmd, tmp_path / "quantize.log", timeout_s=900)
    log = (tmp_path / "quantize.log").read_text()
    assert measured.returncode == 0, log[-4000:]
    peak = measured.peak_anon_bytes

    block_params = 4 * HIDDEN * HIDDEN + 3 * HIDDEN * INTERMEDIATE
    block_fp32 = 4 * block_params
    model_bytes = sum(f.stat().st_size for f in big_model.glob("*.safetensors"))
    vocab = json.loads((big_model / "config.json").read_text())["vocab_size"]
    largest_other = 2 * vocab * HIDDEN  # one bf16 embedding, loaded alone
    streams = 4 * N_SAMPLES * SEQ * HIDDEN * 4
    # One block in fp32 with its tunables, their gradients, the best copy, the rounded weights and their
    # bf16 copies for the matmuls (at most twelve copies of the block), the largest other tensor twice,
    # the streams, and 448 MiB of slack for freed memory glibc keeps. The same SignRound run peaks near
    # 600 MiB; it once read 929 and 1220 MiB because the tuner forked ldconfig after every block and the
    # child was counted with the parent (fixed in offline_tuner/memory.py).
    bound = baseline + 12 * block_fp32 + 2 * largest_other + streams + 448 * MiB
    print(f"\npeak anonymous memory {peak / MiB:.0f} MiB (bound {bound / MiB:.0f} MiB: baseline "
          f"{baseline / MiB:.0f}, block fp32 {block_fp32 / MiB:.0f}); model {model_bytes / MiB:.0f} MiB in bf16")
    assert model_bytes > 1.5 * (bound - baseline), "the test model must be much larger than the bound's allowance"
    assert peak < bound, log[-3000:]

    run_log = json.loads((out / "signround_run.json").read_text())
    assert run_log["peak_anon_bytes"] <= peak * 1.05 and run_log["shards"] > 5
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == {p.name for p in out.glob("model-*-of-*.safetensors")}
    validate_checkpoint(out)
