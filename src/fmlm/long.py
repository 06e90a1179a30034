"""Long texts, block by block: ``length`` beyond the model's block of L tokens.

Every sampler writes one block of L tokens (the length the model was trained on). A longer text
is written block after block: the first block is sampled as usual (with the caller's prefix,
``bos`` and guidance), and each next block is sampled with the last ``context`` K tokens of the
text so far as its prefix, through the same ``prefix`` conditioning as ``--prefix``
(:meth:`fmlm.api.Model.sample_ids`, :mod:`fmlm.guidance`), so a method's conditioning, whatever
it is (known-token clamping, noise inversion, or a learned one), is used without a second
mechanism. Each block after the first adds L − K new tokens; the last one is cut so the text has
exactly ``length`` tokens (``bos``: after the leading separator). ``steps`` are per block (a
one-step flow map makes one step per block). The default context is half the block.

The same for every method. The AR baseline's positions are bounded by its block (its rotary
positions and KV cache were trained and allocated for L positions, and its forward pass refuses
more), so it too continues with a sliding window: each block re-reads the last K tokens (forced
through its cache) and decodes L − K new ones; ``context`` L − 1 makes the window slide one
token at a time, the plain sliding-window decoding (at one block of passes per token).

Variable length composes (:mod:`fmlm.length`): the long text ends at its first EOS, and
``min_length`` redraws a whole long text. Once every row has an EOS no further block is sampled
and the rest of the raw ids is EOS. Block b > 0 is drawn with the seed :func:`block_seed`
(seed, b), block 0 with ``seed`` itself, so the first block of a long text is the one-block
sample of the same seed, and the same seed gives the same text.
"""

from __future__ import annotations

import hashlib
from typing import Callable

import torch

from fmlm import length as lengths
from fmlm.errors import FmlmError

#: Options that condition one block; the blocks after the first are conditioned on the context only.
_ONE_BLOCK = ("suffix", "infill", "known", "mask")


def default_context(block: int) -> int:
    """Half the block (rounded down)."""
    return block // 2


def block_seed(seed: int, block: int) -> int:
    """The seed of block ``block`` (0 is ``seed`` itself; later ones a hash of both, < 2**63)."""
    if block == 0:
        return seed
    digest = hashlib.blake2b(f"fmlm-block:{seed}:{block}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") >> 1


def check_long_options(length, context, block: int) -> int:
    """Raise FmlmError (one line) for a ``length`` or ``context`` that cannot work; return the context."""
    if isinstance(length, bool) or not isinstance(length, int) or length < 1:
        raise FmlmError(f"length must be an integer >= 1, got {length!r}")
    if context is None:
        return default_context(block)
    if isinstance(context, bool) or not isinstance(context, int) or context < 0:
        raise FmlmError(f"context must be an integer >= 0, got {context!r}")
    if context >= block:
        raise FmlmError(
            f"context {context} must be shorter than the block of {block} tokens "
            "(each next block needs room for new tokens)"
        )
    return context


def num_blocks(total: int, block: int, context: int) -> int:
    """Blocks needed for ``total`` positions: one, then one per L − K new positions."""
    if total <= block:
        return 1
    return 1 + -(-(total - block) // (block - context))


def blockwise(
    draw_block: Callable[[int, torch.Tensor | None], torch.Tensor],
    total: int,
    block: int,
    context: int,
    seed: int,
    eos_id: int | None = None,
    start: int = 0,
) -> torch.Tensor:
    """Ids (N, total) written block by block.

    Args:
        draw_block: ``draw_block(seed, prefix)`` -> ids (N, block); ``prefix`` is None for the
            first block, else the (N, context) ids the block must start with.
        total: positions of the result (the text's length, plus one with ``bos``).
        block: L, each block's length.
        context: K, how many of the last tokens each next block is conditioned on.
        seed: the first block's seed (later blocks: :func:`block_seed`).
        eos_id: when every row has an EOS at or after ``start``, stop and fill the rest with it.
        start: where the text starts (1 with ``bos``: the separator is not an end).
    """
    first = draw_block(seed, None)
    n = first.shape[0]
    out = torch.empty((n, total), dtype=first.dtype)
    take = min(block, total)
    out[:, :take] = first[:, :take].cpu()
    pos, b = take, 1
    while pos < total:
        if eos_id is not None and bool((out[:, start:pos] == eos_id).any(-1).all()):
            out[:, pos:] = eos_id  # every text has ended: nothing after it is returned
            break
        prefix = out[:, pos - context : pos] if context else None
        ids = draw_block(block_seed(seed, b), prefix).cpu()
        take = min(block - context, total - pos)
        out[:, pos : pos + take] = ids[:, context : context + take]
        pos, b = pos + take, b + 1
    return out


def later_options(options: dict, total: int, block: int) -> dict:
    """The options of the blocks after the first: the first block's without its prefix. Conditioning
    that fixes positions inside one whole block (suffix, infill, known ids) is refused unless the
    text is exactly one block."""
    for k in _ONE_BLOCK:
        if total != block and options.get(k) is not None:
            name = {"known": "known ids", "mask": "a mask of known positions"}.get(k, k)
            raise FmlmError(
                f"{name} conditions one whole block of {block} tokens; a text of another length "
                "takes only a prefix (each later block continues the last context tokens)"
            )
    return {k: v for k, v in options.items() if k != "prefix"}


def generate(
    model,
    num_samples: int,
    steps: int | None,
    seed: int,
    length: int,
    context: int | None = None,
    min_length: int = 0,
    max_tries: int = lengths.DEFAULT_MAX_TRIES,
    bos: bool = False,
    seq_len: int | None = None,
    **options,
) -> lengths.Samples:
    """Texts of ``length`` tokens from ``model`` (a :class:`fmlm.api.Model`), written block by block
    (the module docstring) and cut at their first EOS.

    ``seq_len`` is the block length L (default: the model's); ``options`` as in
    :meth:`fmlm.api.Model.sample_ids`, the prefix for the first block only. A ``length`` within
    one block samples one full block and cuts it, so a shorter text of a seed is the start of a
    longer one."""
    block = model.config.data.seq_len if seq_len is None else seq_len
    if bos:
        model._check_bos()
    k = check_long_options(length, context, block)
    total = length + int(bool(bos))
    lengths.check_length_options(min_length, max_tries, total, bos)
    later = later_options(options, total, block)

    def draw_block(s: int, prefix: torch.Tensor | None) -> torch.Tensor:
        if prefix is None:
            return model.sample_ids(num_samples, steps, s, seq_len=block, bos=bos, **options)
        return model.sample_ids(num_samples, steps, s, seq_len=block, prefix=prefix, **later)

    def draw(s: int) -> torch.Tensor:
        return blockwise(draw_block, total, block, k, s, lengths.eos_id_of(model.tokenizer), int(bool(bos)))

    return lengths.generate(draw, model.tokenizer, num_samples, seed, min_length, max_tries, bos)
