"""android_bench: the lce_benchmark_model parser, the adb path against a fake adb, the real host path."""

import json
import os
import subprocess
from pathlib import Path

import pytest

from conftest import MICRO_UNET, bdmtool_cmd
from fakes import PIXEL, fake_arm32_binary, fake_arm64_binary, install_fake_adb

from bdmtool.android_bench.adb import DeviceError, list_devices, remote_command
from bdmtool.android_bench.options import BenchOptions
from bdmtool.android_bench.parse import BenchmarkParseError, parse_benchmark_output, parse_profile_csv

FIX = Path(__file__).parent / "fixtures" / "lce_benchmark"
COMMON = ["data.limit=32", "train.batch_size=4", "train.threads=1"]


# ----------------------------------------------------------------------------------------------- parser
def test_parse_tf216_output_with_info_prefix_and_large_values():
    out = parse_benchmark_output((FIX / "tf216_info_prefix.txt").read_text())
    assert (out.init_us, out.first_us) == (88412, 1262315)
    assert out.warmup_avg_us == pytest.approx(1.26232e6) and out.avg_us == pytest.approx(1.24027e6)
    assert out.avg_ms == pytest.approx(1240.27)
    assert out.model_size_mb == pytest.approx(16.6604)
    assert out.memory_mb == {"init": pytest.approx(21.5391), "overall": pytest.approx(96.8828)}
    assert [s["count"] for s in out.stats] == [1, 5] and out.stats[1]["avg"] == pytest.approx(1.24027e6)
    # Only the regular-run table, not the initialization block nor 'Top by Computation Time'.
    assert [r.node_type for r in out.ops] == ["LceQuantize", "LceBconv2d", "CONV_2D", "ADD"]
    b = out.ops[1]
    assert (b.first_ms, b.avg_ms, b.percent, b.times_called) == (310.552, 309.871, 24.985, 1)
    assert b.node_index == 4
    assert b.outputs == ["u/down__0__block__0__conv1__scale/mul;u/down__0__block__0__conv1/Conv2D"]
    assert out.by_type == {"CONV_2D": 903.406, "LceBconv2d": 309.871, "ADD": 24.874, "LceQuantize": 2.087}


def test_parse_old_output_without_prefix_and_with_start_column():
    out = parse_benchmark_output((FIX / "lce_old_start_column.txt").read_text())
    assert out.avg_us == pytest.approx(31420.6) and out.init_us == 1471
    assert [s["avg"] for s in out.stats] == [32491.4, 31420.6]
    assert [(r.node_type, r.avg_ms) for r in out.ops] == [("CONV_2D", 4.082), ("LceQuantize", 0.148),
                                                          ("LceBconv2d", 1.302), ("MEAN", 0.049)]
    assert out.ops[2].name == "[quant_conv2d_1/Conv2D, with, commas]:2" and out.ops[2].node_index == 2
    assert out.by_type == {"CONV_2D": 4.082, "LceBconv2d": 1.302}


def test_parse_profile_csv_keeps_commas_in_names():
    rows, by_type = parse_profile_csv((FIX / "profile.csv").read_text())
    assert [(r.node_type, r.avg_ms, r.percent) for r in rows] == [("LceQuantize", 0.204, 1.1),
                                                                  ("LceBconv2d", 1.2, 6.5), ("CONV_2D", 17.05, 92.4)]
    assert rows[1].name == "[u/mid__block_1__conv1__scale/mul;u/mid__block_1__conv1/Conv2D,x]:8"
    assert by_type == {"CONV_2D": 17.05, "LceBconv2d": 1.2, "LceQuantize": 0.204}


def test_parse_truncated_output_is_a_clear_error():
    text = (FIX / "tf216_info_prefix.txt").read_text().split("INFO: Inference timings")[0]
    with pytest.raises(BenchmarkParseError, match="no 'Inference timings in us' line"):
        parse_benchmark_output(text)


# ---------------------------------------------------------------------------------------- quoting
def test_remote_command_quotes_every_argument():
    cmd = remote_command(["ls", "a b;reboot", "$(id)", "x'y"])
    assert cmd == "ls 'a b;reboot' '$(id)' 'x'\"'\"'y'"
    r = subprocess.run(["sh", "-c", "printf '%s\\n' " + remote_command(["a b;echo INJECTED", "$(echo X)"])],
                       capture_output=True, text=True)
    assert r.stdout.splitlines() == ["a b;echo INJECTED", "$(echo X)"]


# --------------------------------------------------------------------------------- models (real)
@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A micro BiDM W1A1 .tflite (real LCE export) and its FP baseline (real onnx2tf), plus conv micro-models."""
    from bdmtool.tools.export import export_checkpoint, export_convs
    from bdmtool.trainer.spec import build_train_spec
    from bdmtool.trainer.train import train

    root = tmp_path_factory.mktemp("bench_models")
    teacher = str(train(build_train_spec("tiny", "digits", 3, [*MICRO_UNET, *COMMON]), root / "fp", progress=False))
    student = train(build_train_spec(method="bidm", teacher=teacher, steps=2, overrides=COMMON), root / "bidm",
                    progress=False)
    binary = export_checkpoint(student, root / "exp", log=lambda s: None).tflite
    fp = export_checkpoint(teacher, root / "exp_fp", target="fp", log=lambda s: None).tflite
    index = export_convs(student, root / "exp", log=lambda s: None)
    return {"binary": binary, "fp": fp, "convs": index.parent, "root": root}


@pytest.mark.slow
def test_conv_micro_models_cover_every_layer(models):
    from bdmtool.exporter.inspect_tflite import inspect_model

    index = json.loads((models["convs"] / "convs.json").read_text())
    layers = {ly["name"]: ly for ly in index["layers"]}
    assert layers["conv_in"]["binary_in_model"] is False and layers["down.0.block.0.conv1"]["binary_in_model"]
    assert layers["down.0.downsample.conv"]["shape"].startswith("33x33x32-32-k3s2p0")  # padded input, valid conv
    for key, s in index["shapes"].items():
        hb = inspect_model((models["convs"] / s["binary"]).read_bytes()).histogram
        hf = inspect_model((models["convs"] / s["fp"]).read_bytes()).histogram
        assert hb["LceBconv2d"] == 1 and "CONV_2D" not in hb, key
        assert hf["CONV_2D"] == 1 and "LceBconv2d" not in hf, key


@pytest.mark.slow
def test_host_bench_of_w1a1_model_and_fp_baseline(models, tmp_path):
    """The real host path: LCE interpreter (indirect bgemm / XNNPACK), whole models and every conv."""
    out = tmp_path / "bench"
    r = subprocess.run([*bdmtool_cmd(), "bench", str(models["binary"]), "--baseline", str(models["fp"]),
                        "--convs", str(models["convs"]), "--device", "local", "--out", str(out), "--runs", "3",
                        "--repeats", "2", "--warmup", "1"], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads((out / "results.json").read_text())
    assert res["schema"] == "bdmtool-bench" and res["version"] == 1 and res["status"] == "complete"
    assert res["target"]["kind"] == "host" and "HOST" in res["target"]["label"]
    b, f = res["models"]["binary"], res["models"]["baseline"]
    assert b["kernel"] == "indirect_bgemm" and f["kernel"] == "xnnpack"
    for m in (b, f):
        lat = m["latency"]
        assert lat["n"] == 6 and 0 < lat["min_ms"] <= lat["median_ms"] <= lat["max_ms"]
    assert res["speedup"] == pytest.approx(f["latency"]["median_ms"] / b["latency"]["median_ms"])
    assert res["size_ratio"] > 2  # 1-bit weights
    index = json.loads((models["convs"] / "convs.json").read_text())
    assert len(res["convs"]) == len(index["layers"])
    assert all(c["binary"]["median_ms"] > 0 and c["fp"]["median_ms"] > 0 for c in res["convs"])
    md = (out / "results.md").read_text()
    assert "| binary |" in md and "down.0.block.0.conv1" in md and "HOST" in md
    assert (out / "convs.png").stat().st_size > 5000
    assert "Whole model" in r.stdout


# -------------------------------------------------------------------------------- adb (fake adb)
def _env(monkeypatch, env):
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.delenv("BDMTOOL_ADB", raising=False)


def test_device_states_give_one_line_errors_with_the_fix(tmp_path, monkeypatch):
    from bdmtool.android_bench.adb import AdbDevice

    devs = {"R5CT": {**PIXEL}, "OFF1": {**PIXEL, "state": "offline"}, "UNAU": {**PIXEL, "state": "unauthorized"}}
    _env(monkeypatch, install_fake_adb(tmp_path, devs))
    assert [(d.serial, d.state, d.model) for d in list_devices()] == [
        ("R5CT", "device", "Pixel_7"), ("OFF1", "offline", ""), ("UNAU", "unauthorized", "")]
    with pytest.raises(DeviceError, match=r"\[adb:UNAU\] device is unauthorized: unlock the phone and accept"):
        AdbDevice("UNAU")
    with pytest.raises(DeviceError, match=r"\[adb:OFF1\] device is offline: reconnect"):
        AdbDevice("OFF1")
    with pytest.raises(DeviceError, match=r"\[adb:NOPE\] not attached; 'adb devices' lists: R5CT \(device\)"):
        AdbDevice("NOPE")
    dev = AdbDevice("R5CT")
    assert dev.properties()["abi"] == "arm64-v8a" and dev.properties()["soc"] == "GS201"
    assert dev.max_cpu_freqs() == PIXEL["cpu_max_freq"]


def _bench_cli(args, env, timeout=600):
    return subprocess.run([*bdmtool_cmd(), "bench", *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **env})


@pytest.mark.slow
def test_adb_bench_end_to_end_with_hash_skip_and_layer_mapping(models, tmp_path):
    env = install_fake_adb(tmp_path, {"R5CT": {**PIXEL}})
    binary = fake_arm64_binary(tmp_path / "lce_benchmark_model")
    args = [str(models["binary"]), "--baseline", str(models["fp"]), "--convs", str(models["convs"]),
            "--device", "adb:R5CT", "--benchmark-binary", str(binary), "--runs", "5", "--repeats", "2",
            "--threads", "4", "--out", str(tmp_path / "b1")]
    r = _bench_cli(args, env)
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads((tmp_path / "b1" / "results.json").read_text())
    t = res["target"]
    assert (t["kind"], t["model"], t["soc"], t["abi"], t["android"]) == ("adb", "Pixel_7", "GS201", "arm64-v8a", "14")
    assert t["cpu_mask"] == "80"  # the single 2.85 GHz prime core
    assert t["benchmark_binary"]["sha256"]
    b = res["models"]["binary"]
    # The fake benchmark charges 0.05 ms per LceBconv2d, 0.4 per CONV_2D, 0.2 per other op, from the real ops.
    from bdmtool.exporter.inspect_tflite import inspect_model

    hist = inspect_model(models["binary"].read_bytes()).histogram
    expect = 0.05 * hist["LceBconv2d"] + 0.4 * hist.get("CONV_2D", 0) + 0.2 * (
        sum(hist.values()) - hist["LceBconv2d"] - hist.get("CONV_2D", 0))
    assert b["latency"]["median_ms"] == pytest.approx(expect, rel=1e-4)
    assert len(b["ops"]) == sum(hist.values())
    # Profiled bconvs map back to U-Net layer names.
    assert b["layers"]["down.0.block.0.conv1"] == pytest.approx(0.05)
    assert res["speedup"] > 0 and len(res["convs"]) > 10
    calls = [json.loads(x) for x in (Path(env["FAKE_ADB_STATE"]) / "calls.jsonl").read_text().splitlines()]
    bench_cmds = [c[-1] for c in calls if c[2:3] == ["shell"] and "--graph=" in c[-1]]
    assert bench_cmds[0].startswith("taskset 80 /data/local/tmp/bdmtool/lce_benchmark_model --graph=/data/local/tmp/bdmtool/")
    assert "--num_threads=4" in bench_cmds[0] and "--enable_op_profiling=true" in bench_cmds[0]
    pushes = [c for c in calls if c[2:3] == ["push"]]
    assert len(pushes) == 3 + 2 * len(json.loads((models["convs"] / "convs.json").read_text())["shapes"])
    # A second run pushes nothing: the remote sha256 matches.
    r = _bench_cli([*args[:-1], str(tmp_path / "b2")], env)
    assert r.returncode == 0, r.stderr[-2000:]
    calls2 = (Path(env["FAKE_ADB_STATE"]) / "calls.jsonl").read_text().splitlines()[len(calls):]
    assert not [c for c in map(json.loads, calls2) if c[2:3] == ["push"]]
    # --compare diffs the two runs.
    r = _bench_cli(["--compare", str(tmp_path / "b1" / "results.json"), str(tmp_path / "b2" / "results.json")], env)
    assert r.returncode == 0 and "| binary |" in r.stdout and "1.00 |" in r.stdout


@pytest.mark.slow
def test_file_names_cannot_inject_commands(models, tmp_path):
    env = install_fake_adb(tmp_path, {"R5CT": {**PIXEL}})
    evil = tmp_path / "m; touch INJECTED; $(touch INJECTED2) `touch INJECTED3`.tflite"
    evil.write_bytes(models["binary"].read_bytes())
    r = _bench_cli([str(evil), "--device", "adb:R5CT", "--benchmark-binary",
                    str(fake_arm64_binary(tmp_path / "lce_benchmark_model")), "--runs", "2", "--repeats", "1",
                    "--out", str(tmp_path / "b")], env)
    assert r.returncode == 0, r.stderr[-2000:]
    fs = Path(env["FAKE_ADB_STATE"]) / "fs"
    assert not [p for p in fs.rglob("INJECTED*")] and not list(Path(env["FAKE_ADB_STATE"]).rglob("INJECTED*"))
    assert [p for p in (fs / "data/local/tmp/bdmtool").iterdir() if p.name.endswith("_" + evil.name)]
    assert json.loads((tmp_path / "b" / "results.json").read_text())["models"]["binary"]["latency"]["median_ms"] > 0


@pytest.mark.slow
def test_faults_are_one_line_errors_and_keep_measurements(models, tmp_path):
    binary = fake_arm64_binary(tmp_path / "lce_benchmark_model")
    common = ["--benchmark-binary", str(binary), "--runs", "2", "--repeats", "1"]
    # The device vanishes after the binary model's benchmark: that result stays on disk.
    env = install_fake_adb(tmp_path / "a", {"R5CT": {**PIXEL}}, disconnect_after_benchmarks=1)
    r = _bench_cli([str(models["binary"]), "--baseline", str(models["fp"]), "--device", "adb:R5CT", *common,
                    "--out", str(tmp_path / "o1")], env)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert "[adb:R5CT] benchmark fp.tflite (repeat 1/1): the device disconnected" in r.stderr
    res = json.loads((tmp_path / "o1" / "results.json").read_text())
    assert res["status"] == "partial" and "disconnected" in res["error"]
    assert "binary" in res["models"] and "baseline" not in res["models"]
    # Wrong ABI: a 32-bit-only phone with an arm64 binary.
    arm32 = {**PIXEL, "props": {**PIXEL["props"], "ro.product.cpu.abi": "armeabi-v7a"}}
    env = install_fake_adb(tmp_path / "b", {"OLD1": arm32})
    r = _bench_cli([str(models["binary"]), "--device", "adb:OLD1", *common, "--out", str(tmp_path / "o2")], env)
    assert r.returncode == 1 and "the device is armeabi-v7a but lce_benchmark_model is built for arm64-v8a" in r.stderr
    # An arm32 binary on an arm64 phone is fine (compatible ABI); a non-ELF file is not.
    env = install_fake_adb(tmp_path / "c", {"R5CT": {**PIXEL}}, noexec=True)
    r = _bench_cli([str(models["binary"]), "--device", "adb:R5CT", "--benchmark-binary",
                    str(fake_arm32_binary(tmp_path / "lce32")), "--runs", "2", "--repeats", "1",
                    "--out", str(tmp_path / "o3")], env)
    assert r.returncode == 1 and "Permission denied" in r.stderr and "[adb:R5CT] benchmark" in r.stderr
    r = _bench_cli([str(models["binary"]), "--device", "adb:R5CT", "--benchmark-binary", str(models["fp"]),
                    "--out", str(tmp_path / "o4")], env)
    assert r.returncode == 1 and "is not an ELF executable" in r.stderr
    # The benchmark exits non-zero: its stderr is in the one-line error.
    env = install_fake_adb(tmp_path / "d", {"R5CT": {**PIXEL}}, bench_fails=True)
    r = _bench_cli([str(models["binary"]), "--device", "adb:R5CT", *common, "--out", str(tmp_path / "o5")], env)
    assert r.returncode == 1 and "exit 1: ERROR: Failed to create model." in r.stderr
    # No binary given at all.
    r = _bench_cli([str(models["binary"]), "--device", "adb:R5CT", "--out", str(tmp_path / "o6")],
                   {**env, "BDMTOOL_LCE_BENCHMARK": ""})
    assert r.returncode == 1 and "needs lce_benchmark_model: pass --benchmark-binary" in r.stderr
    # Not enough space on the phone.
    env = install_fake_adb(tmp_path / "e", {"R5CT": {**PIXEL, "free_kb": 10}})
    r = _bench_cli([str(models["binary"]), "--device", "adb:R5CT", *common, "--out", str(tmp_path / "o7")], env)
    assert r.returncode == 1 and "check space: /data/local/tmp/bdmtool has 0.0 MiB free" in r.stderr


@pytest.mark.slow
def test_same_file_names_hangs_and_empty_answers_are_handled(models, tmp_path):
    binary = fake_arm64_binary(tmp_path / "lce_benchmark_model")
    common = ["--benchmark-binary", str(binary), "--runs", "2", "--repeats", "1"]
    # Model and baseline with the same file name from two folders: two device paths, both really timed.
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    same_bin, same_fp = tmp_path / "a" / "model.tflite", tmp_path / "b" / "model.tflite"
    same_bin.write_bytes(models["binary"].read_bytes())
    same_fp.write_bytes(models["fp"].read_bytes())
    env = install_fake_adb(tmp_path / "s", {"R5CT": {**PIXEL}})
    r = _bench_cli([str(same_bin), "--baseline", str(same_fp), "--device", "adb:R5CT", *common,
                    "--out", str(tmp_path / "o1")], env)
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads((tmp_path / "o1" / "results.json").read_text())
    assert res["models"]["binary"]["latency"]["median_ms"] != res["models"]["baseline"]["latency"]["median_ms"]
    assert res["speedup"] != pytest.approx(1.0)
    graphs = {c[-1].split("--graph=")[1].split()[0] for c in map(json.loads, (Path(env["FAKE_ADB_STATE"]) /
              "calls.jsonl").read_text().splitlines()) if "--graph=" in c[-1]}
    assert len(graphs) == 2
    # A hung benchmark: a one-line error after --timeout, what was measured before stays.
    env = install_fake_adb(tmp_path / "h", {"R5CT": {**PIXEL}}, bench_hang_s=30)
    r = _bench_cli([str(models["binary"]), "--device", "adb:R5CT", *common, "--timeout", "2",
                    "--out", str(tmp_path / "o2")], env, timeout=120)
    assert r.returncode == 1 and "Traceback" not in r.stderr and "timed out after 2 s" in r.stderr, r.stderr
    # A hung adb server.
    env = install_fake_adb(tmp_path / "d", {"R5CT": {**PIXEL}}, devices_hang_s=30)
    r = _bench_cli([str(models["binary"]), "--device", "adb:R5CT", *common, "--out", str(tmp_path / "o3")],
                   {**env, "BDMTOOL_ADB_DEVICES_TIMEOUT": "2"}, timeout=120)
    assert r.returncode == 1 and "Traceback" not in r.stderr and "did not answer within 2 s" in r.stderr, r.stderr
    # An empty ABI answer.
    noabi = {**PIXEL, "props": {**PIXEL["props"], "ro.product.cpu.abi": ""}}
    env = install_fake_adb(tmp_path / "e", {"R5CT": noabi})
    r = _bench_cli([str(models["binary"]), "--device", "adb:R5CT", *common, "--out", str(tmp_path / "o4")], env)
    assert r.returncode == 1 and "getprop ro.product.cpu.abi returned nothing" in r.stderr, r.stderr
    # The demo checks the phone before any work.
    r = subprocess.run([*bdmtool_cmd(), "demo", "--device", "adb:NOPE", "--benchmark-binary", str(binary),
                        "--out", str(tmp_path / "demo")], capture_output=True, text=True, timeout=120,
                       env={**os.environ, **install_fake_adb(tmp_path / "n", {"R5CT": {**PIXEL}})})
    assert r.returncode == 1 and "[adb:NOPE] not attached" in r.stderr, r.stderr
    assert not (tmp_path / "demo").exists()


def test_bench_options_are_validated():
    with pytest.raises(ValueError, match="runs must be >= 1"):
        BenchOptions(runs=0)


def test_a_file_that_is_not_a_model_is_a_one_line_error(tmp_path):
    bad = tmp_path / "notes.tflite"
    bad.write_text("not a model")
    r = subprocess.run([*bdmtool_cmd(), "bench", str(bad), "--out", str(tmp_path / "b")], capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert "is not a .tflite flatbuffer" in r.stderr
