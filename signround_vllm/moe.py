"""Packed experts of a vLLM mixture-of-experts layer (`RoutedExperts`).

Each expert's projections are stored as ordinary packed layers under the names vLLM's model loaders
read (`...experts.E.gate_proj.qweight`, Mixtral's `...experts.E.w1.qweight`). Here they become the
fused per-layer tensors vLLM's expert weight loaders fill: `w13_*` (gate and up, one after the other
along the output) and `w2_*` (down), each [experts, *packed shape], in the packed layout's
input-first orientation (`is_transposed`, as GPTQ's). vLLM fuses every expert of a layer, so all of
them must share one setting for gate/up and one for down; a checkpoint that breaks this is refused.

Serving: no packed MoE kernel is built yet, so the experts are dequantized once at load into the
activation dtype and run by vLLM's own unquantized MoE kernels (logged; memory as the bf16 model).
"""
from __future__ import annotations

import torch
from vllm.logger import init_logger
from vllm.model_executor.layers.fused_moe.routed_experts import FusedMoeWeightScaleSupported
from vllm.model_executor.layers.fused_moe.unquantized_fused_moe_method import UnquantizedFusedMoEMethod
from vllm.model_executor.utils import set_weight_attrs

from signround_vllm.format import (
    QWEIGHT, QZEROS, SCALES, LayerQuantSpec, PackedLinear, SignRoundConfig, SignRoundFormatError,
    dequantize_packed, packed_tensor_specs,
)

logger = init_logger("vllm.signround")

# Checkpoint names of one expert's projections that vLLM's model loaders map onto w13 (gate, up) and
# w2 (down), by family: Qwen2/3-MoE, DeepSeek and most others; Mixtral.
EXPERT_NAMINGS = (("gate_proj", "up_proj", "down_proj"), ("w1", "w3", "w2"))
SHARD_ROLES = {"w1": "gate (w1)", "w3": "up (w3)", "w2": "down (w2)"}  # vLLM's shard ids


def expert_specs(config: SignRoundConfig, prefix: str, num_experts: int
                 ) -> tuple[LayerQuantSpec | None, LayerQuantSpec | None]:
    """The settings of a MoE layer's fused gate/up (w13) and down (w2) tensors; refused unless every
    expert agrees (vLLM runs all experts of a layer as one fused tensor)."""
    named = list(config.layer_overrides) + list(config.modules_to_not_convert)
    mentioned = [n for n in EXPERT_NAMINGS
                 if any(k.startswith(f"{prefix}.") and k.rsplit(".", 1)[-1] in n for k in named)]
    if len(mentioned) > 1:
        raise ValueError(f"{prefix}: the checkpoint's settings name expert projections of two naming schemes "
                         f"{mentioned}; one layer's experts use one")
    gate, up, down = mentioned[0] if mentioned else EXPERT_NAMINGS[0]
    result = []
    for role, projections in (("gate/up (w13)", (gate, up)), ("down (w2)", (down,))):
        specs = {f"{prefix}.{e}.{p}": config.spec_for(f"{prefix}.{e}.{p}")
                 for e in range(num_experts) for p in projections}
        distinct = set(specs.values())
        if len(distinct) > 1:
            examples = {}
            for name, spec in specs.items():
                examples.setdefault(spec, name)
            detail = ", ".join(f"{n}: {s.short_name() if s else 'unquantized'}" for s, n in examples.items())
            raise ValueError(f"{prefix}: vLLM fuses the {role} projections of all {num_experts} experts into one "
                             f"tensor, so they need the same quantization settings; the checkpoint has {detail}")
        result.append(distinct.pop())
    return result[0], result[1]


class SignRoundMoEMethod(UnquantizedFusedMoEMethod):
    """Loads packed experts; serves them dequantized through vLLM's unquantized MoE kernels."""

    def __init__(self, moe, w13_spec: LayerQuantSpec, w2_spec: LayerQuantSpec, prefix: str):
        super().__init__(moe)
        self.specs = {"w13": w13_spec, "w2": w2_spec}
        self.prefix = prefix

    def create_weights(self, layer, num_experts: int, hidden_size: int, intermediate_size_per_partition: int,
                       params_dtype: torch.dtype, **extra_weight_attrs):
        if self.moe.has_bias:
            raise ValueError(f"{self.prefix}: experts with biases are not supported by the signround method")
        inter = intermediate_size_per_partition
        full_inter = self.moe.intermediate_size_per_partition_unpadded
        tp_note = "" if self.moe.moe_parallel_config.tp_size == 1 else " per tensor-parallel rank"
        geometry = {"w13": (hidden_size, 2 * inter if self.moe.is_act_and_mul else inter),
                    "w2": (inter, hidden_size)}
        self.geometry = geometry
        self.loaded: set[tuple[str, str, int]] = set()  # (tensor, shard id, expert id) as loaded
        attrs = dict(extra_weight_attrs, weight_loader=self._checked_loader(extra_weight_attrs["weight_loader"]))
        for stem, (k, n) in geometry.items():
            spec = self.specs[stem]
            if stem == "w2" and spec.group_size == -1 and self.moe.moe_parallel_config.tp_size > 1:
                raise ValueError(f"{self.prefix}: per-channel (group_size -1) down projections cannot be split "
                                 f"across tensor-parallel ranks; quantize the experts with a group size")
            try:
                shapes = packed_tensor_specs(k, n, spec, f"{self.prefix} {stem}{tp_note} (intermediate {full_inter})")
            except SignRoundFormatError as e:
                raise ValueError(f"cannot load {self.prefix} with {spec.short_name()}: {e}") from None
            for suffix, (shape, dtype) in shapes.items():
                param = torch.nn.Parameter(torch.empty(num_experts, *shape, dtype=dtype), requires_grad=False)
                layer.register_parameter(f"{stem}_{suffix}", param)
                set_weight_attrs(param, attrs)
                set_weight_attrs(param, {"is_transposed": True,
                                         "quant_method": FusedMoeWeightScaleSupported.GROUP.value})
        self.act_dtype = params_dtype

    def _checked_loader(self, loader):
        """vLLM's expert weight loader, with errors that name the expert and tensor, and a record of what
        was loaded (a missing expert is refused after loading instead of served from uninitialized memory)."""

        def load(param, loaded_weight, weight_name, *args, **kwargs):
            shard_id = kwargs.get("shard_id", args[0] if args else None)
            expert_id = kwargs.get("expert_id", args[1] if len(args) > 1 else None)
            tensor = weight_name.rsplit(".", 1)[-1]
            where = f"{self.prefix}: expert {expert_id}, {SHARD_ROLES.get(shard_id, shard_id)} {tensor}"
            if loaded_weight.dtype != param.dtype:
                raise ValueError(f"{where}: checkpoint tensor has dtype {loaded_weight.dtype}, the SignRound "
                                 f"format stores {param.dtype}")
            try:
                result = loader(param, loaded_weight, weight_name, *args, **kwargs)
            except (AssertionError, RuntimeError, IndexError) as e:
                raise ValueError(f"{where}: checkpoint tensor of shape {tuple(loaded_weight.shape)} does not fit "
                                 f"this layer's {tuple(param.shape[1:])} per expert: {e or type(e).__name__}") from None
            if result is not False:
                self.loaded.add((tensor, shard_id, expert_id))
            return result

        return load

    def _check_every_expert_loaded(self, layer) -> None:
        local = getattr(layer, f"w13_{QWEIGHT}").shape[0]
        missing = []
        for stem, shards in (("w13", ("w1", "w3")), ("w2", ("w2",))):
            for suffix in (QWEIGHT, SCALES, QZEROS):
                if not hasattr(layer, f"{stem}_{suffix}"):
                    continue
                for shard in shards:
                    experts = {e for t, s, e in self.loaded if t == f"{stem}_{suffix}" and s == shard}
                    if len(experts) < local:
                        absent = sorted(set(range(local)) - experts) if local == layer.global_num_experts else []
                        missing.append(f"{SHARD_ROLES[shard]} {suffix} of experts "
                                       f"{absent[:8] or f'({len(experts)} of {local} loaded)'}")
        if missing:
            raise ValueError(f"{self.prefix}: the checkpoint lacks expert tensors: {'; '.join(missing[:4])}")

    def process_weights_after_loading(self, layer) -> None:
        self._check_every_expert_loaded(layer)
        for stem, (k, n) in self.geometry.items():
            spec = self.specs[stem]
            qweight, scales = getattr(layer, f"{stem}_{QWEIGHT}"), getattr(layer, f"{stem}_{SCALES}")
            qzeros = getattr(layer, f"{stem}_{QZEROS}", None)
            dense = torch.empty(qweight.shape[0], n, k, dtype=self.act_dtype, device=qweight.device)
            for e in range(qweight.shape[0]):
                packed = PackedLinear(qweight.data[e], scales.data[e], None if qzeros is None else qzeros.data[e], spec)
                dense[e] = dequantize_packed(packed, self.act_dtype)
            for suffix in (QWEIGHT, SCALES, QZEROS):
                if hasattr(layer, f"{stem}_{suffix}"):
                    delattr(layer, f"{stem}_{suffix}")
            layer.register_parameter(f"{stem}_weight", torch.nn.Parameter(dense, requires_grad=False))
        logger.info_once("signround: mixture-of-experts layers are served as %s weights dequantized at load "
                         "through vLLM's unquantized MoE kernels (no packed MoE kernel on this platform yet; "
                         "expert memory as the unquantized model)", str(self.act_dtype).removeprefix("torch."))
        super().process_weights_after_loading(layer)


def moe_method(config: SignRoundConfig, layer, prefix: str):
    """The method for a vLLM MoE layer: packed experts, or vLLM's own when the checkpoint keeps them dense."""
    w13, w2 = expert_specs(config, prefix, layer.global_num_experts)
    if (w13 is None) != (w2 is None):
        raise ValueError(f"{prefix}: the checkpoint keeps the experts' "
                         f"{'gate/up' if w13 is None else 'down'} projections unquantized but not the others; "
                         f"the signround method serves experts quantized together or kept together")
    if w13 is None:
        return UnquantizedFusedMoEMethod(layer.moe_config)
    return SignRoundMoEMethod(layer.moe_config, w13, w2, prefix)

