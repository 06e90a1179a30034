"""Checkpoints: one directory per checkpoint, written atomically, loaded strictly.

Layout of a checkpoint directory::

    config.json          resolved RunConfig (rebuilds the model without the command)
    model.safetensors    raw weights of the method module
    ema.safetensors      EMA weights (optional)
    optimizer.safetensors  optimiser + LR-scheduler state (optional; training only)
    trainer_state.json   step, data position, tokens seen, ... (optional; training only)
    rng.safetensors      every RNG state (optional; training only)
    tokenizer/           the tokenizer, so sampling needs nothing else
    manifest.json        size and sha256 of every file above; written last

A run directory keeps its checkpoints under ``checkpoints/step_XXXXXXXX``. A
checkpoint is first written to a hidden temporary directory and renamed into
place, so a crash at any moment leaves either the old set or the new one. A
directory without a valid manifest is partial or corrupt: resuming skips it
with a warning; loading it explicitly is an error.

Nothing in a checkpoint is unpickled: weights are safetensors, and the optimiser and
RNG states are trees of plain containers and tensors stored as safetensors, their
structure as JSON in the file's metadata (:func:`save_tree`, :func:`load_tree`).
Checkpoints of older versions (``optimizer.pt``, ``rng.pt``) are read with
``torch.load(weights_only=True)``, which only accepts tensors, plain containers and
numpy's RNG arrays; anything else is refused with a one-line error.
"""

from fmlm.checkpoint.layout import LEGACY, MANIFEST, OPTIMIZER, PREFIX, RNG, read_json, verify
from fmlm.checkpoint.runs import (
    clean_stale,
    is_valid,
    latest_checkpoint,
    list_checkpoints,
    newest_valid,
    pin,
    pinned,
    prune,
    resolve,
    step_of,
)
from fmlm.checkpoint.store import load_into, load_state, save_checkpoint
from fmlm.checkpoint.trees import load_training_state, load_tree, save_tree
