"""Merging an adapter into its base and exporting LeRobot's format; publishing to the Hub (network intercepted)."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest
import torch
from helpers import make_tiny_pi_policy, tiny_batch, train_args
from safetensors import safe_open
from safetensors.torch import load_file

from finetune import train
from finetune.adapters import load_adapter
from finetune.data import load_dataset_meta
from finetune.export import merge
from finetune.policies import POLICIES, load_policy, make_policy, save_policy
from finetune.policies.lerobot_processor import read_processor_stats, read_tokenizer_name
from finetune.policies.processor import load_stats

POLICY_TYPES = sorted(POLICIES)  # every policy the project has (smolvla; pi0 / pi0.5 when present)


def file_layout(folder: Path) -> dict[str, str]:
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        return {k: f.get_slice(k).get_dtype() for k in f.keys()}


@pytest.fixture(scope="module")
def trained(request, tmp_path_factory, policy_dir, dataset_root, lora_run):
    """policy type -> (base folder, last checkpoint) of a tiny LoRA run."""
    runs = {"smolvla": (policy_dir, lora_run / "checkpoints" / "last")}

    def get(policy_type: str) -> tuple[Path, Path]:
        if policy_type not in runs:
            if policy_type not in ("pi0", "pi05"):
                pytest.skip(f"no tiny {policy_type} builder in the tests")
            root = tmp_path_factory.mktemp(f"merge_{policy_type}")
            base = make_tiny_pi_policy(root / f"tiny_{policy_type}", load_dataset_meta(dataset_root), policy_type)
            train.main(train_args(base, dataset_root, root / "run", "--steps", "2", "--policy.dtype", "float32",
                                  "--optim.lr", "1e-2", "--dataset.eval-episodes", "0",
                                  preset="pi05_lora" if policy_type == "pi05" else "pi0_lora"))
            runs[policy_type] = (base, root / "run" / "checkpoints" / "last")
        return runs[policy_type]

    return get


@pytest.mark.parametrize("policy_type", POLICY_TYPES)
def test_merged_policy_equals_base_plus_adapter(trained, policy_type, tmp_path):
    base, ckpt = trained(policy_type)
    out = merge.merge_checkpoint(ckpt, tmp_path / "merged")

    # exactly the base's keys, in the base's dtypes; pi0/pi0.5 add the expert LM head LeRobot's module loads strictly
    expert_head = "model.paligemma_with_expert.gemma_expert.lm_head.weight"
    lerobot_only = {} if policy_type == "smolvla" else {expert_head: "F32"}
    assert file_layout(out) == {**file_layout(base), **lerobot_only}
    merged = load_policy(out).eval()  # loads back through the project's LeRobot-format loader
    trained_config = json.loads((ckpt / "config.json").read_text())
    assert trained_config.pop("use_peft") is True  # LeRobot's flag for an adapter folder; a merged one is not
    if policy_type == "smolvla":  # the tiny VLM travels in vlm/, named so that LeRobot finds it from anywhere
        trained_config["vlm_model_name"] = str((out / "vlm").resolve())
    assert json.loads((out / "config.json").read_text()) == trained_config
    # the tiny tokenizer (no Hub model) too: LeRobot's tokenizer step loads it by absolute path
    assert read_tokenizer_name(out) == str((out / "vlm").resolve()) and (out / "vlm" / "tokenizer.json").is_file()
    with_adapter = load_adapter(load_policy(base), ckpt, trainable=False).eval()
    plain_base = load_policy(base).eval()
    batch = tiny_batch(plain_base)
    noise = torch.randn(3, plain_base.config.chunk_size, plain_base.config.max_action_dim,
                        generator=torch.Generator().manual_seed(0))
    expected = with_adapter.predict_action_chunk(batch, noise=noise)
    torch.testing.assert_close(merged.predict_action_chunk(batch, noise=noise), expected, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(plain_base.predict_action_chunk(batch, noise=noise), expected, atol=1e-4)

    stats = load_stats(out)
    for key, values in load_stats(ckpt).items():
        for stat, tensor in values.items():
            torch.testing.assert_close(stats[key][stat], tensor)
            torch.testing.assert_close(read_processor_stats(out)[key][stat], tensor)  # LeRobot's processor layout
    card = (out / "README.md").read_text()
    assert str(base) in card and "LORA" in card and "## Metrics" in card and "dataset:" in card


def test_lerobot_processor_files_follow_lerobots_pipelines(trained, tmp_path):
    base, ckpt = trained("smolvla")
    out = merge.merge_checkpoint(ckpt, tmp_path / "merged")
    pre = json.loads((out / "policy_preprocessor.json").read_text())
    post = json.loads((out / "policy_postprocessor.json").read_text())
    assert pre["name"] == "policy_preprocessor" and post["name"] == "policy_postprocessor"
    assert [s["registry_name"] for s in pre["steps"]] == [
        "rename_observations_processor", "to_batch_processor", "smolvla_new_line_processor", "tokenizer_processor",
        "device_processor", "normalizer_processor"]
    assert [s["registry_name"] for s in post["steps"]] == ["unnormalizer_processor", "device_processor"]
    normalizer = pre["steps"][5]
    assert normalizer["state_file"] == "policy_preprocessor_step_5_normalizer_processor.safetensors"
    assert normalizer["config"]["norm_map"] == {"VISUAL": "IDENTITY", "STATE": "MEAN_STD", "ACTION": "MEAN_STD"}
    assert set(normalizer["config"]["features"]) == {"observation.images.top", "observation.state", "action"}
    assert post["steps"][0]["state_file"] == "policy_postprocessor_step_0_unnormalizer_processor.safetensors"
    flat = load_file(str(out / post["steps"][0]["state_file"]))
    assert {"action.mean", "action.std", "observation.state.mean"} <= set(flat)
    tokenizer = pre["steps"][3]  # LeRobot passes the name to AutoTokenizer as it is: an absolute path, no artifacts
    assert tokenizer == {"registry_name": "tokenizer_processor", "config": {
        "max_length": 16, "task_key": "task", "padding_side": "right", "padding": "longest", "truncation": True,
        "tokenizer_name": str((out / "vlm").resolve())}}
    assert not (out / "tokenizer").exists()


@pytest.mark.skipif("pi0" not in POLICIES, reason="needs a second policy type")
def test_merge_refuses_a_base_of_another_policy_type(trained, tmp_path):
    _, ckpt = trained("smolvla")
    pi0_base, _ = trained("pi0")
    with pytest.raises(merge.MergeError, match="trained on a 'smolvla' policy but the base .* is a 'pi0' policy"):
        merge.merge_checkpoint(ckpt, tmp_path / "merged", base=str(pi0_base))
    assert not (tmp_path / "merged").exists()


def test_merge_refuses_a_base_with_other_shapes(trained, dataset_root, tmp_path):
    from finetune.demo import TINY_VLM, tiny_smolvla_config

    _, ckpt = trained("smolvla")
    wider = json.loads(json.dumps(TINY_VLM))
    wider["text_config"].update(hidden_size=128, head_dim=16, num_attention_heads=8)
    other = save_policy(make_policy(tiny_smolvla_config(load_dataset_meta(dataset_root)), wider), tmp_path / "other")
    with pytest.raises(merge.MergeError, match="does not fit the base policy .* features, the base has"):
        merge.merge_checkpoint(ckpt, tmp_path / "merged", base=str(other))


def test_merge_refuses_missing_stats_and_a_full_checkpoint(trained, tmp_path, capsys):
    base, ckpt = trained("smolvla")
    broken = tmp_path / "no_stats"
    shutil.copytree(ckpt, broken, ignore=shutil.ignore_patterns("training_state"))
    (broken / "normalization_stats.safetensors").unlink()
    out = merge.merge_checkpoint(broken, tmp_path / "from_processor_files", base=str(base))  # LeRobot's copy of them
    for key, values in load_stats(ckpt).items():
        for stat, tensor in values.items():
            torch.testing.assert_close(load_stats(out)[key][stat], tensor)
    for path in broken.glob("policy_*processor*"):
        path.unlink()
    with pytest.raises(SystemExit):
        merge.main(["--checkpoint", str(broken), "--output-dir", str(tmp_path / "m"), "--base", str(base)])
    assert "no normalization_stats.safetensors and no LeRobot processor files" in capsys.readouterr().err
    with pytest.raises(merge.MergeError, match="nothing to merge"):
        merge.merge_checkpoint(base, tmp_path / "m")


# The frozen linears a quantized base stores in 8 or 4 bits (finetune.quant's scopes, written out here): SigLIP, the
# connector, the VLM's text layers, the expert's layers and the LM head.
INT8_SCOPES = ("model.vlm_with_expert.vlm.model.vision_model.", "model.vlm_with_expert.vlm.model.connector.",
               "model.vlm_with_expert.vlm.model.text_model.layers.", "model.vlm_with_expert.lm_expert.layers.",
               "model.vlm_with_expert.vlm.lm_head.")


def in_int8_scope(module: str) -> bool:
    return (module + ".").startswith(INT8_SCOPES)


def int8_round_trip(weight: torch.Tensor) -> torch.Tensor:
    """LLM.int8's weight storage undone, written independently of bitsandbytes and finetune.quant: the weight in fp16,
    one absmax scale per output row, values rounded to int8 of 127 steps (multiplied by 127 / scale, as bitsandbytes
    does: the ties fall as in its kernel), then scaled back."""
    w16 = weight.to(torch.float16).float()
    scale = w16.abs().amax(dim=1, keepdim=True)
    return torch.round(w16 * (127 / scale)) * scale / 127


# NF4's 16 levels (QLoRA, Dettmers et al. 2023, appendix E): quantiles of N(0, 1) scaled to [-1, 1], exact zero.
NF4_LEVELS = torch.tensor([-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
                           -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
                           0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
                           0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0])


def nf4_round_trip(weight: torch.Tensor, block: int = 64) -> torch.Tensor:
    """NF4 storage undone, written from the QLoRA paper, not from bitsandbytes: the row-major weight cut in blocks of
    64 values, each divided by its absmax, snapped to the nearest NF4 level, multiplied back (absmax kept in float32:
    no double quantization)."""
    flat = weight.float().flatten()
    pad = (-flat.numel()) % block
    blocks = torch.cat([flat, flat.new_zeros(pad)]).view(-1, block)
    absmax = blocks.abs().amax(dim=1, keepdim=True)
    levels = (blocks / absmax).unsqueeze(-1).sub(NF4_LEVELS).abs().argmin(dim=-1)
    return (NF4_LEVELS[levels] * absmax).flatten()[: flat.numel()].view_as(weight)


QUANT_MODES = {  # mode -> (training flags, merge_info label, the storage round trip written in this file)
    "8bit": (("--quant.load-in-8bit",), "8-bit", int8_round_trip),
    "4bit": (("--quant.load-in-4bit", "--quant.compute-dtype", "float32", "--quant.no-double-quant"), "4-bit nf4",
             nf4_round_trip),
}


def test_nf4_round_trip_reference_itself():
    """The test's own NF4 on two blocks of 4: levels hit exactly, each block's absmax kept, values snapped to the
    nearest level (0.5 lies nearer 0.4407 than 0.5626)."""
    w = torch.tensor([[0.5, -1.0, 0.2, 0.0], [0.3, 0.1, -0.05, 0.09]])
    expected = torch.tensor([[0.44070982933044434, -1.0, 0.16093020141124725, 0.0],
                             [0.3, 0.3 * 0.33791524171829224, -0.3 * 0.18477343022823334, 0.3 * 0.33791524171829224]])
    torch.testing.assert_close(nf4_round_trip(w, block=4), expected)


@pytest.mark.parametrize(("mode", "quant_base"), [("8bit", "dequantized"), ("8bit", "original"),
                                                  ("4bit", "dequantized")])
def test_adapter_trained_on_a_quantized_base_merges_into_a_full_precision_base(
        policy_dir, dataset_root, tmp_path_factory, tmp_path, capsys, mode, quant_base):
    """Every merged tensor equals the base weight (the int8 or NF4 round trip, written independently in this file, for
    the quantized linears when merging into the dequantized base) plus the LoRA update B @ A * alpha / r, computed
    here from the files."""
    pytest.importorskip("bitsandbytes")
    flags, label, round_trip = QUANT_MODES[mode]

    run = tmp_path_factory.getbasetemp() / f"merge_{mode}_run"
    if not (run / "checkpoints" / "last").exists():  # one quantized run per mode for every parametrization
        train.main(train_args(policy_dir, dataset_root, run, "--steps", "2", *flags, "--dataset.eval-episodes", "0"))
    ckpt = run / "checkpoints" / "last"
    out = merge.merge_checkpoint(ckpt, tmp_path / "merged", quant_base=quant_base)
    err = capsys.readouterr().err
    assert f"trained on a {label} base" in err
    assert ("dequantizing it before merging" in err) == (quant_base == "dequantized")
    info = json.loads((out / "merge_info.json").read_text())
    assert info["quantized_base"] == label and info["quant_base"] == quant_base
    assert file_layout(out) == file_layout(policy_dir)
    assert all(type(m).__name__ not in ("Linear8bitLt", "Linear4bit") for m in load_policy(out).modules())

    original = load_file(str(policy_dir / "model.safetensors"))
    merged = load_file(str(out / "model.safetensors"))
    adapter = load_file(str(ckpt / "adapter_model.safetensors"))
    adapter_config = json.loads((ckpt / "adapter_config.json").read_text())
    scaling = adapter_config["lora_alpha"] / adapter_config["r"]
    linears = {n for n, m in load_policy(policy_dir).named_modules() if isinstance(m, torch.nn.Linear)}
    adapted = {k.removeprefix("base_model.model.").split(".lora_A.")[0] for k in adapter if ".lora_A." in k}
    assert adapted and any(in_int8_scope(n) for n in adapted)  # expert layers: quantized and adapted
    round_tripped = 0
    for key, weight in original.items():
        module = key.rsplit(".", 1)[0]
        expected = weight
        if quant_base == "dequantized" and key.endswith(".weight") and module in linears and in_int8_scope(module):
            expected = round_trip(weight)
            round_tripped += 1
        if module in adapted and key.endswith(".weight"):
            lora_a = adapter[f"base_model.model.{module}.lora_A.weight"]
            lora_b = adapter[f"base_model.model.{module}.lora_B.weight"]
            expected = expected + (lora_b @ lora_a) * scaling
        torch.testing.assert_close(merged[key], expected, rtol=1e-5, atol=1e-6, msg=key)
    assert round_tripped == (0 if quant_base == "original" else len([n for n in linears if in_int8_scope(n)]))
    key = "model.vlm_with_expert.lm_expert.layers.0.mlp.down_proj.weight"  # quantized, not adapted
    assert torch.equal(merged[key], original[key]) == (quant_base == "original")


# --- publishing -------------------------------------------------------------------------------------------------------


class FakeHub:
    """Stands in for huggingface_hub.HfApi's network methods; records what they were given."""

    def __init__(self, monkeypatch, whoami_error: Exception | None = None):
        from huggingface_hub import HfApi

        self.created, self.uploads = [], []
        self.whoami_error = whoami_error
        monkeypatch.setenv("HF_HUB_OFFLINE", "0")
        monkeypatch.setattr(HfApi, "whoami", self.whoami)
        monkeypatch.setattr(HfApi, "create_repo", self.create_repo)
        monkeypatch.setattr(HfApi, "upload_folder", self.upload_folder)

    def whoami(self, *args, **kwargs):
        if self.whoami_error is not None:
            raise self.whoami_error
        return {"name": "tester"}

    def create_repo(self, repo_id, **kwargs):
        self.created.append((repo_id, kwargs.get("repo_type")))

    def upload_folder(self, *, repo_id, folder_path, **kwargs):
        folder = Path(folder_path)  # a staging copy, gone after the call: record its content now
        files = {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()}
        self.uploads.append({"repo_id": repo_id, "files": files, **kwargs})


def fake_training(lora_run):
    def run_training(cfg, accelerator, sim=None):
        return {"checkpoint": str((lora_run / "checkpoints" / "last").resolve())}

    return run_training


def test_repo_id_pushes_the_checkpoint_and_the_merged_policy(monkeypatch, lora_run, policy_dir, dataset_root,
                                                            tmp_path):
    hub = FakeHub(monkeypatch)
    monkeypatch.setattr(train, "run_training", fake_training(lora_run))  # the push, not the training, is tested
    out = tmp_path / "run"
    summary = train.main(train_args(policy_dir, dataset_root, out, "--steps", "4", "--policy.repo-id", "me/adapter",
                                    "--policy.merged-repo-id", "me/merged"))
    # the tiny SmolVLM is no Hub model: it goes to a repo of its own that the merged policy's names point at
    assert hub.created == [("me/adapter", "model"), ("me/merged-vlm", "model"), ("me/merged", "model")]
    adapter, vlm, merged = hub.uploads
    assert adapter["repo_id"] == "me/adapter" and vlm["repo_id"] == "me/merged-vlm" and merged["repo_id"] == "me/merged"
    assert set(adapter["files"]) == {"adapter_model.safetensors", "adapter_config.json", "config.json",
                                     "normalization_stats.safetensors", "train_config.json", "accelerate_config.yaml",
                                     "trainer_state.json", "README.md", "policy_preprocessor.json",
                                     "policy_postprocessor.json",
                                     "policy_preprocessor_step_5_normalizer_processor.safetensors",
                                     "policy_postprocessor_step_0_unnormalizer_processor.safetensors",
                                     }  # no optimizer state
    assert {"config.json", "tokenizer.json", "preprocessor_config.json", "processor_config.json"} <= set(vlm["files"])
    assert json.loads(merged["files"]["config.json"])["vlm_model_name"] == "me/merged-vlm"
    pushed_pre = json.loads(merged["files"]["policy_preprocessor.json"])
    assert pushed_pre["steps"][3]["config"]["tokenizer_name"] == "me/merged-vlm"
    local = json.loads((out / "merged" / "config.json").read_text())  # the local folder keeps its own names
    assert local["vlm_model_name"] == str((out / "merged" / "vlm").resolve())
    card = adapter["files"]["README.md"].decode()
    assert "library_name: peft" in card and str(policy_dir) in card and "method: LORA, r 4" in card
    last = lora_run / "checkpoints" / "last"
    assert adapter["files"]["adapter_model.safetensors"] == (last / "adapter_model.safetensors").read_bytes()
    assert {"model.safetensors", "config.json", "policy_preprocessor.json", "policy_postprocessor.json",
            "normalization_stats.safetensors", "README.md", "vlm/tokenizer.json"} <= set(merged["files"])
    assert merged["files"]["model.safetensors"] == (out / "merged" / "model.safetensors").read_bytes()
    assert summary["pushed"] == {"adapter": "https://huggingface.co/me/adapter",
                                 "merged": "https://huggingface.co/me/merged"}


def test_repo_id_offline_or_logged_out_fails_before_training(monkeypatch, lora_run, policy_dir, dataset_root,
                                                            tmp_path, capsys):
    trained_runs = []
    monkeypatch.setattr(train, "run_training", lambda cfg, acc: trained_runs.append(cfg))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(SystemExit):
        train.main(train_args(policy_dir, dataset_root, tmp_path / "a", "--policy.repo-id", "me/adapter"))
    assert "HF_HUB_OFFLINE is set" in capsys.readouterr().err

    hub = FakeHub(monkeypatch, whoami_error=OSError("401 Unauthorized"))
    with pytest.raises(SystemExit):
        train.main(train_args(policy_dir, dataset_root, tmp_path / "b", "--policy.repo-id", "me/adapter"))
    assert "hf auth login" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        train.main(train_args(policy_dir, dataset_root, tmp_path / "c", "--policy.repo-id", "not/a/repo"))
    assert "is not a Hub repo id" in capsys.readouterr().err
    assert trained_runs == [] and hub.uploads == [] and not (tmp_path / "a").exists()


def test_merge_cli_pushes_on_request(monkeypatch, trained, tmp_path):
    hub = FakeHub(monkeypatch)
    _, ckpt = trained("smolvla")
    out = merge.main(["--checkpoint", str(ckpt), "--output-dir", str(tmp_path / "merged"), "--push-to", "me/m"])
    assert [u["repo_id"] for u in hub.uploads] == ["me/m-vlm", "me/m"]  # the tiny VLM first, then what names it
    assert "model.safetensors" in hub.uploads[1]["files"] and "tokenizer.json" in hub.uploads[0]["files"]
    assert (out / "model.safetensors").is_file()


def test_config_has_the_push_fields():
    from finetune.config import PolicyOptions

    names = {f.name for f in dataclasses.fields(PolicyOptions)}
    assert {"repo_id", "merged_repo_id"} <= names
