"""LeRobotDataset reading (v3.0; v2.1 / v2.0 through finetune.data.v21), dataset checks (finetune.data.check), video
helpers and the synthetic reach task."""

from finetune.data.lerobot_dataset import (
    DEFAULT_TOLERANCE_S,
    DatasetError,
    DatasetMeta,
    LeRobotDataset,
    load_dataset_meta,
)
from finetune.data.synthetic import (
    COLORS,
    Scene,
    expert_action,
    instruction,
    is_success,
    make_synthetic_dataset,
    render,
    rollout_expert,
    sample_scene,
    step,
    synthetic_episode,
)
from finetune.data.video import DEFAULT_CODEC, FrameNotFound, VideoFrameReader, decode_video, encode_video

__all__ = [
    "COLORS",
    "DEFAULT_CODEC",
    "DEFAULT_TOLERANCE_S",
    "DatasetError",
    "DatasetMeta",
    "FrameNotFound",
    "LeRobotDataset",
    "Scene",
    "VideoFrameReader",
    "decode_video",
    "encode_video",
    "expert_action",
    "instruction",
    "is_success",
    "load_dataset_meta",
    "make_synthetic_dataset",
    "render",
    "rollout_expert",
    "sample_scene",
    "step",
    "synthetic_episode",
]
