"""Validation during training."""

from __future__ import annotations

import torch


@torch.no_grad()
def evaluate(trainer, use_ema: bool = True) -> dict:
    """A trainer's validation metrics: ``eval_batches`` fixed batches with fixed noise (comparable across
    steps), with the EMA weights unless ``use_ema`` is False (the training weights are put back after)."""
    model = trainer.method
    backup = None
    if use_ema:
        backup = {k: v.detach().clone() for k, v in model.state_dict().items()}
        model.load_state_dict({k: v.to(backup[k].dtype) for k, v in trainer.ema.state_dict().items()})
    model.eval()
    gen = torch.Generator(trainer.device).manual_seed(12345)
    n, B = len(trainer.data.val), trainer.cfg.train.batch_size
    sums: dict[str, float] = {}
    count = 0
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
    model.train()
    if backup is not None:
        model.load_state_dict(backup)
    return {f"val_{k}": v / count for k, v in sums.items()}
