"""The distill stage's configuration: a frozen dataclass, torch-free so recipes validate without torch.

``DistillConfig`` is what the CLI (``edgeq distill``), a recipe's ``distill:`` section and the Python
API (``edgeq.compress.distill.run.distill``) all build. ``config_from_dict`` refuses unknown keys with
the list of known ones, like the other stages' configs.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

from edgeq.errors import ConfigError

BLOCK_TERMS = {"mse", "sw"}
LOGIT_TERMS = {"kl", "cakld", "tsld"}
TRAIN_GROUPS = ("scales", "weights", "adapter", "norms")


@dataclass(frozen=True)
class DistillConfig:
    loss: str = "mse+sw"
    sw_weight: float = 0.1
    sw_directions: int = 16
    # scales + the blocks' norm weights (+1.6 points of recovered gap over scales alone on the bundled
    # 2-bit model, benchmarks/RESULTS.md); "weights" (codes move through the STE) did not help there
    train: tuple[str, ...] = ("scales", "norms")
    steps: int = 400  # per block
    # blocks reconstructed together (cross-block windows, as in CBQ, Ding et al. 2023): block i trains with
    # blocks i+1..i+window-1, the loss summed over their outputs, so it is also judged by how its error
    # carries into the blocks after it; then block i is fixed and the window slides by one. window 1 is plain
    # block-wise reconstruction; each block trains `window` times (the cost grows about as much). On the bundled
    # model (3 seeds, benchmarks/RESULTS.md) 1 / 2 / 3 recover 23.1 / 26.7 / 29.1% of the 2-bit gap, 23.8 / 26.5 /
    # 27.2% at 3 bits, for 1 / 1.7 / 2.2x the time
    window: int = 2
    e2e_steps: int = 100  # when the loss names a logit term
    lr: float = 1e-4  # scales / adapter (Adam: an absolute step, scales are ~1e-2)
    lr_weights: float = 1e-5  # latent weights (codes move through the STE)
    lr_norms: float = 1e-3  # the blocks' norm weights ("norms": float, ~1, stored as they are)
    adapter_rank: int = 8  # rank of the low-rank adapter when "adapter" trains (merged into the codes)
    batch_size: int = 4  # the *global* batch: split evenly across processes under torchrun
    # weight the block MSE per element by the teacher's squared output gradients (BRECQ's diagonal Fisher),
    # so errors count as much as the LM loss is sensitive to them (computed per block with the whole teacher on
    # the device: one forward and a partial backward pass over the calibration set). Off by default: on the bundled model it
    # moved the recovered gap by +1.4 points at 2 bits and -3.6 at 3 bits over 3 seeds (benchmarks/RESULTS.md)
    fisher: bool = False
    saliency: bool = False
    saliency_lambda: float = 0.05
    calib: str | None = None
    n_samples: int = 128
    seq_len: int = 256
    seed: int = 0
    device: str = "auto"
    fsdp: bool = False  # shard the end-to-end student with FSDP (multi-process runs only)
    checkpoint_every: int = 25  # end-to-end steps between checkpoints (blocks: after each block)
    terms: frozenset = field(init=False, default=frozenset())

    def __post_init__(self) -> None:
        self._check_types()
        terms = frozenset(t.strip() for t in self.loss.split("+") if t.strip())
        unknown = terms - BLOCK_TERMS - LOGIT_TERMS
        if unknown or "mse" not in terms or len(terms & LOGIT_TERMS) > 1:
            raise ConfigError(
                f"--loss {self.loss!r} is not supported; expected mse[+sw][+kl|+cakld|+tsld], e.g. mse+sw+cakld"
            )
        object.__setattr__(self, "terms", terms)
        object.__setattr__(self, "train", tuple(self.train))
        bad = set(self.train) - set(TRAIN_GROUPS)
        if bad or not self.train:
            raise ConfigError(
                f"--train {','.join(self.train)!r} is not supported; expected some of {','.join(TRAIN_GROUPS)}"
            )
        for name in ("steps", "e2e_steps"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name}={getattr(self, name)} is negative; expected 0 or more")
        positive = ("batch_size", "n_samples", "seq_len", "checkpoint_every", "sw_directions", "adapter_rank", "window")
        for name in positive:
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}={getattr(self, name)} must be at least 1")

    def _check_types(self) -> None:
        """A recipe can hold any YAML value: refuse the wrong kind before it fails deep in training."""
        for f in fields(self):
            if not f.init or f.name == "train":
                continue
            value, default = getattr(self, f.name), f.default
            if isinstance(default, bool):
                ok = isinstance(value, bool)
            elif isinstance(default, (int, float)):
                ok = isinstance(value, (int, float)) and not isinstance(value, bool)
                ok = ok and (isinstance(value, int) or isinstance(default, float))
            else:  # str, or str | None
                ok = isinstance(value, str) or (value is None and default is None)
            if not ok:
                want = (
                    "true/false"
                    if isinstance(default, bool)
                    else type(default).__name__
                    if default is not None
                    else "str"
                )
                raise ConfigError(f"{f.name}={value!r} has the wrong type; expected {want}")
        if not isinstance(self.train, (tuple, list)) or not all(isinstance(t, str) for t in self.train):
            raise ConfigError(f"train={self.train!r} has the wrong type; expected names like scales,weights")

    @property
    def logit_term(self) -> str | None:
        """The end-to-end logit loss (kl, cakld or tsld) when the loss names one."""
        found = self.terms & LOGIT_TERMS
        return next(iter(found)) if found else None

    def to_dict(self) -> dict:
        """JSON-ready values of the init fields (what run.json and resume fingerprints record)."""
        out = {}
        for f in fields(self):
            if f.init:
                value = getattr(self, f.name)
                out[f.name] = list(value) if isinstance(value, tuple) else value
        return out


def config_from_dict(data: dict | None, where: str) -> DistillConfig:
    """A ``DistillConfig`` from a recipe mapping; unknown keys are refused with the known ones."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{where} must be a mapping, got {type(data).__name__}")
    known = {f.name for f in fields(DistillConfig) if f.init}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"unknown key(s) {unknown} in {where}; expected some of {sorted(known)}")
    values = dict(data)
    if isinstance(values.get("train"), str):
        values["train"] = tuple(t.strip() for t in values["train"].split(",") if t.strip())
    try:
        return DistillConfig(**values)
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from None
