"""The embedded benchmark's tiny Llama: built from a config, trained from scratch on CPU.

``build_tiny_llama`` gives a randomly initialised ``LlamaForCausalLM`` sized to the word-level
tokenizer, with the ``"tempered"`` attention enabled (tau = 1 equals eager attention), and
``train_from_scratch`` is a plain single-process AdamW loop (loss on answer tokens, linear warmup
then cosine decay, deterministic from ``cfg.seed``) that memorises the benchmark's QA pairs.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass
class TinyModelConfig:
    # architecture
    hidden_size: int = 128
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int = 4
    intermediate_size: int = 256
    max_position_embeddings: int = 128
    # pretraining (from scratch)
    steps: int = 800
    lr: float = 4e-3
    batch_size: int = 32
    warmup: int = 50
    weight_decay: float = 0.0
    seed: int = 0
    num_threads: int = 1
    max_length: int = 96


def build_tiny_llama(cfg: TinyModelConfig, tokenizer):
    """A random ``LlamaForCausalLM`` for ``tokenizer`` (tempered attention enabled, eval mode off)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from pipeline.models.tempered_attention import enable_tempered_attention

    torch.manual_seed(cfg.seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_hidden_layers,
        num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_key_value_heads,
        max_position_embeddings=cfg.max_position_embeddings,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
        rope_theta=10000.0,
        attention_dropout=0.0,
    )
    model = LlamaForCausalLM(config)
    enable_tempered_attention(model)
    return model


def encode_training_rows(tokenizer, rows: Sequence[dict], max_length: int) -> list[dict]:
    from pipeline.data.formatting import encode_qa

    out = []
    for r in rows:
        enc = encode_qa(tokenizer, r["question"], r["answer"], max_length)
        if enc.truncated:
            raise ValueError(f"training row longer than max_length={max_length}: {r['question']!r}")
        out.append({"input_ids": enc.input_ids, "labels": enc.labels})
    return out


def train_from_scratch(model, tokenizer, rows: Sequence[dict], cfg: TinyModelConfig, progress: bool = True) -> dict:
    """Train ``model`` on QA ``rows`` (loss on the answer tokens). Returns
    ``{"final_loss", "first_loss", "steps", "seconds", "losses"}`` (``losses``: every 10th step)."""
    import torch

    from pipeline.data.collate import pad_batch

    if cfg.num_threads and cfg.num_threads > 0:
        torch.set_num_threads(cfg.num_threads)
    torch.manual_seed(cfg.seed)
    rng = random.Random(cfg.seed)
    data = encode_training_rows(tokenizer, rows, cfg.max_length)
    if not data:
        raise ValueError("train_from_scratch got no rows")
    decay, no_decay = [], []
    for _n, p in model.named_parameters():
        (no_decay if p.dim() < 2 else decay).append(p)
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.98))

    def lr_at(step: int) -> float:
        if step < cfg.warmup:
            return cfg.lr * (step + 1) / cfg.warmup
        frac = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
        return cfg.lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(1.0, frac))))

    order: list[int] = []
    bs = min(cfg.batch_size, len(data))
    model.train()
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=cfg.steps, desc="pretrain", leave=False)
    losses, first, loss_v = [], None, float("nan")
    t0 = time.perf_counter()
    for step in range(cfg.steps):
        if len(order) < bs:
            perm = list(range(len(data)))
            rng.shuffle(perm)
            order += perm
        idx, order = order[:bs], order[bs:]
        batch = pad_batch([data[i] for i in idx], tokenizer.pad_token_id)
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"])
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        loss_v = float(out.loss.detach())
        if first is None:
            first = loss_v
        if step % 10 == 0 or step == cfg.steps - 1:
            losses.append(round(loss_v, 5))
        if bar is not None:
            if step % 20 == 0:
                bar.set_postfix(loss=f"{loss_v:.4f}", refresh=False)  # drawn by update, at the bar's interval
            bar.update(1)
    if bar is not None:
        bar.close()
    model.eval()
    return {"final_loss": loss_v, "first_loss": first, "steps": cfg.steps,
            "seconds": time.perf_counter() - t0, "losses": losses}
