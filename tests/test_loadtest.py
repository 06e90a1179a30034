"""benchmarks/loadtest.py end to end on a tiny trained checkpoint (a real server subprocess)."""

import importlib.util
import json
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from fmlm.cli import main  # noqa: E402

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "loadtest.py"


@pytest.mark.slow
def test_loadtest_reports_no_errors_and_4xx_for_bad_requests(tmp_path, capsys):
    run = tmp_path / "run"
    assert (
        main(
            [
                "train",
                "tiny",
                "threads=1",
                "max_steps=10",
                f"data.cache_dir={tmp_path / 'cache'}",
                "--run-dir",
                str(run),
                "--quiet",
                "--no-samples",
            ]
        )
        == 0
    )
    spec = importlib.util.spec_from_file_location("loadtest", SCRIPT)
    lt = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(lt)
    capsys.readouterr()
    out = tmp_path / "lt.json"
    code = lt.main(
        [
            "--ckpt",
            f"tiny={run}",
            "--steps",
            "2",
            "--requests",
            "16",
            "--concurrency",
            "2",
            "--bad-every",
            "2",
            "--max-seconds",
            "900",
            "--warmup",
            "1",
            "--out",
            str(out),
        ]
    )
    r = json.loads(out.read_text())
    assert code == 0, r
    assert r["valid_ok"] == r["valid_sent"] == 16 and r["valid_errors"] == 0
    assert r["bad_sent"] == 8 and r["bad_4xx"] == 8 and r["bad_share_4xx"] == 1.0
    assert r["requests_per_second"] > 0 and 0 < r["latency_ms"]["p50"] <= r["latency_ms"]["p95"]
    assert r["server_alive_after"] and not r["stopped_early"]
    assert "| tiny (flm) | 2 | 2 | 16/16 | 0 |" in capsys.readouterr().err
