"""pi0 / pi0.5: LeRobot names and sizes, LeRobot-format folders, joint attention, LoRA targets, prompts, bf16 and 4-bit
bases, LeRobot's freezing rules, and what a LoRA run's checkpoint holds. What SmolVLA does alike (KV cache, gradient
checkpointing, sdpa, resume, the saved adapter) is tested for every policy type in test_policy_types.py."""

from __future__ import annotations

import copy
import json
import re

import pytest
import torch
from helpers import losses, tiny_batch
from safetensors.torch import load_file, save_file

from finetune.adapters import apply_adapter
from finetune.config import PRESETS, PeftOptions
from finetune.hub import load_tokenizer
from finetune.policies import (
    PI0Config,
    PI0Policy,
    PI05Config,
    PI05Policy,
    backbone_config_dict,
    load_policy,
    make_policy,
    save_policy,
)
from finetune.policies.common import make_att_2d_masks
from finetune.policies.processor import PolicyProcessor
from finetune.training.metrics import read_metrics

POLICY_TYPES = ["pi0", "pi05"]
CONFIGS = {"pi0": PI0Config, "pi05": PI05Config}
PREFIX = "model.paligemma_with_expert."


@pytest.fixture(scope="module", params=POLICY_TYPES)
def pi_dir(request, tiny_policy):
    return tiny_policy(request.param)


def split_counts(policy) -> dict[str, int]:
    def count(module):
        return sum(p.numel() for p in module.parameters())

    pwe = policy.model.paligemma_with_expert
    pg = pwe.paligemma.model
    return {"vision": count(pg.vision_tower), "multi_modal_projector": count(pg.multi_modal_projector),
            "language_model": count(pg.language_model), "expert": count(pwe.gemma_expert),
            "projections": count(policy) - count(pwe), "total": count(policy)}


@pytest.mark.parametrize("policy_type", POLICY_TYPES)
def test_real_size_parameter_count_split_and_lerobot_keys(policy_type):
    features = {"input_features": {"observation.state": {"type": "STATE", "shape": [8]},
                                   "observation.images.base_0_rgb": {"type": "VISUAL", "shape": [3, 224, 224]}},
                "output_features": {"action": {"type": "ACTION", "shape": [7]}}}
    with torch.device("meta"):
        policy = make_policy(CONFIGS[policy_type](**features))
    counts = split_counts(policy)
    print(policy_type, counts)
    # SigLIP So400m/14 without pooling head, Gemma 2B with its tied embeddings (257152 x 2048), Gemma 300M layers.
    assert counts["vision"] == 412_442_352 and counts["multi_modal_projector"] == 2_361_344
    assert counts["language_model"] == 2_508_531_712
    if policy_type == "pi0":  # 3.238B; LeRobot's unused expert LM head (263M) would make it 3.501B
        assert counts["expert"] == 311_464_960 and counts["projections"] == 3_248_160
        assert counts["total"] == 3_238_048_528
    else:  # adaRMS: each of the expert's 37 norms is a 1024 -> 3072 dense layer instead of a 1024 scale
        assert counts["expert"] == 427_932_672 and counts["projections"] == 2_165_792
        assert counts["total"] == 3_353_433_872
    assert 3.2e9 < counts["total"] < 3.6e9

    keys = set(policy.state_dict())
    expected = [
        PREFIX + "paligemma.model.vision_tower.vision_model.embeddings.patch_embedding.weight",
        PREFIX + "paligemma.model.vision_tower.vision_model.encoder.layers.26.mlp.fc2.weight",
        PREFIX + "paligemma.model.vision_tower.vision_model.post_layernorm.bias",
        PREFIX + "paligemma.model.multi_modal_projector.linear.weight",
        PREFIX + "paligemma.model.language_model.embed_tokens.weight",
        PREFIX + "paligemma.model.language_model.layers.17.self_attn.q_proj.weight",
        PREFIX + "paligemma.model.language_model.norm.weight",
        PREFIX + "paligemma.lm_head.weight",
        PREFIX + "gemma_expert.model.layers.17.self_attn.v_proj.weight",
        PREFIX + "gemma_expert.model.layers.17.mlp.down_proj.weight",
        "model.action_in_proj.weight", "model.action_out_proj.bias",
    ]
    if policy_type == "pi0":
        expected += [PREFIX + "gemma_expert.model.layers.0.input_layernorm.weight",
                     PREFIX + "gemma_expert.model.norm.weight", "model.state_proj.weight",
                     "model.action_time_mlp_in.weight", "model.action_time_mlp_out.bias"]
    else:
        expected += [PREFIX + "gemma_expert.model.layers.0.input_layernorm.dense.weight",
                     PREFIX + "gemma_expert.model.layers.0.post_attention_layernorm.dense.bias",
                     PREFIX + "gemma_expert.model.norm.dense.weight", "model.time_mlp_in.weight",
                     "model.time_mlp_out.bias"]
        assert not any(k.startswith(("model.state_proj", "model.action_time_mlp")) for k in keys)
        assert not any(k.endswith("layernorm.weight") and "gemma_expert" in k for k in keys)
    for key in expected:
        assert key in keys, key
    allowed = ("model.paligemma_with_expert.paligemma.model.vision_tower.vision_model.",
               "model.paligemma_with_expert.paligemma.model.multi_modal_projector.",
               "model.paligemma_with_expert.paligemma.model.language_model.",
               "model.paligemma_with_expert.paligemma.lm_head.", "model.paligemma_with_expert.gemma_expert.model.",
               "model.state_proj.", "model.action_in_proj.", "model.action_out_proj.", "model.action_time_mlp_",
               "model.time_mlp_")
    assert all(k.startswith(allowed) for k in keys), sorted(k for k in keys if not k.startswith(allowed))[:5]
    assert not any("gemma_expert.model.embed_tokens" in k or "gemma_expert.lm_head" in k for k in keys)
    sd = policy.state_dict()
    assert sd[PREFIX + "gemma_expert.model.layers.0.self_attn.k_proj.weight"].shape == (256, 1024)
    assert sd[PREFIX + "paligemma.model.language_model.layers.0.mlp.gate_proj.weight"].shape == (16384, 2048)
    assert backbone_config_dict(policy) is None  # built in: a real LeRobot folder needs no vlm_config.json


def test_unknown_variant_without_side_file_names_the_fix():
    with pytest.raises(ValueError, match="vlm_config.json"):
        make_policy(PI0Config(paligemma_variant="gemma_7b"))


def test_folder_round_trip_gives_identical_tensors(pi_dir, tmp_path):
    data = json.loads((pi_dir / "config.json").read_text())
    assert data["type"] == pi_dir.name.removeprefix("tiny_") and data["chunk_size"] == 10
    assert json.loads((pi_dir / "vlm_config.json").read_text())["paligemma"]["width"] == 64
    policy = load_policy(pi_dir)
    saved = load_file(str(pi_dir / "model.safetensors"))
    assert saved.keys() == policy.state_dict().keys()
    for key, value in policy.state_dict().items():
        assert torch.equal(value, saved[key]), key
    paligemma = policy.model.paligemma_with_expert.paligemma
    assert paligemma.lm_head.weight is paligemma.model.language_model.embed_tokens.weight  # tied again after loading

    save_policy(policy, tmp_path / "again")
    reloaded = load_policy(tmp_path / "again")
    assert reloaded.config.to_dict() == policy.config.to_dict() == data
    for (name, a), (_, b) in zip(policy.state_dict().items(), reloaded.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    batch, noise = tiny_batch(policy), torch.randn(3, 10, 32)
    torch.testing.assert_close(policy.eval().predict_action_chunk(batch, noise=noise),
                               reloaded.eval().predict_action_chunk(batch, noise=noise), rtol=0, atol=0)


def test_loads_the_key_layouts_of_lerobot_and_openpi_files(pi_dir, tmp_path):
    """Keys without the `model.` prefix, only one of PaliGemma's tied embedding / LM head, the expert's LM head."""
    import shutil

    other = tmp_path / "openpi_layout"
    shutil.copytree(pi_dir, other)
    original = load_file(str(pi_dir / "model.safetensors"))
    renamed = {k.removeprefix("model."): v for k, v in original.items()
               if not k.endswith("language_model.embed_tokens.weight")}
    renamed["paligemma_with_expert.gemma_expert.lm_head.weight"] = torch.zeros(512, 32)
    save_file(renamed, str(other / "model.safetensors"))
    policy = load_policy(other)
    for key, value in policy.state_dict().items():
        assert torch.equal(value, original[key]), key


def run_towers(policy, batch, noise, time):
    """Prefix and suffix outputs of the joint transformer for a batch (the training forward's internals)."""
    model = policy.model
    images, img_masks, tokens, masks, state = policy._inputs(batch)
    prefix, prefix_pad, prefix_att = model.embed_prefix(images, img_masks, tokens, masks)
    suffix, suffix_pad, suffix_att, cond = model.embed_suffix(state, noise, time)
    pad = torch.cat([prefix_pad, suffix_pad], dim=1)
    mask = make_att_2d_masks(pad, torch.cat([prefix_att, suffix_att], dim=1))
    (prefix_out, suffix_out), _ = model.paligemma_with_expert(mask, torch.cumsum(pad, dim=1) - 1, [prefix, suffix],
                                                              adarms_cond=[None, cond])
    return prefix_out, suffix_out


def test_joint_attention_mask_prefix_state_and_actions(pi_dir):
    policy = load_policy(pi_dir).eval()
    batch, time = tiny_batch(policy), torch.full((3,), 0.4)
    noise = torch.randn(3, 10, 32)
    changed = noise.clone()
    changed[:, -1] += 1.0  # only the last action token's input changes
    prefix_a, suffix_a = run_towers(policy, batch, noise, time)
    prefix_b, suffix_b = run_towers(policy, batch, changed, time)
    # padding rows attend to nothing: their (unused) outputs are arbitrary
    images = torch.ones(3, prefix_a.shape[1] - 7, dtype=torch.bool)
    real = torch.cat([images, batch["observation.language.attention_mask"]], dim=1)
    torch.testing.assert_close(prefix_a[real], prefix_b[real], rtol=0, atol=0)  # the prefix never sees the suffix
    n_state = 0 if isinstance(policy, PI05Policy) else 1
    torch.testing.assert_close(suffix_a[:, :n_state], suffix_b[:, :n_state], rtol=0, atol=0)  # the state neither
    assert not torch.allclose(suffix_a[:, n_state], suffix_b[:, n_state])  # the first action sees the last one
    # the padded instruction of sample 0 is invisible: changing its padded token ids changes nothing
    padded = dict(batch)
    padded["observation.language.tokens"] = batch["observation.language.tokens"].clone()
    padded["observation.language.tokens"][0, 5] = 3
    prefix_c, suffix_c = run_towers(policy, padded, noise, time)
    torch.testing.assert_close(suffix_a[0], suffix_c[0], rtol=0, atol=0)


def test_prefix_pass_matches_transformers_gemma(pi_dir):
    """Each joint layer computes what transformers' own Gemma layer computes (eager attention, openpi's mask value;
    padding rows included, which only the eager path defines)."""
    policy = load_policy(pi_dir).eval()
    policy.set_attn_implementation("eager")
    model = policy.model
    images, img_masks, tokens, masks, _ = policy._inputs(tiny_batch(policy))
    prefix, pad, att = model.embed_prefix(images, img_masks, tokens, masks)
    mask, positions = make_att_2d_masks(pad, att), torch.cumsum(pad, dim=1) - 1
    (ours, _), _ = model.paligemma_with_expert(mask, positions, [prefix, None])
    language_model = model.paligemma_with_expert.language_model
    language_model.config._attn_implementation = "eager"
    additive = torch.where(mask[:, None], 0.0, -2.3819763e38)
    reference = language_model(inputs_embeds=prefix, attention_mask=additive, position_ids=positions)
    torch.testing.assert_close(ours, reference.last_hidden_state, rtol=1e-6, atol=1e-6)
    # language embeddings are scaled by sqrt(width) exactly once (by the embedding module itself)
    embed = language_model.get_input_embeddings()
    torch.testing.assert_close(model.paligemma_with_expert.embed_language_tokens(tokens),
                               torch.nn.functional.embedding(tokens, embed.weight) * 64**0.5)


def lora_wrapped(model) -> list[str]:
    return sorted(n.removeprefix("base_model.model.") for n, m in model.named_modules()
                  if hasattr(m, "lora_A") and isinstance(m.lora_A, torch.nn.ModuleDict) and m.lora_A)


def test_default_lora_targets_cover_the_same_layers_for_pi0_and_pi05(pi_dir):
    policy = load_policy(pi_dir)
    wrapped = lora_wrapped(apply_adapter(policy, PeftOptions(r=4)))
    expert = [f"{PREFIX}gemma_expert.model.layers.{i}.self_attn.{p}_proj" for i in range(2) for p in "qv"]
    if isinstance(policy, PI05Policy):
        heads = ["action_in_proj", "action_out_proj", "time_mlp_in", "time_mlp_out"]
    else:
        heads = ["action_in_proj", "action_out_proj", "action_time_mlp_in", "action_time_mlp_out", "state_proj"]
    assert wrapped == sorted(expert + [f"model.{h}" for h in heads])
    if isinstance(policy, PI05Policy):
        # every layer pi0's defaults adapt has its pi0.5 counterpart adapted (pi0.5 has no state_proj) ...
        counterpart = {"action_time_mlp_in": "time_mlp_in", "action_time_mlp_out": "time_mlp_out"}
        pi0_heads = ["action_in_proj", "action_out_proj", "action_time_mlp_in", "action_time_mlp_out"]
        assert all(f"model.{counterpart.get(h, h)}" in wrapped for h in pi0_heads)
        # ... which LeRobot's reuse of the pi0 regex misses (lerobot #4494)
        lerobot_pi0 = re.compile(PI0Policy.default_lora_targets)
        names = [n for n, _ in load_policy(pi_dir).named_modules()]
        assert not any(lerobot_pi0.fullmatch(n) for n in names if "time_mlp" in n)


def test_prompts_follow_each_policys_processor(pi_dir):
    policy = load_policy(pi_dir)
    config = policy.config
    state = torch.tensor([[-1.0, -0.99, 0.0, 0.999, 1.0, 1.5, -1.5]])
    if isinstance(policy, PI05Policy):  # LeRobot's processor_pi05: np.digitize over linspace(-1, 1, 257)[:-1], - 1
        assert config.build_prompts(["pick_up the cube\n"], state) == [
            "Task: pick up the cube, State: 0 1 128 255 255 255 -1;\nAction: "]
    else:  # pi0 and SmolVLA: the task with a newline
        assert config.build_prompts(["pick up the cube", "done\n"], state) == ["pick up the cube\n", "done\n"]

    tokenizer = load_tokenizer(pi_dir, None, config.tokenizer_name)
    stats = {"observation.state": {"mean": [0.0, 0.0], "std": [1.0, 1.0], "q01": [-1.0, 0.0], "q99": [1.0, 2.0]},
             "action": {"mean": [0.0, 0.0], "std": [1.0, 1.0], "q01": [-1.0, -1.0], "q99": [1.0, 1.0]}}
    processor = PolicyProcessor(config, tokenizer, stats)
    batch = processor.prepare({"observation.state": torch.tensor([[0.5, 1.0]]), "task": ["move to the red ball"]})
    tokens = batch["observation.language.tokens"]
    assert tokens.shape == (1, config.tokenizer_max_length)  # padded to max_length, as LeRobot's pi processors
    text = tokenizer.decode(tokens[0][batch["observation.language.attention_mask"][0]])
    if isinstance(policy, PI05Policy):  # quantile-normalized state [0.5, 0.0] -> bins 192 and 128
        assert config.normalization_mapping == {"VISUAL": "IDENTITY", "STATE": "QUANTILES", "ACTION": "QUANTILES"}
        assert text == "Task: move to the red ball, State: 192 128;\nAction: "
    else:
        assert config.normalization_mapping["STATE"] == "MEAN_STD"
        assert text == "move to the red ball\n"


def test_tokenizer_without_folder_or_hub_says_which_files(tmp_path):
    assert PI0Config().tokenizer_name == PI05Config().tokenizer_name == "google/paligemma-3b-pt-224"
    with pytest.raises(FileNotFoundError, match=r"paligemma-3b-pt-224.*tokenizer\.json and tokenizer_config\.json"):
        load_tokenizer(tmp_path, None, PI0Config().tokenizer_name)


def test_presets_and_policy_defaults_are_the_published_recipes():
    pi0, pi05 = PRESETS["pi0_lora"][1], PRESETS["pi05_lora"][1]
    for cfg, path, batch in ((pi0, "lerobot/pi0_base", 32), (pi05, "lerobot/pi05_base", 64)):
        assert (cfg.policy.path, cfg.batch_size, cfg.steps, cfg.peft.method) == (path, batch, 30_000, "LORA")
        assert (cfg.policy.dtype, cfg.policy.gradient_checkpointing) == ("bfloat16", True)
        o = cfg.optim  # LeRobot/openpi full fine-tune: 2.5e-5 -> 2.5e-6, x10 for LoRA
        assert (o.lr, o.decay_lr, o.warmup_steps, o.decay_steps, o.grad_clip_norm) == (2.5e-4, 2.5e-5, 1000, 30_000,
                                                                                        1.0)
        assert (o.betas, o.weight_decay) == ((0.9, 0.95), 0.01)
    assert (PI0Config().image_resolution, PI0Config().tokenizer_max_length) == ((224, 224), 48)
    assert (PI05Config().image_resolution, PI05Config().tokenizer_max_length) == ((224, 224), 200)
    assert PI0Config().normalization_mapping["ACTION"] == "MEAN_STD"
    assert PI05Config().normalization_mapping["ACTION"] == "QUANTILES"


# --- training through the script --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def four_steps(pi_dir, straight_run):
    """The straight 4-step LoRA run of the tiny pi0 / pi0.5: (run folder, summary)."""
    return straight_run(pi_dir.name.removeprefix("tiny_"))


def test_lora_training_checkpoints_only_the_adapter(four_steps, pi_dir):
    out, summary = four_steps
    last = out / "checkpoints" / "last"
    adapter = load_file(str(last / "adapter_model.safetensors"))
    n_heads = 4 if pi_dir.name.endswith("pi05") else 5
    assert len(adapter) == 2 * (4 + n_heads)  # A and B for 2 layers x expert q/v and the heads
    assert all(".lora_A." in k or ".lora_B." in k for k in adapter)
    assert json.loads((last / "config.json").read_text())["type"] == pi_dir.name.removeprefix("tiny_")
    assert json.loads((last / "config.json").read_text())["gradient_checkpointing"] is True
    assert not any("model" in p.name for p in (last / "training_state").iterdir())
    assert (last / "adapter_model.safetensors").stat().st_size < 0.2 * (pi_dir / "model.safetensors").stat().st_size
    assert summary["trainable_params"] == sum(t.numel() for t in adapter.values())
    steps = losses(out)
    assert sorted(steps) == [1, 2, 3, 4] and all(v > 0 for v in steps.values())
    evals = [m["eval/action_mse"] for m in read_metrics(out / "metrics.jsonl") if "eval/action_mse" in m]
    assert len(evals) == 2 and evals[1] != evals[0]


def test_bf16_storage_keeps_lerobots_float32_parts(pi_dir):
    policy = load_policy(pi_dir, dtype=torch.bfloat16, num_steps=3)
    assert policy.config.num_inference_steps == 3  # --policy.num-steps sets LeRobot's num_inference_steps
    dtypes = {n: p.dtype for n, p in policy.named_parameters()}
    assert dtypes[PREFIX + "paligemma.model.language_model.layers.0.self_attn.q_proj.weight"] == torch.bfloat16
    assert dtypes[PREFIX + "gemma_expert.model.layers.1.mlp.up_proj.weight"] == torch.bfloat16
    assert dtypes[PREFIX + "paligemma.model.language_model.embed_tokens.weight"] == torch.bfloat16
    for name, dtype in dtypes.items():  # SigLIP, the projector, every norm and the heads stay in float32 (LeRobot)
        if any(s in name for s in ("vision_tower", "multi_modal_projector", "layernorm", ".norm.")) or \
                not name.startswith(PREFIX):
            assert dtype == torch.float32, name
    rotary = policy.model.paligemma_with_expert.language_model.rotary_emb
    assert torch.equal(rotary.inv_freq, rotary.inv_freq.to(torch.bfloat16).float())  # LeRobot's bf16-cast buffers
    batch, noise, time = tiny_batch(policy), torch.randn(3, 10, 32), torch.full((3,), 0.5)
    reference = load_policy(pi_dir)(batch, noise=noise, time=time)[0]
    loss = policy(batch, noise=noise, time=time)[0]
    assert loss.dtype == torch.float32 and abs(loss.item() - reference.item()) < 0.05 * reference.item()
    assert policy.eval().predict_action_chunk(batch, noise=noise).dtype == torch.float32


def bf16_lora_model(policy_type: str, device: str, backbone=None, checkpointing: bool = True, seed: int = 0):
    """(LoRA model, config, image size): default targets, r 64, bf16 base built in bf16 directly (no float32 copy of
    the 3B base), LeRobot's float32 parts kept, trained parameters in float32."""
    image = 224 if backbone is None else 32
    config = CONFIGS[policy_type](
        input_features={"observation.images.base_0_rgb": {"type": "VISUAL", "shape": [3, image, image]},
                        "observation.images.left_wrist_0_rgb": {"type": "VISUAL", "shape": [3, image, image]},
                        "observation.state": {"type": "STATE", "shape": [8]}},
        output_features={"action": {"type": "ACTION", "shape": [7]}}, gradient_checkpointing=checkpointing,
        **({} if backbone is None else {"image_resolution": (32, 32), "paligemma_variant": "tiny",
                                        "action_expert_variant": "tiny"}))
    torch.manual_seed(seed)
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device):
            policy = make_policy(config, backbone)
    finally:
        torch.set_default_dtype(torch.float32)
    for name, param in policy.named_parameters():
        if name.endswith("norm.dense.weight"):  # pi0.5's adaRMS starts as the identity (no time gradient); not so
            torch.nn.init.normal_(param, std=0.05)  # once pretrained
        if any(s in name for s in policy.keep_in_float32):
            param.data = param.data.float()
    policy.apply_storage_dtype(torch.bfloat16)
    model = apply_adapter(policy, PeftOptions(r=64, lora_alpha=64))
    for p in model.parameters():
        if p.requires_grad:
            p.data = p.data.float()
    return model, config, image


def lora_batch(config, image: int, batch_size: int, device: str) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    batch = {key: torch.rand(batch_size, 3, image, image, generator=g) for key in config.image_features}
    batch["observation.state"] = torch.rand(batch_size, 8, generator=g) * 2 - 1
    batch["observation.language.tokens"] = torch.randint(2, 500, (batch_size, config.tokenizer_max_length), generator=g)
    batch["observation.language.attention_mask"] = torch.ones(batch_size, config.tokenizer_max_length, dtype=torch.bool)
    batch["action"] = torch.randn(batch_size, config.chunk_size, 7, generator=g)
    batch["action_is_pad"] = torch.zeros(batch_size, config.chunk_size, dtype=torch.bool)
    return {k: v.to(device) for k, v in batch.items()}


def lora_train_step(policy_type: str, device: str, batch_size: int) -> float:
    """One real-size LoRA step (bf16 base, gradient checkpointing) on random weights; returns the loss."""
    model, config, image = bf16_lora_model(policy_type, device)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=2.5e-4)
    model.train()
    loss, _ = model(lora_batch(config, image, batch_size, device))
    loss.backward()
    optimizer.step()
    assert all(p.grad is not None for p in params)
    return loss.item()


@pytest.mark.parametrize("policy_type", POLICY_TYPES)
def test_lora_step_on_a_bf16_base_with_checkpointing(policy_type):
    """The real-size GPU check below, on the tiny backbone on CPU (same code path): checkpointing recomputes the very
    same bf16 forward (same loss and gradients as without it), the bf16 loss is the float32 loss of the same weights
    to bf16 rounding, and the step moves every adapter matrix and nothing of the base."""
    from helpers import TINY_PI_BACKBONE
    from test_policies import randomize_lora_b

    runs = {}
    for checkpointing in (True, False):
        model, config, image = bf16_lora_model(policy_type, "cpu", TINY_PI_BACKBONE, checkpointing)
        randomize_lora_b(model)  # LoRA B starts at zero; random B gives every A a gradient
        batch = lora_batch(config, image, 2, "cpu")
        noise = torch.randn(2, config.chunk_size, config.max_action_dim, generator=torch.Generator().manual_seed(3))
        time = torch.tensor([0.3, 0.8])
        loss = model.train()(batch, noise=noise, time=time)[0]
        loss.backward()
        runs[checkpointing] = (model, loss.item(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad})
    (model, loss, grads), (_, plain_loss, plain_grads) = runs[True], runs[False]
    assert loss == plain_loss
    assert set(grads) == set(plain_grads)
    assert any("lora_A" in n for n in grads) and any("lora_B" in n for n in grads)
    for name, grad in grads.items():
        assert grad.abs().sum() > 0, name
        torch.testing.assert_close(grad, plain_grads[name], rtol=1e-5, atol=1e-7, msg=name)

    reference = copy.deepcopy(model).float()  # the same (bf16-rounded) weights, computed in float32
    float_loss = reference.train()(batch, noise=noise, time=time)[0].item()
    assert loss == pytest.approx(float_loss, rel=0.03) and loss != float_loss

    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3).step()
    moved = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert moved == set(grads) and all("lora_" in n for n in moved)
    base_bf16 = [n for n, p in model.named_parameters() if p.dtype == torch.bfloat16]
    assert base_bf16 and not moved & set(base_bf16)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("policy_type", POLICY_TYPES)
def test_real_size_lora_step_fits_below_openpis_22_5_gb(policy_type):
    torch.cuda.reset_peak_memory_stats()
    loss = lora_train_step(policy_type, "cuda", batch_size=8)
    peak = torch.cuda.max_memory_allocated()
    print(f"{policy_type}: real-size LoRA step, batch 8, bf16 base, gradient checkpointing: loss {loss:.3f}, "
          f"peak {peak / 2**30:.2f} GiB")
    assert torch.isfinite(torch.tensor(loss)) and peak < 22.5e9


def test_quantized_base_trains_lora(pi_dir):
    """QLoRA-style: both towers' attention/MLP matrices in 4-bit, norms (pi0.5's adaRMS dense) and heads kept."""
    bnb = pytest.importorskip("bitsandbytes")
    from finetune.config import QuantOptions
    from finetune.quant import enable_input_require_grads, quantize_policy

    policy = quantize_policy(load_policy(pi_dir), QuantOptions(load_in_4bit=True, compute_dtype="float32"),
                             torch.device("cpu"), [])
    modules = dict(policy.named_modules())
    assert isinstance(modules[PREFIX + "gemma_expert.model.layers.0.self_attn.q_proj"], bnb.nn.Linear4bit)
    assert isinstance(modules[PREFIX + "paligemma.model.language_model.layers.1.mlp.down_proj"], bnb.nn.Linear4bit)
    assert type(modules[PREFIX + "paligemma.lm_head"]) is torch.nn.Linear  # the (tied) token embeddings
    assert type(modules["model.action_out_proj"]) is torch.nn.Linear
    if isinstance(policy, PI05Policy):
        assert type(modules[PREFIX + "gemma_expert.model.layers.0.input_layernorm.dense"]) is torch.nn.Linear
    enable_input_require_grads(policy)
    policy.set_gradient_checkpointing(True)
    model = apply_adapter(policy, PeftOptions(r=4))
    loss, _ = model(tiny_batch(policy), noise=torch.randn(3, 10, 32), time=torch.full((3,), 0.5))
    loss.backward()
    lora_b = [p for n, p in model.named_parameters() if "lora_B" in n]
    assert lora_b and all(p.grad is not None and p.grad.abs().sum() > 0 for p in lora_b)


@pytest.mark.parametrize(("freeze_vision", "expert_only", "expected_frozen"), [
    (False, False, set()),  # LeRobot's pi0/pi0.5 defaults: a full fine-tune trains everything
    (True, False, {"vision"}),
    (False, True, {"vision", "projector", "language_model", "lm_head"}),
])
def test_full_training_follows_lerobots_pi0_freezing(pi_dir, freeze_vision, expert_only, expected_frozen):
    policy = load_policy(pi_dir, freeze_vision_encoder=freeze_vision, train_expert_only=expert_only)
    model = apply_adapter(policy, PeftOptions(method="FULL"))
    parts = {"vision": PREFIX + "paligemma.model.vision_tower.", "projector": PREFIX + "paligemma.model.multi_modal_",
             "language_model": PREFIX + "paligemma.model.language_model.", "lm_head": PREFIX + "paligemma.lm_head.",
             "expert": PREFIX + "gemma_expert.", "action_in_proj": "model.action_in_proj."}
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    frozen = {part for part, prefix in parts.items() if not any(n.startswith(prefix) for n in names)}
    # lm_head is tied to the token embeddings: frozen exactly when the language model is
    assert frozen - {"lm_head"} == expected_frozen - {"lm_head"}
    assert model.train().model.paligemma_with_expert.paligemma.model.vision_tower.training is not (
        freeze_vision or expert_only)
