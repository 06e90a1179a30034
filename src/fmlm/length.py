"""Variable-length samples: every sampler writes a fixed block, and a text ends at its first EOS.

One function, :func:`split_at_eos`, cuts the samples of every method (FLM, the flow maps, MDLM, Duo,
DCD, SDTT, AR) for the Python API (:meth:`fmlm.api.Model.generate` and ``sample``), ``fmlm sample``
and ``fmlm serve``; the bench's scorers use it too. The raw fixed-length block stays available
(:meth:`fmlm.api.Model.sample_ids`, :attr:`Samples.raw`).

* ``min_length`` N: a sample with fewer than N tokens before its EOS is drawn again, at most
  ``max_tries`` draws in all; draw k > 0 samples the whole batch with the seed
  :func:`retry_seed` (seed, k) and row i takes row i of the first later draw that is long enough
  (so per-row conditioning stays with its row and the same seed gives the same result). Rows still
  short after the last draw are rejected: dropped from the result and counted in
  :attr:`Samples.rejected`.
* ``bos``: for models trained on packed (``wrap``) text, where a block may start mid-document, the
  first position is given the EOS separator as a known token (the prefix machinery of
  :mod:`fmlm.guidance`), so the sample starts where a document starts. That leading separator is
  not part of the returned ids or text, and the first EOS after it ends the sample.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import torch

from fmlm.errors import FmlmError

#: Draws per sample, the first included, before a too-short sample is rejected.
DEFAULT_MAX_TRIES = 8


def eos_id_of(tokenizer) -> int | None:
    """The tokenizer's EOS id, or None when it has none inside its vocabulary."""
    eos = getattr(tokenizer, "eos_id", None)
    if isinstance(eos, int) and 0 <= eos < getattr(tokenizer, "vocab_size", eos + 1):
        return eos
    return None


def split_at_eos(ids: torch.Tensor, eos_id: int | None, start: int = 0) -> tuple[list[list[int]], list[bool]]:
    """Each row of ``ids`` (N, L) from position ``start`` up to (not including) its first EOS at or after
    ``start``, and whether it had one. Without an EOS id the rows are only cut at ``start``."""
    rows, ended = [], []
    for row in ids.tolist():
        row = row[start:]
        if eos_id is not None and eos_id in row:
            rows.append(row[: row.index(eos_id)])
            ended.append(True)
        else:
            rows.append(row)
            ended.append(False)
    return rows, ended


def retry_seed(seed: int, attempt: int) -> int:
    """The seed of draw ``attempt`` (0 is ``seed`` itself; later ones a hash of both, < 2**63)."""
    if attempt == 0:
        return seed
    digest = hashlib.blake2b(f"fmlm-retry:{seed}:{attempt}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") >> 1


def check_length_options(min_length: int, max_tries: int, seq_len: int, bos: bool) -> None:
    """Raise FmlmError (one line) for a ``min_length`` or ``max_tries`` that cannot work."""
    room = seq_len - int(bool(bos))
    if isinstance(min_length, bool) or not isinstance(min_length, int) or min_length < 0:
        raise FmlmError(f"min_length must be an integer >= 0, got {min_length!r}")
    if min_length > room:
        raise FmlmError(
            f"min_length {min_length} is more than the {room} tokens a sample can hold "
            f"(sequence length {seq_len}{', one taken by --bos' if bos else ''})"
        )
    if isinstance(max_tries, bool) or not isinstance(max_tries, int) or max_tries < 1:
        raise FmlmError(f"max_tries must be an integer >= 1, got {max_tries!r}")


def bos_known(known, eos_id: int):
    """Known ids with the EOS separator put in front (a prefix of one token when there were none)."""
    if known is None:
        return [eos_id]
    t = torch.as_tensor(known, dtype=torch.long)
    head = torch.full((*t.shape[:-1], 1), eos_id, dtype=torch.long)
    return torch.cat([head, t], -1)


@dataclass
class Samples:
    """What :meth:`fmlm.api.Model.generate` returns.

    Attributes:
        ids: each accepted sample's token ids, cut before its first EOS (and after the BOS).
        texts: those ids decoded.
        ended: whether each accepted sample had an EOS (False: it filled the block).
        raw: the accepted samples' fixed-length blocks (N', L), EOS and padding included.
        rejected: how many samples stayed shorter than ``min_length`` after ``tries`` draws.
        tries: how many draws were made (1 when none was short).
        seeds: the seed of each draw (:func:`retry_seed`).
    """

    ids: list[list[int]]
    texts: list[str]
    ended: list[bool]
    raw: torch.Tensor
    rejected: int = 0
    tries: int = 1
    seeds: list[int] = field(default_factory=list)


def generate(draw, tokenizer, num_samples: int, seed: int, min_length: int, max_tries: int, bos: bool) -> Samples:
    """Draw ``num_samples`` blocks with ``draw(seed) -> (N, L) ids``, cut them at EOS and redraw the short ones
    (the policy in the module docstring)."""
    eos, start = eos_id_of(tokenizer), int(bool(bos))
    raw = draw(seed)
    rows, ended = split_at_eos(raw, eos, start)
    short = [i for i, r in enumerate(rows) if len(r) < min_length]
    seeds, tries = [seed], 1
    while short and tries < max_tries:
        s = retry_seed(seed, tries)
        seeds.append(s)
        tries += 1
        more = draw(s)
        more_rows, more_ended = split_at_eos(more, eos, start)
        for i in list(short):
            if len(more_rows[i]) >= min_length:
                raw[i], rows[i], ended[i] = more[i], more_rows[i], more_ended[i]
                short.remove(i)
    keep = [i for i in range(len(rows)) if i not in set(short)]
    return Samples(
        ids=[rows[i] for i in keep],
        texts=[tokenizer.decode(rows[i]) for i in keep],
        ended=[ended[i] for i in keep],
        raw=raw[keep],
        rejected=len(short),
        tries=tries,
        seeds=seeds,
    )
