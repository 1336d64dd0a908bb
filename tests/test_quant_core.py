"""Tier 1-2: round-to-nearest quantization core."""
import warnings

import pytest
import torch

from signround_vllm.format import SUPPORTED_BITS, LayerQuantSpec, dequantize_packed, pack_linear
from offline_tuner.quant_core import quantize_weight, quantize_weight_to_ints, round_to_nearest_in_row_chunks


def reference_rtn(w: torch.Tensor, spec: LayerQuantSpec) -> torch.Tensor:
    """Independent loop-per-group round-to-nearest (asym: min/max incl. 0; sym: full range)."""
    n, k = w.shape
    g = spec.effective_group_size(k)
    out = torch.empty_like(w, dtype=torch.float32)
    for r in range(n):
        for c0 in range(0, k, g):
            grp = w[r, c0:c0 + g].float()
            if spec.sym:
                big = grp[grp.abs().argmax()]
                s = float(torch.tensor(-float(big) / 2 ** (spec.bits - 1)).half())
                z = 2 ** (spec.bits - 1)
            else:
                lo, hi = min(float(grp.min()), 0.0), max(float(grp.max()), 0.0)
                s = float(torch.tensor((hi - lo) / (2 ** spec.bits - 1)).half())
                z = min(max(round(-lo / s), 0), 2 ** spec.bits - 1)
            q = torch.clamp(torch.round(grp / s) + z, 0, 2 ** spec.bits - 1)
            out[r, c0:c0 + g] = (q - z) * s
    return out


@pytest.mark.parametrize("bits", SUPPORTED_BITS)
@pytest.mark.parametrize("group_size", [32, 128, -1])
@pytest.mark.parametrize("sym", [False, True])
def test_rtn_matches_reference_and_round_trips_through_format(bits, group_size, sym):
    spec = LayerQuantSpec(bits, group_size, sym)
    w = torch.randn(6, 256, generator=torch.Generator().manual_seed(bits + group_size)) * 0.05
    w_dq, q, scale, zero = quantize_weight(w, spec)
    assert not torch.isnan(w_dq).any()
    torch.testing.assert_close(w_dq, reference_rtn(w, spec), rtol=0, atol=1e-6)
    qi, s, z = quantize_weight_to_ints(w, spec)
    assert int(qi.min()) >= 0 and int(qi.max()) <= spec.max_int
    # scales are exactly representable in float16, so the stored checkpoint equals what was computed
    assert torch.equal(s, s.half().float())
    packed = pack_linear(qi, s, z, spec)
    torch.testing.assert_close(dequantize_packed(packed), w_dq, rtol=0, atol=0)


def test_rtn_error_is_at_most_half_a_step():
    spec = LayerQuantSpec(4, 32, False)
    w = torch.randn(4, 128, generator=torch.Generator().manual_seed(1))
    w_dq, _, scale, _ = quantize_weight(w, spec)
    step = scale.abs().repeat_interleave(32, dim=1)
    assert ((w - w_dq).abs() <= step / 2 + 1e-3 * step).all()


def test_all_zero_group_is_finite():
    spec = LayerQuantSpec(3, 32, False)
    w = torch.zeros(2, 64)
    w[1, 40] = 1.0
    w_dq, q, scale, zero = quantize_weight(w, spec)
    assert torch.isfinite(w_dq).all() and torch.isfinite(scale).all()
    assert torch.equal(w_dq[0], torch.zeros(64))


def test_rounding_offset_and_clipping_have_gradients():
    spec = LayerQuantSpec(2, 32, False)
    w = torch.randn(3, 64, generator=torch.Generator().manual_seed(2))
    v = torch.zeros(3, 64, requires_grad=True)
    a = torch.ones(3, 2, requires_grad=True)
    b = torch.ones(3, 2, requires_grad=True)
    w_dq, *_ = quantize_weight(w, spec, v, a, b)
    ((w_dq - w) ** 2).sum().backward()
    for t in (v, a, b):
        assert t.grad is not None and torch.isfinite(t.grad).all() and t.grad.abs().sum() > 0


@pytest.mark.parametrize("spec", [LayerQuantSpec(4, 32, False), LayerQuantSpec(3, -1, True), LayerQuantSpec(8, 64, False)],
                         ids=lambda s: s.short_name())
def test_round_to_nearest_in_row_chunks_equals_the_whole_matrix(spec):
    w = torch.randn(37, 128, generator=torch.Generator().manual_seed(3)).to(torch.bfloat16)
    q, s, z = quantize_weight_to_ints(w.float(), spec)
    qc, sc, zc = round_to_nearest_in_row_chunks(w, spec, max_elements=5 * 128)  # 5 rows at a time, ragged tail
    assert qc.dtype == torch.uint8 and torch.equal(qc.to(torch.int64), q) and torch.equal(sc, s)
    assert (z is None and zc is None) or torch.equal(zc.to(torch.int64), z)


def _group_errors(w, spec, importance, factors):
    """{factor: weighted round-to-nearest error of the single group w [1, G] clipped by factor}."""
    errors = {}
    for f in factors:
        deq = quantize_weight(w, spec, None, torch.tensor([[f]]), torch.tensor([[f]]))[0]
        errors[f] = float((((w - deq) ** 2) * importance).sum())
    return errors


@pytest.mark.parametrize("spec", [LayerQuantSpec(2, 32, False), LayerQuantSpec(3, 64, True), LayerQuantSpec(4, -1, False),
                                  LayerQuantSpec(4, 32, True)], ids=str)
def test_clipping_search_picks_each_groups_best_grid_point(spec):
    """Asymmetric: the best of CLIP_GRID. Symmetric: the best of SYM_CLIP_GRID, then of that point plus each
    SYM_CLIP_REFINE offset; checked group by group with an independent loop."""
    from offline_tuner.quant_core import CLIP_GRID, SYM_CLIP_GRID, SYM_CLIP_REFINE, search_clipping

    gen = torch.Generator().manual_seed(7)
    w = torch.randn(5, 128, generator=gen) * torch.rand(5, 128, generator=gen) ** 3  # heavy tails: clipping helps
    importance = torch.rand(128, generator=gen)
    importance[:16] = 0.0  # channels that never see input do not count
    chosen = search_clipping(w, spec, importance, max_elements=256)  # several row chunks
    g = spec.effective_group_size(128)
    grid = SYM_CLIP_GRID if spec.sym else CLIP_GRID
    for r in range(5):
        for j in range(128 // g):
            cols = slice(j * g, (j + 1) * g)
            errors = _group_errors(w[r:r + 1, cols], spec, importance[cols], grid)
            coarse = min(errors, key=errors.get)
            if spec.sym:
                errors.update(_group_errors(w[r:r + 1, cols], spec, importance[cols],
                                            [min(max(coarse + d, 0.0), 1.5) for d in SYM_CLIP_REFINE]))
            best = min(errors.values())
            picked = float(chosen[r, j])
            assert min(abs(picked - f) for f in errors) < 1e-5, (r, j, picked)
            own = _group_errors(w[r:r + 1, cols], spec, importance[cols], [picked])[picked]
            assert own <= best * (1 + 1e-5) + 1e-12, (r, j, picked, own, best)
    assert (chosen < 1.0).any()  # on heavy-tailed weights some group clips


def test_symmetric_clipping_search_widens_a_group_whose_extremes_are_alike():
    """A symmetric group with +1 and -0.99 as extremes (zeros otherwise): scale 1/4 (3 bits) maps -0.99 past
    the top level +3, so the search picks a factor above 1 and lowers the error; asymmetric layers, where a
    factor above 1 only widens the range past the data, search within [0.5, 1]."""
    from offline_tuner.quant_core import SYM_CLIP_FACTOR_MAX, search_clipping

    w = torch.zeros(1, 32)
    w[0, :2] = torch.tensor([1.0, -0.99])
    ones = torch.ones(32)
    sym, asym = LayerQuantSpec(3, 32, True), LayerQuantSpec(3, 32, False)
    f = float(search_clipping(w, sym)[0, 0])
    assert 1.0 < f <= SYM_CLIP_FACTOR_MAX
    err = _group_errors(w, sym, ones, [1.0, f])
    assert err[f] < err[1.0]
    assert 0.5 <= float(search_clipping(torch.randn(16, 64), asym).max()) <= 1.0


def test_clipping_search_over_the_plain_grid_is_round_to_nearest():
    from offline_tuner.quant_core import search_clipping

    w = torch.randn(4, 64, generator=torch.Generator().manual_seed(1))
    assert torch.equal(search_clipping(w, LayerQuantSpec(3, 32, False), grid=(1.0,)), torch.ones(4, 2))
    assert torch.equal(search_clipping(w, LayerQuantSpec(3, 32, True), grid=(1.0,), refine=()), torch.ones(4, 2))


def _fake_quant_case(spec: LayerQuantSpec, n: int, k: int, seed: int):
    """A weight with awkward groups (all zero, all non-negative, one huge value), offsets reaching +-0.5 and
    clipping factors down to 0 (scales floored at the smallest float16), as the tuner meets them."""
    gen = torch.Generator().manual_seed(seed)
    g = spec.effective_group_size(k)
    w = torch.randn(n, k, generator=gen) * 0.05
    w[0, :g] = 0
    w[1, :g] = w[1, :g].abs()
    w[2, 0] = 3.0
    v = (torch.rand(n, k, generator=gen) - 0.5).clamp(-0.5, 0.5)
    v[3] = 0.5
    a, b = torch.rand(n, k // g, generator=gen), torch.rand(n, k // g, generator=gen)
    a[4, 0], b[4, 0] = 0.0, 0.0
    return w, v, a, b


@pytest.mark.parametrize("bits", SUPPORTED_BITS)
@pytest.mark.parametrize("sym", [False, True])
@pytest.mark.parametrize("group_size,n,k", [(32, 7, 96), (64, 9, 128), (-1, 6, 40)])
def test_fused_fake_quantization_equals_the_reference_and_its_gradients(bits, sym, group_size, n, k):
    """fake_quant's hand-written backward against autograd through quant_core.quantize_weight."""
    from offline_tuner.fake_quant import FrozenWeight, fake_quantize

    spec = LayerQuantSpec(bits, group_size, sym)
    w, v, a, b = _fake_quant_case(spec, n, k, seed=bits * 10 + sym)
    grad_out = torch.randn(n, k, generator=torch.Generator().manual_seed(1))
    tunables = [t.clone().requires_grad_() for t in (v, a, b)]
    reference = quantize_weight(w, spec, *tunables)[0]
    reference_grads = torch.autograd.grad(reference, tunables, grad_out)
    fused = fake_quantize(FrozenWeight.of(w, spec), *tunables)
    fused_grads = torch.autograd.grad(fused, tunables, grad_out)
    assert torch.equal(fused, reference)
    for got, want, name in zip(fused_grads, reference_grads, ("offset", "max_scale", "min_scale")):
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * float(want.abs().max()), msg=name)
    assert fake_quantize(FrozenWeight.of(w, spec), *tunables, dtype=torch.bfloat16).dtype == torch.bfloat16


def test_a_blocks_weights_fake_quantized_together_equal_each_alone():
    """fake_quantize_many runs the scale rule once per setting on all its weights' groups: the values and every
    gradient are exactly those of each weight fake-quantized alone."""
    from offline_tuner.fake_quant import FrozenWeight, fake_quantize, fake_quantize_many

    specs = [LayerQuantSpec(3, 32, False), LayerQuantSpec(4, 64, True), LayerQuantSpec(3, 32, False)]
    cases = [_fake_quant_case(spec, n, 128, seed=i) for i, (spec, n) in enumerate(zip(specs, (7, 9, 5)))]
    grads_out = [torch.randn(w.shape, generator=torch.Generator().manual_seed(i)) for i, (w, *_) in enumerate(cases)]
    results = []
    for together in (False, True):
        tunables = [[t.clone().requires_grad_() for t in (v, a, b)] for _, v, a, b in cases]
        frozen = [FrozenWeight.of(w, spec) for (w, *_), spec in zip(cases, specs)]
        outs = (fake_quantize_many(frozen, tunables) if together
                else [fake_quantize(f, *t) for f, t in zip(frozen, tunables)])
        flat = [t for ts in tunables for t in ts]
        results.append((outs, torch.autograd.grad(outs, flat, grads_out)))
    (alone, alone_grads), (together, together_grads) = results
    assert all(torch.equal(x, y) for x, y in zip(alone, together))
    assert all(torch.equal(x, y) for x, y in zip(alone_grads, together_grads))


@pytest.mark.parametrize("spec", [LayerQuantSpec(2, 32, False), LayerQuantSpec(4, 64, True)], ids=str)
def test_compiled_fake_quantization_equals_eager(spec):
    """The torch.compile'd passes give eager's values exactly and its gradients up to summation order."""
    from offline_tuner.fake_quant import FrozenWeight, fake_quantize

    w, v, a, b = _fake_quant_case(spec, 33, 192, seed=3)
    grad_out = torch.randn(33, 192, generator=torch.Generator().manual_seed(2)).bfloat16()
    results = []
    for compiled in (False, True):
        tunables = [t.clone().requires_grad_() for t in (v, a, b)]
        out = fake_quantize(FrozenWeight.of(w, spec), *tunables, dtype=torch.bfloat16, compiled=compiled)
        results.append((out, torch.autograd.grad(out, tunables, grad_out)))
    (eager, eager_grads), (compiled, compiled_grads) = results
    assert torch.equal(compiled, eager)
    for got, want in zip(compiled_grads, eager_grads):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))


def test_a_failed_compile_warns_once_and_runs_eagerly(monkeypatch):
    from offline_tuner import compiling

    def broken_compile(fn, **kwargs):
        def run(*args, **kw):
            raise RuntimeError("no working C++ compiler")
        return run

    monkeypatch.setattr(compiling.torch, "compile", broken_compile)
    doubled = compiling.CompiledOrEager(lambda x: 2 * x)
    with pytest.warns(RuntimeWarning, match=r"failed \(RuntimeError: no working C\+\+ compiler\); running it eagerly"):
        assert doubled(torch.tensor(3.0)) == 6.0
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no second warning
        assert doubled(torch.tensor(4.0)) == 8.0
    assert compiling.compile_pays(40, 30, 3_500_000) and not compiling.compile_pays(10, 2, 200_000)
