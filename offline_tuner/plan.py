"""The resolved plan: every layer's quantization decided and validated once, before any work starts.

`resolve_plan` reads the model's structure (on any device, the meta device included: only names and
shapes are used) and the `SignRoundConfig`, and either returns a `QuantPlan` or refuses with every
problem listed. The stages after it (round or tune, pack, write) take their specs from the plan only.
"""
from __future__ import annotations

import dataclasses
from typing import Mapping

import torch

from signround_vllm.format import LayerQuantSpec, SignRoundConfig, SignRoundFormatError
from offline_tuner.architecture import DecoderBlocks, find_decoder_blocks
from offline_tuner.errors import TunerInputError


@dataclasses.dataclass(frozen=True)
class LayerPlan:
    name: str  # checkpoint module name, e.g. "model.layers.3.self_attn.q_proj"
    spec: LayerQuantSpec
    in_features: int
    out_features: int


@dataclasses.dataclass(frozen=True)
class QuantPlan:
    config: SignRoundConfig
    layers: Mapping[str, LayerPlan]  # every layer to quantize, by checkpoint module name, in model order
    blocks: DecoderBlocks | None  # None when the model's blocks were not needed (round-to-nearest)

    def block_layers(self, index: int) -> dict[str, LayerPlan]:
        """The layers of decoder block `index`, by their name inside the block ("self_attn.q_proj")."""
        prefix = self.blocks.prefix(index)
        return {name[len(prefix):]: lp for name, lp in self.layers.items() if name.startswith(prefix)}

    def layers_outside_blocks(self) -> list[str]:
        if self.blocks is None:
            return list(self.layers)
        return [n for n in self.layers if not n.startswith(self.blocks.path + ".")]


def resolve_plan(model: torch.nn.Module, config: SignRoundConfig, tuning: bool) -> QuantPlan:
    """Decide every layer's spec and check that each can be stored and, when `tuning`, tuned."""
    layers: dict[str, LayerPlan] = {}
    problems: list[str] = []
    for name, mod in model.named_modules():
        if not isinstance(mod, torch.nn.Linear):
            continue
        spec = config.spec_for(name)
        if spec is None:
            continue
        try:
            spec.check_in_features(mod.in_features, name)
        except SignRoundFormatError as e:
            problems.append(str(e))
            continue
        layers[name] = LayerPlan(name, spec, mod.in_features, mod.out_features)
    if problems:
        raise TunerInputError("cannot quantize these layers with the requested settings:\n  " +
                              "\n  ".join(problems) + "\n(keep them unquantized with --keep-unquantized, "
                              "or choose a group size that divides their in_features)")
    _refuse_weights_left_behind(model, config)
    unknown = sorted(set(config.layer_overrides) - set(layers))
    if unknown:
        raise TunerInputError(f"--layer-override names modules that are not quantized linear layers of this model: "
                              f"{unknown[:5]}; give full module names such as model.layers.0.mlp.down_proj")
    blocks = find_decoder_blocks(model) if tuning else None
    plan = QuantPlan(config, layers, blocks)
    if tuning:
        outside = plan.layers_outside_blocks()
        if outside:
            raise TunerInputError(f"layers outside the decoder blocks cannot be tuned: {outside[:5]}; "
                                  f"list them in --keep-unquantized or use --iters 0")
    return plan


def _refuse_weights_left_behind(model: torch.nn.Module, config: SignRoundConfig) -> None:
    """Matrices that are neither linear layers nor embeddings would silently stay in full precision
    (for example the 3-D expert weights of mixture-of-experts models): refuse them up front."""
    found = []
    for mod_name, mod in model.named_modules():
        if isinstance(mod, (torch.nn.Linear, torch.nn.Embedding)):
            continue
        for p_name, p in mod.named_parameters(recurse=False):
            full = f"{mod_name}.{p_name}" if mod_name else p_name
            if p.dim() >= 2 and config.spec_for(mod_name) is not None:
                found.append(f"{full} ({type(mod).__name__}, shape {list(p.shape)})")
    if found:
        raise TunerInputError(
            f"{type(model).__name__} holds weights this version cannot quantize (they are not linear layers): "
            f"{found[:3]}{' ...' if len(found) > 3 else ''}; mixture-of-experts weights are not supported yet. "
            f"Keep such modules in full precision explicitly with --keep-unquantized, or use another model")
