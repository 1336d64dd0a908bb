"""Sharded safetensors in and out, and models as users have them (cached hub ids, fp16/fp32 weights).

Tier 1: the shard writer against safetensors' own reader (exact bytes), layouts and refusals; the
tuner on sharded input gives the same tensors as on single-file input. Tier 3 (slow): vLLM serves a
sharded SignRound checkpoint with the greedy tokens of its dequantized weights.
"""
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from offline_tuner.default_model import make_tiny_model
from offline_tuner.errors import TunerInputError
from offline_tuner.model_source import open_model
from offline_tuner.quantize import quantize_checkpoint
from signround_vllm.checkpoint import load_tensors, validate_checkpoint
from signround_vllm.format import LayerQuantSpec, SignRoundConfig
from signround_vllm.shards import INDEX_FILE, ShardedWriter, TensorEntry, split_into_shards, write_tensors

CONFIG = SignRoundConfig(default=LayerQuantSpec(4, 32, False))


def _random_tensors(seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"a.weight": torch.randn(17, 33, generator=g).to(torch.bfloat16),
            "b.qweight": torch.randint(-2**31, 2**31 - 1, (12, 7), generator=g, dtype=torch.int32),
            "b.qzeros": torch.randint(0, 16, (3, 7), generator=g, dtype=torch.uint8),
            "c.scales": torch.randn(5, generator=g).half(), "d.bias": torch.randn(1, generator=g)}


@pytest.mark.parametrize("max_bytes", [1, 100, 1300, 10**9])
def test_written_shards_read_back_exactly_with_an_index(tmp_path, max_bytes):
    tensors = _random_tensors()
    files = write_tensors(tmp_path, tensors, max_bytes)
    back = {}
    for f in files:
        back.update(load_file(str(f)))
    assert sorted(back) == sorted(tensors)
    assert all(back[k].dtype == v.dtype and torch.equal(back[k], v) for k, v in tensors.items())
    if len(files) == 1:
        assert [f.name for f in files] == ["model.safetensors"] and not (tmp_path / INDEX_FILE).exists()
    else:
        index = json.loads((tmp_path / INDEX_FILE).read_text())
        assert [f.name for f in files] == [f"model-{i:05d}-of-{len(files):05d}.safetensors" for i in range(1, len(files) + 1)]
        assert {k: (tmp_path / v) for k, v in index["weight_map"].items()} == \
            {k: f for f in files for k in load_file(str(f))}
        assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in tensors.values())


def test_shards_split_in_order_and_a_large_tensor_stands_alone():
    e = [TensorEntry(n, torch.float32, (s,)) for n, s in [("a", 10), ("b", 10), ("c", 100), ("d", 1)]]
    groups = split_into_shards(e, 80)
    assert [[x.name for x in g] for g in groups] == [["a", "b"], ["c"], ["d"]]


def test_writer_refuses_what_the_layout_does_not_hold_and_unfinished_output(tmp_path):
    w = ShardedWriter(tmp_path, [TensorEntry("x", torch.float32, (2, 3))])
    with pytest.raises(ValueError, match=r"x: got torch.float16 \(2, 3\), the layout has torch.float32 \(2, 3\)"):
        w.write("x", torch.zeros(2, 3, dtype=torch.float16))
    with pytest.raises(KeyError, match="y: not in this checkpoint's layout"):
        w.write("y", torch.zeros(1))
    with pytest.raises(RuntimeError, match="1 tensors never written"):
        w.finish()


def test_reused_layout_keeps_what_an_interrupted_run_wrote(tmp_path):
    tensors = _random_tensors(1)
    entries = [TensorEntry.of(n, t) for n, t in tensors.items()]
    first = ShardedWriter(tmp_path, entries, 200)
    first.write("a.weight", tensors["a.weight"])
    first.sync()
    first.close()
    again = ShardedWriter(tmp_path, entries, 200, reuse_existing=True)
    assert torch.equal(again.read("a.weight"), tensors["a.weight"])
    for n, t in tensors.items():
        if n != "a.weight":
            again.write(n, t)
    again.written.add("a.weight")
    again.finish()
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    write_tensors(fresh, tensors, 200)
    for f in again.files:
        assert f.read_bytes() == (fresh / f.name).read_bytes()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "m", seed=3, num_layers=3, vocab_size=512,
                           tie_word_embeddings=False)


def _resave(src: Path, dst: Path, dtype=None, shard="60KB") -> Path:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(src, dtype=dtype or "auto")
    model.save_pretrained(dst, max_shard_size=shard)
    return dst


def test_sharded_input_and_output_hold_the_same_tensors_as_single_files(tiny, tmp_path):
    sharded_in = _resave(tiny, tmp_path / "sharded-in")
    assert (sharded_in / INDEX_FILE).is_file() and len(list(sharded_in.glob("*.safetensors"))) > 3
    single = quantize_checkpoint(tiny, tmp_path / "single", CONFIG).out_dir
    sharded = quantize_checkpoint(sharded_in, tmp_path / "sharded", CONFIG, max_shard_bytes=50_000).out_dir
    assert (sharded / INDEX_FILE).is_file() and len(list(sharded.glob("model-*.safetensors"))) > 3
    validate_checkpoint(sharded)
    a, b = load_tensors(single), load_tensors(sharded)
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=["fp16", "fp32"])
def test_fp16_and_fp32_models_keep_their_dtype_for_unquantized_tensors(tiny, tmp_path, dtype):
    src = _resave(tiny, tmp_path / "in", dtype=dtype, shard="10GB")
    ckpt = quantize_checkpoint(src, tmp_path / "out", CONFIG).out_dir
    tensors = load_tensors(ckpt)
    assert tensors["model.embed_tokens.weight"].dtype == dtype and tensors["lm_head.weight"].dtype == dtype
    assert tensors["model.layers.0.mlp.down_proj.qweight"].dtype == torch.int32
    validate_checkpoint(ckpt)


def test_model_id_in_the_local_hub_cache_is_found_offline(tiny, tmp_path, monkeypatch):
    import huggingface_hub.constants

    cache = tmp_path / "hub"
    snapshot = cache / "models--someorg--tiny-llama" / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    for f in tiny.iterdir():
        (snapshot / f.name).write_bytes(f.read_bytes())
    (cache / "models--someorg--tiny-llama" / "refs").mkdir()
    (cache / "models--someorg--tiny-llama" / "refs" / "main").write_text("0" * 40)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    assert open_model("someorg/tiny-llama").path == snapshot
    with pytest.raises(TunerInputError, match="not in the local Hugging Face cache.*nothing is downloaded"):
        open_model("someorg/absent-model")


def test_missing_shard_and_missing_tensor_are_refused(tiny, tmp_path):
    sharded = _resave(tiny, tmp_path / "in")
    victim = sorted(sharded.glob("model-*.safetensors"))[1]
    victim.rename(tmp_path / "elsewhere.safetensors")
    with pytest.raises(TunerInputError, match="names shards that are missing"):
        open_model(sharded)
    index = json.loads((sharded / INDEX_FILE).read_text())
    index["weight_map"] = {k: v for k, v in index["weight_map"].items() if v != victim.name}
    (sharded / INDEX_FILE).write_text(json.dumps(index))
    with pytest.raises(TunerInputError, match="the weights lack .* tensors the model needs"):
        source = open_model(sharded)
        source.check_names(source.empty_model())
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_sharded_checkpoint_is_served_by_vllm(tiny, tmp_path):
    from signround_vllm.checkpoint import write_dequantized_copy
    from tests.test_vllm_plugin import assert_same_greedy_as

    ckpt = quantize_checkpoint(tiny, tmp_path / "ckpt", CONFIG, max_shard_bytes=50_000).out_dir
    assert len(list(ckpt.glob("model-*.safetensors"))) > 3
    assert_same_greedy_as(ckpt, write_dequantized_copy(ckpt, tmp_path / "deq"))
