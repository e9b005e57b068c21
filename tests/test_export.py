"""Export: Keras/Larq rebuild -> LCE flatbuffer with real binary kernels, parity at every stage (real LCE)."""

import json
import os
import re

import numpy as np
import pytest

from conftest import MICRO_UNET
from bdmtool.trainer.spec import build_train_spec
from bdmtool.trainer.train import train

pytestmark = pytest.mark.slow
COMMON = ["data.limit=32", "train.batch_size=4", "train.threads=1"]


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    out = tmp_path_factory.mktemp("fp")
    return str(train(build_train_spec("tiny", "digits", 5, [*MICRO_UNET, *COMMON]), out, progress=False))


def _qat(teacher, tmp_path, method, abits=None, extra=()):
    spec = build_train_spec(method=method, abits=abits, teacher=teacher, steps=3, overrides=[*COMMON, *extra])
    return train(spec, tmp_path / method, progress=False)


@pytest.mark.parametrize("method", ["bidm", "xnor"])
def test_w1a1_export_has_one_bconv_per_binary_layer_and_parity(tmp_path, teacher, method):
    """BiDM and an XNOR baseline: every binary layer is one LceBconv2d; parity at every stage."""
    from bdmtool.exporter.inspect_tflite import inspect_model
    from bdmtool.tools.export import export_checkpoint

    # XNOR as the papers run it (no DC bypass; BiDM keeps bdmtool's default bypass): both recipes are exported.
    # Whether a reference input certifies (margin >= 3e-6) depends on the weights; these two do.
    extra = ["binarize.dc_bypass=none"] if method == "xnor" else []
    res = export_checkpoint(_qat(teacher, tmp_path, method, extra=extra), tmp_path / "export", log=lambda s: None,
                            per_layer=method == "bidm")
    rep = res.report
    meta = json.loads((tmp_path / "export" / "bundle" / "spec.json").read_text())
    assert ("dc_bypass" in rep["float_layers"]) == (method == "bidm")
    names = [r["name"] for r in meta["binary_layers"]]
    assert rep["bconv_ops"] == rep["binary_layers"] == len(names) > 20
    inv = inspect_model(res.tflite.read_bytes(), names)
    assert sorted(inv.bconv_layers) == sorted(names) and set(inv.bconv_layers.values()) == {1}
    assert not inv.fallbacks
    assert "DEQUANTIZE" not in inv.histogram and inv.histogram["LceQuantize"] >= 1
    for stage in ("keras_vs_pytorch", "tflite_vs_keras", "tflite_vs_pytorch"):
        assert rep["stages"][stage] <= 1e-4, (stage, rep["stages"])  # max over certified inputs
    assert max(rep["reference"]["decision_margin"]) >= 3e-6
    assert inv.binary_param_bytes > 0 and inv.file_bytes == res.tflite.stat().st_size
    from bdmtool.trainer.train import load_model

    fl = rep["float_layers"]  # what stays float is listed, binary layers are not
    assert fl["conv_in"] == fl["conv_out"] == "float conv" and fl["temb.dense.0"] == "float dense"
    assert "mid.block_1.norm1" in fl and "mid.attn_1.matmuls" in fl and not set(fl) & set(names)
    fp_model = load_model(teacher)[0]
    assert rep["fp32_weight_bytes"] == 4 * sum(p.numel() for p in fp_model.parameters()) > inv.file_bytes
    side = json.loads(res.sidecar.read_text())
    assert side["bits"] == {"weights": 1, "activations": 1} and side["method"] == method
    if method == "xnor":  # on a certified input no bit may flip: an impossible --tol fails as one line
        import subprocess

        from conftest import bdmtool_cmd

        r = subprocess.run([*bdmtool_cmd(), "export", meta["source_checkpoint"], "--out", str(tmp_path / "e2"),
                            "--tol", "1e-12"], capture_output=True, text=True, timeout=600)
        assert r.returncode == 1 and "Traceback" not in r.stderr
        assert "Error: keras_vs_pytorch" in r.stderr and "no bit may flip" in r.stderr
    assert side["inputs"][0]["layout"] == "NHWC" and side["inputs"][0]["shape"] == [1, 32, 32, 1]
    assert side["inputs"][1]["name"] == "t" and len(side["schedule"]["alphas_cumprod"]) == 1000
    assert side["sampler"]["timesteps"][:2] == [980, 960]
    assert len(side["source_checkpoint_sha256"]) == 64
    from bdmtool.exporter.runtime import TFLiteDenoiser
    from bdmtool.files import FileFormatError, file_sha256

    assert side["model_sha256"] == file_sha256(res.tflite)  # the sidecar names the one file it describes
    other = tmp_path / "other.tflite"  # a re-exported or edited model next to a stale sidecar is refused
    other.write_bytes(res.tflite.read_bytes() + b"\0" * 8)
    other.with_suffix(".json").write_text(res.sidecar.read_text())
    with pytest.raises(FileFormatError, match="describes another .tflite"):
        TFLiteDenoiser.from_file(other)
    if method == "bidm":  # cross-timestep cache: explicit inputs/outputs, checked on a cached second step
        sites = [c["site"] for c in side["cache_tensors"]]
        assert sites == meta["timestep_cache"]["sites"] and len(sites) == 3
        io = side["tflite_io_order"]
        assert sorted(io["inputs"]) == sorted(["x", "t", "cache_valid", "cache_in_0", "cache_in_1", "cache_in_2"])
        assert sorted(io["outputs"]) == ["cache_out_0", "cache_out_1", "cache_out_2", "eps"]
        assert [c["output_index"] for c in side["cache_tensors"]] == [io["outputs"].index(f"cache_out_{i}")
                                                                      for i in range(3)]
        assert rep["stages"].get("cached_step_tflite_vs_pytorch", 0.0) <= 1e-4
        # --per-layer: every binary layer has a record; one figure recomputed here from the probe twin and the
        # PyTorch layer output the bundle recorded
        from bdmtool.exporter.layer_parity import to_nhwc
        from bdmtool.exporter.runtime import TFLiteDenoiser

        per = {r["layer"]: r for r in rep["per_layer"]}
        assert set(names) <= set(per) and per["(probe twin eps vs exported .tflite)"]["max_abs"] <= 1e-6
        assert all(per[n]["cosine"] > 0.999 for n in names)
        probe = tmp_path / "export" / f"{res.tflite.stem}.probes.tflite"
        den = TFLiteDenoiser.from_bytes(probe.read_bytes())
        ref = np.load(tmp_path / "export" / "bundle" / "reference_io.npz")
        outs = den.first_step(ref["x"][:1].transpose(0, 2, 3, 1), float(ref["t"][0]))
        first = names[0]
        got = outs[f"probe_{[r['layer'] for r in rep['per_layer']].index(first)}"].ravel()
        want = to_nhwc(ref[f"layer_out::{first}"]).ravel()
        assert per[first]["max_abs"] == pytest.approx(float(np.abs(got - want).max()), rel=1e-6, abs=1e-9)
        cos = float(got @ want / (np.linalg.norm(got) * np.linalg.norm(want)))
        assert per[first]["cosine"] == pytest.approx(cos, abs=1e-6)
    else:
        assert side["cache_tensors"] == [] and side["tflite_io_order"]["outputs"] == ["eps"]
    assert side["signature"].startswith("serving_default")  # the saved-model path, not LCE's graphdef fallback
    if method == "xnor":  # a truncated copy of a real export: one line from inspect and sample --tflite
        from click.testing import CliRunner

        from bdmtool.tools.cli import cli

        cut = tmp_path / "cut.tflite"
        cut.write_bytes(res.tflite.read_bytes()[: res.tflite.stat().st_size // 3])
        (tmp_path / "cut.json").write_text(res.sidecar.read_text())
        for args in (["inspect", str(cut)], ["sample", "--tflite", str(cut), "--n", "1", "--out", str(tmp_path / "s")]):
            r = CliRunner().invoke(cli, args)
            assert r.exit_code == 1 and isinstance(r.exception, SystemExit), r.output
            assert r.output.strip().splitlines()[-1].startswith("Error:") and "truncated or damaged" in r.output


@pytest.mark.parametrize("mode", ["timestep_gain", "timestep_affine", "timestep_skip"])
def test_dc_bypass_exports_as_float_ops_with_parity(tmp_path, teacher, mode):
    """binarize.dc_bypass: eps + g[b(t)] mean_hw(x) (and - h[b(t)] mean_hw(eps) + c[b(t)] in affine mode) becomes
    builtin MEAN/GATHER/MUL/ADD in the .tflite. On a W1A32 student (no activation quantizer, so no level flips)
    every stage matches to 1e-4, with the tables trained away from 0 so that the path is seen."""
    from bdmtool.tools.export import export_checkpoint
    from bdmtool.trainer.train import load_model

    ckpt = _qat(teacher, tmp_path, "baseline", 32, extra=[f"binarize.dc_bypass={mode}", "train.lr=1e-3",
                                                          "binarize.dc_bypass_lr_scale=1000",
                                                          "binarize.dc_bypass_skip_lr_scale=1000"])
    tables = load_model(ckpt)[0].dc_bypass.tables()
    assert tables["gain"].abs().max() > 3e-2  # x_t means of ~0.05 then move eps by > 1e-3, far above the 1e-4 gate
    if mode != "timestep_gain":
        assert tables["remove"].abs().max() > 3e-2 and tables["offset"].abs().max() > 1e-3
    if mode == "timestep_skip":
        assert tables["skip"].abs().max() > 3e-2 and tables["shrink"].abs().max() > 3e-2
    res = export_checkpoint(ckpt, tmp_path / "e", log=lambda s: None)
    assert res.report["float_layers"]["dc_bypass"].startswith("float MEAN")
    assert "GATHER" in res.report["ops"] and not res.report.get("fallbacks")
    for stage in ("keras_vs_pytorch", "tflite_vs_keras", "tflite_vs_pytorch"):
        assert res.report["stages"][stage] <= 1e-4, (stage, res.report["stages"])


def test_keras_fp_cross_check(tmp_path, teacher):
    from bdmtool.tools.export import export_checkpoint

    res = export_checkpoint(teacher, tmp_path / "fp", target="keras-fp", name="fp", log=lambda s: None)
    assert res.report["bconv_ops"] == 0 and res.report["stages"]["tflite_vs_keras"] <= 1e-4
    assert "CONV_2D" in res.report["ops"]


def test_unexportable_binary_layer_fails_loudly(tmp_path, teacher):
    from bdmtool.exporter.binary_layers import NotExportableError
    from bdmtool.tools.export import export_checkpoint

    ckpt = _qat(teacher, tmp_path, "dorefa")  # {0,1} activations: no LCE binary form
    with pytest.raises(NotExportableError, match="dorefa|DoReFa"):
        export_checkpoint(ckpt, tmp_path / "d", log=lambda s: None)


def test_silent_fallback_is_detected(tmp_path, teacher, monkeypatch):
    """An op between the sign and the conv makes LCE keep a float conv; verification must name the layer."""
    import larq as lq
    import tensorflow as tf

    import bdmtool.exporter.binary_layers as bl
    from bdmtool.exporter.binary_layers import NotExportableError
    from bdmtool.tools.export import export_checkpoint

    ckpt = _qat(teacher, tmp_path, "xnor")
    original = bl.binary_conv

    def broken(builder, rec, x, **kw):
        if rec["name"] != "mid.block_1.conv1":
            return original(builder, rec, x, **kw)
        h = lq.quantizers.SteSign()(x) * 0.5  # sign -> MUL -> conv: LCE's documented fallback pattern
        layer = tf.keras.layers.Conv2D(rec["out_channels"], 3, padding="same", use_bias=False,
                                       name=bl.keras_name(rec["name"]))
        y = layer(h)
        layer.set_weights([builder.w.get(f"{rec['name']}.sign1").astype(np.float32).transpose(2, 3, 1, 0)])
        return y

    monkeypatch.setattr(bl, "binary_conv", broken)
    with pytest.raises(NotExportableError, match=r"mid\.block_1\.conv1"):
        export_checkpoint(ckpt, tmp_path / "b", tol=10.0, log=lambda s: None)


def test_fp_target_through_onnx2tf(tmp_path, teacher):
    from bdmtool.tools.export import export_checkpoint

    qat = _qat(teacher, tmp_path, "xnor")  # a binarized checkpoint exports its FP teacher for --target fp
    res = export_checkpoint(qat, tmp_path / "fp", target="fp", log=lambda s: None)
    rep = res.report
    assert rep["stages"]["tflite_vs_pytorch"] <= 1e-4
    assert not any(k.startswith(("Flex", "Lce")) for k in rep["ops"]) and rep["ops"]["CONV_2D"] > 10
    side = json.loads(res.sidecar.read_text())
    assert side["method"] == "fp" and side["bits"] == {"weights": 32, "activations": 32}
    assert sorted(side["tflite_io_order"]["inputs"]) == ["t", "x"]
    # one input contract for every exported file: t is float32 [1, 1] here as in the LCE exports
    from bdmtool.exporter.inspect_tflite import inspect_model

    t_in = [d for d in inspect_model(res.tflite.read_bytes()).inputs if list(d["shape"]) == [1, 1]]
    assert len(t_in) == 1 and side["inputs"][1]["shape"] == [1, 1] and side["inputs"][1]["dtype"] == "float32"


def test_memoized_onnx2tf_checks_give_the_same_tflite(tmp_path, teacher):
    """onnx2tf's layout checks evaluated once per layer (exporter/onnx2tf_memo.py) give the model its own
    quadratic re-runs give: same flatbuffer once names are blanked, and far fewer layer evaluations."""
    import onnx2tf.utils.common_functions as common

    from bdmtool.exporter.convert import convert_float
    from bdmtool.exporter.inspect_tflite import canonical_form
    from bdmtool.exporter.pipeline import onnx_to_keras
    from bdmtool.exporter.onnx2tf_memo import memoized_validation
    from bdmtool.tools.export import export_checkpoint

    export_checkpoint(teacher, tmp_path / "fp", target="fp", log=lambda s: None)
    onnx_path = tmp_path / "fp" / "bundle" / "model.onnx"
    lines = []
    fast = convert_float(onnx_to_keras(onnx_path, log=lines.append), lambda s: None)
    slow = convert_float(onnx_to_keras(onnx_path, memoize=False, log=lines.append), lambda s: None)
    assert canonical_form(fast) == canonical_form(slow)
    assert np.array_equal(_run_tflite(slow), _run_tflite(canonical_form(slow)))  # and it is a model that runs
    assert canonical_form(fast) != canonical_form(convert_float(onnx_to_keras(
        _perturbed_onnx(onnx_path, tmp_path / "other.onnx"), log=lambda s: None), lambda s: None))
    checks, calls = map(int, re.search(r"(\d+) layout checks, (\d+) layer evaluations", lines[0]).groups())
    # Each tensor is evaluated once per dummy input (~10 layers a check on the micro U-Net); without the cache a
    # check re-runs its whole prefix (~200 a check).
    assert checks > 100 and calls < 15 * checks
    real = common.tf_keras
    with memoized_validation(onnx_path) as ev:
        assert ev is not None and common.tf_keras is not real
    assert common.tf_keras is real  # restored


def test_a_failing_memoized_check_falls_back_to_onnx2tfs_own(tmp_path, teacher, monkeypatch):
    """onnx2tf swallows some exceptions of a check and carries on without it: one raised by the memoized
    evaluation must not be swallowed silently, the conversion is redone without the cache."""
    from bdmtool.exporter import onnx2tf_memo
    from bdmtool.exporter.pipeline import onnx_to_keras
    from bdmtool.tools.export import export_checkpoint

    export_checkpoint(teacher, tmp_path / "fp", target="fp", log=lambda s: None)

    def broken(self, target):
        raise RuntimeError("boom")

    monkeypatch.setattr(onnx2tf_memo._Evaluator, "_value", broken)
    lines = []
    assert onnx_to_keras(tmp_path / "fp" / "bundle" / "model.onnx", log=lines.append) is not None
    assert lines == ["[onnx2tf] memoized checks failed (a check's evaluation raised RuntimeError: boom); "
                     "converting without them ..."]


def _run_tflite(fb):
    """The model's output on a fixed random image at t = 500."""
    import tensorflow as tf

    it = tf.lite.Interpreter(model_content=fb)
    it.allocate_tensors()
    for d in it.get_input_details():
        x = np.random.default_rng(0).standard_normal(d["shape"]).astype(np.float32)
        it.set_tensor(d["index"], x if len(d["shape"]) == 4 else np.full(d["shape"], 500, np.float32))
    it.invoke()
    return it.get_tensor(it.get_output_details()[0]["index"])


def _perturbed_onnx(onnx_path, out):
    """The same graph with one weight moved by 1e-3: a model the comparison above must tell apart."""
    import onnx
    from onnx import numpy_helper

    m = onnx.load(str(onnx_path))
    init = next(i for i in m.graph.initializer if numpy_helper.to_array(i).size > 100)
    w = numpy_helper.to_array(init).copy()
    w.flat[0] += 1e-3
    init.CopyFrom(numpy_helper.from_array(w, init.name))
    onnx.save(m, str(out))
    return out


def test_preflight_refuses_before_tensorflow_loads(tmp_path):
    """The kernel choice and the padding check live in exporter/kernels.py, TensorFlow-free: a refused export
    fails without importing TensorFlow (seconds, not the ~10 s TensorFlow's import costs next to a training)."""
    import subprocess
    import sys

    import bdmtool

    fp = os.path.join(bdmtool.ASSETS, "tiny_mnist_fp.ckpt")
    code = ("import sys\nfrom bdmtool.tools.export import preflight\n"
            f"try:\n    preflight({fp!r})\nexcept ValueError as e:\n    print('refused:', e)\n"
            "print('tensorflow loaded:', 'tensorflow' in sys.modules)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert "refused:" in r.stdout and "full-precision checkpoint" in r.stdout, r.stderr[-1500:]
    assert "tensorflow loaded: False" in r.stdout


def test_w1a4_bit_planes(tmp_path, teacher):
    """BinaryDM W1A4 (default --a4 bitplanes): one same-one bconv per layer (its 4 planes stacked on the batch axis), exact
    against PyTorch."""
    from bdmtool.exporter.pipeline import KERNEL_FIDELITY
    from bdmtool.exporter.inspect_tflite import inspect_model
    from bdmtool.tools.export import export_checkpoint

    spec = build_train_spec(method="binarydm", abits=4, teacher=teacher, steps=6,
                            overrides=[*COMMON, "binarize.ebb_stage2_step=2"])  # progressive done at 5
    res = export_checkpoint(train(spec, tmp_path / "bdm", progress=False), tmp_path / "e", log=lambda s: None)
    rep = res.report
    assert rep["bconv_ops"] == rep["binary_layers"]  # one bconv per layer: planes on the batch axis, bases on the channels
    # median (or max over certified inputs) within 1e-4; a flip on an uncertified input is reported, not hidden
    assert rep["stages"]["keras_vs_pytorch"] <= 1e-4 and rep["stages"]["tflite_vs_keras"] <= 1e-4
    inv = inspect_model(res.tflite.read_bytes())
    pads = {o.options["pad_values"] for o in inv.ops if o.name == "LceBconv2d" and o.options["padding"] == 0}
    assert pads == {1}  # every 'same' bconv is same-one
    assert json.loads(res.sidecar.read_text())["bits"] == {"weights": 1, "activations": 4, "a4_kernel": "bitplanes",
                                                           "fidelity": KERNEL_FIDELITY["bitplanes"]}


def test_w1a4_int8_with_zero_padding(tmp_path, teacher):
    """W1A4 with --a4 int8: the 4-bit LSQ grid clamped then carried on int8, zero padding as trained
    (binarize.act_pad=zero); one int8 CONV_2D per layer. Each layer is exact up to its 8-bit output (the
    one-layer test above); through a whole random network those output roundings flip 4-bit levels
    downstream (0.5-0.9 max |d eps| on this random micro network), so the gate is set by hand here; the
    trained student's .tflite is judged by the FID of its samples (docs/methods.md)."""
    from bdmtool.exporter.pipeline import KERNEL_FIDELITY
    from bdmtool.exporter.inspect_tflite import inspect_model
    from bdmtool.tools.export import export_checkpoint

    spec = build_train_spec(method="baseline", abits=4, teacher=teacher, steps=4,
                            overrides=[*COMMON, "binarize.act_pad=zero"])
    ckpt = train(spec, tmp_path / "b4", progress=False)
    with pytest.raises(ValueError, match="--a4 bitplanes cannot reproduce"):  # the default kernel: refused at once
        export_checkpoint(ckpt, tmp_path / "bp", log=lambda s: None)
    res = export_checkpoint(ckpt, tmp_path / "e", a4="int8", tol=2.0, log=lambda s: None)
    rep = res.report
    assert res.tflite.name == "baseline_w1a4_int8.tflite" and rep["a4_kernel"] == "int8" and rep["bconv_ops"] == 0
    names = [r["name"] for r in json.loads((tmp_path / "e" / "bundle" / "spec.json").read_text())["binary_layers"]]
    assert rep["int8_conv_ops"] == rep["binary_layers"] == len(names) > 20
    assert sorted(inspect_model(res.tflite.read_bytes(), names).int8_layers) == sorted(names)
    assert all(np.isfinite(v) for v in rep["stages"].values())  # measured 0.56-0.86 here: see the docstring
    assert json.loads(res.sidecar.read_text())["bits"] == {"weights": 1, "activations": 4, "a4_kernel": "int8",
                                                           "fidelity": KERNEL_FIDELITY["int8"]}


def test_w1a8_bit_planes_by_default_and_int8_on_request(tmp_path, teacher):
    """W1A8: by default one LceBconv2d per binary layer (8 bit planes on the batch axis, the exact path), gated at
    A8_TOL (~1e-6 float differences flip some of the 255 levels); ``a8="int8"`` gives one int8 CONV_2D per layer
    (LSQ grid = int8 grid, +-a weights = int8), gated at INT8_TOL. The sidecar says which and how faithful. A
    failed gate is a one-line CLI error, not a traceback."""
    import subprocess

    from conftest import bdmtool_cmd
    from bdmtool.exporter.inspect_tflite import inspect_model
    from bdmtool.exporter.pipeline import A8_TOL, INT8_TOL, KERNEL_FIDELITY
    from bdmtool.tools.export import export_checkpoint

    spec = build_train_spec(method="binarydm", abits=8, teacher=teacher, steps=6,
                            overrides=[*COMMON, "binarize.ebb_stage2_step=2"])  # progressive done at 5
    ckpt = train(spec, tmp_path / "bdm8", progress=False)
    logged: list[str] = []
    bp = export_checkpoint(ckpt, tmp_path / "bp", log=logged.append)
    assert bp.tflite.name == "binarydm_w1a8.tflite" and bp.report["a8_kernel"] == "bitplanes"
    assert bp.report["bconv_ops"] == bp.report["binary_layers"] and bp.report["int8_conv_ops"] == 0
    assert bp.report["stages"]["tflite_vs_pytorch"] <= A8_TOL
    # no input certifies at 8 bits: each is held to its flip envelope, recorded per input
    assert len(bp.report["reference"]["flip_envelope"]) == len(bp.report["reference"]["timesteps"])
    side = json.loads(bp.sidecar.read_text())
    assert side["bits"] == {"weights": 1, "activations": 8, "a8_kernel": "bitplanes",
                            "fidelity": KERNEL_FIDELITY["bitplanes"]} and side["bits"]["fidelity"].startswith("exact")
    assert any("W1A8 on bitplanes: exact" in ln for ln in logged)

    res = export_checkpoint(ckpt, tmp_path / "i8", a8="int8", log=lambda s: None)
    rep = res.report
    names = [r["name"] for r in json.loads((tmp_path / "i8" / "bundle" / "spec.json").read_text())["binary_layers"]]
    assert res.tflite.name == "binarydm_w1a8_int8.tflite" and rep["a8_kernel"] == "int8"
    assert rep["bconv_ops"] == 0 and rep["int8_conv_ops"] == rep["binary_layers"] == len(names) > 20
    inv = inspect_model(res.tflite.read_bytes(), names)
    assert sorted(inv.int8_layers) == sorted(names) and not inv.fallbacks
    assert "LceQuantize" not in inv.histogram and inv.histogram["QUANTIZE"] >= 1  # int8 islands in a float graph
    assert inv.int8_param_bytes > 0
    assert rep["int8_out"] == "channel"  # one range per output channel (equalized int8 output)
    couts = {r["name"]: r["out_channels"] for r in json.loads((tmp_path / "i8" / "bundle" / "spec.json").read_text())
             ["binary_layers"]}
    assert all(len(lo) == len(hi) == couts[n] and all(a < b for a, b in zip(lo, hi))
               for n, (lo, hi) in rep["int8_output_ranges"].items())
    for stage in ("keras_vs_pytorch", "tflite_vs_keras", "tflite_vs_pytorch"):
        assert 0 < rep["stages"][stage] <= INT8_TOL, (stage, rep["stages"])
    side = json.loads(res.sidecar.read_text())
    assert side["bits"] == {"weights": 1, "activations": 8, "a8_kernel": "int8", "fidelity": KERNEL_FIDELITY["int8"]}
    assert side["bits"]["fidelity"].startswith("approximate")
    assert side["runtime"] == "builtin TFLite ops only"

    assert side["sampler"]["clip_x0"] is True and "clip(" in side["sampler"]["update"]

    assert json.loads((tmp_path / "i8" / "bundle" / "spec.json").read_text())["binary_layers"][0]["act_pad"] == "top"

    # a zero-padded W1A8 checkpoint (binarize.act_pad=zero, for int8) on the default bit planes: refused at once,
    # one line naming both fixes
    zero = build_train_spec(method="binarydm", abits=8, teacher=teacher, steps=1,
                            overrides=[*COMMON, "binarize.act_pad=zero"])
    zckpt = train(zero, tmp_path / "bdm8zero", progress=False)
    r = subprocess.run([*bdmtool_cmd(), "export", str(zckpt), "--out", str(tmp_path / "no")],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 1 and "Traceback" not in r.stderr and "binarize.act_pad=top" in r.stderr
    assert "--a8 int8" in r.stderr
    errors = [ln for ln in r.stderr.strip().splitlines() if not ln.startswith("[bdmtool]")]  # not the thread note
    assert len(errors) == 1 and not (tmp_path / "no" / "bundle").exists()


def test_serving_function_conversion_is_lce_convert_keras_model_byte_for_byte():
    """exporter.convert saves one serving function instead of the Keras object graph (3x faster): the flatbuffer
    must be the one LCE's convert_keras_model writes, signature and output names included (two outputs here)."""
    import larq as lq
    import larq_compute_engine as lce
    import tensorflow as tf

    from bdmtool.exporter.convert import convert

    tf.random.set_seed(0)
    x = tf.keras.Input((8, 8, 4), batch_size=1, name="x")
    t = tf.keras.Input((1,), batch_size=1, name="t")
    h = lq.layers.QuantConv2D(8, 3, padding="same", pad_values=1.0, input_quantizer="ste_sign",
                              kernel_quantizer="ste_sign", kernel_constraint="weight_clip", use_bias=False)(x)
    h = tf.keras.layers.BatchNormalization()(h)
    eps = tf.keras.layers.Add(name="eps")([tf.keras.layers.Conv2D(4, 1, name="out")(h), x * t[:, :, None, None]])
    model = tf.keras.Model([x, t], [eps, tf.keras.layers.Identity(name="cache_out_0")(h)])
    fast = convert(model, log=lambda s: pytest.fail(f"fallback or warning: {s}"))
    assert fast == lce.convert_keras_model(model)


def test_exporter_imports_without_torch():
    import subprocess
    import sys

    code = ("import sys, bdmtool.exporter.pipeline, bdmtool.exporter.runtime, bdmtool.exporter.inspect_tflite; "
            "assert 'torch' not in sys.modules, 'exporter pulled in torch'")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]


@pytest.mark.parametrize("bits,act_pad,out", [(8, "top", "tensor"), (8, "zero", "tensor"), (4, "zero", "tensor"),
                                              (8, "top", "channel"), (4, "zero", "channel")])
def test_int8_multibit_layer_is_exact_up_to_its_output_quantization(bits, act_pad, out):
    """One W1A8 layer through the int8 path vs the training semantics computed independently (LSQ levels,
    border padded with 127 s or 0 as trained, +-a filters, bias): the .tflite must be within half an output LSB
    (plus half a bias LSB: TFLite's int32 bias has scale s_in * s_w) everywhere, i.e. the LSQ grid, the border and
    the binary filter are carried exactly and only the int8 output (and the int32 bias) is rounded. With one
    output range per channel (equalized), the LSB is each channel's own, and smaller than the tensor's."""
    from types import SimpleNamespace

    import tensorflow as tf
    import torch
    import torch.nn.functional as F
    from larq_compute_engine.tflite.python.interpreter import Interpreter

    from bdmtool.exporter.binary_layers import binary_conv
    from bdmtool.exporter.convert import convert
    from bdmtool.exporter.inspect_tflite import inspect_model
    from bdmtool.exporter.keras_unet import Weights

    rng = np.random.default_rng(0)
    cin, cout, step = 8, 16, 0.02 if bits == 8 else 0.3  # both: some inputs beyond the clip range
    sign = np.where(rng.standard_normal((cout, cin, 3, 3)) >= 0, 1, -1).astype(np.int8)
    scale = rng.uniform(0.2, 1.0, cout).astype(np.float32)
    bias = rng.normal(0, 0.1, cout).astype(np.float32)
    x = rng.normal(0, 1.5, (1, 8, 8, cin)).astype(np.float32)
    rec = {"name": "l", "abits": bits, "lsq_mode": "learned", "act_scale": "none", "output_scale": False,
           "post": "none", "shortcut": "none", "kernel": 3, "stride": 1, "padding": 1, "out_channels": cout,
           "two_bases": False, "bias": True, "act_pad": act_pad}
    w = Weights({"l.step": np.float32(step), "l.sign1": sign, "l.scale1": scale, "l.bias": bias})

    qn, qp = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    q = torch.from_numpy(np.clip(np.round(x / step), qn, qp) * step).permute(0, 3, 1, 2)
    q = F.pad(q, (1, 1, 1, 1), value=qp * step if act_pad == "top" else 0.0)
    kernel = torch.from_numpy(sign.astype(np.float32) * scale[:, None, None, None])
    want = F.conv2d(q.double(), kernel.double(), torch.from_numpy(bias).double()).permute(0, 2, 3, 1).numpy()
    lo, hi = float(want.min()) * 1.05, float(want.max()) * 1.05
    if out == "channel":  # each channel's own range, as exporter/calibrate.py writes it
        c, r = (want.max(axis=(0, 1, 2)) + want.min(axis=(0, 1, 2))) / 2, np.ptp(want, axis=(0, 1, 2)) / 2 * 1.05
        lo, hi = c - r, c + r
        assert np.median(hi - lo) < 0.8 * (want.max() - want.min())  # most channels need less than the tensor
    inp = tf.keras.Input((8, 8, cin), batch_size=1)
    builder = SimpleNamespace(w=w, float_layers={})
    ranges = {"l": (lo, hi) if out == "tensor" else (lo.tolist(), hi.tolist())}
    model = tf.keras.Model(inp, binary_conv(builder, rec, inp, a8="int8", a4="int8", int8_ranges=ranges))
    fb = convert(model, log=lambda s: None)
    assert inspect_model(fb, ["l"]).int8_layers == {"l": 1}
    got = Interpreter(fb, num_threads=1).predict(x)
    lsb = (hi - lo) / 255  # per channel: a vector over the last axis
    err = np.abs(got - want)
    bias_lsb = step * scale.max() / 127  # TFLite stores the bias as int32 at scale s_in * s_w: half of it may round
    # XNNPACK's per-channel int8 requantization (an fp32 multiplier) can land a few % of an LSB past the exact
    # rounding (measured on the 4-bit per-channel case: 0.51 LSB; TFLite's reference kernel: 0.504)
    slack = 1e-4 if out == "tensor" else 0.05
    assert (err <= 0.5 * lsb * (1 + slack) + 0.5 * bias_lsb + 1e-6).all(), (err.max(), lsb, bias_lsb)
    assert (err.max(axis=(0, 1, 2)) > 1e-3 * lsb).all()  # it does round: the comparison is not trivially exact


@pytest.mark.parametrize("bits,two_bases,stride", [(4, True, 1), (8, False, 2), (4, False, 1)])
def test_bitplane_layer_is_one_bconv_and_exact(bits, two_bases, stride):
    """One W1A4/W1A8 layer on the bit-plane path: ONE LceBconv2d (planes on the batch axis, EBB's two bases on the
    output channels) whose recombined output equals the training semantics computed independently here (LSQ
    levels, border padded with Qp s, sum of a_j sign_j filters, bias) to float rounding."""
    from types import SimpleNamespace

    import tensorflow as tf
    import torch
    import torch.nn.functional as F
    from larq_compute_engine.tflite.python.interpreter import Interpreter

    from bdmtool.exporter.binary_layers import binary_conv
    from bdmtool.exporter.convert import convert
    from bdmtool.exporter.inspect_tflite import inspect_model
    from bdmtool.exporter.keras_unet import Weights

    rng = np.random.default_rng(1)
    pad = 1 if stride == 1 else 0  # the U-Net's stride-2 convs are 'valid' after an explicit (0,1,0,1) pad
    cin, cout, step = 8, 16, 0.02 if bits == 8 else 0.3
    signs = [np.where(rng.standard_normal((cout, cin, 3, 3)) >= 0, 1, -1).astype(np.int8) for _ in range(2)]
    scales = [rng.uniform(0.2, 1.0, cout).astype(np.float32) for _ in range(2)]
    bias = rng.normal(0, 0.1, cout).astype(np.float32)
    x = rng.normal(0, 1.5, (1, 8, 8, cin)).astype(np.float32)
    rec = {"name": "l", "abits": bits, "lsq_mode": "log", "act_scale": "none", "output_scale": False,
           "post": "none", "shortcut": "none", "kernel": 3, "stride": stride, "padding": pad, "out_channels": cout,
           "two_bases": two_bases, "bias": True, "act_pad": "top"}
    w = Weights({"l.step": np.float32(step), "l.sign1": signs[0], "l.scale1": scales[0], "l.sign2": signs[1],
                 "l.scale2": scales[1], "l.bias": bias})

    qn, qp = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    q = torch.from_numpy(np.clip(np.round(x / step), qn, qp) * step).permute(0, 3, 1, 2)
    q = F.pad(q.double(), (pad,) * 4, value=qp * step)
    kernel = sum(torch.from_numpy(sg.astype(np.float64) * sc[:, None, None, None])
                 for sg, sc in list(zip(signs, scales))[: 2 if two_bases else 1])
    want = F.conv2d(q, kernel, torch.from_numpy(bias).double(), stride=stride).permute(0, 2, 3, 1).numpy()

    inp = tf.keras.Input((8, 8, cin), batch_size=1)
    model = tf.keras.Model(inp, binary_conv(SimpleNamespace(w=w, float_layers={}), rec, inp, a8="bitplanes"))
    fb = convert(model, log=lambda s: None)
    inv = inspect_model(fb, ["l"])
    assert inv.histogram.get("LceBconv2d") == 1 and not inv.fallbacks
    got = Interpreter(fb, num_threads=1).predict(x)
    assert got.shape == want.shape
    assert np.abs(got - want).max() <= 1e-4 * max(1.0, np.abs(want).max()), np.abs(got - want).max()


def test_gate_allows_an_uncertified_input_its_flip_envelope_and_no_more():
    """Certified inputs are held to tol; an uncertified one to max(tol, ENVELOPE_FACTOR x its envelope); the
    stage fails when most inputs exceed their allowance."""
    from bdmtool.exporter.pipeline import ENVELOPE_FACTOR, ParityError, _gate

    def gate(errors, margins, envelopes):
        report = {"stages": {}}
        _gate("s", errors, margins, envelopes, 1e-4, report, log=lambda s: None)
        return report

    rep = gate([1e-6, 0.2, 0.3], [1e-5, 1e-7, 1e-7], [0.0, 0.15, 0.2])
    assert rep["certified"]["s"] and rep["stages"]["s"] == 1e-6 and rep["uncertified"]["s"] == [0.2, 0.3]
    gate([0.2, 0.3, 1e-6], [1e-7] * 3, [0.15, 0.0, 0.0])  # no certified input: 2 of 3 within their allowance
    with pytest.raises(ParityError, match="most reference inputs"):
        gate([0.2, 0.3, 1e-6], [1e-7] * 3, [0.2 / ENVELOPE_FACTOR - 1e-3, 0.1, 0.0])
    with pytest.raises(ParityError, match="no bit may flip"):  # a certified input has no envelope
        gate([2e-4, 1e-6, 1e-6], [1e-5, 1e-5, 1e-7], [0.5, 0.0, 0.0])


def test_tflite_sampling_resumes_after_an_interruption(tmp_path, teacher, monkeypatch):
    """`sample --tflite` / `eval x.tflite` keep finished chunks in <out>.partial/: a run interrupted after its
    first chunk, run again, samples only the missing chunk and writes the images of an uninterrupted run."""
    import bdmtool.tools.sample_tflite as ST
    from bdmtool.tools.export import export_checkpoint
    from bdmtool.trainer.sampling import SampleOptions

    res = export_checkpoint(teacher, tmp_path / "kfp", target="keras-fp", log=lambda s: None)
    opts = SampleOptions(n=ST.CHUNK + 2, steps=2, seed=5)
    _, ref = ST.sample_tflite(res.tflite, tmp_path / "ref", opts, workers=1)

    real, calls = ST._sample_range, []

    def flaky(tflite, start, stop, *a, **k):
        calls.append(start)
        if start > 0:
            raise KeyboardInterrupt
        return real(tflite, start, stop, *a, **k)

    monkeypatch.setattr(ST, "_sample_range", flaky)
    with pytest.raises(KeyboardInterrupt):
        ST.sample_tflite(res.tflite, tmp_path / "run", opts, workers=1)
    assert sorted(p.name for p in (tmp_path / "run.partial").glob("batch_*.npz")) == ["batch_0.npz"]
    calls.clear()
    monkeypatch.setattr(ST, "_sample_range", lambda tflite, start, *a, **k: (calls.append(start),
                                                                            real(tflite, start, *a, **k))[1])
    _, got = ST.sample_tflite(res.tflite, tmp_path / "run", opts, workers=1)
    assert calls == [ST.CHUNK]  # only the missing chunk
    assert np.array_equal(np.load(got)["arr_0"], np.load(ref)["arr_0"])
    assert not (tmp_path / "run.partial").exists()
