"""Moved to :mod:`fmlm.paths` (this name stays for imports written before the move)."""

from fmlm.paths import EmbeddedState, cholesky_psd, draw_embedded, embedded_noise, noise_factor, run_net

__all__ = ["EmbeddedState", "cholesky_psd", "draw_embedded", "embedded_noise", "noise_factor", "run_net"]
