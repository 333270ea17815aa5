"""Train the bundled reference model from scratch, reproducibly.

    python -m edgeq.bundled.train --out edgeq/bundled/edgeq-tiny-stdlib

Steps: (1) a byte-level BPE tokenizer (``tokenizers``) on the training split of the stdlib files;
(2) a Llama-architecture causal LM (GQA, widths multiples of 128, tied embeddings) trained with AdamW
and a cosine schedule on random windows of the tokenized training split; (3) weights saved as fp16
safetensors in Hugging Face layout, with the tokenizer and a ``training.json`` record (settings,
data hashes, losses, held-out perplexity).

Everything is seeded; on CPU the result is reproducible for a given torch build and thread count.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from edgeq.bundled import DOC_SEPARATOR, MODEL_DIR, python_tag, read_text, split_files

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainConfig:
    vocab_size: int = 4096
    hidden_size: int = 256
    intermediate_size: int = 768
    num_layers: int = 4
    num_heads: int = 8
    num_kv_heads: int = 2
    seq_len: int = 256
    batch_size: int = 16
    steps: int = 1200
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 50
    weight_decay: float = 0.1
    seed: int = 0
    eval_tokens: int = 65536
    threads: int = 2


def train_tokenizer(texts: list[str], vocab_size: int):
    """Byte-level BPE with GPT-2 pre-tokenization (the regex llama.cpp calls ``gpt2``)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[DOC_SEPARATOR],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer, length=len(texts))
    return tok


def encode_stream(tok, texts: list[str]) -> np.ndarray:
    """Token ids of the texts joined by the separator token, as one int32 stream."""
    sep = tok.token_to_id(DOC_SEPARATOR)
    ids: list[int] = []
    for enc in tok.encode_batch(texts, add_special_tokens=False):
        ids.extend(enc.ids)
        ids.append(sep)
    return np.asarray(ids, dtype=np.int32)


def build_model(cfg: TrainConfig):
    from transformers import LlamaConfig, LlamaForCausalLM

    mcfg = LlamaConfig(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads,
        max_position_embeddings=cfg.seq_len,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        tie_word_embeddings=True,
        bos_token_id=0,
        eos_token_id=0,
    )
    return LlamaForCausalLM(mcfg)


def lr_at(step: int, cfg: TrainConfig) -> float:
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    frac = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * frac)))


@torch.no_grad()
def stream_perplexity(model, stream: np.ndarray, seq_len: int, max_tokens: int) -> float:
    """Perplexity over non-overlapping windows of ``seq_len`` tokens (first ``max_tokens``)."""
    model.eval()
    n_win = min(len(stream) - 1, max_tokens) // seq_len
    nll, count = 0.0, 0
    for i in range(0, n_win, 16):
        rows = [stream[(i + j) * seq_len : (i + j + 1) * seq_len + 1] for j in range(min(16, n_win - i))]
        batch = torch.from_numpy(np.stack(rows).astype(np.int64))
        logits = model(batch[:, :-1]).logits.float()
        loss = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="sum"
        )
        nll += float(loss)
        count += batch[:, 1:].numel()
    model.train()
    return math.exp(nll / count)


def train(cfg: TrainConfig, out: Path) -> dict:
    torch.manual_seed(cfg.seed)
    torch.set_num_threads(cfg.threads)
    train_files, heldout_files = split_files()
    train_texts = [read_text(p) for p in train_files]
    heldout_texts = [read_text(p) for p in heldout_files]
    t0 = time.time()
    tok = train_tokenizer(train_texts, cfg.vocab_size)
    train_ids = encode_stream(tok, train_texts)
    eval_ids = encode_stream(tok, heldout_texts)
    log.info("tokenizer %.1fs; train %d tokens, held-out %d", time.time() - t0, len(train_ids), len(eval_ids))

    model = build_model(cfg)
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr,
        betas=(0.9, 0.95),
    )
    rng = np.random.default_rng(cfg.seed)
    data = torch.from_numpy(train_ids.astype(np.int64))
    losses: list[tuple[int, float]] = []
    t0 = time.time()
    for step in range(cfg.steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, cfg)
        starts = rng.integers(0, len(data) - cfg.seq_len - 1, size=cfg.batch_size)
        batch = torch.stack([data[s : s + cfg.seq_len + 1] for s in starts])  # (B, T+1)
        out_ = model(batch[:, :-1])
        logits = out_.logits
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % 50 == 0 or step == cfg.steps - 1:
            losses.append((step, loss.item()))
            rate = (step + 1) * cfg.batch_size * cfg.seq_len / (time.time() - t0)
            log.info("step %d/%d loss %.3f (%.0f tok/s)", step, cfg.steps, loss.item(), rate)
    train_seconds = time.time() - t0
    ppl = stream_perplexity(model, eval_ids, cfg.seq_len, cfg.eval_tokens)
    log.info("held-out perplexity %.2f after %.0fs", ppl, train_seconds)
    record = {
        "config": asdict(cfg),
        "python": python_tag(),
        "torch": torch.__version__,
        "train_files": len(train_files),
        "heldout_files": len(heldout_files),
        "train_tokens": int(len(train_ids)),
        "heldout_tokens": int(len(eval_ids)),
        "tokens_seen": cfg.steps * cfg.batch_size * cfg.seq_len,
        "train_ids_sha256": hashlib.sha256(train_ids.tobytes()).hexdigest(),
        "heldout_perplexity": ppl,
        "heldout_perplexity_tokens": min(len(eval_ids) - 1, cfg.eval_tokens) // cfg.seq_len * cfg.seq_len,
        "train_seconds": train_seconds,
        "losses": losses,
    }
    save(model, tok, out, record)
    return record


def save(model, tok, out: Path, record: dict) -> None:
    from transformers import GenerationConfig, PreTrainedTokenizerFast

    out.mkdir(parents=True, exist_ok=True)
    model.config.torch_dtype = "float16"
    model.half().save_pretrained(out, safe_serialization=True)
    GenerationConfig(bos_token_id=0, eos_token_id=0, do_sample=False).save_pretrained(out)
    hf_tok = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=DOC_SEPARATOR,
        eos_token=DOC_SEPARATOR,
        unk_token=DOC_SEPARATOR,
        model_max_length=model.config.max_position_embeddings,
    )
    hf_tok.save_pretrained(out)
    (out / "training.json").write_text(json.dumps(record, indent=1) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=MODEL_DIR)
    for field, default in asdict(TrainConfig()).items():
        parser.add_argument(f"--{field.replace('_', '-')}", type=type(default), default=default)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    cfg = TrainConfig(**{k: v for k, v in vars(args).items() if k != "out"})
    record = train(cfg, args.out)
    print(json.dumps({k: record[k] for k in ("heldout_perplexity", "tokens_seen", "train_seconds")}))


if __name__ == "__main__":
    main()
