"""Bidirectional diffusion transformer (DiT) backbone.

Shape notation: B batch, L sequence length, V vocabulary size, D model width,
H heads, C conditioning width.

Design points that the methods rely on:

* The input layer is linear and bias-free: token ids ``(B, L)`` are looked up in
  ``E`` and real vectors ``x`` of shape ``(B, L, V)`` (one-hot, noisy one-hot,
  points anywhere in R^V) are mapped to ``x @ E``. Both agree on one-hot inputs,
  and a caller may also pass the already-embedded ``(B, L, D)`` tensor, which
  lets the noise part of the interpolant be drawn directly in D dimensions.
* Time conditioning is on one time (FLM's τ) or two times (the flow map's τ_s,
  τ_t). The second time's MLP ends in a zero-initialised layer, so a two-time
  student copied from a one-time teacher computes exactly the teacher's function.
* adaLN-zero: every block's modulation is zero-initialised, so each block starts
  as the identity; attention goes through ``scaled_dot_product_attention`` with
  rotary position embeddings (no flash-attn dependency).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from fmlm.errors import FmlmError

if TYPE_CHECKING:
    from fmlm.config import ModelConfig


class TimeEmbedding(nn.Module):
    """Sinusoidal features of a scalar time in [0, 1], then a 2-layer MLP to width C."""

    def __init__(self, cond_dim: int, freq_dim: int = 256, max_period: float = 10_000.0, scale: float = 1000.0):
        super().__init__()
        self.freq_dim = freq_dim
        self.max_period = max_period
        self.scale = scale
        self.mlp = nn.Sequential(nn.Linear(freq_dim, cond_dim), nn.SiLU(), nn.Linear(cond_dim, cond_dim))

    def forward(self, t: torch.Tensor) -> torch.Tensor:  # (B,) -> (B, C)
        half = self.freq_dim // 2
        # float32 at least (also under autocast); float64 when the module is in float64.
        dtype = torch.float64 if self.mlp[0].weight.dtype == torch.float64 else torch.float32
        freqs = torch.exp(-math.log(self.max_period) * torch.arange(half, device=t.device, dtype=dtype) / half)
        # Times live in [0, 1]; by default scaled by 1000 so the low frequencies still resolve
        # small differences (scale 1 feeds τ itself, as the flm authors do).
        args = self.scale * t.to(dtype)[:, None] * freqs[None]
        emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        return self.mlp(emb.to(self.mlp[0].weight.dtype))


class Rotary(nn.Module):
    """Rotary position embedding tables, cached per length and device."""

    def __init__(self, head_dim: int, base: float = 10_000.0):
        super().__init__()
        inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, length: int, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        pos = torch.arange(length, device=device, dtype=torch.float32)
        freqs = torch.outer(pos, self.inv_freq.to(device))  # (L, hd/2)
        return freqs.cos().to(dtype), freqs.sin().to(dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (x1, x2) of the last dim. x: (B, H, L, hd); cos/sin: (L, hd/2)."""
    x1, x2 = x[..., 0::2], x[..., 1::2]
    out = torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)
    return out.flatten(-2)


def rotary_qkv(
    qkv: torch.Tensor, n_heads: int, rope: tuple[torch.Tensor, torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Split a fused projection (B, L, 3·D) into q, k, v (B, H, L, hd), with q and k rotated.

    The rotation is applied to q and k together, in the projection's own layout (before the
    head transpose): the same arithmetic as :func:`apply_rotary` on each, in fewer and less
    strided operations.
    """
    B, L, D3 = qkv.shape
    x = qkv.view(B, L, 3, n_heads, D3 // (3 * n_heads))
    cos, sin = rope[0][:, None, None], rope[1][:, None, None]  # (L, 1, 1, hd/2)
    qk = x[:, :, :2]
    x1, x2 = qk[..., 0::2], qk[..., 1::2]
    qk = torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).flatten(-2).permute(2, 0, 3, 1, 4)
    return qk[0], qk[1], x[:, :, 2].permute(0, 2, 1, 3)


def softcapped_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cap: float, dropout: float = 0.0, training: bool = False
) -> torch.Tensor:
    """Attention with soft-capped logits, ``cap * tanh(q·k / sqrt(hd) / cap)`` (the flm authors' DiT,
    flash-attn's ``softcap``); (B, H, L, hd) in and out. SDPA has no soft cap, so this path is explicit."""
    scores = (q / math.sqrt(q.shape[-1])) @ k.transpose(-2, -1)  # (B, H, L, L)
    probs = (cap * torch.tanh(scores / cap)).softmax(-1)
    return F.dropout(probs, dropout, training) @ v


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale[:, None]) + shift[:, None]


class DiTBlock(nn.Module):
    """Pre-norm transformer block with adaLN-zero conditioning."""

    def __init__(
        self,
        d_model: int,
        n_heads: int,
        cond_dim: int,
        mlp_ratio: float,
        dropout: float,
        norm_affine: bool = False,
        norm_eps: float = 1e-6,
        attn_softcap: float = 0.0,
    ):
        super().__init__()
        self.n_heads = n_heads
        self.attn_softcap = attn_softcap
        self.norm1 = nn.LayerNorm(d_model, elementwise_affine=norm_affine, eps=norm_eps)
        self.qkv = nn.Linear(d_model, 3 * d_model, bias=False)
        self.proj = nn.Linear(d_model, d_model, bias=False)
        self.norm2 = nn.LayerNorm(d_model, elementwise_affine=norm_affine, eps=norm_eps)
        hidden = int(mlp_ratio * d_model)
        self.mlp = nn.Sequential(nn.Linear(d_model, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, d_model))
        self.dropout = dropout
        # shift/scale/gate for attention and MLP; zero-initialised by DiT.reset_parameters
        # so that the block is the identity at start (adaLN-zero).
        self.ada = nn.Linear(cond_dim, 6 * d_model)

    def attention(self, h: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        B, L, D = h.shape
        q, k, v = rotary_qkv(self.qkv(h), self.n_heads, rope)  # 3 x (B,H,L,hd)
        p = self.dropout if self.training else 0.0
        if self.attn_softcap > 0:
            out = softcapped_attention(q, k, v, self.attn_softcap, p, self.training)
        else:
            out = F.scaled_dot_product_attention(q, k, v, dropout_p=p)  # (B,H,L,hd)
        return self.proj(out.transpose(1, 2).reshape(B, L, D))

    def forward(self, h: torch.Tensor, c: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        shift1, scale1, gate1, shift2, scale2, gate2 = self.ada(c).chunk(6, dim=-1)  # each (B, D)
        a = self.attention(modulate(self.norm1(h), shift1, scale1), rope)
        h = h + gate1[:, None] * F.dropout(a, self.dropout, self.training)
        m = self.mlp(modulate(self.norm2(h), shift2, scale2))
        return h + gate2[:, None] * F.dropout(m, self.dropout, self.training)


class DiT(nn.Module):
    """Diffusion transformer over sequences of vocabulary-sized vectors.

    Args:
        vocab_size: V, the size of the one-hot space (input and output).
        max_seq_len: longest sequence accepted; longer inputs raise :class:`FmlmError`.
        n_layers, d_model, n_heads, cond_dim, mlp_ratio, dropout: the usual sizes.
        two_time: condition on two times (s, t) instead of one.
        logit_cap: soft cap ``cap * tanh(logits / cap)`` on the output (0 disables).
        time_scale: τ is multiplied by this before the sinusoidal time features.
        zero_out: zero-initialise the output layer (uniform logits at start).
        embed_std: initial standard deviation of the input embedding E.
        norm_affine: LayerNorms with a learned gain and bias.
        position_embedding: add a learned absolute position embedding (max_seq_len, D) to the
            embedded input (``self.pos``; ``None`` when off).
        norm_eps: the LayerNorms' epsilon (1e-6; the flm authors' DiT: 1e-5).
        attn_softcap: soft cap ``cap * tanh(s / cap)`` on the attention logits (0 disables; the
            flm authors' DiT: 50).
        given_embedding: a learned "given" vector (D,) added to the embedded input at the
            positions flagged by ``forward(..., given=)`` (``self.given_embed``; ``None`` when off,
            the default: it exists only for models trained with conditioning, :mod:`fmlm.conditioning`).
    """

    def __init__(
        self,
        vocab_size: int,
        max_seq_len: int,
        n_layers: int = 2,
        d_model: int = 64,
        n_heads: int = 4,
        cond_dim: int = 32,
        mlp_ratio: float = 4.0,
        dropout: float = 0.0,
        two_time: bool = False,
        logit_cap: float = 30.0,
        time_scale: float = 1000.0,
        zero_out: bool = False,
        embed_std: float = 0.02,
        norm_affine: bool = False,
        position_embedding: bool = False,
        norm_eps: float = 1e-6,
        attn_softcap: float = 0.0,
        given_embedding: bool = False,
    ):
        super().__init__()
        if d_model % n_heads or (d_model // n_heads) % 2:
            raise ValueError("d_model must be a multiple of 2 * n_heads")
        self.vocab_size = vocab_size
        self.max_seq_len = max_seq_len
        self.two_time = two_time
        self.logit_cap = logit_cap
        self.zero_out = zero_out
        self.embed_std = embed_std
        self.inplace_cap = True  # without a graph, cap the logits in place (False: the reference, out of place)
        # Linear, bias-free input layer: h = x @ E (and E[id] for ids).
        self.embed = nn.Parameter(torch.randn(vocab_size, d_model) * embed_std)
        # Learned absolute positions, added to the embedded input (off by default: RoPE only).
        self.pos = nn.Parameter(torch.zeros(max_seq_len, d_model)) if position_embedding else None
        # Learned flag of the known ("given") positions of a conditioned input (off by default).
        self.given_embed = nn.Parameter(torch.zeros(d_model)) if given_embedding else None
        self.time1 = TimeEmbedding(cond_dim, scale=time_scale)
        self.time2 = TimeEmbedding(cond_dim, scale=time_scale) if two_time else None
        self.rotary = Rotary(d_model // n_heads)
        self.blocks = nn.ModuleList(
            DiTBlock(d_model, n_heads, cond_dim, mlp_ratio, dropout, norm_affine, norm_eps, attn_softcap)
            for _ in range(n_layers)
        )
        self.norm_out = nn.LayerNorm(d_model, elementwise_affine=norm_affine, eps=norm_eps)
        self.ada_out = nn.Linear(cond_dim, 2 * d_model)
        self.out = nn.Linear(d_model, vocab_size)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Xavier for every linear layer, then the zero inits of adaLN-zero."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        nn.init.normal_(self.embed, std=self.embed_std)
        if self.pos is not None:
            nn.init.normal_(self.pos, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.LayerNorm) and m.elementwise_affine:
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        for ada in [b.ada for b in self.blocks] + [self.ada_out]:
            nn.init.zeros_(ada.weight)
            nn.init.zeros_(ada.bias)
        if self.zero_out:
            nn.init.zeros_(self.out.weight)
        else:
            nn.init.normal_(self.out.weight, std=0.02)
        if self.time2 is not None:
            self.zero_second_time()
        if self.given_embed is not None:  # last, so that every other weight starts as without it
            nn.init.normal_(self.given_embed, std=0.02)

    def zero_second_time(self) -> None:
        """Zero the last layer of the second time embedding so it contributes nothing."""
        if self.time2 is None:
            raise ValueError("backbone has no second time embedding")
        nn.init.zeros_(self.time2.mlp[-1].weight)
        nn.init.zeros_(self.time2.mlp[-1].bias)

    def embed_input(self, x: torch.Tensor) -> torch.Tensor:
        """Token ids (B, L) or vectors (B, L, V) -> embedded input (B, L, D)."""
        if x.dtype in (torch.int64, torch.int32):
            return F.embedding(x, self.embed)
        if x.shape[-1] != self.vocab_size:
            raise ValueError(f"input last dim {x.shape[-1]} != vocab size {self.vocab_size}")
        return x.to(self.embed.dtype) @ self.embed

    def cond(self, t: torch.Tensor, s: torch.Tensor | None = None) -> torch.Tensor:
        c = self.time1(t)
        if self.two_time:
            if s is None:
                raise ValueError("two-time backbone needs a second time")
            c = c + self.time2(s)
        elif s is not None:
            raise ValueError("one-time backbone got a second time")
        return F.silu(c)

    def forward(
        self,
        x: torch.Tensor | None,
        t: torch.Tensor,
        t2: torch.Tensor | None = None,
        embedded: torch.Tensor | None = None,
        cap: bool = True,
        given: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits of shape (B, L, V).

        Args:
            x: token ids (B, L) or vectors (B, L, V); ignored when ``embedded`` is given.
            t: (B,) or scalar time in [0, 1] (the network time τ).
            t2: second time (B,) for a two-time backbone.
            embedded: optional precomputed ``x @ E`` of shape (B, L, D).
            cap: apply the soft cap (``False``: the raw output, for a loss that applies it itself).
            given: optional (B, L) bool of the known positions, flagged by the given embedding.
        """
        logits = self.out(self.features(x, t, t2, embedded, given))  # (B, L, V)
        if self.logit_cap > 0 and cap:
            if logits.requires_grad or not self.inplace_cap:
                logits = self.logit_cap * torch.tanh(logits / self.logit_cap)
            else:  # no graph to keep: the same arithmetic in place, without (B, L, V) temporaries
                logits = logits.div_(self.logit_cap).tanh_().mul_(self.logit_cap)
        return logits

    def features(
        self,
        x: torch.Tensor | None,
        t: torch.Tensor,
        t2: torch.Tensor | None = None,
        embedded: torch.Tensor | None = None,
        given: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The final hidden states (B, L, D), normalised and modulated, before the output layer."""
        h = self.embed_input(x) if embedded is None else embedded  # (B, L, D)
        B, L, _ = h.shape
        if L > self.max_seq_len:
            raise FmlmError(f"sequence length {L} exceeds the model's maximum {self.max_seq_len}")
        if self.pos is not None:
            h = h + self.pos[:L].to(h.dtype)
        if given is not None:
            if self.given_embed is None:
                raise FmlmError("this backbone has no given embedding (it was trained without conditioning)")
            h = h + given[..., None].to(h.dtype) * self.given_embed.to(h.dtype)
        if torch.as_tensor(t).dim() == 0:
            t = torch.as_tensor(t, device=h.device, dtype=torch.float32).expand(B)
        if t2 is not None and torch.as_tensor(t2).dim() == 0:
            t2 = torch.as_tensor(t2, device=h.device, dtype=torch.float32).expand(B)
        c = self.cond(t, t2)  # (B, C)
        rope = self.rotary(L, h.device, h.dtype)
        for block in self.blocks:
            h = block(h, c, rope)
        shift, scale = self.ada_out(c).chunk(2, dim=-1)
        return modulate(self.norm_out(h), shift, scale)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())


def build_dit(model_cfg: ModelConfig, given_embedding: bool = False) -> DiT:
    """Build a DiT from a :class:`fmlm.config.ModelConfig` (``given_embedding``: see :class:`DiT`)."""
    return DiT(
        vocab_size=model_cfg.vocab_size,
        max_seq_len=model_cfg.max_seq_len,
        n_layers=model_cfg.n_layers,
        d_model=model_cfg.d_model,
        n_heads=model_cfg.n_heads,
        cond_dim=model_cfg.cond_dim,
        mlp_ratio=model_cfg.mlp_ratio,
        dropout=model_cfg.dropout,
        two_time=model_cfg.two_time,
        logit_cap=model_cfg.logit_cap,
        time_scale=model_cfg.time_scale,
        zero_out=model_cfg.zero_out,
        embed_std=model_cfg.embed_std,
        norm_affine=model_cfg.norm_affine,
        position_embedding=model_cfg.position_embedding,
        norm_eps=model_cfg.norm_eps,
        attn_softcap=model_cfg.attn_softcap,
        given_embedding=given_embedding,
    )
