"""Training parity with LeRobot 0.6.1 itself (-m slow; needs .lerobot-venv from tools/lerobot_env.sh or LEROBOT_PYTHON).

For tiny SmolVLA, pi0 and pi0.5 with our LoRA adapter (LeRobot's default targets, r 8, lora_B random so lora_A's
gradients are not zero): one training step on the same normalized, tokenized batch with the same noise and flow time
gives the same loss and the same gradient for every LoRA parameter here (our forward, which encodes the frozen context
without autograd into a KV cache) and in LeRobot (the adapter loaded as lerobot-train loads it, its policy.forward, its
joint pass), float32 on both sides. LeRobot runs in a subprocess (tests/lerobot_side.py grads).

pi0/pi0.5 use lerobot_side.py's --tiny-pi sizes with 8 attention heads in both towers: LeRobot's joint pass (the
training forward; sampling's cached passes do not) reshapes the attention output to 8 heads, gemma_2b's and
gemma_300m's count. LeRobot 0.6.1's pi0/pi0.5 loss averages over every chunk step (action_is_pad unused) where ours
leaves out the padded ones, as its SmolVLA does; so their batch has no padded step.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from helpers import TINY_PI_BACKBONE, make_tiny_pi_policy, tiny_batch
from safetensors.torch import load_file, save_file
from test_lerobot_roundtrip import LEROBOT_PYTHON, ROOT, lerobot, report
from test_policies import randomize_lora_b

from finetune.adapters import apply_adapter
from finetune.config import PeftOptions
from finetune.data import load_dataset_meta
from finetune.export.lerobot_vlm import write_vlm_folder
from finetune.hub import load_tokenizer
from finetune.policies import load_policy
from finetune.training.checkpoint import write_lerobot_adapter_files

# TINY_PI_BACKBONE with LeRobot's 8 heads in both towers (one key/value head, as gemma_2b)
EIGHT_HEADS = {**TINY_PI_BACKBONE, "paligemma": {**TINY_PI_BACKBONE["paligemma"], "num_heads": 8},
               "action_expert": {**TINY_PI_BACKBONE["action_expert"], "num_heads": 8}}

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not LEROBOT_PYTHON.is_file(),
                       reason=f"no LeRobot environment at {LEROBOT_PYTHON}: run tools/lerobot_env.sh (or set "
                              "LEROBOT_PYTHON to a python with LeRobot 0.6.1)"),
]


@pytest.mark.parametrize("policy_type", ["smolvla", "pi0", "pi05"])
def test_lerobot_training_parity(policy_type, tiny_policy, dataset_root, tmp_path):
    (ROOT / "runs").mkdir(exist_ok=True)
    elsewhere = tmp_path / "elsewhere"  # LeRobot's working directory
    elsewhere.mkdir()
    if policy_type == "smolvla":  # a copy with the backbone LeRobot builds from in base/vlm, named by absolute path
        base = Path(shutil.copytree(tiny_policy("smolvla"), tmp_path / "base"))
        config_json = json.loads((base / "config.json").read_text())
        vlm = write_vlm_folder(base, load_policy(base), load_tokenizer(base, None, None))
        config_json["vlm_model_name"] = str(vlm.resolve())
        (base / "config.json").write_text(json.dumps(config_json, indent=2) + "\n")
    else:  # the only variant names LeRobot's config accepts; vlm_config.json holds the tiny sizes
        base = make_tiny_pi_policy(tmp_path / "base", load_dataset_meta(dataset_root), policy_type, seed=0,
                                   variants=("gemma_2b", "gemma_300m"), backbone=EIGHT_HEADS)
    tiny_pi = base / "vlm_config.json" if policy_type != "smolvla" else None

    torch.manual_seed(0)
    model = apply_adapter(load_policy(base, dtype=torch.float32), PeftOptions(r=8))
    randomize_lora_b(model)
    adapter = tmp_path / "adapter"
    model.save_pretrained(str(adapter), safe_serialization=True)
    write_lerobot_adapter_files(adapter, str(base.resolve()))
    shutil.copy(base / "config.json", adapter / "config.json")  # LeRobot reads the policy type from it

    batch = tiny_batch(model.get_base_model(), batch_size=3, seed=1)
    if policy_type != "smolvla":
        batch["action_is_pad"][:] = False
    assert batch["observation.language.attention_mask"].logical_not().any()  # a padded instruction
    g = torch.Generator().manual_seed(2)
    config = model.get_base_model().config
    noise = torch.randn(3, config.chunk_size, config.max_action_dim, generator=g)
    time = torch.rand(3, generator=g) * 0.9 + 0.05
    save_file({**batch, "noise": noise, "time": time}, str(tmp_path / "batch.safetensors"))

    model.train()  # no VLM weight trains: our forward takes the frozen-context path
    assert model.get_base_model().model._frozen_context_length(torch.zeros(1, 4, dtype=torch.bool)) == 4
    loss, _ = model(batch, noise=noise, time=time)
    loss.backward()
    ours = {name: p.grad for name, p in model.named_parameters() if p.grad is not None}
    assert all(p.dtype == torch.float32 for p in model.parameters())

    info = lerobot("grads", adapter, tmp_path / "batch.safetensors", tmp_path / "grads.safetensors", cwd=elsewhere,
                   tiny_pi=tiny_pi)
    assert info["base"] == str(base.resolve()) and info["type"] == config.type and info["dtypes"] == ["torch.float32"]
    theirs = load_file(str(tmp_path / "grads.safetensors"))
    their_loss = theirs.pop("loss")[0]

    loss_diff = (their_loss - loss.detach()).abs().item()
    grad_diff = max((theirs[name] - grad).abs().max().item() for name, grad in ours.items() if name in theirs)
    report(policy_type, "training loss, our adapter: LeRobot vs finetune", loss_diff)
    report(policy_type, f"LoRA gradients ({len(ours)} tensors): LeRobot vs finetune", grad_diff)
    assert loss_diff <= 1e-5 * loss.abs().item()
    assert set(theirs) == set(ours) == {n for n, p in model.named_parameters() if p.requires_grad}
    assert all("lora_" in name for name in ours) and info["trainable"] == len(ours)
    assert any("lora_A" in name for name in ours) and any("lora_B" in name for name in ours)
    for name, grad in ours.items():
        assert grad.abs().max() > 0, name
        torch.testing.assert_close(theirs[name], grad, rtol=1e-4, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}")
