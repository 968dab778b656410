"""Round trip with LeRobot 0.6.1 itself (-m slow; needs .lerobot-venv from tools/lerobot_env.sh, or LEROBOT_PYTHON).

For tiny SmolVLA, pi0 and pi0.5: a merged export loads in LeRobot (its policy class from_pretrained, its
make_pre_post_processors) from another working directory, offline, and gives our actions with the same frame and noise;
our adapter loads with LeRobot's PEFT loading and LeRobot's PEFT run loads here, both giving the same actions on both
sides; a LeRobot full fine-tune predicts the same here. LeRobot runs in a subprocess (tests/lerobot_side.py); pi0/pi0.5
use its --tiny-pi sizes (LeRobot builds them only at full size; see that file). Results: docs/lerobot.md.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import make_tiny_pi_policy, policy_train_args
from safetensors.torch import load_file, save_file

from finetune import train
from finetune.data import load_dataset_meta
from finetune.demo import make_initial_policy
from finetune.export import merge
from finetune.inference.predict import Predictor

ROOT = Path(__file__).resolve().parent.parent
LEROBOT_PYTHON = Path(os.environ.get("LEROBOT_PYTHON", ROOT / ".lerobot-venv" / "bin" / "python"))
SIDE = Path(__file__).resolve().parent / "lerobot_side.py"
TOLERANCE = 1e-5  # float32, same noise

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not LEROBOT_PYTHON.is_file(),
                       reason=f"no LeRobot environment at {LEROBOT_PYTHON}: run tools/lerobot_env.sh (or set "
                              "LEROBOT_PYTHON to a python with LeRobot 0.6.1)"),
]


def lerobot(command: str, *args: str | Path, cwd: Path, tiny_pi: Path | None = None, dataset: Path | None = None
            ) -> dict:
    """tests/lerobot_side.py in LeRobot's environment, offline, from `cwd` (never the policy folder)."""
    extra = ["--tiny-pi", str(tiny_pi)] if tiny_pi is not None else []
    extra += ["--dataset", str(dataset)] if dataset is not None else []
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": ""}
    done = subprocess.run([str(LEROBOT_PYTHON), str(SIDE), command, *map(str, args), *extra], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def observation(config, path: Path, seed: int = 0) -> tuple[dict, torch.Tensor]:
    """One frame and the sampling noise, also written for LeRobot (safetensors, the task in its metadata)."""
    g = torch.Generator().manual_seed(seed)
    frame = {key: torch.rand(3, *config.input_features[key]["shape"][1:], generator=g) for key in config.image_features}
    frame["observation.state"] = torch.randn(config.state_dim, generator=g)
    noise = torch.randn(1, config.chunk_size, config.max_action_dim, generator=g)
    task = "move to the red ball"
    save_file({**frame, "noise": noise}, str(path), metadata={"task": task})
    return {**frame, "task": task}, noise


def our_actions(folder: Path, frame: dict, noise: torch.Tensor) -> torch.Tensor:
    predictor = Predictor.from_checkpoint(folder, device="cpu")
    batch = predictor.batch([frame])
    with torch.no_grad():
        normalized = predictor.policy.predict_action_chunk(batch, noise=noise)
    return predictor.processor.unnormalize_actions(normalized.float(), None)


def their_actions(folder: Path, obs: Path, out: Path, cwd: Path, tiny_pi: Path | None, peft: bool = False,
                  dataset: Path | None = None) -> tuple[torch.Tensor, dict]:
    info = lerobot("predict", folder, obs, out, *(["--peft"] if peft else []), cwd=cwd, tiny_pi=tiny_pi,
                   dataset=dataset)
    assert Path(info["cwd"]).resolve() == cwd.resolve()
    return load_file(str(out))["action"], info


def report(policy_type: str, check: str, diff: float) -> None:
    line = f"lerobot round trip | {policy_type:7s} | {check:58s} | max |diff| {diff:.2e}"
    print(line)
    with open(ROOT / "runs" / "lerobot_roundtrip.txt", "a") as f:  # runs/ is gitignored; docs/lerobot.md quotes it
        f.write(line + "\n")


@pytest.mark.parametrize("policy_type", ["smolvla", "pi0", "pi05"])
def test_lerobot_round_trip(policy_type, dataset_root, tmp_path):
    (ROOT / "runs").mkdir(exist_ok=True)
    elsewhere = tmp_path / "elsewhere"  # LeRobot's working directory: not the export, not the repository
    elsewhere.mkdir()
    meta = load_dataset_meta(dataset_root)
    base = tmp_path / "base"
    if policy_type == "smolvla":
        make_initial_policy(base, meta, seed=0)
    else:  # the only variant names LeRobot's config accepts; vlm_config.json holds the tiny sizes
        make_tiny_pi_policy(base, meta, policy_type, seed=0, variants=("gemma_2b", "gemma_300m"))
    train.main(policy_train_args(policy_type, base, dataset_root, tmp_path / "run1", "--steps", "2"))
    export = merge.merge_checkpoint(tmp_path / "run1" / "checkpoints" / "last", tmp_path / "export")
    tiny_pi = export / "vlm_config.json" if policy_type != "smolvla" else None
    frame, noise = observation(Predictor.from_checkpoint(export).config, tmp_path / "obs.safetensors")
    obs = tmp_path / "obs.safetensors"

    # 0. the processor files are the ones LeRobot builds itself for this config and these stats (SmolVLA only: for
    # pi0/pi0.5 LeRobot's factory needs the PaliGemma tokenizer from the Hub)
    if policy_type == "smolvla":
        lerobot("fresh-processors", export, tmp_path / "fresh", cwd=elsewhere)
        for name in ("policy_preprocessor", "policy_postprocessor"):
            ours_json = json.loads((export / f"{name}.json").read_text())
            assert ours_json == json.loads((tmp_path / "fresh" / f"{name}.json").read_text())
            for step in ours_json["steps"]:
                if "state_file" in step:
                    theirs_state = load_file(str(tmp_path / "fresh" / step["state_file"]))
                    ours_state = load_file(str(export / step["state_file"]))
                    assert set(ours_state) == set(theirs_state)
                    assert all(torch.equal(ours_state[k], theirs_state[k]) for k in ours_state)
        report(policy_type, "processor files: ours vs LeRobot's own, built fresh", 0.0)

    # 1. the merged export in LeRobot: policy class + processors, from another directory, offline
    ours = our_actions(export, frame, noise)
    theirs, info = their_actions(export, obs, tmp_path / "a1.safetensors", elsewhere, tiny_pi, dataset=dataset_root)
    assert info["tokenizer_name"] == str((export / "vlm").resolve()) and info["loaded_by"] == "make_policy"
    config = Predictor.from_checkpoint(export).config
    assert theirs.shape == ours.shape == (1, config.chunk_size, meta.features["action"]["shape"][0])
    diff = (theirs - ours).abs().max().item()
    report(policy_type, "merged export: LeRobot vs finetune", diff)
    assert diff < TOLERANCE

    # 2. our adapter (trained on the export) with LeRobot's PEFT loading
    train.main(policy_train_args(policy_type, export, dataset_root, tmp_path / "run2", "--steps", "2",
                                 "--optim.lr", "1e-2"))
    ours_adapter = tmp_path / "run2" / "checkpoints" / "last"
    ours2 = our_actions(ours_adapter, frame, noise)
    theirs2, info2 = their_actions(ours_adapter.resolve(), obs, tmp_path / "a2.safetensors", elsewhere, tiny_pi,
                                   peft=True, dataset=dataset_root)  # make_policy: PEFT path from use_peft
    assert info2["base"] == str(export.resolve()) and info2["loaded_by"] == "make_policy"
    diff = (theirs2 - ours2).abs().max().item()
    report(policy_type, "our adapter: LeRobot PEFT loading vs finetune", diff)
    assert diff < TOLERANCE and (ours2 - ours).abs().max() > 1e-4  # the adapter changes the actions

    # 3. LeRobot's PEFT run (its wrap_with_peft + save_checkpoint) used here: predict, merge
    lerobot("peft-run", export, tmp_path / "lerobot_peft" / "checkpoints" / "000001", cwd=elsewhere, tiny_pi=tiny_pi)
    theirs_adapter = tmp_path / "lerobot_peft" / "checkpoints" / "000001" / "pretrained_model"
    theirs3, _ = their_actions(theirs_adapter, obs, tmp_path / "a3.safetensors", elsewhere, tiny_pi, peft=True)
    ours3 = our_actions(theirs_adapter, frame, noise)
    diff = (theirs3 - ours3).abs().max().item()
    report(policy_type, "LeRobot PEFT run: finetune-predict vs LeRobot", diff)
    assert diff < TOLERANCE and (ours3 - ours).abs().max() > 1e-4
    merged = merge.merge_checkpoint(theirs_adapter, tmp_path / "merged_from_lerobot")
    theirs4, _ = their_actions(merged, obs, tmp_path / "a4.safetensors", elsewhere, tiny_pi)
    diff = max((our_actions(merged, frame, noise) - theirs3).abs().max().item(), (theirs4 - theirs3).abs().max().item())
    report(policy_type, "LeRobot PEFT run merged here: both sides vs LeRobot PEFT", diff)
    assert diff < TOLERANCE
    train.main(policy_train_args(policy_type, export, dataset_root, tmp_path / "run3", "--steps", "1",
                                 "--peft.init-from", str(theirs_adapter)))  # LeRobot's adapter trained on here
    continued = json.loads((tmp_path / "run3" / "checkpoints" / "last" / "adapter_config.json").read_text())
    assert continued["target_modules"] == json.loads((theirs_adapter / "adapter_config.json").read_text())[
        "target_modules"]

    # 4. a LeRobot full fine-tune used here as a policy
    lerobot("full-run", export, tmp_path / "lerobot_full" / "checkpoints" / "000001", cwd=elsewhere, tiny_pi=tiny_pi)
    full = tmp_path / "lerobot_full" / "checkpoints" / "000001" / "pretrained_model"
    if tiny_pi is not None:  # tiny sizes exist only through --tiny-pi; a real LeRobot pi0 is gemma_2b + gemma_300m
        (full / "vlm_config.json").write_text(tiny_pi.read_text())
    theirs5, _ = their_actions(full, obs, tmp_path / "a5.safetensors", elsewhere, tiny_pi)
    ours5 = our_actions(full, frame, noise)
    diff = (theirs5 - ours5).abs().max().item()
    report(policy_type, "LeRobot full fine-tune: finetune-predict vs LeRobot", diff)
    assert diff < TOLERANCE and (ours5 - ours).abs().max() > 1e-4
    summary = train.main(policy_train_args(policy_type, full, dataset_root, tmp_path / "run4", "--steps", "1"))
    adapter_base = json.loads((Path(summary["checkpoint"]) / "adapter_config.json").read_text())
    assert adapter_base["base_model_name_or_path"] == str(full.resolve())  # a LeRobot full fine-tune as the base


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-m", "slow", "-s", "-q"]))
