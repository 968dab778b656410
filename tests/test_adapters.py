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


@pytest.mark.parametrize("method", ["LORA", "LOHA", "LOKR", "IA3"])
def test_peft_methods_by_name_train(policy_dir, method):
    model = apply_adapter(load_policy(policy_dir), PeftOptions(method=method, r=4))
    assert isinstance(model, PeftModel) and model.peft_config["default"].peft_type.value == method
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.05)
    loss, _ = model(tiny_batch(load_policy(policy_dir)))
    loss.backward()
    optimizer.step()
    changed = [n for n, p in model.named_parameters() if p.requires_grad and not torch.equal(p, before[n])]
    assert changed, f"{method}: no adapter parameter changed"
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    assert any("lm_expert" in n for n in frozen)
