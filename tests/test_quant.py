"""Quantized frozen base (bitsandbytes 8-bit / 4-bit on its CPU backend) with LoRA on top."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import set_up_run, tiny_batch, train_args
from safetensors.torch import load_file

from finetune import train
from finetune.adapters import apply_adapter, base_policy
from finetune.config import ConfigError, PeftOptions, QuantOptions
from finetune.policies import load_policy
from finetune.quant import (
    _quantized_linear,
    dequantize_4bit,
    dequantize_policy,
    enable_input_require_grads,
    quantize_policy,
    weight_bytes,
)
from finetune.training.metrics import read_metrics

bnb = pytest.importorskip("bitsandbytes")
MODES = {"8bit": QuantOptions(load_in_8bit=True), "4bit": QuantOptions(load_in_4bit=True, compute_dtype="float32")}


def quantized(policy_dir, opts, keep=()):
    return quantize_policy(load_policy(policy_dir), opts, torch.device("cpu"), list(keep))


@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("shape", [(48, 720), (96, 80), (64, 128)])
def test_4bit_layer_on_cpu_computes_with_the_nf4_weight(shape, double_quant):
    """The 4-bit weight, dequantized, is the NF4 round trip written independently in tests/test_merge.py, and the
    layer's CPU forward and input gradient use exactly it. Widths 720 and 80 are ones bitsandbytes 0.50's native CPU
    kernel dequantizes wrongly (other blocks' scales), which a 4-bit run on CPU used to train against."""
    from test_merge import nf4_round_trip

    torch.manual_seed(0)
    linear = torch.nn.Linear(shape[1], shape[0])
    layer = _quantized_linear(linear, QuantOptions(load_in_4bit=True, compute_dtype="float32",
                                                   double_quant=double_quant)).to("cpu")
    assert isinstance(layer, bnb.nn.Linear4bit)
    dense = dequantize_4bit(layer.weight)
    expected = nf4_round_trip(linear.weight.detach())
    if double_quant:  # the block scales are themselves 8-bit: each value off by at most ~1% of its block's scale
        torch.testing.assert_close(dense, expected, rtol=0.02, atol=1e-4)
    else:
        torch.testing.assert_close(dense, expected, rtol=1e-6, atol=1e-7)
    x = torch.randn(5, shape[1], requires_grad=True)
    upstream = torch.randn(5, shape[0])
    out = layer(x)
    torch.testing.assert_close(out, x @ dense.T + linear.bias.detach(), rtol=1e-5, atol=1e-5)
    out.backward(upstream)
    torch.testing.assert_close(x.grad, upstream @ dense, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mode", sorted(MODES))
def test_backbone_linears_are_quantized_and_the_rest_stays_full_precision(policy_dir, mode):
    policy = quantized(policy_dir, MODES[mode], keep=["action_out_proj"])
    layer_type = bnb.nn.Linear8bitLt if mode == "8bit" else bnb.nn.Linear4bit
    modules = dict(policy.named_modules())
    quant = {n for n, m in modules.items() if isinstance(m, layer_type)}
    for name in ("model.vlm_with_expert.vlm.model.text_model.layers.0.self_attn.q_proj",
                 "model.vlm_with_expert.lm_expert.layers.3.mlp.down_proj",
                 "model.vlm_with_expert.lm_expert.layers.1.self_attn.k_proj",
                 "model.vlm_with_expert.vlm.model.vision_model.encoder.layers.0.mlp.fc1",
                 "model.vlm_with_expert.vlm.model.connector.modality_projection.proj"):
        assert name in quant, name
    for name in ("model.state_proj", "model.action_in_proj", "model.action_out_proj", "model.action_time_mlp_in"):
        assert type(modules[name]) is torch.nn.Linear, name
    assert type(modules["model.vlm_with_expert.vlm.model.text_model.embed_tokens"]) is torch.nn.Embedding
    assert policy.is_loaded_in_8bit == (mode == "8bit") and policy.is_loaded_in_4bit == (mode == "4bit")
    assert not any(p.requires_grad for p in policy.parameters())
    kept = quantized(policy_dir, QuantOptions(load_in_8bit=True, keep_vision=True))
    vision = [m for n, m in kept.named_modules() if "vision_model" in n and isinstance(m, torch.nn.Linear)]
    assert vision and all(type(m) is torch.nn.Linear for m in vision)


@pytest.mark.parametrize("mode", sorted(MODES))
def test_lora_a_and_b_both_get_gradients_with_checkpointing(policy_dir, mode):
    policy = quantized(policy_dir, MODES[mode])
    enable_input_require_grads(policy)
    policy.set_gradient_checkpointing(True)
    model = apply_adapter(policy, PeftOptions(r=4))
    lora_types = {type(m).__name__ for n, m in model.named_modules() if n.endswith("self_attn.q_proj")}
    assert lora_types == {"Linear8bitLt" if mode == "8bit" else "Linear4bit"}  # PEFT's bitsandbytes LoRA layers
    batch = tiny_batch(load_policy(policy_dir))
    noise, time = torch.randn(3, 10, 32), torch.full((3,), 0.5)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for step in range(12):
        loss, _ = model(batch, noise=noise, time=time)
        loss.backward()
        if step == 1:  # after one update lora_B is non-zero, so lora_A gets gradient too
            grads = {n: p.grad.abs().sum().item() for n, p in model.named_parameters() if p.requires_grad}
            expert_q = [n for n in grads if "lm_expert.layers.0.self_attn.q_proj" in n]
            assert {n.split(".lora_")[1][0] for n in expert_q} == {"A", "B"}
            assert all(grads[n] > 0 for n in expert_q), grads
            assert sum(v > 0 for v in grads.values()) == len(grads)
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert sum(losses[-3:]) / 3 < 0.8 * sum(losses[:3]) / 3, losses


@pytest.mark.parametrize("mode", sorted(MODES))
def test_quantized_base_shrinks_frozen_bytes(policy_dir, mode):
    full = weight_bytes(load_policy(policy_dir, dtype=torch.bfloat16))
    ratio = weight_bytes(quantized(policy_dir, MODES[mode])) / full
    # the tiny model's embeddings and projections are a large share; the real-size figures are in bench/memory.py
    assert ratio < (0.75 if mode == "8bit" else 0.6), ratio


def test_dequantized_policy_matches_the_quantized_one(policy_dir):
    policy = quantized(policy_dir, MODES["8bit"]).eval()
    batch = tiny_batch(load_policy(policy_dir))
    noise = torch.randn(3, 10, 32)
    expected = policy.predict_action_chunk(batch, noise=noise)
    dense = dequantize_policy(policy).eval()
    assert not any(type(m).__name__.startswith("Linear8bit") for m in dense.modules())
    torch.testing.assert_close(dense.predict_action_chunk(batch, noise=noise), expected, rtol=0.05, atol=0.05)


@pytest.mark.parametrize("mode", ["8bit", "4bit"])
def test_quantized_run_checkpoints_adapter_only_resumes_and_reloads(policy_dir, dataset_root, tmp_path, mode):
    flag = "--quant.load-in-8bit" if mode == "8bit" else "--quant.load-in-4bit"
    extra = (flag, "--quant.compute-dtype", "float32", "--policy.gradient-checkpointing")
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    train.main(train_args(policy_dir, dataset_root, straight, "--steps", "4", *extra))
    train.main(train_args(policy_dir, dataset_root, resumed, "--steps", "2", *extra))
    train.main(train_args(policy_dir, dataset_root, resumed, "--steps", "4", "--resume", *extra))
    loss = {d: [m["train/loss"] for m in read_metrics(d / "metrics.jsonl") if "train/loss" in m]
            for d in (straight, resumed)}
    assert loss[resumed] == pytest.approx(loss[straight], rel=1e-4)

    last = straight / "checkpoints" / "last"
    adapter = load_file(str(last / "adapter_model.safetensors"))
    assert adapter and all(".lora_" in k for k in adapter)
    assert all(t.dtype == torch.float32 for t in adapter.values())  # no int8/uint8 base tensors
    assert json.loads((last / "train_config.json").read_text())["quant"]["load_in_" + mode]

    # The saved adapter on a newly quantized base (the resume path) gives the trained policy's logged held-out MSE,
    # which the adapter moved away from the base's.
    evals = [m["eval/action_mse"] for m in read_metrics(straight / "metrics.jsonl") if "eval/action_mse" in m]
    assert len(evals) == 2 and evals[1] != pytest.approx(evals[0], rel=1e-3)
    reloaded = set_up_run(train_args(policy_dir, dataset_root, straight, "--steps", "4", "--resume", *extra))
    assert train.evaluate(reloaded) == pytest.approx(evals[1], rel=1e-5)


def test_conflicting_quant_flags_are_refused(policy_dir, dataset_root, tmp_path, capsys):
    for flags, message in ((["--quant.load-in-8bit", "--quant.load-in-4bit"], "exclude each other"),
                           (["--quant.load-in-8bit", "--peft.method", "FULL"], "cannot be trained in full")):
        with pytest.raises(SystemExit):
            train.main(train_args(policy_dir, dataset_root, tmp_path / "x", "--steps", "1", *flags))
        assert message in capsys.readouterr().err
    with pytest.raises(ConfigError, match="no linear layer to quantize"):
        quantized(policy_dir, QuantOptions(load_in_8bit=True), keep=["model"])


@pytest.mark.parametrize("flag", ["--quant.load-in-4bit", "--quant.load-in-8bit"])
def test_dora_on_a_quantized_base_is_refused_on_cpu(policy_dir, dataset_root, tmp_path, capsys, flag):
    """bitsandbytes' CPU dequantization, which PEFT's DoRA calls for the weight norm, is wrong for many 4-bit widths
    and fails for 8-bit layers: refused before training, and when such an adapter is loaded on a quantized base on
    CPU; DoRA on a float32 base trains."""
    with pytest.raises(SystemExit) as exit_info:
        train.main(train_args(policy_dir, dataset_root, tmp_path / "x", "--steps", "1", flag, "--peft.use-dora"))
    assert exit_info.value.code == 2 and "DoRA on a quantized base does not run on CPU" in capsys.readouterr().err
    assert not (tmp_path / "x" / "checkpoints").exists()
    train.main(train_args(policy_dir, dataset_root, tmp_path / "y", "--steps", "2", "--peft.use-dora"))
    adapter = tmp_path / "y" / "checkpoints" / "last"
    assert json.loads((adapter / "adapter_config.json").read_text())["use_dora"] is True
    assert any("lora_magnitude_vector" in k for k in load_file(str(adapter / "adapter_model.safetensors")))
    from finetune.adapters import quantize_and_attach

    quant = QuantOptions(load_in_4bit=flag.endswith("4bit"), load_in_8bit=flag.endswith("8bit"))
    with pytest.raises(ConfigError, match="DoRA on a quantized base"):
        quantize_and_attach(load_policy(policy_dir), quant, PeftOptions(), torch.device("cpu"), adapter_dir=adapter,
                            trainable=False)


@pytest.mark.parametrize(
    ("opts", "dist_type", "stage", "message"),
    [
        (QuantOptions(load_in_8bit=True), "DEEPSPEED", 3, r"8-bit base under DeepSpeed ZeRO-3 trains with a wrong"),
        (QuantOptions(load_in_4bit=True), "DEEPSPEED", 3, r"needs --quant.storage-dtype equal to the model dtype"),
        (QuantOptions(load_in_4bit=True), "FSDP", None, r"cannot be sharded by FSDP"),
        (QuantOptions(load_in_8bit=True), "FSDP", None, r"cannot be sharded by FSDP"),
    ],
)
def test_quantized_base_refuses_topologies_that_break_it(opts, dist_type, stage, message):
    from finetune.quant import check_quantized_topology

    with pytest.raises(ConfigError, match=message):
        check_quantized_topology(opts, "bfloat16", dist_type, stage)


def test_quantized_base_is_allowed_where_it_works():
    from finetune.quant import check_quantized_topology

    for dist_type, stage in (("NO", None), ("MULTI_GPU", None), ("DEEPSPEED", 2), ("DEEPSPEED", 1)):
        check_quantized_topology(QuantOptions(load_in_8bit=True), "bfloat16", dist_type, stage)
    check_quantized_topology(QuantOptions(load_in_4bit=True, storage_dtype="bfloat16"), "bfloat16", "DEEPSPEED", 3)


def _fixed_batch_losses(run, steps: int) -> list[float]:
    """Train the run's adapter with its own optimizer on one held-out batch, fixed noise and time; the losses."""
    from finetune.policies.processor import images_to_float

    batch = images_to_float(dict(run.data.eval_batches[0].batch))  # held-out batches keep uint8 images
    policy_cfg = base_policy(run.model).config
    generator = torch.Generator().manual_seed(123)
    noise = torch.randn(len(batch["action"]), policy_cfg.chunk_size, policy_cfg.max_action_dim, generator=generator)
    time = torch.rand(len(batch["action"]), generator=generator) * 0.9 + 0.05
    run.model.train()
    losses = []
    for _ in range(steps):
        with run.accelerator.autocast():
            loss, _ = run.model(batch, noise=noise, time=time)
        run.accelerator.backward(loss)
        run.optimizer.step()
        run.optimizer.zero_grad()
        losses.append(loss.item())
    return losses


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["8bit", "4bit"])
def test_real_size_smolvla_trains_on_a_quantized_base_and_resumes(tmp_path_factory, tmp_path, dataset_root, mode):
    """The 450M SmolVLA (random weights, LeRobot's layout) on the demo data: quantized load, LoRA steps that lower
    the loss, an adapter-only checkpoint, exact resume, and a reload that gives the trained policy's outputs.
    About 10 minutes on 2 CPU cores: run with -m slow."""
    from finetune.data import load_dataset_meta
    from finetune.demo import train_tokenizer
    from finetune.policies import SmolVLAConfig, make_policy, save_policy

    folder = tmp_path_factory.mktemp("real") / "smolvla_random"
    meta = load_dataset_meta(dataset_root)
    config = SmolVLAConfig(
        input_features={"observation.images.top": {"type": "VISUAL", "shape": [3, 64, 64]},
                        "observation.state": {"type": "STATE", "shape": [2]}},
        output_features={"action": {"type": "ACTION", "shape": [2]}}, chunk_size=10, n_action_steps=10,
        num_steps=4)
    assert meta.camera_keys == ["observation.images.top"]
    torch.manual_seed(0)
    save_policy(make_policy(config).to(torch.bfloat16), folder)
    train_tokenizer(folder)
    flag = "--quant.load-in-8bit" if mode == "8bit" else "--quant.load-in-4bit"
    common = ("--policy.dtype", "bfloat16", flag, "--policy.gradient-checkpointing", "--dataset.eval-episodes", "2",
              "--optim.lr", "1e-3", "--optim.warmup-steps", "0", "--peft.r", "8", "--optim.decay-steps", "6")
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    summary = train.main(train_args(folder, dataset_root, straight, "--steps", "6", *common))
    train.main(train_args(folder, dataset_root, resumed, "--steps", "3", *common))
    train.main(train_args(folder, dataset_root, resumed, "--steps", "6", "--resume", *common))
    loss = {d: [m["train/loss"] for m in read_metrics(d / "metrics.jsonl") if "train/loss" in m]
            for d in (straight, resumed)}
    assert len(loss[straight]) == 6 and loss[resumed] == pytest.approx(loss[straight], rel=1e-3)
    adapter = load_file(str(straight / "checkpoints/last/adapter_model.safetensors"))
    assert adapter and all(".lora_" in k and t.dtype == torch.float32 for k, t in adapter.items())

    # The LoRA layers on the quantized base learn: the loss on a fixed batch falls under the run's own optimizer.
    fresh = set_up_run(train_args(folder, dataset_root, tmp_path / "fresh", *common))
    assert train.evaluate(fresh) == pytest.approx(summary["eval_mse_before"], rel=1e-4)  # lora_B = 0: the base
    losses = _fixed_batch_losses(fresh, 10)
    assert losses[-1] < 0.9 * losses[0], losses
    # The saved adapter, reloaded onto a newly quantized base, reproduces the trained model's held-out figure.
    reloaded = set_up_run(train_args(folder, dataset_root, straight, "--steps", "6", "--resume", *common))
    assert train.evaluate(reloaded) == pytest.approx(summary["eval_mse_after"], rel=1e-4)


@pytest.mark.parametrize("opts", [QuantOptions(load_in_8bit=True), QuantOptions(load_in_4bit=True),
                                  QuantOptions(load_in_4bit=True, storage_dtype="bfloat16")],
                         ids=["8bit", "4bit_uint8", "4bit_bf16_storage"])
def test_parameter_counts_of_a_quantized_base_are_the_unquantized_counts(policy_dir, opts):
    from finetune.adapters import count_parameters

    full = load_policy(policy_dir)
    expected_total = sum(p.numel() for p in full.parameters())
    policy = quantized(policy_dir, opts)
    assert sum(p.numel() for p in policy.parameters()) != expected_total or opts.load_in_8bit  # packed 4-bit storage
    assert count_parameters(policy) == (0, expected_total)
    model = apply_adapter(policy, PeftOptions(r=4))
    lora = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
    assert lora > 0
    assert count_parameters(model) == (lora, expected_total + lora)
