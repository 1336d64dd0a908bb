"""Mixture-of-experts models: experts found and stored per expert under the checkpoint's own names,
routers kept dense, settings uniform where vLLM fuses, and the packed experts served by vLLM as
their own dequantized weights (tiny random Qwen3-MoE, Mixtral and Qwen2-MoE with a shared expert)."""
import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from offline_tuner.default_model import make_tiny_model, prepare_default_model
from offline_tuner.errors import TunerInputError
from offline_tuner.model_source import open_model
from offline_tuner.quantize import Calibration, load_causal_lm, quantize_checkpoint
from offline_tuner.signround import TuneSettings
from signround_vllm.checkpoint import dequantized_state_dict, write_dequantized_copy
from signround_vllm.format import LayerQuantSpec, SignRoundConfig

EXPERTS = 4
TOP_K = 2
TUNE = TuneSettings(iters=24, batch_size=2, seed=1)
# family -> (stored name of expert E's gate, up and down projections in layer L, router modules of layer L)
NAMES = {
    "qwen3_moe": ("model.layers.{L}.mlp.experts.{E}.{p}", ("gate_proj", "up_proj", "down_proj"),
                  ["model.layers.{L}.mlp.gate"]),
    "mixtral": ("model.layers.{L}.block_sparse_moe.experts.{E}.{p}", ("w1", "w3", "w2"),
                ["model.layers.{L}.block_sparse_moe.gate"]),
    "qwen2_moe": ("model.layers.{L}.mlp.experts.{E}.{p}", ("gate_proj", "up_proj", "down_proj"),
                  ["model.layers.{L}.mlp.gate", "model.layers.{L}.mlp.shared_expert_gate"]),
}


@pytest.fixture(scope="module")
def moe_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("moe")
    tokenizer = prepare_default_model()  # SmolLM2's, for calibration text
    return {f: make_tiny_model(root / f, seed=3, family=f, tokenizer_from=tokenizer) for f in NAMES}


def expert_name(family, layer, expert, which):
    pattern, projections, _ = NAMES[family]
    return pattern.format(L=layer, E=expert, p=projections[which])


@pytest.mark.parametrize("family", sorted(NAMES))
def test_fused_expert_parameters_are_read_from_their_stored_pieces(family, moe_models):
    """transformers 5 fuses the stored per-expert weights into [experts, out, in] parameters; the
    stored layout found by running its conversion rules backwards reassembles them exactly."""
    source = open_model(moe_models[family])
    model = source.empty_model()
    layout = source.check_names(model)
    loaded = load_causal_lm(moe_models[family])
    gate_up = "model.layers.1.mlp.experts.gate_up_proj"
    pieces = layout.pieces[gate_up]
    assert [p.stored for p in pieces[:2]] == [expert_name(family, 1, 0, 0) + ".weight",
                                              expert_name(family, 1, 0, 1) + ".weight"]
    assert len(pieces) == 2 * EXPERTS and all(p.rows == pieces[0].rows for p in pieces)
    for name in (gate_up, "model.layers.1.mlp.experts.down_proj", "model.layers.0.mlp.gate.weight"):
        assert torch.equal(source.read_param(name, model), loaded.get_parameter(name).data), name


@pytest.mark.parametrize("family,spec", [("qwen3_moe", LayerQuantSpec(2, 32, False)),
                                         ("mixtral", LayerQuantSpec(3, 64, True)),
                                         ("qwen2_moe", LayerQuantSpec(8, -1, False))], ids=str)
def test_round_to_nearest_packs_every_expert_and_keeps_routers_dense(family, spec, moe_models, tmp_path):
    ckpt = quantize_checkpoint(moe_models[family], tmp_path / "q", SignRoundConfig(default=spec)).out_dir
    config = json.loads((ckpt / "config.json").read_text())["quantization_config"]
    routers = [r.format(L=layer) for layer in range(2) for r in NAMES[family][2]]
    assert sorted(config["modules_to_not_convert"]) == sorted(["lm_head", *routers])
    with safe_open(str(ckpt / "model.safetensors"), "pt") as f:
        names = set(f.keys())
        dense = sorted(n for n in names if n.endswith(".weight") and len(f.get_slice(n).get_shape()) >= 2)
    assert dense == sorted(["model.embed_tokens.weight", *[f"{r}.weight" for r in routers]])
    for layer in range(2):
        for e in range(EXPERTS):
            for which in range(3):
                assert f"{expert_name(family, layer, e, which)}.qweight" in names
    # The stored integers are each expert's own weights rounded to nearest: within half a step (a whole
    # one where the symmetric grid, one level short on one side, clips), plus what storing the scale in
    # float16 moves a weight (at most 2^bits * scale * 2^-11).
    name = expert_name(family, 1, 2, 2)
    scales = load_file(str(ckpt / "model.safetensors"))[name + ".scales"]
    w = load_file(str(moe_models[family] / "model.safetensors"))[name + ".weight"].float()
    step = scales.float().abs().t().repeat_interleave(spec.effective_group_size(w.shape[1]), dim=1)
    error = (dequantized_state_dict(ckpt, torch.float32)[name + ".weight"] - w).abs()
    assert (error <= step * ((1.0 if spec.sym else 0.5) + 2 ** spec.bits / 2048)).all()


def test_experts_of_a_layer_must_share_settings_but_gate_up_and_down_may_differ(moe_models, tmp_path):
    model_dir = moe_models["qwen3_moe"]
    one_expert = {expert_name("qwen3_moe", 0, 1, 0): LayerQuantSpec(8, 32, False)}
    with pytest.raises(TunerInputError, match=r"model\.layers\.0\.mlp\.experts\.gate_up_proj holds 8 stored weights "
                                              r"that vLLM loads as one fused tensor.*W8G32asym.*W4G32asym"):
        quantize_checkpoint(model_dir, tmp_path / "bad", SignRoundConfig(default=LayerQuantSpec(4, 32, False),
                                                                         layer_overrides=one_expert))
    assert not (tmp_path / "bad").exists()
    every_down = {expert_name("qwen3_moe", 0, e, 2): LayerQuantSpec(8, 32, False) for e in range(EXPERTS)}
    ckpt = quantize_checkpoint(model_dir, tmp_path / "ok", SignRoundConfig(default=LayerQuantSpec(4, 32, False),
                                                                         layer_overrides=every_down)).out_dir
    assert sorted(json.loads((ckpt / "config.json").read_text())["quantization_config"]["layer_overrides"]) == \
        sorted(every_down)


def test_plugin_settings_check_names_the_layer():
    from signround_vllm.moe import expert_specs

    prefix = "model.layers.3.block_sparse_moe.experts"
    base = LayerQuantSpec(4, 32, False)
    uniform = SignRoundConfig(default=base, layer_overrides={f"{prefix}.{e}.w2": LayerQuantSpec(8, 32, False)
                                                             for e in range(EXPERTS)})
    assert expert_specs(uniform, prefix, EXPERTS) == (base, LayerQuantSpec(8, 32, False))
    broken = SignRoundConfig(default=base, layer_overrides={f"{prefix}.2.w3": LayerQuantSpec(2, 32, False)})
    with pytest.raises(ValueError, match=r"model\.layers\.3\.block_sparse_moe\.experts: vLLM fuses the gate/up"):
        expert_specs(broken, prefix, EXPERTS)
    kept = SignRoundConfig(default=base, modules_to_not_convert=("lm_head", "experts"))
    assert expert_specs(kept, prefix, EXPERTS) == (None, None)


def test_missing_or_misshapen_expert_weight_is_refused_naming_it(moe_models, tmp_path):
    import shutil

    for case in ("missing", "shape"):
        broken = tmp_path / case
        shutil.copytree(moe_models["mixtral"], broken)
        tensors = load_file(str(broken / "model.safetensors"))
        name = expert_name("mixtral", 1, 3, 2) + ".weight"
        if case == "missing":
            del tensors[name]
        else:
            tensors[name] = tensors[name][:, :64].contiguous()
        save_file(tensors, str(broken / "model.safetensors"), metadata={"format": "pt"})
        with pytest.raises(TunerInputError, match=name.replace(".", r"\.")):
            quantize_checkpoint(broken, tmp_path / f"out-{case}", SignRoundConfig(default=LayerQuantSpec(4, 32, False)))


@pytest.mark.slow
@pytest.mark.parametrize("family,spec,method", [("qwen3_moe", LayerQuantSpec(4, 32, False), "signround"),
                                                ("mixtral", LayerQuantSpec(3, 64, True), "signround"),
                                                ("qwen2_moe", LayerQuantSpec(2, 32, False), "signround"),
                                                ("qwen3_moe", LayerQuantSpec(8, 64, True), "signround")], ids=str)
def test_served_experts_equal_their_dequantized_weights(family, spec, method, moe_models, tmp_path,
                                                        calibration_text):
    """vLLM through the plugin (packed experts, dequantized once at load) against the same weights
    written as a plain bf16 model; down projections at 8 bits while gate/up are not, for one family."""
    from tests.test_vllm_plugin import assert_same_greedy_as

    overrides = {}
    if family == "qwen3_moe" and spec.bits == 4:
        overrides = {expert_name(family, 1, e, 2): LayerQuantSpec(8, 32, False) for e in range(EXPERTS)}
    tune = TUNE if method == "signround" else None
    ckpt = quantize_checkpoint(moe_models[family], tmp_path / "q",
                               SignRoundConfig(default=spec, layer_overrides=overrides), tune=tune,
                               calibration=Calibration(4, 64, str(calibration_text))).out_dir
    assert json.loads((ckpt / "config.json").read_text())["quantization_config"]["tuner"]["method"] == method
    out = None
    if family == "qwen3_moe" and spec.bits == 4:  # one engine with vLLM's torch.compile on, as `vllm serve` runs
        from tests.test_vllm_plugin import MAX_TOKENS, PROMPTS
        from tests.vllm_utils import greedy_tokens_and_logprobs, run_on

        out = run_on(ckpt, lambda llm: greedy_tokens_and_logprobs(llm, PROMPTS, MAX_TOKENS), enforce_eager=False)
    assert_same_greedy_as(ckpt, write_dequantized_copy(ckpt, tmp_path / "deq"), out=out)


def _expert_tensors(ckpt, family, layer, expert) -> dict[str, torch.Tensor]:
    tensors = load_file(str(ckpt / "model.safetensors"))
    prefix = expert_name(family, layer, expert, 0).rsplit(".", 1)[0] + "."
    return {k: v for k, v in tensors.items() if k.startswith(prefix)}


@pytest.mark.parametrize("family,spec", [("qwen3_moe", LayerQuantSpec(2, 32, False)),
                                         ("mixtral", LayerQuantSpec(3, 32, True)),
                                         ("qwen2_moe", LayerQuantSpec(4, 64, False))], ids=str)
def test_experts_are_tuned_through_the_models_routing(family, spec, moe_models, tmp_path, calibration_text):
    """SignRound tunes the experts with the rest of the block: the block's loss falls, the tuned experts'
    integers move away from round-to-nearest, and the run log counts the tokens routed to each expert."""
    calib = Calibration(4, 64, str(calibration_text))
    config = SignRoundConfig(default=spec)
    rtn = quantize_checkpoint(moe_models[family], tmp_path / "rtn", config).out_dir
    result = quantize_checkpoint(moe_models[family], tmp_path / "tuned", config, tune=TUNE, calibration=calib)
    experts_module = expert_name(family, 0, 0, 0).rsplit(".", 2)[0]
    for layer, block in enumerate(result.run_log["blocks"]):
        assert block["tuned_loss"] < 0.7 * block["rtn_loss"], block
        counts = block["expert_tokens"][experts_module.replace("layers.0.", f"layers.{layer}.")]
        assert len(counts) == EXPERTS and sum(counts) == calib.n_samples * calib.seq_len * TOP_K, counts
    for e in range(EXPERTS):
        tuned, plain = _expert_tensors(result.out_dir, family, 1, e), _expert_tensors(rtn, family, 1, e)
        assert tuned.keys() == plain.keys() and len(tuned) == 3 * (2 if spec.sym else 3)
        assert any(not torch.equal(tuned[k], plain[k]) for k in tuned), f"expert {e} left at round-to-nearest"


def test_expert_that_gets_no_calibration_tokens_keeps_round_to_nearest(moe_models, tmp_path, calibration_text,
                                                                       monkeypatch):
    """A router that never picks expert 2: the run log says it got no tokens, and its stored integers are
    round-to-nearest's bit for bit while the other experts are tuned."""
    from transformers.models.qwen3_moe import modeling_qwen3_moe

    def router_avoiding_expert_2(self, hidden_states):
        logits = torch.nn.functional.linear(hidden_states.reshape(-1, self.hidden_dim), self.weight)
        logits[:, 2] = float("-inf")
        probs = torch.softmax(logits, dtype=torch.float, dim=-1)
        top, index = torch.topk(probs, self.top_k, dim=-1)
        top = top / top.sum(dim=-1, keepdim=True) if self.norm_topk_prob else top
        return logits, top.to(logits.dtype), index

    monkeypatch.setattr(modeling_qwen3_moe.Qwen3MoeTopKRouter, "forward", router_avoiding_expert_2)
    config = SignRoundConfig(default=LayerQuantSpec(4, 32, False))
    rtn = quantize_checkpoint(moe_models["qwen3_moe"], tmp_path / "rtn", config).out_dir
    messages = []
    result = quantize_checkpoint(moe_models["qwen3_moe"], tmp_path / "tuned", config, tune=TUNE,
                                 calibration=Calibration(4, 64, str(calibration_text)), progress=messages.append)
    for layer in range(2):
        counts = result.run_log["blocks"][layer]["expert_tokens"][f"model.layers.{layer}.mlp.experts"]
        assert counts[2] == 0 and min(counts[:2] + counts[3:]) > 0, counts
        assert any(f"model.layers.{layer}.mlp.experts: experts [2] got no calibration tokens" in m for m in messages)
        idle, idle_rtn = (_expert_tensors(c, "qwen3_moe", layer, 2) for c in (result.out_dir, rtn))
        assert all(torch.equal(idle[k], idle_rtn[k]) for k in idle)
        busy, busy_rtn = (_expert_tensors(c, "qwen3_moe", layer, 0) for c in (result.out_dir, rtn))
        assert any(not torch.equal(busy[k], busy_rtn[k]) for k in busy)


@pytest.mark.slow
def test_checkpoint_with_a_missing_expert_is_refused_at_load(moe_models, tmp_path):
    import shutil

    from tests.vllm_utils import make_llm

    ckpt = quantize_checkpoint(moe_models["qwen3_moe"], tmp_path / "q",
                               SignRoundConfig(default=LayerQuantSpec(4, 32, False))).out_dir
    broken = tmp_path / "broken"
    shutil.copytree(ckpt, broken)
    tensors = load_file(str(broken / "model.safetensors"))
    for suffix in ("qweight", "scales", "qzeros"):
        del tensors[f"{expert_name('qwen3_moe', 1, 2, 1)}.{suffix}"]
    save_file(tensors, str(broken / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"model\.layers\.1\.mlp\.experts: the checkpoint lacks expert tensors: "
                                         r"up \(w3\) qweight of experts \[2\]"):
        make_llm(broken)


def _random_experts(n_experts, n, k, spec, seed):
    """Packed experts [E, ...] from random integers, scales and zero points, with every fourth group's zero
    point 0 (the value the CPU kernel's zero convention cannot hold directly)."""
    from signround_vllm.format import pack_linear

    gen = torch.Generator().manual_seed(seed)
    g = spec.effective_group_size(k)
    layers = []
    for _ in range(n_experts):
        q = torch.randint(0, 1 << spec.bits, (n, k), generator=gen)
        scale = (torch.rand(n, k // g, generator=gen) + 0.5) * 0.02
        zero = None
        if not spec.sym:
            zero = torch.randint(0, 1 << spec.bits, (n, k // g), generator=gen)
            zero[::4] = 0
        layers.append(pack_linear(q, scale, zero, spec))
    stack = lambda ts: None if ts[0] is None else torch.stack(ts)  # noqa: E731
    return layers, (stack([p.qweight for p in layers]), stack([p.scales for p in layers]),
                    stack([p.qzeros for p in layers]))


@pytest.mark.parametrize("spec", [LayerQuantSpec(2, 32, False), LayerQuantSpec(3, 64, True),
                                  LayerQuantSpec(4, 32, False), LayerQuantSpec(4, 128, True)], ids=str)
def test_experts_handed_to_the_cpu_int4_kernel_hold_the_same_weights(spec):
    """The GPTQ-style tensors vLLM's CPU int4 MoE kernel reads, decoded as that kernel does (4-bit fields,
    zero point = stored field + 1), give every expert's dequantized weights exactly."""
    from signround_vllm.format import dequantize_packed, unpack_int_weights
    from signround_vllm.moe import to_cpu_int4_experts

    layers, stacked = _random_experts(3, 96, 256, spec, seed=spec.bits)
    qweight, scales, zeros = to_cpu_int4_experts(*stacked, spec)
    g = spec.effective_group_size(256)
    assert qweight.shape == (3, 256 // 8, 96) and zeros.shape == (3, 256 // g, 96 // 8) and zeros.dtype == torch.int32
    for e, layer in enumerate(layers):
        q = unpack_int_weights(qweight[e], 4).float()  # [K, N]
        z = unpack_int_weights(zeros[e].t().contiguous(), 4).t().float() + 1  # [K // G, N]
        w = (q - z.repeat_interleave(g, dim=0)) * scales[e].float().repeat_interleave(g, dim=0)
        assert torch.equal(w.t(), dequantize_packed(layer, torch.float32)), f"expert {e}"


def _amx() -> bool:
    """What vLLM's CPU int4 MoE kernel needs (x86 with AMX tiles); asked of torch, since importing vLLM at
    collection would import triton before the interpreter tests can set TRITON_INTERPRET."""
    import platform

    return platform.machine() in ("x86_64", "AMD64") and torch.cpu._is_amx_tile_supported()


@pytest.mark.skipif(not _amx(), reason="vLLM's CPU int4 MoE kernel needs an x86 CPU with AMX")
@pytest.mark.parametrize("spec", [LayerQuantSpec(2, 32, False), LayerQuantSpec(3, 64, True),
                                  LayerQuantSpec(4, 64, False)], ids=str)
def test_cpu_int4_kernel_computes_the_dequantized_experts(spec):
    """vLLM's kernel on the converted experts against a per-expert pure-torch reference on the dequantized
    weights; the kernel quantizes activations to int8 per token (W4A8), hence the tolerance."""
    from vllm import _custom_ops as ops
    from vllm.model_executor.layers.fused_moe.experts.cpu_moe import prepare_int4_moe_layer_for_cpu

    from signround_vllm.format import dequantize_packed
    from signround_vllm.moe import to_cpu_int4_experts

    n_experts, hidden, inter, tokens, top_k = 4, 128, 64, 37, 2
    gate_up, w13 = _random_experts(n_experts, 2 * inter, hidden, spec, seed=1)
    down, w2 = _random_experts(n_experts, hidden, inter, spec, seed=2)
    q13, s13, z13 = to_cpu_int4_experts(*w13, spec)
    q2, s2, z2 = to_cpu_int4_experts(*w2, spec)
    b13, b2, bs13, bs2, bz13, bz2 = prepare_int4_moe_layer_for_cpu(q13, q2, s13, s2, ops.CPUQuantAlgo.GPTQ, z13, z2)
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(tokens, hidden, generator=gen).to(torch.bfloat16)
    ids = torch.randint(0, n_experts - 1, (tokens, top_k), generator=gen).to(torch.int32)  # the last expert idle
    weights = torch.softmax(torch.randn(tokens, top_k, generator=gen), dim=-1)
    out = torch.empty_like(x)
    ops.fused_experts_cpu(out, x, b13, b2, weights, ids, ops.CPUQuantMethod.INT4_W4A8, bs13, bs2, bz13, bz2,
                          None, None, None, None, None, True)
    ref = torch.zeros(tokens, hidden)
    for t in range(tokens):
        for j in range(top_k):
            e = int(ids[t, j])
            h = x[t].float() @ dequantize_packed(gate_up[e]).t()
            h = torch.nn.functional.silu(h[:inter]) * h[inter:]
            ref[t] += weights[t, j] * (h @ dequantize_packed(down[e]).t())
    assert torch.isfinite(out).all()
    assert (out.float() - ref).norm() / ref.norm() < 0.03


def test_expert_kernel_choice_and_forcing(monkeypatch):
    """vLLM's CPU int4 experts where they fit, dense (dequantized) otherwise with the reason, and the one
    forcing setting; a linear-only kernel name leaves expert layers to choose as usual."""
    from types import SimpleNamespace

    from vllm.model_executor.layers.fused_moe.activation import MoEActivation
    from vllm.model_executor.layers.fused_moe.experts import cpu_moe

    from signround_vllm.moe import SignRoundMoEMethod, cpu_int4_experts_usable

    moe = SimpleNamespace(activation=MoEActivation.SILU, is_act_and_mul=True, hidden_dim=128,
                          intermediate_size_per_partition=64, moe_parallel_config=SimpleNamespace(use_ep=False))
    w4, w8 = LayerQuantSpec(4, 32, False), LayerQuantSpec(8, 32, False)
    monkeypatch.setattr(cpu_moe.CPUExpertsInt4, "_supports_current_device", staticmethod(lambda: True))
    groups = {"w13": 32, "w2": 32}
    assert cpu_int4_experts_usable(moe, {"w13": w4, "w2": w4}, groups) == (True, None)
    assert "at most 4 bits (w2 8-bit)" in cpu_int4_experts_usable(moe, {"w13": w4, "w2": w8}, groups)[1]
    assert "one group size" in cpu_int4_experts_usable(moe, {"w13": w4, "w2": w4}, {"w13": 32, "w2": 64})[1]
    moe.moe_parallel_config.use_ep = True
    assert "expert parallelism" in cpu_int4_experts_usable(moe, {"w13": w4, "w2": w4}, groups)[1]
    moe.moe_parallel_config.use_ep = False
    monkeypatch.setenv("VLLM_CPU_INT4_W4A8", "0")
    assert "asks for no W4A8" in cpu_int4_experts_usable(moe, {"w13": w4, "w2": w4}, groups)[1]
    monkeypatch.delenv("VLLM_CPU_INT4_W4A8")
    monkeypatch.setattr(cpu_moe.CPUExpertsInt4, "_supports_current_device", staticmethod(lambda: False))
    assert cpu_int4_experts_usable(moe, {"w13": w4, "w2": w4}, groups) == (False, "needs an x86 CPU with AMX")

    monkeypatch.setattr(SignRoundMoEMethod, "__init__", lambda self: None)
    method = SignRoundMoEMethod()
    method.moe, method.specs, method.groups, method.prefix = moe, {"w13": w4, "w2": w4}, groups, "model.layers.0.mlp.experts"
    assert method._choose_kernel(None) == "dense"
    assert method._choose_kernel("cpu_int4") == "dense"  # a linear kernel's name: experts choose as usual
    with pytest.raises(ValueError, match=r"SIGNROUND_KERNEL=vllm_cpu_int4 cannot serve these experts: vllm_cpu_int4: needs an x86"):
        method._choose_kernel("vllm_cpu_int4")
    monkeypatch.setattr(cpu_moe.CPUExpertsInt4, "_supports_current_device", staticmethod(lambda: True))
    assert method._choose_kernel(None) == "vllm_cpu_int4"
    assert method._choose_kernel("dense") == "dense"


def test_compressed_tensors_export_of_experts_is_refused(moe_models, tmp_path):
    from offline_tuner.export import ExportError, export_checkpoint

    ckpt = quantize_checkpoint(moe_models["mixtral"], tmp_path / "q",
                               SignRoundConfig(default=LayerQuantSpec(4, 32, False))).out_dir
    with pytest.raises(ExportError, match=r"mixture-of-experts layers \(model\.layers\.0\.block_sparse_moe\.experts\.0"
                                          r"\.w1, .*not built yet"):
        export_checkpoint(ckpt, tmp_path / "out", "compressed-tensors")
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
@pytest.mark.skipif(not _amx(), reason="vLLM serves GPTQ/AWQ experts on CPU only with AMX (its CPU int4 MoE kernel)")
@pytest.mark.parametrize("fmt,family,spec", [("gptq", "mixtral", LayerQuantSpec(4, 64, True)),
                                             ("awq", "qwen3_moe", LayerQuantSpec(4, 32, False))], ids=str)
def test_gptq_and_awq_exports_of_experts_are_served_by_vllms_own_methods(fmt, family, spec, moe_models, tmp_path):
    """The exported experts, loaded by vLLM's own gptq / awq MoE methods, give the SignRound checkpoint's tokens."""
    from offline_tuner.export import export_checkpoint
    from tests.test_vllm_plugin import MAX_TOKENS, PROMPTS, assert_same_greedy_as
    from tests.vllm_utils import greedy_tokens_and_logprobs, run_on

    ckpt = quantize_checkpoint(moe_models[family], tmp_path / "q", SignRoundConfig(default=spec)).out_dir
    out = export_checkpoint(ckpt, tmp_path / fmt, fmt)
    assert {k for k in load_file(str(out / "model.safetensors")) if ".experts.3." in k and "layers.1." in k} == {
        f"{expert_name(family, 1, 3, w)}.{t}" for w in range(3)
        for t in ("qweight", "qzeros", "scales", *(("g_idx",) if fmt == "gptq" else ()))}
    served = run_on(out, lambda llm: greedy_tokens_and_logprobs(llm, PROMPTS, MAX_TOKENS))
    assert_same_greedy_as(out, ckpt, out=served)


TRITON_MOE_SCRIPT = r"""
import json, sys
from tests.vllm_utils import greedy_tokens_and_logprobs, make_llm
import signround_triton.fused_moe as kernel

launches = 0
launch = kernel.launch_fused_experts


def counted_launch(*args, **kwargs):
    global launches
    launches += 1
    return launch(*args, **kwargs)


kernel.launch_fused_experts = counted_launch  # the registered operator looks it up on every call
if __name__ == "__main__":
    path, prompts, n = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3])
    llm = make_llm(path)  # eager: the operator's capture by torch.compile is tested in tests/test_triton_moe.py
    out = greedy_tokens_and_logprobs(llm, prompts, n)
    print("LAUNCHES=" + json.dumps(launches), flush=True)
    print("TOKENS=" + json.dumps(out), flush=True)
"""


@pytest.mark.slow
def test_engine_serves_experts_through_the_triton_moe_operator(moe_models, tmp_path):
    """vLLM with the Triton kernels forced (in the interpreter), on a model with a shared expert and 3-bit
    routed experts: every MoE layer calls `signround::fused_experts`, and the tokens are those of the
    dequantized weights."""
    import os
    import sys
    from pathlib import Path

    from tests.test_vllm_plugin import MAX_TOKENS, PROMPTS, assert_same_greedy_as
    from tests.vllm_utils import run_reporting_script

    ckpt = quantize_checkpoint(moe_models["qwen2_moe"], tmp_path / "q",
                               SignRoundConfig(default=LayerQuantSpec(3, 32, False))).out_dir
    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, TRITON_INTERPRET="1", SIGNROUND_KERNEL="triton", PYTHONPATH=str(root))
    script = tmp_path / "moe.py"
    script.write_text(TRITON_MOE_SCRIPT)
    prompts, tokens = PROMPTS[:2], MAX_TOKENS // 2  # the interpreter is slow: two prompts, fewer tokens
    found, proc = run_reporting_script([sys.executable, str(script), str(ckpt), json.dumps(prompts),
                                        str(tokens)], ("LAUNCHES", "TOKENS"), env, timeout=1200)
    log = proc.stdout + proc.stderr
    assert "use kernel 'triton' = packed experts through torch.ops.signround.fused_experts (forced by " \
           "SIGNROUND_KERNEL=triton)" in log, log[-4000:]
    assert found["LAUNCHES"] >= 2 * tokens, found["LAUNCHES"]  # two MoE layers, every forward step
    assert_same_greedy_as(ckpt, write_dequantized_copy(ckpt, tmp_path / "deq"), out=found["TOKENS"])


@pytest.mark.slow
def test_experts_split_across_two_tensor_parallel_ranks(moe_models, tmp_path):
    """Each rank loads half of every expert's intermediate size (gate/up split along their outputs, down
    along its packed input rows and groups): TP=2 on CPU serves the dequantized weights' tokens."""
    from tests.test_vllm_plugin import assert_same_greedy_as, greedy_with_tensor_parallel_2

    ckpt = quantize_checkpoint(moe_models["qwen2_moe"], tmp_path / "q",
                               SignRoundConfig(default=LayerQuantSpec(3, 32, True))).out_dir
    assert_same_greedy_as(ckpt, write_dequantized_copy(ckpt, tmp_path / "deq"),
                          out=greedy_with_tensor_parallel_2(ckpt, tmp_path))
