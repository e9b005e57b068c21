"""Bad input and faults, every command: a one-line error naming the problem and the fix, never a traceback,
never exit 0 with a wrong result, never a half-written file (issue 16).

Each case makes its bad files in a temporary folder, runs the real CLI in-process and checks:
exit code != 0, exactly one ``Error:`` line (the last line of the output) containing the expected words,
no Python traceback, and no ``*.tmp`` left behind. Disk-full cases run in a subprocess whose file-size
limit (RLIMIT_FSIZE) makes writes fail with EFBIG, the way a full disk fails them with ENOSPC.
"""

from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from conftest import MICRO_UNET, bdmtool_cmd
from bdmtool.tools.cli import cli
from bdmtool.trainer.checkpoint import atomic_save, load_checkpoint
from bdmtool.trainer.spec import build_train_spec
from bdmtool.trainer.train import train

COMMON = ["data.limit=32", "train.batch_size=4", "train.threads=1"]
MICRO = [f"--set={o}" for o in [*MICRO_UNET, *COMMON]]


def _valid_tflite() -> bytes:
    """A real, well-formed .tflite (one ADD), converted here by TFLite."""
    import os

    os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
    import tensorflow as tf

    f = tf.function(lambda x: x + 1.0, input_signature=[tf.TensorSpec([1, 4], tf.float32)])
    return tf.lite.TFLiteConverter.from_concrete_functions([f.get_concrete_function()], f).convert()


@pytest.fixture(scope="module")
def w(tmp_path_factory):
    """Workspace: a micro FP checkpoint, a micro BinaryDM W1A4 student and bad files made from them."""
    d = tmp_path_factory.mktemp("bad")
    fp = train(build_train_spec("tiny", "digits", 2, [*MICRO_UNET, *COMMON]), d / "fp", progress=False)
    student = train(build_train_spec(method="binarydm", teacher=str(fp), steps=2, overrides=COMMON),
                    d / "student", progress=False)
    dorefa = train(build_train_spec(method="dorefa", teacher=str(fp), steps=1, overrides=COMMON), d / "dorefa",
                   progress=False)
    per_batch = train(build_train_spec(method="binarydm", teacher=str(fp), steps=1,
                                       overrides=[*COMMON, "binarize.lsq_step=per_batch"]), d / "per_batch",
                      progress=False)
    ck = load_checkpoint(fp)

    def variant(name: str, edit) -> str:
        c = {**ck, "ema": None, "model": dict(ck["ema"] or ck["model"])}
        edit(c)
        return str(atomic_save(c, d / name))

    def nan_weights(c):
        k = next(iter(c["model"]))
        c["model"][k] = torch.full_like(c["model"][k], float("nan"))

    def wrong_shape(c):
        k = "conv_in.weight"
        c["model"][k] = torch.zeros(7, *c["model"][k].shape[1:])

    def missing_key(c):
        c["model"].pop("conv_out.weight")

    def other_arch(c):
        c["spec"] = {**c["spec"], "unet": {**c["spec"]["unet"], "ch": 64}}

    def bad_spec(c):
        c["spec"] = {**c["spec"], "unet": {**c["spec"]["unet"], "num_groups": 0}}

    def not_dict(c):
        c["model"] = [1, 2, 3]

    files = {
        "fp": str(fp), "student": str(student), "dir": d, "dorefa": str(dorefa), "per_batch": str(per_batch),
        "nan": variant("nan.ckpt", nan_weights), "shape": variant("shape.ckpt", wrong_shape),
        "missing": variant("missing.ckpt", missing_key), "arch": variant("arch.ckpt", other_arch),
        "badspec": variant("badspec.ckpt", bad_spec), "notdict": variant("notdict.ckpt", not_dict),
    }
    learned = train(build_train_spec(method="binarydm", teacher=str(fp), steps=1,
                                     overrides=[*COMMON, "binarize.lsq_step=learned"]), d / "learned", progress=False)
    sk = load_checkpoint(learned)  # the paper's LSQ: the step itself is the parameter (log mode cannot go <= 0)
    neg = {**sk, "model": dict(sk["model"])}
    k = next(n for n in neg["model"] if n.endswith(".step"))
    neg["model"][k] = -neg["model"][k].abs()
    files["negstep"] = str(atomic_save(neg, d / "negstep.ckpt"))
    (d / "empty.ckpt").write_bytes(b"")
    (d / "garbage.ckpt").write_bytes(os.urandom(4096))
    full = Path(fp).read_bytes()
    (d / "truncated.ckpt").write_bytes(full[: len(full) // 2])
    (d / "a_file").write_text("x")
    # .tflite-shaped junk
    (d / "junk.tflite").write_bytes(b"not a flatbuffer at all" * 10)
    (d / "empty.tflite").write_bytes(b"")
    (d / "nosidecar.tflite").write_bytes(b"\x1c\x00\x00\x00TFL3" + b"\x00" * 64)
    (d / "badside.tflite").write_bytes(b"\x1c\x00\x00\x00TFL3" + b"\x00" * 64)
    (d / "badside.json").write_text("{not json")
    (d / "stale.tflite").write_bytes(_valid_tflite())  # well formed, so the sidecar mismatch is what is reported
    (d / "stale.json").write_text(json.dumps({"model_sha256": "0" * 64, "tflite_io_order": {"outputs": ["eps"]}}))
    # data
    np.savez(d / "nan.npz", arr_0=np.full((8, 32, 32, 1), np.nan, np.float32))
    np.savez(d / "small.npz", arr_0=np.zeros((16, 16, 16, 1), np.uint8))
    np.savez(d / "wrongkey.npz", foo=np.zeros((4, 32, 32, 1), np.uint8))
    np.savez(d / "onesample.npz", arr_0=np.zeros((1, 32, 32, 1), np.uint8))
    np.savez(d / "badrange.npz", arr_0=np.full((8, 32, 32, 1), 300.0, np.float32))
    (d / "garbage.npz").write_bytes(os.urandom(256))
    (d / "empty.npz").write_bytes(b"")
    (d / "emptydir").mkdir()
    # bench inputs
    (d / "convs_noshapes").mkdir()
    (d / "convs_noshapes" / "convs.json").write_text(json.dumps({"convs": []}))
    (d / "convs_badjson").mkdir()
    (d / "convs_badjson" / "convs.json").write_text("{")
    # diffusers folders
    (d / "diff_nokey").mkdir()
    (d / "diff_nokey" / "config.json").write_text(json.dumps({"_class_name": "UNet2DModel", "sample_size": 32}))
    (d / "diff_badjson").mkdir()
    (d / "diff_badjson" / "config.json").write_text("{")
    (d / "diff_shapes").mkdir()
    (d / "diff_shapes" / "config.json").write_text(json.dumps({
        "_class_name": "UNet2DModel", "sample_size": 32, "in_channels": 1, "out_channels": 1,
        "block_out_channels": [32, 64], "down_block_types": ["DownBlock2D", "AttnDownBlock2D"],
        "up_block_types": ["AttnUpBlock2D", "UpBlock2D"], "layers_per_block": 1, "norm_num_groups": 8}))
    from safetensors.torch import save_file
    save_file({"conv_in.weight": torch.zeros(7, 1, 3, 3)}, str(d / "diff_shapes" / "diffusion_pytorch_model.safetensors"))
    nan_sd = {k: v.clone() for k, v in ck["ema"].items()} if ck.get("ema") else dict(ck["model"])
    nan_sd["conv_in.weight"] = torch.full_like(nan_sd["conv_in.weight"], float("nan"))
    torch.save(nan_sd, d / "pesser_nan.ckpt")
    # a pickle that would run code if unpickled (security: must be refused, never executed)
    marker = d / "PWNED"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    import pickle
    (d / "evil.ckpt").write_bytes(pickle.dumps({"format": "bdmtool-checkpoint", "x": Evil()}))
    files["marker"] = marker
    return files


def _cases():
    """(id, args as a function of the workspace, words the error line must contain)."""
    F = lambda k: (lambda w: w[k])  # noqa: E731
    P = lambda name: (lambda w: str(w["dir"] / name))  # noqa: E731
    O = lambda name: (lambda w: str(w["dir"] / "out" / name))  # noqa: E731
    UNDER_FILE = lambda name: (lambda w: str(w["dir"] / "a_file" / name))  # noqa: E731
    T = ["train", "--data", "digits", "--steps", "2", *MICRO]
    c = [
        # --- train: config values
        ("train-num-groups-0", [*T, "--set", "unet.num_groups=0", "--out", O("t1")], "unet.num_groups"),
        ("train-ch-0", [*T, "--set", "unet.ch=0", "--out", O("t2")], "unet.ch"),
        ("train-threads-negative", [*T, "--set", "train.threads=-3", "--out", O("t3")], "train.threads"),
        ("train-teacher-without-method", [*T, "--teacher", F("fp"), "--out", O("t41")],
         "--teacher does not apply to full-precision"),
        ("train-abits-without-method", [*T, "--abits", "4", "--out", O("t42")], "--abits does not apply"),
        ("train-student-with-preset", ["train", "--method", "xnor", "--teacher", F("fp"), "--preset", "cifar10",
                                       "--steps", "1", "--out", O("t43")], "--preset does not apply"),
        ("train-bf16-and-precision", [*T, "--bf16", "--set", "train.precision=fp32", "--out", O("t44")],
         "both set train.precision"),
        ("train-seed-negative", [*T, "--set", "train.seed=-1", "--out", O("t40")], "train.seed"),
        ("train-lr-infinity", [*T, "--set", "train.lr=Infinity", "--out", O("t4")], "finite"),
        ("train-lr-nan", [*T, "--set", "train.lr=nan", "--out", O("t5")], "finite"),
        ("train-lr-text", [*T, "--set", "train.lr=fast", "--out", O("t6")], "train.lr"),
        ("train-batch-0", [*T, "--set", "train.batch_size=0", "--out", O("t7")], "train.batch_size"),
        ("train-steps-negative", ["train", "--data", "digits", "--steps", "-5", *MICRO, "--out", O("t8")], "steps"),
        ("train-dropout-1.5", [*T, "--set", "unet.dropout=1.5", "--out", O("t9")], "unet.dropout"),
        ("train-ch-mult-empty", [*T, "--set", "unet.ch_mult=[]", "--out", O("t10")], "ch_mult"),
        ("train-resolution-odd", [*T, "--set", "unet.resolution=30", "--out", O("t11")], "resolution"),
        ("train-timesteps-1", [*T, "--set", "diffusion.timesteps=1", "--out", O("t12")], "diffusion.timesteps"),
        ("train-no-equals", [*T, "--set", "train.lr", "--out", O("t13")], "KEY=VALUE"),
        ("train-unknown-section", [*T, "--set", "foo.bar=1", "--out", O("t14")], "foo.bar"),
        ("train-unknown-method", ["train", "--method", "magic", "--out", O("t15")], "magic"),
        ("train-grad-clip-inf", [*T, "--set", "train.grad_clip=inf", "--out", O("t16")], "finite"),
        # --- train: data
        ("train-npz-nan", ["train", "--data", P("nan.npz"), "--steps", "2", *MICRO, "--out", O("t20")], "NaN"),
        ("train-npz-missing", ["train", "--data", "npz:/nonexistent.npz", *MICRO, "--out", O("t21")], "does not exist"),
        ("train-npz-garbage", ["train", "--data", lambda w: f"npz:{w['dir'] / 'garbage.npz'}", *MICRO,
                               "--out", O("t22")], "garbage.npz"),
        ("train-npz-wrong-key", ["train", "--data", lambda w: f"npz:{w['dir'] / 'wrongkey.npz'}", *MICRO,
                                 "--out", O("t23")], "arr_0"),
        ("train-npz-out-of-range", ["train", "--data", lambda w: f"npz:{w['dir'] / 'badrange.npz'}", *MICRO,
                                    "--out", O("t24")], "range"),
        ("train-folder-empty", ["train", "--data", lambda w: f"folder:{w['dir'] / 'emptydir'}", *MICRO,
                                "--out", O("t25")], "no images"),
        ("train-data-unknown", ["train", "--data", "imagenet", *MICRO, "--out", O("t26")], "imagenet"),
        # --- train: files
        ("train-out-under-file", [*T, "--out", UNDER_FILE("run")], "a_file"),
        ("train-teacher-empty", ["train", "--method", "bidm", "--teacher", P("empty.ckpt"), "--out", O("t30")], "empty.ckpt"),
        ("train-teacher-binary", ["train", "--method", "bidm", "--teacher", F("student"), "--out", O("t31")], "teacher"),
        ("train-teacher-nan", ["train", "--method", "bidm", "--teacher", F("nan"), *MICRO, "--out", O("t32")], "non-finite"),
        ("train-init-missing", ["train", "--init", "/nonexistent.ckpt", "--out", O("t33")], "does not exist"),
        ("train-init-garbage", ["train", "--init", P("garbage.ckpt"), "--out", O("t34")], "garbage.ckpt"),
        ("train-resume-other-spec", [*T, "--set", "train.seed=5", "--out", lambda w: str(Path(w["fp"]).parent)],
         "different spec"),
        # --- sample
        ("sample-seed-negative", ["sample", F("student"), "--seed", "-1", "--out", O("s20")], "--seed"),
        ("eval-seed-negative", ["eval", F("student"), "--seed", "-1", "--out", O("e20")], "--seed"),
        ("sample-ddpm-with-eta", ["sample", F("fp"), "--sampler", "ddpm", "--eta", "0.5", "--out", O("s24")],
         "--eta 0.5 applies to --sampler ddim only"),
        ("sample-plms-with-skip", ["sample", F("fp"), "--sampler", "plms", "--skip", "quad", "--out", O("s25")],
         "--skip quad applies"),
        ("sample-empty-ckpt", ["sample", P("empty.ckpt"), "--out", O("s1")], "empty.ckpt"),
        ("sample-garbage-ckpt", ["sample", P("garbage.ckpt"), "--out", O("s2")], "garbage.ckpt"),
        ("sample-truncated-ckpt", ["sample", P("truncated.ckpt"), "--out", O("s3")], "truncated.ckpt"),
        ("sample-nan-weights", ["sample", F("nan"), "--n", "2", "--steps", "2", "--out", O("s4")], "non-finite"),
        ("sample-wrong-shape", ["sample", F("shape"), "--n", "2", "--steps", "2", "--out", O("s5")], "conv_in.weight"),
        ("sample-missing-key", ["sample", F("missing"), "--n", "2", "--steps", "2", "--out", O("s6")], "conv_out.weight"),
        ("sample-other-arch", ["sample", F("arch"), "--n", "2", "--steps", "2", "--out", O("s7")], "arch.ckpt"),
        ("sample-bad-spec", ["sample", F("badspec"), "--n", "2", "--steps", "2", "--out", O("s8")], "num_groups"),
        ("sample-model-not-dict", ["sample", F("notdict"), "--n", "2", "--steps", "2", "--out", O("s9")], "notdict.ckpt"),
        ("sample-evil-pickle", ["sample", P("evil.ckpt"), "--out", O("s10")], "evil.ckpt"),
        ("sample-n-0", ["sample", F("fp"), "--n", "0", "--out", O("s11")], "--n"),
        ("sample-steps-0", ["sample", F("fp"), "--steps", "0", "--out", O("s12")], "--steps"),
        ("sample-steps-too-many", ["sample", F("fp"), "--n", "1", "--steps", "5000", "--out", O("s13")], "--steps"),
        ("sample-eta-negative", ["sample", F("fp"), "--n", "1", "--eta", "-1", "--out", O("s14")], "--eta"),
        ("sample-batch-0", ["sample", F("fp"), "--n", "1", "--batch-size", "0", "--out", O("s15")], "--batch-size"),
        ("sample-out-under-file", ["sample", F("fp"), "--n", "1", "--steps", "2", "--out", UNDER_FILE("s")], "a_file"),
        ("sample-tflite-junk", ["sample", "--tflite", P("junk.tflite"), "--n", "1", "--out", O("s16")], "junk.tflite"),
        ("sample-tflite-empty", ["sample", "--tflite", P("empty.tflite"), "--n", "1", "--out", O("s17")], "empty.tflite"),
        ("sample-tflite-no-sidecar", ["sample", "--tflite", P("nosidecar.tflite"), "--n", "1", "--out", O("s18")],
         "nosidecar.json"),
        ("sample-tflite-bad-sidecar", ["sample", "--tflite", P("badside.tflite"), "--n", "1", "--out", O("s19")],
         "badside.json"),
        ("sample-tflite-stale-sidecar", ["sample", "--tflite", P("stale.tflite"), "--n", "1", "--out", O("s21")],
         "describes another .tflite"),
        ("eval-tflite-stale-sidecar", ["eval", P("stale.tflite"), "--n", "2", "--out", O("e11")], "stale.json"),
        ("sample-no-ema-on-model", ["sample", F("fp"), "--no-ema", "--n", "1", "--out", O("s20")], "--no-ema"),
        # --- eval
        ("eval-npz-with-n", ["eval", P("small.npz"), "--n", "5", "--out", O("e21")], "existing samples"),
        ("eval-tflite-with-device", ["eval", P("stale.tflite"), "--device", "cpu", "--out", O("e22")],
         "--device does not apply"),
        ("sample-tflite-with-no-ema", ["sample", "--tflite", P("stale.tflite"), "--no-ema", "--out", O("s22")],
         "--no-ema does not apply"),
        ("sample-ckpt-and-tflite", ["sample", F("fp"), "--tflite", P("stale.tflite"), "--out", O("s23")],
         "CKPT does not apply"),
        ("eval-ref-missing", ["eval", P("small.npz"), "--ref", "npz:/nonexistent.npz", "--out", O("e1")], "--ref"),
        ("eval-ref-limit-negative", ["eval", P("small.npz"), "--ref-limit", "-1", "--out", O("e2")], "--ref-limit"),
        ("eval-resolution-mismatch", ["eval", P("small.npz"), "--ref", "mnist5k", "--out", O("e3")], "16x16"),
        ("eval-one-sample", ["eval", P("onesample.npz"), "--ref", "digits", "--out", O("e4")], "2 samples"),
        ("eval-npz-nan", ["eval", P("nan.npz"), "--ref", "digits", "--out", O("e5")], "NaN"),
        ("eval-npz-garbage", ["eval", P("garbage.npz"), "--out", O("e6")], "garbage.npz"),
        ("eval-npz-empty", ["eval", P("empty.npz"), "--out", O("e6b")], "empty.npz"),  # was click's "Aborted!"
        ("eval-wrong-suffix", ["eval", P("a_file"), "--out", O("e7")], "a_file"),
        ("eval-ckpt-empty", ["eval", P("empty.ckpt"), "--out", O("e8")], "empty.ckpt"),
        ("eval-n-0", ["eval", F("fp"), "--n", "0", "--out", O("e9")], "--n"),
        ("eval-ref-unknown", ["eval", P("small.npz"), "--ref", "imagenet", "--out", O("e10")], "imagenet"),
        # --- export
        ("export-empty", ["export", P("empty.ckpt"), "--out", O("x1")], "empty.ckpt"),
        ("export-garbage", ["export", P("garbage.ckpt"), "--out", O("x2")], "garbage.ckpt"),
        ("export-fp-to-lce", ["export", F("fp"), "--target", "lce", "--out", O("x3")], "--target fp"),
        ("export-nan", ["export", F("nan"), "--target", "fp", "--out", O("x4")], "non-finite"),
        ("export-tol-negative", ["export", F("student"), "--tol", "-1", "--out", O("x5")], "--tol"),
        ("export-negative-lsq-step", ["export", F("negstep"), "--out", O("x10")], "non-positive learned LSQ step"),
        ("export-unfinished-progressive", ["export", F("student"), "--out", O("x9")], "--allow-float-layers"),
        ("export-name-escapes-out", ["export", F("student"), "--name", "../evil", "--out", O("x11")], "--name"),
        ("export-name-empty", ["export", F("fp"), "--target", "fp", "--name", "", "--out", O("x12")], "--name"),
        ("export-out-under-file", ["export", F("fp"), "--target", "fp", "--out", UNDER_FILE("x")], "a_file"),
        ("export-a8-on-w1a4", ["export", F("student"), "--a8", "int8", "--out", O("x13")], "use --a4"),
        ("export-a4-on-fp-target", ["export", F("fp"), "--target", "fp", "--a4", "int8", "--out", O("x14")],
         "--target fp has none"),
        ("export-convs-with-name", ["export", F("fp"), "--target", "convs", "--name", "x", "--out", O("x15")],
         "--name does not apply"),
        ("export-fp-with-per-layer", ["export", F("fp"), "--target", "fp", "--per-layer", "--out", O("x16")],
         "--per-layer does not apply"),
        ("export-int8-out-on-bitplanes", ["export", F("student"), "--int8-out", "tensor", "--out", O("x17")],
         "add --a4 int8"),
        ("export-int8-out-fp-target", ["export", F("fp"), "--target", "fp", "--int8-out", "channel", "--out",
                                       O("x18")], "--target fp has none"),
        ("export-dorefa-codes", ["export", F("dorefa"), "--out", O("x7")], "DoReFa"),
        ("export-per-batch-lsq", ["export", F("per_batch"), "--out", O("x8")], "lsq_step=log"),
        ("export-missing-key", ["export", F("missing"), "--target", "fp", "--out", O("x6")], "conv_out.weight"),
        # --- import
        ("import-out-is-src", ["import", P("garbage.ckpt"), "--out", P("garbage.ckpt")], "input file itself"),
        ("pack-out-is-input", ["pack", F("student"), "--out", F("student")], "input file itself"),
        ("import-garbage-file", ["import", P("garbage.ckpt"), "--out", O("i1.ckpt")], "garbage.ckpt"),
        ("import-empty-file", ["import", P("empty.ckpt"), "--out", O("i2.ckpt")], "empty.ckpt"),
        ("import-diffusers-no-key", ["import", P("diff_nokey"), "--out", O("i3.ckpt")], "block_out_channels"),
        ("import-diffusers-bad-json", ["import", P("diff_badjson"), "--out", O("i4.ckpt")], "config.json"),
        ("import-empty-dir", ["import", P("emptydir"), "--out", O("i5.ckpt")], "emptydir"),
        ("import-evil-pickle", ["import", P("evil.ckpt"), "--out", O("i6.ckpt")], "evil.ckpt"),
        ("import-diffusers-wrong-shapes", ["import", P("diff_shapes"), "--out", O("i8.ckpt")], "conv_in.weight"),
        ("import-bdmtool-ckpt", ["import", F("fp"), "--out", O("i9.ckpt")], "already a bdmtool checkpoint"),
        ("import-pesser-nan", ["import", P("pesser_nan.ckpt"), "--out", O("i10.ckpt")], "NaN"),
        ("import-resolution-0", ["import", F("fp"), "--resolution", "0", "--out", O("i7.ckpt")], "--resolution"),
        # --- ops
        ("ops-empty-ckpt", ["ops", P("empty.ckpt")], "empty.ckpt"),
        ("ops-garbage-ckpt", ["ops", P("garbage.ckpt")], "garbage.ckpt"),
        ("ops-bad-spec", ["ops", F("badspec")], "num_groups"),
        ("ops-no-input", ["ops"], "--preset"),
        ("ops-unknown-preset", ["ops", "--preset", "huge"], "huge"),
        # a checkpoint has its own bits and method: a flag that contradicts them was silently ignored
        ("ops-ckpt-other-abits", ["ops", F("fp"), "--abits", "4"], "--abits 4 does not apply"),
        ("ops-ckpt-other-method", ["ops", F("fp"), "--method", "bidm"], "--method bidm does not apply"),
        ("ops-ckpt-and-preset", ["ops", F("fp"), "--preset", "tiny"], "not both"),
        ("ops-ldm-method-without-rule", ["ops", "--preset", "ldm4-bedrooms", "--method", "xnor"], "xnor"),
        ("ops-out-under-file", ["ops", "--preset", "tiny", "--out", UNDER_FILE("o")], "a_file"),
        # --- inspect
        ("inspect-junk", ["inspect", P("junk.tflite")], "junk.tflite"),
        ("inspect-empty", ["inspect", P("empty.tflite")], "empty.tflite"),
        ("inspect-ckpt", ["inspect", F("fp")], "model.ckpt"),
        # --- pack
        ("pack-empty", ["pack", P("empty.ckpt"), "--out", O("p1.ckpt")], "empty.ckpt"),
        ("pack-fp", ["pack", F("fp"), "--out", O("p2.ckpt")], "binar"),
        ("pack-out-under-file", ["pack", F("student"), "--out", UNDER_FILE("p.ckpt")], "a_file"),
        ("pack-tol-negative", ["pack", F("student"), "--out", O("p3.ckpt"), "--tol", "-1"], "--tol"),
        ("pack-tol-nan", ["pack", F("student"), "--out", O("p4.ckpt"), "--tol", "nan"], "--tol"),
        # --- diagnose
        ("diagnose-timesteps-text", ["diagnose", F("student"), "--timesteps", "a,b", "--out", O("d1")], "--timesteps"),
        ("diagnose-timesteps-range", ["diagnose", F("student"), "--timesteps", "5000", "--out", O("d2")], "--timesteps"),
        ("diagnose-timesteps-twice", ["diagnose", F("student"), "--timesteps", "10,10", "--out", O("d7")],
         "twice"),
        ("diagnose-seed-negative", ["diagnose", F("student"), "--seed", "-1", "--out", O("d8")], "--seed"),
        ("diagnose-n-1", ["diagnose", F("student"), "--n", "1", "--out", O("d3")], "--n"),
        ("diagnose-empty", ["diagnose", P("empty.ckpt"), "--out", O("d4")], "empty.ckpt"),
        ("diagnose-teacher-binary", ["diagnose", F("student"), "--teacher", F("student"), "--n", "2",
                                     "--timesteps", "10", "--out", O("d5")], "teacher"),
        # --- bench (host)
        ("bench-nothing", ["bench", "--out", O("b1")], "MODEL"),
        ("bench-junk-model", ["bench", P("junk.tflite"), "--out", O("b2"), "--runs", "1", "--repeats", "1"], "junk.tflite"),
        ("bench-baseline-is-model", ["bench", P("junk.tflite"), "--baseline", P("junk.tflite"), "--out", O("b9")],
         "same model"),
        ("bench-local-with-timeout", ["bench", P("junk.tflite"), "--timeout", "5", "--out", O("b10")],
         "--timeout does not apply"),
        ("bench-compare-with-model", ["bench", P("junk.tflite"), "--compare", P("junk.tflite"), P("junk.tflite")],
         "MODEL does not apply"),
        ("bench-convs-no-shapes", ["bench", "--convs", P("convs_noshapes"), "--out", O("b3")], "convs.json"),
        ("bench-convs-bad-json", ["bench", "--convs", P("convs_badjson"), "--out", O("b4")], "convs.json"),
        ("bench-runs-0", ["bench", P("junk.tflite"), "--runs", "0", "--out", O("b5")], "--runs"),
        ("bench-device-unknown", ["bench", P("junk.tflite"), "--device", "usb:3", "--out", O("b6")], "usb:3"),
        ("bench-compare-bad-json", ["bench", "--compare", P("badside.json"), P("badside.json")], "badside.json"),
        # --- replicate (refused before any training)
        ("replicate-report-only-with-only", ["replicate", "--report-only", "--only", "fp", "--out", O("r9")],
         "--only does not apply"),
        ("replicate-jobs-0", ["replicate", "--jobs", "0", "--out", O("r1")], "--jobs"),
        ("replicate-only-unknown", ["replicate", "--only", "fp_seed1", "--out", O("r2")], "fp_seed1"),
        ("replicate-teacher-binary", ["replicate", "--teacher", F("student"), "--out", O("r3")], "binarized"),
        ("replicate-teacher-empty", ["replicate", "--teacher", P("empty.ckpt"), "--out", O("r4")], "empty.ckpt"),
        ("replicate-n-1", ["replicate", "--n", "1", "--out", O("r5")], "--n"),
        ("replicate-report-only-empty", ["replicate", "--report-only", "--out", O("r6")], "has finished"),
        ("replicate-table-unknown", ["replicate", "--tables", "t9", "--out", O("r7")], "t9"),
        # --- demo
        ("demo-binary-without-phone", ["demo", "--benchmark-binary", P("junk.tflite"), "--out", O("m9")],
         "--benchmark-binary does not apply"),
        ("demo-budget-0", ["demo", "--budget", "0", "--out", O("m1")], "--budget"),
        ("demo-n-1", ["demo", "--n", "1", "--out", O("m3")], "--n"),  # FID failed after minutes of sampling
        ("demo-qat-batch-0", ["demo", "--qat-batch", "0", "--out", O("m4")], "--qat-batch"),
        ("demo-qat-steps-0", ["demo", "--qat-steps", "0", "--out", O("m5")], "--qat-steps"),
        ("demo-steps-too-many", ["demo", "--steps", "5000", "--out", O("m6")], "--steps"),
        ("demo-budget-inf", ["demo", "--budget", "inf", "--out", O("m7")], "--budget"),
        ("demo-device-bad", ["demo", "--device", "usb:NOPE", "--out", O("m2")], "usb:NOPE"),
    ]
    return c


CASES = _cases()


def _resolve(args, w):
    return [str(a(w)) if callable(a) else str(a) for a in args]


def check_one_line_error(output: str, words: str) -> None:
    lines = [ln for ln in output.splitlines() if ln.strip()]
    assert "Traceback" not in output, output
    errors = [ln for ln in lines if ln.startswith("Error:")]
    assert len(errors) == 1 and lines[-1] == errors[0], output
    assert words.lower() in errors[0].lower(), output


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_error(w, case):
    _, args, words = case
    r = CliRunner().invoke(cli, _resolve(args, w))
    assert not (r.exception and not isinstance(r.exception, SystemExit)), \
        f"{type(r.exception).__name__}: {r.exception}\n{r.output}"
    assert r.exit_code != 0, r.output
    check_one_line_error(r.output, words)
    assert not list(Path(w["dir"]).rglob("*.tmp")), "a temporary file was left behind"
    assert not w["marker"].exists(), "a pickle was executed"


def test_case_table_is_large_and_covers_every_command():
    assert len(CASES) >= 60
    commands = {c[1][0] for c in CASES}
    assert commands >= {"train", "sample", "eval", "export", "import", "ops", "inspect", "pack", "diagnose",
                        "bench", "demo", "replicate"}


def test_training_that_diverges_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    """lr=1e30: the first update makes the weights ~1e30, the next forward overflows. Training must stop with one
    line at that step, before updating, and leave the step-1 checkpoint and valid JSON metrics."""
    args = ["train", "--data", "digits", "--steps", "6", *MICRO, "--set", "train.lr=1e30", "--set", "train.warmup_steps=0",
            "--set", "train.grad_clip=0", "--set", "train.ckpt_every=1", "--set", "train.log_every=1",
            "--out", str(tmp_path / "run")]
    r = CliRunner().invoke(cli, args)
    assert r.exit_code == 1 and not (r.exception and not isinstance(r.exception, SystemExit)), r.output
    check_one_line_error(r.output, "training diverged at step")
    step = int(r.output.split("training diverged at step ")[1].split(":")[0])
    assert step >= 2 and f"last good state, step {step - 1}" in r.output
    ck = load_checkpoint(tmp_path / "run" / "state.ckpt")  # refuses non-finite weights
    assert ck["step"] == step - 1
    for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines():
        json.loads(line, parse_constant=lambda c: pytest.fail(f"non-JSON constant {c} in metrics.jsonl"))


def _limited(args: list[str], cwd: Path, limit_bytes: int) -> subprocess.CompletedProcess:
    """Run the CLI with a file-size limit: writes past it fail with EFBIG, as a full disk fails with ENOSPC."""
    def pre():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit_bytes, limit_bytes))

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([*bdmtool_cmd(), *args], cwd=cwd, capture_output=True, text=True, timeout=600,
                          preexec_fn=pre, env=env)


@pytest.mark.parametrize("command", ["train", "sample", "import", "pack"])
def test_a_full_disk_is_one_line_and_leaves_no_torn_file(w, tmp_path, command):
    out = tmp_path / "out"
    args = {
        "train": ["train", "--data", "digits", "--steps", "2", *MICRO, "--out", str(out)],
        "sample": ["sample", w["fp"], "--n", "64", "--steps", "1", "--out", str(out / "s")],
        "import": ["import", str(w["dir"] / "pesser_ok.ckpt"), "--out", str(out / "i.ckpt")],
        "pack": ["pack", w["student"], "--out", str(out / "p.ckpt")],
    }[command]
    if command == "import":
        ck = load_checkpoint(w["fp"])
        torch.save(dict(ck["ema"] or ck["model"]), w["dir"] / "pesser_ok.ckpt")
    r = _limited(args, tmp_path, 20_000)
    assert r.returncode == 1, r.stdout + r.stderr
    assert "Traceback" not in r.stderr, r.stderr
    check_one_line_error(r.stderr, "File too large")
    left = [p for p in out.rglob("*") if p.is_file()] if out.exists() else []
    assert not [p for p in left if p.suffix == ".tmp" or p.name.startswith(".")], left
    for p in left:  # whatever exists is whole: checkpoints load, images and arrays open
        if p.suffix == ".ckpt":
            load_checkpoint(p)
        elif p.suffix == ".npz":
            np.load(p)["arr_0"]
        elif p.suffix == ".json":
            json.loads(p.read_text())


def test_atomic_writes_keep_the_mode_a_plain_write_would_give(tmp_path):
    from bdmtool.files import atomic_write

    mask = os.umask(0o022)
    try:
        atomic_write(tmp_path / "a.json", "{}")
        plain = tmp_path / "b.json"
        plain.write_text("{}")
        assert (tmp_path / "a.json").stat().st_mode & 0o777 == plain.stat().st_mode & 0o777 == 0o644
    finally:
        os.umask(mask)
