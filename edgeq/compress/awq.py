"""AWQ: activation-aware weight quantization (Lin et al., 2023, arXiv 2306.00978), search then apply.

Per decoder block, for every place where a per-channel scale can be folded exactly --

* a norm and the Linears it feeds (``input_layernorm -> q,k,v``; ``post_attention_layernorm ->
  gate,up``), the norm's weight divided by ``s``;
* a Linear and the one that consumes its output channel-wise (``up_proj -> down_proj``), the producer's
  rows divided by ``s``; ``v_proj -> o_proj`` only when their widths match (no GQA);

-- the scale is ``s = mean|x|^α`` (normalized by ``sqrt(max·min)``), with ``α`` on the grid
0, 0.05, ..., 0.95 chosen to minimize the consumers' output error ``||X Wᵀ - X (Q(W·s)/s)ᵀ||²`` on the
calibration activations (α = 0 is plain RTN, so the search never does worse on its own objective).
Then, per group, a clipping search shrinks the range by up to 50% in 20 steps to minimize the
group's output error on the (rescaled) activations, and the weights are quantized with RTN's
conventions (``edgeq.compress.rtn``).
"""

from __future__ import annotations

import torch

from edgeq.compress.calibration import BlockResult, get_module, run_block
from edgeq.compress.gptq import dequantize_torch
from edgeq.compress.quant import QuantScheme
from edgeq.compress.rtn import fake_quant, rtn_quantize, scales_zeros

ALPHA_GRID = [i / 20 for i in range(20)]


class InputSampler:
    """Keeps up to ``max_rows`` rows of a Linear's inputs (evenly strided, deterministic)."""

    def __init__(self, max_rows: int):
        self.max_rows, self.rows = max_rows, []

    def add(self, x: torch.Tensor) -> None:
        self.rows.append(x.reshape(-1, x.shape[-1]).float())

    def get(self) -> torch.Tensor:
        x = torch.cat(self.rows)
        step = max(1, x.shape[0] // self.max_rows)
        return x[::step][: self.max_rows]


def _quant_dequant(w: torch.Tensor, scheme: QuantScheme, clip=1.0) -> torch.Tensor:
    n, k = w.shape
    gl = scheme.group_len(k)
    wg = w.float().reshape(n, k // gl, gl)
    scale, zero = scales_zeros(wg, scheme, clip)
    return fake_quant(wg, scale, zero, scheme).reshape(n, k)


def search_scale(
    x: torch.Tensor, weights: list[torch.Tensor], schemes: list[QuantScheme]
) -> tuple[torch.Tensor, float]:
    """Best per-input-channel scale (K,) for Linears sharing input ``x`` (rows, K), and its alpha."""
    x_mean = x.abs().mean(0).clamp(min=1e-8)
    ref = [x @ w.T for w in weights]
    best, best_alpha, best_s = float("inf"), 0.0, torch.ones_like(x_mean)
    for alpha in ALPHA_GRID:
        s = x_mean.pow(alpha)
        s = s / (s.max() * s.min()).sqrt()
        err = 0.0
        for w, sch, y in zip(weights, schemes, ref, strict=True):
            wq = _quant_dequant(w * s, sch) / s
            err += float(((x @ wq.T - y) ** 2).sum())
        if err < best:
            best, best_alpha, best_s = err, alpha, s
    return best_s, best_alpha


def search_clip(
    x: torch.Tensor, w: torch.Tensor, scheme: QuantScheme, grid: int = 20, max_shrink: float = 0.5, max_rows: int = 512
):
    """Per-group clip ratio (N, G) minimizing each group's output error on inputs ``x`` (rows, K).

    At most ``max_rows`` input rows (evenly strided) are used, as llm-awq samples 512 tokens.
    """
    x = x[:: max(1, x.shape[0] // max_rows)][:max_rows]
    n, k = w.shape
    gl = scheme.group_len(k)
    g = k // gl
    wg = w.float().reshape(n, g, gl)
    xg = x.reshape(-1, g, gl)  # (rows, G, gl)
    best_err = torch.full((n, g), float("inf"), device=w.device)
    best = torch.ones((n, g), device=w.device)
    for i in range(grid):
        ratio = 1.0 - max_shrink * i / grid
        scale, zero = scales_zeros(wg, scheme, ratio)
        diff = wg - fake_quant(wg, scale, zero, scheme)  # (N, G, gl)
        err = torch.bmm(xg.transpose(0, 1), diff.permute(1, 2, 0)).pow(2).sum(1).T  # (G,rows,N) -> (N, G)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best = torch.where(better, torch.full_like(best, ratio), best)
    return best


def scale_pairs(family, block) -> list[tuple[str, tuple[str, ...], str]]:
    """(producer path, consumer Linear paths, producer kind) where a scale folds exactly."""
    pairs = [(norm, linears, "norm") for norm, linears in family.norm_feeds]
    names = set(family.linears)
    if {"mlp.up_proj", "mlp.down_proj"} <= names:
        pairs.append(("mlp.up_proj", ("mlp.down_proj",), "linear"))
    if {"self_attn.v_proj", "self_attn.o_proj"} <= names:
        v, o = get_module(block, "self_attn.v_proj"), get_module(block, "self_attn.o_proj")
        if v.out_features == o.in_features:
            pairs.append(("self_attn.v_proj", ("self_attn.o_proj",), "linear"))
    return pairs


def _capture_inputs(block, paths, hidden, kwargs, device, max_rows) -> dict[str, torch.Tensor]:
    samplers = {p: InputSampler(max_rows) for p in paths}
    hooks = [get_module(block, p).register_forward_hook(lambda m, a, o, s=samplers[p]: s.add(a[0])) for p in paths]
    try:
        run_block(block, hidden, kwargs, device)
    finally:
        for h in hooks:
            h.remove()
    return {p: s.get() for p, s in samplers.items()}


def make_block_method(family, scheme_for, max_rows: int = 1024, clip: bool = True):
    """The AWQ step of the layer-sequential driver; folds scales, then quantizes with clipping."""

    def method(index, block, hidden, kwargs, device) -> BlockResult:
        prefix = family.block_prefix(index)
        schemes = {n: scheme_for(f"{prefix}{n}.weight") for n in family.linears}
        inputs = _capture_inputs(block, [n for n in family.linears], hidden, kwargs, device, max_rows)
        fp_updates, alphas = {}, {}
        with torch.no_grad():
            for producer, consumers, kind in scale_pairs(family, block):
                active = [c for c in consumers if schemes[c] is not None]
                if not active:
                    continue
                ws = [get_module(block, c).weight.float() for c in active]
                s, alphas[producer] = search_scale(inputs[consumers[0]], ws, [schemes[c] for c in active])
                prod = get_module(block, producer)
                if kind == "norm":
                    prod.weight.div_(s.to(prod.weight.dtype))
                    fp_updates[f"{prefix}{producer}.weight"] = prod.weight.detach().cpu().clone()
                else:
                    prod.weight.div_(s[:, None].to(prod.weight.dtype))
                    if prod.bias is not None:
                        prod.bias.div_(s)
                    if schemes[producer] is None:
                        fp_updates[f"{prefix}{producer}.weight"] = prod.weight.detach().cpu().clone()
                for c in consumers:
                    get_module(block, c).weight.mul_(s[None, :].to(ws[0].dtype))
                    inputs[c] = inputs[c] / s
            tensors, errors = {}, {}
            for n, sch in schemes.items():
                if sch is None:
                    continue
                lin = get_module(block, n)
                w = lin.weight.float()
                ratio = search_clip(inputs[n], w, sch) if clip else 1.0
                codes, scales, zeros = rtn_quantize(w, sch, ratio)
                wq = dequantize_torch(codes, scales, zeros).to(w.device)
                y = inputs[n] @ w.T  # relative output error on the (rescaled) calibration inputs
                errors[n] = float(((inputs[n] @ wq.T - y) ** 2).sum() / torch.clamp((y**2).sum(), min=1e-30))
                lin.weight.data = wq.to(lin.weight.dtype)
                tensors[n] = (codes, scales, zeros)
        return BlockResult(tensors, {"alpha": alphas, "output_rel_error": errors}, fp_updates)

    return method
