"""pi0.5: pi0's towers with adaRMS time conditioning in the expert and the state written into the prompt.

Differences from pi0 (finetune/policies/pi0.py), as LeRobot 0.6 computes them:
- the flow time goes through `time_mlp_in` -> SiLU -> `time_mlp_out` -> SiLU and conditions every expert norm
  (adaRMS: scale, shift and a residual gate from `dense`), instead of being fused into the action tokens;
- no `state_proj` and no state token: the normalized state is discretized into 256 bins and written into the prompt,
  "Task: <task>, State: <bins>;\\nAction: " (LeRobot's processor_pi05.py), tokenized to 200 tokens;
- state and action use quantile normalization (q01/q99 from stats.json).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch.nn.functional as F
from torch import Tensor, nn

from finetune.policies.common import sinusoidal_time_embedding
from finetune.policies.pi0 import PI0Config, PI0FlowMatching, PI0Policy

STATE_BINS = 256


def discretize_state(state: Tensor) -> np.ndarray:
    """openpi's 256-bin discretization of a state normalized to [-1, 1]: bin i holds [-1 + i/128, -1 + (i+1)/128)."""
    edges = np.linspace(-1, 1, STATE_BINS + 1)[:-1]
    return np.digitize(state.detach().cpu().float().numpy(), bins=edges) - 1


@dataclass
class PI05Config(PI0Config):
    """LeRobot's PI05Config fields (same names and defaults)."""

    type: ClassVar[str] = "pi05"
    newer_than_lerobot_0_6: ClassVar[tuple[str, ...]] = (
        "use_visual_memory", "use_proprioceptive_memory", "memory_frames", "memory_stride",
        "memory_temporal_attention_every", "rtc_training_max_delay")

    use_visual_memory: bool = False
    use_proprioceptive_memory: bool = False
    memory_frames: int = 6
    memory_stride: int = 30
    memory_temporal_attention_every: int = 4
    rtc_training_max_delay: int = 0
    tokenizer_max_length: int = 200
    normalization_mapping: dict[str, str] = field(
        default_factory=lambda: {"VISUAL": "IDENTITY", "STATE": "QUANTILES", "ACTION": "QUANTILES"}
    )

    def build_prompts(self, tasks: list[str], state: Tensor | None) -> list[str]:
        """LeRobot's Pi05PrepareStateTokenizerProcessorStep: the task cleaned up, then the discretized state."""
        if state is None:
            raise ValueError("pi0.5 writes the normalized state into its prompt, but the batch has no state")
        state = state[:, -1] if state.ndim == 3 else state
        prompts = []
        for task, bins in zip(tasks, discretize_state(state), strict=True):
            text = task.strip().replace("_", " ").replace("\n", " ")
            prompts.append(f"Task: {text}, State: {' '.join(map(str, bins))};\nAction: ")
        return prompts


class PI05FlowMatching(PI0FlowMatching):
    """LeRobot's `PI05Pytorch`: `time_mlp_in/out` make the adaRMS condition; action tokens are action_in_proj(x_t)."""

    use_adarms: ClassVar[bool] = True
    state_token: ClassVar[bool] = False

    def _init_time_layers(self) -> None:
        self.time_mlp_in = nn.Linear(self.expert_width, self.expert_width)
        self.time_mlp_out = nn.Linear(self.expert_width, self.expert_width)

    def embed_action_tokens(self, noisy_actions: Tensor, time: Tensor) -> tuple[Tensor, Tensor]:
        action_emb = self._linear(self.action_in_proj, noisy_actions)
        time_emb = sinusoidal_time_embedding(time, self.expert_width, self.config.min_period, self.config.max_period)
        time_emb = F.silu(self._linear(self.time_mlp_in, time_emb.to(time.dtype)))
        return action_emb, F.silu(self._linear(self.time_mlp_out, time_emb))


class PI05Policy(PI0Policy):
    """The trainable pi0.5 (same interface as PI0Policy; the state reaches it through the prompt)."""

    config_class: ClassVar[type[PI0Config]] = PI05Config
    flow_matching_class: ClassVar[type[PI0FlowMatching]] = PI05FlowMatching
    # LeRobot reuses pi0's regex for pi0.5, which names action_time_mlp_* and so misses time_mlp_in/out (lerobot
    # #4494); these cover every layer pi0's defaults cover (pi0.5 has no state_proj).
    default_lora_targets = (
        r"(.*\.gemma_expert\..*\.self_attn\.(q|v)_proj|"
        r"model\.(action_in_proj|action_out_proj|time_mlp_in|time_mlp_out))"
    )
    unsupported_fields: ClassVar[dict[str, Any]] = {
        **PI0Policy.unsupported_fields, "use_visual_memory": False, "use_proprioceptive_memory": False,
        "rtc_training_max_delay": 0,
    }
