"""Checkpoint directories: atomic writes, round trip, strict loading, corruption detection."""

import json

import pytest
import torch

from fmlm import checkpoint as ckpt
from fmlm.errors import CheckpointError


def _state(seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"a.weight": torch.randn(3, 4, generator=g), "b.bias": torch.randn(4, generator=g)}


class _Module(torch.nn.Module):
    def __init__(self, n=4):
        super().__init__()
        self.a = torch.nn.Linear(4, 3, bias=False)
        self.b = torch.nn.Linear(3, n)


def test_round_trip_and_manifest(tmp_path):
    m = _Module()
    p = ckpt.save_checkpoint(tmp_path / "run" / "checkpoints" / "step_00000001", {"x": 1}, m.state_dict(),
                             ema_state=m.state_dict(), trainer_state={"step": 1})
    ckpt.verify(p)
    m2 = _Module()
    ckpt.load_into(m2, ckpt.load_state(p, "model.safetensors"), "weights")
    for k, v in m.state_dict().items():
        assert torch.equal(v, m2.state_dict()[k])
    assert ckpt.resolve(tmp_path / "run") == p
    assert not list(p.parent.glob(".tmp-*"))


def test_strict_load_errors(tmp_path):
    p = ckpt.save_checkpoint(tmp_path / "c", {}, _Module().state_dict())
    with pytest.raises(CheckpointError, match="has shape"):
        ckpt.load_into(_Module(n=5), ckpt.load_state(p, "model.safetensors"), "weights")
    extra = _Module()
    extra.c = torch.nn.Linear(1, 1)
    with pytest.raises(CheckpointError, match="missing 2 keys"):
        ckpt.load_into(extra, ckpt.load_state(p, "model.safetensors"), "weights")
    with pytest.raises(CheckpointError, match="unexpected 3 keys"):
        ckpt.load_into(torch.nn.Sequential(torch.nn.Linear(4, 3, bias=False)),
                       {**ckpt.load_state(p, "model.safetensors"), "0.weight": torch.zeros(3, 4)}, "weights")


def test_missing_partial_and_corrupt(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        ckpt.resolve(tmp_path / "nothing")
    p = ckpt.save_checkpoint(tmp_path / "run" / "checkpoints" / "step_00000001", {}, _Module().state_dict())
    q = ckpt.save_checkpoint(tmp_path / "run" / "checkpoints" / "step_00000002", {}, _Module().state_dict())
    # Flip one byte in the newest: resume falls back to the older one with a warning.
    data = bytearray((q / "model.safetensors").read_bytes())
    data[-1] ^= 0xFF
    (q / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="checksum"):
        ckpt.verify(q)
    with pytest.warns(UserWarning, match="skipping"):
        assert ckpt.latest_checkpoint(tmp_path / "run", deep=True) == p
    # A directory without a manifest (killed mid-write) is partial.
    (q / "manifest.json").unlink()
    with pytest.raises(CheckpointError, match="incomplete"):
        ckpt.verify(q)
    with pytest.warns(UserWarning):
        assert ckpt.latest_checkpoint(tmp_path / "run") == p
    # Garbage where the weights should be.
    (p / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError, match="corrupt weights"):
        ckpt.load_state(p, "model.safetensors")
    (p / "manifest.json").write_text("{")
    with pytest.raises(CheckpointError, match="corrupt checkpoint manifest"):
        ckpt.verify(p)


def test_prune_keeps_last(tmp_path):
    for s in range(1, 5):
        ckpt.save_checkpoint(tmp_path / "checkpoints" / f"step_{s:08d}", {}, _Module().state_dict())
    (tmp_path / "checkpoints" / ".tmp-step_00000009-999999").mkdir()
    ckpt.prune(tmp_path, 2)
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names == ["step_00000003", "step_00000004"]


def test_overwrite_same_step_is_atomic(tmp_path):
    d = tmp_path / "c"
    ckpt.save_checkpoint(d, {"v": 1}, _Module().state_dict())
    ckpt.save_checkpoint(d, {"v": 2}, _Module().state_dict())
    ckpt.verify(d)
    assert json.loads((d / "config.json").read_text()) == {"v": 2}
