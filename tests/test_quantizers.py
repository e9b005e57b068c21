"""Every registered binarizer/quantizer: the right value set and the documented gradient."""

import math

import pytest
import torch

from bdmtool.trainer.quantizers import ACT_QUANTIZERS, WEIGHT_BINARIZERS, get_act_quantizer, sign
from bdmtool.trainer.runtime import has_cxx_compiler

torch.manual_seed(0)
W = torch.randn(6, 4, 3, 3) * 0.8
X = torch.randn(2, 5, 4, 4) * 1.3


def _grad(fn, x, *params):
    x = x.clone().requires_grad_(True)
    ps = [p.clone().requires_grad_(True) if isinstance(p, torch.Tensor) else p for p in params]
    y = fn(x, *ps)
    g_out = torch.randn_like(y)
    (y * g_out).sum().backward()
    return y.detach(), x.grad, [p.grad for p in ps if isinstance(p, torch.Tensor)], g_out


def _mean_abs(w):
    return w.abs().mean(dim=(1, 2, 3), keepdim=True)


def _ind(x, c=1.0):
    return (x.abs() <= c).float()


# name -> (extra params, expected output, expected d/dW given upstream g)
WEIGHT_CASES = {
    "ste_sign": ((), lambda w: sign(w), lambda w, g: g * _ind(w)),
    "scaled_sign": ((_mean_abs(W) * 1.1,), lambda w: _mean_abs(W) * 1.1 * sign(w),
                    lambda w, g: g * _mean_abs(W) * 1.1 * _ind(w)),
    "magnitude_aware_sign": ((), lambda w: _mean_abs(w) * sign(w), lambda w, g: g * _ind(w)),
    "dorefa": ((), lambda w: w.abs().mean() * sign(w), lambda w, g: g),
    "reste": ((), lambda w: w.abs().mean() * sign(w),
              lambda w, g: g * w.abs().mean() * torch.where(w.abs() <= 0.1, torch.ones_like(w),
                                                          torch.where(w.abs() <= 1.5, torch.ones_like(w), 0 * w))),
}


def test_every_weight_binarizer_has_a_case():
    assert set(WEIGHT_BINARIZERS) == set(WEIGHT_CASES) | {"ebb"}


@pytest.mark.parametrize("name", sorted(WEIGHT_CASES))
def test_weight_binarizer_values_and_gradient(name):
    params, expect_y, expect_g = WEIGHT_CASES[name]
    y, gw, _, g = _grad(WEIGHT_BINARIZERS[name], W, *params)
    assert torch.allclose(y, expect_y(W), atol=1e-6)
    # two magnitudes per output channel (one for per-tensor scales): binary up to a positive scale
    for o in range(W.shape[0]):
        assert y[o].abs().unique().numel() == 1
    assert torch.allclose(gw, expect_g(W, g), atol=1e-6)


def test_ebb_two_bases_values_and_gradients():
    s1 = _mean_abs(W).clone()
    s2 = (W - s1 * sign(W)).abs().mean(dim=(1, 2, 3), keepdim=True)
    y, gw, (g1, g2), g = _grad(WEIGHT_BINARIZERS["ebb"], W, s1, s2)
    r = W - s1 * sign(W)
    assert torch.allclose(y, s1 * sign(W) + s2 * sign(r), atol=1e-6)
    for o in range(W.shape[0]):
        assert y[o].unique().numel() <= 4  # +-s1 +- s2
    assert torch.allclose(gw, g * (s1 * _ind(W) + s2 * _ind(r) * (1 - s1 * _ind(W))), atol=1e-5)
    assert torch.allclose(g1, (g * (sign(W) - s2 * _ind(r) * sign(W))).sum(dim=(1, 2, 3), keepdim=True), atol=1e-5)
    assert torch.allclose(g2, (g * sign(r)).sum(dim=(1, 2, 3), keepdim=True), atol=1e-5)
    y1 = WEIGHT_BINARIZERS["ebb"](W, s1, None)  # stage 2: only the first basis
    assert torch.allclose(y - y1, s2 * sign(r))


def _approx(x):
    return torch.clamp(2 - 2 * x.abs(), min=0)


ACT_CASES = {
    "identity": ((), lambda x: x, lambda x, g: g),
    "ste_sign": ((), lambda x: sign(x), lambda x, g: g * _ind(x)),
    "approx_sign": ((), lambda x: sign(x), lambda x, g: g * _approx(x)),
    "rsign": ((torch.linspace(-0.5, 0.5, 5).reshape(1, 5, 1, 1),),
              lambda x: sign(x + torch.linspace(-0.5, 0.5, 5).reshape(1, 5, 1, 1)),
              lambda x, g: g * _approx(x + torch.linspace(-0.5, 0.5, 5).reshape(1, 5, 1, 1))),
    "dorefa": ((), lambda x: torch.round(x.clamp(0, 1)), lambda x, g: g * ((x >= 0) & (x <= 1)).float()),
    "reste": ((), lambda x: sign(x), lambda x, g: g * torch.where(x.abs() > 1.5, 0 * x, torch.ones_like(x))),
}


def test_every_act_quantizer_has_a_case():
    assert set(ACT_QUANTIZERS) == set(ACT_CASES) | {"lsq"}


@pytest.mark.parametrize("name", sorted(ACT_CASES))
def test_act_quantizer_values_and_gradient(name):
    params, expect_y, expect_g = ACT_CASES[name]
    y, gx, _, g = _grad(ACT_QUANTIZERS[name], X, *params)
    assert torch.allclose(y, expect_y(X), atol=1e-6)
    if name not in ("identity",):
        assert set(y.unique().tolist()) <= ({0.0, 1.0} if name == "dorefa" else {-1.0, 1.0})
    assert torch.allclose(gx, expect_g(X, g), atol=1e-6)


def test_sign_of_zero_is_plus_one_like_lce():
    for name in ("ste_sign", "approx_sign", "reste"):
        assert ACT_QUANTIZERS[name](torch.zeros(3)).tolist() == [1.0, 1.0, 1.0]
    assert ACT_QUANTIZERS["rsign"](torch.zeros(1, 2, 1, 1), torch.zeros(1, 2, 1, 1)).flatten().tolist() == [1.0, 1.0]


@pytest.mark.parametrize("bits", [4, 8])
def test_lsq_values_and_gradients(bits):
    qn, qp = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    step = torch.tensor(0.21)
    y, gx, (gs,), g = _grad(get_act_quantizer("lsq"), X, step, bits)
    q = y / step
    assert torch.allclose(q, q.round(), atol=1e-5) and q.min() >= qn and q.max() <= qp
    v = X / step
    inside = ((v >= qn) & (v <= qp)).float()
    assert torch.allclose(gx, g * inside)
    d = torch.where(v < qn, torch.tensor(float(qn)), torch.where(v > qp, torch.tensor(float(qp)), v.round() - v))
    expect = (g * d).sum() / math.sqrt(X.numel() * qp)
    assert torch.allclose(gs, expect, rtol=1e-4, atol=1e-6)


def test_reste_gradient_shape_follows_o():
    x = torch.tensor([0.05, 0.5, 1.2, 2.0], requires_grad=True)
    ACT_QUANTIZERS["reste"](x, o=3.0).sum().backward()
    o = 3.0
    expect = [0.1 ** (1 / o) / 0.1, (1 / o) * 0.5 ** ((1 - o) / o), (1 / o) * 1.2 ** ((1 - o) / o), 0.0]
    assert torch.allclose(x.grad, torch.tensor(expect), atol=1e-6)


def test_unknown_names_list_choices():
    from bdmtool.trainer.quantizers import get_weight_binarizer

    with pytest.raises(ValueError, match="choose from"):
        get_weight_binarizer("xnor_scaled")
    with pytest.raises(ValueError, match="choose from"):
        get_act_quantizer("swish_sign")


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("step_shape", [(), (1,)])
def test_fused_lsq_equals_the_autograd_chain_bit_for_bit(bits, step_shape):
    """The one-node LSQ (trainer speed) gives the same output and the same gradients to x and to a
    log-parametrised step as the div/clamp/round/mul chain, exactly: a training run is the same either way."""
    from bdmtool.trainer.quantizers import lsq_autograd

    torch.manual_seed(bits)
    x = (torch.randn(4, 8, 7, 7) * 0.3 * 2 ** (bits - 1)).requires_grad_()  # some beyond the clamp
    log_step = torch.full(step_shape, -1.3, requires_grad=True)
    g = torch.randn(4, 8, 7, 7)
    got = []
    for fn in (get_act_quantizer("lsq"), lsq_autograd):
        x.grad = log_step.grad = None
        y = fn(x, log_step.exp(), bits)
        y.backward(g)
        got.append((y.detach(), x.grad.clone(), log_step.grad.clone()))
    (y1, gx1, gs1), (y2, gx2, gs2) = got
    assert torch.equal(y1, y2) and torch.equal(gx1, gx2) and torch.equal(gs1, gs2)
    assert (gx1 == 0).any() and (gx1 != 0).any()  # both sides of the clamp are exercised


@pytest.mark.skipif(not has_cxx_compiler(),
                    reason="train.kernels=compiled needs a C++ compiler (torch.compile's CPU backend)")
@pytest.mark.parametrize("bits", [4, 8])
def test_compiled_lsq_kernels_match_the_one_node_lsq(bits):
    """train.kernels=compiled: the output and d/dx are bit for bit those of the eager one-node LSQ, d/ds the same
    sum in another order; the kernels follow the forward's context into the backward."""
    from bdmtool.trainer.quantizers import kernels

    torch.manual_seed(bits)
    x = (torch.randn(4, 8, 7, 7) * 0.3 * 2 ** (bits - 1)).requires_grad_()
    log_step = torch.full((), -1.3, requires_grad=True)
    g = torch.randn(4, 8, 7, 7)
    got = []
    for mode in ("eager", "compiled"):
        x.grad = log_step.grad = None
        with kernels(mode):
            y = get_act_quantizer("lsq")(x, log_step.exp(), bits)
        assert y.grad_fn.name() == ("_LSQCompiledBackward" if mode == "compiled" else "_LSQBackward")
        y.backward(g)
        got.append((y.detach(), x.grad.clone(), log_step.grad.clone()))
    (y1, gx1, gs1), (y2, gx2, gs2) = got
    assert torch.equal(y1, y2) and torch.equal(gx1, gx2)
    assert torch.allclose(gs1, gs2, rtol=1e-4, atol=1e-6) and (gx1 == 0).any()
    with pytest.raises(ValueError, match="choose one of"):
        kernels("fast")


@pytest.mark.skipif(not has_cxx_compiler(),
                    reason="train.kernels=compiled needs a C++ compiler (torch.compile's CPU backend)")
@pytest.mark.parametrize("act", ["ste_sign", "approx_sign", "rsign"])
def test_compiled_sign_kernels_match_the_eager_signs(act):
    """train.kernels=compiled for the 1-bit activations: sign output and d/dx bit for bit those of the eager
    nodes (both sides of the clip / ApproxSign's triangle and exact zeros exercised), RSign's d/dthreshold the
    same per-channel sum in another order."""
    from bdmtool.trainer.quantizers import kernels

    torch.manual_seed(0)
    x = torch.randn(4, 8, 7, 7) * 1.5
    x[0, 0, 0, :3] = torch.tensor([0.0, -0.0, 1.0])  # the sign's boundary and the clip's edge
    x.requires_grad_()
    threshold = (torch.randn(1, 8, 1, 1) * 0.1).requires_grad_()
    g = torch.randn(4, 8, 7, 7)
    got = []
    for mode in ("eager", "compiled"):
        x.grad = threshold.grad = None
        with kernels(mode):
            args = (x, threshold) if act == "rsign" else (x,)
            y = get_act_quantizer(act)(*args)
        assert ("Compiled" in y.grad_fn.name()) == (mode == "compiled")
        y.backward(g)
        got.append((y.detach(), x.grad.clone(), None if threshold.grad is None else threshold.grad.clone()))
    (y1, gx1, gb1), (y2, gx2, gb2) = got
    assert torch.equal(y1, y2) and torch.equal(gx1, gx2)
    assert set(y1.unique().tolist()) == {-1.0, 1.0} and (gx1 == 0).any() and (gx1 != 0).any()
    if act == "rsign":
        assert gb1.shape == gb2.shape == (1, 8, 1, 1) and torch.allclose(gb1, gb2, rtol=1e-5, atol=1e-6)
    else:
        assert gb1 is None and gb2 is None
