"""The built-in demo end to end, as the README's first command runs it (minus the launcher)."""

from __future__ import annotations

import json

import pytest

from finetune import demo


@pytest.mark.slow
def test_demo_fine_tune_halves_the_error_and_lifts_closed_loop_success(tmp_path):
    """Datasets, base pretraining, LoRA onto the inverted robot, rollouts: 6-8 minutes on 2 CPU cores."""
    out = tmp_path / "demo"
    summary = demo.main(["--train.output-dir", str(out), "--assets-dir", str(tmp_path / "assets")])

    assert summary["eval_mse_after"] <= 0.5 * summary["eval_mse_before"], summary
    assert summary["success_before"] <= 0.1 and summary["success_after"] >= summary["success_before"] + 0.3, summary
    saved = json.loads((out / "eval" / "closed_loop.json").read_text())
    assert saved["after"]["episodes"] == 50 and saved["after"]["success_rate"] == summary["success_after"]
    for name in ("rollout_before.gif", "rollout_after.gif", "metrics.png"):
        assert (out / "eval" / name).stat().st_size > 1000, name
    adapter = (out / "checkpoints" / "last" / "adapter_model.safetensors").stat().st_size
    assert adapter < 0.05 * (tmp_path / "assets" / "base_policy" / "model.safetensors").stat().st_size
