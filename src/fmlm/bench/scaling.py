"""``fmlm bench scaling``: the side-by-side comparison at several training budgets and widths.

    fmlm bench scaling [PRESET] --budgets 500,1500,4500 [--sizes mini,small-cpu]
        [--scorers gemma-3-270m,smollm2-135m] [--steps 1,2,4,8,32,1024] [-n 128]
        [--out DIR] [--cache-dir DIR] [--threads N] [key=value ...]

For every size × budget it runs ``fmlm bench PRESET model.size=SIZE max_steps=BUDGET``
(the flow map distilled for ``--distill-ratio`` × BUDGET steps) into ``OUT/SIZE-BUDGET/``,
or reuses that folder when it already holds a finished bench with the same settings.
The first scorer scores the samples as they are drawn; each further scorer re-scores
the saved samples into ``OUT/SIZE-BUDGET-SCORER/``. Trained runs live in the bench cache,
so a study can be built up over several invocations (add a budget, a size or a scorer
later; nothing finished is redone). Then it aggregates every point into
``scaling.json``, ``scaling.md`` (bits per byte by method, steps and budget; the seed's
three claims judged at each point) and two plots: bits per byte against training tokens
and, at the largest budget, against seconds per sample. ``--report-only`` runs nothing: it
aggregates the points and scorers already finished under ``--out`` and says which are missing.
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import sys
from pathlib import Path

from fmlm.bench.report import read_result
from fmlm.bench.rescore import _slug, rescore
from fmlm.bench.scaling_report import aggregate, markdown, plot
from fmlm.errors import ConfigError
from fmlm.io import write_text

#: The study's step sweep (AR: its L sequential passes).
STEPS = (1, 2, 4, 8, 32, 1024)
#: The flow map's distillation budget as a fraction of the stage-1 budget (shakespeare-cpu: 800 / 1,500).
DISTILL_RATIO = 800 / 1500


def point_overrides(size: str, budget: int) -> list[str]:
    return [f"model.size={size}", f"max_steps={budget}"]


def _matches(
    result: dict,
    preset: str,
    overrides: list[str],
    distill: list[str],
    steps: list[int] | None,
    n: int,
    only: list[str] | None = None,
) -> bool:
    """Whether a finished bench was sampled with these settings (whatever its scorer; ``steps=None``:
    whatever its step sweep)."""
    return (
        result.get("preset") == preset
        and result.get("overrides") == overrides
        and result.get("distill_overrides") == distill
        and (steps is None or result.get("steps") == steps)
        and result.get("num_samples") == n
        and bool(result.get("samples_file"))
        and _labels(result.get("only")) == _labels(only)
    )


def _labels(only: list[str] | None) -> set[str] | None:
    return None if not only else {label.lower() for label in only}


def _scorer_name(result: dict) -> str | None:
    return (result.get("scorer") or {}).get("name")


def point_settings(overrides: list[str], size: str, budget: int, distill_ratio: float) -> tuple[list[str], list[str]]:
    """A point's config overrides and its distillation overrides (``distill_ratio`` × ``budget`` steps)."""
    return list(overrides) + point_overrides(size, budget), [f"max_steps={max(1, round(distill_ratio * budget))}"]


def scored_folder(out: Path, size: str, budget: int, bench: dict, name: str) -> Path | None:
    """The folder of a point that holds its bench scored under ``name`` (the bench's own, or a
    re-scored copy ``OUT/SIZE-BUDGET-SCORER``); None when it is not scored under it yet."""
    if _scorer_name(bench) == name:
        return out / f"{size}-{budget}"
    dest = out / f"{size}-{budget}-{_slug(name)}"
    if (dest / "results.json").is_file() and _scorer_name(read_result(dest)) == name:
        return dest
    return None


def run_point(
    preset: str,
    size: str,
    budget: int,
    overrides: list[str],
    out: Path,
    steps: list[int],
    n: int,
    scorers: list[str],
    distill_ratio: float,
    cache_dir,
    threads,
    device,
    quiet: bool,
    log,
    load=None,
    only: list[str] | None = None,
) -> list[Path]:
    """One point of the study: the bench and a scored folder per scorer; returns the scored folders.

    The bench folder ``OUT/SIZE-BUDGET`` is reused when it holds a finished bench sampled
    with the same settings; it is scored by the first scorer while sampling. Every other
    scorer (and the first one, when the reused bench was scored by another or by none, e.g.
    sampled on a GPU machine without scorers) re-scores its saved samples into
    ``OUT/SIZE-BUDGET-SCORER``. ``none`` as the only scorer samples without scoring.
    ``only`` restricts the sampled variants (``--only``; their teachers are still trained).
    """
    from fmlm.bench.suite import run_bench

    if load is None:
        from fmlm.bench.scorers import load_scorer

        def load(name):
            return load_scorer(name, device=device)

    ov, distill = point_settings(overrides, size, budget, distill_ratio)
    folder = out / f"{size}-{budget}"
    first = scorers[0]
    existing = read_result(folder) if (folder / "results.json").is_file() else None
    if existing is not None and _matches(existing, preset, ov, distill, steps, n, only):
        log(f"{folder}: sampled with the same settings, reused")
    else:
        log(f"bench {preset} at {size}, {budget} steps -> {folder}")
        command = "fmlm bench " + " ".join(
            shlex.quote(a)
            for a in [
                preset,
                *ov,
                "--distill-set",
                distill[0],
                "--steps",
                ",".join(map(str, steps)),
                "-n",
                str(n),
                "--scorer",
                first,
                *(["--only", ",".join(only)] if only else []),
            ]
        )
        existing = run_bench(
            preset,
            None,
            ov,
            folder,
            cache_dir,
            steps=steps,
            num_samples=n,
            scorer=first,
            threads=threads,
            device=device,
            quiet=quiet,
            command=command,
            distill_overrides=distill,
            only=only,
        )
    folders = []
    for name in scorers:
        if name == "none":
            continue
        found = scored_folder(out, size, budget, existing, name)
        if found is not None:
            if found != folder:
                log(f"{found}: already re-scored, reused")
            folders.append(found)
            continue
        dest = out / f"{size}-{budget}-{_slug(name)}"
        log(f"re-scoring {folder} under {name} -> {dest}")
        rescore(folder, load(name), dest, command=f"fmlm bench rescore {folder} --scorer {name} --out {dest}", log=log)
        folders.append(dest)
    return folders


def finished_folders(out: Path, size: str, budget: int, args, scorers, only, log=lambda msg: None) -> dict[str, Path]:
    """The folders of one point already scored by each scorer (``--report-only``), by scorer name.

    A point counts whatever its step sweep (a costly point, e.g. a wider model, may have been sampled
    with a shorter one); the log says when it differs from ``--steps``."""
    folder = out / f"{size}-{budget}"
    if not (folder / "results.json").is_file():
        return {}
    bench = read_result(folder)
    ov, distill = point_settings(args.overrides, size, budget, args.distill_ratio)
    if not _matches(bench, args.preset, ov, distill, None, args.num_samples, only):
        return {}
    if bench.get("steps") != list(args.steps):
        log(f"{folder}: sampled at steps {','.join(map(str, bench.get('steps') or []))}, not --steps; included")
    found = {name: scored_folder(out, size, budget, bench, name) for name in scorers}
    return {name: f for name, f in found.items() if f is not None}


# ------------------------------------------------------------------ CLI
def add_arguments(p: argparse.ArgumentParser) -> None:
    from fmlm.argtypes import positive, steps_list

    p.add_argument("preset", nargs="?", default="shakespeare-cpu", help="bench preset (default shakespeare-cpu)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides for every run")
    p.add_argument("--budgets", type=steps_list, required=True, help="comma-separated stage-1 step budgets")
    p.add_argument("--sizes", default="mini", help="comma-separated model sizes (default mini)")
    p.add_argument(
        "--scorers",
        default="gemma-3-270m",
        help="comma-separated scorers; the first scores while sampling, the rest re-score the saved "
        "samples (none: sample only, e.g. on a machine without the scorers; score later)",
    )
    p.add_argument("--steps", type=steps_list, default=list(STEPS), help="step sweep (default 1,2,4,8,32,1024)")
    p.add_argument("--num-samples", "-n", type=positive, default=128)
    p.add_argument(
        "--distill-ratio",
        type=float,
        default=DISTILL_RATIO,
        help="flow-map distillation steps per stage-1 step (default 800/1500)",
    )
    p.add_argument(
        "--only",
        help="comma-separated variant labels to sample, e.g. FLM,FMLM,MDLM,Duo,AR (their teachers are still trained)",
    )
    p.add_argument("--out", default="runs/bench/scaling", help="output folder")
    p.add_argument("--cache-dir", help="where trained runs are cached (default: $FMLM_CACHE/bench)")
    p.add_argument("--threads", type=positive)
    p.add_argument("--device")
    p.add_argument(
        "--report-only",
        action="store_true",
        help="train, sample and score nothing: aggregate the points (and scorers) already finished under --out, "
        "whatever step sweep each was sampled with",
    )
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--quiet", action="store_true")


def run(args: argparse.Namespace, argv: list[str]) -> int:
    from fmlm.bench.presets import get_preset

    get_preset(args.preset)
    for item in args.overrides:
        if "=" not in item or item.startswith("="):
            raise ConfigError(f"expected key=value, got {item!r}")
    if not (math.isfinite(args.distill_ratio) and args.distill_ratio > 0):
        raise ConfigError(f"--distill-ratio must be > 0, got {args.distill_ratio}")
    sizes = [s.strip() for s in args.sizes.split(",") if s.strip()]
    scorers = [s.strip() for s in args.scorers.split(",") if s.strip()]
    if not sizes or not scorers:
        raise ConfigError("--sizes and --scorers need at least one name each")
    only = [s.strip() for s in args.only.split(",") if s.strip()] if args.only else None
    log = (lambda msg: None) if args.quiet else (lambda msg: print(msg, file=sys.stderr))
    out = Path(args.out)
    loaded: dict = {}

    def load(name):  # each re-scoring scorer is loaded once for the whole study, not once per point
        from fmlm.bench.scorers import load_scorer

        if name not in loaded:
            loaded[name] = load_scorer(name, device=args.device)
        return loaded[name]

    done: list[tuple[str, int, Path]] = []
    total = len(sizes) * len(args.budgets)
    for i, size in enumerate(sizes):
        for j, budget in enumerate(args.budgets):
            log(f"[point {i * len(args.budgets) + j + 1}/{total}] {size}, {budget} steps")
            if args.report_only:
                found = finished_folders(out, size, budget, args, scorers, only, log)
                for name in scorers:
                    if name not in found:
                        log(f"{out / f'{size}-{budget}'}: not scored under {name} yet, left out")
                done += [(size, budget, found[name]) for name in scorers if name in found]
                continue
            for folder in run_point(
                args.preset,
                size,
                budget,
                args.overrides,
                out,
                list(args.steps),
                args.num_samples,
                scorers,
                args.distill_ratio,
                args.cache_dir,
                args.threads,
                args.device,
                args.quiet,
                log,
                load,
                only,
            ):
                done.append((size, budget, folder))
    if args.report_only and not done:
        raise ConfigError(f"{out}: no finished point to report")
    study = aggregate(done)
    command = "fmlm bench scaling " + " ".join(shlex.quote(a) for a in argv)
    study["command"] = command
    if not args.no_plots:
        study["plots"] = [p.name for p in plot(study, out)]
    write_text(out / "scaling.json", json.dumps(study, indent=2) + "\n")
    md = markdown(study, command)
    write_text(out / "scaling.md", md)
    print(md)
    return 0
