"""End-to-end CLI: train, resume, sample, and one-line errors for bad input."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from fmlm.cli import main

TINY = ["tiny", "threads=1"]


def run_cli(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code, err, match):
    assert code == 2, err
    lines = [l for l in err.strip().splitlines() if l.strip()]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    assert match in lines[0], lines[0]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A tiny phrases run shared by the sampling and error tests."""
    d = tmp_path_factory.mktemp("run")
    cache = tmp_path_factory.mktemp("cache")
    code = main(["train", *TINY, f"data.cache_dir={cache}", "--run-dir", str(d / "run"), "--quiet"])
    assert code == 0
    return d / "run", cache


def _losses(run_dir: Path) -> list[float]:
    return [r["loss"] for r in map(json.loads, (run_dir / "log.jsonl").read_text().splitlines()) if "loss" in r]


def test_train_writes_run_dir(tiny_run):
    run, _ = tiny_run
    assert (run / "config.json").is_file() and (run / "summary.json").is_file()
    ck = sorted((run / "checkpoints").iterdir())
    assert [p.name for p in ck] == ["step_00000025", "step_00000050"]  # keep_last = 2
    for name in (
        "config.json",
        "model.safetensors",
        "ema.safetensors",
        "optimizer.safetensors",
        "trainer_state.json",
        "rng.safetensors",
        "tokenizer",
        "manifest.json",
    ):
        assert (ck[-1] / name).exists(), name
    recs = [json.loads(l) for l in (run / "log.jsonl").read_text().splitlines()]
    assert any("tokens_per_s" in r and "lr" in r and "loss" in r for r in recs)
    assert any("val_ce" in r for r in recs)


def test_resume_is_exact(tmp_path, tiny_run):
    _, cache = tiny_run
    common = [*TINY, f"data.cache_dir={cache}", "log_every=1", "--quiet", "--no-samples"]
    assert main(["train", *common, "max_steps=40", "save_every=20", "--run-dir", str(tmp_path / "a")]) == 0
    assert main(["train", *common, "max_steps=20", "save_every=20", "--run-dir", str(tmp_path / "b")]) == 0
    # Same command with a larger budget continues from step 20.
    assert main(["train", *common, "max_steps=40", "save_every=20", "--run-dir", str(tmp_path / "b")]) == 0
    a, b = _losses(tmp_path / "a"), _losses(tmp_path / "b")
    assert len(a) == len(b) == 40
    assert a == b


def test_resume_refuses_a_different_config(tmp_path, tiny_run, capsys):
    _, cache = tiny_run
    common = [*TINY, f"data.cache_dir={cache}", "--quiet", "--no-samples", "--run-dir", str(tmp_path / "r")]
    assert main(["train", *common, "max_steps=5"]) == 0
    capsys.readouterr()
    code, _, err = run_cli(capsys, "train", *common, "max_steps=10", "lr=0.5")
    assert_one_line_error(code, err, "different config")


def test_sample_cli_and_api(tiny_run, capsys):
    run, _ = tiny_run
    code, out, _ = run_cli(capsys, "sample", "--ckpt", str(run), "--steps", "4", "-n", "3", "--seed", "1")
    assert code == 0 and out.strip()
    code2, out2, _ = run_cli(capsys, "sample", "--ckpt", str(run), "--steps", "4", "-n", "3", "--seed", "1")
    assert out == out2  # seeded
    code, out, _ = run_cli(capsys, "sample", "--ckpt", str(run), "--steps", "1,8", "-n", "64", "--check", "--json")
    res = json.loads(out)["results"]
    assert [r["steps"] for r in res] == [1, 8]
    assert all(0 <= r["valid_rate"] <= 1 and 0 <= r["coverage"] <= 1 for r in res)

    import fmlm

    model = fmlm.load(run)
    texts = model.sample(num_samples=2, steps=4, seed=0)
    assert len(texts) == 2 and all(isinstance(t, str) for t in texts)
    assert texts == model.sample(num_samples=2, steps=4, seed=0)


@pytest.mark.parametrize(
    "argv, match",
    [
        (["train", "no-such-preset"], "unknown preset"),
        (["train", "tiny", "bogus=1"], "unknown config key"),
        (["train", "tiny", "lr=fast"], "bad value for train.lr"),
        (["config", "tiny", "steps=0"], "sample.steps must be >= 1"),
        (["sample", "--ckpt", "/nonexistent/run"], "checkpoint not found"),
        (["sample", "--ckpt", "x", "--steps", "0"], "steps must be >= 1"),
        (["sample"], "--ckpt"),
    ],
)
def test_bad_input_one_line(capsys, argv, match):
    try:
        code = main(argv)
    except SystemExit as e:  # argparse usage errors
        code = e.code
    _, err = capsys.readouterr()
    assert_one_line_error(code, err, match)


def test_bad_input_needing_a_run(tiny_run, tmp_path, capsys):
    run, cache = tiny_run
    code, _, err = run_cli(capsys, "sample", "--ckpt", str(run), "--seq-len", "999")
    assert_one_line_error(code, err, "the model's maximum")

    # A tokenizer with another vocabulary.
    from fmlm.data import build_tokenizer

    other = build_tokenizer("char", lambda: ["abc"])
    other.save(tmp_path / "tok")
    code, _, err = run_cli(capsys, "sample", "--ckpt", str(run), "--tokenizer", str(tmp_path / "tok"))
    assert_one_line_error(code, err, "does not match the checkpoint")

    # A corrupt checkpoint: copy one and flip a byte in its weights.
    import shutil

    src = sorted((run / "checkpoints").iterdir())[-1]
    bad = tmp_path / "bad"
    shutil.copytree(src, bad)
    data = bytearray((bad / "model.safetensors").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (bad / "model.safetensors").write_bytes(bytes(data))
    code, _, err = run_cli(capsys, "sample", "--ckpt", str(bad))
    assert_one_line_error(code, err, "corrupt")

    # A partial checkpoint (no manifest: killed mid-write).
    (bad / "manifest.json").unlink()
    code, _, err = run_cli(capsys, "sample", "--ckpt", str(bad))
    assert_one_line_error(code, err, "incomplete checkpoint")


def test_bad_corpus_one_line(tmp_path, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("   \n")
    code, _, err = run_cli(
        capsys, "data", "tiny", f"data.dataset={empty}", "tokenizer=char", "seq_len=8", f"data.cache_dir={tmp_path}"
    )
    assert_one_line_error(code, err, "empty")
    latin = tmp_path / "latin.txt"
    latin.write_bytes("caf\xe9 ol\xe9 ".encode("latin-1") * 100)
    code, _, err = run_cli(
        capsys, "data", "tiny", f"data.dataset={latin}", "tokenizer=char", "seq_len=8", f"data.cache_dir={tmp_path}"
    )
    assert_one_line_error(code, err, "UTF-8")


def test_console_script_bad_input_has_no_traceback():
    proc = subprocess.run([sys.executable, "-m", "fmlm.cli", "train", "nope"], capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "Traceback" not in proc.stderr


@pytest.mark.slow
def test_phrases_end_to_end_learns(tmp_path, capsys):
    """400 steps (about 30 s on 2 idle cores) of training on the phrases task, then sampling through the CLI."""
    run = tmp_path / "phrases"
    code = main(
        [
            "train",
            "phrases",
            "phrases_n=6",
            "phrases_k=3",
            "phrases_per_seq=1",
            "seq_len=3",
            "lr=2e-3",
            "max_steps=400",
            "max_minutes=0",
            "threads=1",
            "--quiet",
            "--no-samples",
            f"data.cache_dir={tmp_path}",
            "--run-dir",
            str(run),
        ]
    )
    assert code == 0
    capsys.readouterr()
    code, out, _ = run_cli(capsys, "sample", "--ckpt", str(run), "--steps", "1,32", "-n", "256", "--check", "--json")
    res = {r["steps"]: r for r in json.loads(out)["results"]}
    # Many Euler steps resolve the correlations; one step samples independent marginals.
    assert res[32]["valid_rate"] > 0.9, res
    assert res[32]["coverage"] > 0.9, res
    assert res[1]["valid_rate"] < res[32]["valid_rate"]


def test_sampler_options_are_checked_per_method(tiny_run, capsys):
    run, _ = tiny_run
    code, _, err = run_cli(capsys, "sample", "--ckpt", str(run), "--top-k", "3")
    assert_one_line_error(code, err, "does not apply to method 'flm'")


def test_resume_skips_a_corrupt_newest_checkpoint(tmp_path, tiny_run):
    _, cache = tiny_run
    common = [*TINY, f"data.cache_dir={cache}", "--quiet", "--no-samples", "--run-dir", str(tmp_path / "r")]
    assert main(["train", *common, "max_steps=20", "save_every=10"]) == 0
    newest = sorted((tmp_path / "r" / "checkpoints").iterdir())[-1]
    data = bytearray((newest / "model.safetensors").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (newest / "model.safetensors").write_bytes(bytes(data))
    with pytest.warns(UserWarning, match="checksum"):
        assert main(["train", *common, "max_steps=20", "save_every=10"]) == 0
    assert json.loads((tmp_path / "r" / "summary.json").read_text())["step"] == 20
