"""Training: one loop for every method (:class:`Trainer`), with its EMA, run state, checkpoints and
torchrun support (:mod:`fmlm.train.distributed`)."""

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
