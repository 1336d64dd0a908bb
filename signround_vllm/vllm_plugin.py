"""The `signround` quantization method for vLLM.

Three phases per linear layer, as in vLLM's own methods (mixture-of-experts layers: `signround_vllm.moe`):
  create_weights                 declares the packed tensors of `signround_vllm.format`, tagged
                                 with input/output dims so fused and tensor-parallel loading shard them;
  process_weights_after_loading  hands the loaded tensors to the chosen kernel, which repacks once;
  apply                          calls the kernel.

Kernels are candidates in `signround_vllm.kernels`; the first that can serve a layer wins (or the
one named by $SIGNROUND_KERNEL, read once when the config is made), and a layer none can serve
fails at load with every candidate's reason.
"""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

import torch
from vllm.logger import init_logger
from vllm.model_executor.layers.fused_moe import RoutedExperts
from vllm.model_executor.layers.linear import (
    LinearBase, LinearMethodBase, UnquantizedLinearMethod, register_weight_loader_v2_supported_method,
)
from vllm.model_executor.layers.quantization import QUANTIZATION_METHODS, register_quantization_config
from vllm.model_executor.layers.quantization.base_config import QuantizationConfig
from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead
from vllm.model_executor.parameter import (
    ChannelQuantScaleParameter, GroupQuantScaleParameter, ModelWeightParameter,
)

from signround_vllm.format import (
    QUANT_METHOD, QWEIGHT, LayerQuantSpec, SignRoundConfig, SignRoundFormatError,
    packed_tensor_specs,
)
from signround_vllm.kernels import FORCE_SETTING, LayerGeometry, choose_kernel

logger = init_logger("vllm.signround")


class SignRoundVllmConfig(QuantizationConfig):
    """vLLM's view of a SignRound `quantization_config`."""

    def __init__(self, config: SignRoundConfig, forced_kernel: str | None = None):
        super().__init__()
        self.config = config
        self.forced_kernel = forced_kernel or os.environ.get(FORCE_SETTING) or None

    def __repr__(self) -> str:
        return f"SignRoundVllmConfig({self.config.to_dict()})"

    def get_name(self) -> str:
        return QUANT_METHOD

    def get_supported_act_dtypes(self) -> list[torch.dtype]:
        return [torch.bfloat16, torch.float16]

    @classmethod
    def get_min_capability(cls) -> int:
        return 75  # Triton dequant-GEMM needs Turing or newer

    @staticmethod
    def get_config_filenames() -> list[str]:
        return []  # read from config.json's quantization_config

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "SignRoundVllmConfig":
        try:
            return cls(SignRoundConfig.from_dict(config))
        except SignRoundFormatError as e:
            raise ValueError(f"invalid SignRound quantization_config in config.json: {e}") from None

    @classmethod
    def override_quantization_method(cls, hf_quant_cfg, user_quant, hf_config=None):
        # A SignRound checkpoint is served by this method whether or not --quantization is given.
        if isinstance(hf_quant_cfg, dict) and hf_quant_cfg.get("quant_method") == QUANT_METHOD:
            if user_quant in (None, QUANT_METHOD):
                return QUANT_METHOD
        return None

    def maybe_update_config(self, model_name: str, hf_config=None, revision=None) -> None:
        """Validate a local checkpoint's tensors against its config before the engine starts."""
        from signround_vllm.checkpoint import validate_checkpoint

        if not Path(model_name).is_dir():
            return  # a hub name: vLLM downloads later; the weight loaders still check every tensor
        try:
            validate_checkpoint(model_name)
        except SignRoundFormatError as e:
            message = f"invalid SignRound checkpoint: {e}"
            if _in_vllm_command_line():  # `vllm serve ...`: the message alone, not vLLM's traceback around it
                raise SystemExit(f"ERROR: {message}") from None
            raise ValueError(message) from None

    def apply_vllm_mapper(self, hf_to_vllm_mapper) -> None:
        c = self.config
        self.config = dataclasses.replace(
            c,
            modules_to_not_convert=tuple(hf_to_vllm_mapper.apply_list(list(c.modules_to_not_convert))),
            layer_overrides=hf_to_vllm_mapper.apply_dict(dict(c.layer_overrides)),
        )

    def spec_for_layer(self, prefix: str) -> LayerQuantSpec | None:
        """The spec of a vLLM layer; a fused layer (qkv_proj) must agree across its shards."""
        proj = prefix.rsplit(".", 1)[-1]
        shards = self.packed_modules_mapping.get(proj)
        if not shards:
            return self.config.spec_for(prefix)
        base = prefix[: -len(proj)]
        specs = {f"{base}{s}": self.config.spec_for(f"{base}{s}") for s in shards}
        if len(set(specs.values())) > 1:
            detail = ", ".join(f"{n}: {s.short_name() if s else 'unquantized'}" for n, s in specs.items())
            raise ValueError(f"{prefix}: vLLM fuses {list(specs)} into one layer, so they need the same "
                             f"quantization settings; the checkpoint has {detail}")
        return next(iter(specs.values()))

    def get_quant_method(self, layer: torch.nn.Module, prefix: str):
        if isinstance(layer, ParallelLMHead):  # quantized when the checkpoint stores it packed
            spec = self.config.spec_for(prefix)
            return None if spec is None else SignRoundLinearMethod(spec, prefix, self.forced_kernel)
        if isinstance(layer, LinearBase):
            spec = self.spec_for_layer(prefix)
            if spec is None:
                return UnquantizedLinearMethod()
            return SignRoundLinearMethod(spec, prefix, self.forced_kernel)
        if isinstance(layer, RoutedExperts):
            from signround_vllm.moe import moe_method

            return moe_method(self.config, layer, prefix, self.forced_kernel)
        return None


def _check_loaded(layer_name: str, tensor_name: str, dtype: torch.dtype, loader):
    """Wrap a weight loader so a wrong dtype or shape names the layer instead of failing an assert."""

    def load(param, loaded_weight: torch.Tensor, *args, **kwargs):
        if loaded_weight.dtype != dtype:
            raise ValueError(f"{layer_name}.{tensor_name}: checkpoint tensor has dtype {loaded_weight.dtype}, "
                             f"the SignRound format stores {dtype}")
        try:
            return loader(param, loaded_weight, *args, **kwargs)
        except (AssertionError, RuntimeError, IndexError) as e:
            raise ValueError(f"{layer_name}.{tensor_name}: checkpoint tensor of shape {tuple(loaded_weight.shape)} "
                             f"does not fit this layer's partition {tuple(param.data.shape)} "
                             f"(shard args {kwargs or args}): {e or type(e).__name__}") from None

    return load


def _vocab_shard_loader(lm_head: ParallelLMHead, name: str):
    """Loads lm_head's packed tensors (the vocabulary on dim 1): this rank's share of the vocabulary first,
    zeros in its padding (vLLM's own vocabulary loader assumes the vocabulary on dim 0)."""
    shard = lm_head.shard_indices

    def load(param, loaded_weight: torch.Tensor):
        if loaded_weight.ndim != 2 or loaded_weight.shape[1] != lm_head.org_vocab_size:
            raise ValueError(f"{name}: checkpoint tensor of shape {tuple(loaded_weight.shape)} does not cover the "
                             f"vocabulary of {lm_head.org_vocab_size} tokens on its second dimension")
        tokens = shard.org_vocab_end_index - shard.org_vocab_start_index
        param.data[:, :tokens].copy_(loaded_weight[:, shard.org_vocab_start_index:shard.org_vocab_end_index])
        param.data[:, tokens:].zero_()

    return load


@register_weight_loader_v2_supported_method
class SignRoundLinearMethod(LinearMethodBase):
    """Packed SignRound weights for one linear layer (possibly fused, possibly a TP shard)."""

    def __init__(self, spec: LayerQuantSpec, prefix: str, forced_kernel: str | None = None):
        self.spec = spec
        self.prefix = prefix
        self.forced_kernel = forced_kernel

    def create_weights(self, layer: torch.nn.Module, input_size_per_partition: int,
                       output_partition_sizes: list[int], input_size: int, output_size: int,
                       params_dtype: torch.dtype, **extra_weight_attrs):
        spec = self.spec
        out_local = sum(output_partition_sizes)
        k_local = input_size_per_partition
        tp_note = "" if k_local == input_size else f" (in_features {input_size} split across tensor-parallel ranks)"
        try:
            spec.check_in_features(input_size, self.prefix)
            if spec.group_size != -1:
                spec.check_in_features(k_local, f"{self.prefix} per-rank input {k_local}{tp_note}")
            elif k_local % 32:
                raise SignRoundFormatError(f"{self.prefix}: per-rank input {k_local}{tp_note} is not a multiple of 32")
        except SignRoundFormatError as e:
            raise ValueError(f"cannot load {self.prefix} with {spec.short_name()}: {e}") from None

        # Per-channel scales cover the whole input, so row-parallel ranks each keep the full row.
        local_spec = spec if spec.group_size != -1 else dataclasses.replace(spec, group_size=-1)
        shapes = packed_tensor_specs(k_local, out_local, local_spec, self.prefix)
        is_lm_head = isinstance(layer, ParallelLMHead)
        loader = _vocab_shard_loader(layer, self.prefix) if is_lm_head else extra_weight_attrs["weight_loader"]

        def param(name):
            shape, dtype = shapes[name]
            data = torch.empty(shape, dtype=dtype)
            checked = _check_loaded(self.prefix, name, dtype, loader)
            if name == QWEIGHT:
                return ModelWeightParameter(data=data, input_dim=0, output_dim=1, weight_loader=checked)
            if spec.group_size == -1:
                return ChannelQuantScaleParameter(data=data, output_dim=1, weight_loader=checked)
            return GroupQuantScaleParameter(data=data, input_dim=0, output_dim=1, weight_loader=checked)

        for name in shapes:
            layer.register_parameter(name, param(name))

        geometry = LayerGeometry(name=self.prefix, spec=spec, in_features=k_local, out_features=out_local,
                                 act_dtype=params_dtype, device=torch.get_default_device(),
                                 full_in_features=input_size)
        self.kernel = choose_kernel(geometry, forced=self.forced_kernel)
        if is_lm_head:
            logger.info("SignRound: %s is quantized (%s), served by kernel '%s'", self.prefix, spec.short_name(),
                        self.kernel.name)

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        self.kernel.prepare(layer)

    def tie_weights(self, layer: torch.nn.Module, embed_tokens: torch.nn.Module):
        raise ValueError(f"{self.prefix} is quantized ({self.spec.short_name()}) but config.json ties it to the "
                         f"input embedding (tie_word_embeddings: true); a quantized output embedding is stored "
                         f"apart from the input one, as `signround quantize` writes it (tie_word_embeddings: false)")

    def apply(self, layer: torch.nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        return self.kernel.apply(layer, x, bias)


def _in_vllm_command_line() -> bool:
    import multiprocessing
    import sys

    return Path(sys.argv[0]).name == "vllm" and multiprocessing.parent_process() is None


_registered_here = False  # whether this process has registered the method with vLLM


def register_with_vllm() -> None:
    """Idempotent: vLLM may call the plugin hook in several processes, several times."""
    global _registered_here
    if QUANT_METHOD in QUANTIZATION_METHODS and _registered_here:
        return
    register_quantization_config(QUANT_METHOD)(SignRoundVllmConfig)
    _registered_here = True
