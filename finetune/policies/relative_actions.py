"""Relative actions as LeRobot's pi0 / pi0.5 (openpi's DeltaActions): the policy learns and predicts each action of a
chunk minus the state at the chunk's first frame, except for the joints named in `relative_exclude_joints` (the
gripper by default), which stay absolute. Predictions are made absolute again by adding that state back.

LeRobot's rules, kept here: a joint is excluded when an exclude token equals its name or occurs in it (case-blind);
without action names every dimension is relative; the stats the actions are normalized with are computed on the
relative actions of every chunk that lies inside one episode (chunk_size frames from each valid start).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

RAW_STATE = "observation.state.unnormalized"  # the batch key the processor keeps the robot-unit state under


def relative_mask(action_dim: int, action_names: Sequence[str] | None, exclude_joints: Sequence[str]) -> list[bool]:
    """True for the action dimensions made relative."""
    tokens = [str(t).lower() for t in exclude_joints if t]
    if not tokens or action_names is None:
        return [True] * action_dim
    names = [str(n).lower() for n in list(action_names)[:action_dim]]
    mask = [not any(t == n or t in n for t in tokens) for n in names]
    return mask + [True] * (action_dim - len(mask))


def config_mask(config: Any) -> list[bool]:
    return relative_mask(config.action_dim, getattr(config, "action_feature_names", None),
                         getattr(config, "relative_exclude_joints", ()) or ())


def uses_relative_actions(config: Any) -> bool:
    return bool(getattr(config, "use_relative_actions", False))


def _offset(state: Tensor, mask: Sequence[bool], like: Tensor) -> Tensor:
    m = torch.tensor(mask, dtype=like.dtype, device=like.device)
    offset = state[..., : len(mask)].to(like) * m
    return offset.unsqueeze(-2) if like.ndim == 3 else offset


def to_relative(actions: Tensor, state: Tensor, mask: Sequence[bool]) -> Tensor:
    """actions (B, T, A) or (B, A) minus state (B, S>=A) on the masked dimensions."""
    out = actions.clone()
    out[..., : len(mask)] -= _offset(state, mask, actions)
    return out


def to_absolute(actions: Tensor, state: Tensor, mask: Sequence[bool]) -> Tensor:
    """The inverse of to_relative."""
    out = actions.clone()
    out[..., : len(mask)] += _offset(state, mask, actions)
    return out


def action_names(feature: dict) -> list[str] | None:
    """A dataset feature's per-dimension names (LeRobot writes a list, older datasets {"motors": [...]})."""
    names = feature.get("names")
    if isinstance(names, dict):
        names = next(iter(names.values()), None)
    return [str(n) for n in names] if isinstance(names, list) else None


def configure(config: Any, use: bool | None, exclude: Sequence[str] | None, names: list[str] | None) -> str | None:
    """Apply --policy.use-relative-actions / --policy.relative-exclude-joints to a policy config; the error text of a
    combination that cannot work, else None. `names`: the dataset's action names (LeRobot's action_feature_names)."""
    if use is None and exclude is None and not uses_relative_actions(config):
        return None
    if not hasattr(config, "use_relative_actions"):
        if use or exclude is not None:
            return (f"--policy.use-relative-actions: a {config.type} policy has no relative actions (LeRobot offers "
                    "them for pi0 and pi0.5); drop the flag")
        return None
    if use is not None:
        config.use_relative_actions = use
    if exclude is not None:
        config.relative_exclude_joints = list(exclude)
        unmatched = [t for t in exclude if not any(str(t).lower() in n.lower() for n in names or [])]
        if unmatched:
            return (f"--policy.relative-exclude-joints {unmatched} match no action name of the dataset "
                    f"({names or 'it names none'}); give names (or parts of names) of its action dimensions")
    config.action_feature_names = names
    if uses_relative_actions(config):
        mask = config_mask(config)
        if config.state_dim < len(mask) and any(mask[config.state_dim:]):
            return (f"relative actions subtract the state from each action dimension, but the state has "
                    f"{config.state_dim} dims and the action {len(mask)}; exclude the extra action joints with "
                    "--policy.relative-exclude-joints or drop --policy.use-relative-actions")
    return None
