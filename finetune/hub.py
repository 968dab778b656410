"""Local folders first, the Hugging Face Hub only when it is reachable.

Every path option takes a local folder or a Hub id. A Hub id goes through huggingface_hub's cache: downloaded when
online, the cached copy used when offline, and a clear error saying how to pre-download it when neither works.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from finetune.config import ConfigError

REPO_ID_RE = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$|^[A-Za-z0-9][\w.-]*$")


def is_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")


def resolve_repo(path_or_id: str, repo_type: str, what: str) -> Path:
    """A local folder for `path_or_id` (a folder as is, or a Hub repo from the cache / the network)."""
    local = Path(path_or_id).expanduser()
    if local.exists():
        return local
    if path_or_id.startswith((".", "/", "~")) or path_or_id.count("/") != 1:
        raise FileNotFoundError(f"{what} {path_or_id!r} is not a local folder (and not a Hub id like org/name)")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(path_or_id, repo_type=repo_type, local_files_only=is_offline()))
    except Exception as err:  # network errors, missing repo, gated repo: all end in the same advice
        try:
            return Path(snapshot_download(path_or_id, repo_type=repo_type, local_files_only=True))
        except Exception:
            pass
        raise FileNotFoundError(
            f"{what} {path_or_id!r} is neither a local folder nor in the Hugging Face cache, and the Hub could not be "
            f"reached ({type(err).__name__}). On a machine with network run `hf download {path_or_id}"
            f"{' --repo-type dataset' if repo_type == 'dataset' else ''} --local-dir DIR`, copy DIR here and pass "
            "its path."
        ) from None


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


def load_tokenizer(policy_dir: Path | None, tokenizer_path: str | None, vlm_model_name: str | None) -> Any:
    """The tokenizer from --policy.tokenizer-path, else the policy folder, else the local folder its LeRobot processor
    names (a LeRobot checkpoint of one of our exports), else the VLM's Hub id (cache)."""
    from transformers import AutoTokenizer

    from finetune.policies.lerobot_processor import read_tokenizer_name

    processor_names = read_tokenizer_name(policy_dir) if policy_dir is not None else None
    candidates: list[tuple[str, str]] = []
    if tokenizer_path is not None:
        candidates.append(("--policy.tokenizer-path", tokenizer_path))
    elif policy_dir is not None and any((policy_dir / f).is_file() for f in TOKENIZER_FILES):
        candidates.append(("the policy folder", str(policy_dir)))
    elif processor_names is not None and Path(processor_names).is_absolute() and Path(processor_names).is_dir():
        candidates.append(("the folder the policy's LeRobot processor names", processor_names))
    elif vlm_model_name:
        candidates.append(("the VLM's Hub id", vlm_model_name))
    for source, location in candidates:
        try:
            folder = resolve_repo(location, "model", f"tokenizer ({source})")
        except FileNotFoundError:
            if source == "the VLM's Hub id":
                raise FileNotFoundError(
                    f"no tokenizer: the VLM's tokenizer {location!r} is neither a local folder nor in the Hugging Face "
                    f"cache{' (offline)' if is_offline() else ' and the Hub could not be reached'}, and the policy "
                    f"folder {policy_dir} has none ({' and '.join(TOKENIZER_FILES)}); copy the tokenizer files into "
                    "the policy folder or pass --policy.tokenizer-path FOLDER") from None
            raise
        try:
            return AutoTokenizer.from_pretrained(str(folder))
        except (OSError, ValueError) as err:
            raise FileNotFoundError(
                f"could not load the tokenizer from {source} ({location}): {str(err).splitlines()[0]}. A tokenizer "
                f"folder needs {' and '.join(TOKENIZER_FILES)}; pass one with --policy.tokenizer-path."
            ) from None
    raise FileNotFoundError(
        f"no tokenizer: the policy folder {policy_dir} has none of {TOKENIZER_FILES} and no VLM name is set; "
        "pass --policy.tokenizer-path"
    )


def check_can_push(repo_ids: list[str], flag: str) -> None:
    """Raise ConfigError unless every repo id is well formed and the Hub is reachable with a login."""
    if not repo_ids:
        return
    for repo_id in repo_ids:
        if not REPO_ID_RE.match(repo_id):
            raise ConfigError(f"{flag} {repo_id!r} is not a Hub repo id; use NAME or ORG/NAME")
    if is_offline():
        raise ConfigError(f"{flag} {repo_ids[0]}: HF_HUB_OFFLINE is set, so nothing can be pushed to the Hub. Unset "
                          f"HF_HUB_OFFLINE (and log in with `hf auth login`), or drop {flag} and push later with "
                          "`finetune-merge --push-to`.")
    from huggingface_hub import HfApi

    try:
        HfApi().whoami()
    except Exception as err:  # no token, bad token, no network: all need the same fix before a long run
        raise ConfigError(f"{flag} {repo_ids[0]}: the Hugging Face Hub cannot be used ({type(err).__name__}: "
                          f"{err}). Log in with `hf auth login` (or set HF_TOKEN) on a machine with network, or drop "
                          f"{flag}.") from None
