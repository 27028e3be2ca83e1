"""RLHF formulas on per-token log-probs: KL estimates, shaped rewards, preference and PPO losses.

Every function takes NumPy arrays (computed in float64) or torch tensors (autograd flows; the
result keeps the tensors' floating dtype and device), and is written once against the array API
(``array-api-compat``). The log-probs usually come from :func:`ptx_numba.token_logprobs`; the
exact per-row KL over the vocabulary is :func:`ptx_numba.kl_divergence`.
"""
from .kl import ESTIMATORS, kl_estimate, kl_shaped_reward, log_ratio_penalty, token_level_rewards
from .monitor import TermFrequency, reward_hacking_report, tokenize
from .ppo import ppo_clip_loss
from .preference import bradley_terry_loss, dpo_nll_loss, margin_reward_loss, ranking_pairs

__all__ = [
    "ESTIMATORS",
    "TermFrequency",
    "bradley_terry_loss",
    "dpo_nll_loss",
    "kl_estimate",
    "kl_shaped_reward",
    "log_ratio_penalty",
    "margin_reward_loss",
    "ppo_clip_loss",
    "ranking_pairs",
    "reward_hacking_report",
    "token_level_rewards",
    "tokenize",
]
