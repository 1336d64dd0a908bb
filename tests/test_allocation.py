"""Tier 1: mixed bits to a budget (offline_tuner/allocation.py): the choice itself, and whole runs on tiny models."""
import random

import pytest

from offline_tuner.allocation import WITHIN_BITS, Allocation, _hull, allocate, group_costs
from offline_tuner.errors import TunerInputError
from offline_tuner.plan import LayerPlan
from signround_vllm.format import LayerQuantSpec, bits_per_weight

CANDIDATES = Allocation(3.0, kind_choices=("asym",)).candidates()  # 2/3/4/8 bits x groups 32/64/128, asym


def random_instance(rng: random.Random, n_groups: int):
    """Groups of random sizes; errors fall with bits and rise with group size, with per-group noise."""
    costs, errors, weights = [], [], []
    for _ in range(n_groups):
        k = rng.choice([128, 256, 384, 768])
        layers = [LayerPlan(f"l{j}", CANDIDATES[0], k, rng.choice([64, 128, 512]), "p") for j in range(rng.randint(1, 3))]
        sensitivity = rng.lognormvariate(0, 2)
        costs.append(group_costs(layers, CANDIDATES))
        errors.append([sensitivity * 4.0 ** -s.bits * (1 + s.group_size / 128) * rng.uniform(0.8, 1.2)
                       for s in CANDIDATES])
        weights.append(sum(lp.in_features * lp.out_features for lp in layers))
    return costs, errors, sum(weights)


def total(values, choice):
    return sum(v[j] for v, j in zip(values, choice))


def test_allocation_meets_the_budget_and_beats_every_uniform_setting_that_fits():
    rng = random.Random(0)
    for trial in range(25):
        costs, errors, weights = random_instance(rng, rng.randint(40, 120))
        cheapest, richest = total(costs, [min(range(len(c)), key=c.__getitem__) for c in costs]) / weights, \
            total(costs, [max(range(len(c)), key=c.__getitem__) for c in costs]) / weights
        target = rng.uniform(cheapest, richest)
        choice = allocate(costs, errors, target * weights)
        achieved = total(costs, choice) / weights
        assert achieved <= target + 1e-9, (trial, achieved, target)
        if target <= richest - WITHIN_BITS:
            assert achieved >= target - WITHIN_BITS, (trial, achieved, target)
        for j in range(len(CANDIDATES)):  # every uniform setting that fits the budget is no better
            uniform = [j] * len(costs)
            if total(costs, uniform) <= target * weights:
                assert total(errors, choice) <= total(errors, uniform) * (1 + 1e-9), (trial, CANDIDATES[j])


def test_allocation_extremes_and_a_budget_below_the_cheapest():
    rng = random.Random(1)
    costs, errors, weights = random_instance(rng, 20)
    everything = allocate(costs, errors, 1e18)
    assert all(e[j] == min(e) for e, j in zip(errors, everything))
    floor = total(costs, [min(range(len(c)), key=c.__getitem__) for c in costs])
    assert total(costs, allocate(costs, errors, floor)) == pytest.approx(floor)
    with pytest.raises(ValueError):
        allocate(costs, errors, floor * 0.99)


def test_small_instances_are_solved_within_a_few_percent_of_the_optimum():
    import itertools

    rng = random.Random(2)
    worst = 1.0
    for _ in range(40):
        costs, errors, weights = random_instance(rng, 4)
        options = [range(len(c)) for c in costs]
        budget = rng.uniform(2.3, 5.0) * weights
        feasible = [ch for ch in itertools.product(*options) if total(costs, ch) <= budget]
        if not feasible:
            continue
        best = min(total(errors, ch) for ch in feasible)
        worst = max(worst, total(errors, allocate(costs, errors, budget)) / best)
    # Greedy on convex hulls is not exact for a knapsack; with four groups its loss stays bounded.
    assert worst < 1.6, worst


def test_hull_keeps_only_the_lower_convex_frontier():
    cost = [1.0, 2.0, 3.0, 4.0, 2.5]
    err = [10.0, 4.0, 3.5, 0.5, 9.0]  # (3.0, 3.5) lies above the segment (2, 4) -> (4, 0.5); (2.5, 9) is dominated
    assert _hull(cost, err) == [0, 1, 3]


def test_costs_count_scales_and_zero_points():
    layer = LayerPlan("x", CANDIDATES[0], 256, 64, "p")
    w3g64 = LayerQuantSpec(3, 64, False)
    assert bits_per_weight(w3g64, 256) == 3.375
    assert group_costs([layer], [w3g64]) == [256 * 64 * 3.375]


def test_bad_choices_are_refused():
    with pytest.raises(TunerInputError, match="--bit-choices"):
        Allocation(3.0, bit_choices=(5,)).candidates()
    with pytest.raises(TunerInputError, match="--group-choices"):
        Allocation(3.0, group_choices=(48,)).candidates()
    with pytest.raises(TunerInputError, match=r"--kind-choices \['asym', 'signed'\]: choose among \['asym', 'sym'\]"):
        Allocation(3.0, kind_choices=("asym", "signed")).candidates()
    both = Allocation(3.0, bit_choices=(2, 4), group_choices=(64,)).candidates()
    assert [s.short_name() for s in both] == ["W2G64asym", "W4G64asym", "W2G64sym", "W4G64sym"]


def test_kind_choices_on_the_command_line():
    from offline_tuner.cli import allocation_from_args, build_parser

    def kinds(*argv):
        return allocation_from_args(build_parser().parse_args(["quantize", "m", "--out", "o", "--avg-bits", "3",
                                                                *argv])).kind_choices
    assert kinds() == ("asym", "sym") and kinds("--sym") == ("sym",) and kinds("--kind-choices", "asym") == ("asym",)
    with pytest.raises(TunerInputError, match="leave it out when giving --kind-choices"):
        kinds("--sym", "--kind-choices", "asym,sym")


# ----------------------------------------------------------------------------
# Whole runs (round-to-nearest after the allocation; tiny models with the default tokenizer)
# ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def default_tokenizer_dir():
    from offline_tuner.default_model import prepare_default_model

    return prepare_default_model()


def allocate_tiny(tmp_path, family, avg_bits, tokenizer_from, text, dims=None, **kw):
    from offline_tuner.default_model import make_tiny_model
    from offline_tuner.quantize import Calibration, quantize_checkpoint
    from signround_vllm.format import SignRoundConfig

    model = make_tiny_model(tmp_path / f"{family}-model", seed=3, family=family, tokenizer_from=tokenizer_from,
                            **(dims or {"hidden": 128, "intermediate": 256}))
    ckpt = tmp_path / f"{family}-mixed"
    allocation = Allocation(avg_bits, n_windows=2, seq_len=64, **kw)
    result = quantize_checkpoint(model, ckpt, SignRoundConfig(), allocation=allocation,
                                 calibration=Calibration(text_file=str(text)))
    return model, ckpt, result.run_log["allocation"]


def packed_layers(ckpt):
    from signround_vllm.checkpoint import load_tensors, read_quant_config, split_packed_layers

    return split_packed_layers(load_tensors(ckpt), read_quant_config(ckpt), str(ckpt))[0]


def specs_of(ckpt):
    return {name: packed.spec for name, packed in packed_layers(ckpt).items()}


def stored_bits_per_weight(ckpt) -> float:
    """Average stored bits per quantized weight, read back from the checkpoint's packed layers."""
    layers = packed_layers(ckpt)
    weights = {n: p.in_features * p.out_features for n, p in layers.items()}
    bits = sum(weights[n] * bits_per_weight(p.spec, p.in_features) for n, p in layers.items())
    return bits / sum(weights.values())


def test_llama_allocation_keeps_fused_layers_together(tmp_path, default_tokenizer_dir, calibration_text):
    # hidden 96, intermediate 192: groups of 128 divide no layer's inputs, so only 32 and 64 are candidates
    dims = {"hidden": 96, "intermediate": 192, "heads": 3, "kv_heads": 1}
    _, ckpt, report = allocate_tiny(tmp_path, "llama", 3.5, default_tokenizer_dir, calibration_text, dims)
    assert report["achieved_bits"] <= 3.5
    specs = specs_of(ckpt)
    assert len(set(specs.values())) >= 2, specs  # no uniform setting costs 3.5: the answer mixes
    for block in (0, 1):
        p = f"model.layers.{block}"
        assert len({specs[f"{p}.self_attn.{x}_proj"] for x in "qkv"}) == 1
        assert len({specs[f"{p}.mlp.{x}_proj"] for x in ("gate", "up")}) == 1
    groups = [set(g["layers"]) for g in report["groups"]]
    assert {"model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.k_proj",
            "model.layers.0.self_attn.v_proj"} in groups
    assert {"model.layers.0.self_attn.o_proj"} in groups and {"model.layers.0.mlp.down_proj"} in groups
    names = {name for g in report["groups"] for name in g["errors"]}
    assert not any("G128" in name for name in names)  # 128 fits nothing
    assert {"W3G32asym", "W3G32sym", "W8G64sym"} <= names  # both kinds by default
    assert stored_bits_per_weight(ckpt) == pytest.approx(report["achieved_bits"], abs=1e-3)


def test_moe_allocation_gives_all_experts_of_a_projection_one_setting(tmp_path, default_tokenizer_dir,
                                                                     calibration_text):
    _, ckpt, report = allocate_tiny(tmp_path, "qwen3_moe", 3.0, default_tokenizer_dir, calibration_text)
    specs = specs_of(ckpt)
    assert stored_bits_per_weight(ckpt) == pytest.approx(report["achieved_bits"], abs=1e-3)
    assert not any(n.endswith("mlp.gate") for n in specs)  # the router stays unquantized
    for block in (0, 1):
        for proj in (("gate_proj", "up_proj"), ("down_proj",)):
            assert len({s for n, s in specs.items() if f"layers.{block}.mlp.experts." in n
                        and n.rsplit(".", 1)[1] in proj}) == 1
    assert report["achieved_bits"] <= 3.0


def test_budget_below_the_cheapest_choice_is_refused_before_writing(tmp_path, default_tokenizer_dir,
                                                                   calibration_text):
    with pytest.raises(TunerInputError, match=r"--avg-bits 2.1: below the cheapest choice .*2\.125 bits"):
        allocate_tiny(tmp_path, "llama", 2.1, default_tokenizer_dir, calibration_text, bit_choices=(2, 4))
    assert not (tmp_path / "llama-mixed").exists()


def test_layer_overrides_and_avg_bits_together_are_refused(tmp_path, default_tokenizer_dir, calibration_text):
    from offline_tuner.default_model import make_tiny_model
    from offline_tuner.quantize import quantize_checkpoint
    from signround_vllm.format import SignRoundConfig

    model = make_tiny_model(tmp_path / "m", seed=3, tokenizer_from=default_tokenizer_dir)
    config = SignRoundConfig(layer_overrides={"model.layers.0.mlp.down_proj": LayerQuantSpec(8, 32, True)})
    with pytest.raises(TunerInputError, match="cannot be combined with --layer-override"):
        quantize_checkpoint(model, tmp_path / "out", config, allocation=Allocation(3.5))
    assert not (tmp_path / "out").exists()
