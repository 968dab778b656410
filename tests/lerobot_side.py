"""Runs inside .lerobot-venv (LeRobot 0.6.1 itself, see tools/lerobot_env.sh); never imports finetune.

    python tests/lerobot_side.py predict POLICY_DIR OBSERVATION OUT [--peft] [--dataset ROOT]
        LeRobot's own loading (policy class from_pretrained(strict=True), or its PEFT path when --peft: PeftConfig ->
        base_model_name_or_path -> from_pretrained -> PeftModel.from_pretrained); with --dataset the policy that
        predicts then comes from make_policy as `--policy.path` gives it to LeRobot's scripts (features from that
        LeRobotDataset's metadata). Then make_pre_post_processors(pretrained_path=POLICY_DIR), preprocessor ->
        predict_action_chunk(noise) -> postprocessor. OBSERVATION
        is a safetensors file (camera images CHW in [0, 1], state, `noise`; the task in its metadata); the actions
        go to OUT (safetensors, key `action`).
    python tests/lerobot_side.py peft-run BASE_DIR CHECKPOINT_DIR
        A LeRobot PEFT run's checkpoint of BASE_DIR, written by LeRobot's own save_checkpoint: wrap_with_peft with the
        policy's default targets (r 4), LoRA weights set to random values (a trained adapter), then
        CHECKPOINT_DIR/pretrained_model/ (adapter, config.json, processor files, train_config.json).
    python tests/lerobot_side.py fresh-processors POLICY_DIR OUT_DIR
        LeRobot's make_pre_post_processors for POLICY_DIR's config and stats, built (not loaded), saved to OUT_DIR.
    python tests/lerobot_side.py full-run BASE_DIR CHECKPOINT_DIR
        A LeRobot full fine-tune's checkpoint (every weight nudged), written by LeRobot's save_checkpoint.
    python tests/lerobot_side.py grads ADAPTER_DIR BATCH OUT
        One training step's gradients: the adapter loaded as lerobot-train loads `--policy.path=ADAPTER_DIR` (LeRobot's
        PEFT loading, is_trainable=True), policy.train(), then its training call `policy.forward(batch)` on the
        already normalized and tokenized batch of BATCH (safetensors; also `noise` and `time`, which the model's
        sample_noise / sample_time return instead of drawing), loss.backward(). OUT (safetensors): `loss` and the
        gradient of every trainable parameter under its PEFT name.
Prints one JSON line describing what it loaded or wrote.

`--tiny-pi SPEC.json` (pi0/pi0.5 only): LeRobot 0.6.1 builds PaliGemma + expert at full size only (its variant table
knows gemma_2b and gemma_300m; SigLIP So400m, vocabulary 257152 and projection width 2048 are constants in
PaliGemmaWithExpertModel.__init__), about 3.5B parameters, more than this check can hold twice in memory. The option
swaps those constants for the sizes in a tiny export's vlm_config.json: LeRobot's get_gemma_config gives them for
gemma_2b (the VLM) and gemma_300m (the expert), and the transformers configs its __init__ builds keep the tiny vision
tower and vocabulary. Nothing else of LeRobot changes: its modules, key names, forward, sampling, loading and
processors run as shipped.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file


def use_tiny_pi_sizes(spec_path: str) -> None:
    """LeRobot's pi0/pi0.5 built at the sizes of `spec_path` (an export's vlm_config.json) instead of full size."""
    import lerobot.policies.pi0.modeling_pi0 as pi0
    import lerobot.policies.pi05.modeling_pi05 as pi05
    from transformers.models.auto import CONFIG_MAPPING

    spec = json.loads(Path(spec_path).read_text())
    vocab, width = spec["vocab_size"], spec["paligemma"]["width"]

    def pin(config, **values):  # later assignments of these attributes keep the pinned value
        base = type(config)
        config.__class__ = type(base.__name__, (base,), {"__setattr__": lambda self, key, value: base.__setattr__(
            self, key, values.get(key, value))})
        for key, value in values.items():
            setattr(config, key, value)
        return config

    def paligemma():
        config = CONFIG_MAPPING["paligemma"]()
        pin(config.vision_config, **spec["vision"], projection_dim=width, vision_use_head=False)
        pin(config.text_config, vocab_size=vocab)
        return pin(config, _vocab_size=vocab, image_token_index=vocab)

    def gemma(**kwargs):
        return CONFIG_MAPPING["gemma"](**{**kwargs, "vocab_size": vocab})

    tiny = {"gemma_2b": spec["paligemma"], "gemma_300m": spec["action_expert"]}  # the only names its config accepts
    for module in (pi0, pi05):
        original = module.get_gemma_config
        module.get_gemma_config = lambda variant, m=module, o=original: (
            m.GemmaConfig(**tiny[variant]) if variant in tiny else o(variant))
        module.CONFIG_MAPPING = {"paligemma": paligemma, "gemma": gemma}


def load_policy(folder: str, peft: bool, trainable: bool = False):
    """LeRobot's policy class from_pretrained(strict=True), or for an adapter folder LeRobot's PEFT loading (PeftConfig
    -> base_model_name_or_path -> from_pretrained -> PeftModel.from_pretrained; `trainable` as make_policy has it)."""
    from lerobot.configs.policies import PreTrainedConfig
    from lerobot.policies.factory import get_policy_class

    config = PreTrainedConfig.from_pretrained(folder)
    cls = get_policy_class(config.type)
    if not peft:
        return cls.from_pretrained(folder, strict=True), {"base": folder}
    from peft import PeftConfig, PeftModel

    peft_config = PeftConfig.from_pretrained(folder)
    base = cls.from_pretrained(peft_config.base_model_name_or_path, strict=True)
    model = PeftModel.from_pretrained(base, folder, config=peft_config, is_trainable=trainable)
    return model, {"base": peft_config.base_model_name_or_path}


def make_policy_as_scripts_do(folder: str, dataset_root: str):
    """What `lerobot-eval` / `lerobot-record --policy.path=FOLDER` do: the config from FOLDER with pretrained_path
    set, then make_policy (which takes the PEFT path when config.json says use_peft)."""
    from lerobot.configs.policies import PreTrainedConfig
    from lerobot.datasets.dataset_metadata import LeRobotDatasetMetadata
    from lerobot.policies.factory import make_policy

    config = PreTrainedConfig.from_pretrained(folder)
    config.pretrained_path = Path(folder)
    return make_policy(config, ds_meta=LeRobotDatasetMetadata("local/dataset", root=dataset_root))


def predict(folder: str, observation: str, out: str, peft: bool, dataset_root: str | None) -> dict:
    from lerobot.policies.factory import make_pre_post_processors

    policy, info = load_policy(folder, peft)
    if dataset_root is not None:  # the scripts' path; the strict load above still has to succeed
        policy = make_policy_as_scripts_do(folder, dataset_root)
        info["loaded_by"] = "make_policy"
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


def fresh_processors(folder: str, out: str) -> dict:
    """LeRobot's own processors for FOLDER's config and stats, built from scratch (not loaded) and saved to OUT."""
    from lerobot.configs.policies import PreTrainedConfig
    from lerobot.policies.factory import make_pre_post_processors
    from safetensors.torch import load_file

    config = PreTrainedConfig.from_pretrained(folder)
    state = next(Path(folder).glob("policy_postprocessor_step_*_unnormalizer_processor.safetensors"))
    stats: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in load_file(str(state)).items():
        feature, stat = key.rsplit(".", 1)
        stats.setdefault(feature, {})[stat] = tensor
    preprocessor, postprocessor = make_pre_post_processors(config, dataset_stats=stats)
    preprocessor.save_pretrained(out)
    postprocessor.save_pretrained(out)
    return {"wrote": sorted(p.name for p in Path(out).iterdir())}


def full_run(base: str, checkpoint_dir: str) -> dict:
    """A LeRobot full fine-tune's checkpoint of BASE_DIR (every weight nudged, as training would), saved by LeRobot."""
    from lerobot.common.train_utils import save_checkpoint
    from lerobot.configs.default import DatasetConfig
    from lerobot.configs.train import TrainPipelineConfig
    from lerobot.policies.factory import make_pre_post_processors

    policy, _ = load_policy(base, peft=False)
    policy.config.pretrained_path = Path(base)
    preprocessor, postprocessor = make_pre_post_processors(policy.config, pretrained_path=base)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for param in policy.parameters():
            param.add_(torch.randn(param.shape, generator=generator) * 0.02)
    cfg = TrainPipelineConfig(dataset=DatasetConfig(repo_id="local/reach"), policy=policy.config,
                              output_dir=Path(checkpoint_dir).parent, steps=1)
    optimizer = torch.optim.AdamW(policy.parameters(), lr=1e-4)
    save_checkpoint(Path(checkpoint_dir), 1, cfg, policy, optimizer, None, preprocessor, postprocessor)
    return {"wrote": sorted(p.name for p in (Path(checkpoint_dir) / "pretrained_model").iterdir())}


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


def grads(folder: str, batch_file: str, out: str) -> dict:
    """LeRobot's loss and LoRA gradients for one batch with the given noise and flow time (see the module docstring)."""
    model, info = load_policy(folder, peft=True, trainable=True)
    model.train()
    with safe_open(batch_file, "pt") as f:
        batch = {key: f.get_tensor(key) for key in f.keys()}
    noise, time = batch.pop("noise"), batch.pop("time")
    flow = model.get_base_model().model
    drawn = []  # lerobot-train's call draws them inside forward; here they are ours
    flow.sample_noise = lambda shape, device: drawn.append("noise") or noise.clone()
    flow.sample_time = lambda bsize, device: drawn.append("time") or time.clone()
    loss, _ = model.forward(batch)
    loss.backward()
    assert sorted(drawn) == ["noise", "time"], drawn
    result = {"loss": loss.detach().reshape(1)}
    result.update({name: p.grad.contiguous() for name, p in model.named_parameters() if p.grad is not None})
    save_file(result, out)
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    return {**info, "type": model.get_base_model().config.type, "trainable": len(trainable),
            "with_grad": len(result) - 1, "dtypes": sorted({str(p.dtype) for p in model.parameters()})}


if __name__ == "__main__":
    command, *args = sys.argv[1:]
    if "--tiny-pi" in args:
        use_tiny_pi_sizes(args.pop(args.index("--tiny-pi") + 1))
        args.remove("--tiny-pi")
    dataset = args.pop(args.index("--dataset") + 1) if "--dataset" in args else None
    if dataset is not None:
        args.remove("--dataset")
    if command == "predict":
        result = predict(*args[:3], peft="--peft" in args, dataset_root=dataset)
    elif command == "peft-run":
        result = peft_run(*args[:2])
    elif command == "full-run":
        result = full_run(*args[:2])
    elif command == "grads":
        result = grads(*args[:3])
    elif command == "fresh-processors":
        result = fresh_processors(*args[:2])
    else:
        raise SystemExit(f"unknown command {command!r}: predict, peft-run, full-run, fresh-processors or grads")
    print(json.dumps(result))
