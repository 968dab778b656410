"""Helpers shared by the tests (plain functions; fixtures live in conftest.py)."""

from __future__ import annotations

from pathlib import Path

import torch


def tiny_batch(policy, batch_size=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    cfg = policy.config
    batch = {key: torch.rand(batch_size, *cfg.input_features[key]["shape"], generator=g) for key in cfg.image_features}
    batch["observation.state"] = torch.randn(batch_size, cfg.state_dim, generator=g)
    batch["observation.language.tokens"] = torch.randint(2, 500, (batch_size, 7), generator=g)
    mask = torch.ones(batch_size, 7, dtype=torch.bool)
    mask[0, 4:] = False  # one padded instruction
    batch["observation.language.attention_mask"] = mask
    batch["action"] = torch.randn(batch_size, cfg.chunk_size, cfg.action_dim, generator=g)
    pad = torch.zeros(batch_size, cfg.chunk_size, dtype=torch.bool)
    pad[1, -3:] = True
    batch["action_is_pad"] = pad
    return batch


def train_args(policy_dir: Path, dataset_root: Path, output_dir: Path, *extra: str,
               preset: str = "smolvla_lora") -> list[str]:
    """Arguments of a tiny, fast LoRA run (the given preset, smolvla_lora by default, with small sizes)."""
    return [
        preset, "--policy.path", str(policy_dir), "--dataset.root", str(dataset_root),
        "--output-dir", str(output_dir), "--batch-size", "4", "--peft.r", "4", "--optim.warmup-steps", "2",
        "--log-every", "1", "--eval-every", "100", "--eval-batches", "1", "--dataset.eval-episodes", "2",
        "--checkpoint.every", "2", "--seed", "7", "--optim.decay-steps", "4", *extra,
    ]


def policy_train_args(policy_type: str, policy_dir: Path, dataset_root: Path, output_dir: Path,
                      *extra: str) -> list[str]:
    """train_args for a tiny policy of any type: SmolVLA's defaults; pi0 / pi0.5 with their preset's recipe at toy
    size (float32 base on CPU, lr 1e-2; gradient checkpointing stays on, as the preset has it)."""
    if policy_type == "smolvla":
        return train_args(policy_dir, dataset_root, output_dir, *extra)
    return train_args(policy_dir, dataset_root, output_dir, "--policy.dtype", "float32", "--optim.lr", "1e-2", *extra,
                      preset=f"{policy_type}_lora")


def losses(run_dir: Path) -> dict[int, float]:
    """step -> the training loss a run folder logged in metrics.jsonl."""
    from finetune.training.metrics import read_metrics

    return {m["step"]: m["train/loss"] for m in read_metrics(run_dir / "metrics.jsonl") if "train/loss" in m}


# A PaliGemma + Gemma expert with pi0's layout at toy size (the real one: SigLIP So400m, Gemma 2B, Gemma 300M).
TINY_PI_BACKBONE = {
    "vision": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
               "patch_size": 8},
    "paligemma": {"width": 64, "depth": 2, "mlp_dim": 128, "num_heads": 2, "num_kv_heads": 1, "head_dim": 16},
    "action_expert": {"width": 32, "depth": 2, "mlp_dim": 64, "num_heads": 2, "num_kv_heads": 1, "head_dim": 16},
    "vocab_size": 512,
}


def make_tiny_pi_policy(folder: Path, meta, policy_type: str = "pi0", seed: int = 0,
                        variants: tuple[str, str] = ("tiny", "tiny"), backbone: dict | None = None) -> Path:
    """A randomly initialized tiny pi0 / pi0.5 in LeRobot's format (its architecture in vlm_config.json), with the
    demo's tokenizer beside it (as finetune.demo.make_initial_policy does for SmolVLA). `variants`: the names in
    config.json (LeRobot's config accepts only gemma_2b / gemma_300m); vlm_config.json gives the sizes either way.
    `backbone`: the sizes, TINY_PI_BACKBONE by default."""
    from finetune.demo import train_tokenizer
    from finetune.policies import PI0Config, PI05Config, make_policy, save_policy

    config_cls = {"pi0": PI0Config, "pi05": PI05Config}[policy_type]
    cameras = {k: {"type": "VISUAL", "shape": [3, *meta.features[k]["shape"][:2]]} for k in meta.camera_keys}
    state_dim, action_dim = meta.features["observation.state"]["shape"][0], meta.features["action"]["shape"][0]
    config = config_cls(
        input_features={**cameras, "observation.state": {"type": "STATE", "shape": [state_dim]}},
        output_features={"action": {"type": "ACTION", "shape": [action_dim]}},
        chunk_size=10, n_action_steps=10, image_resolution=(32, 32), paligemma_variant=variants[0],
        action_expert_variant=variants[1], tokenizer_max_length=16 if policy_type == "pi0" else 64,
    )
    torch.manual_seed(seed)
    policy = make_policy(config, backbone or TINY_PI_BACKBONE)
    for name, param in policy.named_parameters():  # adaRMS starts as the identity; a pretrained one is not
        if name.endswith("norm.dense.weight"):
            torch.nn.init.normal_(param, std=0.05)
    save_policy(policy, folder)
    train_tokenizer(folder)
    return folder


def set_up_run(argv: list[str]):
    """A run set up exactly as train.main would (resuming from its last checkpoint when argv says --resume)."""
    from finetune import train
    from finetune.config import cli

    cfg = cli(argv)
    accelerator = train.make_accelerator(cfg)
    run = train.setup(cfg, accelerator)
    accelerator._custom_objects.clear()  # the next run in this process registers its own scheduler
    return run


def module_imports(lazy: bool = False) -> dict[str, set[str]]:
    """finetune module -> the finetune modules it imports at module level (and inside functions with `lazy`)."""
    import ast

    root = Path(__file__).resolve().parent.parent
    files = {".".join(p.relative_to(root).with_suffix("").parts).removesuffix(".__init__"): p
             for p in (root / "finetune").rglob("*.py")}
    graph = {}
    for name, path in files.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        targets = set()
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree) if lazy else tree.body:
            if isinstance(node, ast.ImportFrom):
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1]) if node.level else ""
                module = f"{base}.{node.module}" if node.level and node.module else (node.module or base)
                candidates = [module] + [f"{module}.{alias.name}" for alias in node.names]
            elif isinstance(node, ast.Import):
                candidates = [alias.name for alias in node.names]
            else:
                continue
            # a submodule importing its own package is no cycle: the package is always initialized first
            targets |= {c for c in candidates if c in files and c != name and not name.startswith(c + ".")}
        graph[name] = targets
    return graph
