"""The LeRobot side of exports and adapters, without LeRobot installed: what finetune-merge and training checkpoints
write for LeRobot's loaders (names, processor files, vlm/), and a LeRobot PEFT run's output read here.

The run in tests/fixtures/lerobot_peft_run was written by LeRobot 0.6.1 itself (tests/lerobot_side.py peft-run, see
docs/lerobot.md) on the tiny SmolVLA of conftest.py; its paths are placeholders (@BASE@, @VLM@, @RUN@) filled in here.
The check that runs LeRobot is tests/test_lerobot_roundtrip.py (-m slow).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from helpers import set_up_run, train_args
from peft import PeftModel, get_peft_model_state_dict
from safetensors.torch import load_file
from transformers import AutoConfig, AutoTokenizer

from finetune import train
from finetune.config import read_train_config
from finetune.demo import train_tokenizer
from finetune.export import lerobot_vlm, merge
from finetune.inference.loading import resolve_base
from finetune.inference.predict import Predictor
from finetune.policies import PI0Config, PI05Config, SmolVLAConfig, load_policy, load_policy_config, make_policy
from finetune.policies.lerobot_processor import lerobot_tokenizer_name, read_tokenizer_name, write_processor_files
from finetune.policies.processor import PolicyProcessor, load_stats
from finetune.policies.smolvla import SMOLVLM2_500M

FIXTURE = Path(__file__).parent / "fixtures" / "lerobot_peft_run"
PALIGEMMA = "google/paligemma-3b-pt-224"


def frame_and_noise(config, seed: int = 0) -> tuple[dict, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    frame = {key: torch.rand(3, *config.input_features[key]["shape"][1:], generator=g) for key in config.image_features}
    frame["observation.state"] = torch.randn(config.state_dim, generator=g)
    frame["task"] = "move to the red ball"
    return frame, torch.randn(1, config.chunk_size, config.max_action_dim, generator=g)


def actions(predictor: Predictor, frame: dict, noise: torch.Tensor) -> torch.Tensor:
    batch = predictor.batch([frame])
    with torch.no_grad():
        normalized = predictor.policy.predict_action_chunk(batch, noise=noise)
    return predictor.processor.unnormalize_actions(normalized.float(), None)


@pytest.fixture
def lerobot_run(tmp_path, policy_dir) -> Path:
    """LeRobot's checkpoints/000001/pretrained_model/, pointing at the conftest tiny SmolVLA."""
    run = tmp_path / "lerobot_run"
    shutil.copytree(FIXTURE, run)
    folder = run / "checkpoints" / "000001" / "pretrained_model"
    vlm = json.loads((policy_dir / "config.json").read_text())["vlm_model_name"]
    for path in folder.glob("*.json"):
        text = path.read_text().replace("@VLM@", vlm).replace("@BASE@", str(policy_dir)).replace("@RUN@", str(run))
        path.write_text(text)
    return folder


# --- names LeRobot resolves -------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("config", "expected"), [
    (SmolVLAConfig(), SMOLVLM2_500M), (PI0Config(), PALIGEMMA), (PI05Config(), PALIGEMMA)])
def test_hub_backbones_are_named_as_lerobot_names_them(config, expected, tmp_path):
    """SmolVLA's processor loads its VLM's Hub id, pi0/pi0.5 the PaliGemma tokenizer: no vlm/ folder, whatever
    tokenizer lies beside the base."""
    with torch.device("meta"):  # the real sizes, without memory
        policy = make_policy(config)
    config.save(tmp_path)
    name = merge.write_lerobot_names(tmp_path, policy, train_tokenizer(tmp_path / "tok"), base_dir=None)
    assert name == expected and not (tmp_path / "vlm").exists()
    assert "use_peft" not in json.loads((tmp_path / "config.json").read_text())
    write_processor_files(tmp_path, config, {}, tokenizer_name=name)
    assert read_tokenizer_name(tmp_path) == expected


def test_pi_tokenizer_name_follows_the_base_processor_files(tmp_path):
    """A pi0 trained from a folder whose processor names a tokenizer keeps that tokenizer; a relative name (older
    exports wrote "tokenizer") is made absolute against the base folder, which LeRobot cannot do itself."""
    config = PI0Config()
    assert lerobot_tokenizer_name(config, None) == PALIGEMMA
    write_processor_files(tmp_path, config, {}, tokenizer_name="org/tokenizer")
    assert lerobot_tokenizer_name(config, tmp_path) == "org/tokenizer"  # no such folder there: a Hub id, kept
    write_processor_files(tmp_path, config, {}, tokenizer_name="tokenizer")
    (tmp_path / "tokenizer").mkdir()
    assert lerobot_tokenizer_name(config, tmp_path) == str((tmp_path / "tokenizer").resolve())
    write_processor_files(tmp_path, config, {}, tokenizer_name="/models/my_tokenizer")
    assert lerobot_tokenizer_name(config, tmp_path) == "/models/my_tokenizer"


def test_pi05_config_leaves_out_fields_lerobot_0_6_does_not_know(tmp_path):
    config = PI05Config()
    config.save(tmp_path)
    written = json.loads((tmp_path / "config.json").read_text())
    assert not set(PI05Config.newer_than_lerobot_0_6) & set(written)
    assert load_policy_config(tmp_path).memory_frames == 6  # the default comes back
    config.memory_frames = 3  # a value that matters is kept
    assert config.to_dict()["memory_frames"] == 3


# --- a merged export of a custom (tiny) backbone ----------------------------------------------------------------------

def test_custom_backbone_travels_in_vlm_folder(lora_run, policy_dir, tmp_path):
    out = merge.merge_checkpoint(lora_run / "checkpoints" / "last", tmp_path / "merged")
    vlm = (out / "vlm").resolve()
    assert json.loads((out / "config.json").read_text())["vlm_model_name"] == str(vlm)
    assert read_tokenizer_name(out) == str(vlm)
    config = AutoConfig.from_pretrained(vlm)  # what LeRobot's SmolVLA builds its VLM from
    base_vlm = json.loads((policy_dir / "vlm_config.json").read_text())
    assert config.model_type == "smolvlm"
    assert config.text_config.hidden_size == base_vlm["text_config"]["hidden_size"]
    assert config.vision_config.image_size == base_vlm["vision_config"]["image_size"]
    image_processor = json.loads((vlm / "preprocessor_config.json").read_text())
    assert image_processor["image_processor_type"] == "SmolVLMImageProcessor"
    assert json.loads((vlm / "processor_config.json").read_text())["processor_class"] == "SmolVLMProcessor"
    special = json.loads((vlm / "tokenizer_config.json").read_text())["extra_special_tokens"]
    assert special["fake_image_token"] == "<fake_token_around_image>"  # LeRobot reads fake/global image token ids
    assert special["global_image_token"] == "<global-img>"
    text = "move to the red ball\n"
    assert AutoTokenizer.from_pretrained(vlm)(text)["input_ids"] == \
        AutoTokenizer.from_pretrained(policy_dir)(text)["input_ids"]


def test_moved_export_is_relinked(lora_run, tmp_path, capsys):
    out = merge.merge_checkpoint(lora_run / "checkpoints" / "last", tmp_path / "merged")
    moved = Path(shutil.move(str(out), str(tmp_path / "elsewhere" / "policy")))
    lerobot_vlm.main([str(moved)])
    assert json.loads((moved / "config.json").read_text())["vlm_model_name"] == str((moved / "vlm").resolve())
    assert read_tokenizer_name(moved) == str((moved / "vlm").resolve())
    lerobot_vlm.main([str(moved), "--name", "me/policy-vlm"])
    assert read_tokenizer_name(moved) == "me/policy-vlm"
    with pytest.raises(SystemExit, match="has no vlm/ folder"):
        lerobot_vlm.main([str(lora_run)])


# --- our adapter checkpoints, as LeRobot's PEFT loading reads them ----------------------------------------------------

def test_adapter_checkpoint_names_its_base_and_carries_processor_files(lora_run, policy_dir):
    ckpt = (lora_run / "checkpoints" / "last").resolve()
    adapter_config = json.loads((ckpt / "adapter_config.json").read_text())
    assert adapter_config["base_model_name_or_path"] == str(policy_dir.resolve())
    assert json.loads((ckpt / "config.json").read_text())["use_peft"] is True
    stats = load_stats(ckpt)
    from finetune.policies.lerobot_processor import read_processor_stats

    lerobot_stats = read_processor_stats(ckpt)
    for key in ("observation.state", "action"):
        for stat in ("mean", "std"):
            torch.testing.assert_close(lerobot_stats[key][stat], stats[key][stat])
    assert read_tokenizer_name(ckpt) == "finetune/tiny-smolvlm"  # SmolVLA: LeRobot's rule, its vlm_model_name


# --- a LeRobot PEFT run's output, used here ---------------------------------------------------------------------------

def test_lerobot_peft_run_predicts_here(lerobot_run, policy_dir, lora_run):
    assert read_train_config(lerobot_run) is None  # LeRobot's own train_config.json is not taken for ours
    assert resolve_base(lerobot_run, None) == policy_dir  # from adapter_config.json's base_model_name_or_path
    predictor = Predictor.from_checkpoint(lerobot_run)
    ours_stats = load_stats(lora_run / "checkpoints" / "last")  # the same dataset: the same stats
    for key in ("observation.state", "action"):
        for stat in ("mean", "std"):
            torch.testing.assert_close(predictor.processor.normalizer.stats[key][stat], ours_stats[key][stat])

    frame, noise = frame_and_noise(predictor.config)
    got = actions(predictor, frame, noise)
    # the same thing by hand: PEFT's adapter on the base, the stats from LeRobot's normalizer file
    base = load_policy(policy_dir)
    by_hand = PeftModel.from_pretrained(base, str(lerobot_run)).merge_and_unload().eval()
    flat = load_file(str(lerobot_run / "policy_preprocessor_step_5_normalizer_processor.safetensors"))
    stats = {k: {s: flat[f"{k}.{s}"] for s in ("mean", "std")} for k in ("observation.state", "action")}
    reference = Predictor(by_hand, PolicyProcessor(by_hand.config, AutoTokenizer.from_pretrained(policy_dir), stats))
    torch.testing.assert_close(got, actions(reference, frame, noise), rtol=0, atol=1e-6)
    base_only = actions(Predictor.from_checkpoint(lerobot_run, use_trained_weights=False), frame, noise)
    assert (got - base_only).abs().max() > 1e-3  # the adapter was applied

    out = merge.merge_checkpoint(lerobot_run, lerobot_run.parent / "merged")
    torch.testing.assert_close(actions(Predictor.from_checkpoint(out), frame, noise), got, rtol=0, atol=1e-5)
    assert "use_peft" not in json.loads((out / "config.json").read_text())
    assert json.loads((out / "train_config.json").read_text())["peft"]["r"] == 4  # LeRobot's, kept as it is


def test_lerobot_peft_run_starts_a_new_run(lerobot_run, policy_dir, dataset_root, tmp_path):
    run = set_up_run(train_args(policy_dir, dataset_root, tmp_path / "run", "--peft.init-from", str(lerobot_run)))
    trained = get_peft_model_state_dict(run.model)
    saved = load_file(str(lerobot_run / "adapter_model.safetensors"))
    assert set(trained) == set(saved) and len(saved) == 26
    for key, tensor in saved.items():
        torch.testing.assert_close(trained[key].float(), tensor.float())
    lora = [p for name, p in run.model.named_parameters() if "lora_" in name]
    assert len(lora) == 26 and all(p.requires_grad for p in lora)  # trained on, not frozen


def test_init_from_a_folder_without_adapter_is_one_clear_error(policy_dir, dataset_root, tmp_path, capsys):
    with pytest.raises(SystemExit):
        train.main(train_args(policy_dir, dataset_root, tmp_path / "run", "--peft.init-from", str(policy_dir)))
    err = capsys.readouterr().err
    assert "--peft.init-from" in err and "holds no adapter" in err and "pretrained_model" in err


def test_lerobot_peft_run_is_evaluated_here(lerobot_run, dataset_root, tmp_path):
    from finetune import eval as finetune_eval

    args = ["--dataset-root", str(dataset_root), "--rollout-episodes", "0", "--max-frames", "4"]
    results = finetune_eval.main(["--checkpoint", str(lerobot_run), *args, "--output-dir", str(tmp_path / "a")])
    merged = merge.merge_checkpoint(lerobot_run, tmp_path / "merged")
    same = finetune_eval.main(["--checkpoint", str(merged), *args, "--output-dir", str(tmp_path / "b")])
    assert results["offline"]["frames"] == 4
    assert results["offline"]["action_mse"] == pytest.approx(same["offline"]["action_mse"], rel=1e-5)
