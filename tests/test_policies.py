"""SmolVLA: LeRobot names and sizes, the LeRobot-format folder, training and the masked loss. What pi0 / pi0.5 do alike
(KV cache, gradient checkpointing, sdpa) is tested for every policy type in test_policy_types.py."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import tiny_batch
from safetensors.torch import load_file

from finetune.demo import TINY_VLM
from finetune.policies import SmolVLAConfig, load_policy, load_policy_config, make_policy, save_policy


def test_real_size_smolvla_has_450m_parameters_and_lerobot_keys():
    config = SmolVLAConfig(input_features={"observation.state": {"type": "STATE", "shape": [6]},
                                           "observation.images.top": {"type": "VISUAL", "shape": [3, 256, 256]}},
                           output_features={"action": {"type": "ACTION", "shape": [6]}})
    with torch.device("meta"):
        policy = make_policy(config)
    total = sum(p.numel() for p in policy.parameters())
    assert abs(total - 450e6) / 450e6 < 0.05, total
    assert total == 450_046_176  # vision 86.4M, connector 11.8M, text 204.6M, lm_head 47.3M, expert 98.2M, proj 1.6M
    keys = set(policy.state_dict())
    for key in [
        "model.vlm_with_expert.vlm.model.vision_model.embeddings.patch_embedding.weight",
        "model.vlm_with_expert.vlm.model.connector.modality_projection.proj.weight",
        "model.vlm_with_expert.vlm.model.text_model.layers.15.self_attn.q_proj.weight",
        "model.vlm_with_expert.vlm.lm_head.weight",
        "model.vlm_with_expert.lm_expert.layers.15.mlp.down_proj.weight",
        "model.state_proj.weight", "model.action_in_proj.weight", "model.action_out_proj.bias",
        "model.action_time_mlp_in.weight", "model.action_time_mlp_out.weight",
    ]:
        assert key in keys, key
    assert not any("text_model.layers.16." in k for k in keys)  # truncated to num_vlm_layers=16
    assert not any("lm_expert.embed_tokens" in k for k in keys)
    sd = policy.state_dict()
    assert sd["model.vlm_with_expert.lm_expert.layers.1.self_attn.k_proj.weight"].shape == (320, 320)  # cross-attn
    assert sd["model.vlm_with_expert.lm_expert.layers.0.self_attn.k_proj.weight"].shape == (320, 720)  # self-attn
    assert sd["model.vlm_with_expert.lm_expert.layers.0.mlp.gate_proj.weight"].shape == (2048, 720)
    assert sd["model.state_proj.weight"].shape == (960, 32)


def test_config_json_round_trips_with_type_and_unknown_fields(policy_dir, tmp_path):
    data = json.loads((policy_dir / "config.json").read_text())
    assert data["type"] == "smolvla" and data["chunk_size"] == 10
    data["rtc_config"] = None  # a LeRobot field this project does not use survives a round trip
    (tmp_path / "config.json").write_text(json.dumps(data))
    config = load_policy_config(tmp_path)
    assert config.extra == {"rtc_config": None}
    assert config.to_dict() == data


def test_tiny_policy_trains_and_reloads_identically(policy_dir, tmp_path):
    torch.manual_seed(0)
    policy = load_policy(policy_dir)
    batch = tiny_batch(policy)
    optimizer = torch.optim.AdamW(policy.parameters(), lr=3e-4)
    noise = torch.randn(3, policy.config.chunk_size, 32)
    time = torch.full((3,), 0.5)
    losses = []
    for _ in range(15):
        loss, _ = policy(batch, noise=noise, time=time)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses

    save_policy(policy, tmp_path / "saved")
    reloaded = load_policy(tmp_path / "saved")
    saved = load_file(str(tmp_path / "saved" / "model.safetensors"))
    assert saved.keys() == policy.state_dict().keys()
    for key, value in policy.state_dict().items():
        assert torch.equal(value, saved[key]), key
    policy.eval(), reloaded.eval()
    chunk_noise = torch.randn(3, policy.config.chunk_size, 32)
    torch.testing.assert_close(policy.predict_action_chunk(batch, noise=chunk_noise),
                               reloaded.predict_action_chunk(batch, noise=chunk_noise))


def test_loss_is_masked_by_action_is_pad_and_cut_to_action_dim(policy_dir):
    policy = load_policy(policy_dir)
    batch = tiny_batch(policy)
    noise, time = torch.randn(3, policy.config.chunk_size, 32), torch.full((3,), 0.3)
    loss, _ = policy(batch, noise=noise, time=time)
    per_element = policy.model(*policy._inputs(batch), torch.nn.functional.pad(batch["action"], (0, 30)), noise, time)
    valid = ~batch["action_is_pad"]
    expected = per_element[:, :, :2][valid].mean()
    torch.testing.assert_close(loss, expected)
    batch["action"][1, -1] += 100.0  # a padded step: must not change the loss
    torch.testing.assert_close(policy(batch, noise=noise, time=time)[0], loss)


def test_load_refuses_mismatched_weights(policy_dir, tmp_path):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(policy_dir, bad)
    config = json.loads((bad / "config.json").read_text())
    config["num_vlm_layers"] = 2  # the file holds 4 layers
    (bad / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"does not match a smolvla policy.*unexpected"):
        load_policy(bad)
    (bad / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="has config.json but no weights"):
        load_policy(bad)
    with pytest.raises(FileNotFoundError, match="needs config.json and model.safetensors"):
        load_policy(tmp_path / "nowhere")


def test_unknown_backbone_names_the_fix(tmp_path):
    config = SmolVLAConfig(vlm_model_name="someone/unknown-vlm")
    with pytest.raises(ValueError, match="vlm_config.json"):
        make_policy(config)
    assert TINY_VLM["text_config"]["hidden_size"] == 192


def randomize_lora_b(model) -> None:
    """A trained adapter: lora_B non-zero, so the gradients of lora_A (and the outputs) depend on the dropout masks."""
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.05)
