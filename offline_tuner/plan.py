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
from offline_tuner.model_source import input_embedding_param, model_stored_layout, output_embedding_param
from offline_tuner.stored_layout import StoredLayout, StoredPiece, row_count

# Architectures whose vLLM class (vLLM 0.32) has no lm_head: it computes the logits from the input
# embedding, so a checkpoint with a quantized output layer would fail to load there.
LOGITS_FROM_INPUT_EMBEDDING = frozenset({"Gemma2ForCausalLM", "Gemma3nForCausalLM", "CohereForCausalLM",
                                         "Cohere2ForCausalLM", "Cohere2MoeForCausalLM"})


@dataclasses.dataclass(frozen=True)
class LayerPlan:
    """One quantized layer: a stored weight matrix [out_features, in_features], packed under `name`.

    Its weights are rows [row_start, row_start + out_features) of the in-memory parameter `param`
    viewed as [-1, in_features]: the whole weight of an `nn.Linear`, or one expert's projection inside
    a fused expert parameter ([experts, out, in], as transformers 5 holds mixture-of-experts weights).
    """

    name: str  # checkpoint module name, e.g. "model.layers.3.self_attn.q_proj", "...experts.5.gate_proj"
    spec: LayerQuantSpec
    in_features: int
    out_features: int
    param: str  # in-memory parameter, e.g. "model.layers.3.self_attn.q_proj.weight", "...experts.gate_up_proj"
    row_start: int = 0

    @property
    def row_stop(self) -> int:
        return self.row_start + self.out_features


@dataclasses.dataclass(frozen=True)
class QuantPlan:
    config: SignRoundConfig
    layers: Mapping[str, LayerPlan]  # every layer to quantize, by checkpoint module name, in model order
    blocks: DecoderBlocks | None  # None when the model's blocks were not needed (round-to-nearest)
    layout: StoredLayout  # where each in-memory parameter is stored
    routers: tuple[str, ...] = ()  # checkpoint module names of mixture-of-experts routers, kept unquantized
    # A quantized output embedding that the source ties to the input embedding is stored apart from it:
    # its stored name -> the stored tensor it is read from (the checkpoint then says tie_word_embeddings false).
    untied: Mapping[str, str] = dataclasses.field(default_factory=dict)

    def source_of(self, stored_name: str) -> str:
        """The tensor of the source files that holds the stored tensor `stored_name`."""
        return self.untied.get(stored_name, stored_name)

    def block_params(self, index: int) -> dict[str, tuple[LayerPlan, ...]]:
        """The quantized parameters of decoder block `index`, by name inside the block ("self_attn.q_proj.weight",
        "mlp.experts.gate_up_proj"), each with the stored layers it holds, in row order."""
        prefix = self.blocks.prefix(index)
        found: dict[str, list[LayerPlan]] = {}
        for lp in self.layers.values():
            if lp.param.startswith(prefix):
                found.setdefault(lp.param[len(prefix):], []).append(lp)
        return {name: tuple(sorted(lps, key=lambda lp: lp.row_start)) for name, lps in found.items()}

    def layers_outside_blocks(self) -> list[str]:
        if self.blocks is None:
            return list(self.layers)
        return [n for n, lp in self.layers.items() if not lp.param.startswith(self.blocks.path + ".")]

    def layer_of_stored(self, stored_name: str) -> LayerPlan | None:
        """The planned layer whose weight is the stored tensor `stored_name`, if any."""
        return self.layers.get(stored_name.removesuffix(".weight")) if stored_name.endswith(".weight") else None


def resolve_plan(model: torch.nn.Module, config: SignRoundConfig, tuning: bool,
                 layout: StoredLayout | None = None) -> QuantPlan:
    """Decide every layer's spec and check that each can be stored; when `tuning`, find the decoder blocks
    (layers outside them, such as a quantized lm_head, are rounded to nearest).

    `layout` (from ModelSource.check_names) says where each parameter is stored; computed when not given.
    """
    layout = layout or model_stored_layout(model)
    params = dict(model.named_parameters(remove_duplicate=False))  # a tied output embedding too
    linear_weights = _linear_weights(model)
    experts = _expert_parameters(model)
    routers = _routers(model, experts)
    layers: dict[str, LayerPlan] = {}
    problems: list[str] = []
    untied: dict[str, str] = {}
    for param in [*linear_weights, *experts]:
        if _owner_module(param) in routers:
            continue
        if param not in layout.pieces:  # tied to the input embedding: stored once, as the embedding
            if config.spec_for(_owner_module(param)) is None:
                continue
            # Quantized, it is stored apart: the input embedding keeps full precision (it is a lookup table).
            embedding = layout.pieces[input_embedding_param(model)]
            if len(embedding) != 1:
                problems.append(f"{_owner_module(param)} is tied to an input embedding stored in "
                                f"{len(embedding)} pieces; keep it unquantized")
                continue
            apart = StoredPiece(param, param, 0, row_count(params[param].shape))
            layout = StoredLayout({**layout.pieces, param: [apart]})
            untied[param] = embedding[0].stored
        in_features = params[param].shape[-1]
        per_expert = row_count(params[param].shape) // params[param].shape[0] if param in experts else None
        specs = {}
        for piece in layout.pieces[param]:
            name = piece.stored.removesuffix(".weight") if piece.stored.endswith(".weight") else _owner_module(param)
            spec = specs[name] = config.spec_for(name)
            if spec is None:
                continue
            if per_expert is not None and (piece.start // per_expert != (piece.stop - 1) // per_expert
                                           or not piece.stored.endswith(".weight")):
                problems.append(f"{param} ({type(model.get_submodule(_owner_module(param))).__name__}, shape "
                                f"{list(params[param].shape)}) is stored as {piece.stored}, not as one weight per "
                                f"expert, which is what vLLM's expert loaders read")
                continue
            try:
                spec.check_in_features(in_features, name)
            except SignRoundFormatError as e:
                problems.append(str(e))
                continue
            layers[name] = LayerPlan(name, spec, in_features, piece.rows, param, piece.start)
        if len(set(specs.values())) > 1:
            detail = ", ".join(f"{n}: {s.short_name() if s else 'unquantized'}" for n, s in list(specs.items())[:6])
            problems.append(f"{param} holds {len(specs)} stored weights that vLLM loads as one fused tensor, so they "
                            f"need the same settings; found {detail}{' ...' if len(specs) > 6 else ''}")
    problems += _output_layer_vllm_cannot_load(model, layers)
    if problems:
        raise TunerInputError("cannot quantize these layers with the requested settings:\n  " +
                              "\n  ".join(problems) + "\n(keep them unquantized with --keep-unquantized, "
                              "or choose a group size that divides their in_features)")
    router_names = tuple(_checkpoint_module(layout, r) for r in sorted(routers))
    _refuse_weights_left_behind(model, {*linear_weights, *experts, *_router_params(model, routers)})
    overridden_routers = sorted(set(config.layer_overrides) & set(router_names))
    if overridden_routers:
        raise TunerInputError(f"--layer-override names mixture-of-experts routers {overridden_routers[:3]}; routers "
                              f"stay unquantized (they decide which experts run)")
    unknown = sorted(set(config.layer_overrides) - set(layers))
    if unknown:
        raise TunerInputError(f"--layer-override names modules that are not quantized linear layers of this model: "
                              f"{unknown[:5]}; give full module names as stored in the checkpoint, such as "
                              f"model.layers.0.mlp.down_proj or model.layers.0.mlp.experts.0.down_proj")
    blocks = find_decoder_blocks(model) if tuning else None
    return QuantPlan(config, layers, blocks, layout, router_names, untied)


def _output_layer_vllm_cannot_load(model: torch.nn.Module, layers: Mapping[str, LayerPlan]) -> list[str]:
    architecture = (getattr(getattr(model, "config", None), "architectures", None) or [type(model).__name__])[0]
    if architecture not in LOGITS_FROM_INPUT_EMBEDDING:
        return []
    param = output_embedding_param(model)
    if param is None or not any(lp.param == param for lp in layers.values()):
        return []
    name = param.removesuffix(".weight")
    return [f"{name} of {architecture}: vLLM serves this architecture with the logits computed from the input "
            f"embedding (it has no {name} to load), so {name} must stay unquantized"]


def _owner_module(param: str) -> str:
    return param.rpartition(".")[0]


def _linear_weights(model: torch.nn.Module) -> dict[str, torch.nn.Linear]:
    return {f"{n}.weight": m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}


def _expert_parameters(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    """3-D parameters [experts, out, in] of modules that are not linear layers: fused expert weights."""
    return {f"{n}.{pn}" if n else pn: p for n, m in model.named_modules() if not isinstance(m, torch.nn.Linear)
            for pn, p in m.named_parameters(recurse=False) if p.dim() == 3}


def _routers(model: torch.nn.Module, experts: Mapping[str, torch.nn.Parameter]) -> set[str]:
    """Module names of the routers of each mixture-of-experts block: the siblings of its experts module
    whose own matrix has one output per expert (the router `gate`) or a single output (a shared-expert gate)."""
    found = set()
    for param_name, param in experts.items():
        experts_module = _owner_module(param_name)
        block = _owner_module(experts_module)
        for child_name, child in model.get_submodule(block).named_children():
            full = f"{block}.{child_name}" if block else child_name
            if full != experts_module and any(p.dim() == 2 and p.shape[0] in (param.shape[0], 1)
                                              for p in child.parameters(recurse=False)):
                found.add(full)
    return found


def _router_params(model: torch.nn.Module, routers: set[str]) -> list[str]:
    return [f"{r}.{pn}" for r in routers for pn, _ in model.get_submodule(r).named_parameters(recurse=False)]


def _checkpoint_module(layout: StoredLayout, module: str) -> str:
    """The stored module name of an in-memory module (Mixtral's mlp.gate is stored as block_sparse_moe.gate)."""
    pieces = layout.pieces.get(f"{module}.weight")
    return pieces[0].stored.removesuffix(".weight") if pieces else module


def _refuse_weights_left_behind(model: torch.nn.Module, handled: set[str]) -> None:
    """Matrices that are neither linear layers, expert weights, routers nor embeddings would silently stay
    in full precision: refuse them up front."""
    found = []
    for mod_name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Embedding):
            continue
        for p_name, p in mod.named_parameters(recurse=False):
            full = f"{mod_name}.{p_name}" if mod_name else p_name
            if p.dim() >= 2 and full not in handled:
                found.append(f"{full} ({type(mod).__name__}, shape {list(p.shape)})")
    if found:
        raise TunerInputError(
            f"{type(model).__name__} holds weights this version cannot quantize (they are neither linear layers "
            f"nor [experts, out, in] expert weights): {found[:3]}{' ...' if len(found) > 3 else ''}. Keep such "
            f"modules in full precision explicitly with --keep-unquantized, or use another model")
