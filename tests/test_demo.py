"""The demo runs end to end on the embedded model with a minimal budget, and re-running reuses its stages."""

import json

from bdmtool.tools.demo import EMBEDDED_FP, run_demo


def test_embedded_checkpoint_is_small_and_loads():
    from bdmtool.trainer.train import load_model

    assert EMBEDDED_FP.stat().st_size <= 10 * 2**20
    model, spec, ckpt = load_model(EMBEDDED_FP)
    assert spec.unet.ch == 32 and spec.data.source == "mnist5k" and ckpt["optimizer"] is None


def test_demo_minimal_budget_then_reuse(tmp_path):
    logs = []
    result = run_demo(tmp_path, n_samples=4, steps=3, qat_steps=2, qat_batch=4, log=logs.append)
    assert set(result.summaries) == {"fp_samples", "qat_binarydm_w1a4", "qat_bidm_w1a1"}
    report = (tmp_path / "report.md").read_text()
    for name, summary in result.summaries.items():
        assert (tmp_path / summary["grid"]).stat().st_size > 100
        done = json.loads((tmp_path / name / "done.json").read_text())
        assert done["summary"] == summary
        assert summary["grid"] in report
        if "final_loss" in summary:
            assert f"{summary['final_loss']:.4f}" in report and (tmp_path / summary["loss_png"]).exists()
    logs.clear()
    run_demo(tmp_path, n_samples=4, steps=3, qat_steps=2, qat_batch=4, log=logs.append)
    assert sum("already done" in line for line in logs) == 3
