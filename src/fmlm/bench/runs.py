"""The bench's training runs: each variant's config, its cache key, and :class:`Runs`, which trains a run or
reuses a finished one."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from fmlm import checkpoint as ckpt
from fmlm.bench.presets import BenchPreset, Variant
from fmlm.config import RunConfig, build_config, flatten, set_value, validate
from fmlm.errors import ConfigError, FmlmError
from fmlm.train import RESUMABLE_KEYS, Trainer

# Keys that do not change what a run learns (bookkeeping, placement, paths).
_IGNORED = set(RESUMABLE_KEYS) | {
    "preset",
    "model.vocab_size",
    "model.max_seq_len",
    "distill.teacher",
    "train.threads",
    "train.device",
    "data.cache_dir",
}


_BUDGET = ("train.max_steps", "train.max_minutes")


def variant_config(
    preset: BenchPreset,
    variant: Variant,
    overrides: list[str],
    teacher: str | None = None,
    threads: int | None = None,
    device: str | None = None,
    distill_overrides: list[str] | None = None,
) -> RunConfig:
    """The run config of one variant: the preset's shared overrides, then the variant's.

    Distilled models follow ``fmlm distill``: AdamW β2 = 0.95, one-step samples (flow maps:
    a two-time backbone), then the preset's distillation overrides, the variant's and the
    user's (``overrides`` for every run, then ``distill_overrides`` for distilled runs only:
    flow maps and Duo + DCD, MDLM + SDTT get the same distillation budget).
    """
    shared = list(preset.overrides)
    if not variant.distilled:
        cfg = build_config(preset.config, shared + list(variant.overrides) + list(overrides))
        cfg.train.method = variant.method
    else:
        cfg = build_config(preset.config, shared)
        cfg.train.method = variant.method
        cfg.train.beta2 = 0.95
        cfg.sample.steps = 1
        for item in list(preset.distill) + list(variant.overrides) + list(overrides) + list(distill_overrides or []):
            k, v = item.split("=", 1)
            set_value(cfg, k.strip(), v)
        cfg.model.two_time = variant.flow_map
        if variant.self_distill:
            cfg.distill.self_distill = True
            cfg.distill.teacher = ""
        else:
            if teacher is None:
                raise ConfigError(f"variant {variant.label} needs its teacher's checkpoint")
            cfg.distill.teacher = str(teacher)
    if variant.curriculum > 0 and not any(
        o.split("=", 1)[0].strip().endswith("curriculum_steps") for o in list(overrides) + list(variant.overrides)
    ):
        cfg.diffusion.curriculum_steps = max(1, int(variant.curriculum * cfg.train.max_steps))
    if threads:
        cfg.train.threads = threads
    if device:
        cfg.train.device = device
    validate(cfg)
    cfg.preset = f"bench-{preset.name}-{variant.label}"
    return cfg


# Keys added after bench caches existed, left out at their default so that older cache keys stay valid.
_LATER_DEFAULTS = {
    "model.norm_eps": 1e-6,
    "model.attn_softcap": 0.0,
    "train.cond_prob": 0.0,
    "train.cond_infill_prob": 0.0,
    "train.cfg_drop": 0.0,
    "train.init_from": "",
}


def comparable(cfg: dict) -> dict:
    """The flattened config without the keys that do not change what is learned (budget kept)."""
    flat = flatten(cfg)
    return {
        k: v
        for k, v in flat.items()
        if (k not in _IGNORED or k in _BUDGET) and not (k in _LATER_DEFAULTS and v == _LATER_DEFAULTS[k])
    }


def config_key(cfg: RunConfig, teacher_key: str | None = None) -> str:
    """Cache key: a hash of the comparable config (and of the teacher's key for a flow map)."""
    payload = json.dumps({"config": comparable(cfg.to_dict()), "teacher": teacher_key}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:12]


def config_difference(saved: dict, wanted: dict) -> str | None:
    """The first key where two configs differ in a way that matters, as ``key: a -> b``.

    A key the saved config lacks (written before that key existed) counts as its default.
    """
    defaults = comparable(RunConfig().to_dict())
    a, b = {**defaults, **comparable(saved)}, {**defaults, **comparable(wanted)}
    for k in sorted(set(a) | set(b)):
        if a.get(k) != b.get(k):
            return f"{k}: {a.get(k)!r} -> {b.get(k)!r}"
    return None


def finished(run_dir: Path, cfg: RunConfig) -> tuple[Path, dict] | None:
    """The newest checkpoint of ``run_dir`` if it has used its whole budget, with its trainer state."""
    latest = ckpt.latest_checkpoint(run_dir) if run_dir.is_dir() else None
    if latest is None:
        return None
    state = ckpt.read_json(latest / "trainer_state.json")
    t = cfg.train
    if state.get("step", 0) >= t.max_steps or (t.max_minutes > 0 and state.get("elapsed", 0.0) >= t.max_minutes * 60):
        return latest, state
    return None


class Runs:
    """Finds, checks or trains the run of each variant."""

    def __init__(
        self,
        preset: BenchPreset,
        overrides: list[str],
        cache_dir: Path,
        use: dict[str, str],
        threads: int | None,
        device: str | None,
        log,
        progress: bool,
        train: bool = True,
        distill_overrides: list[str] | None = None,
    ):
        self.preset, self.overrides, self.cache_dir = preset, overrides, cache_dir
        self.distill_overrides = list(distill_overrides or [])
        self.use, self.threads, self.device = use, threads, device
        self.log, self.progress, self.train = log, progress, train
        self.done: dict[str, dict] = {}  # label -> record (run_dir, checkpoint, key, status, ...)

    def get(self, variant: Variant, by_label: dict[str, Variant]) -> dict:
        if variant.label in self.done:
            return self.done[variant.label]
        teacher_ckpt = teacher_key = None
        if variant.distilled and not variant.self_distill:
            if variant.teacher not in by_label:
                raise ConfigError(f"variant {variant.label}: teacher {variant.teacher!r} is not in this bench")
            rec = self.get(by_label[variant.teacher], by_label)
            teacher_ckpt, teacher_key = rec["checkpoint"], rec["key"]
        cfg = variant_config(
            self.preset, variant, self.overrides, teacher_ckpt, self.threads, self.device, self.distill_overrides
        )
        key = config_key(cfg, teacher_key)
        if variant.label in self.use:
            rec = self._reuse(variant, cfg, Path(self.use[variant.label]))
        else:
            run_dir = self.cache_dir / f"{variant.label}-{variant.method}-{key}"
            rec = self._cached_or_train(variant, cfg, run_dir)
        rec.update(label=variant.label, method=variant.method, key=key)
        self.done[variant.label] = rec
        return rec

    def _reuse(self, variant: Variant, cfg: RunConfig, run_dir: Path) -> dict:
        latest = ckpt.latest_checkpoint(run_dir) if run_dir.is_dir() else None
        if latest is None and (run_dir / "config.json").is_file() and (run_dir / "manifest.json").is_file():
            latest = run_dir  # a checkpoint directory itself
        if latest is None:
            raise ConfigError(f"--use {variant.label}={run_dir}: no checkpoint there")
        saved = ckpt.read_json(latest / "config.json")
        wanted = cfg.to_dict()
        diff = config_difference(saved, wanted)
        if diff is None and variant.distilled and not variant.self_distill:
            # The teacher must be the bench's FLM: compare the teacher checkpoints' configs.
            t_saved = Path(saved["distill"].get("teacher", ""))
            if t_saved.is_dir() and (t_saved / "config.json").is_file():
                diff = config_difference(
                    ckpt.read_json(t_saved / "config.json"), ckpt.read_json(Path(cfg.distill.teacher) / "config.json")
                )
                diff = f"its teacher's {diff}" if diff else None
        if diff is not None:
            raise ConfigError(f"--use {variant.label}={run_dir}: its config differs from the bench's ({diff})")
        state = ckpt.read_json(latest / "trainer_state.json")
        if state.get("step", 0) < cfg.train.max_steps:
            raise ConfigError(
                f"--use {variant.label}={run_dir}: trained {state.get('step', 0)} of {cfg.train.max_steps} steps"
            )
        self.log(f"{variant.label}: reusing {latest} (config matches the bench)")
        return {
            "run_dir": str(run_dir),
            "checkpoint": str(latest),
            "status": "reused",
            "step": state.get("step"),
            "train_seconds": state.get("elapsed"),
            "tokens": state.get("tokens"),
        }

    def _cached_or_train(self, variant: Variant, cfg: RunConfig, run_dir: Path) -> dict:
        done = finished(run_dir, cfg)
        status = "cached"
        if done is None:
            if not self.train:
                raise FmlmError(f"{variant.label} is not trained yet ({run_dir}); run without --no-train")
            status = "trained"
            self.log(f"{variant.label}: training {cfg.train.method} into {run_dir}")
            tokenizer = None
            if cfg.distill.teacher:
                from fmlm.data import load_tokenizer

                tokenizer = load_tokenizer(Path(cfg.distill.teacher) / "tokenizer")
            trainer = Trainer(cfg, run_dir, resume=True, progress=self.progress, log=self.log, tokenizer=tokenizer)
            summary = trainer.fit()
            if summary["interrupted"]:
                raise KeyboardInterrupt
            done = finished(run_dir, cfg)
            if done is None:  # pragma: no cover - fit() always reaches the budget unless interrupted
                raise FmlmError(f"{variant.label}: training stopped before its budget ({run_dir})")
        else:
            self.log(f"{variant.label}: cached run {done[0]}")
        latest, state = done
        return {
            "run_dir": str(run_dir),
            "checkpoint": str(latest),
            "status": status,
            "step": state.get("step"),
            "train_seconds": state.get("elapsed"),
            "tokens": state.get("tokens"),
        }
