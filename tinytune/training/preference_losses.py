"""Preference-optimisation losses on sequence log-probabilities (no model code here).

Every function takes per-sequence log-probabilities (summed over a completion's label tokens, or
their per-token average where a loss is length-normalised) and returns per-example losses, so a
caller can average over any window (gradient accumulation, validation set).

Losses (``PreferenceLoss.kind``):
    sigmoid: DPO (Rafailov et al., 2023) with optional label smoothing (cDPO).
    ipo: IPO (Azar et al., 2023, eq. 17) on length-normalised log-ratios, as TRL computes it.
    hinge: SLiC-style hinge on the DPO margin (Zhao et al., 2023).
    robust: rDPO (Chowdhury et al., 2024), unbiased under label noise ``label_smoothing``.
    simpo: SimPO (Meng et al., 2024): no reference, average log-probs, target margin ``gamma``.
    orpo: ORPO (Hong et al., 2024): no reference, SFT loss on the chosen answer plus
        ``beta`` (the paper's lambda) times the odds-ratio term on average log-probs.
KTO (Ethayarajh et al., 2024) works on unpaired examples: :func:`kto_losses`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from tinytune.config import ConfigError

PREFERENCE_LOSSES = ("sigmoid", "ipo", "hinge", "robust", "simpo", "orpo")
REFERENCE_FREE = ("simpo", "orpo")


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """``log(1 - exp(x))`` for ``x < 0``, stable at both ends (Maechler, 2012)."""
    return torch.where(x > -0.6931471805599453, torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def dpo_family_losses(
    kind: str,
    chosen_logratios: torch.Tensor,
    rejected_logratios: torch.Tensor,
    *,
    beta: float,
    label_smoothing: float = 0.0,
    chosen_lengths: torch.Tensor | None = None,
    rejected_lengths: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-pair losses of the reference-based losses.

    Args:
        kind: ``sigmoid``, ``ipo``, ``hinge`` or ``robust``.
        chosen_logratios / rejected_logratios: ``[b]`` ``log pi(y|x) - log ref(y|x)`` (summed log-probs).
        beta: inverse temperature (IPO: the regulariser tau; target margin ``1 / (2 beta)``).
        label_smoothing: sigmoid: cDPO flip probability; robust: the assumed label-noise rate (< 0.5).
        chosen_lengths / rejected_lengths: ``[b]`` label-token counts; IPO divides the log-ratios by them.

    Returns:
        ``[b]`` losses.
    """
    z = beta * (chosen_logratios - rejected_logratios)  # [b]
    if kind == "sigmoid":
        return -F.logsigmoid(z) * (1.0 - label_smoothing) - F.logsigmoid(-z) * label_smoothing
    if kind == "hinge":
        return torch.relu(1.0 - z)
    if kind == "robust":
        eps = label_smoothing
        return (-(1.0 - eps) * F.logsigmoid(z) + eps * F.logsigmoid(-z)) / (1.0 - 2.0 * eps)
    if kind == "ipo":
        if chosen_lengths is None or rejected_lengths is None:
            raise ValueError("ipo: needs the label-token counts of the chosen and rejected answers")
        h = chosen_logratios / chosen_lengths.clamp(min=1) - rejected_logratios / rejected_lengths.clamp(min=1)
        return (h - 1.0 / (2.0 * beta)) ** 2
    raise ValueError(f"unknown reference-based loss {kind!r}")


def simpo_losses(
    chosen_avg_logps: torch.Tensor,
    rejected_avg_logps: torch.Tensor,
    *,
    beta: float,
    gamma: float,
    label_smoothing: float = 0.0,
) -> torch.Tensor:
    """SimPO: ``-log sigmoid(beta * (avg_c - avg_r) - gamma)`` (label smoothing as in cDPO); ``[b]``."""
    z = beta * (chosen_avg_logps - rejected_avg_logps) - gamma
    return -F.logsigmoid(z) * (1.0 - label_smoothing) - F.logsigmoid(-z) * label_smoothing


def orpo_log_odds(chosen_avg_logps: torch.Tensor, rejected_avg_logps: torch.Tensor) -> torch.Tensor:
    """ORPO's log odds ratio ``log(odds_c / odds_r)``, ``odds = p / (1 - p)`` on average log-probs; ``[b]``."""
    dtype = torch.promote_types(chosen_avg_logps.dtype, torch.float32)  # at least fp32
    c, r = chosen_avg_logps.to(dtype), rejected_avg_logps.to(dtype)
    return (c - r) - (log1mexp(c) - log1mexp(r))


def kto_losses(
    chosen_logratios: torch.Tensor,
    rejected_logratios: torch.Tensor,
    kl: torch.Tensor,
    *,
    beta: float,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> torch.Tensor:
    """KTO (eq. 7 of the paper): weighted per-example losses, desirable examples first.

    Args:
        chosen_logratios: ``[n_d]`` log-ratios (policy - reference) of the desirable examples.
        rejected_logratios: ``[n_u]`` the same for undesirable examples.
        kl: scalar reference point ``z0`` (detached, clamped at 0 by the caller: :func:`kto_kl`).
        beta: inverse temperature.
        desirable_weight / undesirable_weight: lambda_D and lambda_U.

    Returns:
        ``[n_d + n_u]`` losses.
    """
    chosen = 1.0 - torch.sigmoid(beta * (chosen_logratios - kl))
    rejected = 1.0 - torch.sigmoid(beta * (kl - rejected_logratios))
    return torch.cat([desirable_weight * chosen, undesirable_weight * rejected])


def bradley_terry_losses(chosen_scores: torch.Tensor, rejected_scores: torch.Tensor) -> torch.Tensor:
    """Reward-model loss (Bradley-Terry): ``-log sigmoid(r_chosen - r_rejected)`` per pair; ``[b]``."""
    return -F.logsigmoid(chosen_scores - rejected_scores)


def kto_kl(policy_mismatched_logps: torch.Tensor, reference_mismatched_logps: torch.Tensor) -> torch.Tensor:
    """KTO's reference point: mean log-ratio over mismatched (prompt, completion) pairs, detached, >= 0."""
    return (policy_mismatched_logps - reference_mismatched_logps).mean().detach().clamp(min=0)


@dataclass(frozen=True)
class PreferenceLoss:
    """A paired preference loss and its parameters.

    Attributes:
        kind: one of :data:`PREFERENCE_LOSSES`.
        beta: inverse temperature (IPO: tau; ORPO: the weight lambda of the odds-ratio term).
        label_smoothing: cDPO flip probability (sigmoid, simpo) or rDPO noise rate (robust); others: 0.
        gamma: SimPO's target reward margin (simpo only).
    """

    kind: str = "sigmoid"
    beta: float = 0.1
    label_smoothing: float = 0.0
    gamma: float = 0.0

    def __post_init__(self):
        if self.kind not in PREFERENCE_LOSSES:
            raise ConfigError(f"loss: unknown preference loss {self.kind!r}; choose from {list(PREFERENCE_LOSSES)}")
        if self.beta <= 0:
            raise ConfigError(f"beta: must be > 0 (got {self.beta})")
        if self.label_smoothing and self.kind not in ("sigmoid", "robust", "simpo"):
            raise ConfigError(f"label_smoothing: not used by loss={self.kind}; remove it or set it to 0")
        if not 0.0 <= self.label_smoothing < (0.5 if self.kind == "robust" else 1.0):
            raise ConfigError(
                f"label_smoothing: must be in [0, {0.5 if self.kind == 'robust' else 1}) "
                f"for loss={self.kind} (got {self.label_smoothing})"
            )
        if self.gamma and self.kind != "simpo":
            raise ConfigError(f"gamma: only loss=simpo uses it (loss={self.kind}); remove it")

    @property
    def needs_reference(self) -> bool:
        """Whether the loss compares against a frozen reference model (False for simpo, orpo)."""
        return self.kind not in REFERENCE_FREE

    @property
    def sft_weight(self) -> float:
        """Weight of the token-mean NLL of the chosen answers added to the loss (1 for orpo, else 0)."""
        return 1.0 if self.kind == "orpo" else 0.0

    def pair_losses(
        self,
        policy_chosen: torch.Tensor,
        policy_rejected: torch.Tensor,
        reference_chosen: torch.Tensor | None,
        reference_rejected: torch.Tensor | None,
        chosen_lengths: torch.Tensor,
        rejected_lengths: torch.Tensor,
    ):
        """Per-pair losses and implicit rewards (the NLL term of ORPO is the caller's: :attr:`sft_weight`).

        Args:
            policy_chosen / policy_rejected: ``[b]`` summed label log-probs under the policy.
            reference_chosen / reference_rejected: ``[b]`` the same under the reference (None if not needed).
            chosen_lengths / rejected_lengths: ``[b]`` label-token counts.

        Returns:
            ``(losses [b], chosen_rewards [b], rejected_rewards [b])``; rewards (detached) as TRL logs
            them: ``beta * (log pi - log ref)``, or ``beta * average log pi`` without a reference.
        """
        if self.needs_reference:
            if reference_chosen is None or reference_rejected is None:
                raise ValueError(f"loss={self.kind} needs reference log-probs")
            c, r = policy_chosen - reference_chosen, policy_rejected - reference_rejected
            losses = dpo_family_losses(
                self.kind,
                c,
                r,
                beta=self.beta,
                label_smoothing=self.label_smoothing,
                chosen_lengths=chosen_lengths,
                rejected_lengths=rejected_lengths,
            )
            return losses, self.beta * c.detach(), self.beta * r.detach()
        c = policy_chosen / chosen_lengths.clamp(min=1)  # average log-prob per label token
        r = policy_rejected / rejected_lengths.clamp(min=1)
        if self.kind == "simpo":
            losses = simpo_losses(c, r, beta=self.beta, gamma=self.gamma, label_smoothing=self.label_smoothing)
        else:  # orpo
            losses = -self.beta * F.logsigmoid(orpo_log_odds(c, r))
        return losses, self.beta * c.detach(), self.beta * r.detach()
