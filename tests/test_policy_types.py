"""What SmolVLA, pi0 and pi0.5 do alike, one test per behaviour over the three policy types: KV-cache sampling,
gradient checkpointing (with LoRA dropout too), sdpa against eager attention, and a LoRA run's resume and saved adapter.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from helpers import losses, policy_train_args, set_up_run, tiny_batch
from safetensors.torch import load_file
from test_policies import randomize_lora_b

from finetune import train
from finetune.adapters import apply_adapter, load_adapter
from finetune.config import PeftOptions
from finetune.policies import load_policy
from finetune.training.metrics import read_metrics

POLICY_TYPES = ["smolvla", "pi0", "pi05"]


@dataclass(frozen=True)
class Layout:
    """Where a policy type keeps the parts these tests look at (LeRobot's module paths)."""

    joint: str  # the VLM and the action expert, run jointly
    expert: str  # the action expert
    vision: str  # the VLM's vision tower


PI_LAYOUT = Layout(joint="model.paligemma_with_expert", expert="model.paligemma_with_expert.gemma_expert",
                   vision="model.paligemma_with_expert.paligemma.model.vision_tower")
LAYOUTS = {
    "smolvla": Layout(joint="model.vlm_with_expert", expert="model.vlm_with_expert.lm_expert",
                      vision="model.vlm_with_expert.vlm.model.vision_model"),
    "pi0": PI_LAYOUT,
    "pi05": PI_LAYOUT,
}


@pytest.fixture(scope="module", params=POLICY_TYPES)
def policy_type(request) -> str:
    return request.param


@pytest.fixture(scope="module")
def any_policy_dir(policy_type, tiny_policy) -> Path:
    """The tiny policy folder of the type under test."""
    return tiny_policy(policy_type)


@pytest.fixture(scope="module")
def any_four_steps(policy_type, straight_run) -> tuple[Path, dict]:
    """The straight 4-step LoRA run of that tiny policy: (run folder, summary)."""
    return straight_run(policy_type)


def has_part(names, part: str) -> bool:
    """Whether any of the (parameter) names lies inside the module at path `part` (PEFT's prefix allowed)."""
    return any(part + "." in n for n in names)


# --- the model --------------------------------------------------------------------------------------------------------


def actions_without_cache(policy, batch, noise) -> torch.Tensor:
    """Actions recomputing the whole sequence at every denoising step: SmolVLA reads LeRobot's config.use_cache,
    pi0 / pi0.5 take use_cache=False."""
    if policy.config.type == "smolvla":
        policy.config.use_cache = False
        return policy.predict_action_chunk(batch, noise=noise)
    return policy.predict_action_chunk(batch, noise=noise, use_cache=False)


def test_kv_cache_sampling_matches_full_recompute(any_policy_dir):
    """Sampling with the prefix encoded once into a KV cache gives the actions of recomputing everything."""
    policy = load_policy(any_policy_dir).eval()
    batch, noise = tiny_batch(policy), torch.randn(3, policy.config.chunk_size, 32)
    cached = policy.predict_action_chunk(batch, noise=noise)
    full = actions_without_cache(policy, batch, noise)
    assert cached.shape == (3, policy.config.chunk_size, 2)
    torch.testing.assert_close(cached, full, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(cached, noise[:, :, :2])  # the flow did move the noise


def test_gradient_checkpointing_gives_the_same_gradients(policy_type, any_policy_dir):
    """Recomputing each joint layer in the backward pass gives the plain backward pass's gradients, the action
    expert's and the vision tower's included."""
    layout = LAYOUTS[policy_type]
    policy = load_policy(any_policy_dir)
    batch = tiny_batch(policy)
    noise, time = torch.randn(3, policy.config.chunk_size, 32), torch.full((3,), 0.7)
    grads = []
    for enabled in (False, True):
        policy.zero_grad()
        policy.set_gradient_checkpointing(enabled)
        policy(batch, noise=noise, time=time)[0].backward()
        grads.append({n: p.grad.clone() for n, p in policy.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 50
    assert has_part(grads[0], layout.expert) and has_part(grads[0], layout.vision)
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=1e-5, atol=1e-6)


def lora_dropout_grads(model, batch, checkpointing: bool, seed: int) -> dict[str, torch.Tensor]:
    """LoRA gradients of one loss with lora_dropout 0.1; the seed fixes the dropout masks."""
    model.train()
    model.base_model.model.set_gradient_checkpointing(checkpointing)
    model.zero_grad()
    noise, time = torch.randn(3, 10, 32, generator=torch.Generator().manual_seed(1)), torch.full((3,), 0.7)
    torch.manual_seed(seed)
    model(batch, noise=noise, time=time)[0].backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_gradient_checkpointing_with_lora_dropout_gives_the_same_gradients(policy_type, any_policy_dir):
    """The checkpointed layers preserve the RNG state: the recomputed forward draws the dropout masks the first
    forward drew."""
    model = apply_adapter(load_policy(any_policy_dir), PeftOptions(r=4, lora_dropout=0.1))
    randomize_lora_b(model)
    batch = tiny_batch(load_policy(any_policy_dir))
    plain = lora_dropout_grads(model, batch, checkpointing=False, seed=5)
    checkpointed = lora_dropout_grads(model, batch, checkpointing=True, seed=5)
    other_masks = lora_dropout_grads(model, batch, checkpointing=False, seed=6)
    expert = [n for n in plain if has_part([n], LAYOUTS[policy_type].expert) and "lora_A" in n]
    assert expert and plain.keys() == checkpointed.keys()
    assert any(not torch.allclose(plain[n], other_masks[n]) for n in expert)  # dropout does act on these gradients
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], rtol=1e-5, atol=1e-7)


def test_sdpa_attention_gives_the_eager_loss_and_actions(policy_type, any_policy_dir):
    """Fused attention (the default) gives the loss and actions of the explicit float32-softmax path, in the joint
    layers and the vision tower; an unknown implementation is refused."""
    layout = LAYOUTS[policy_type]
    policy = load_policy(any_policy_dir)
    assert policy.get_submodule(layout.joint).attn_implementation == "sdpa"
    with torch.no_grad():  # peaked attention (a random tiny model attends almost uniformly): the scale and mask matter
        for name, param in policy.named_parameters():
            if name.endswith(("q_proj.weight", "k_proj.weight")):
                param.mul_(8.0)
    batch = tiny_batch(policy)
    noise, time = torch.randn(3, policy.config.chunk_size, 32), torch.full((3,), 0.6)
    results = {}
    for name in ("eager", "sdpa"):
        policy.set_attn_implementation(name)
        vision = policy.get_submodule(layout.vision)
        assert {m.config._attn_implementation for m in vision.modules() if hasattr(m, "config")} == {name}
        loss = policy.train()(batch, noise=noise, time=time)[0]
        actions = policy.eval().predict_action_chunk(batch, noise=noise)
        results[name] = (loss, actions)
    torch.testing.assert_close(results["sdpa"][0], results["eager"][0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(results["sdpa"][1], results["eager"][1], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="unknown attention implementation 'flash'"):
        policy.set_attn_implementation("flash")


# --- a LoRA run through the training script ---------------------------------------------------------------------------


def adapter_size(run_dir: Path) -> int:
    """Parameters in the adapter of a run's last checkpoint."""
    return sum(t.numel() for t in load_file(str(run_dir / "checkpoints/last/adapter_model.safetensors")).values())


def test_resume_continues_the_same_run(policy_type, any_policy_dir, any_four_steps, dataset_root, tmp_path):
    """Two steps, then --resume to four, give the straight run's losses and adapter: one adapter (not a second one on
    top of the first) that trains on after resuming."""
    straight_dir, _ = any_four_steps
    out = tmp_path / "resumed"
    train.main(policy_train_args(policy_type, any_policy_dir, dataset_root, out, "--steps", "2"))
    first = load_file(str(out / "checkpoints/000002/adapter_model.safetensors"))
    summary = train.main(policy_train_args(policy_type, any_policy_dir, dataset_root, out, "--steps", "4", "--resume"))
    assert summary["trainable_params"] == adapter_size(straight_dir)
    straight, resumed = losses(straight_dir), losses(out)
    assert sorted(resumed) == [1, 2, 3, 4]
    for step in (1, 2, 3, 4):
        assert resumed[step] == pytest.approx(straight[step], rel=1e-5, abs=1e-6), (step, straight, resumed)
    a = load_file(str(straight_dir / "checkpoints/000004/adapter_model.safetensors"))
    b = load_file(str(out / "checkpoints/000004/adapter_model.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-7)
    assert any(not torch.equal(first[k], b[k]) for k in first)  # it did train after resuming


def test_saved_adapter_on_the_base_reproduces_the_trained_policy(policy_type, any_policy_dir, any_four_steps,
                                                                 dataset_root):
    """The saved adapter on the base (the resume path) gives the trained policy's logged held-out MSE and changes its
    actions; merged into the base it computes the same actions as on top of it (the file holds the trained tensors)."""
    out, _ = any_four_steps
    evals = [m["eval/action_mse"] for m in read_metrics(out / "metrics.jsonl") if "eval/action_mse" in m]
    reloaded = set_up_run(policy_train_args(policy_type, any_policy_dir, dataset_root, out, "--steps", "4", "--resume"))
    assert train.evaluate(reloaded) == pytest.approx(evals[-1], rel=1e-5)
    assert evals[-1] != pytest.approx(evals[0], rel=1e-3)

    ckpt = out / "checkpoints" / "last"
    with_adapter = load_adapter(load_policy(any_policy_dir), ckpt, trainable=False).eval()
    base = load_policy(any_policy_dir).eval()
    batch, noise = tiny_batch(base), torch.randn(3, base.config.chunk_size, 32)
    out_adapter = with_adapter.predict_action_chunk(batch, noise=noise)
    assert not torch.allclose(out_adapter, base.predict_action_chunk(batch, noise=noise))
    merged = load_adapter(load_policy(any_policy_dir), ckpt, trainable=False).merge_and_unload().eval()
    torch.testing.assert_close(merged.predict_action_chunk(batch, noise=noise), out_adapter, rtol=1e-4, atol=1e-5)
