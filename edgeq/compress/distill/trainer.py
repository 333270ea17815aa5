"""Recovering a quantized run's accuracy: block-wise reconstruction, then optional end-to-end KD.

Block-wise (memory-bounded like the PTQ driver: a window of ``cfg.window`` blocks on the device at a
time): the student block (its quantized Linears as ``QATLinear``) sees the outputs of the already-trained
student blocks before it, and learns to reproduce the teacher block's output on the teacher's own inputs,
with ``MSE + w·SW`` (sliced Wasserstein; ``edgeq.compress.distill.losses``). With ``window`` > 1 (cross-block
reconstruction, CBQ) block i trains together with the next ``window - 1`` blocks, the loss summed over
their outputs, so its own error is also judged by what it does to the blocks after it; block i is then
fixed and the window slides by one (the later blocks keep what they learned as their start). With
``fisher`` the MSE is weighted per element by the teacher's squared output gradients (``output_fisher``).
With ``saliency`` the block follows the three-stage schedule of saliency-aware partial retraining: weight preservation
(``L_reg`` alone) -> output preservation (MSE [+ SW]) -> mixed (MSE [+ SW] + λ·L_reg), where ``L_reg =
Σ g² ⊙ (W_eff − W_orig)²`` and ``g²`` are squared gradients of the LM loss w.r.t. the original weights,
computed once on calibration data.

End-to-end (``kl`` / ``cakld`` / ``tsld`` in the loss): the whole student, scales only, distilled on
the teacher's logits.

Both loops are data parallel under ``torchrun`` (``edgeq.compress.distill.dist``: each rank takes its
slice of every global batch; the objective is the one-process objective on the whole batch). Every
random draw comes from a generator seeded by ``(seed, block, step)`` (``step_generator``), so all ranks
draw alike without communicating and a resumed run continues the uninterrupted run's sequence.

The result is written as a run dir whose codes are re-derived from the trained parameters
(``QATLinear.export``), so ``edgeq eval`` / ``edgeq export`` take it unchanged.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import torch

from edgeq.compress.calibration import capture_block_inputs, get_module, run_block
from edgeq.compress.distill import losses as L
from edgeq.compress.distill.config import BLOCK_TERMS, LOGIT_TERMS, DistillConfig
from edgeq.compress.distill.dist import DistContext
from edgeq.compress.distill.qat import GROUPS as QAT_GROUPS
from edgeq.compress.distill.qat import QATLinear
from edgeq.compress.mappings import Family
from edgeq.errors import ConfigError

__all__ = ["BLOCK_TERMS", "LOGIT_TERMS", "DistillConfig", "blockwise", "end_to_end", "compute_saliency"]
log = logging.getLogger(__name__)
E2E_STREAM = -1  # the "block" index of the end-to-end loop's random stream
_MIX = 1_000_003


def step_generator(seed: int, block: int, step: int) -> torch.Generator:
    """The generator of one training step: a pure function of (seed, block, step)."""
    return torch.Generator().manual_seed(((seed * _MIX + block + 2) * _MIX + step) % (2**63 - 1))


def _progress(total: int, desc: str, ctx: DistContext):
    try:
        from tqdm import tqdm
    except ImportError:  # progress bars are never required
        return None
    return tqdm(total=total, desc=desc, unit="step", leave=False, disable=True if not ctx.is_main else None)


def _optimize(opt: torch.optim.Optimizer, loss: torch.Tensor, curve: list[float], bar, ctx: DistContext) -> None:
    """One optimizer step on ``loss``; records the (global) loss in ``curve`` and advances the progress bar."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    curve.append(float(ctx.mean(loss.detach())))
    if bar is not None:
        bar.update(1)
        bar.set_postfix(loss=f"{curve[-1]:.4g}", refresh=False)


def wrap_block(block, family: Family, prefix: str, quantized: dict, cfg: DistillConfig) -> dict[str, QATLinear]:
    """Replace the block's quantized Linears by QATLinear modules (with a ``cfg.adapter_rank`` adapter
    when the adapter trains); returns them by path."""
    rank = cfg.adapter_rank if "adapter" in cfg.train else 0
    out = {}
    for path in family.linears:
        full = f"{prefix}{path}.weight"
        if full not in quantized:
            continue
        codes, scales, zeros, scheme = quantized[full]
        lin = get_module(block, path)
        qat = QATLinear(lin.weight.data, codes, scales, zeros, scheme, lin.bias, rank=rank).to(lin.weight.device)
        parent_path, _, name = path.rpartition(".")
        setattr(get_module(block, parent_path) if parent_path else block, name, qat)
        out[path] = qat
    return out


def qat_groups(cfg: DistillConfig) -> tuple[str, ...]:
    """The parameter groups of ``cfg.train`` that live in the QATLinear layers."""
    return tuple(g for g in cfg.train if g in QAT_GROUPS)


def block_norms(block: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """The block's normalization layers by path (``input_layernorm``, ``post_attention_layernorm``, and
    ``q_norm`` / ``k_norm`` where a family has them): the ``norms`` group. Their weights are float
    tensors the run dir stores as they are, so training them keeps the export exact."""
    return {
        path: m
        for path, m in block.named_modules()
        if path and "norm" in path.rsplit(".", 1)[-1].lower() and isinstance(getattr(m, "weight", None), torch.Tensor)
    }


def _optimizer(module: torch.nn.Module, qats: dict[str, QATLinear], cfg: DistillConfig) -> torch.optim.Optimizer:
    for p in module.parameters():  # everything else stays fixed: no gradients computed or synced
        p.requires_grad_(False)
    for q in qats.values():
        q.set_trainable(qat_groups(cfg))
    groups = [{"params": [q.scales for q in qats.values() if q.scales.requires_grad], "lr": cfg.lr}]
    weights = [q.weight_latent for q in qats.values() if q.weight_latent.requires_grad]
    if weights:
        groups.append({"params": weights, "lr": cfg.lr_weights})
    adapters = [p for q in qats.values() if q.rank for p in (q.lora_a, q.lora_b) if p.requires_grad]
    if adapters:
        groups.append({"params": adapters, "lr": cfg.lr})
    if "norms" in cfg.train:
        norms = [m.weight for m in block_norms(module).values()]
        for p in norms:
            p.requires_grad_(True)
        groups.append({"params": norms, "lr": cfg.lr_norms})
    groups = [g for g in groups if g["params"]]
    if not groups:
        raise ConfigError(f"--train {','.join(cfg.train)} leaves nothing to train in this block; include scales")
    return torch.optim.Adam(groups)


def block_loss(out, target, cfg: DistillConfig, gen: torch.Generator, stage: str, reg, ctx: DistContext, weight=None):
    """This rank's share of ``MSE + w·SW (+ λ·L_reg)`` on its shard of the global batch; ``weight``: the
    batch's Fisher weights when ``cfg.fisher`` (see ``output_fisher``).

    SW is computed on the projections of the *whole* global batch (gathered over ranks), so it is
    the one-process SW; its gradient reaches each rank through its own shard (see ``dist``).
    """
    loss = L.block_mse(out, target, weight)
    if "sw" in cfg.terms:
        dim = out.shape[-1]
        u = L.random_directions(dim, cfg.sw_directions, gen, dtype=torch.float32).to(out.device)  # (D, k)
        ps = ctx.gather(out.float().reshape(-1, dim) @ u)  # (N_global, k)
        pt = ctx.gather(target.float().reshape(-1, dim) @ u)
        loss = loss + cfg.sw_weight * L.sw_from_projections(ps, pt)
    if stage == "mixed" and reg is not None:
        loss = loss + cfg.saliency_lambda * reg
    return loss


def _stage(step: int, cfg: DistillConfig) -> str:
    if not cfg.saliency:
        return "output"
    third = max(1, cfg.steps // 3)
    return "weights" if step < third else "output" if step < 2 * third else "mixed"


def _device_kwargs(kwargs: dict, device) -> dict:
    kw = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in kwargs.items()}
    if "position_embeddings" in kwargs:
        kw["position_embeddings"] = tuple(t.to(device) for t in kwargs["position_embeddings"])
    return kw


class Window(torch.nn.Module):
    """Consecutive student blocks trained together: ``forward`` returns each block's output in turn."""

    def __init__(self, blocks: list[torch.nn.Module]):
        super().__init__()
        self.blocks = torch.nn.ModuleList(blocks)

    def forward(self, hidden: torch.Tensor, **kwargs) -> list[torch.Tensor]:
        outs = []
        for block in self.blocks:
            hidden = block(hidden, **kwargs)
            hidden = hidden[0] if isinstance(hidden, tuple) else hidden
            outs.append(hidden)
        return outs


def train_block(
    block, qats, inputs, targets, kwargs, cfg, saliency, ctx: DistContext, index: int, weights=None
) -> list[float]:
    """Train a window of student blocks (a ``Window``) towards the teacher blocks' outputs; returns the
    (global) loss curve.

    ``inputs`` holds this rank's shard of every calibration batch; ``targets`` (and ``weights``, the
    Fisher weights, or ``None``) one such list per block of the window. The loss is the sum of the
    blocks' ``block_loss`` terms (one block: the plain block-wise objective).
    """
    device = ctx.device
    opt = _optimizer(block, qats, cfg)
    model = ctx.ddp(block)
    originals = {p: q.weight_latent.detach().clone() for p, q in qats.items()}
    kw = _device_kwargs(kwargs, device)
    curve = []
    bar = _progress(cfg.steps, f"block {index}", ctx)
    for step in range(cfg.steps):
        gen = step_generator(cfg.seed, index, step)
        i = int(torch.randint(len(inputs), (1,), generator=gen))
        stage = _stage(step, cfg)
        reg = None
        if saliency is not None and stage != "output":
            reg = sum(L.saliency_regularizer(q.effective_weight(), originals[p], saliency[p]) for p, q in qats.items())
        if stage == "weights":
            loss = reg  # no forward pass: identical on every rank, so no gradient needs syncing
        else:
            outs = model(inputs[i].to(device), **kw)
            loss = 0
            for k, out in enumerate(outs):
                weight = None if weights is None else weights[k][i].to(device)
                term_reg = reg if k == 0 else None  # the regularizer counts once per window
                loss = loss + block_loss(out, targets[k][i].to(device), cfg, gen, stage, term_reg, ctx, weight)
        _optimize(opt, loss, curve, bar, ctx)
    if bar is not None:
        bar.close()
    return curve


def compute_saliency(
    teacher, family: Family, ids: torch.Tensor, batch_size: int, ctx: DistContext | None = None
) -> dict[str, torch.Tensor]:
    """g² per quantizable weight: mean squared gradient of the LM loss over calibration batches,
    normalized to mean 1 per tensor so λ does not depend on the model's scale.

    Under torchrun each rank back-propagates its shard of a batch and the gradients are averaged
    before squaring, so g² is the square of the whole batch's gradient, as in one process.
    """
    ctx = ctx or DistContext()
    params = {n: p for n, p in teacher.named_parameters() if family.quantizable(n)}
    sal = {n: torch.zeros_like(p) for n, p in params.items()}
    teacher.train(False)
    for i in range(0, len(ids), batch_size):
        x = ctx.shard(ids[i : i + batch_size]).to(ctx.device)
        teacher.zero_grad(set_to_none=True)
        teacher(x, labels=x).loss.backward()
        ctx.average_grads(params.values())
        for n, p in params.items():
            sal[n] += p.grad.detach() ** 2
    teacher.zero_grad(set_to_none=True)
    return {n: s / s.mean().clamp(min=1e-30) for n, s in sal.items()}


def output_fisher(teacher, family: Family, index: int, ids: torch.Tensor, batch_size: int, ctx: DistContext) -> list:
    """Per-element squared gradients of the teacher's LM loss w.r.t. block ``index``'s output, one
    tensor per calibration batch of ``ids`` (this rank's rows), normalized to mean 1 over the global
    calibration set: the diagonal Fisher weighting of BRECQ's block reconstruction (Li et al. 2021),
    so a block learns to undo the errors the next-token loss is sensitive to rather than all of them.

    The whole teacher runs (on ``ctx.device``); the hooked block's output is made a leaf, so the
    backward pass only goes through the blocks after it.
    """
    device = ctx.device
    block = get_module(teacher, family.blocks)[index]
    leaf: list[torch.Tensor] = []

    def hook(module, args, output):
        hidden = (output[0] if isinstance(output, tuple) else output).detach().requires_grad_(True)
        leaf.append(hidden)
        return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

    for p in teacher.parameters():
        p.requires_grad_(False)
    teacher.train(False)
    teacher.to(device)
    handle = block.register_forward_hook(hook)
    out = []
    try:
        with torch.enable_grad():
            for i in range(0, len(ids), batch_size):
                x = ids[i : i + batch_size].to(device)
                leaf.clear()
                (grad,) = torch.autograd.grad(teacher(x, labels=x, use_cache=False).loss, leaf)
                out.append((grad.float() ** 2).cpu())
    finally:
        handle.remove()
        teacher.to("cpu")
    mean = ctx.mean(torch.stack([g.mean() for g in out]).mean().to(device)).cpu().clamp(min=1e-30)
    return [g / mean for g in out]


def shard_batches(ids: torch.Tensor, batch_size: int, ctx: DistContext) -> torch.Tensor:
    """This rank's rows of ``ids`` (n, T), batch by batch: (n/world, T), kept in batch order."""
    if not ctx.enabled:
        return ids
    if len(ids) % batch_size:
        raise ConfigError(
            f"n_samples={len(ids)} is not a multiple of batch_size={batch_size}; multi-process distillation "
            "needs full batches: choose --n-samples as a multiple of --batch-size"
        )
    return torch.cat([ctx.shard(ids[i : i + batch_size]) for i in range(0, len(ids), batch_size)])


BlockDone = Callable[[int, dict, dict], None]  # (block index, curves so far, {full path: QATLinear})


def blockwise(
    teacher,
    student,
    family,
    ids,
    quantized,
    cfg: DistillConfig,
    ctx: DistContext,
    saliency=None,
    start: int = 0,
    restored: dict | None = None,
    curves: dict | None = None,
    on_block_done: BlockDone | None = None,
) -> dict:
    """Train every student block in order (each in its window: see the module docstring); returns loss
    curves by ``"block I"`` (window I's loss). Modifies ``student``.

    Blocks before ``start`` are not trained again: their parameters come from ``restored`` (a resumed
    run) and they only run forward, to rebuild the next block's inputs exactly.
    """
    device = ctx.device
    local_ids = shard_batches(ids, cfg.batch_size, ctx)
    per_rank = cfg.batch_size // ctx.world
    with torch.no_grad():
        x_t, kwargs = capture_block_inputs(teacher, family, local_ids, per_rank)
        x_s = [h.clone() for h in x_t]
    curves = dict(curves or {})
    trained: dict[str, QATLinear] = {}
    t_blocks, s_blocks = get_module(teacher, family.blocks), get_module(student, family.blocks)
    n = len(s_blocks)
    wrapped: dict[int, dict[str, QATLinear]] = {}  # block -> its QATLinear layers, once it entered a window
    # block -> the teacher block's outputs (on the teacher's inputs; -1: block 0's inputs); during window i
    # it holds just the window's targets, i..i+window-1
    t_out: dict[int, list] = {-1: x_t}
    del x_t
    fisher: dict[int, list] = {}

    def enter(j: int) -> None:
        """Wrap student block j, bring it to the device and put back what a resumed run saved of it
        (blocks before ``start`` are finished; the rest of a window may have trained in the window before)."""
        prefix = family.block_prefix(j)
        s_blocks[j] = s_blocks[j].to(device)
        wrapped[j] = wrap_block(s_blocks[j], family, prefix, quantized, cfg)
        if restored:
            _restore_block(wrapped[j], trained_modules(s_blocks[j], wrapped[j], cfg), prefix, cfg, restored)

    for index in range(n):
        t0 = time.time()
        prefix = family.block_prefix(index)
        last = index + 1 if index < start else min(n, index + cfg.window)  # finished blocks only run forward
        for j in range(index, last):
            if j not in t_out:
                t_out[j] = run_block(t_blocks[j].to(device), t_out[j - 1], kwargs, device)
                t_blocks[j].to("cpu")
            if j not in wrapped:
                enter(j)
            if cfg.fisher and cfg.steps and j >= start and j not in fisher:
                fisher[j] = output_fisher(teacher, family, j, local_ids, per_rank, ctx)
        t_out.pop(index - 1, None)  # the inputs of teacher block `index`: its outputs exist now
        block, qats = s_blocks[index], wrapped[index]
        modules = trained_modules(block, qats, cfg)
        if index >= start:
            window = Window([s_blocks[j] for j in range(index, last)])
            window_qats = {f"blocks.{j - index}.{p}": q for j in range(index, last) for p, q in wrapped[j].items()}
            sal = None
            if saliency is not None:
                sal = {f"blocks.{j - index}.{p}": saliency[f"{family.block_prefix(j)}{p}.weight"].to(device)
                       for j in range(index, last) for p in wrapped[j]}  # fmt: skip
            weights = [fisher[j] for j in range(index, last)] if cfg.fisher and cfg.steps else None
            with torch.enable_grad():
                curves[f"block {index}"] = train_block(
                    window, window_qats, x_s, [t_out[j] for j in range(index, last)], kwargs, cfg, sal, ctx,
                    index, weights,
                )  # fmt: skip
        for p in block.parameters():
            p.requires_grad_(False)
        for q in qats.values():
            q.freeze()
        trained.update({f"{prefix}{p}": m for p, m in modules.items()})
        with torch.no_grad():
            x_s = run_block(block, x_s, kwargs, device)
        s_blocks[index] = block.to("cpu")
        fisher.pop(index, None)
        if index >= start:
            c = curves[f"block {index}"]
            log.info(
                "block %d: loss %.4g -> %.4g (%.1fs)", index, c[0] if c else 0, c[-1] if c else 0, time.time() - t0
            )
            if on_block_done is not None:
                # what a resume needs: the finished blocks, and the state of the window's later blocks
                ahead = {f"{family.block_prefix(j)}{p}": m for j in range(index + 1, last)
                         for p, m in trained_modules(s_blocks[j], wrapped[j], cfg).items()}  # fmt: skip
                on_block_done(index, curves, {**trained, **ahead})
    return curves


def trained_modules(block, qats: dict[str, QATLinear], cfg: DistillConfig) -> dict[str, torch.nn.Module]:
    """The block's modules whose parameters training changes (checkpointed and restored): its QATLinear
    layers, and its norms when they train."""
    return {**qats, **(block_norms(block) if "norms" in cfg.train else {})}


def _restore_block(qats: dict[str, QATLinear], modules: dict, prefix: str, cfg: DistillConfig, restored: dict) -> None:
    from edgeq.compress.distill.checkpoint import restore_tensors

    for q in qats.values():
        q.set_trainable(qat_groups(cfg))  # the same learn_codes state as after training
        q.freeze()
    restore_tensors({f"{prefix}{p}": m for p, m in modules.items()}, restored)


def logit_loss(term: str, s_logits, t_logits, labels, ctx: DistContext) -> torch.Tensor:
    """This rank's share of the end-to-end loss on its shard; DDP's average over ranks is the global loss."""
    if term == "kl":
        return L.forward_kl(s_logits, t_logits)
    if term == "cakld":
        beta = ctx.mean(L.teacher_confidence(t_logits, labels))  # the global batch's β
        return L.cakld(s_logits, t_logits, labels, beta=beta)
    log_norm = ctx.logsumexp(L.tsld_scores(t_logits, labels))  # normalize over the global batch's tokens
    # the shards' terms *add up* to the global loss; DDP averages, so each rank weighs its sum by world
    return ctx.world * L.tsld(s_logits, t_logits, labels, log_normalizer=log_norm)


E2ECheckpoint = Callable[[int, list, dict, torch.optim.Optimizer], None]  # (next step, curve, qats, optimizer)


def end_to_end(
    teacher,
    student,
    ids: torch.Tensor,
    cfg: DistillConfig,
    ctx: DistContext,
    start: int = 0,
    curve: list[float] | None = None,
    restore_optim: Callable[[torch.optim.Optimizer], None] | None = None,
    on_checkpoint: E2ECheckpoint | None = None,
    norms: dict[str, torch.nn.Module] | None = None,
) -> list[float]:
    """Logit distillation of the whole student (scales only) on the teacher's logits.

    ``norms``: the norm layers block-wise training changed (by full path), saved in checkpoints."""
    from edgeq.compress.distill import fsdp as fsdp_mod

    device, term = ctx.device, cfg.logit_term
    qats = {path: m for path, m in student.named_modules() if isinstance(m, QATLinear)}
    saved = {**qats, **(norms or {})}  # a checkpoint holds the trained layers and the norms block-wise moved
    for p in student.parameters():
        p.requires_grad_(False)
    for q in qats.values():
        q.set_trainable(("scales",))
    teacher.to(device)
    student.to(device)
    model = fsdp_mod.shard_student(student, ctx) if cfg.fsdp else ctx.ddp(student)
    opt = torch.optim.Adam([q.scales for q in qats.values()], lr=cfg.lr * 0.1)
    if restore_optim is not None:
        restore_optim(opt)
    curve = list(curve or [])
    bar = _progress(cfg.e2e_steps, "end-to-end", ctx)
    if bar is not None:
        bar.update(start)
    for step in range(start, cfg.e2e_steps):
        gen = step_generator(cfg.seed, E2E_STREAM, step)
        idx = torch.randint(len(ids), (cfg.batch_size,), generator=gen)
        x = ctx.shard(ids[idx]).to(device)
        with torch.no_grad():
            t_logits = teacher(x).logits.float()
        s_logits = model(x).logits.float()
        loss = logit_loss(term, s_logits[:, :-1], t_logits[:, :-1], x[:, 1:], ctx)
        _optimize(opt, loss, curve, bar, ctx)
        done = step + 1
        if on_checkpoint is not None and done < cfg.e2e_steps and done % cfg.checkpoint_every == 0:
            on_checkpoint(done, curve, saved, opt)
    if bar is not None:
        bar.close()
    if cfg.fsdp:
        fsdp_mod.unshard_student(student, ctx)
    for q in qats.values():
        q.freeze()
    return curve
