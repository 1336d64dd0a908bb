"""Packed experts of a vLLM mixture-of-experts layer (`RoutedExperts`).

Each expert's projections are stored as ordinary packed layers under the names vLLM's model loaders
read (`...experts.E.gate_proj.qweight`, Mixtral's `...experts.E.w1.qweight`). Here they become the
fused per-layer tensors vLLM's expert weight loaders fill: `w13_*` (gate and up, one after the other
along the output) and `w2_*` (down), each [experts, *packed shape], in the packed layout's
input-first orientation (`is_transposed`, as GPTQ's). vLLM fuses every expert of a layer, so all of
them must share one setting for gate/up and one for down; a checkpoint that breaks this is refused.

Serving, one of these kernels per layer, the first of its device's `MOE_ORDER` that can serve it, or the
one forced by the `SIGNROUND_KERNEL` setting when it names one of them:
  `triton`         our Triton fused-MoE kernel (`torch.ops.signround.fused_experts`), reading the packed
                   experts directly at every bit width: CUDA (on CPU only inside Triton's interpreter,
                   for tests).
  `vllm_cpu_int4`  vLLM's own int4 MoE kernel for x86 CPUs with AMX (`CPUExpertsInt4`; W4A8: it
                   quantizes activations to int8 per token, so results differ from the dequantized
                   weights by that rounding, about 1% of the output). 2- and 3-bit experts go in 4-bit
                   containers. The integers are handed over exactly (see `to_cpu_int4_experts`).
  `dense`          every expert dequantized once at load into the activation dtype and run by vLLM's
                   unquantized MoE kernels (exact; memory as the unquantized model).
"""
from __future__ import annotations

import os

import torch
from vllm.logger import init_logger
from vllm.model_executor.layers.fused_moe.routed_experts import FusedMoeWeightScaleSupported
from vllm.model_executor.layers.fused_moe.unquantized_fused_moe_method import UnquantizedFusedMoEMethod
from vllm.model_executor.utils import set_weight_attrs

from signround_vllm import cpu_int4
from signround_vllm.format import (
    QWEIGHT, QZEROS, SCALES, LayerQuantSpec, PackedLinear, SignRoundConfig, SignRoundFormatError,
    dequantize_packed, pack_int_weights, packed_tensor_specs, unpack_int_weights,
)
from signround_vllm.kernels import FORCE_SETTING, MOE_KERNELS, MOE_ORDER, W4A8_SETTING

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


def cpu_int4_experts_usable(moe, specs: dict[str, LayerQuantSpec], groups: dict[str, int]
                            ) -> tuple[bool, str | None]:
    """Whether vLLM's CPU int4 MoE kernel can serve a layer with these settings, and why not."""
    from vllm.model_executor.layers.fused_moe.activation import MoEActivation
    from vllm.model_executor.layers.fused_moe.experts.cpu_moe import CPUExpertsInt4

    if not CPUExpertsInt4._supports_current_device():
        return False, "needs an x86 CPU with AMX"
    if os.environ.get(W4A8_SETTING) == "0":
        return False, f"{W4A8_SETTING}=0 asks for no W4A8, and this kernel is W4A8 only"
    wide = [f"{stem} {spec.bits}-bit" for stem, spec in specs.items() if spec.bits > 4]
    if wide:
        return False, f"takes at most 4 bits ({', '.join(wide)})"
    if groups["w13"] != groups["w2"]:
        return False, (f"takes one group size for gate/up and down (this layer: {groups['w13']} and "
                       f"{groups['w2']})")
    if moe.activation != MoEActivation.SILU or not moe.is_act_and_mul:
        return False, f"takes SiLU-and-multiply experts only (this layer: {moe.activation})"
    if moe.moe_parallel_config.use_ep:
        return False, "does not take expert parallelism"
    return True, None


def triton_experts_usable(moe, act_dtype: torch.dtype, device_type: str) -> tuple[bool, str | None]:
    """Whether our Triton fused-MoE kernel can serve a layer, and why not."""
    from vllm.model_executor.layers.fused_moe.activation import MoEActivation

    try:
        from signround_triton import fused_moe
    except ImportError as e:
        return False, f"signround_triton.fused_moe is not importable ({e})"
    if device_type == "cpu" and not fused_moe.is_interpreted():
        return False, "Triton runs on CPU tensors only in its interpreter (TRITON_INTERPRET=1 set before triton is imported)"
    if device_type not in ("cpu", "cuda"):
        return False, f"needs a CUDA device (this one is {device_type})"
    if act_dtype not in (torch.float16, torch.bfloat16):
        return False, f"activation dtype {act_dtype} (supported: float16, bfloat16)"
    if moe.activation != MoEActivation.SILU or not moe.is_act_and_mul:
        return False, f"takes SiLU-and-multiply experts only (this layer: {moe.activation})"
    if moe.moe_parallel_config.use_ep:
        return False, "does not take expert parallelism yet"
    return True, None


def to_cpu_int4_experts(qweight: torch.Tensor, scales: torch.Tensor, qzeros: torch.Tensor | None,
                        spec: LayerQuantSpec) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Stacked experts [E, ...] of the packed format -> the GPTQ-style input of vLLM's CPU int4 MoE kernel:
    int32 [E, K // 8, N] (4-bit integers along K), scales [E, K // G, N], int32 zeros [E, K // G, N // 8]
    (per group, the N zero points minus one as 4-bit fields along N; the kernel adds the one back).

    Exact: 2- and 3-bit integers keep their values in 4-bit fields. A zero point of 0 cannot be stored
    that way (0 - 1 wraps to 15, read as 16), so such a group is mirrored: q -> 15 - q, zero 15, scale -s,
    which gives the same (q - z) * s for every weight.
    """
    n_experts = qweight.shape[0]
    out_q, out_s, out_z = [], [], []
    for e in range(n_experts):
        packed = PackedLinear(qweight[e], scales[e], None if qzeros is None else qzeros[e], spec)
        q = unpack_int_weights(packed.qweight, spec.bits).to(torch.int32)  # [K, N]
        z = packed.zero_points().to(torch.int32)  # [K // G, N]
        s = packed.scales.clone()
        mirrored = z == 0
        rows = mirrored.repeat_interleave(q.shape[0] // z.shape[0], dim=0)
        q = torch.where(rows, 15 - q, q)
        z = torch.where(mirrored, 15, z)
        s = torch.where(mirrored, -s, s)
        out_q.append(pack_int_weights(q, 4))
        out_s.append(s)
        out_z.append(pack_int_weights((z - 1).t().contiguous(), 4).t().contiguous())
    return torch.stack(out_q), torch.stack(out_s), torch.stack(out_z)


_logged: set[tuple] = set()


class SignRoundMoEMethod(UnquantizedFusedMoEMethod):
    """Loads packed experts; serves them through the first kernel of MOE_ORDER that can (see the module doc)."""

    def __init__(self, moe, w13_spec: LayerQuantSpec, w2_spec: LayerQuantSpec, prefix: str,
                 forced_kernel: str | None = None):
        super().__init__(moe)
        self.specs = {"w13": w13_spec, "w2": w2_spec}
        self.prefix = prefix
        inputs = {"w13": moe.hidden_dim, "w2": moe.intermediate_size_per_partition}  # per tensor-parallel rank
        self.groups = {stem: self.specs[stem].effective_group_size(k) for stem, k in inputs.items()}
        self.kernel_name = self._choose_kernel(forced_kernel)

    def _usable(self, name: str) -> tuple[bool, str | None]:
        from vllm.platforms import current_platform

        if name == "vllm_cpu_int4":
            return cpu_int4_experts_usable(self.moe, self.specs, self.groups)
        if name == "triton":
            return triton_experts_usable(self.moe, self.moe.in_dtype, current_platform.device_type)
        return True, None

    def _choose_kernel(self, forced: str | None) -> str:
        from vllm.platforms import current_platform

        if current_platform.device_type == "cpu":
            cpu_int4.request_amx_tile_permission()  # vLLM's AMX kernels use the tiles without asking
        reasons = []
        names = (forced,) if forced in MOE_KERNELS else MOE_ORDER.get(current_platform.device_type, ("dense",))
        for name in names:
            ok, why = self._usable(name)
            if ok:
                how = f"forced by {FORCE_SETTING}={forced}" if forced in MOE_KERNELS else "chosen"
                detail = f"; passed over: {'; '.join(reasons)}" if reasons else ""
                key = (name, self.specs["w13"], self.specs["w2"], how, detail)
                if key not in _logged:
                    _logged.add(key)
                    what = {"dense": "dequantized at load to the activation dtype, run by vLLM's unquantized MoE "
                                     "kernels (no memory saving)",
                            "vllm_cpu_int4": "vLLM's CPU int4 MoE kernel, packed, W4A8",
                            "triton": "packed experts through torch.ops.signround.fused_experts"}[name]
                    log = logger.warning if name == "dense" and how == "chosen" else logger.info
                    log("signround: mixture-of-experts layers (e.g. %s, gate/up %s, down %s) use kernel '%s' = %s "
                        "(%s%s)", self.prefix, self.specs["w13"].short_name(), self.specs["w2"].short_name(), name,
                        what, how, detail)
                return name
            reasons.append(f"{name}: {why}")
        raise ValueError(f"{self.prefix}: {FORCE_SETTING}={forced} cannot serve these experts: {'; '.join(reasons)}")

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
        if self.kernel_name == "vllm_cpu_int4":
            self._prepare_cpu_int4(layer)
        elif self.kernel_name == "triton":
            self._prepare_triton(layer)
        else:
            self._prepare_dense(layer)

    def _prepare_triton(self, layer) -> None:
        from signround_triton import fused_moe, ops  # noqa: F401  ops registers torch.ops.signround.fused_experts

        for stem, (k, n) in self.geometry.items():
            for suffix in (QWEIGHT, SCALES, QZEROS):
                if hasattr(layer, f"{stem}_{suffix}"):
                    p = getattr(layer, f"{stem}_{suffix}")
                    delattr(layer, f"{stem}_{suffix}")
                    layer.register_parameter(f"{stem}_{suffix}",
                                             torch.nn.Parameter(p.data.contiguous(), requires_grad=False))
            fused_moe.check_experts(self._packed_experts(layer, stem), f"{self.prefix} {stem}", k, n)

    def _packed_experts(self, layer, stem: str):
        from signround_triton.fused_moe import PackedExperts

        spec = self.specs[stem]
        return PackedExperts(getattr(layer, f"{stem}_{QWEIGHT}"), getattr(layer, f"{stem}_{SCALES}"),
                             getattr(layer, f"{stem}_{QZEROS}", None), spec.bits, spec.group_size)

    @property
    def is_monolithic(self) -> bool:
        # The base class's rule, spelled out: vLLM's compiled forward reads this property, and
        # torch.compile cannot trace super() on a property.
        if self.kernel_name == "triton":
            return False
        if self.moe_kernel is not None:
            return self.moe_kernel.is_monolithic
        return self.experts_cls.is_monolithic() if getattr(self, "experts_cls", None) is not None else False

    def apply(self, layer, x, topk_weights, topk_ids, shared_experts, shared_experts_input):
        if self.kernel_name != "triton":
            return super().apply(layer, x, topk_weights, topk_ids, shared_experts, shared_experts_input)
        if layer.apply_router_weight_on_input:  # the router weight scales the input (top-1 routing only)
            x = x * topk_weights.to(x.dtype)
            topk_weights = torch.ones_like(topk_weights)
        w13, w2 = self.specs["w13"], self.specs["w2"]
        return torch.ops.signround.fused_experts(
            x, layer.w13_qweight, layer.w13_scales, getattr(layer, f"w13_{QZEROS}", None), w13.bits, w13.group_size,
            layer.w2_qweight, layer.w2_scales, getattr(layer, f"w2_{QZEROS}", None), w2.bits, w2.group_size,
            topk_weights, topk_ids)

    def _prepare_cpu_int4(self, layer) -> None:
        from vllm import _custom_ops as ops
        from vllm.model_executor.layers.fused_moe.experts.cpu_moe import (
            CPUExpertsInt4, prepare_int4_moe_layer_for_cpu)
        from vllm.model_executor.layers.fused_moe.oracle.int_wna16 import (
            WNA16MoEBackend, make_wna16_moe_kernel, make_wna16_moe_quant_config)

        converted = {}
        for stem, (k, _) in self.geometry.items():
            qzeros = getattr(layer, f"{stem}_{QZEROS}", None)
            converted[stem] = to_cpu_int4_experts(getattr(layer, f"{stem}_{QWEIGHT}").data,
                                                  getattr(layer, f"{stem}_{SCALES}").data,
                                                  None if qzeros is None else qzeros.data, self.specs[stem])
            for suffix in (QWEIGHT, SCALES, QZEROS):
                if hasattr(layer, f"{stem}_{suffix}"):
                    delattr(layer, f"{stem}_{suffix}")
        (q13, s13, z13), (q2, s2, z2) = converted["w13"], converted["w2"]
        w13, w2, s13, s2, z13, z2 = prepare_int4_moe_layer_for_cpu(q13, q2, s13, s2, ops.CPUQuantAlgo.GPTQ, z13, z2)
        for name, t in (("w13_weight", w13), ("w2_weight", w2), ("w13_scales", s13), ("w2_scales", s2),
                        ("w13_qzeros", z13), ("w2_qzeros", z2)):
            layer.register_parameter(name, torch.nn.Parameter(t, requires_grad=False))
        self.experts_cls = CPUExpertsInt4
        self.moe_quant_config = make_wna16_moe_quant_config(
            w1_scale=layer.w13_scales, w2_scale=layer.w2_scales, w1_zp=layer.w13_qzeros, w2_zp=layer.w2_qzeros,
            group_size=self.groups["w13"], num_bits=4)
        self.moe_kernel = make_wna16_moe_kernel(moe_quant_config=self.moe_quant_config, moe_config=self.moe,
                                                experts_cls=CPUExpertsInt4, backend=WNA16MoEBackend.CPU,
                                                routing_tables=layer._expert_routing_tables())

    def get_fused_moe_quant_config(self, layer):
        if self.kernel_name == "vllm_cpu_int4":
            return self.moe_quant_config
        return super().get_fused_moe_quant_config(layer)

    def _prepare_dense(self, layer) -> None:
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
        super().process_weights_after_loading(layer)


def moe_method(config: SignRoundConfig, layer, prefix: str, forced_kernel: str | None = None):
    """The method for a vLLM MoE layer: packed experts, or vLLM's own when the checkpoint keeps them dense."""
    w13, w2 = expert_specs(config, prefix, layer.global_num_experts)
    if (w13 is None) != (w2 is None):
        raise ValueError(f"{prefix}: the checkpoint keeps the experts' "
                         f"{'gate/up' if w13 is None else 'down'} projections unquantized but not the others; "
                         f"the signround method serves experts quantized together or kept together")
    if w13 is None:
        return UnquantizedFusedMoEMethod(layer.moe_config)
    return SignRoundMoEMethod(layer.moe_config, w13, w2, prefix, forced_kernel)

