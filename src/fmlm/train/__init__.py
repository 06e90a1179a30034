"""Training: one loop for every method (:class:`Trainer`), with its EMA, run state, checkpoints
and torchrun support (:mod:`fmlm.train.distributed`).

The loop knows nothing about noise processes: it asks the method for
``loss(ids, generator, strata)`` and ``eval_loss(ids, generator)``. It owns the device,
precision, optimiser (AdamW + warm-up), gradient clipping, EMA, logging
(JSONL + progress bar), periodic evaluation, atomic checkpoints and resume.

Resume is exact: the data order is a pure function of (seed, epoch), and the
step, data position, optimiser, scheduler, EMA and every RNG state are stored in
each checkpoint, so a resumed run continues the same trajectory.

Under ``torchrun`` (see :mod:`fmlm.train.distributed`) the same loop runs on every rank:
``train.batch_size`` is the global batch, split into equal parts of
``micro_batch_size`` over ranks and accumulation steps; part k = j·W + r (micro-step j,
rank r) takes the k-th slice of the global batch's indices, and its noise comes from a
generator seeded by (step seed, k), with times stratified over the whole global batch.
So a run depends on the global and micro batch sizes, not on how the parts are spread
over devices: W ranks with accumulation a match one process with accumulation W·a.
Logging, evaluation and checkpoints happen on rank 0 (all ranks under FSDP, whose state
is sharded); the others wait in barriers.
"""

from fmlm.data.load import load_data
from fmlm.runtime import autocast_dtype, default_cache_dir, pick_device
from fmlm.train.loop import Trainer
from fmlm.train.optim import EMA, lr_lambda
from fmlm.train.state import (
    RESUMABLE_KEYS,
    TrainState,
    archive_run,
    check_free_space,
    check_resumable,
    check_run_dir,
    rng_state,
    set_rng_state,
)
