"""Validation during training: the metrics, and sample texts for the logs."""

from __future__ import annotations

from contextlib import contextmanager

import torch

from fmlm import length


@contextmanager
def ema_weights(trainer, use_ema: bool = True):
    """The trainer's method in eval mode, with the EMA weights unless ``use_ema`` is False; the training
    weights and train mode are put back after."""
    model = trainer.method
    backup = None
    if use_ema:
        backup = {k: v.detach().clone() for k, v in model.state_dict().items()}
        model.load_state_dict({k: v.to(backup[k].dtype) for k, v in trainer.ema.state_dict().items()})
    model.eval()
    try:
        yield model
    finally:
        model.train()
        if backup is not None:
            model.load_state_dict(backup)


@torch.no_grad()
def evaluate(trainer, use_ema: bool = True) -> dict:
    """A trainer's validation metrics: ``eval_batches`` fixed batches with fixed noise (comparable across
    steps), with the EMA weights unless ``use_ema`` is False (the training weights are put back after)."""
    gen = torch.Generator(trainer.device).manual_seed(12345)
    n, B = len(trainer.data.val), trainer.cfg.train.batch_size
    sums: dict[str, float] = {}
    count = 0
    with ema_weights(trainer, use_ema) as model:
        for b in range(trainer.cfg.train.eval_batches):
            idx = [(b * B + i) % n for i in range(B)]
            with trainer._autocast():
                batch = trainer.data.val.batch(idx).to(trainer.device)
                # Under FSDP through the wrapper (all ranks; it gathers the shards); under DDP rank 0
                # calls the bare module, since DDP's forward may broadcast buffers (a collective).
                m = trainer.model(batch, gen, evaluate=True) if trainer.sharded else model.eval_loss(batch, gen)
            for k, v in m.items():
                sums[k] = sums.get(k, 0.0) + v
            count += 1
    return {f"val_{k}": v / count for k, v in sums.items()}


@torch.no_grad()
def sample_texts(trainer, max_samples: int = 8) -> list[str]:
    """Sample texts of the EMA model (``sample.num_samples``, at most ``max_samples``, with ``sample.steps``
    and ``sample.seed``: the same draw at every evaluation), each cut at its first EOS. The draw has its
    own generator, so training's random streams are untouched."""
    cfg = trainer.cfg
    n = min(cfg.sample.num_samples, max_samples)
    gen = torch.Generator(trainer.device).manual_seed(cfg.sample.seed)
    with ema_weights(trainer) as model:
        ids = model.sample(n, cfg.data.seq_len, cfg.sample.steps, generator=gen)
    tok = trainer.data.tokenizer
    rows, _ = length.split_at_eos(ids.cpu(), length.eos_id_of(tok))
    return [tok.decode(r) for r in rows]
