"""EMA of the trained weights: the average itself, checkpoints, exact resume, held-out evaluation, merge/predict."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import train_args
from safetensors.torch import load_file

from finetune import train
from finetune.export import merge
from finetune.inference.predict import Predictor
from finetune.inference.predict import main as predict_main
from finetune.training.ema import EMA
from finetune.training.metrics import read_metrics

DECAY = 0.8


def test_average_after_k_updates_is_the_closed_form():
    model = torch.nn.Linear(3, 2)
    model.bias.requires_grad_(False)  # only trained parameters are averaged
    p0 = model.weight.detach().clone()
    ema = EMA(model, DECAY)
    assert list(ema.shadow) == ["weight"]
    sequence = [torch.full((2, 3), float(v)) for v in (1.0, -2.0, 4.0, 0.5)]
    for p in sequence:
        with torch.no_grad():
            model.weight.copy_(p)
        ema.update()
    k = len(sequence)
    expected = DECAY**k * p0 + (1 - DECAY) * sum(DECAY ** (k - i) * p for i, p in enumerate(sequence, start=1))
    torch.testing.assert_close(ema.shadow["weight"], expected, rtol=1e-6, atol=1e-7)
    with ema.applied():
        torch.testing.assert_close(model.weight, expected, rtol=1e-6, atol=1e-7)
    assert torch.equal(model.weight, sequence[-1])  # the trained weights come back


def _lora(out):
    return {k: v for k, v in load_file(str(out)).items()}


@pytest.fixture(scope="module")
def ema_run(policy_dir, dataset_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("ema") / "run"
    train.main(train_args(policy_dir, dataset_root, out, "--steps", "4", "--ema.decay", str(DECAY),
                          "--checkpoint.every", "1", "--checkpoint.keep-last", "4", "--eval-every", "2"))
    return out


def test_checkpoints_hold_the_average_of_the_trained_adapters(ema_run):
    ckpts = ema_run / "checkpoints"
    assert {p.name for p in (ckpts / "000004" / "ema").iterdir()} >= {"adapter_model.safetensors",
                                                                      "adapter_config.json"}
    shadows = {s: load_file(str(ckpts / f"{s:06d}" / "ema_state.safetensors")) for s in (1, 2, 3, 4)}
    adapters = {s: _lora(ckpts / f"{s:06d}" / "adapter_model.safetensors") for s in (1, 2, 3, 4)}
    ema_adapter = _lora(ckpts / "000004" / "ema" / "adapter_model.safetensors")
    assert ema_adapter.keys() == adapters[4].keys()
    for key, trained in adapters[4].items():
        name = next(n for n in shadows[4] if n.endswith(key.split("base_model.model.", 1)[1].replace(
            ".weight", ".default.weight")))
        for s in (2, 3, 4):  # shadow_s = d * shadow_(s-1) + (1 - d) * weights_s, per optimizer update
            expected = DECAY * shadows[s - 1][name] + (1 - DECAY) * adapters[s][key]
            torch.testing.assert_close(shadows[s][name], expected, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(ema_adapter[key], shadows[4][name])  # ema/ is the shadow as an adapter
        assert not torch.equal(ema_adapter[key], trained) or not trained.abs().sum()


def test_resume_with_ema_is_exact(ema_run, policy_dir, dataset_root, tmp_path):
    out = tmp_path / "resumed"
    args = ["--ema.decay", str(DECAY), "--checkpoint.every", "1", "--checkpoint.keep-last", "4", "--eval-every", "2"]
    train.main(train_args(policy_dir, dataset_root, out, "--steps", "2", *args))
    train.main(train_args(policy_dir, dataset_root, out, "--steps", "4", "--resume", *args))
    a = load_file(str(ema_run / "checkpoints/000004/ema_state.safetensors"))
    b = load_file(str(out / "checkpoints/000004/ema_state.safetensors"))
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-7)
    evals = {m["step"]: m["eval/action_mse"] for m in read_metrics(ema_run / "metrics.jsonl") if "eval/action_mse" in m}
    resumed = {m["step"]: m["eval/action_mse"] for m in read_metrics(out / "metrics.jsonl") if "eval/action_mse" in m}
    assert resumed[4] == pytest.approx(evals[4], rel=1e-5)


def test_held_out_mse_uses_the_average(ema_run, policy_dir, dataset_root, tmp_path):
    out = tmp_path / "no_ema_eval"
    train.main(train_args(policy_dir, dataset_root, out, "--steps", "4", "--ema.decay", str(DECAY),
                          "--ema.no-use-for-eval", "--eval-every", "2"))
    rows = {str(p): read_metrics(p / "metrics.jsonl") for p in (ema_run, out)}
    loss = {k: [m["train/loss"] for m in v if "train/loss" in m] for k, v in rows.items()}
    assert loss[str(ema_run)] == pytest.approx(loss[str(out)], rel=1e-6)  # the average never feeds training
    mse = {k: {m["step"]: m["eval/action_mse"] for m in v if "eval/action_mse" in m} for k, v in rows.items()}
    assert mse[str(ema_run)][0] == pytest.approx(mse[str(out)][0], rel=1e-6)  # step 0: average = weights
    assert mse[str(ema_run)][4] != pytest.approx(mse[str(out)][4], rel=1e-4)


def test_predict_and_merge_use_the_average_by_default(ema_run, dataset_root, tmp_path):
    from finetune.data import LeRobotDataset

    ckpt = ema_run / "checkpoints/last"
    sample = LeRobotDataset(dataset_root, 10)[5]
    by_default = Predictor.from_checkpoint(ckpt, device="cpu")(sample, torch.Generator().manual_seed(0))
    averaged = Predictor.from_checkpoint(ckpt, device="cpu", use_ema=True)(sample, torch.Generator().manual_seed(0))
    trained = Predictor.from_checkpoint(ckpt, device="cpu", use_ema=False)(sample, torch.Generator().manual_seed(0))
    assert (by_default == averaged).all() and not (by_default == trained).all()
    out = merge.merge_checkpoint(ckpt, tmp_path / "merged")
    assert json.loads((out / "merge_info.json").read_text())["ema_weights"] is True
    merged = Predictor.from_checkpoint(out, device="cpu")(sample, torch.Generator().manual_seed(0))
    torch.testing.assert_close(torch.from_numpy(merged), torch.from_numpy(averaged), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("decay", ["1.0", "-0.1"])
def test_bad_decay_is_a_one_line_error(policy_dir, dataset_root, tmp_path, capsys, decay):
    with pytest.raises(SystemExit) as exit_info:
        train.main(train_args(policy_dir, dataset_root, tmp_path / "out", "--ema.decay", decay))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err == f"error: --ema.decay must be in [0, 1) (0 turns the EMA off), got {float(decay)}"


def test_asking_for_missing_ema_weights_is_a_one_line_error(lora_run, dataset_root, capsys):
    with pytest.raises(SystemExit) as exit_info:
        predict_main(["--checkpoint", str(lora_run / "checkpoints/last"), "--dataset-root", str(dataset_root),
                      "--use-ema", "True"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "has no EMA weights" in err


def test_merging_missing_ema_weights_is_a_one_line_error(lora_run, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        merge.main(["--checkpoint", str(lora_run / "checkpoints/last"), "--output-dir", str(tmp_path / "m"),
                    "--use-ema", "True"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "has no EMA weights" in err
    assert not (tmp_path / "m").exists()
