"""Round-to-nearest (RTN) weight quantization, optionally with a per-group clipping search.

Pure functions over tensors, on whatever device the weight lives on. Conventions (chosen so that the
codes are the ones llama.cpp's own reference quantizer would pick, see ``gguf.quants``):

* symmetric, 8-bit: restricted range ``q in [-127, 127]``, ``scale = absmax / 127`` (as GGUF ``q8_0``);
* symmetric, <= 4-bit: full range; the element of largest magnitude maps to ``-2**(bits-1)``:
  ``scale = m / -2**(bits-1)`` with ``m`` that element's signed value (as GGUF ``q4_0``); codes are
  ``floor(w / scale + 2**(bits-1) + 0.5)`` clamped to ``[0, 2**bits - 1]``;
* asymmetric: ``scale = (max - min) / (2**bits - 1)`` over a range widened to include 0, integer zero
  ``round(-min / scale)``.

Scales are rounded to fp16 *after* the codes are chosen (the fp16 value is what every format stores).
"""

from __future__ import annotations

import torch

from edgeq.compress.quant import QuantScheme


def _grouped(w: torch.Tensor, scheme: QuantScheme) -> torch.Tensor:
    n, k = w.shape
    gl = scheme.group_len(k)
    scheme.groups(k)  # raises when the group size does not divide K
    return w.float().reshape(n, k // gl, gl)  # (N, G, gl)


def scales_zeros(wg: torch.Tensor, scheme: QuantScheme, clip: torch.Tensor | float = 1.0):
    """fp32 scales and zeros per group of ``wg`` (N, G, gl); ``clip`` shrinks the range (<= 1)."""
    if scheme.sym:
        if scheme.bits == 8:
            absmax = wg.abs().amax(-1) * clip
            scale = absmax / 127.0
        else:
            idx = wg.abs().argmax(-1, keepdim=True)
            signed_max = torch.gather(wg, -1, idx).squeeze(-1) * clip
            scale = signed_max / -float(scheme.sym_zero)
        zero = torch.full_like(scale, float(scheme.sym_zero))
    else:
        wmax = (wg.amax(-1) * clip).clamp(min=0)
        wmin = (wg.amin(-1) * clip).clamp(max=0)
        scale = (wmax - wmin) / scheme.maxq
        safe = torch.where(scale == 0, torch.ones_like(scale), scale)
        zero = torch.round(-wmin / safe).clamp(0, scheme.maxq)
    return scale, zero


def codes_for(wg: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, scheme: QuantScheme) -> torch.Tensor:
    """Integer codes (float tensor of integers) for grouped weights given fp32 scale/zero per group."""
    inv = torch.where(scale == 0, torch.zeros_like(scale), 1.0 / scale)[..., None]
    x = wg * inv
    if scheme.sym and scheme.bits == 8:
        q = torch.sign(x) * torch.floor(x.abs() + 0.5) + zero[..., None]  # roundf: half away from zero
    elif scheme.sym:
        q = torch.floor(x + (zero[..., None] + 0.5))
    else:
        q = torch.round(x) + zero[..., None]
    return q.clamp(0, scheme.maxq)


def fake_quant(wg: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, scheme: QuantScheme) -> torch.Tensor:
    """Quantize-dequantize grouped weights with fp16-rounded scales (what the artifact computes)."""
    q = codes_for(wg, scale, zero, scheme)
    return (q - zero[..., None]) * scale.half().float()[..., None]


def clip_search(
    wg: torch.Tensor,
    scheme: QuantScheme,
    grid: int = 20,
    max_shrink: float = 0.5,
    x_norm: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-group clip ratio in ``[1 - max_shrink, 1]`` minimizing the (activation-weighted) error.

    ``x_norm`` (K,) optionally weights each input column by its mean squared activation, so the
    search minimizes an estimate of the output error rather than the weight error.
    """
    n, g, gl = wg.shape
    weight = torch.ones(g, gl, device=wg.device) if x_norm is None else x_norm.reshape(g, gl).float()
    best_err = torch.full((n, g), float("inf"), device=wg.device)
    best = torch.ones((n, g), device=wg.device)
    for i in range(grid):
        ratio = 1.0 - max_shrink * i / grid
        scale, zero = scales_zeros(wg, scheme, ratio)
        err = ((fake_quant(wg, scale, zero, scheme) - wg) ** 2 * weight).sum(-1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best = torch.where(better, torch.full_like(best, ratio), best)
    return best


def rtn_quantize(
    w: torch.Tensor, scheme: QuantScheme, clip: torch.Tensor | float = 1.0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """RTN codes (uint8, N x K), fp16 scales (N x G) and uint8 zeros (N x G) of ``w`` (N x K)."""
    n, k = w.shape
    wg = _grouped(w, scheme)
    scale, zero = scales_zeros(wg, scheme, clip)
    codes = codes_for(wg, scale, zero, scheme)
    return codes.reshape(n, k).to(torch.uint8), scale.half(), zero.to(torch.uint8)
