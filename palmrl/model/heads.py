"""Scalar heads on the PaLM trunk: the reward model's score and PPO's value function.

As in InstructGPT (https://arxiv.org/abs/2203.02155) and lucidrains PaLM-rlhf-pytorch, a head is a
single linear layer on the trunk's final-normed hidden states (the trunk already ends in a
LayerNorm, so the head adds none). The reward model reads it at the last real token of each
sequence (`palmrl.reward.last_positions`); the value head reads it at every token.
"""

from __future__ import annotations

from torch import Tensor, nn


class ScalarHead(nn.Module):
    """Linear map from hidden states to one score (reward, value) or `num_outputs` logits (rating bins).

    Always returns (..., num_outputs): squeeze the last dim of a one-output head for scores.
    """

    def __init__(self, dim: int, num_outputs: int = 1):  # 1 = a scalar score; K > 1 = K rating bins
        super().__init__()
        self.num_outputs = num_outputs
        self.proj = nn.Linear(dim, num_outputs)  # with bias: a value baseline needs an offset
        # zero init: every score starts at 0 (neutral reward, zero value), and the head's own
        # gradient is non-zero, so learning starts at once
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, hidden: Tensor) -> Tensor:
        """hidden (..., D) -> (..., num_outputs)."""
        return self.proj(hidden)
