"""Surviving kill -9 and Ctrl-C, and the non-finite step guard."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from fmlm.cli import main
from fmlm.config import build_config
from fmlm.errors import FmlmError
from fmlm.train import Trainer


def _losses(run: Path) -> dict[int, float]:
    recs = [json.loads(l) for l in (run / "log.jsonl").read_text().splitlines()]
    out = {}
    for r in recs:
        if "loss" in r:
            assert r["step"] not in out, f"step {r['step']} logged twice"
            out[r["step"]] = r["loss"]
    return out


def _start(args: list[str], tmp: Path) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, "-m", "fmlm.cli", "train", *args], env=env, cwd=tmp,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 120.0) -> None:
    t0 = time.time()
    while not path.exists():
        assert proc.poll() is None, proc.communicate()[1][-2000:]
        assert time.time() - t0 < timeout, "no checkpoint appeared"
        time.sleep(0.02)


@pytest.fixture
def common(tmp_path):
    return ["tiny", "threads=1", "max_steps=80", "save_every=10", "log_every=1", "eval_every=1000",
            f"data.cache_dir={tmp_path / 'cache'}", "--quiet", "--no-samples"]


@pytest.mark.slow
def test_kill_9_then_rerun_matches_an_uninterrupted_run(tmp_path, common):
    ref, killed = tmp_path / "ref", tmp_path / "killed"
    assert main(["train", *common, "--run-dir", str(ref)]) == 0
    proc = _start([*common, "--run-dir", str(killed)], tmp_path)
    _wait_for(killed / "checkpoints" / "step_00000020", proc)
    proc.send_signal(signal.SIGKILL)  # at whatever it is doing: a step, a log line or the next save
    proc.communicate()
    assert proc.returncode == -signal.SIGKILL
    done = _losses(killed)
    assert 20 <= max(done) < 80, "the run must be killed mid-way"
    rerun = _start([*common, "--run-dir", str(killed)], tmp_path)  # the same command
    out, err = rerun.communicate(timeout=300)
    assert rerun.returncode == 0, err[-2000:]
    assert "resumed from" not in out
    assert json.loads(out)["step"] == 80
    assert _losses(killed) == _losses(ref)  # every step, bit for bit
    names = sorted(p.name for p in (killed / "checkpoints").iterdir())
    assert names == ["step_00000070", "step_00000080"]  # keep_last = 2, no temporary directories left


@pytest.mark.slow
def test_ctrl_c_saves_a_checkpoint_and_exits_cleanly(tmp_path, common):
    run = tmp_path / "run"
    proc = _start([*common, "--run-dir", str(run)], tmp_path)
    _wait_for(run / "checkpoints" / "step_00000010", proc)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    assert "Traceback" not in err
    summary = json.loads(out)
    assert summary["interrupted"] is True
    step = summary["step"]
    assert (run / "checkpoints" / f"step_{step:08d}" / "manifest.json").is_file()
    assert main(["train", *common, "--run-dir", str(run)]) == 0  # and the same command carries on
    assert json.loads((run / "summary.json").read_text())["step"] == 80


def _trainer(tmp_path, *overrides):
    cfg = build_config("tiny", ["threads=1", "max_steps=6", "save_every=100", "eval_every=100",
                                f"data.cache_dir={tmp_path / 'cache'}", *overrides])
    return Trainer(cfg, tmp_path / "run", progress=False, log=lambda *a: None)


def test_non_finite_steps_are_skipped_and_counted(tmp_path):
    tr = _trainer(tmp_path)
    real = tr.method.loss
    calls = {"n": 0}

    def flaky(ids, gen):
        calls["n"] += 1
        loss, m = real(ids, gen)
        if calls["n"] == 2:  # non-finite loss
            loss = loss * float("nan")
        if calls["n"] == 3:  # finite loss, non-finite gradient: d sqrt(x)/dx at 0
            loss = loss + (tr.method.net.embed.sum() * 0).sqrt()
        return loss, {**m, "loss": loss.detach()}

    tr.method.loss = flaky
    before = {k: v.clone() for k, v in tr.method.state_dict().items()}
    summary = tr.fit()
    assert summary["step"] == 6 and calls["n"] == 8  # two batches skipped, six steps taken
    assert all(torch.isfinite(v).all() for v in tr.method.state_dict().values())
    assert any(not torch.equal(before[k], v) for k, v in tr.method.state_dict().items())
    logged = [json.loads(l) for l in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert all("grad_norm" in r for r in logged if "loss" in r)


def test_too_many_non_finite_steps_stop_with_a_clear_message(tmp_path):
    tr = _trainer(tmp_path, "max_bad_steps=3")
    real = tr.method.loss
    tr.method.loss = lambda ids, gen: (lambda lm: (lm[0] * float("inf"), lm[1]))(real(ids, gen))
    with pytest.raises(FmlmError, match="4 non-finite loss values in a row at step 0"):
        tr.fit()


def test_compile_switch_compiles_the_backbone(tmp_path):
    """train.compile=true wraps the backbone's forward in torch.compile (state-dict keys unchanged)."""
    plain, compiled = _trainer(tmp_path), _trainer(tmp_path / "c", "train.compile=true")
    assert getattr(plain.method.net, "_compiled_call_impl", None) is None
    assert compiled.method.net._compiled_call_impl is not None
    assert plain.method.state_dict().keys() == compiled.method.state_dict().keys()
