"""Runs inside .lerobot-venv (LeRobot 0.6.1 itself, see tools/lerobot_env.sh); never imports finetune.

    python tests/lerobot_side.py predict POLICY_DIR OBSERVATION OUT [--peft]
        LeRobot's own loading (policy class from_pretrained(strict=True), or its PEFT path when --peft: PeftConfig ->
        base_model_name_or_path -> from_pretrained -> PeftModel.from_pretrained) and make_pre_post_processors(
        pretrained_path=POLICY_DIR), then preprocessor -> predict_action_chunk(noise) -> postprocessor. OBSERVATION
        is a safetensors file (camera images CHW in [0, 1], state, `noise`; the task in its metadata); the actions
        go to OUT (safetensors, key `action`).
    python tests/lerobot_side.py peft-run BASE_DIR CHECKPOINT_DIR
        A LeRobot PEFT run's checkpoint of BASE_DIR, written by LeRobot's own save_checkpoint: wrap_with_peft with the
        policy's default targets (r 4), LoRA weights set to random values (a trained adapter), then
        CHECKPOINT_DIR/pretrained_model/ (adapter, config.json, processor files, train_config.json).
Prints one JSON line describing what it loaded or wrote.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file


def load_policy(folder: str, peft: bool):
    from lerobot.configs.policies import PreTrainedConfig
    from lerobot.policies.factory import get_policy_class

    config = PreTrainedConfig.from_pretrained(folder)
    cls = get_policy_class(config.type)
    if not peft:
        return cls.from_pretrained(folder, strict=True), {"base": folder}
    from peft import PeftConfig, PeftModel

    peft_config = PeftConfig.from_pretrained(folder)
    base = cls.from_pretrained(peft_config.base_model_name_or_path, strict=True)
    return PeftModel.from_pretrained(base, folder, config=peft_config), {"base": peft_config.base_model_name_or_path}


def predict(folder: str, observation: str, out: str, peft: bool) -> dict:
    from lerobot.policies.factory import make_pre_post_processors

    policy, info = load_policy(folder, peft)
    policy.eval()
    config = policy.config if not peft else policy.get_base_model().config
    preprocessor, postprocessor = make_pre_post_processors(
        config, pretrained_path=folder, preprocessor_overrides={"device_processor": {"device": "cpu"}})
    with safe_open(observation, "pt") as f:
        frame = {key: f.get_tensor(key) for key in f.keys()}
        task = f.metadata()["task"]
    noise = frame.pop("noise")
    batch = preprocessor({**frame, "task": task})
    with torch.no_grad():
        actions = postprocessor(policy.predict_action_chunk(batch, noise=noise))
    save_file({"action": actions.contiguous()}, out)
    tokenizer_name = next(s["config"].get("tokenizer_name") for s in preprocessor.get_config()["steps"]
                          if s["registry_name"] == "tokenizer_processor")
    return {**info, "type": config.type, "tokenizer_name": tokenizer_name, "vlm_model_name":
            getattr(config, "vlm_model_name", None), "actions": list(actions.shape), "cwd": str(Path.cwd())}


def peft_run(base: str, checkpoint_dir: str) -> dict:
    from lerobot.common.train_utils import save_checkpoint
    from lerobot.configs.default import DatasetConfig, PeftConfig
    from lerobot.configs.train import TrainPipelineConfig
    from lerobot.policies.factory import make_pre_post_processors

    policy, _ = load_policy(base, peft=False)
    policy.config.pretrained_path = Path(base)  # what lerobot-train's --policy.path sets
    preprocessor, postprocessor = make_pre_post_processors(policy.config, pretrained_path=base)
    model = policy.wrap_with_peft(peft_cli_overrides={"r": 4})
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():  # a trained adapter: LoRA B is zero at init, which would hide a wrong load
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.2)
    cfg = TrainPipelineConfig(dataset=DatasetConfig(repo_id="local/reach"), policy=policy.config,
                              output_dir=Path(checkpoint_dir).parent, peft=PeftConfig(r=4), steps=1)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    save_checkpoint(Path(checkpoint_dir), 1, cfg, model, optimizer, None, preprocessor, postprocessor)
    pretrained = Path(checkpoint_dir) / "pretrained_model"
    return {"wrote": sorted(p.name for p in pretrained.iterdir()), "lora_tensors":
            sum("lora_" in n for n, _ in model.named_parameters())}


if __name__ == "__main__":
    command, *args = sys.argv[1:]
    if command == "predict":
        result = predict(*args[:3], peft="--peft" in args)
    elif command == "peft-run":
        result = peft_run(*args[:2])
    else:
        raise SystemExit(f"unknown command {command!r}: predict or peft-run")
    print(json.dumps(result))
