"""Distillation and alignment losses: pure functions over tensors, each zero on identical inputs.

Logit losses take ``student`` and ``teacher`` logits of shape (..., V) and average over positions:

* ``forward_kl``  KL(teacher ‖ student), classic knowledge distillation (mode-covering);
* ``reverse_kl``  KL(student ‖ teacher) (mode-seeking);
* ``cakld``       confidence-aware KL (BitDistiller, Du et al. 2024): ``β·KL(s‖t) + (1−β)·KL(t‖s)``
  with ``β`` the teacher's mean probability of the label tokens (of its own top token without labels),
  so a confident teacher pulls the student towards its modes;
* ``tsld``        token-scaled logit distillation (Kim et al. 2023): per-token KL(t‖s) weighted by
  ``softmax(CE_teacher / τ)`` over the tokens (τ ≈ 10), so tokens the teacher finds hard weigh more.

Activation losses take block outputs (..., D):

* ``block_mse``            mean squared error, optionally weighted per element (Fisher);
* ``sliced_wasserstein``   1-D Wasserstein-1 distances between the token distributions of teacher and
  student projected on ``k`` random unit directions, averaged (Cao, Yin, Aref 2026): it compares the
  *distributions* of activations, so it is invariant to permuting tokens and complements MSE;
* ``saliency_regularizer`` ``Σ g² ⊙ (W_eff − W_orig)²`` with ``g²`` the squared gradients of the task
  loss w.r.t. the original weights (Cao & Aref 2025), keeping salient weights near their originals.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _kl(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """Per-position KL(p ‖ q) from log-probabilities (..., V) -> (...)."""
    return (log_p.exp() * (log_p - log_q)).sum(-1)


def _log_probs(student: torch.Tensor, teacher: torch.Tensor, temperature: float):
    return F.log_softmax(student / temperature, -1), F.log_softmax(teacher / temperature, -1)


def forward_kl(student: torch.Tensor, teacher: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    ls, lt = _log_probs(student, teacher, temperature)
    return _kl(lt, ls).mean() * temperature**2


def reverse_kl(student: torch.Tensor, teacher: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    ls, lt = _log_probs(student, teacher, temperature)
    return _kl(ls, lt).mean() * temperature**2


def teacher_confidence(teacher: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
    """Mean teacher probability of the labels (or of its own top token), detached: CAKLD's β."""
    probs = F.softmax(teacher.detach().float(), -1)
    if labels is None:
        return probs.amax(-1).mean()
    return probs.gather(-1, labels.unsqueeze(-1)).mean()


def cakld(
    student: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor | None = None, beta: torch.Tensor | None = None
) -> torch.Tensor:
    """``beta`` defaults to the teacher's confidence on these logits (pass the global batch's value
    when the batch is sharded over processes)."""
    if beta is None:
        beta = teacher_confidence(teacher, labels)
    ls, lt = _log_probs(student, teacher, 1.0)
    return beta * _kl(ls, lt).mean() + (1 - beta) * _kl(lt, ls).mean()


def tsld_scores(teacher: torch.Tensor, labels: torch.Tensor, tau: float = 10.0) -> torch.Tensor:
    """Per-token ``CE_teacher / τ`` (detached), flattened: the logits of TSLD's token weights."""
    ce = F.cross_entropy(teacher.detach().reshape(-1, teacher.shape[-1]), labels.reshape(-1), reduction="none")
    return ce / tau


def tsld(
    student: torch.Tensor,
    teacher: torch.Tensor,
    labels: torch.Tensor,
    tau: float = 10.0,
    log_normalizer: torch.Tensor | None = None,
) -> torch.Tensor:
    """Token-scaled logit distillation over all positions of (..., V) logits with (...) labels.

    The weights are ``softmax(CE_teacher / τ)`` over these tokens; with ``log_normalizer`` (the
    ``logsumexp`` of the scores over a larger batch these tokens are a shard of) they are that batch's
    weights, and the shards' results add up to the batch's loss.
    """
    ls, lt = _log_probs(student, teacher, 1.0)
    per_token = _kl(lt, ls).reshape(-1)
    scores = tsld_scores(teacher, labels, tau)
    if log_normalizer is None:
        weights = F.softmax(scores, 0)  # sums to 1 over the tokens
    else:
        weights = torch.exp(scores - log_normalizer)
    return (weights * per_token).sum()


def block_mse(student: torch.Tensor, teacher: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    """Mean squared error; with ``weight`` (broadcastable, e.g. BRECQ's per-element Fisher ``g²`` of the
    teacher's output, normalized to mean 1) the weighted mean ``mean(weight ⊙ (student − teacher)²)``."""
    if weight is None:
        return F.mse_loss(student, teacher)
    return (weight * (student - teacher) ** 2).mean()


def random_directions(dim: int, k: int, generator: torch.Generator | None = None, device=None, dtype=None):
    """(dim, k) random unit vectors; resample every step for an unbiased sliced estimate."""
    u = torch.randn(dim, k, generator=generator, device=device, dtype=dtype or torch.float32)
    return u / u.norm(dim=0, keepdim=True)


def sliced_wasserstein(
    student: torch.Tensor, teacher: torch.Tensor, directions: torch.Tensor | None = None, k: int = 16
) -> torch.Tensor:
    """Mean over ``k`` directions of the 1-D W1 distance between projected token distributions.

    ``student`` and ``teacher`` are (..., D) and flattened to (N, D) tokens; ``directions`` (D, k) are
    unit vectors (drawn here when not given).
    """
    s = student.reshape(-1, student.shape[-1])
    t = teacher.reshape(-1, teacher.shape[-1])
    if directions is None:
        directions = random_directions(s.shape[-1], k, device=s.device, dtype=s.dtype)
    return sw_from_projections(s @ directions, t @ directions)


def sw_from_projections(student_proj: torch.Tensor, teacher_proj: torch.Tensor) -> torch.Tensor:
    """SW from (N, k) token projections: per direction, the mean gap of the sorted values, averaged.

    Split from ``sliced_wasserstein`` so that the projections of a batch sharded over processes can be
    gathered first (sorting needs every token of the batch; see ``edgeq.compress.distill.dist``).
    """
    ps = torch.sort(student_proj, dim=0).values  # (N, k)
    pt = torch.sort(teacher_proj, dim=0).values
    return (ps - pt).abs().mean()


def mse_sw(student, teacher, weight: float = 0.1, k: int = 16, directions=None) -> torch.Tensor:
    """The block-reconstruction objective ``MSE + w·SW`` (defaults k = 16, w = 0.1)."""
    return block_mse(student, teacher) + weight * sliced_wasserstein(student, teacher, directions, k)


def saliency_regularizer(w_eff: torch.Tensor, w_orig: torch.Tensor, saliency: torch.Tensor) -> torch.Tensor:
    """``Σ g² ⊙ (W_eff − W_orig)²``; ``saliency`` holds ``g²`` (same shape as the weights)."""
    return (saliency * (w_eff - w_orig) ** 2).sum()
