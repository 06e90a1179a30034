"""Causal (decoder-only) transformer for the autoregressive baseline, with a KV cache.

Shape notation: B batch, L sequence length, V vocabulary size, D model width,
H heads, hd = D / H head width, P positions already held in the cache.

The blocks mirror :class:`fmlm.nn.dit.DiTBlock` (pre-norm, bias-free attention
projections, rotary position embeddings, GELU MLP of the same width, SDPA), but
without time conditioning: the adaLN modulation becomes the learned affine of a
plain LayerNorm, as in GPT-2. At equal width and depth the parameter count is
the DiT's minus its time embedding and adaLN layers.

The input is a token id. Id ``V`` is reserved for a learned beginning-of-sequence
(BOS) token, so the model needs no knowledge of the tokenizer's specials: the
embedding table has ``V + 1`` rows, the output head ``V`` columns (BOS is never
predicted).

Decoding with the cache: :meth:`CausalTransformer.forward` takes the new tokens
(any number) and a :class:`KVCache`; it appends their keys/values and attends
each new query to every cached position up to and including its own. The
uncached path (``cache=None``) is ordinary causal self-attention over the whole
input, so both compute the same function.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from fmlm.errors import FmlmError
from fmlm.nn.dit import Rotary, rotary_qkv

if TYPE_CHECKING:
    from fmlm.config import ModelConfig


class KVCache:
    """Preallocated keys and values of every layer for incremental decoding.

    Args:
        n_layers: number of transformer blocks.
        batch: B.
        n_heads: H.
        head_dim: hd.
        max_len: the most positions the cache can hold.
        device, dtype: where and in what precision keys/values are stored.

    Attributes:
        length: P, positions filled so far (the next token's position).
    """

    def __init__(
        self,
        n_layers: int,
        batch: int,
        n_heads: int,
        head_dim: int,
        max_len: int,
        device: torch.device,
        dtype: torch.dtype,
    ):
        shape = (batch, n_heads, max_len, head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layers)]
        self.max_len = max_len
        self.length = 0
        self.rope: tuple[torch.Tensor, torch.Tensor] | None = None  # (max_len, hd/2) tables, set by the model

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v (B, H, n, hd) at positions [P, P + n); return all keys/values (B, H, P + n, hd).

        ``length`` is advanced by :meth:`advance` once every layer has written,
        so all layers of one forward pass see the same P.
        """
        start, end = self.length, self.length + k.shape[2]
        self.k[layer][:, :, start:end] = k.to(self.k[layer].dtype)
        self.v[layer][:, :, start:end] = v.to(self.v[layer].dtype)
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]

    def advance(self, n: int) -> None:
        self.length += n


class CausalBlock(nn.Module):
    """Pre-LN GPT block: ``h + attn(LN(h))`` then ``h + mlp(LN(h))``, causal attention with RoPE."""

    def __init__(self, d_model: int, n_heads: int, mlp_ratio: float, dropout: float):
        super().__init__()
        self.n_heads = n_heads
        self.norm1 = nn.LayerNorm(d_model, eps=1e-6)
        self.qkv = nn.Linear(d_model, 3 * d_model, bias=False)
        self.proj = nn.Linear(d_model, d_model, bias=False)
        self.norm2 = nn.LayerNorm(d_model, eps=1e-6)
        hidden = int(mlp_ratio * d_model)
        self.mlp = nn.Sequential(nn.Linear(d_model, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, d_model))
        self.dropout = dropout

    def attention(
        self, h: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], cache: KVCache | None, layer: int
    ) -> torch.Tensor:
        B, n, D = h.shape
        q, k, v = rotary_qkv(self.qkv(h), self.n_heads, rope)  # 3 x (B,H,n,hd); rope: positions [P, P + n)
        p = self.dropout if self.training else 0.0
        if cache is None:
            out = F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=True)  # (B,H,n,hd)
        else:
            P = cache.length
            k, v = cache.update(layer, k, v)  # (B,H,P+n,hd)
            k, v = k.to(q.dtype), v.to(q.dtype)
            if n == 1 and p == 0.0:
                # One new query may see every cached key: no mask needed. Two batched products
                # (the math kernel): the fused CPU kernels carry a fixed cost per call that
                # dominates at one query.
                att = (q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5  # (B,H,1,P+1)
                out = att.softmax(-1) @ v
            elif n == 1:
                out = F.scaled_dot_product_attention(q, k, v, dropout_p=p)
            else:
                # SDPA's is_causal aligns the mask to the top-left corner, which is wrong once
                # P > 0; query i (absolute position P + i) may see keys 0 .. P + i.
                qpos = torch.arange(P, P + n, device=h.device)[:, None]
                kpos = torch.arange(P + n, device=h.device)[None, :]
                out = F.scaled_dot_product_attention(q, k, v, attn_mask=kpos <= qpos, dropout_p=p)
        return self.proj(out.transpose(1, 2).reshape(B, n, D))

    def forward(
        self, h: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], cache: KVCache | None = None, layer: int = 0
    ) -> torch.Tensor:
        h = h + F.dropout(self.attention(self.norm1(h), rope, cache, layer), self.dropout, self.training)
        return h + F.dropout(self.mlp(self.norm2(h)), self.dropout, self.training)


class CausalTransformer(nn.Module):
    """Decoder-only transformer over token ids with a learned BOS id ``V``.

    Args:
        vocab_size: V, the number of predictable tokens; inputs may also be ``V`` (BOS).
        max_seq_len: most positions one sequence may occupy (BOS included).
        n_layers, d_model, n_heads, mlp_ratio, dropout: the usual sizes (as the DiT's).
        logit_cap: soft cap ``cap * tanh(logits / cap)`` on the output (0 disables).
    """

    def __init__(
        self,
        vocab_size: int,
        max_seq_len: int,
        n_layers: int = 2,
        d_model: int = 64,
        n_heads: int = 4,
        mlp_ratio: float = 4.0,
        dropout: float = 0.0,
        logit_cap: float = 30.0,
    ):
        super().__init__()
        if d_model % n_heads or (d_model // n_heads) % 2:
            raise ValueError("d_model must be a multiple of 2 * n_heads")
        self.vocab_size = vocab_size
        self.bos_id = vocab_size
        self.max_seq_len = max_seq_len
        self.n_heads = n_heads
        self.head_dim = d_model // n_heads
        self.logit_cap = logit_cap
        self.embed = nn.Embedding(vocab_size + 1, d_model)  # row V is BOS
        self.rotary = Rotary(self.head_dim)
        self.blocks = nn.ModuleList(CausalBlock(d_model, n_heads, mlp_ratio, dropout) for _ in range(n_layers))
        self.norm_out = nn.LayerNorm(d_model, eps=1e-6)
        self.out = nn.Linear(d_model, vocab_size)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Xavier for linear layers, small normal embeddings and output head (as the DiT)."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        nn.init.normal_(self.embed.weight, std=0.02)
        nn.init.normal_(self.out.weight, std=0.02)
        # GPT-2 style: scale the residual output projections down with depth so the
        # residual stream's variance does not grow with the number of blocks.
        for block in self.blocks:
            nn.init.normal_(block.proj.weight, std=0.02 / (2 * len(self.blocks)) ** 0.5)
            nn.init.normal_(block.mlp[2].weight, std=0.02 / (2 * len(self.blocks)) ** 0.5)

    def new_cache(self, batch: int, device: torch.device | None = None, dtype: torch.dtype | None = None) -> KVCache:
        """An empty cache for ``batch`` sequences of up to ``max_seq_len`` positions."""
        w = self.embed.weight
        cache = KVCache(
            len(self.blocks), batch, self.n_heads, self.head_dim, self.max_seq_len, device or w.device, dtype or w.dtype
        )
        cache.rope = self.rotary(self.max_seq_len, device or w.device, w.dtype)
        return cache

    def forward(self, ids: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        """Next-token logits (B, n, V) for ids (B, n) in [0, V] (V = BOS).

        Without a cache the ids are positions 0 .. n-1; with a cache they continue
        it at positions P .. P+n-1 and their keys/values are appended.
        """
        B, n = ids.shape
        start = 0 if cache is None else cache.length
        if start + n > self.max_seq_len:
            raise FmlmError(f"sequence length {start + n} exceeds the model's maximum {self.max_seq_len}")
        h = self.embed(ids)  # (B, n, D)
        if cache is not None and cache.rope is not None and cache.rope[0].dtype == h.dtype:
            cos, sin = cache.rope  # computed once per cache
        else:
            cos, sin = self.rotary(start + n, h.device, h.dtype)
        rope = (cos[start : start + n], sin[start : start + n])  # (n, hd/2)
        for i, block in enumerate(self.blocks):
            h = block(h, rope, cache, i)
        if cache is not None:
            cache.advance(n)
        logits = self.out(self.norm_out(h))  # (B, n, V)
        if self.logit_cap > 0:
            logits = self.logit_cap * torch.tanh(logits / self.logit_cap)
        return logits

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())


def build_causal(model_cfg: ModelConfig) -> CausalTransformer:
    """Build the AR baseline's transformer from a :class:`fmlm.config.ModelConfig`.

    ``max_seq_len`` is the data's block length L: the model reads BOS plus the
    first L − 1 tokens to predict all L.
    """
    return CausalTransformer(
        vocab_size=model_cfg.vocab_size,
        max_seq_len=model_cfg.max_seq_len,
        n_layers=model_cfg.n_layers,
        d_model=model_cfg.d_model,
        n_heads=model_cfg.n_heads,
        mlp_ratio=model_cfg.mlp_ratio,
        dropout=model_cfg.dropout,
        logit_cap=model_cfg.logit_cap,
    )
