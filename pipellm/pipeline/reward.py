"""The reward model objective (``objective: reward``): a pair's answers scored by the model's ``ScoreHead``
(``pipellm.models.base``; hidden -> 1 in place of the output projection), the chosen one trained to score higher.

**Scores.** The head scores every position; a sample's reward is the score at its last token
(``PairLabels.last_tokens``), the token transformers' ``*ForSequenceClassification`` pools (the rightmost
non-pad token of a row). Packed rows work the same: attention keeps to each sample, so each sample's last token is
scored as if it were alone in its row.

**Loss** per pair ``-log s(r_chosen - r_rejected - margin)`` (the record's ``margin``, else ``reward.margin``), its
mean over the global batch's pairs through ``PairLabels.loss_scale`` as DPO does; plus the family's auxiliary
loss (mixtral's router balance). No reference model: the trainer skips the reference pass (``uses_reference``).

**Figures** ``rewards/chosen``, ``rewards/rejected`` (mean scores), ``rewards/accuracy`` (share of pairs whose
chosen answer scores higher), ``rewards/margin`` (mean ``r_chosen - r_rejected``); eval: ``eval_`` prefix.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from pipellm.config.schema import Reward as RewardConfig
from pipellm.errors import PipellmError
from pipellm.pipeline.loss import HeadOutput
from pipellm.pipeline.preference import PairLabels, PairwiseObjective

FIGURES = ("rewards/chosen", "rewards/rejected", "rewards/accuracy", "rewards/margin")


def position_scores(output: HeadOutput) -> torch.Tensor:
    """The score of every position of the micro batch, fp32, ``(batch * seq,)``."""
    scores = output.logits if output.logits is not None else F.linear(output.hidden, output.weight)
    return scores.float().reshape(-1)


class RewardModel(PairwiseObjective):
    """``objective: reward`` (see the module docstring)."""

    uses_reference = False
    """The trainer computes no reference log-probs for it."""

    def __init__(self, settings: RewardConfig):
        super().__init__(FIGURES)
        self.settings = settings

    @classmethod
    def from_config(cls, cfg) -> "RewardModel":
        return cls(cfg.reward)

    def loss(self, output: HeadOutput, labels) -> torch.Tensor:
        labels = PairLabels(*labels)
        scores = position_scores(output)
        rewards = scores[labels.last_tokens]
        chosen, rejected = rewards[0::2], rewards[1::2]
        margins = labels.margins[0::2].float()
        margins = torch.where(torch.isnan(margins), self.settings.margin, margins)
        losses = -F.logsigmoid(chosen - rejected - margins)
        # A micro batch of filler rows has no pair: 0, still part of the graph for the backward.
        loss = losses.sum() * labels.loss_scale.float().reshape(()) + scores.sum() * 0.0
        chosen, rejected = chosen.detach(), rejected.detach()
        self.stats.add("train" if torch.is_grad_enabled() else "eval",
                       [chosen, rejected, (chosen > rejected).double(), chosen - rejected])
        return loss if output.aux is None else loss + output.aux


def check_reward_model(objective: str, scores: bool, model_path, source: str) -> None:
    """``objective: reward`` trains a reward checkpoint (``scores``: the model has a score head) and nothing else
    does (before any process group)."""
    if scores and objective != "reward":
        raise PipellmError(f"{source}: `model_path` {model_path} is a reward model (a score head, no output "
                           f"projection); train it with `objective: reward`")
    if objective == "reward" and not scores:
        raise PipellmError(f"{source}: `objective: reward` needs a reward model, but `model_path` {model_path} is a "
                           f"causal LM; start one with `python convert_model.py hg_to_pp --init-reward-head "
                           f"--input-path HF_DIR --save-path DIR` (for train_ds_zero.py, then `pp_to_hg` DIR)")
