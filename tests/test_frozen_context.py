"""The training forward encodes the prefix's frozen context (images and text, when no VLM weight trains) without
autograd, into a KV cache, instead of recording the VLM over it: the loss and every trained gradient stay those of the
joint pass, and the VLM's layers no longer run with autograd over the context tokens."""

from __future__ import annotations

import pytest
import torch
from helpers import tiny_batch

from finetune.adapters import apply_adapter
from finetune.config import PeftOptions
from finetune.policies import load_policy


def vlm_layers(policy):
    return policy._text_model().layers


def loss_and_grads(model, policy, batch, noise, time):
    """Loss, the trained parameters' gradients, and how many tokens each VLM layer's MLP processed with autograd on."""
    tracked = []
    hooks = [layer.mlp.register_forward_hook(
        lambda _m, _i, out: tracked.append(out.shape[0] * out.shape[1] if out.requires_grad else 0))
        for layer in vlm_layers(policy)]
    try:
        loss, _ = model(batch, noise=noise, time=time)
        loss.backward()
    finally:
        for hook in hooks:
            hook.remove()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    return loss.detach(), grads, sum(tracked)


def joint_pass(policy):
    """The reference: the joint pass over prefix and suffix (what LeRobot runs), the context split switched off."""
    policy.model._frozen_context_length = lambda prefix_att: 0


@pytest.mark.parametrize("policy_type", ["smolvla", "pi0", "pi05"])
def test_frozen_context_keeps_loss_and_gradients_and_drops_the_vlm_backward(tiny_policy, policy_type):
    torch.manual_seed(0)
    policy = load_policy(tiny_policy(policy_type))
    model = apply_adapter(policy, PeftOptions(r=8, lora_alpha=16))
    model.train()
    batch = tiny_batch(policy)
    noise = torch.randn(3, policy.config.chunk_size, policy.config.max_action_dim)
    time = torch.tensor([0.2, 0.5, 0.9])

    loss, grads, tracked = loss_and_grads(model, policy, batch, noise, time)
    joint_pass(policy)
    ref_loss, ref_grads, ref_tracked = loss_and_grads(model, policy, batch, noise, time)

    torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=1e-7)
    assert grads.keys() == ref_grads.keys() and len(grads) > 0
    for name, grad in grads.items():
        torch.testing.assert_close(grad, ref_grads[name], rtol=1e-4, atol=1e-6, msg=name)
    assert any(g.abs().sum() > 0 for n, g in grads.items() if "state_proj" in n or "action_in_proj" in n)
    # The joint pass runs every VLM layer with autograd over the whole prefix; now only SmolVLA's state token (the
    # prefix's one block after the context) is tracked, and pi0/pi0.5 (no state in the prefix) track none.
    batch_size, layers = 3, len(vlm_layers(policy))
    assert ref_tracked >= batch_size * layers * 10
    assert tracked == (batch_size * layers * 1 if policy_type == "smolvla" else 0)


def test_a_trained_vlm_layer_keeps_the_joint_pass(tiny_policy):
    """LoRA on a VLM layer: its gradient flows through the context, so the context is not split off."""
    torch.manual_seed(0)
    policy = load_policy(tiny_policy("smolvla"))
    target = r".*text_model\.layers\.0\.mlp\.up_proj"
    model = apply_adapter(policy, PeftOptions(r=8, lora_alpha=16, target_modules=target))
    model.train()
    batch = tiny_batch(policy)
    noise = torch.randn(3, policy.config.chunk_size, policy.config.max_action_dim)
    loss, grads, tracked = loss_and_grads(model, policy, batch, noise, torch.tensor([0.2, 0.5, 0.9]))
    assert set(grads) and all("text_model.layers.0.mlp.up_proj" in n for n in grads)
    assert all(g.abs().sum() > 0 for n, g in grads.items() if "lora_B" in n)  # (lora_A's is 0 while B is 0)
    assert tracked >= 3 * len(vlm_layers(policy)) * 10


@pytest.mark.parametrize("attention_mode, every", [("self_attn", 2), ("cross_attn", 4)])
def test_shallower_expert_with_a_tail_after_the_context(dataset_root, attention_mode, every):
    """SmolVLA with half as many expert layers as VLM layers: in the layers the expert skips only the state token
    (the tail) attends, over the cached context and itself, in self- and in cross-attention layers."""
    from finetune.data import load_dataset_meta
    from finetune.demo import TINY_VLM, tiny_smolvla_config
    from finetune.policies import make_policy

    config = tiny_smolvla_config(load_dataset_meta(dataset_root))
    config.num_expert_layers, config.attention_mode, config.self_attn_every_n_layers = 2, attention_mode, every
    torch.manual_seed(0)
    policy = make_policy(config, TINY_VLM)
    model = apply_adapter(policy, PeftOptions(r=8, lora_alpha=16))
    model.train()
    batch = tiny_batch(policy)
    noise = torch.randn(3, config.chunk_size, config.max_action_dim)
    time = torch.tensor([0.2, 0.5, 0.9])
    loss, grads, _ = loss_and_grads(model, policy, batch, noise, time)
    joint_pass(policy)
    ref_loss, ref_grads, _ = loss_and_grads(model, policy, batch, noise, time)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=1e-7)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, ref_grads[name], rtol=1e-4, atol=1e-6, msg=name)
