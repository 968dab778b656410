"""PEFT on the policy: default targets, suffix and regex targets, fully trained modules, other methods."""

from __future__ import annotations

import re

import pytest
import torch
from helpers import tiny_batch
from peft import PeftModel

from finetune.adapters import apply_adapter, count_parameters, resolve_target_modules
from finetune.config import ConfigError, PeftOptions
from finetune.policies import load_policy
from finetune.policies.cpu_linear import use_cpu_linear


def lora_wrapped(model) -> list[str]:
    return sorted(n.removeprefix("base_model.model.") for n, m in model.named_modules()
                  if hasattr(m, "lora_A") and isinstance(m.lora_A, torch.nn.ModuleDict) and m.lora_A)


def test_default_targets_are_lerobots_smolvla_targets(policy_dir):
    model = apply_adapter(load_policy(policy_dir), PeftOptions(r=4))
    wrapped = lora_wrapped(model)
    expert = [f"model.vlm_with_expert.lm_expert.layers.{i}.self_attn.{p}_proj" for i in range(4) for p in "qv"]
    heads = [f"model.{n}" for n in ("action_in_proj", "action_out_proj", "action_time_mlp_in", "action_time_mlp_out",
                                    "state_proj")]
    assert wrapped == sorted(expert + heads)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    n_trainable, n_total = count_parameters(model)
    assert n_trainable == sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
    assert n_total == sum(p.numel() for p in model.parameters())


def test_suffix_list_and_regex_targets(policy_dir):
    policy = load_policy(policy_dir)
    by_suffix = resolve_target_modules(policy, ("o_proj",))
    assert len(by_suffix) == 8 and all(n.endswith("self_attn.o_proj") for n in by_suffix)  # VLM 4 + expert 4
    by_regex = resolve_target_modules(policy, (r".*lm_expert\.layers\.[01]\.mlp\.(up|down)_proj",))
    assert by_regex == [f"model.vlm_with_expert.lm_expert.layers.{i}.mlp.{p}_proj" for i in (0, 1)
                        for p in ("up", "down")]


def test_target_that_matches_nothing_lists_candidates(policy_dir):
    policy = load_policy(policy_dir)
    with pytest.raises(ConfigError, match=re.escape("'q_prj' matches no adaptable")) as err:
        resolve_target_modules(policy, ("q_prj",))
    assert "q_proj" in str(err.value)
    with pytest.raises(ConfigError, match="matches no adaptable"):
        resolve_target_modules(policy, (r"model\.nothing\..*",))
    with pytest.raises(ConfigError, match="not a valid regex"):
        resolve_target_modules(policy, ("(unclosed|",))


def test_full_training_modules_are_trained_in_full(policy_dir):
    model = apply_adapter(load_policy(policy_dir), PeftOptions(r=4, full_training_modules=("action_out_proj",)))
    assert "model.action_out_proj" not in lora_wrapped(model)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any("action_out_proj.modules_to_save" in n for n in trainable)
    with pytest.raises(ConfigError, match="matches no module"):
        apply_adapter(load_policy(policy_dir), PeftOptions(r=4, full_training_modules=("no_such_head",)))


@pytest.mark.parametrize("method", ["LORA", "LOHA", "LOKR", "IA3", "VERA", "OFT"])
def test_peft_methods_by_name_train(policy_dir, method):
    """Each method the README names trains: a few steps on one batch lower its loss; the base stays frozen."""
    model = apply_adapter(load_policy(policy_dir), PeftOptions(method=method, r=4))
    assert isinstance(model, PeftModel) and model.peft_config["default"].peft_type.value == method
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    lr = 1e-3 if method == "OFT" else 1e-2  # OFT's orthogonal blocks overshoot at 1e-2
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    batch = tiny_batch(load_policy(policy_dir))
    noise, time = torch.randn(3, 10, 32, generator=torch.Generator().manual_seed(0)), torch.full((3,), 0.5)
    losses = []
    for _ in range(6):
        loss, _ = model(batch, noise=noise, time=time)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.97 * losses[0], (method, losses)
    changed = [n for n, p in model.named_parameters() if p.requires_grad and not torch.equal(p, before[n])]
    assert changed, f"{method}: no adapter parameter changed"
    frozen = {n: p for n, p in model.named_parameters() if not p.requires_grad}
    assert any("lm_expert" in n for n in frozen)
    base = load_policy(policy_dir).state_dict()
    for name, param in frozen.items():  # the base weights are untouched (PEFT keeps them under base_layer)
        key = name.removeprefix("base_model.model.").replace(".base_layer.", ".")
        if key in base:
            assert torch.equal(param, base[key]), name


def trainable_prefixes(model) -> dict[str, bool]:
    """For each top-level part of the policy: whether any of its parameters trains."""
    parts = {
        "vision": "model.vlm_with_expert.vlm.model.vision_model.",
        "connector": "model.vlm_with_expert.vlm.model.connector.",
        "text_layer_0": "model.vlm_with_expert.vlm.model.text_model.layers.0.",
        "text_layer_last": "model.vlm_with_expert.vlm.model.text_model.layers.3.",
        "text_norm": "model.vlm_with_expert.vlm.model.text_model.norm.",
        "lm_head": "model.vlm_with_expert.vlm.lm_head.",
        "expert": "model.vlm_with_expert.lm_expert.",
        "state_proj": "model.state_proj.",
        "action_out_proj": "model.action_out_proj.",
    }
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    return {part: any(n.startswith(prefix) for n in names) for part, prefix in parts.items()}


@pytest.mark.parametrize(("freeze_vision", "expert_only", "train_state_proj", "expected_frozen"), [
    (True, True, True, {"vision", "connector", "text_layer_0", "text_layer_last", "text_norm", "lm_head"}),
    (True, False, True, {"vision", "text_norm", "lm_head"}),
    (False, False, False, {"text_norm", "lm_head", "state_proj"}),
])
def test_full_training_follows_lerobots_smolvla_freezing(policy_dir, freeze_vision, expert_only, train_state_proj,
                                                        expected_frozen):
    """--peft.method FULL trains what LeRobot's SmolVLA trains: by default (freeze_vision_encoder, train_expert_only)
    the expert and the projections; the VLM parts nothing reads (final norm, lm_head, the last layer's
    query/output/MLP) never train."""
    policy = load_policy(policy_dir, freeze_vision_encoder=freeze_vision, train_expert_only=expert_only,
                         train_state_proj=train_state_proj)
    model = apply_adapter(policy, PeftOptions(method="FULL"))
    trains = trainable_prefixes(model)
    assert {part for part, on in trains.items() if not on} == expected_frozen
    last = "model.vlm_with_expert.vlm.model.text_model.layers.3."
    last_trained = sorted(n.removeprefix(last) for n, p in model.named_parameters() if p.requires_grad
                          and n.startswith(last))
    # the expert attends to the last VLM layer's keys and values: those train unless the whole VLM is frozen
    expected_last = [] if expert_only else ["input_layernorm.weight", "self_attn.k_proj.weight",
                                            "self_attn.v_proj.weight"]
    assert last_trained == expected_last
    model.train()
    vision = model.model.vlm_with_expert.vlm.model.vision_model
    assert vision.training is (not freeze_vision and not expert_only)  # frozen parts stay in eval mode, as LeRobot
    assert model.model.vlm_with_expert.lm_expert.training


def test_full_training_through_the_script_counts_lerobots_trainable_parameters(policy_dir, dataset_root, tmp_path):
    import json
    import shutil

    from helpers import train_args

    from finetune import train

    lerobot_defaults = shutil.copytree(policy_dir, tmp_path / "policy")  # the demo's base trains all of it: not these
    config = json.loads((lerobot_defaults / "config.json").read_text())
    config.update(freeze_vision_encoder=True, train_expert_only=True)  # LeRobot's SmolVLA defaults
    (lerobot_defaults / "config.json").write_text(json.dumps(config))
    summary = train.main(train_args(lerobot_defaults, dataset_root, tmp_path / "full", "--steps", "1",
                                    "--peft.method", "FULL", "--dataset.eval-episodes", "0"))
    policy = load_policy(lerobot_defaults)
    not_vlm = sum(p.numel() for n, p in policy.named_parameters() if not n.startswith("model.vlm_with_expert.vlm."))
    assert summary["trainable_params"] == not_vlm
    assert summary["total_params"] == sum(p.numel() for p in policy.parameters())


def test_compile_model_compiles_the_forward_and_sampling(policy_dir):
    policy = load_policy(policy_dir, compile_model=True, compile_mode="default")
    for fn in (policy.model.forward, policy.model.sample_actions):
        assert hasattr(fn, "_torchdynamo_orig_callable"), fn  # what torch.compile returns
    assert not hasattr(load_policy(policy_dir).model.forward, "_torchdynamo_orig_callable")


@pytest.mark.slow
def test_compiled_policy_gives_the_eager_loss(policy_dir):
    """compile_model runs through torch.compile (inductor, needs a C++ compiler) with the same loss. ~1 minute."""
    batch = tiny_batch(load_policy(policy_dir))
    noise, time = torch.randn(3, 10, 32), torch.full((3,), 0.5)
    eager = load_policy(policy_dir)(batch, noise=noise, time=time)[0]
    compiled = load_policy(policy_dir, compile_model=True, compile_mode="default")
    torch.testing.assert_close(compiled(batch, noise=noise, time=time)[0], eager, rtol=1e-4, atol=1e-5)
    use_cpu_linear(compiled, "onednn")  # as training sets it up: the oneDNN linears traced by dynamo
    torch.testing.assert_close(compiled(batch, noise=noise, time=time)[0], eager, rtol=1e-4, atol=1e-5)


def test_dora_rslora_and_per_module_ranks_reach_peft(policy_dir):
    opts = PeftOptions(r=4, lora_alpha=8, use_dora=True, use_rslora=True,
                       rank_pattern={r"model\.action_out_proj": 2}, alpha_pattern={r"model\.action_out_proj": 2})
    model = apply_adapter(load_policy(policy_dir), opts)
    modules = dict(model.named_modules())
    out_proj = modules["base_model.model.model.action_out_proj"]
    q_proj = modules["base_model.model.model.vlm_with_expert.lm_expert.layers.0.self_attn.q_proj"]
    assert out_proj.r["default"] == 2 and q_proj.r["default"] == 4  # the pattern's rank, --peft.r elsewhere
    assert q_proj.scaling["default"] == pytest.approx(8 / 4 ** 0.5)  # rsLoRA: alpha / sqrt(r)
    assert out_proj.scaling["default"] == pytest.approx(2 / 2 ** 0.5)
    magnitudes = [n for n, p in model.named_parameters() if "lora_magnitude_vector" in n and p.requires_grad]
    assert len(magnitudes) == len(lora_wrapped(model))  # DoRA: one trained magnitude vector per adapted layer
    plain = apply_adapter(load_policy(policy_dir), PeftOptions(r=4, lora_alpha=8))
    plain_q = dict(plain.named_modules())["base_model.model.model.vlm_with_expert.lm_expert.layers.0.self_attn.q_proj"]
    assert plain_q.scaling["default"] == pytest.approx(2.0)
    assert not any("lora_magnitude_vector" in n for n, _ in plain.named_parameters())


def test_lora_only_options_are_refused_for_other_methods(policy_dir):
    with pytest.raises(ConfigError, match=r"--peft.use-dora is an option of LORA, not of --peft.method IA3"):
        apply_adapter(load_policy(policy_dir), PeftOptions(method="IA3", use_dora=True))
