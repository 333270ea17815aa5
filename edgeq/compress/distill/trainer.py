"""Recovering a quantized run's accuracy: block-wise reconstruction, then optional end-to-end KD.

Block-wise (memory-bounded like the PTQ driver, one block on the device at a time): the student
block (its quantized Linears as ``QATLinear``) sees the outputs of the already-trained student blocks
before it, and learns to reproduce the teacher block's output on the teacher's own inputs, with
``MSE + w·SW`` (sliced Wasserstein; ``edgeq.compress.distill.losses``). With ``saliency`` the block
follows the three-stage schedule of saliency-aware partial retraining: weight preservation
(``L_reg`` alone) -> output preservation (MSE [+ SW]) -> mixed (MSE [+ SW] + λ·L_reg), where ``L_reg =
Σ g² ⊙ (W_eff − W_orig)²`` and ``g²`` are squared gradients of the LM loss w.r.t. the original weights,
computed once on calibration data.

End-to-end (``kl`` / ``cakld`` / ``tsld`` in the loss): the whole student, scales only, distilled on
the teacher's logits.

The result is written as a run dir whose codes are re-derived from the trained parameters
(``QATLinear.export``), so ``edgeq eval`` / ``edgeq export`` take it unchanged.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import torch

from edgeq.compress.calibration import capture_block_inputs, get_module, run_block
from edgeq.compress.distill import losses as L
from edgeq.compress.distill.qat import QATLinear
from edgeq.compress.mappings import Family
from edgeq.errors import ConfigError

log = logging.getLogger(__name__)
BLOCK_TERMS = {"mse", "sw"}
LOGIT_TERMS = {"kl", "cakld", "tsld"}


@dataclass(frozen=True)
class DistillConfig:
    loss: str = "mse+sw"
    sw_weight: float = 0.1
    sw_directions: int = 16
    train: tuple[str, ...] = ("scales",)  # + "weights" moves codes (STE); unstable at lr 1e-5 so far
    steps: int = 400  # per block
    e2e_steps: int = 100  # when the loss names a logit term
    lr: float = 1e-4  # scales / adapter (Adam: an absolute step, scales are ~1e-2)
    lr_weights: float = 1e-5  # latent weights (codes move through the STE)
    batch_size: int = 4
    saliency: bool = False
    saliency_lambda: float = 0.05
    calib: str | None = None
    n_samples: int = 128
    seq_len: int = 256
    seed: int = 0
    device: str = "auto"
    terms: frozenset = field(init=False, default=frozenset())

    def __post_init__(self) -> None:
        terms = frozenset(t.strip() for t in self.loss.split("+") if t.strip())
        unknown = terms - BLOCK_TERMS - LOGIT_TERMS
        if unknown or "mse" not in terms or len(terms & LOGIT_TERMS) > 1:
            raise ConfigError(
                f"--loss {self.loss!r} is not supported; expected mse[+sw][+kl|+cakld|+tsld], e.g. mse+sw+cakld"
            )
        object.__setattr__(self, "terms", terms)
        bad = set(self.train) - {"scales", "weights", "adapter"}
        if bad or not self.train:
            raise ConfigError(
                f"--train {','.join(self.train)!r} is not supported; expected some of scales,weights,adapter"
            )


def wrap_block(block, family: Family, prefix: str, quantized: dict) -> dict[str, QATLinear]:
    """Replace the block's quantized Linears by QATLinear modules; returns them by path."""
    out = {}
    for path in family.linears:
        full = f"{prefix}{path}.weight"
        if full not in quantized:
            continue
        codes, scales, zeros, scheme = quantized[full]
        lin = get_module(block, path)
        qat = QATLinear(lin.weight.data, codes, scales, zeros, scheme, lin.bias).to(lin.weight.device)
        parent_path, _, name = path.rpartition(".")
        setattr(get_module(block, parent_path) if parent_path else block, name, qat)
        out[path] = qat
    return out


def _optimizer(qats: dict[str, QATLinear], cfg: DistillConfig) -> torch.optim.Optimizer:
    for q in qats.values():
        q.set_trainable(cfg.train)
    groups = [{"params": [q.scales for q in qats.values() if q.scales.requires_grad], "lr": cfg.lr}]
    weights = [q.weight_latent for q in qats.values() if q.weight_latent.requires_grad]
    if weights:
        groups.append({"params": weights, "lr": cfg.lr_weights})
    return torch.optim.Adam([g for g in groups if g["params"]])


def block_loss(out, target, cfg: DistillConfig, gen: torch.Generator, stage: str, reg: torch.Tensor | None):
    if stage == "weights":
        return reg
    loss = L.block_mse(out, target)
    if "sw" in cfg.terms:
        u = L.random_directions(out.shape[-1], cfg.sw_directions, gen, dtype=torch.float32).to(out.device)
        loss = loss + cfg.sw_weight * L.sliced_wasserstein(out.float(), target.float(), u)
    if stage == "mixed" and reg is not None:
        loss = loss + cfg.saliency_lambda * reg
    return loss


def _stage(step: int, cfg: DistillConfig) -> str:
    if not cfg.saliency:
        return "output"
    third = max(1, cfg.steps // 3)
    return "weights" if step < third else "output" if step < 2 * third else "mixed"


def train_block(block, qats, inputs, targets, kwargs, cfg, saliency, device, gen) -> list[float]:
    """Train one student block towards the teacher block's outputs; returns the loss curve."""
    opt = _optimizer(qats, cfg)
    originals = {p: q.weight_latent.detach().clone() for p, q in qats.items()}
    kw = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in kwargs.items()}
    if "position_embeddings" in kwargs:
        kw["position_embeddings"] = tuple(t.to(device) for t in kwargs["position_embeddings"])
    curve = []
    for step in range(cfg.steps):
        i = int(torch.randint(len(inputs), (1,), generator=gen))
        stage = _stage(step, cfg)
        reg = None
        if saliency is not None and stage != "output":
            reg = sum(L.saliency_regularizer(q.effective_weight(), originals[p], saliency[p]) for p, q in qats.items())
        out = block(inputs[i].to(device), **kw)
        out = out[0] if isinstance(out, tuple) else out
        loss = block_loss(out, targets[i].to(device), cfg, gen, stage, reg)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        curve.append(loss.item())
    return curve


def compute_saliency(teacher, family: Family, ids: torch.Tensor, batch_size: int) -> dict[str, torch.Tensor]:
    """g² per quantizable weight: mean squared gradient of the LM loss over calibration batches,
    normalized to mean 1 per tensor so λ does not depend on the model's scale."""
    params = {n: p for n, p in teacher.named_parameters() if family.quantizable(n)}
    sal = {n: torch.zeros_like(p) for n, p in params.items()}
    teacher.train(False)
    for i in range(0, len(ids), batch_size):
        x = ids[i : i + batch_size]
        teacher.zero_grad(set_to_none=True)
        teacher(x, labels=x).loss.backward()
        for n, p in params.items():
            sal[n] += p.grad.detach() ** 2
    teacher.zero_grad(set_to_none=True)
    return {n: s / s.mean().clamp(min=1e-30) for n, s in sal.items()}


def blockwise(teacher, student, family, ids, quantized, cfg: DistillConfig, device, saliency=None) -> dict:
    """Train every student block in order; returns per-block loss curves. Modifies ``student``."""
    gen = torch.Generator().manual_seed(cfg.seed)
    with torch.no_grad():
        x_t, kwargs = capture_block_inputs(teacher, family, ids, cfg.batch_size)
        x_s = [h.clone() for h in x_t]
    curves = {}
    t_blocks, s_blocks = get_module(teacher, family.blocks), get_module(student, family.blocks)
    for index in range(len(s_blocks)):
        t0 = time.time()
        prefix = family.block_prefix(index)
        targets = run_block(t_blocks[index].to(device), x_t, kwargs, device)
        t_blocks[index].to("cpu")
        block = s_blocks[index].to(device)
        qats = wrap_block(block, family, prefix, quantized)
        block_sal = None
        if saliency is not None:
            block_sal = {p: saliency[f"{prefix}{p}.weight"].to(device) for p in qats}
        with torch.enable_grad():
            curves[str(index)] = train_block(block, qats, x_s, targets, kwargs, cfg, block_sal, device, gen)
        for q in qats.values():
            q.set_trainable(())
        x_s = run_block(block, x_s, kwargs, device)
        s_blocks[index] = block.to("cpu")
        x_t = targets
        log.info(
            "block %d: loss %.4g -> %.4g (%.1fs)",
            index,
            curves[str(index)][0],
            curves[str(index)][-1],
            time.time() - t0,
        )
    return curves


def end_to_end(teacher, student, ids: torch.Tensor, cfg: DistillConfig, device) -> list[float]:
    """Logit distillation of the whole student (scales only) on the teacher's logits."""
    term = next(iter(cfg.terms & LOGIT_TERMS))
    qats = [m for m in student.modules() if isinstance(m, QATLinear)]
    for q in qats:
        q.set_trainable(("scales",))
    opt = torch.optim.Adam([q.scales for q in qats], lr=cfg.lr * 0.1)
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    teacher.to(device)
    student.to(device)
    curve = []
    for _ in range(cfg.e2e_steps):
        idx = torch.randint(len(ids), (cfg.batch_size,), generator=gen)
        x = ids[idx].to(device)
        with torch.no_grad():
            t_logits = teacher(x).logits.float()
        s_logits = student(x).logits.float()
        labels = x[:, 1:]
        s_, t_ = s_logits[:, :-1], t_logits[:, :-1]
        if term == "kl":
            loss = L.forward_kl(s_, t_)
        elif term == "cakld":
            loss = L.cakld(s_, t_, labels)
        else:
            loss = L.tsld(s_, t_, labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        curve.append(loss.item())
    for q in qats:
        q.set_trainable(())
    return curve
