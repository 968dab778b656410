"""Training data as users have it: episode selection, and several datasets sampled as one weighted mixture.

`--dataset.episodes 0-9 12 20-29` trains on a subset (held-out episodes are the last ones of the selection); with
several datasets each entry names its dataset first (`1:0-9`). `--dataset.root A B` reads every dataset at its own
fps, with a rename map per dataset so cameras and state line up, and draws each sample from dataset d with
probability weights[d] (default: proportional to frames, i.e. uniform over the union).
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from finetune.data.lerobot_dataset import DatasetError, DatasetMeta, LeRobotDataset, load_dataset_meta
from finetune.data.stats import aggregate_stats
from finetune.data.v21 import ensure_v30

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


_HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")


def looks_like_hub_id(entry: str) -> bool:
    return bool(_HUB_ID.match(entry)) and not Path(entry).exists() and not entry.startswith(".")


def parse_rename(text: str, position: int) -> dict[str, str]:
    """One dataset's --dataset.renames entry: FEATURE:NAME pairs joined by commas; "-" or "" for none."""
    out: dict[str, str] = {}
    if text.strip() in ("", "-"):
        return out
    for pair in text.split(","):
        src, sep, dst = (p.strip() for p in pair.partition(":"))
        if not sep or not src or not dst:
            raise DatasetError(f"--dataset.renames entry {position} ({text!r}): {pair!r} is not FEATURE:NAME; write "
                               "e.g. observation.images.front:observation.images.top (pairs joined by commas, - for "
                               "none)")
        out[src] = dst
    return out


def check_data_options(options) -> None:
    """Refuse malformed --dataset.* values of this module's flags before anything is loaded."""
    roots = options.roots
    n = max(len(roots), 1)
    for root in roots:
        if not (Path(root) / "meta" / "info.json").is_file() and not looks_like_hub_id(root):
            what = "does not exist" if not Path(root).exists() else "has no meta/info.json"
            raise DatasetError(f"--dataset.root {root} {what}: it must be a LeRobotDataset v3.0 (or v2.1 / v2.0) "
                               "folder, or a Hub dataset id ORG/NAME")
    parse_episodes(options.episodes or (), n)
    if options.weights is not None:
        if len(options.weights) != n:
            raise DatasetError(f"--dataset.weights has {len(options.weights)} value(s) for {n} dataset(s); give one "
                               "per --dataset.root entry")
        if any(not math.isfinite(w) or w < 0 for w in options.weights) or sum(options.weights) <= 0:
            raise DatasetError(f"--dataset.weights {list(options.weights)}: weights must be finite, >= 0 and not all "
                               "0 (they are normalized to sum to 1)")
    if options.renames is not None:
        if len(options.renames) != n:
            raise DatasetError(f"--dataset.renames has {len(options.renames)} entr(ies) for {n} dataset(s); give one "
                               "per --dataset.root entry (- for none)")
        for i, text in enumerate(options.renames):
            parse_rename(text, i)


# --- several datasets -------------------------------------------------------------------------------------------------

def _rename_keys(mapping: Mapping[str, Any], rename: Mapping[str, str]) -> dict[str, Any]:
    return {rename.get(k, k): v for k, v in mapping.items()}


@dataclass
class Source:
    """One dataset of the mixture: where it is, its metadata, and its own rename map (applied before the run's
    --dataset.rename-map)."""

    name: str
    root: Path
    meta: DatasetMeta
    rename: dict[str, str]

    @property
    def view(self) -> DatasetMeta:
        """The metadata under the mixture's common names (features and stats renamed)."""
        return dataclasses.replace(self.meta, features=_rename_keys(self.meta.features, self.rename),
                                   stats=_rename_keys(self.meta.stats, self.rename))

    @property
    def keys(self) -> list[str]:
        """The features training reads, under the dataset's own names."""
        return [*self.meta.camera_keys, self.source_key("observation.state"), self.source_key("action")]

    def source_key(self, name: str) -> str:
        """The dataset's own name of common feature `name`."""
        return next((k for k, v in self.rename.items() if v == name), name)


class DataMix:
    """The datasets of a run (one or several), checked to line up, with their sampling weights."""

    def __init__(self, sources: list[Source], weights: Sequence[float] | None):
        self.sources = sources
        self._weights = weights
        self._check()

    @classmethod
    def load(cls, options, resolve_hub: Callable[[str], Path]) -> DataMix:
        roots = [Path(r) if not looks_like_hub_id(r) else resolve_hub(r) for r in options.roots]
        if not roots:
            roots = [resolve_hub(options.repo_id)]
        renames = [parse_rename(t, i) for i, t in enumerate(options.renames)] if options.renames else [{}] * len(roots)
        sources, seen = [], set()
        for i, (root, rename) in enumerate(zip(roots, renames)):
            name = root.name if root.name not in seen else f"{root.name}_{i}"
            seen.add(name)
            root = ensure_v30(root)  # a v2.x dataset is read through its v3.0 conversion
            sources.append(Source(name, root, load_dataset_meta(root), rename))
        return cls(sources, options.weights)

    def __len__(self) -> int:
        return len(self.sources)

    @property
    def weights(self) -> list[float]:
        """Sampling probability per dataset: --dataset.weights normalized, default proportional to frames."""
        raw = list(self._weights) if self._weights is not None else [s.meta.total_frames for s in self.sources]
        return [w / sum(raw) for w in raw]

    def _check(self) -> None:
        first = self.sources[0]
        ref = first.view
        for i, source in enumerate(self.sources[1:], start=1):
            view = source.view
            for key in ("observation.state", "action"):
                if key not in view.features:
                    raise DatasetError(f"dataset {i} ({source.root}) has no {key!r} (after --dataset.renames); map "
                                       f"its feature to {key!r}")
                mine, theirs = list(view.features[key]["shape"]), list(ref.features.get(key, {}).get("shape", []))
                if mine != theirs:
                    raise DatasetError(f"dataset {i} ({source.root}): {key!r} has shape {mine} but dataset 0 "
                                       f"({first.root}) has {theirs}; datasets trained together need the same "
                                       f"{key} size (one robot layout); train them separately or convert one")
            if sorted(view.camera_keys) != sorted(ref.camera_keys):
                raise DatasetError(f"dataset {i} ({source.root}) has cameras {sorted(view.camera_keys)} but dataset 0 "
                                   f"({first.root}) has {sorted(ref.camera_keys)}; line them up with --dataset.renames "
                                   "(e.g. observation.images.front:observation.images.top)")

    def merged_meta(self) -> DatasetMeta:
        """Dataset 0's metadata under the common names, with the stats of all datasets merged (LeRobot's
        aggregate_stats: weighted by each dataset's count)."""
        if len(self.sources) == 1:
            return self.sources[0].view
        return dataclasses.replace(self.sources[0].view, stats=aggregate_stats([s.view.stats for s in self.sources]))

    def splits(self, episodes: Sequence[str] | None, eval_episodes: int) -> list[tuple[list[int], list[int]]]:
        """(training, held-out) episodes per dataset: the last eval_episodes of each dataset's selection."""
        selections = parse_episodes(episodes or (), len(self.sources))
        return [split_selection([ep["episode_index"] for ep in s.meta.episodes], sel, eval_episodes,
                                f"dataset {s.root}") for s, sel in zip(self.sources, selections)]


class MixtureDataset(torch.utils.data.Dataset):
    """Frames of several datasets under one index (dataset 0's frames first), each item renamed to the common names
    and tagged with `dataset_index`. Each member reads its own files at its own fps."""

    def __init__(self, datasets: Sequence[LeRobotDataset], renames: Sequence[Mapping[str, str]]):
        self.datasets, self.renames = list(datasets), [dict(r) for r in renames]
        self.offsets = np.cumsum([0] + [len(d) for d in self.datasets])

    @property
    def lengths(self) -> list[int]:
        return [len(d) for d in self.datasets]

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def __getitem__(self, i: int) -> dict:
        d = int(np.searchsorted(self.offsets, i, side="right") - 1)
        item = _rename_keys(self.datasets[d][int(i - self.offsets[d])], self.renames[d])
        item["dataset_index"] = d
        return item


class WeightedMixtureSampler(torch.utils.data.Sampler[list[int]]):
    """Endless batches over a MixtureDataset: each sample's dataset is drawn with probability weights[d], its frame
    uniformly within that dataset. Global batch `position` is drawn from a generator seeded by (seed, position), so a
    batch costs O(batch_size), any position can be produced directly (`set_position` resumes exactly), and each rank
    takes its own slice of the same global batch."""

    def __init__(self, lengths: Sequence[int], weights: Sequence[float], batch_size: int, world_size: int = 1,
                 rank: int = 0, seed: int = 0):
        if len(lengths) != len(weights) or any(n < 1 for n in lengths):
            raise ValueError(f"need one weight per non-empty dataset, got lengths {lengths} and weights {weights}")
        self.lengths = np.asarray(lengths, np.int64)
        self.offsets = np.cumsum([0, *lengths[:-1]])
        p = np.asarray(weights, np.float64)
        self.p = p / p.sum()
        self.batch_size, self.world_size, self.rank, self.seed = batch_size, world_size, rank, seed
        self.start = 0

    def set_position(self, batches_seen: int) -> None:
        self.start = batches_seen

    def global_batch(self, position: int) -> np.ndarray:
        rng = np.random.default_rng([self.seed, position])
        size = self.batch_size * self.world_size
        which = rng.choice(len(self.p), size=size, p=self.p)
        frames = (rng.random(size) * self.lengths[which]).astype(np.int64)
        return self.offsets[which] + frames

    def batch_at(self, position: int) -> list[int]:
        begin = self.rank * self.batch_size
        return self.global_batch(position)[begin : begin + self.batch_size].tolist()

    def __iter__(self) -> Iterator[list[int]]:
        position = self.start
        while True:
            yield self.batch_at(position)
            position += 1

    def __len__(self) -> int:  # batches per pass over the union on this rank (the iterator never ends)
        return max(1, int(self.lengths.sum()) // (self.batch_size * self.world_size))
