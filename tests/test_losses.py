"""Each distillation loss: zero on identical inputs, positive otherwise, correct gradients."""

from __future__ import annotations

import pytest
import torch

from edgeq.compress.distill import losses as L


def _logits(seed: int, shape=(2, 5, 11)) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * 2


def _labels(seed: int) -> torch.Tensor:
    return torch.randint(0, 11, (2, 5), generator=torch.Generator().manual_seed(seed))


LOGIT_LOSSES = {
    "forward_kl": lambda s, t: L.forward_kl(s, t),
    "forward_kl_T2": lambda s, t: L.forward_kl(s, t, temperature=2.0),
    "reverse_kl": lambda s, t: L.reverse_kl(s, t),
    "cakld": lambda s, t: L.cakld(s, t, _labels(9)),
    "cakld_nolabels": lambda s, t: L.cakld(s, t),
    "tsld": lambda s, t: L.tsld(s, t, _labels(9)),
}
ACT_LOSSES = {
    "mse": L.block_mse,
    "mse_fisher": lambda s, t: L.block_mse(s, t, _logits(5, s.shape).abs() + 0.1),
    "sw": lambda s, t: L.sliced_wasserstein(s, t, L.random_directions(s.shape[-1], 8, torch.Generator().manual_seed(0), dtype=s.dtype)),
    "mse_sw": lambda s, t: L.mse_sw(s, t, directions=L.random_directions(s.shape[-1], 8, torch.Generator().manual_seed(0), dtype=s.dtype)),
}  # fmt: skip


@pytest.mark.parametrize("name", list(LOGIT_LOSSES) + list(ACT_LOSSES))
def test_zero_on_identical_positive_otherwise(name):
    fn = {**LOGIT_LOSSES, **ACT_LOSSES}[name]
    a, b = _logits(1), _logits(2)
    assert float(fn(a, a.clone())) == pytest.approx(0.0, abs=1e-12)
    assert float(fn(a, b)) > 1e-3


@pytest.mark.parametrize("name", list(LOGIT_LOSSES) + list(ACT_LOSSES))
def test_gradcheck(name):
    fn = {**LOGIT_LOSSES, **ACT_LOSSES}[name]
    s = _logits(3, (2, 3, 7)).requires_grad_()
    t = _logits(4, (2, 3, 7))
    labels_shape_ok = name not in ("cakld", "tsld")
    if not labels_shape_ok:  # these take (2, 5) labels: use matching shapes
        s = _logits(3).requires_grad_()
        t = _logits(4)
    assert torch.autograd.gradcheck(lambda x: fn(x, t), (s,), eps=1e-6, atol=1e-5)


def test_sliced_wasserstein_is_invariant_to_permuting_tokens():
    s, t = _logits(5, (64, 16)), _logits(6, (64, 16))
    u = L.random_directions(16, 8, torch.Generator().manual_seed(1), dtype=torch.float64)
    perm = torch.randperm(64, generator=torch.Generator().manual_seed(2))
    assert float(L.sliced_wasserstein(s[perm], t, u)) == pytest.approx(float(L.sliced_wasserstein(s, t, u)), rel=1e-12)
    # ... while MSE is not: SW compares distributions, MSE compares token by token
    assert float(L.block_mse(s[perm], s)) > 0.1 and float(L.sliced_wasserstein(s[perm], s, u)) < 1e-12


def test_sliced_wasserstein_matches_1d_wasserstein_in_one_dimension():
    x, y = torch.tensor([[0.0], [1.0], [3.0]]), torch.tensor([[2.0], [0.5], [-1.0]])
    # sorted: (0, 1, 3) vs (-1, 0.5, 2): |1| + |0.5| + |1| over 3 tokens
    assert float(L.sliced_wasserstein(x, y, torch.ones(1, 1))) == pytest.approx(2.5 / 3)


def test_cakld_interpolates_by_teacher_confidence():
    s, t = _logits(7), _logits(8)
    beta = float(L.teacher_confidence(t, _labels(9)))
    expect = beta * float(L.reverse_kl(s, t)) + (1 - beta) * float(L.forward_kl(s, t))
    assert float(L.cakld(s, t, _labels(9))) == pytest.approx(expect)
    confident = torch.zeros(2, 5, 11, dtype=torch.float64)
    confident.scatter_(-1, _labels(9).unsqueeze(-1), 50.0)
    assert float(L.teacher_confidence(confident, _labels(9))) == pytest.approx(1.0)


def test_tsld_weights_hard_tokens_more():
    t = torch.zeros(1, 2, 4, dtype=torch.float64)
    t[0, 0, 0] = 10.0  # teacher confident and right on token 0, uniform (hard) on token 1
    labels = torch.tensor([[0, 0]])
    s = t.clone()
    s[0, 0] += torch.tensor([0.0, 1.0, 0.0, 0.0], dtype=torch.float64)
    s_hard = t.clone()
    s_hard[0, 1] += torch.tensor([0.0, 1.0, 0.0, 0.0], dtype=torch.float64)
    # the same perturbation costs more on the hard token than on the easy one
    assert float(L.tsld(s_hard, t, labels, tau=1.0)) > float(L.tsld(s, t, labels, tau=1.0))


def test_saliency_regularizer():
    w = torch.randn(4, 8, dtype=torch.float64)
    g2 = torch.rand(4, 8, dtype=torch.float64)
    assert float(L.saliency_regularizer(w, w.clone(), g2)) == 0.0
    w2 = w.clone()
    w2[0, 0] += 1.0
    assert float(L.saliency_regularizer(w2, w, g2)) == pytest.approx(float(g2[0, 0]))
    assert torch.autograd.gradcheck(lambda x: L.saliency_regularizer(x, w, g2), (w2.clone().requires_grad_(),))


def test_weighted_mse_is_the_weighted_mean_and_unit_weights_change_nothing():
    s, t = _logits(1, (2, 3, 4)), _logits(2, (2, 3, 4))
    assert float(L.block_mse(s, t, torch.ones_like(s))) == pytest.approx(float(L.block_mse(s, t)), rel=1e-12)
    w = torch.zeros_like(s)
    w[0, 1, 2] = 24.0  # all the weight on one element: 24 / 24 elements x its squared error
    assert float(L.block_mse(s, t, w)) == pytest.approx(float((s[0, 1, 2] - t[0, 1, 2]) ** 2), rel=1e-12)
