"""binarize_: what is swapped, what the binary layer computes (the deployable semantics), EBB, TBS cache."""

import math
import copy

import pytest
import torch
import torch.nn.functional as F

from bdmtool.trainer.binarize import (BinaryConv2d, apply_schedule_, binarize_, binary_layers, calibrate_,
                                      level_groups, reset_state)
from bdmtool.trainer.distill import spd_loss
from bdmtool.trainer.quantizers import sign
from bdmtool.trainer.spec import METHODS, BinarizeConfig, UNetConfig
from bdmtool.trainer.unet import UNet

CFG = UNetConfig(in_channels=1, out_channels=1, ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(16,),
                 dropout=0.0)


def _model():
    torch.manual_seed(0)
    return UNet(CFG)


@pytest.mark.parametrize("method", sorted(METHODS))
def test_swap_keeps_names_and_fp_layers(method):
    cfg = BinarizeConfig.from_method(method)
    fp = _model()
    model = binarize_(copy.deepcopy(fp), cfg)
    names = {m.name for m in binary_layers(model)}
    assert "conv_in" not in names and "conv_out" not in names and not any(n.startswith("temb.dense") for n in names)
    assert "down.0.block.0.conv1" in names and "down.0.block.0.temb_proj" in names and "mid.attn_1.q" in names
    assert ("down.1.block.0.nin_shortcut" in names) == (method != "bidm")  # BiDM keeps nin_shortcut FP
    sd = model.state_dict()
    for k, v in fp.state_dict().items():  # latent weights keep their names and values
        if k.endswith("weight"):
            assert torch.equal(sd[k], v), k
    x, t = torch.randn(2, 1, 32, 32), torch.tensor([5.0, 700.0])
    calibrate_(model, x, t)
    y = model(x, t)
    assert y.shape == x.shape and torch.isfinite(y).all()


def _layer(cfg, conv=None, ebb=False):
    torch.manual_seed(1)
    conv = conv or torch.nn.Conv2d(8, 16, 3, padding=1)
    return BinaryConv2d(conv, cfg, "layer", in_hw=(6, 6), ebb=ebb), conv


def test_one_bit_layer_pads_binary_input_with_plus_one_and_matches_manual_conv():
    cfg = BinarizeConfig.from_method("xnor").replace(act_scale="none")
    layer, conv = _layer(cfg)
    x = torch.randn(2, 8, 6, 6)
    x[0, 0, 0, 0] = 0.0  # sign(0) = +1
    w = conv.weight.detach()
    wb = w.abs().mean(dim=(1, 2, 3), keepdim=True) * sign(w)
    manual = F.conv2d(F.pad(sign(x), (1, 1, 1, 1), value=1.0), wb) + conv.bias.reshape(1, -1, 1, 1)
    assert torch.equal(layer(x), manual)


def test_multibit_layer_pads_quantized_input_with_top_level():
    """Multi-bit inputs are padded with Qp * step: every +-1 bit plane padded with +1 (LCE same-one)."""
    cfg = BinarizeConfig.from_method("baseline", abits=4)
    layer, conv = _layer(cfg)
    with torch.no_grad():
        layer.set_step_(0.25)
    x = torch.randn(2, 8, 6, 6)
    xq = torch.round(torch.clamp(x / 0.25, -8, 7)) * 0.25
    wb = layer.sigma1 * sign(conv.weight)
    manual = F.conv2d(F.pad(xq, (1, 1, 1, 1), value=7 * 0.25), wb, conv.bias)
    assert torch.allclose(layer(x), manual, atol=1e-6)


def test_multibit_layer_with_zero_padding_pads_quantized_input_with_zero():
    """binarize.act_pad=zero (for the int8 deployment path): the quantized input is padded with 0; the presets
    keep the top level (see docs/methods.md for why)."""
    cfg = BinarizeConfig.from_method("baseline", abits=4).replace(act_pad="zero")
    layer, conv = _layer(cfg)
    with torch.no_grad():
        layer.set_step_(0.25)
    x = torch.randn(2, 8, 6, 6)
    xq = torch.round(torch.clamp(x / 0.25, -8, 7)) * 0.25
    manual = F.conv2d(F.pad(xq, (1, 1, 1, 1), value=0.0), layer.sigma1 * sign(conv.weight), conv.bias)
    assert torch.allclose(layer(x), manual, atol=1e-6)
    assert {BinarizeConfig.from_method(m, abits=b).act_pad for m in ("binarydm", "baseline") for b in (4, 8)} == {"top"}


def test_dc_bypass_adds_the_gain_times_the_image_mean_and_learns():
    """binarize.dc_bypass=timestep_gain: eps + g[t * buckets // T] * mean_hw(x) per image and channel, g from 0,
    stored as gain_raw with g = lr_scale * gain_raw; the whole-model hook survives a deep copy."""
    cfg = BinarizeConfig.from_method("baseline", abits=4).replace(dc_bypass="timestep_gain", dc_bypass_buckets=20)
    model = binarize_(_model(), cfg)
    x, t = torch.randn(3, 1, 32, 32), torch.tensor([0.0, 49.0, 999.0])
    base = model(x, t)
    assert torch.equal(model.dc_bypass.gains(), torch.zeros(20))
    with torch.no_grad():
        model.dc_bypass.gain_raw.copy_(torch.arange(20.0) / 1000)  # g = arange * 0.1
    got = model(x, t)
    g = torch.tensor([0.0, 0.0, 1.9])  # buckets 0 (t=0), 0 (t=49), 19 (t=999)
    assert torch.allclose(got - base, g.reshape(3, 1, 1, 1) * x.mean(dim=(2, 3), keepdim=True), atol=1e-6)
    twin = copy.deepcopy(model)
    with torch.no_grad():
        twin.dc_bypass.gain_raw.zero_()
    assert torch.allclose(twin(x, t), base, atol=1e-6) and torch.allclose(model(x, t), got)
    model(x, t).square().mean().backward()
    assert model.dc_bypass.gain_raw.grad[19] != 0 and model.dc_bypass.gain_raw.grad[5] == 0


def _bypass_and_plain(mode: str):
    """A W1A4 student with dc_bypass=mode (10 buckets), its plain twin, inputs at t = 0 / 450 / 999 and the plain
    output; the bypass starts as the plain student."""
    plain = binarize_(_model(), BinarizeConfig.from_method("baseline", abits=4).replace(dc_bypass="none"))
    model = binarize_(_model(), BinarizeConfig.from_method("baseline", abits=4).replace(
        dc_bypass=mode, dc_bypass_buckets=10))
    model.load_state_dict(plain.state_dict(), strict=False)
    x, t = torch.randn(3, 1, 32, 32), torch.tensor([0.0, 450.0, 999.0])
    base = plain(x, t)
    assert torch.equal(model(x, t), base)
    return model, x, t, base


def test_affine_dc_bypass_replaces_the_image_mean_and_starts_as_the_plain_student():
    """binarize.dc_bypass=timestep_affine: eps - h[b] mean_hw(eps) + g[b] mean_hw(x) + c[b]; all tables start at 0
    (the plain binarized output), and h = 1 removes the network's own image mean exactly."""
    model, x, t, base = _bypass_and_plain("timestep_affine")
    s = model.dc_bypass.lr_scale
    with torch.no_grad():
        model.dc_bypass.remove_raw.fill_(1.0 / s)
        model.dc_bypass.gain_raw.copy_(torch.arange(10.0) / s)  # g = bucket index
        model.dc_bypass.offset_raw.fill_(0.5 / s)
    got = model(x, t)
    g = torch.tensor([0.0, 4.0, 9.0]).reshape(3, 1, 1, 1)
    want = base - base.mean(dim=(2, 3), keepdim=True) + g * x.mean(dim=(2, 3), keepdim=True) + 0.5
    assert torch.allclose(got, want, atol=1e-5)
    assert torch.allclose(got.mean(dim=(2, 3), keepdim=True), g * x.mean(dim=(2, 3), keepdim=True) + 0.5, atol=1e-5)
    model(x, t).square().mean().backward()
    tabs = model.dc_bypass
    assert all(p.grad[9] != 0 and p.grad[1] == 0 for p in (tabs.gain_raw, tabs.remove_raw, tabs.offset_raw))


def test_skip_bypass_adds_a_per_pixel_float_skip_and_starts_as_the_plain_student():
    """binarize.dc_bypass=timestep_skip: the affine path - r[b] (eps - mean eps) + s[b] (x - mean x); all tables
    start at 0, and h = r = s = g = 1, c = 0 gives eps = x_t exactly (what the teacher approaches at t = T)."""
    model, x, t, base = _bypass_and_plain("timestep_skip")
    tabs = model.dc_bypass
    with torch.no_grad():
        for name in ("remove", "gain", "shrink", "skip"):
            getattr(tabs, f"{name}_raw")[9] = 1.0 / tabs.scale(name)  # the bucket of t = 999 only
        tabs.skip_raw[4] = 0.5 / tabs.scale("skip")  # t = 450: half a pixel skip on top of the plain output
    got = model(x, t)
    assert torch.allclose(got[2], x[2], atol=1e-5)
    assert torch.equal(got[0], base[0])
    assert torch.allclose(got[1], base[1] + 0.5 * (x[1] - x[1].mean()), atol=1e-5)
    model(x, t).square().mean().backward()
    assert all(p.grad[9] != 0 and p.grad[1] == 0 for p in (tabs.shrink_raw, tabs.skip_raw))
    assert set(tabs.tables()) == {"gain", "remove", "offset", "shrink", "skip"}
    assert tabs.scale("skip") == tabs.scale("gain") == 100  # dc_bypass_skip_lr_scale=0: the same as the DC tables
    own = binarize_(_model(), BinarizeConfig.from_method("baseline", abits=4).replace(
        dc_bypass="timestep_skip", dc_bypass_skip_lr_scale=10.0)).dc_bypass
    assert (own.scale("gain"), own.scale("remove"), own.scale("shrink"), own.scale("skip")) == (100, 100, 10, 10)


def test_log_lsq_step_computes_the_same_layer_and_stays_positive():
    """binarize.lsq_step=log: the parameter is log(step); the layer equals the learned-step layer at the same step,
    the deployed step is exp(log_step), and steps that Adam would drive through zero stay positive."""
    lin, _ = _layer(BinarizeConfig.from_method("baseline", abits=4).replace(lsq_step="learned"))
    log, _ = _layer(BinarizeConfig.from_method("baseline", abits=4).replace(lsq_step="log"))
    assert log.step is None and lin.log_step is None
    for m in (lin, log):
        m.set_step_(0.03)
    assert torch.allclose(log.log_step, torch.tensor(0.03).log())
    assert torch.allclose(log.learned_step(), lin.learned_step())
    x = torch.randn(2, 8, 6, 6)
    assert torch.allclose(lin(x), log(x), atol=1e-6)
    # A loss that wants smaller steps (LSQ's step gradient outside the clamp is Qp or Qn): Adam at lr 1e-2
    # moves the raw step by ~0.01 per iteration and crosses zero within a few steps; the log step cannot.
    for m in (lin, log):
        opt = torch.optim.Adam([p for n, p in m.named_parameters() if "step" in n], lr=1e-2)
        for _ in range(20):
            opt.zero_grad()
            m.learned_step().backward()  # d(step) > 0: the optimizer shrinks it
            opt.step()
    assert lin.learned_step().item() < 0 < log.learned_step().item()


def test_linear_is_a_one_by_one_binary_conv():
    cfg = BinarizeConfig.from_method("xnor")
    lin = torch.nn.Linear(12, 5)
    layer = BinaryConv2d(lin, cfg, "lin")
    x = torch.randn(3, 12)
    wb = lin.weight.abs().mean(dim=1, keepdim=True) * sign(lin.weight)
    assert torch.allclose(layer(x), F.linear(sign(x), wb, lin.bias), atol=1e-6)


def test_ebb_stage_switch_changes_output_only_by_the_sigma2_term():
    cfg = BinarizeConfig.from_method("binarydm", abits=4).replace(progressive="none")
    layer, conv = _layer(cfg, ebb=True)
    with torch.no_grad():
        layer.set_step_(0.2)
    assert layer.sigma2 is not None and bool(layer.second_basis)
    x = torch.randn(2, 8, 6, 6)
    y1 = layer(x)
    w = layer.weight.detach()
    r = w - layer.sigma1 * sign(w)
    xq = F.pad(layer.quantize_input(x), (1, 1, 1, 1), value=7 * 0.2)  # multi-bit border: Qp * step
    sigma2_term = F.conv2d(xq, layer.sigma2 * sign(r))
    layer.second_basis.fill_(False)  # stage 2
    y2 = layer(x)
    assert torch.allclose(y1 - y2, sigma2_term, atol=1e-5)
    assert not torch.allclose(y1, y2)


def test_schedule_is_a_pure_function_of_the_step():
    cfg = BinarizeConfig.from_method("binarydm").replace(ebb_stage2_step=10, progressive_every=2)
    model = binarize_(_model(), cfg)
    groups = level_groups(model)
    assert [g[0].name.split(".")[0] for g in groups[:3]] == ["mid", "down", "down"]
    assert all(m.name.startswith(("down.1", "up.1")) for m in groups[1])
    apply_schedule_(model, cfg, 0, 100)
    assert [bool(g[0].active) for g in groups] == [True] + [False] * (len(groups) - 1)
    apply_schedule_(model, cfg, 2, 100)
    assert [bool(g[0].active) for g in groups][:2] == [True, True]
    apply_schedule_(model, cfg, 9, 100)
    assert all(bool(m.second_basis) for m in binary_layers(model) if m.sigma2 is not None)
    apply_schedule_(model, cfg, 10, 100)
    assert all(bool(m.active) for m in binary_layers(model))
    assert not any(bool(m.second_basis) for m in binary_layers(model))


def test_inactive_layer_is_the_original_conv():
    cfg = BinarizeConfig.from_method("binarydm")
    fp = _model()
    model = binarize_(copy.deepcopy(fp), cfg)
    for m in binary_layers(model):
        m.active.fill_(False)
    x, t = torch.randn(2, 1, 32, 32), torch.tensor([10.0, 900.0])
    assert torch.allclose(model(x, t), fp(x, t), atol=1e-5)


def test_tbs_cache_reset_fill_and_mix():
    cfg = BinarizeConfig.from_method("bidm").replace(timestep_cache=("up.1.attn.*",))
    model = binarize_(_model(), cfg)
    cache = model.tbs_cache
    assert cache.sites == ["up.1.attn.0", "up.1.attn.1"]
    with torch.no_grad():
        cache.alpha.fill_(0.25)
    x, t = torch.randn(2, 1, 32, 32), torch.tensor([100.0, 100.0])
    reset_state(model)
    with torch.no_grad():
        y_first = model(x, t)  # empty cache: no mixing, outputs recorded
        assert set(cache.cache) == {"up.1.attn.0", "up.1.attn.1"}
        reset_state(model)
        assert cache.cache == {}
        y_again = model(x, t)
        assert torch.equal(y_first, y_again)
        # Second call with a filled cache mixes: the site output becomes (1-a) out + a prev.
        site = model.get_submodule("up.1.attn.0")
        seen = {}
        h = site.register_forward_hook(lambda m, i, o: seen.setdefault("out", o))  # runs after the mix hook
        model(x, t)
        h.remove()
        assert torch.equal(cache.cache["up.1.attn.0"], seen["out"])  # the cache holds the mixed output
        # recording_only fills without mixing (a whole forward when told not to stop at the last site)
        reset_state(model)
        cache.recording_only, cache.stop_when_filled = True, False
        y_rec = model(x, t)
        cache.recording_only, cache.stop_when_filled = False, True
        assert torch.equal(y_rec, y_first)
        full = dict(cache.cache)
        cache.record(model, x, t)  # training's pass: stops at the last site, records the same tensors
        assert cache.cache.keys() == full.keys() and all(torch.equal(cache.cache[k], full[k]) for k in full)
        assert not cache.recording_only
    assert cache.bucket(torch.tensor([0, 9, 10, 999])).tolist() == [0, 0, 1, 99]


def test_tbs_mix_formula_on_a_site():
    cfg = BinarizeConfig.from_method("bidm").replace(timestep_cache=("mid.attn_1",))
    model = binarize_(_model(), cfg)
    cache = model.tbs_cache
    with torch.no_grad():
        cache.alpha.fill_(0.0)
        cache.alpha[3, 0] = 0.4  # bucket of t = 30..39
    site = model.get_submodule("mid.attn_1")
    captured = {}
    site.register_forward_pre_hook(lambda m, i: captured.__setitem__("x", i[0]))
    x, t = torch.randn(1, 1, 32, 32), torch.tensor([35.0])
    with torch.no_grad():
        reset_state(model)
        model(x, t)
        prev = cache.cache["mid.attn_1"].clone()
        model(x * 0.5, t)
        raw = site.forward(captured["x"])  # the module's own output (hooks not run by .forward)
        assert torch.allclose(cache.cache["mid.attn_1"], 0.6 * raw + 0.4 * prev, atol=1e-6)


def test_spd_equals_hand_computation():
    torch.manual_seed(3)
    fs, ft = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    total = 0.0
    for i in range(2):
        for j in range(2):
            ps, pt = fs[..., 2 * i:2 * i + 2, 2 * j:2 * j + 2], ft[..., 2 * i:2 * i + 2, 2 * j:2 * j + 2]
            qs = torch.einsum("bcix,bcjx->bcij", ps, ps)
            qt = torch.einsum("bcix,bcjx->bcij", pt, pt)
            qs, qt = qs / qs.pow(2).sum().sqrt(), qt / qt.pow(2).sum().sqrt()
            total += float((qs - qt).pow(2).sum().sqrt())
    assert spd_loss({"f": fs}, {"f": ft}, patches=2) == pytest.approx(total / 4, rel=1e-5)
    assert float(spd_loss({"f": fs}, {"f": fs.clone()}, patches=2)) == pytest.approx(0.0, abs=1e-6)
    assert float(spd_loss({"f": fs}, {"f": ft}, patches=2, variant="paper")) > 0


@pytest.mark.parametrize("variant", ["code", "paper"])
@pytest.mark.parametrize("shape,patches", [((2, 3, 8, 8), 4), ((2, 3, 7, 7), 4), ((2, 5, 9, 6), 2), ((1, 2, 3, 5), 4)])
def test_batched_spd_equals_the_patch_loop(variant, shape, patches):
    """One batched product over zero-padded patches (``spd_loss``) = the official per-patch loop, value and
    gradient, for equal and unequal patches (7 / 4 -> sizes 1, 2, 2, 2) and more patches than rows; and under a
    bf16 autocast it is computed in fp32 (the same value)."""
    from bdmtool.trainer.distill import spd_loss_reference

    torch.manual_seed(4)
    fs, ft = torch.randn(*shape, requires_grad=True), torch.randn(*shape)
    fr = fs.detach().clone().requires_grad_()
    got, want = spd_loss({"f": fs}, {"f": ft}, patches, variant), spd_loss_reference({"f": fr}, {"f": ft}, patches, variant)
    got.backward()
    want.backward()
    assert float(got) == pytest.approx(float(want), rel=1e-5) and float(want) > 0
    assert torch.allclose(fs.grad, fr.grad, rtol=1e-4, atol=1e-6 * float(fr.grad.abs().max()))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = spd_loss({"f": fs.detach()}, {"f": ft}, patches, variant)
    assert low.dtype == torch.float32 and float(low) == pytest.approx(float(want), rel=1e-5)
    same = fs.detach().clone().requires_grad_()  # identical features: zero loss, finite (zero) gradient
    spd_loss({"f": same}, {"f": same.detach().clone()}, patches, variant).backward()
    assert torch.isfinite(same.grad).all() and float(same.grad.abs().max()) == 0.0


def test_invalid_configs_name_the_key():
    from bdmtool.trainer.config import ConfigError

    with pytest.raises(ConfigError, match="binarize.abits=4 needs binarize.act='lsq'"):
        BinarizeConfig(act="rsign", abits=4)
    with pytest.raises(ConfigError, match="unknown method 'xnor-net'"):
        BinarizeConfig.from_method("xnor-net")
    with pytest.raises(ValueError, match="matches no module"):
        binarize_(_model(), BinarizeConfig.from_method("bidm").replace(timestep_cache=("nope.*",)))


def test_lsq_per_batch_mode_reproduces_the_official_reinit():
    cfg = BinarizeConfig.from_method("baseline", abits=8).replace(lsq_step="per_batch", act_pad="top")
    layer, conv = _layer(cfg)
    x = torch.randn(2, 8, 6, 6) * 3
    s = 2 * x.abs().mean() / (127 ** 0.5)
    xq = F.pad(torch.round(torch.clamp(x / s, -128, 127)) * s, (1, 1, 1, 1), value=float(127 * s))
    expect = F.conv2d(xq, layer.sigma1 * sign(conv.weight), conv.bias)
    assert torch.allclose(layer(x), expect, atol=1e-5)
    with torch.no_grad():
        layer.step.fill_(123.0)  # the learned step is ignored in this mode
    assert torch.allclose(layer(x), expect, atol=1e-5)


def test_decision_margin_is_the_distance_to_each_quantizer_boundary():
    """sign: |x + threshold|; DoReFa's round(clip(x, 0, 1)): |x - 1/2|; LSQ: distance of x/s to k + 1/2, times s."""
    x = torch.tensor([0.3, -0.7, 0.52, 1.9]).reshape(1, 4, 1, 1).repeat(1, 2, 1, 1)  # 8 channels
    conv = torch.nn.Conv2d(8, 4, 1)
    # LSQ at s = 0.1: x/s = 3, -7, 5.2, 19 (outside [-8, 7]: no boundary); the nearest k + 1/2 is 5.5 from 5.2
    for method, abits, want in (("xnor", None, 0.3), ("dorefa", None, 0.02), ("baseline", 4, 0.3 * 0.1)):
        cfg = BinarizeConfig.from_method(method, abits=abits)
        layer = BinaryConv2d(conv, cfg, "l", in_hw=(1, 1))
        if layer.uses_lsq:
            layer.set_step_(0.1)
        assert float(layer.decision_margin(x)[0]) == pytest.approx(want, abs=1e-6), method


def test_certify_chance_reads_the_exponential_tail_from_the_best_margin():
    """Margins ~ Exp(rate): 8 draws at mean 1e-6 leave a 3e-6 margin likely within 120 more draws, also when other
    draws are hopeless for another reason; a multi-bit student's ~1e-7 margins make it hopeless."""
    from bdmtool.trainer.bundle import certify_chance

    g = torch.Generator().manual_seed(0)
    draws = torch.empty(8).exponential_(1e6, generator=g).tolist()  # mean 1e-6: P(>= 3e-6) = e^-3 per draw
    truth = 1 - (1 - math.exp(-3)) ** 120
    assert certify_chance(draws, 3e-6, 120) > 0.5 and truth > 0.99
    assert certify_chance(draws + [1e-9] * 10, 3e-6, 120) > 0.5  # hopeless timesteps do not hide the tail
    assert certify_chance([2e-7, 1e-7, 4e-7, 3e-7] * 8, 3e-6, 96) < 0.01
    assert certify_chance([], 3e-6, 5) == 1.0 and certify_chance([0.0, 0.0], 3e-6, 5) == 0.0
    assert certify_chance([1e-7, 5e-6], 3e-6, 5) == 1.0


@pytest.mark.parametrize("method,abits", [("binarydm", 4), ("xnor", None)])
def test_reference_search_stops_early_only_when_certification_is_hopeless(method, abits):
    from types import SimpleNamespace

    from bdmtool.trainer.bundle import reference_inputs

    model = binarize_(_model(), BinarizeConfig.from_method(method, abits=abits))
    calibrate_(model, torch.randn(2, 1, 32, 32), torch.tensor([5.0, 700.0]))
    calls = []
    model.register_forward_pre_hook(lambda mod, inp: calls.append(1))
    spec = SimpleNamespace(unet=CFG, diffusion=SimpleNamespace(timesteps=1000))
    with torch.no_grad():
        x, t, eps, margins = reference_inputs(model, spec, n_ref=2, seed=0, min_margin=3e-6, max_tries=64, probe=6)
    assert x.shape == (2, 1, 32, 32) and eps.shape == x.shape and len(margins) == 2
    if abits:  # 15 boundaries per value: margins ~1e-7, the search gives up long before max_tries
        assert 2 * 6 <= len(calls) < 2 * 64 and float(margins.max()) < 3e-6
    else:  # sign: either certified, or the search went on past the probe because success was plausible
        assert all(float(m) >= 3e-6 for m in margins) or len(calls) > 2 * 6


def test_flip_envelope_is_the_output_spread_under_quantizer_input_jitter():
    """One LSQ layer (s = 0.1): an input value 1e-8 above the boundary 0.25 flips between levels 2 and 3 under
    a 3e-6 jitter, moving each output channel by 0.1 x its weight scale; inputs 1e-4 from every boundary never
    flip, so their envelope is float noise."""
    from bdmtool.trainer.bundle import flip_envelope

    conv = torch.nn.Conv2d(2, 3, 1, bias=False)
    layer = BinaryConv2d(conv, BinarizeConfig.from_method("baseline", abits=4), "l", in_hw=(1, 1))
    layer.set_step_(0.1)
    far = torch.tensor([0.1201, -0.3199]).reshape(1, 2, 1, 1)
    near = torch.tensor([0.25 + 1e-8, -0.3199]).reshape(1, 2, 1, 1)
    for x, want in ((far, 0.0), (near, 0.1 * float(layer.sigma1.detach().abs().max()))):
        with torch.no_grad():
            ref = layer(x)
        got = flip_envelope(layer, lambda x=x: layer(x), ref, jitter=3e-6, draws=16, seed=0)
        assert got == pytest.approx(want, abs=1e-5)
