"""Classifier-free guidance as a model wrapper, checked on the exact class-conditional mixture oracle."""

import math

import pytest
import torch

from diffusionlab.conditioning import GuidedModel, LabelledModel, condition_on_class
from diffusionlab.errors import DiffusionLabError
from diffusionlab.oracles.bench import ring_spec
from diffusionlab.oracles.conditional import ClassConditionalMixtureOracle
from diffusionlab.oracles.mixture import GaussianMixtureOracle
from diffusionlab.samplers import get_sampler, sample_in_chunks

F64 = torch.float64


def _oracle(process="vp-sde", noise=None, prediction="eps"):
    spec = ring_spec(6, radius=2.0, std=0.15)
    spec["weights"] = [0.3, 0.1, 0.2, 0.1, 0.2, 0.1]
    spec["classes"] = [0, 1, 2, 0, 1, 2]  # each class: two opposite components
    return ClassConditionalMixtureOracle.from_spec(spec, process, noise, prediction=prediction)


def test_class_oracle_is_the_mixture_of_its_components():
    o = _oracle()
    g = torch.Generator().manual_seed(0)
    x = 2.0 * torch.randn(9, 2, generator=g, dtype=F64)
    t = torch.full((9,), 0.3, dtype=F64)
    lab = torch.tensor([0, 1, 2, 3, 0, 1, 2, 3, 0])
    p = o.predict(x, t, labels=lab)
    for c in range(3):
        rows = lab == c
        q = o.class_oracle(c).predict(x[rows], t[rows])
        assert torch.allclose(p.eps[rows], q.eps, rtol=0, atol=1e-13)
        assert torch.allclose(p.x0[rows], q.x0, rtol=0, atol=1e-13)
    full = GaussianMixtureOracle.from_spec(ring_spec(6, 2.0, 0.15) | {"weights": [0.3, 0.1, 0.2, 0.1, 0.2, 0.1]},
                                           "vp-sde")
    rows = lab == 3  # the no-label index: the whole mixture
    assert torch.allclose(p.eps[rows], full.predict(x[rows], t[rows]).eps, rtol=0, atol=1e-13)
    assert torch.allclose(o.predict(x, t).eps, full.predict(x, t).eps, rtol=0, atol=1e-13)  # weights renormalised
    assert torch.allclose(o.class_weights(), torch.tensor([0.4, 0.3, 0.3], dtype=F64))
    assert o.nfe == 2
    # bad labels
    with pytest.raises(DiffusionLabError, match="0..3"):
        o.predict(x, t, labels=torch.full((9,), 4))
    with pytest.raises(DiffusionLabError, match="every class used"):
        ClassConditionalMixtureOracle.from_spec({**ring_spec(2), "classes": [0, 2]})


@pytest.mark.parametrize("prediction", ["eps", "x0", "v"])
def test_guidance_weights_and_one_doubled_call(prediction):
    o = _oracle(prediction=prediction)
    x = torch.randn(5, 2, generator=torch.Generator().manual_seed(1), dtype=F64)
    t = torch.tensor(0.2, dtype=F64)
    lab = torch.tensor([0, 1, 2, 0, 1])
    cond = o.predict(x, t, labels=lab)
    unc = o.predict(x, t, labels=torch.full((5,), 3))
    for w in (0.0, 1.0, 2.5, -0.5):
        m = GuidedModel(o, lab, w)
        o.nfe = 0
        p = m.predict(x, t)
        assert o.nfe == 1 and m.nfe == 1  # one evaluation (of a doubled batch when 0 != w != 1)
        ref_eps = unc.eps + w * (cond.eps - unc.eps)
        ref_x0 = unc.x0 + w * (cond.x0 - unc.x0)
        # different code paths (one batched call vs two calls): a few ulps
        assert torch.allclose(p.eps, ref_eps, rtol=1e-12, atol=1e-12)
        assert torch.allclose(p.x0, ref_x0, rtol=1e-12, atol=1e-12)
        # the guided eps and x0 are one model: x_t = s x0 + sigma eps
        assert torch.allclose(p.s * p.x0 + p.sigma * p.eps, x, rtol=1e-12, atol=1e-12)
        assert torch.allclose(o.parametrization.target(p.eps, p.x0, p.s, p.sigma), p.out, rtol=1e-10, atol=1e-10)
        kind = {0.0: "unconditional", 1.0: "conditional"}.get(w, "doubled")
        assert m.calls[kind] == 1 and sum(m.calls.values()) == 1
    assert torch.equal(GuidedModel(o, lab, 1.0).predict(x, t).eps, cond.eps)
    assert torch.equal(GuidedModel(o, lab, 0.0).predict(x, t).eps, unc.eps)


def test_guidance_interval_applies_w_only_inside():
    o = _oracle()
    lab = 1
    x = torch.randn(4, 2, generator=torch.Generator().manual_seed(2), dtype=F64)
    m = GuidedModel(o, lab, 3.0, interval=(0.5, 2.0))
    inside, outside = torch.tensor(0.3, dtype=F64), torch.tensor(0.9, dtype=F64)
    for t in (inside, outside):
        _, s, sigma = o.coeffs(t, x)
        sig = float((sigma / s).reshape(-1)[0])
        want = GuidedModel(o, lab, 3.0 if 0.5 < sig <= 2.0 else 1.0).predict(x, t).eps
        assert torch.allclose(m.predict(x, t).eps, want, rtol=1e-12, atol=1e-12)
    assert m.calls == {"doubled": 1, "conditional": 1, "unconditional": 0}
    # per-row times across the interval's edge: rows outside get w = 1
    tt = torch.tensor([0.3, 0.9, 0.3, 0.9], dtype=F64)
    p = m.predict(x, tt)
    for i in range(4):
        assert torch.allclose(p.eps[i], m.predict(x[i:i + 1], tt[i]).eps[0], rtol=1e-12, atol=1e-12)
    with pytest.raises(DiffusionLabError, match="0 <= lo < hi"):
        GuidedModel(o, lab, 2.0, interval=(2.0, 1.0))


def test_labels_repeat_for_particles_and_are_checked():
    o = _oracle()
    m = LabelledModel(o, torch.tensor([0, 2]))
    x = torch.randn(6, 2, dtype=F64)
    p = m.predict(x, torch.tensor(0.5, dtype=F64))
    ref = o.predict(x, torch.tensor(0.5, dtype=F64), labels=torch.tensor([0, 0, 0, 2, 2, 2]))
    assert torch.equal(p.eps, ref.eps)
    with pytest.raises(DiffusionLabError, match="multiple"):
        m.predict(torch.randn(5, 2, dtype=F64), 0.5)
    with pytest.raises(DiffusionLabError, match="not a class"):
        LabelledModel(o, 3)
    with pytest.raises(DiffusionLabError, match="not class-conditional"):
        condition_on_class(GaussianMixtureOracle.from_spec(ring_spec(), "vp"), 0)
    with pytest.raises(DiffusionLabError, match="finite"):
        GuidedModel(o, 0, float("nan"))


@pytest.mark.parametrize("sampler,process,steps", [("ddim", "vp", 50), ("ddpm", "vp", 50), ("dpmpp-2m", "vp-sde", 20),
                                                   ("euler-maruyama", "vp-sde", 50), ("heun", "ve-sde", 20)])
def test_every_sampler_guides_unchanged(sampler, process, steps):
    """w = 1 is the labelled model and w = 0 the unconditional one, through any sampler (same noise: the samples agree
    to rounding); w = 3 differs."""
    o = _oracle(process)
    spec = get_sampler(sampler)
    lab = torch.tensor([0, 1, 2] * 4)

    def run(model):
        return sample_in_chunks(spec, model, (2,), 12, generator=torch.Generator().manual_seed(4), dtype=F64,
                                grid=steps)

    with torch.no_grad():
        plain = run(LabelledModel(o, lab))
        w1 = run(GuidedModel(o, lab, 1.0, interval=(0.0, math.inf)))  # doubled calls, w = 1: the conditional model
        unc = run(o)
        w0 = run(GuidedModel(o, lab, 0.0))
        w3 = run(GuidedModel(o, lab, 3.0))
    assert torch.allclose(w1, plain, rtol=1e-8, atol=1e-8)
    assert torch.allclose(w0, unc, rtol=1e-8, atol=1e-8)
    assert (w3 - plain).abs().max() > 1e-3


def test_guided_samples_follow_the_exact_class_distributions():
    """w = 1 samples the class mixture and w = 0 the whole mixture: the Bayes classifier's component frequencies
    match the exact weights (multinomial tolerances)."""
    o = _oracle("vp")
    n = 1500
    spec = get_sampler("ddpm")
    for w, label in ((1.0, 0), (1.0, 2), (0.0, 1)):
        with torch.no_grad():
            x = sample_in_chunks(spec, GuidedModel(o, label, w), (2,), n, generator=torch.Generator().manual_seed(7),
                                 dtype=F64, grid=200)
        comp = o.component_of(x)
        freq = torch.bincount(comp, minlength=6).to(F64) / n
        if w == 1.0:
            mine = o.classes == label
            want = torch.where(mine, o.weights / o.weights[mine].sum(), torch.zeros_like(o.weights))
        else:
            want = o.weights
        sd = (want * (1 - want) / n).sqrt()
        # 4.5 sd per component (6 components; a sampler error of 200 DDPM steps is far below the 1/sqrt(n) noise)
        assert bool(((freq - want).abs() <= 4.5 * sd + 1e-12).all()), (w, label, freq, want)
        # and the samples sit on the components: the exact class log-density is that of exact draws
        exact = o.class_oracle(label).sample_data(n, torch.Generator().manual_seed(8)) if w == 1.0 else \
            o.sample_data(n, torch.Generator().manual_seed(8))
        ref = o.class_oracle(label) if w == 1.0 else o
        lp, lq = ref.log_prob(x), ref.log_prob(exact)
        # means of n log-densities: se ~ sd / sqrt(n) each (0.04 here); 5 se of the difference, with no allowance
        # for the 200-step sampler's bias (measured: 0.017-0.039, within one se)
        se = math.sqrt(lp.var() / n + lq.var() / n)
        assert abs(float(lp.mean() - lq.mean())) < 5 * se, (float(lp.mean()), float(lq.mean()))


def test_guidance_weight_is_checked_once_everywhere():
    """One check (``check_guidance``) for every entry: a NaN or infinite weight is refused as such, not passed
    through (NaN compared unequal to 0 and 1 and reached the guided mix) nor misreported as a missing class."""
    from diffusionlab.conditioning.generate import generate_conditional
    from diffusionlab.conditioning.guidance import check_guidance

    assert check_guidance(None) is None and check_guidance(2) == 2.0
    for bad in (float("nan"), float("inf"), True, "2"):
        with pytest.raises(DiffusionLabError, match="finite number"):
            check_guidance(bad)
    with pytest.raises(DiffusionLabError, match="finite number"):
        generate_conditional(None, (2,), 4, 0, "cpu", guidance=float("nan"))
