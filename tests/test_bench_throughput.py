"""fmlm bench train: one subprocess per configuration, JSON + markdown out, one-line errors."""

import json

import pytest

from fmlm.cli import main


@pytest.mark.slow
def test_bench_train_small(tmp_path, capsys):
    out = tmp_path / "bench"
    code = main(
        [
            "bench",
            "train",
            "--vocab",
            "300",
            "--seq-len",
            "16",
            "--batch",
            "2",
            "--steps",
            "1",
            "--warmup",
            "0",
            "--threads",
            "1",
            "--configs",
            "flm-vocab,flm-embedded,mdlm",
            "--out",
            str(out),
        ]
    )
    assert code == 0
    table = capsys.readouterr().out
    res = json.loads((out / "bench.json").read_text())
    rows = {r["config"]: r for r in res["results"]}
    assert set(rows) == {"flm-vocab", "flm-embedded", "mdlm"}
    for r in rows.values():
        assert r["tokens_per_s"] > 0 and r["peak_mib"] > 0 and r["finite"]
        assert r["step_peak_mib"] >= 0
    assert rows["mdlm"]["throughput_vs_mdlm"] == 1.0
    assert "goal" in res and "| flm-embedded |" in table
    assert (out / "bench.md").read_text().strip() == table.strip()


@pytest.mark.parametrize(
    "argv,match",
    [
        (["--configs", "flm,gpt"], "unknown bench configuration"),
        (["--size", "huge"], "unknown model size"),
        (["--steps", "0"], "--steps must be >= 1"),
    ],
)
def test_bench_train_bad_input_one_line(tmp_path, capsys, argv, match):
    code = main(["bench", "train", *argv, "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 2
    assert len(err.strip().splitlines()) == 1 and match in err, err
