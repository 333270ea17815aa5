"""GPTQ: second-order weight quantization of one Linear (Frantar et al., 2022, arXiv 2210.17323).

Given the layer-input Hessian ``H = 2 X Xᵀ / n`` (accumulated by ``HessianAccumulator`` from
calibration activations), columns are quantized one at a time and each column's rounding error is
spread over the not-yet-quantized columns through the upper Cholesky factor of ``H⁻¹``
(the paper's Algorithm 1, eq. 3 / 5):

    err = (w_i - q_i) / U_ii ;  W[:, i:] -= err · U[i, i:]

with lazy batch updates of ``block_size`` columns, dampening ``H += λ·mean(diag H)·I``, dead columns
(``H_ii = 0``) zeroed, and optional act-order (columns by descending ``diag H``). With act-order the
group parameters are *static*: computed from the original weights in natural column order, so every
exported group stays contiguous and no ``g_idx`` is needed.

Scales and zeros follow the RTN conventions of ``edgeq.compress.rtn`` and the rounding error that is
propagated is the one of the fp16-rounded scale, i.e. of the model that will actually be exported.
"""

from __future__ import annotations

import torch

from edgeq.compress.quant import QuantScheme
from edgeq.compress.rtn import codes_for, scales_zeros


class HessianAccumulator:
    """Running ``H = 2/n Σ x xᵀ`` over the rows of a Linear's inputs (any leading shape)."""

    def __init__(self, in_features: int, device: torch.device | str = "cpu"):
        self.H = torch.zeros(in_features, in_features, dtype=torch.float32, device=device)
        self.n = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).to(self.H.device, torch.float32)  # (rows, K)
        rows = x.shape[0]
        self.H.mul_(self.n / (self.n + rows))
        self.n += rows
        x = x * (2.0 / self.n) ** 0.5
        self.H.addmm_(x.T, x)


def _group_params(w: torch.Tensor, scheme: QuantScheme) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 scale and zero (N,) of a block of columns ``w`` (N, cols) treated as one group."""
    scale, zero = scales_zeros(w[:, None, :], scheme)
    return scale[:, 0], zero[:, 0]


def _quant_column(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, scheme: QuantScheme):
    """Codes (float ints) and dequantized values with the fp16 scale, for one column (N,)."""
    q = codes_for(w[:, None, None], scale[:, None], zero[:, None], scheme)[:, 0, 0]
    return q, (q - zero) * scale.half().float()


def _inverse_cholesky(H: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factor of the dampened ``H⁻¹``; retries with more damping if not PD."""
    eye = torch.eye(H.shape[0], device=H.device, dtype=H.dtype)
    mean_diag = torch.mean(torch.diag(H))
    for factor in (1, 10, 100, 1000):
        try:
            L = torch.linalg.cholesky(H + damp * factor * mean_diag * eye)
            return torch.linalg.cholesky(torch.cholesky_inverse(L), upper=True)
        except torch.linalg.LinAlgError:
            continue
    raise torch.linalg.LinAlgError("Hessian is not positive definite even with 1000x dampening")


def gptq_quantize(
    weight: torch.Tensor,
    H: torch.Tensor,
    scheme: QuantScheme,
    damp: float = 0.01,
    block_size: int = 128,
    act_order: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """GPTQ codes (uint8 N x K), fp16 scales (N x G) and uint8 zeros (N x G) of ``weight`` (N x K)."""
    W = weight.detach().clone().float()
    N, K = W.shape
    gl, G = scheme.group_len(K), scheme.groups(K)
    H = H.detach().clone().float().to(W.device)
    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0

    scales = torch.zeros(N, G, device=W.device)
    zeros = torch.zeros(N, G, device=W.device)
    static = act_order or G == 1  # per-channel params always come from the full original row
    if static:
        for g in range(G):
            scales[:, g], zeros[:, g] = _group_params(W[:, g * gl : (g + 1) * gl], scheme)
    perm = torch.argsort(torch.diag(H), descending=True) if act_order else torch.arange(K, device=W.device)
    W, H = W[:, perm], H[perm][:, perm]
    U = _inverse_cholesky(H, damp)
    if not static:
        block_size = max(gl, (block_size // gl) * gl)  # whole groups per lazy block

    codes = torch.zeros(N, K, device=W.device)
    for i1 in range(0, K, block_size):
        i2 = min(i1 + block_size, K)
        W1 = W[:, i1:i2].clone()
        E1 = torch.zeros_like(W1)
        for i in range(i2 - i1):
            col = int(perm[i1 + i])
            g = col // gl
            if not static and col % gl == 0:  # dynamic groups: params from the updated weights
                scales[:, g], zeros[:, g] = _group_params(W1[:, i : i + gl], scheme)
            q, deq = _quant_column(W1[:, i], scales[:, g], zeros[:, g], scheme)
            codes[:, i1 + i] = q
            err = (W1[:, i] - deq) / U[i1 + i, i1 + i]
            W1[:, i:] -= err[:, None] * U[i1 + i, i1 + i : i2][None, :]
            E1[:, i] = err
        W[:, i2:] -= E1 @ U[i1:i2, i2:]

    inv = torch.argsort(perm)
    codes = codes[:, inv]
    return codes.to(torch.uint8), scales.half(), zeros.to(torch.uint8)


def dequantize_torch(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor) -> torch.Tensor:
    """float32 (N, K) weights of codes (N, K), fp16 scales (N, G) and zeros (N, G)."""
    n, k = codes.shape
    g = scales.shape[1]
    w = (codes.float().reshape(n, g, k // g) - zeros.float()[..., None]) * scales.float()[..., None]
    return w.reshape(n, k)


def make_block_method(family, scheme_for, damp: float = 0.01, act_order: bool = True, block_size: int = 128):
    """The GPTQ step of the layer-sequential driver (``edgeq.compress.calibration``).

    ``scheme_for(full_tensor_name)`` gives each Linear's scheme (None: keep it in floating point).
    The block's Linears are replaced by their dequantized weights so the driver's re-run of the block
    feeds the next block with quantized outputs.
    """
    from edgeq.compress.calibration import BlockResult, get_module, run_block

    def method(index, block, hidden, kwargs, device) -> BlockResult:
        prefix = family.block_prefix(index)
        linears = {n: get_module(block, n) for n in family.linears if scheme_for(f"{prefix}{n}.weight")}
        accs = {n: HessianAccumulator(lin.in_features, device) for n, lin in linears.items()}
        hooks = [
            lin.register_forward_hook(lambda mod, args, out, acc=accs[n]: acc.add(args[0]))
            for n, lin in linears.items()
        ]
        try:
            run_block(block, hidden, kwargs, device)
        finally:
            for h in hooks:
                h.remove()
        tensors, stats = {}, {}
        for n, lin in linears.items():
            W, H = lin.weight.data.float(), accs[n].H
            codes, scales, zeros = gptq_quantize(W, H, scheme_for(f"{prefix}{n}.weight"), damp, block_size, act_order)
            Wq = dequantize_torch(codes, scales, zeros).to(W.device)
            D = W - Wq
            # relative output error on the calibration inputs: tr(D H Dᵀ) / tr(W H Wᵀ)
            stats[n] = float(torch.sum((D @ H) * D) / torch.clamp(torch.sum((W @ H) * W), min=1e-30))
            lin.weight.data = Wq.to(lin.weight.dtype)
            tensors[n] = (codes, scales, zeros)
        return BlockResult(tensors, {"output_rel_error": stats})

    return method
