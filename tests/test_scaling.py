"""fmlm bench scaling: the claims judged per point, aggregation, and benchmarks/gpu_study.sh at tiny size."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fmlm.bench.scaling_report import claims, markdown
from fmlm.cli import main
from test_bench import _tiny_gpt2
from test_cli import assert_one_line_error, run_cli

ROOT = Path(__file__).resolve().parent.parent


def _row(label, steps, bpb, entropy=3.0, sec=0.01):
    return {
        "label": label,
        "steps": steps,
        "nfe": steps,
        "gen_bpb": bpb,
        "gen_ppl": 2**bpb,
        "entropy": entropy,
        "seconds_per_sample": sec * steps,
        "samples_per_s": 1 / (sec * steps),
    }


def _point_of(rows):
    """A study point of the given rows, none collapsed (its claims added by the caller)."""
    return {
        "size": "mini",
        "budget": 500,
        "tokens": 2048000,
        "scorer": "s",
        "data_bpb": 1.9,
        "shuffled_bpb": 5.1,
        "rows": [{**r, "collapsed": False} for r in rows],
    }


def test_claims_by_bits_per_byte():
    rows = [
        _row("FMLM", 1, 4.0),
        _row("MDLM", 1, 5.0),
        _row("MDLM", 8, 4.2),
        _row("Duo", 2, 4.5),
        _row("Duo", 4, 1.0, entropy=0.5),  # collapsed: a rival setting that does not count
        _row("FLM", 1024, 3.2),
        _row("MDLM", 1024, 2.9),
        _row("Duo", 1024, 3.0),
        _row("AR", 128, 2.1),
        _row("Duo+DCD", 2, 3.9),
        _row("Duo+DCD", 16, 3.0),  # 16 steps: past the few-step range, does not count
        _row("MDLM+SDTT", 1, 6.0),
    ]
    c = claims({"rows": rows, "data_entropy": 3.1})
    assert c["one_step"]["holds"] and c["one_step"]["best_rival"] == "MDLM 8"
    assert c["one_step"]["margin"] == pytest.approx(0.2)
    # against the distilled baselines: Duo+DCD at 2 steps beats the flow map at 1
    assert not c["one_step_distilled"]["holds"] and c["one_step_distilled"]["best_rival"] == "Duo+DCD 2"
    assert c["one_step_distilled"]["margin"] == pytest.approx(-0.1)
    assert not c["many_step"]["holds"] and c["many_step"]["best_rival"] == "MDLM"
    assert c["many_step"]["gap"] == pytest.approx(0.3)
    assert c["speed"]["AR"]["steps"] == 128 and c["speed"]["MDLM"]["steps"] == 1024
    # a collapsed one-step flow map does not hold the claim, however low its score
    rows[0]["entropy"] = 0.4
    assert not claims({"rows": rows, "data_entropy": 3.1})["one_step"]["holds"]
    # nor does a collapsed FLM at 1,024 steps, and a collapsed rival does not count
    rows[0]["entropy"] = 3.0
    low = [dict(r, gen_bpb=2.0, entropy=0.5) if (r["label"], r["steps"]) == ("FLM", 1024) else r for r in rows]
    c2 = claims({"rows": low, "data_entropy": 3.1})["many_step"]
    assert not c2["holds"] and not c2["entropy_ok"] and c2["gap"] == pytest.approx(-0.9)
    rival_low = [dict(r, gen_bpb=1.0, entropy=0.5) if (r["label"], r["steps"]) == ("MDLM", 1024) else r for r in rows]
    c3 = claims({"rows": rival_low, "data_entropy": 3.1})["many_step"]
    assert c3["best_rival"] == "Duo" and not c3["holds"] and c3["gap"] == pytest.approx(0.2)
    assert c["many_step"]["steps"] == 1024
    # a sweep that stops short of 1,024 is judged at the largest step count the FLM and a rival share
    short = [r for r in rows if r["steps"] != 1024] + [
        _row("FLM", 256, 3.4),
        _row("Duo", 256, 3.1),
        _row("MDLM", 64, 2.0),
    ]
    c4 = claims({"rows": short, "data_entropy": 3.1})["many_step"]
    assert c4["steps"] == 256 and c4["best_rival"] == "Duo" and c4["gap"] == pytest.approx(0.3)
    assert "fails (+0.300 at 256 steps)" in markdown({"points": [dict(_point_of(short), claims={"many_step": c4})]})
    md = markdown({"points": [dict(_point_of(rows), claims=c)]})
    assert (
        "| held-out text | – | 1.900 |" in md
        and "| mini 500 | 2,048,000 | holds (+0.200) | fails (-0.100) | fails (+0.300) |" in md
    )


@pytest.mark.slow
def test_gpu_study_script_at_tiny_size_on_cpu(tmp_path):
    """The GPU study's script, shrunk to seconds: sample only (no scorer), then score the saved samples."""
    _tiny_gpt2(tmp_path / "scorer")
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(f"new york {i % 7} san diego, said the {i}th line." for i in range(300)))
    env = {
        **os.environ,
        "SIZE": "tiny",
        "BUDGET": "2",
        "BATCH": "4",
        "SEQ_LEN": "16",
        "STEPS": "1,2",
        "N": "4",
        "SCORERS": "none",
        "DATA": str(corpus),
        "DEVICE": "cpu",
        "THREADS": "1",
        "OUT_DIR": str(tmp_path / "out"),
        "CACHE": str(tmp_path / "cache"),
        "PYTHON": sys.executable,
        "EXTRA": f"data.cache_dir={tmp_path / 'data'} --quiet --no-plots",
    }
    script = ROOT / "benchmarks" / "gpu_study.sh"
    done = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True, timeout=1800)
    assert done.returncode == 0, done.stderr[-3000:]
    bench = tmp_path / "out" / "tiny-2"
    r = json.loads((bench / "results.json").read_text())
    assert r["scorer"] is None and r["overrides"][-2:] == ["model.size=tiny", "max_steps=2"]
    assert r["distill_overrides"] == ["max_steps=1"]
    assert set(r["variants"]) == {"FLM", "FMLM", "MDLM", "Duo", "Duo+DCD", "MDLM+SDTT", "AR"}
    assert r["variants"]["Duo"]["step"] == 2 and r["variants"]["Duo+DCD"]["step"] == 1
    lines = (bench / "samples.jsonl").read_text().splitlines()
    assert len(lines) == 4 * (2 * 6 + 1 + 2)  # six diffusion models at 2 step counts, AR, the 2 references
    before = (bench / "results.json").read_bytes()
    # Scoring later (where the scorers are): the sampled bench is reused, its samples scored.
    env["SCORERS"] = str(tmp_path / "scorer")
    done = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True, timeout=1800)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (bench / "results.json").read_bytes() == before
    study = json.loads((tmp_path / "out" / "scaling.json").read_text())
    (point,) = study["points"]
    assert point["folder"].startswith("tiny-2-") and point["data_bpb"] > 0 and point["shuffled_bpb"] > 0
    assert point["tokens"] == 2 * 4 * 16  # stage-1 steps x batch x length, not the distillation's
    assert all(row["gen_bpb"] > 0 for row in point["rows"])
    assert set(point["claims"]) == {"one_step", "one_step_distilled", "many_step", "speed"}
    assert point["claims"]["many_step"]["steps"] == 2  # the sweep's largest step count stands in for 1,024
    assert "### " in (tmp_path / "out" / "scaling.md").read_text()


def test_scaling_cli_errors(capsys):
    code, _, err = run_cli(capsys, "bench", "scaling", "nosuch", "--budgets", "10")
    assert_one_line_error(code, err, "unknown bench preset")
    code, _, err = run_cli(capsys, "bench", "scaling", "--budgets", "10", "--distill-ratio", "0")
    assert_one_line_error(code, err, "--distill-ratio must be > 0")
    with pytest.raises(SystemExit) as e:
        main(["bench", "scaling", "--budgets", "0"])
    assert e.value.code == 2
    assert_one_line_error(2, capsys.readouterr().err, "--budgets")


def test_a_point_is_reused_only_with_the_same_variants():
    """--only is part of a point's settings: a bench of five variants does not stand in for one of seven."""
    from fmlm.bench.scaling import _matches

    ov, distill, steps = ["model.size=mini", "max_steps=10"], ["max_steps=5"], [1, 2]
    result = {
        "preset": "shakespeare-cpu",
        "overrides": ov,
        "distill_overrides": distill,
        "steps": steps,
        "num_samples": 4,
        "samples_file": "samples.jsonl",
        "only": ["FLM", "FMLM", "AR"],
    }
    assert _matches(result, "shakespeare-cpu", ov, distill, steps, 4, ["ar", "flm", "fmlm"])
    assert not _matches(result, "shakespeare-cpu", ov, distill, steps, 4, None)
    assert not _matches(result, "shakespeare-cpu", ov, distill, steps, 4, ["FLM", "AR"])
    assert _matches({**result, "only": None}, "shakespeare-cpu", ov, distill, steps, 4, None)
    assert not _matches({**result, "only": None}, "shakespeare-cpu", ov, distill, steps, 4, ["FLM"])


def _finished_point(folder, budget, scorer, bpb, size="mini", steps=(1, 2)):
    from fmlm.bench.report import write_outputs

    rows = [
        {"label": lab, "method": m, "steps": s, "nfe": s, "num_samples": 3, "entropy": 3.0, "gen_bpb": bpb + d}
        | {"gen_ppl": 2.0, "seconds_per_sample": 0.01 * s, "samples_per_s": 100.0 / s}
        for lab, m, s, d in [("FLM", "flm", 1, 1.0), ("FMLM", "semigroup", 1, 0.0), ("MDLM", "mdlm", 2, 0.5)]
    ]
    result = {
        **dict.fromkeys(("ablation", "ablation_description", "command", "commit", "torch", "threads")),
        "preset": "shakespeare-cpu",
        "description": "by hand",
        "seed": 0,
        "overrides": [f"model.size={size}", f"max_steps={budget}"],
        "distill_overrides": [f"max_steps={budget // 2}"],
        "steps": list(steps),
        "num_samples": 3,
        "samples_file": "samples.jsonl",
        "scorer": {"name": scorer},
        "metric": "gen_bpb",
        "rows": rows,
        "variants": {
            "FLM": {"method": "flm", "tokens": budget * 100, "status": "trained"},
            "FMLM": {"method": "semigroup", "tokens": 1, "status": "trained"},
        },
        "data_entropy": 3.1,
        "data_bpb": 2.0,
        "shuffled_bpb": 5.5,
    }
    write_outputs(result, folder, plots=False)


def test_report_only_aggregates_the_finished_points_and_names_the_missing(tmp_path, capsys):
    out = tmp_path / "study"
    _finished_point(out / "mini-10", 10, "s1", 4.0)
    _finished_point(out / "mini-10-s2", 10, "s2", 4.5)
    _finished_point(out / "mini-30", 30, "s1", 3.5)
    common = ["--steps", "1,2", "-n", "3", "--distill-ratio", "0.5", "--out", str(out), "--no-plots"]
    code, _, err = run_cli(
        capsys, "bench", "scaling", "--budgets", "10,30,90", "--scorers", "s1,s2", "--report-only", *common
    )
    assert code == 0, err
    study = json.loads((out / "scaling.json").read_text())
    assert [(p["budget"], p["scorer"], p["folder"]) for p in study["points"]] == [
        (10, "s1", "mini-10"),
        (10, "s2", "mini-10-s2"),
        (30, "s1", "mini-30"),
    ]
    assert study["points"][2]["tokens"] == 3000 and study["points"][2]["claims"]["one_step"]["holds"]
    assert "mini-30: not scored under s2 yet, left out" in err and "mini-90: not scored under s1" in err
    # a point sampled with other settings is not one of this study's
    other = [x if x != "3" else "4" for x in common]  # 4 samples per setting, not 3
    code, _, err = run_cli(
        capsys, "bench", "scaling", "--budgets", "10", "--report-only", "--scorers", "s1", "--quiet", *other
    )
    assert_one_line_error(code, err, "no finished point")


def test_report_only_takes_a_point_sampled_with_its_own_sweep_and_plots_every_size(tmp_path, capsys):
    """A costly point (here a wider model) sampled with a shorter or longer sweep than --steps still
    belongs to the study: it is aggregated, the log says so, and the plots show it beside the first size."""
    pytest.importorskip("matplotlib")
    out = tmp_path / "study"
    _finished_point(out / "mini-10", 10, "s1", 4.0)
    _finished_point(out / "mini-30", 30, "s1", 3.5)
    _finished_point(out / "small-cpu-30", 30, "s1", 3.0, size="small-cpu", steps=(1, 2, 256))
    args = ["--budgets", "10,30", "--sizes", "mini,small-cpu", "--scorers", "s1", "--report-only"]
    code, _, err = run_cli(
        capsys, "bench", "scaling", *args, "--steps", "1,2", "-n", "3", "--distill-ratio", "0.5", "--out", str(out)
    )
    assert code == 0, err
    study = json.loads((out / "scaling.json").read_text())
    assert [(p["size"], p["budget"]) for p in study["points"]] == [("mini", 10), ("mini", 30), ("small-cpu", 30)]
    assert "small-cpu-30: sampled at steps 1,2,256, not --steps; included" in err
    assert "mini-10: sampled at" not in err
    assert "| model | steps | mini 10 | mini 30 | small-cpu 30 |" in (out / "scaling.md").read_text()
    assert sorted(study["plots"]) == ["bpb_vs_time-s1.png", "bpb_vs_tokens-s1.png"]
    assert all((out / name).stat().st_size > 0 for name in study["plots"])
