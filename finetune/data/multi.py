"""Training data as users have it: episode selection, and several datasets sampled as one weighted mixture.

`--dataset.episodes 0-9 12 20-29` trains on a subset (held-out episodes are the last ones of the selection); with
several datasets each entry names its dataset first (`1:0-9`). `--dataset.root A B` reads every dataset at its own
fps, with a rename map per dataset so cameras and state line up, and draws each sample from dataset d with
probability weights[d] (default: proportional to frames, i.e. uniform over the union).
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from .lerobot_dataset import DatasetError

_EPISODE_TOKEN = re.compile(r"^(?:(\d+):)?(\d+)(?:-(\d+))?$")


def parse_episodes(tokens: Sequence[str], num_datasets: int = 1) -> list[list[int] | None]:
    """Per dataset, the selected episode indices (sorted, unique), or None for all of them.

    Tokens: `N`, `A-B` (inclusive), comma-separated lists of those; with several datasets each token is prefixed by
    its dataset's position, `D:N` or `D:A-B`.
    """
    chosen: list[set[int] | None] = [None] * num_datasets
    for token in (t.strip() for part in tokens for t in str(part).split(",")):
        if not token:
            continue
        match = _EPISODE_TOKEN.match(token)
        if match is None:
            raise DatasetError(f"--dataset.episodes {token!r}: expected an episode index N or a range A-B "
                               "(e.g. 0-9 12 20-29)" + (", prefixed with D: for dataset D" if num_datasets > 1 else ""))
        prefix, first, last = match.groups()
        if prefix is None and num_datasets > 1:
            raise DatasetError(f"--dataset.episodes {token!r}: with {num_datasets} datasets name the dataset first, "
                               f"e.g. 0:{token} for the first --dataset.root")
        dataset = int(prefix) if prefix is not None else 0
        if dataset >= num_datasets:
            raise DatasetError(f"--dataset.episodes {token!r}: dataset {dataset} does not exist (there are "
                               f"{num_datasets}, numbered 0..{num_datasets - 1} in --dataset.root order)")
        lo, hi = int(first), int(last) if last is not None else int(first)
        if hi < lo:
            raise DatasetError(f"--dataset.episodes {token!r}: the range ends before it starts; write {hi}-{lo}")
        chosen[dataset] = (chosen[dataset] or set()) | set(range(lo, hi + 1))
    return [sorted(c) if c is not None else None for c in chosen]


def split_selection(episode_ids: Sequence[int], selected: Sequence[int] | None, eval_episodes: int,
                    where: str = "the dataset") -> tuple[list[int], list[int]]:
    """(training episodes, held-out episodes): the last `eval_episodes` of the selection are held out."""
    available = list(episode_ids)
    if selected is None:
        chosen = available
    else:
        unknown = sorted(set(selected) - set(available))
        if unknown:
            shown = unknown[:5] + (["..."] if len(unknown) > 5 else [])
            raise DatasetError(f"--dataset.episodes selects episode(s) {shown} that {where} does not have; its "
                               f"episodes are {min(available)}..{max(available)} ({len(available)} episodes)")
        chosen = sorted(set(selected))
    if eval_episodes >= len(chosen):
        raise DatasetError(f"--dataset.eval-episodes {eval_episodes} leaves no training episode: {where} has "
                           f"{len(chosen)} selected episode(s); lower it or select more episodes")
    cut = len(chosen) - eval_episodes
    return chosen[:cut], chosen[cut:]


def check_data_options(options) -> None:
    """Refuse malformed --dataset.* values of this module's flags before anything is loaded."""
    roots = options.roots
    parse_episodes(options.episodes or (), max(len(roots), 1))
