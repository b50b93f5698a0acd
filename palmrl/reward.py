"""The reward model: a trunk (PaLM, or a Hugging Face causal LM) plus a head read at the last token.

Objectives (https://arxiv.org/abs/2203.02155 §3.5 and lucidrains' PaLM-rlhf-pytorch):
- pairwise: Bradley-Terry, loss = -log σ(r_chosen - r_rejected - margin); the score is r.
- binned: K rating classes trained with cross-entropy; the score is the expected rating Σ k·p_k.

Pooling: the hidden state of the last response token (its eos), which has read the whole prompt
and reply through causal attention. The reference mean-pools and adds learned prompt/response
embeddings; last-token pooling is what InstructGPT, DeepSpeed-Chat and OpenRLHF use and it needs
no extra parameters, so it is the one offered.

`score(...)` scores tokenised conversations in batches (`score_texts` renders text first, for
best-of-n in `sample` and the report); with `normalise=True` it maps scores to zero mean / unit
variance (`RewardModel.normalised`, which `ppo` calls on its own forward's scores) using the
held-out distribution the reward stage measured and stored in its manifest.
`reward_model_from_checkpoint` rebuilds one from a reward checkpoint folder.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from palmrl import checkpoint
from palmrl.errors import UserError
from palmrl.model.heads import ScalarHead
from palmrl.model.palm import PaLM

OBJECTIVES = ("pairwise", "binned")


class RewardModel(nn.Module):
    def __init__(self, palm: PaLM, *, objective: str = "pairwise", num_bins: int = 5):
        super().__init__()
        if objective not in OBJECTIVES:
            raise UserError(f"reward.objective must be one of {', '.join(OBJECTIVES)}, got '{objective}'")
        self.palm = palm
        self.objective, self.num_bins = objective, num_bins
        self.reward_head = ScalarHead(palm.config.dim, 1 if objective == "pairwise" else num_bins)
        self.register_buffer("score_mean", torch.zeros(()), persistent=False)
        self.register_buffer("score_std", torch.ones(()), persistent=False)

    def forward(self, tokens: Tensor, last: Tensor, attention_mask: Tensor | None = None,
                shared_prefix: int = 0) -> Tensor:
        """Head outputs at each row's `last` position: (B,) for pairwise, (B, K) logits for binned;
        `shared_prefix`: rows that begin alike compute that beginning once (PaLM.trunk)."""
        hidden = self.palm.trunk(tokens, attention_mask=attention_mask, shared_prefix=shared_prefix)  # (B, T, D)
        pooled = hidden[torch.arange(tokens.shape[0], device=tokens.device), last]  # (B, D)
        out = self.reward_head(pooled).float()  # (B, 1) or (B, K)
        return out.squeeze(-1) if self.objective == "pairwise" else out

    def normalised(self, scores: Tensor) -> Tensor:
        """Scores (B,) to zero mean / unit variance over the held-out distribution the reward stage
        measured (`score_mean`, `score_std` from the manifest), on the scores' device."""
        mean, std = self.score_mean.to(scores.device), self.score_std.to(scores.device)
        return (scores - mean) / std.clamp_min(1e-6)

    def scores(self, outputs: Tensor) -> Tensor:
        """Head outputs → scalar scores (B,): r itself, or the expected rating in 1..K."""
        if self.objective == "pairwise":
            return outputs
        ratings = torch.arange(1, self.num_bins + 1, device=outputs.device, dtype=outputs.dtype)
        return (outputs.softmax(-1) * ratings).sum(-1)


class PairwiseLoss(NamedTuple):
    loss: Tensor        # scalar, differentiable
    accuracy: Tensor    # share of pairs with r_chosen > r_rejected (detached)
    margin: Tensor      # mean r_chosen - r_rejected (detached)


def pairwise_loss(chosen: Tensor, rejected: Tensor, margin: float = 0.0) -> PairwiseLoss:
    """Bradley-Terry: -log σ(r_c - r_r - m), (B,) scores in; swapping the halves flips the sign of the gap."""
    gap = chosen.float() - rejected.float()  # (B,)
    loss = -F.logsigmoid(gap - margin).mean()
    return PairwiseLoss(loss, (gap > 0).float().mean().detach(), gap.mean().detach())


class BinnedLoss(NamedTuple):
    loss: Tensor        # scalar cross-entropy over rating classes
    accuracy: Tensor    # argmax class == label (detached)
    rating_mae: Tensor  # |expected rating - true rating| (detached)


def binned_loss(logits: Tensor, labels: Tensor) -> BinnedLoss:
    """Cross-entropy over K classes; labels are 0-based (rating - 1)."""
    logits = logits.float()  # (B, K)
    loss = F.cross_entropy(logits, labels)
    ratings = torch.arange(1, logits.shape[-1] + 1, device=logits.device, dtype=logits.dtype)
    expected = (logits.softmax(-1) * ratings).sum(-1)
    return BinnedLoss(loss, (logits.argmax(-1) == labels).float().mean().detach(),
                      (expected - (labels + 1).float()).abs().mean().detach())


def last_positions(attention_mask: Tensor) -> Tensor:
    """Index of each row's last real token (B,) for left- or right-padded masks."""
    T = attention_mask.shape[1]
    positions = torch.arange(T, device=attention_mask.device).expand_as(attention_mask)
    return torch.where(attention_mask, positions, -1).max(dim=1).values


@torch.no_grad()
def score(model: RewardModel, tokens: Tensor, attention_mask: Tensor, *, normalise: bool = False,
          batch_size: int = 64) -> Tensor:
    """Scalar scores (B,) of full conversations (prompt + response), left- or right-padded; each batch
    runs on the model's device, the scores come back where `tokens` are."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    out = []
    for start in range(0, tokens.shape[0], batch_size):
        t, m = tokens[start:start + batch_size].to(device), attention_mask[start:start + batch_size].to(device)
        out.append(model.scores(model(t, last_positions(m), attention_mask=m)).to(tokens.device))
    model.train(was_training)
    scores = torch.cat(out)
    if normalise:
        scores = model.normalised(scores)
    return scores


def score_texts(model: RewardModel, tokenizer, prompts: Sequence, responses: Sequence[str], *,
                max_len: int, normalise: bool = False) -> Tensor:
    """Score (prompt, response) text pairs rendered with the chat template."""
    from palmrl.data.preferences import RatedResponse, collate_ratings

    batch = collate_ratings(tokenizer, [RatedResponse(p, r, 1) for p, r in zip(prompts, responses)], max_len)
    return score(model, batch.tokens, batch.attention_mask, normalise=normalise)


def reward_model_from_checkpoint(ckpt: checkpoint.Checkpoint) -> RewardModel:
    """Rebuild a reward model (trunk, LoRA `reward` scope if any, head, score statistics)."""

    spec = ckpt.manifest.get("reward")
    if ckpt.stage != "reward" or not spec:
        raise UserError(f"reward: {ckpt.path} is a {ckpt.stage} checkpoint, not a reward model")
    palm = checkpoint.model_from_checkpoint(ckpt)
    model = RewardModel(palm, objective=spec["objective"], num_bins=int(spec.get("num_bins", 5)))
    weights = ckpt.weights()
    head = {k.removeprefix("reward_head."): v for k, v in weights.items() if k.startswith("reward_head.")}
    model.reward_head.load_state_dict(head)
    model.score_mean.fill_(float(spec.get("score_mean", 0.0)))
    model.score_std.fill_(float(spec.get("score_std", 1.0)))
    return model.eval()
