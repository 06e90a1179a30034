"""Where and how things run: the device, the autocast precision and the cache folder."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from fmlm.errors import ConfigError


def default_cache_dir() -> Path:
    return Path(os.environ.get("FMLM_CACHE", Path.home() / ".cache" / "fmlm"))


def pick_device(name: str | torch.device | None = "auto", what: str = "train.device") -> torch.device:
    """The device ``name`` names (``auto``: cuda, then mps, then cpu), checked to exist in this build."""
    if name is None:
        name = "auto"
    if isinstance(name, torch.device) or name != "auto":
        try:
            dev = torch.device(name)
        except (RuntimeError, TypeError, ValueError):
            raise ConfigError(f"bad value for {what}: {str(name)!r} (use auto, cpu, cuda, cuda:N or mps)") from None
        if dev.type == "cuda":
            if not torch.cuda.is_available():
                raise ConfigError(f"{what}={dev} but this PyTorch build has no usable CUDA device; use cpu")
            if dev.index is not None and dev.index >= torch.cuda.device_count():
                raise ConfigError(f"{what}={dev} but only {torch.cuda.device_count()} CUDA device(s) are visible")
        elif dev.type == "mps":
            mps = getattr(torch.backends, "mps", None)
            if mps is None or not mps.is_available():
                raise ConfigError(f"{what}={dev} but MPS is not available on this machine; use cpu")
        elif dev.type != "cpu":
            raise ConfigError(f"{what}={dev}: fmlm runs on cpu, cuda or mps")
        return dev
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """bf16 autocast where the device supports it (``auto``); None means full fp32."""
    if precision == "fp32":
        return None
    if precision == "fp16":
        return torch.float16
    if precision == "bf16":
        return torch.bfloat16
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return None  # CPU autocast in bf16 is slower than fp32 on most CPUs
