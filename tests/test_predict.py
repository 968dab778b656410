"""Predictor: base + adapter or a merged folder, observations in, action chunks out in the dataset's units."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import module_imports

from finetune.data import LeRobotDataset
from finetune.export import merge
from finetune.inference import predict
from finetune.inference.predict import ObservationError, Predictor
from finetune.policies import POLICIES


@pytest.fixture(scope="module")
def checkpoint(lora_run):
    return lora_run / "checkpoints" / "last"


@pytest.fixture(scope="module")
def predictor(checkpoint):
    return Predictor.from_checkpoint(checkpoint, device="cpu")


@pytest.fixture(scope="module")
def frames(dataset_root, checkpoint):
    dataset = LeRobotDataset(dataset_root, 10, episodes=[9])
    return [dataset[i] for i in (0, 7, 15)]  # the last frame's chunk is mostly padding


def observation(sample):
    return {k: sample[k] for k in ("observation.images.top", "observation.state", "task")}


def test_predictions_come_back_in_dataset_units(predictor, frames, monkeypatch):
    # The policy is made to answer with the frame's own normalized target: the predictor must return the recorded
    # actions, i.e. it undoes the normalization the policy's outputs are in.
    batch = predictor.processor([dict(f) for f in frames])
    normalized_target = batch["action"]
    assert not torch.allclose(normalized_target, torch.stack([f["action"] for f in frames]), atol=1e-2)
    seen = {}

    def answer_with_target(batch, noise=None):
        seen["state"] = batch["observation.state"]
        return normalized_target

    monkeypatch.setattr(predictor.policy, "predict_action_chunk", answer_with_target)
    actions = predictor.predict_batch([observation(f) for f in frames])
    assert actions.shape == (3, 10, 2) and actions.dtype == np.float32
    np.testing.assert_allclose(actions, torch.stack([f["action"] for f in frames]).numpy(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(seen["state"], batch["observation.state"])  # the policy saw normalized state
    np.testing.assert_allclose(predictor(observation(frames[0])), frames[0]["action"].numpy(), rtol=1e-5, atol=1e-6)


def test_adapter_and_merged_folder_predict_the_same(predictor, checkpoint, frames, tmp_path):
    merged = Predictor.from_checkpoint(merge.merge_checkpoint(checkpoint, tmp_path / "merged"), device="cpu")
    obs = [observation(f) for f in frames]
    a = predictor.predict_batch(obs, torch.Generator().manual_seed(3))
    b = merged.predict_batch(obs, torch.Generator().manual_seed(3))
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
    assert merged.chunk_size == 10 and merged.cameras == ["observation.images.top"]
    # a LeRobot folder keeps its stats only in its processor files: they are read from there
    (tmp_path / "merged" / "normalization_stats.safetensors").unlink()
    lerobot_style = Predictor.from_checkpoint(tmp_path / "merged", device="cpu")
    np.testing.assert_allclose(lerobot_style.predict_batch(obs, torch.Generator().manual_seed(3)), b, rtol=1e-5,
                               atol=1e-6)
    # a camera frame as a robot gives it (uint8, channels last) is the same input as the dataset's float CHW tensor
    raw = dict(obs[0], **{"observation.images.top": (obs[0]["observation.images.top"] * 255).round().byte()
                          .permute(1, 2, 0).numpy()})
    np.testing.assert_allclose(predictor(raw, torch.Generator().manual_seed(0)),
                               predictor(obs[0], torch.Generator().manual_seed(0)), rtol=1e-4, atol=1e-5)


def test_bad_observations_get_clear_errors(predictor, frames):
    good = observation(frames[0])
    with pytest.raises(ObservationError, match=r"no camera \['observation.images.top'\]"):
        predictor({k: v for k, v in good.items() if k != "observation.images.top"})
    with pytest.raises(ObservationError, match="has 3 values, the policy was trained on 2"):
        predictor(dict(good, **{"observation.state": [0.1, 0.2, 0.3]}))
    with pytest.raises(ObservationError, match="needs 'task'"):
        predictor({k: v for k, v in good.items() if k != "task"})
    with pytest.raises(ObservationError, match="3 color channels"):
        predictor(dict(good, **{"observation.images.top": np.zeros((64, 64, 4), np.uint8)}))


def test_checkpoint_without_stats_is_refused(checkpoint, tmp_path):
    broken = tmp_path / "no_stats"
    # checkpoints hold the stats twice: finetune's file and LeRobot's processor files
    shutil.copytree(checkpoint, broken, ignore=shutil.ignore_patterns("training_state", "normalization_stats*",
                                                                      "policy_*processor*"))
    with pytest.raises(FileNotFoundError, match="no normalization stats"):
        Predictor.from_checkpoint(broken, device="cpu")


@pytest.mark.skipif("pi0" not in POLICIES, reason="needs a second policy type")
def test_adapter_from_another_policy_is_refused(checkpoint, dataset_root, tmp_path):
    from helpers import make_tiny_pi_policy

    from finetune.data import load_dataset_meta

    pi0 = make_tiny_pi_policy(tmp_path / "pi0", load_dataset_meta(dataset_root), "pi0")
    with pytest.raises(merge.MergeError, match="trained on a 'smolvla' policy but the base .* is a 'pi0' policy"):
        Predictor.from_checkpoint(checkpoint, base=str(pi0), device="cpu")


def test_cli_predicts_on_dataset_frames(checkpoint, dataset_root, tmp_path, capsys):
    out = tmp_path / "pred.json"
    result = predict.main(["--checkpoint", str(checkpoint), "--dataset-root", str(dataset_root), "--episode", "8",
                           "--frames", "0", "5", "--output", str(out)])
    assert result["predicted"].shape == (2, 10, 2)
    saved = json.loads(out.read_text())
    assert np.asarray(saved["predicted"]).shape == (2, 10, 2) and saved["episode"] == 8
    assert "episode 8 frame 5: first action" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        predict.main(["--checkpoint", str(checkpoint), "--dataset-root", str(dataset_root), "--frames", "99"])
    assert "episode 9 has frames 0..15" in capsys.readouterr().err


def test_predict_loads_no_export_or_training_loop_code():
    graph = module_imports()
    loaded, todo = set(), ["finetune.inference.predict"]  # what `import finetune.inference.predict` loads, closed
    while todo:
        module = todo.pop()
        if module not in loaded:
            loaded.add(module)
            todo += graph[module]
    assert "finetune.inference.loading" in loaded and "finetune.policies.processor" in loaded
    assert not {m for m in loaded if m.startswith("finetune.export.")}  # no merge, publishing, model cards
    assert not loaded & {"finetune.train", "finetune.training.checkpoint", "finetune.training.distributed"}


def test_one_quantize_and_attach_path():
    # One quantize-and-attach path: only finetune.adapters (and quant itself) call the quantizer.
    root = Path(__file__).resolve().parent.parent
    callers = {".".join(p.relative_to(root).with_suffix("").parts) for p in (root / "finetune").rglob("*.py")
               if re.search(r"\bquantize_policy\(", p.read_text())}
    assert callers == {"finetune.adapters", "finetune.quant"}
