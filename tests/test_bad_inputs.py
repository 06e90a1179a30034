"""The bad-input battery: every input a user (or a hostile run directory) can get wrong gives one
line on stderr and exit code 2, never a traceback, and changes nothing it should not.

Each case is a row of ``CASES``: an id, a function that prepares what the case needs in a fresh
folder and returns the command line, and a piece of the expected message. Add new ones here.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import pickle
import shutil
import socket
from pathlib import Path

import pytest
import torch

from fmlm.cli import main

TINY = ["tiny", "threads=1"]


# ----------------------------------------------------------------------------- fixtures and helpers
@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A finished tiny run (two checkpoints) and its data cache, copied by the cases that damage it."""
    d = tmp_path_factory.mktemp("base")
    cache = d / "cache"
    run = d / "run"
    code = main(
        [
            "train",
            *TINY,
            "max_steps=4",
            "save_every=2",
            f"data.cache_dir={cache}",
            "--quiet",
            "--no-samples",
            "--run-dir",
            str(run),
        ]
    )
    assert code == 0
    return run, cache


class Ctx:
    """What a case gets: a fresh copy of the base run, its cache and a scratch folder."""

    def __init__(self, base, tmp: Path):
        self.src, self.cache = base
        self.tmp = tmp
        self._run: Path | None = None

    @property
    def run(self) -> Path:
        if self._run is None:
            self._run = self.tmp / "run"
            shutil.copytree(self.src, self._run)
        return self._run

    def ckpt(self, i: int = -1) -> Path:
        return sorted((self.run / "checkpoints").iterdir())[i]

    def train(self, *extra: str) -> list[str]:
        """The command that resumes the copied run (same config as the base run)."""
        return [
            "train",
            *TINY,
            "max_steps=6",
            "save_every=2",
            f"data.cache_dir={self.cache}",
            "--quiet",
            "--no-samples",
            "--run-dir",
            str(self.run),
            *extra,
        ]

    def damage_all(self, name: str, data: bytes) -> None:
        """Replace ``name`` in every checkpoint and rewrite the manifests to match (a tampered run)."""
        for ck in sorted((self.run / "checkpoints").iterdir()):
            p = ck / name
            p.unlink(missing_ok=True)
            p.write_bytes(data)
            rehash(ck)


def rehash(ck: Path) -> None:
    """Rewrite a checkpoint's manifest to match its files (damage that the manifest cannot see)."""
    files = sorted(p for p in ck.rglob("*") if p.is_file() and p.name != "manifest.json")
    manifest = {
        str(p.relative_to(ck)): {"size": p.stat().st_size, "sha256": hashlib.sha256(p.read_bytes()).hexdigest()}
        for p in files
    }
    (ck / "manifest.json").write_text(json.dumps({"format": 1, "files": manifest}))


def flip_byte(p: Path) -> None:
    data = bytearray(p.read_bytes())
    data[len(data) // 2] ^= 0xFF
    p.write_bytes(bytes(data))


class _Evil:
    """A pickle whose loading would run a shell command (creating ``marker``)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def evil_pickle(marker: Path, torch_format: bool = True) -> bytes:
    """A hostile optimizer.pt/rng.pt: written by torch.save (a zip), or as a raw pickle."""
    obj = {"optimizer": _Evil(marker), "scheduler": {}}
    if not torch_format:
        return pickle.dumps(obj)
    import io

    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def to_legacy(ck: Path, optimizer: bytes | None = None, rng: bytes | None = None) -> None:
    """Turn a checkpoint into the old layout (optimizer.pt, rng.pt) with the given file contents."""
    for new, old, data in (("optimizer.safetensors", "optimizer.pt", optimizer), ("rng.safetensors", "rng.pt", rng)):
        (ck / new).unlink()
        (ck / old).write_bytes(data if data is not None else b"")
    rehash(ck)


def set_json(p: Path, obj) -> None:
    p.write_text(json.dumps(obj))
    rehash(p.parent)


def busy_port(ctx: Ctx) -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(1)
    ctx.keep = s  # closed with the context
    return s.getsockname()[1]


no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="needs a build without CUDA")
not_root = pytest.mark.skipif(
    hasattr(os, "geteuid") and os.geteuid() == 0, reason="root may write to read-only folders"
)


def _prepare_readonly(ctx: Ctx) -> list[str]:
    os.chmod(ctx.run / "checkpoints", 0o500)
    return ctx.train()


def _legacy_evil(ctx: Ctx, torch_format: bool = True) -> list[str]:
    ctx.marker = ctx.tmp / "PWNED"
    for ck in sorted((ctx.run / "checkpoints").iterdir()):
        to_legacy(ck, optimizer=evil_pickle(ctx.marker, torch_format), rng=evil_pickle(ctx.marker, torch_format))
    return ctx.train()


def _trainer_state(ctx: Ctx, change) -> list[str]:
    for ck in sorted((ctx.run / "checkpoints").iterdir()):
        st = json.loads((ck / "trainer_state.json").read_text())
        change(st)
        set_json(ck / "trainer_state.json", st)
    return ctx.train()


def _config_list(ctx: Ctx, cmd: str) -> list[str]:
    for ck in sorted((ctx.run / "checkpoints").iterdir()):
        set_json(ck / "config.json", [1, 2, 3])
    return ctx.train() if cmd == "train" else ["sample", "--ckpt", str(ctx.ckpt())]


def _manifest_types(ctx: Ctx) -> list[str]:
    ck = ctx.ckpt()
    m = json.loads((ck / "manifest.json").read_text())
    m["files"]["model.safetensors"]["size"] = "big"
    (ck / "manifest.json").write_text(json.dumps(m))
    return ["sample", "--ckpt", str(ck)]


def _corrupt_all(ctx: Ctx) -> list[str]:
    for ck in sorted((ctx.run / "checkpoints").iterdir()):
        flip_byte(ck / "model.safetensors")
    return ctx.train()


def _text_file(ctx: Ctx, data: bytes) -> Path:
    p = ctx.tmp / "corpus.txt"
    p.write_bytes(data)
    return p


# id, prepare(ctx) -> argv, expected piece of the message
CASES = [
    # config
    ("unknown-preset", lambda c: ["train", "no-such-preset"], "unknown preset"),
    ("unknown-key", lambda c: ["train", "tiny", "bogus=1"], "unknown config key"),
    ("unknown-section", lambda c: ["config", "tiny", "nosection.lr=1"], "unknown config key"),
    ("bad-choice", lambda c: ["config", "tiny", "loss=hinge"], "bad value for train.loss"),
    ("out-of-range", lambda c: ["config", "tiny", "dropout=1.5"], "model.dropout must be in [0, 1)"),
    ("malformed-float", lambda c: ["train", "tiny", "lr=fast"], "bad value for train.lr"),
    ("malformed-int", lambda c: ["train", "tiny", "max_steps=1.5"], "bad value for train.max_steps"),
    ("lr-nan", lambda c: ["train", "tiny", "lr=nan"], "train.lr: 'nan' is not a finite number"),
    ("lr-inf", lambda c: ["train", "tiny", "lr=inf"], "not a finite number"),
    ("max-minutes-nan", lambda c: ["train", "tiny", "max_minutes=nan"], "train.max_minutes: 'nan'"),
    ("zero-steps", lambda c: ["config", "tiny", "steps=0"], "sample.steps must be >= 1"),
    ("no-equals", lambda c: ["distill", "--self", "tiny", "lr"], "expected key=value"),
    ("empty-dataset", lambda c: ["train", "tiny", "data.dataset=", f"data.cache_dir={c.tmp}"], "data.dataset is empty"),
    ("toml-missing", lambda c: ["train", "nothere.toml"], "config file not found"),
    (
        "device-nosuch",
        lambda c: ["train", "tiny", "device=nosuch", f"--run-dir={c.tmp / 'r'}"],
        "bad value for train.device: 'nosuch'",
    ),
    pytest.param(
        "device-cuda",
        lambda c: ["train", "tiny", "device=cuda", f"--run-dir={c.tmp / 'r'}"],
        "no usable CUDA device",
        marks=no_cuda,
    ),
    # corpora
    (
        "empty-corpus",
        lambda c: [
            "data",
            "tiny",
            f"data.dataset={_text_file(c, b'   ' + bytes([10]))}",
            "tokenizer=char",
            "seq_len=8",
            f"data.cache_dir={c.tmp}",
        ],
        "empty",
    ),
    (
        "latin1-corpus",
        lambda c: [
            "data",
            "tiny",
            f"data.dataset={_text_file(c, 'café olé '.encode('latin-1') * 50)}",
            "tokenizer=char",
            "seq_len=8",
            f"data.cache_dir={c.tmp}",
        ],
        "UTF-8",
    ),
    (
        "binary-corpus",
        lambda c: [
            "data",
            "tiny",
            f"data.dataset={_text_file(c, bytes(range(256)) * 64)}",
            "tokenizer=char",
            "seq_len=8",
            f"data.cache_dir={c.tmp}",
        ],
        "UTF-8",
    ),
    (
        "missing-corpus",
        lambda c: ["data", "tiny", f"data.dataset={c.tmp / 'nope.txt'}", f"data.cache_dir={c.tmp}"],
        "path does not exist",
    ),
    # run directory
    (
        "run-dir-is-a-file",
        lambda c: (
            (c.tmp / "f").write_text("x")
            and ["train", *TINY, "--run-dir", str(c.tmp / "f"), f"data.cache_dir={c.cache}"]
        ),
        "is a file",
    ),
    (
        "run-dir-unwritable",
        lambda c: (
            (c.tmp / "f").write_text("x")
            and ["train", *TINY, "--run-dir", str(c.tmp / "f" / "run"), f"data.cache_dir={c.cache}"]
        ),
        "cannot write in",
    ),
    pytest.param("checkpoints-read-only", _prepare_readonly, "cannot write in", marks=not_root),
    ("different-config", lambda c: c.train("lr=0.5"), "different config"),
    # checkpoints: damaged, tampered or hostile
    ("all-checkpoints-corrupt", _corrupt_all, "none of the 2 checkpoints"),
    ("config-json-list-train", lambda c: _config_list(c, "train"), "expected a JSON object"),
    ("config-json-list-sample", lambda c: _config_list(c, "sample"), "expected a JSON object"),
    ("manifest-wrong-types", _manifest_types, "corrupt checkpoint manifest"),
    (
        "manifest-not-json",
        lambda c: (c.ckpt() / "manifest.json").write_text("{") and ["sample", "--ckpt", str(c.ckpt())],
        "corrupt checkpoint manifest",
    ),
    (
        "garbage-optimizer",
        lambda c: c.damage_all("optimizer.safetensors", b"\x00garbage" * 10) or c.train(),
        "corrupt checkpoint file",
    ),
    ("garbage-rng", lambda c: c.damage_all("rng.safetensors", os.urandom(300)) or c.train(), "corrupt checkpoint file"),
    (
        "foreign-safetensors-optimizer",
        lambda c: c.damage_all("optimizer.safetensors", (c.ckpt() / "model.safetensors").read_bytes()) or c.train(),
        "no fmlm state",
    ),
    (
        "legacy-garbage-optimizer-pt",
        lambda c: (
            [to_legacy(ck, b"garbage", b"garbage") for ck in sorted((c.run / "checkpoints").iterdir())] and c.train()
        ),
        "corrupt checkpoint file",
    ),
    ("legacy-malicious-pickle", _legacy_evil, "refusing to unpickle"),
    ("legacy-malicious-raw-pickle", lambda c: _legacy_evil(c, torch_format=False), "refusing to unpickle"),
    (
        "trainer-state-unknown-key",
        lambda c: _trainer_state(c, lambda s: s.update(surprise=1)),
        "unknown key 'surprise'",
    ),
    ("trainer-state-wrong-type", lambda c: _trainer_state(c, lambda s: s.update(step="ten")), "bad value for step"),
    (
        "trainer-state-list",
        lambda c: (
            [set_json(ck / "trainer_state.json", []) for ck in sorted((c.run / "checkpoints").iterdir())] and c.train()
        ),
        "expected a JSON object",
    ),
    (
        "flipped-byte-explicit",
        lambda c: flip_byte(c.ckpt() / "model.safetensors") or ["sample", "--ckpt", str(c.ckpt())],
        "checksum mismatch",
    ),
    (
        "partial-checkpoint",
        lambda c: (c.ckpt() / "manifest.json").unlink() or ["sample", "--ckpt", str(c.ckpt())],
        "incomplete checkpoint",
    ),
    (
        "weights-wrong-keys",
        lambda c: (
            (c.ckpt() / "model.safetensors").write_bytes(_other_shape_weights())
            and rehash(c.ckpt())
            or ["sample", "--ckpt", str(c.ckpt()), "--no-ema"]
        ),
        "does not match the model",
    ),
    ("not-a-checkpoint", lambda c: ["sample", "--ckpt", str(c.tmp)], "not a checkpoint or run directory"),
    ("missing-checkpoint", lambda c: ["sample", "--ckpt", str(c.tmp / "nope")], "checkpoint not found"),
    # sampling
    ("steps-zero", lambda c: ["sample", "--ckpt", "x", "--steps", "0"], "steps must be >= 1"),
    ("no-ckpt", lambda c: ["sample"], "--ckpt"),
    ("seq-len-too-long", lambda c: ["sample", "--ckpt", str(c.src), "--seq-len", "999"], "the model's maximum"),
    (
        "tokenizer-mismatch",
        lambda c: _other_tokenizer(c) and ["sample", "--ckpt", str(c.src), "--tokenizer", str(c.tmp / "tok")],
        "does not match the checkpoint",
    ),
    (
        "option-for-another-method",
        lambda c: ["sample", "--ckpt", str(c.src), "--top-k", "3"],
        "does not apply to method 'flm'",
    ),
    ("sample-device-nosuch", lambda c: ["sample", "--ckpt", str(c.src), "--device", "nosuch"], "bad value for device"),
    pytest.param(
        "sample-device-cuda",
        lambda c: ["sample", "--ckpt", str(c.src), "--device", "cuda"],
        "no usable CUDA device",
        marks=no_cuda,
    ),
    (
        "infill-huge-mask",
        lambda c: ["sample", "--ckpt", str(c.src), "--infill", "x [MASK:1000000000000]"],
        "masks more tokens than the sequence length",
    ),
    (
        "infill-large-mask",
        lambda c: ["sample", "--ckpt", str(c.src), "--infill", "[MASK:50000000]"],
        "masks more tokens than the sequence length",
    ),
    (
        "infill-mask-5000-digits",
        lambda c: ["sample", "--ckpt", str(c.src), "--infill", "[MASK:" + "9" * 5000 + "]"],
        "masks more tokens",
    ),
    ("infill-bad-syntax", lambda c: ["sample", "--ckpt", str(c.src), "--infill", "a [MASK:x]"], "bad mask syntax"),
    ("infill-no-mask", lambda c: ["sample", "--ckpt", str(c.src), "--infill", "a"], "needs at least one [MASK]"),
    (
        "prefix-and-infill",
        lambda c: ["sample", "--ckpt", str(c.src), "--prefix", "a", "--infill", "[MASK]"],
        "not both",
    ),
    ("prefix-unknown-word", lambda c: ["sample", "--ckpt", str(c.src), "--prefix", "notaword"], "cannot tokenise"),
    ("guide-weight-alone", lambda c: ["sample", "--ckpt", str(c.src), "--guide-weight", "2"], "needs --guide-weak"),
    ("distill-nothing", lambda c: ["distill", "max_steps=1"], "needs --teacher"),
    # serve
    ("serve-port-out-of-range", lambda c: ["serve", "--ckpt", str(c.src), "--port", "99999"], "0..65535"),
    ("serve-port-in-use", lambda c: ["serve", "--ckpt", str(c.src), "--port", str(busy_port(c))], "the port is in use"),
    (
        "serve-bad-host",
        lambda c: ["serve", "--ckpt", str(c.src), "--host", "no-such-host.invalid", "--port", "0"],
        "unknown host",
    ),
    ("serve-bad-ckpt-arg", lambda c: ["serve", "--ckpt", "=x", "--port", "0"], "--ckpt expects NAME=PATH"),
    (
        "serve-missing-ckpt",
        lambda c: ["serve", "--ckpt", "flm=/nonexistent/run", "--port", "0"],
        "checkpoint not found",
    ),
    # evaluation
    (
        "eval-unknown-scorer-offline",
        lambda c: _offline(c) or ["eval", "--ckpt", str(c.src), "--scorer", "nosuch", "-n", "2", "--quiet"],
        "cannot be reached",
    ),
]


def _other_tokenizer(ctx: Ctx) -> bool:
    from fmlm.data import build_tokenizer

    build_tokenizer("char", lambda: ["abc"]).save(ctx.tmp / "tok")
    return True


def _other_shape_weights() -> bytes:
    from safetensors.torch import save

    return save({"net.embed": torch.zeros(3, 3)})


def _offline(ctx: Ctx) -> None:
    ctx.monkeypatch.setattr("fmlm.bench.scorers._hub_reachable", lambda timeout=3.0: False)


def _snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


PARAMS = [
    pytest.param(*c.values, id=c.values[0], marks=c.marks) if hasattr(c, "marks") else pytest.param(*c, id=c[0])
    for c in CASES
]


@pytest.mark.parametrize("name,prepare,match", PARAMS)
def test_bad_input_is_one_line_and_exit_2(name, prepare, match, base, tmp_path, capsys, monkeypatch):
    ctx = Ctx(base, tmp_path)
    ctx.monkeypatch = monkeypatch
    argv = prepare(ctx)
    before = _snapshot(ctx.run) if ctx._run is not None else None
    capsys.readouterr()
    try:
        try:
            code = main(argv)
        except SystemExit as e:  # argparse usage errors
            code = e.code
    finally:
        if hasattr(ctx, "keep"):
            ctx.keep.close()
        if (ctx.tmp / "run" / "checkpoints").exists():
            os.chmod(ctx.tmp / "run" / "checkpoints", 0o755)
    err = capsys.readouterr().err
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert code == 2, err
    assert "Traceback" not in err, err
    assert len(lines) == 1, err
    assert match in lines[0], lines[0]
    if before is not None:  # a refused run changes nothing in its run directory
        assert _snapshot(ctx.run) == before
    if hasattr(ctx, "marker"):
        assert not ctx.marker.exists(), "a checkpoint file ran code"


def test_battery_size():
    """The battery covers every case of issue 15 and the older ones (more may be added, none removed)."""
    assert len(CASES) >= 60


# ----------------------------------------------------------------------------- beyond the CLI table
def test_malicious_pickle_in_a_subprocess_never_runs(base, tmp_path):
    """`fmlm train --run-dir DIR` on a run dir whose legacy optimizer.pt/rng.pt are hostile pickles (with a
    manifest rewritten to match): one line, exit 2, and the pickle's command never ran."""
    import subprocess
    import sys

    ctx = Ctx(base, tmp_path)
    argv = _legacy_evil(ctx)
    proc = subprocess.run(
        [sys.executable, "-m", "fmlm.cli", *argv],
        capture_output=True,
        text=True,
        timeout=600,
        env=dict(os.environ, OMP_NUM_THREADS="1"),
    )
    assert proc.returncode == 2, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and "refusing to unpickle" in proc.stderr
    assert not ctx.marker.exists()
    import io

    control = tmp_path / "control"  # the same pickle, loaded the old way, does run its command
    torch.load(io.BytesIO(evil_pickle(control)), weights_only=False)
    assert control.exists()


def test_legacy_pickled_checkpoints_still_resume(base, tmp_path):
    """A checkpoint of the old layout (optimizer.pt and rng.pt written by torch.save) resumes exactly
    as the new layout does, through torch.load(weights_only=True)."""
    from fmlm import checkpoint as ckpt

    new, ctx = Ctx(base, tmp_path / "new"), Ctx(base, tmp_path / "legacy")
    for ck in sorted((ctx.run / "checkpoints").iterdir()):
        opt, rng = ckpt.load_tree(ck / "optimizer.safetensors"), ckpt.load_tree(ck / "rng.safetensors")
        torch.save(opt, ck / "optimizer.pt")
        torch.save(rng, ck / "rng.pt")
        (ck / "optimizer.safetensors").unlink()
        (ck / "rng.safetensors").unlink()
        rehash(ck)
    assert main(new.train()) == 0 and main(ctx.train()) == 0
    w1 = ckpt.load_state(new.run / "checkpoints" / "step_00000006", "model.safetensors")
    w2 = ckpt.load_state(ctx.run / "checkpoints" / "step_00000006", "model.safetensors")
    assert all(torch.equal(w1[k], w2[k]) for k in w1)


def test_all_corrupt_checkpoints_stop_then_restart_archives(base, tmp_path, capsys):
    """Every checkpoint corrupt: one line, exit 2, log and files untouched; --restart starts over on purpose
    and keeps the old log and checkpoints under archive/."""
    ctx = Ctx(base, tmp_path)
    argv = _corrupt_all(ctx)
    before = _snapshot(ctx.run)
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "--restart" in err
    assert _snapshot(ctx.run) == before  # the log is not truncated, nothing deleted
    assert main([*argv, "--restart"]) == 0
    archived = list((ctx.run / "archive").iterdir())
    assert len(archived) == 1
    assert (archived[0] / "log.jsonl").read_bytes() == before["log.jsonl"]
    assert sorted(p.name for p in (archived[0] / "checkpoints").iterdir()) == ["step_00000002", "step_00000004"]
    assert [p.name for p in (ctx.run / "checkpoints").iterdir()] == ["step_00000004", "step_00000006"]
    assert json.loads((ctx.run / "summary.json").read_text())["step"] == 6


def test_sample_falls_back_to_the_newest_valid_checkpoint(base, tmp_path, capsys):
    ctx = Ctx(base, tmp_path)
    flip_byte(ctx.ckpt(-1) / "model.safetensors")
    import fmlm

    with pytest.warns(UserWarning, match="checksum"):
        model = fmlm.load(ctx.run)
    assert model.path.name == "step_00000002"


def test_disk_full_at_a_save_is_one_line_and_leaves_no_temporary_folder(base, tmp_path, capsys, monkeypatch):
    import fmlm.checkpoint.store as ckpt_store

    ctx = Ctx(base, tmp_path)

    def full(tmp, *a, **k):
        (tmp / "model.safetensors").write_bytes(b"x" * 100)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ckpt_store, "_write_files", full)
    capsys.readouterr()
    assert main(ctx.train()) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "No space left on device" in err and "intact" in err
    names = sorted(p.name for p in (ctx.run / "checkpoints").iterdir())
    assert names == ["step_00000002", "step_00000004"]  # no .tmp-* left, the old ones intact


def test_too_little_free_space_is_refused_before_training(base, tmp_path, capsys, monkeypatch):
    import collections

    ctx = Ctx(base, tmp_path)
    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr("fmlm.train.state.shutil.disk_usage", lambda p: usage(10**9, 10**9 - 1000, 1000))
    capsys.readouterr()
    before = _snapshot(ctx.run)
    assert main(ctx.train("max_steps=100")) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "not enough free space" in err
    assert _snapshot(ctx.run) == before


@pytest.mark.parametrize(
    "s,t,match",
    [
        (-0.1, 0.5, "in \\[0, 1\\]"),
        (0.2, 1.5, "in \\[0, 1\\]"),
        (float("nan"), 0.5, "NaN"),
        (0.2, float("nan"), "NaN"),
        (0.7, 0.2, "s <= t"),
    ],
)
def test_flow_map_times_are_checked(s, t, match):
    from fmlm.config import build_config
    from fmlm.errors import FmlmError
    from fmlm.methods import build_method

    cfg = build_config("tiny", ["train.method=semigroup", "model.two_time=true"])
    cfg.model.vocab_size, cfg.model.max_seq_len = 10, cfg.data.seq_len
    fm = build_method(cfg)
    x = torch.zeros(1, cfg.data.seq_len, 10)
    with pytest.raises(FmlmError, match=match):
        fm.delta(x, torch.tensor([s]), torch.tensor([t]))
    fm.delta(x, torch.tensor([0.0]), torch.tensor([1.0]))  # the edges are fine
