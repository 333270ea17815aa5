"""A trainable stand-in for a quantized Linear that keeps the codes/scales/zeros contract.

``QATLinear`` computes ``y = x · W_effᵀ (+ b)`` with

    W_eff = (q − zero) · scale      q = codes (fixed),  or  clamp(⌊(W [+ B·A]) / scale⌉ + zero) (STE)

and three parameter groups that can be frozen independently, so *partial retraining* is the choice of
what trains:

* ``scales`` – per-group scales (always representable: the fp16 rounding happens at export);
* ``weights`` – latent float weights, re-rounded each step with a straight-through estimator (codes move);
* ``adapter`` – an optional low-rank adapter ``B·A`` (``B`` zero-initialised) added to the weights
  before rounding (STE), so it is merged into the codes the student computes with.

``export()`` re-derives integer codes from the trained parameters with the fp16 scales every format
stores, so the exported artifact reproduces the student exactly as the run dir describes it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from edgeq.compress.quant import QuantScheme

GROUPS = ("scales", "weights", "adapter")


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """Round in the forward pass, identity in the backward pass."""
    return x + (torch.round(x) - x).detach()


class QATLinear(nn.Module):
    def __init__(
        self,
        weight: torch.Tensor,  # (N, K) the effective (dequantized) weights of the PTQ result
        codes: torch.Tensor,  # (N, K) uint8
        scales: torch.Tensor,  # (N, G)
        zeros: torch.Tensor,  # (N, G)
        scheme: QuantScheme,
        bias: torch.Tensor | None = None,
        rank: int = 0,
    ):
        super().__init__()
        n, k = codes.shape
        self.scheme, self.gl = scheme, scheme.group_len(k)
        self.register_buffer("codes", codes.to(torch.uint8))
        self.register_buffer("zeros", zeros.float())
        self.scales = nn.Parameter(scales.float().clone())
        self.weight_latent = nn.Parameter(weight.float().clone())
        self.bias = None if bias is None else nn.Parameter(bias.detach().float().clone(), requires_grad=False)
        self.rank = rank
        if rank:
            self.lora_a = nn.Parameter(torch.randn(rank, k) / k**0.5)
            self.lora_b = nn.Parameter(torch.zeros(n, rank))
        self.learn_codes = False
        self.set_trainable(("scales",))

    def set_trainable(self, groups: tuple[str, ...]) -> None:
        """Freeze everything but ``groups`` (a subset of ``GROUPS``); 'weights' makes codes move (STE).

        Once the latent weights have been trainable the codes stay derived from them (``learn_codes``
        is sticky): freezing a trained layer must not silently fall back to the PTQ codes.
        """
        unknown = set(groups) - set(GROUPS)
        if unknown:
            raise ValueError(f"unknown parameter groups {sorted(unknown)}; expected some of {GROUPS}")
        self.scales.requires_grad_("scales" in groups)
        self.weight_latent.requires_grad_("weights" in groups)
        self.learn_codes = self.learn_codes or "weights" in groups
        if self.rank:
            self.lora_a.requires_grad_("adapter" in groups)
            self.lora_b.requires_grad_("adapter" in groups)

    def freeze(self) -> None:
        """No parameter trains any more; the layer keeps computing what it computed while training."""
        for p in self.parameters():
            p.requires_grad_(False)

    def _expand(self, t: torch.Tensor) -> torch.Tensor:
        return t.repeat_interleave(self.gl, dim=1)  # (N, G) -> (N, K)

    def quantized_codes(self) -> torch.Tensor:
        """Float codes of the current parameters (differentiable through the STE when codes learn).

        Codes move when the latent weights train (``learn_codes``) or an adapter is present: the
        forward pass then rounds ``latent (+ B·A)`` onto the grid through the STE, so the student
        computes with exactly the codes ``export`` writes (an adapter added after rounding would be
        lost at export, where everything must be integer codes).

        The scales enter the rounding detached: through the STE, ``d[round(W/s)·s]/ds`` would be
        ``round(W/s) − W/s``, the rounding residual, which is float noise (~1e-7) while the latent
        weights sit on the grid they start on; Adam normalizes that noise into full-size steps of
        random sign (measured: 1 and 2 processes diverged by 1e-4 relative after one step). Detached,
        the scales' gradient is the codes', as when only scales train.
        """
        if not (self.learn_codes or self.rank):
            return self.codes.float()
        s = self._expand(self.scales.detach())
        zeros = self._expand(self.zeros)
        latent = self.weight_latent if self.learn_codes else (self.codes.float() - zeros) * s  # on the grid
        if self.rank:
            latent = latent + self.lora_b @ self.lora_a
        safe = torch.where(s.abs() < 1e-12, torch.full_like(s, 1e-12), s)
        return torch.clamp(round_ste(latent / safe) + zeros, 0, self.scheme.maxq)

    def effective_weight(self) -> torch.Tensor:
        return (self.quantized_codes() - self._expand(self.zeros)) * self._expand(self.scales)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.effective_weight().to(x.dtype), self.bias)

    @torch.no_grad()
    def export(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Integer codes (uint8) the student computes with (adapter merged), fp16 scales, uint8 zeros."""
        q = torch.round(self.quantized_codes())  # the fixed codes themselves when nothing moves them
        return q.to(torch.uint8), self.scales.detach().half(), self.zeros.to(torch.uint8)
