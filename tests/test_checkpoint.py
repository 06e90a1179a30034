"""Checkpoint directories: atomic writes, round trip, strict loading, corruption detection."""

import json
import os

import pytest
import torch

from fmlm import checkpoint as ckpt
from fmlm.errors import CheckpointError
from test_cli import assert_one_line_error, run_cli


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
    p = ckpt.save_checkpoint(
        tmp_path / "run" / "checkpoints" / "step_00000001",
        {"x": 1},
        m.state_dict(),
        ema_state=m.state_dict(),
        trainer_state={"step": 1},
    )
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
        ckpt.load_into(
            torch.nn.Sequential(torch.nn.Linear(4, 3, bias=False)),
            {**ckpt.load_state(p, "model.safetensors"), "0.weight": torch.zeros(3, 4)},
            "weights",
        )


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


def test_prune_keeps_a_checkpoint_pinned_by_a_run_that_exists(tmp_path):
    run = tmp_path / "teacher"
    for s in range(1, 5):
        ckpt.save_checkpoint(run / "checkpoints" / f"step_{s:08d}", {}, _Module().state_dict())
    student = tmp_path / "student"
    student.mkdir()
    pin = ckpt.pin(run / "checkpoints" / "step_00000002", student)
    assert json.loads(pin.read_text())["checkpoint"] == "step_00000002"
    assert ckpt.pin(tmp_path / "elsewhere", student) is None  # not a step of a run: nothing prunes it
    ckpt.prune(run, 1)
    assert [p.name for p in ckpt.list_checkpoints(run)] == ["step_00000002", "step_00000004"]
    student.rmdir()  # the student is gone: its pin is stale, dropped, and the teacher pruned as usual
    ckpt.prune(run, 1)
    assert [p.name for p in ckpt.list_checkpoints(run)] == ["step_00000004"] and not pin.exists()
    ckpt.save_checkpoint(run / "checkpoints" / "step_00000005", {}, _Module().state_dict())
    (run / "pins" / "torn.json").write_text('{"checkpoint": ')
    ckpt.prune(run, 1)  # a pin it cannot read: it prunes nothing rather than guess
    assert [p.name for p in ckpt.list_checkpoints(run)] == ["step_00000004", "step_00000005"]


def test_overwrite_same_step_is_atomic(tmp_path):
    d = tmp_path / "c"
    ckpt.save_checkpoint(d, {"v": 1}, _Module().state_dict())
    ckpt.save_checkpoint(d, {"v": 2}, _Module().state_dict())
    ckpt.verify(d)
    assert json.loads((d / "config.json").read_text()) == {"v": 2}


def _dead_pid() -> int:
    """The id of a process that has exited (and been reaped)."""
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_prune_keeps_the_newest_valid_checkpoints_by_step_number(tmp_path):
    ck = tmp_path / "checkpoints"
    for s in (5, 6, 100_000_000):  # past 8 digits: the name no longer sorts like the number
        ckpt.save_checkpoint(ck / f"step_{s:08d}", {}, _Module().state_dict())
    ckpt.save_checkpoint(ck / "step_99999999", {}, _Module().state_dict())
    ckpt.prune(tmp_path, 2)
    assert sorted(p.name for p in ck.iterdir()) == ["step_100000000", "step_99999999"]
    # Corrupt checkpoints do not count as kept: the valid ones survive, the corrupt older one goes.
    for s in (7, 8):
        ckpt.save_checkpoint(ck / f"step_{s:08d}", {}, _Module().state_dict())
    for name in ("step_100000000", "step_99999999"):
        f = ck / name / "model.safetensors"
        data = bytearray(f.read_bytes())
        data[-1] ^= 0xFF
        f.write_bytes(bytes(data))
    ckpt.save_checkpoint(ck / "step_00000001", {}, _Module().state_dict())
    ckpt.prune(tmp_path, 2)
    names = sorted(p.name for p in ck.iterdir())
    # Newest valid: 7 and 8; 1 (valid, older) is pruned; the corrupt newer ones are left as evidence.
    assert names == ["step_00000007", "step_00000008", "step_100000000", "step_99999999"]


def test_tree_round_trip_without_pickle(tmp_path):
    import random

    import numpy as np

    m = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(m.parameters())
    m(torch.randn(4, 3)).sum().backward()
    opt.step()
    tree = {
        "optimizer": opt.state_dict(),
        "np": np.random.get_state(),
        "py": random.getstate(),
        "torch": torch.get_rng_state(),
        "inf": float("inf"),
        "keys": {1: "int key", "$x": 2},
        "none": None,
        "nested": [(1, 2.5), {"a": torch.zeros(2, dtype=torch.bfloat16)}],
    }
    ckpt.save_tree(tree, tmp_path / "t.safetensors")
    back = ckpt.load_tree(tmp_path / "t.safetensors")
    assert back["inf"] == float("inf") and back["keys"] == {1: "int key", "$x": 2} and back["none"] is None
    assert back["py"] == tree["py"]
    assert back["np"][0] == "MT19937" and np.array_equal(back["np"][1], tree["np"][1])
    assert back["nested"][0] == (1, 2.5) and back["nested"][1]["a"].dtype == torch.bfloat16
    assert torch.equal(back["torch"], tree["torch"])
    opt2 = torch.optim.AdamW(torch.nn.Linear(3, 2).parameters())
    opt2.load_state_dict(back["optimizer"])
    assert torch.equal(opt2.state_dict()["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"])
    np.random.set_state(back["np"])
    random.setstate(back["py"])
    with pytest.raises(TypeError, match="plain containers"):
        ckpt.save_tree({"f": lambda: 0}, tmp_path / "bad.safetensors")


def test_dead_writers_temporary_folders_are_cleaned_before_a_save(tmp_path):
    ck = tmp_path / "checkpoints"
    ckpt.save_checkpoint(ck / "step_00000001", {}, _Module().state_dict())
    dead, alive = _dead_pid(), os.getpid()
    big = ck / f".tmp-step_00000002-{dead}"  # a dead run's half-written checkpoint (e.g. disk full)
    big.mkdir()
    (big / "model.safetensors").write_bytes(b"x" * 1000)
    mine = ck / f".tmp-step_00000009-{alive}"  # a live writer's: left alone
    mine.mkdir()
    # Killed between the two renames of a same-step overwrite: the old copy is put back.
    os.replace(ck / "step_00000001", ck / f".old-step_00000001-{dead}")
    ckpt.save_checkpoint(ck / "step_00000003", {}, _Module().state_dict())
    names = sorted(p.name for p in ck.iterdir())
    assert names == [mine.name, "step_00000001", "step_00000003"]
    ckpt.verify(ck / "step_00000001")


def test_init_from_starts_a_new_run_from_another_runs_ema_weights(tmp_path, capsys):
    """train.init_from: the new run's weights (and EMA) are the source's EMA weights, at step 0 with a
    fresh optimiser; a source of another backbone is one line; resuming ignores the source."""
    from safetensors.torch import load_file

    from fmlm.config import build_config
    from fmlm.train import Trainer

    def cfg(*over):
        base = ["threads=1", "max_steps=4", "eval_every=100", "save_every=4", f"data.cache_dir={tmp_path / 'd'}"]
        return build_config("tiny", base + list(over))

    quiet = {"progress": False, "log": lambda *a: None}
    Trainer(cfg(), tmp_path / "a", **quiet).fit()
    src = load_file(str(ckpt.latest_checkpoint(tmp_path / "a") / "ema.safetensors"))
    logs = []
    b = Trainer(cfg("lr=1e-4", f"init_from={tmp_path / 'a'}"), tmp_path / "b", progress=False, log=logs.append)
    assert b.state.step == 0 and not b.opt.state  # a fresh optimiser, step 0
    for k, v in b.method.state_dict().items():
        assert torch.equal(v.float(), src[k].float()) and torch.equal(b.ema.shadow[k], src[k].float()), k
    assert any("initialised from the EMA weights" in m for m in logs)
    b.fit()
    # resuming b (now with its own checkpoint) takes b's weights, not the source's again
    resumed = Trainer(cfg("lr=1e-4", f"init_from={tmp_path / 'a'}", "max_steps=6"), tmp_path / "b", **quiet)
    own = load_file(str(ckpt.latest_checkpoint(tmp_path / "b") / "model.safetensors"))
    assert resumed.state.step == 4
    assert all(torch.equal(v, own[k]) for k, v in resumed.method.state_dict().items())
    # another backbone, or no checkpoint there: one line, exit 2
    code, _, err = run_cli(
        capsys, "train", "tiny", "model.d_model=32", f"init_from={tmp_path / 'a'}", *_quick(tmp_path, "c")
    )
    assert_one_line_error(code, err, "does not match the model")
    code, _, err = run_cli(capsys, "train", "tiny", f"init_from={tmp_path / 'nowhere'}", *_quick(tmp_path, "e"))
    assert_one_line_error(code, err, "checkpoint not found")


def _quick(tmp_path, name):
    data = f"data.cache_dir={tmp_path / 'd'}"
    return ["threads=1", "max_steps=2", data, "--run-dir", str(tmp_path / name), "--quiet"]
