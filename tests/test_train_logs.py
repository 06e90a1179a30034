"""train.log_to: the JSONL, TensorBoard and wandb writers (read back from their real files), resume without
duplicated or lost steps, the one-line error for a missing writer, and the progress bar's honest total."""

import json
import math
import struct
import sys
from pathlib import Path

import pytest

from fmlm.config import build_config
from fmlm.errors import ConfigError
from fmlm.train import Trainer
from fmlm.train.logs import BarTotal, parse_log_to


def _cfg(tmp_path: Path, *over: str):
    return build_config(
        "tiny",
        [
            "threads=1",
            "max_steps=6",
            "log_every=1",
            "eval_every=3",
            "save_every=3",
            "eval_batches=1",
            "sample.num_samples=2",
            "sample.steps=2",
            f"data.cache_dir={tmp_path / 'cache'}",
            *over,
        ],
    )


def _jsonl(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]


def _tensorboard(run: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    return acc


def _wandb_history(run: Path) -> list[dict]:
    """Every history record of every offline wandb session of ``run``, read from the .wandb files (the
    LevelDB-style log that wandb writes: 7-byte header, then records in 32 KiB blocks)."""
    from wandb.proto import wandb_internal_pb2 as pb2

    out = []
    for path in sorted(run.glob("wandb/offline-run-*/run-*.wandb")):
        data, pos, buf = path.read_bytes(), 7, b""
        assert data[:4] == b":W&B"
        while pos + 7 <= len(data):
            left = 32768 - pos % 32768
            if left < 7:
                pos += left
                continue
            _, n, kind = struct.unpack("<IHB", data[pos : pos + 7])
            chunk, pos = data[pos + 7 : pos + 7 + n], pos + 7 + n
            if kind in (1, 2):
                buf = chunk
            elif kind in (3, 4):
                buf += chunk
            if kind not in (1, 4):
                continue
            rec = pb2.Record()
            rec.ParseFromString(buf)
            if rec.WhichOneof("record_type") == "history":
                items = {"/".join(i.nested_key) or i.key: json.loads(i.value_json) for i in rec.history.item}
                out.append({"session": path.parent.name, "run_id": path.stem.removeprefix("run-"), **items})
    return out


@pytest.fixture
def offline_wandb(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    for var, sub in (("WANDB_CONFIG_DIR", "config"), ("WANDB_CACHE_DIR", "cache"), ("WANDB_DATA_DIR", "data")):
        monkeypatch.setenv(var, str(tmp_path / "wandb-home" / sub))
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")


def test_log_to_is_checked():
    assert parse_log_to("jsonl") == ["jsonl"]
    assert parse_log_to(" tensorboard, jsonl,tensorboard") == ["tensorboard", "jsonl"]
    for bad, match in (("csv", "unknown writer 'csv'"), ("jsonl,", "comma list"), ("", "comma list")):
        with pytest.raises(ConfigError, match=match):
            parse_log_to(bad)
    with pytest.raises(ConfigError, match="unknown writer 'tb'"):
        build_config("tiny", ["train.log_to=tb"])


@pytest.mark.parametrize("module,writer", [("torch.utils.tensorboard", "tensorboard"), ("wandb", "wandb")])
def test_a_missing_writer_is_one_line(tmp_path, monkeypatch, capsys, module, writer):
    from fmlm.cli import main

    monkeypatch.setitem(sys.modules, module, None)  # import fails as if not installed
    argv = ["train", "tiny", "threads=1", "max_steps=1", f"train.log_to=jsonl,{writer}"]
    code = main([*argv, f"data.cache_dir={tmp_path / 'c'}", "--run-dir", str(tmp_path / "r"), "--quiet"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "Traceback" not in err and len(err.splitlines()) == 1
    assert f"needs the {writer} package: pip install 'fmlm[{writer}]'" in err


@pytest.mark.slow
def test_every_writer_logs_the_jsonl_scalars_and_samples(tmp_path, offline_wandb):
    run = tmp_path / "run"
    Trainer(_cfg(tmp_path, "train.log_to=jsonl,tensorboard,wandb"), run, progress=False, log=lambda *a: None).fit()
    recs = _jsonl(run)
    train = [r for r in recs if "loss" in r]
    assert [r["step"] for r in train] == [1, 2, 3, 4, 5, 6]
    val = [r for r in recs if "loss" not in r]
    key = sorted(k for k in val[0] if k != "step")[0]  # a validation metric (val_ce, ...)
    assert key.startswith("val_")
    acc = _tensorboard(run)
    assert set(train[0]) | set(val[0]) - {"step"} <= set(acc.Tags()["scalars"]) | {"step"}
    tb = acc.Scalars("loss")
    assert [e.step for e in tb] == [1, 2, 3, 4, 5, 6]
    assert all(math.isclose(e.value, r["loss"], rel_tol=1e-6) for e in tb for r in train if r["step"] == e.step)
    assert [e.step for e in acc.Scalars(key)] == [r["step"] for r in val] == [3, 6]
    assert [e.value for e in acc.Scalars(key)] == [pytest.approx(r[key]) for r in val]
    samples = acc.Tensors("samples/text_summary")
    assert [e.step for e in samples] == [3, 6]
    text = samples[0].tensor_proto.string_val[0].decode()
    assert text.startswith("1. `") and "2. `" in text
    hist = _wandb_history(run)
    w_loss = {h["_step"]: h["loss"] for h in hist if "loss" in h}
    assert w_loss == {r["step"]: pytest.approx(r["loss"]) for r in train}
    assert sorted(h["_step"] for h in hist if key in h) == [3, 6]
    assert sorted(h["_step"] for h in hist if any(k.split("/")[0] == "samples" for k in h)) == [3, 6]
    assert json.loads((run / "wandb.json").read_text())["last_step"] == 6


class _Killed(Exception):
    pass


@pytest.mark.slow
def test_resume_logs_every_step_once(tmp_path, offline_wandb):
    """A session dies after step 5 (its last checkpoint is step 3); the resumed one logs steps 4..6 again.
    Each writer ends with steps 1..6, each once."""
    run = tmp_path / "run"
    cfg = _cfg(tmp_path, "train.log_to=jsonl,tensorboard,wandb")

    def die(trainer, metrics):
        if trainer.state.step == 5:
            raise _Killed

    with pytest.raises(_Killed):
        Trainer(cfg, run, progress=False, log=lambda *a: None, on_step=die).fit()
    assert [r["step"] for r in _jsonl(run) if "loss" in r] == [1, 2, 3, 4, 5]
    resumed = Trainer(cfg, run, progress=False, log=lambda *a: None)
    assert resumed.state.step == 3
    resumed.fit()
    assert [r["step"] for r in _jsonl(run) if "loss" in r] == [1, 2, 3, 4, 5, 6]
    assert [e.step for e in _tensorboard(run).Scalars("loss")] == [1, 2, 3, 4, 5, 6]
    hist = _wandb_history(run)
    assert sorted(h["_step"] for h in hist if "loss" in h) == [1, 2, 3, 4, 5, 6]
    sessions = sorted({h["session"] for h in hist})
    assert len(sessions) == 2 and {h["_step"] for h in hist if h["session"] == sessions[1]} == {6}
    # one run id (read from the run file's name: two sessions started in the same second get folders
    # "offline-run-TIME-ID" and "offline-run-TIME-ID-1", so the folder name is no place to parse it from)
    assert len({h["run_id"] for h in hist}) == 1


def test_restart_archives_the_writers_files(tmp_path):
    run = tmp_path / "run"
    cfg = _cfg(tmp_path, "train.log_to=tensorboard", "max_steps=2", "eval_every=100")
    Trainer(cfg, run, progress=False, log=lambda *a: None).fit()
    assert (run / "tensorboard").is_dir() and not (run / "log.jsonl").exists()
    Trainer(cfg, run, progress=False, log=lambda *a: None, restart=True).fit()
    (archived,) = (run / "archive").iterdir()
    assert (archived / "tensorboard").is_dir()
    assert [e.step for e in _tensorboard(run).Scalars("loss")] == [1, 2]


# ------------------------------------------------------------------------------ the progress bar
def test_bar_total_is_the_bound_that_ends_the_run():
    assert BarTotal(1000, math.inf, 0, 0.0)(10, 5.0) == 1000  # no time bound: the steps
    bt = BarTotal(1000, 60.0, 0, 0.0)
    assert bt(0, 0.0) == 1000  # nothing measured yet
    assert bt(2, 20.0) == 6  # 0.1 steps/s, 40 s left: 4 more
    assert bt(6, 60.0) == 6  # time is up
    assert BarTotal(300, 1000.0, 100, 500.0)(150, 600.0) == 300  # resumed: 0.5 steps/s would pass max_steps
    assert BarTotal(1000, 1000.0, 100, 500.0)(150, 600.0) == 350


def test_training_bar_counts_toward_the_time_bound(tmp_path):
    """Every step takes 10 s on an injected clock; a 1-minute budget ends the run at step 6 of 1,000,
    and the bar says so from the first measured step on."""
    cfg = _cfg(tmp_path, "max_steps=1000", "train.max_minutes=1", "eval_every=1000", "save_every=1000")
    totals = []
    trainer = Trainer(
        cfg, tmp_path / "run", progress=False, log=lambda *a: None, on_step=lambda tr, m: totals.append(tr.bar.total)
    )
    now = [0.0]
    trainer.clock = lambda: now[0]
    step = trainer._forward_backward

    def ten_seconds():
        now[0] += 10.0
        return step()

    trainer._forward_backward = ten_seconds
    summary = trainer.fit()
    assert summary["step"] == 6 and summary["train_seconds"] == 60.0
    assert totals == [6] * 6
