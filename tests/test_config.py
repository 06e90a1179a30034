"""Presets, key=value overrides and config round trips."""

import pytest

from fmlm.config import MODEL_SIZES, PRESETS, RunConfig, build_config
from fmlm.errors import ConfigError


def test_every_preset_builds_and_round_trips(tmp_path):
    for name in PRESETS:
        cfg = build_config(name)
        cfg.save(tmp_path / "c.json")
        assert RunConfig.load(tmp_path / "c.json") == cfg


def test_overrides_short_and_dotted_keys():
    cfg = build_config("tiny", ["lr=0.01", "train.max_steps=7", "loss=mse_denoiser", "time=uniform",
                                "model.dropout=0.1", "seed=3", "steps=5", "sample.float64=true"])
    assert cfg.train.lr == 0.01 and cfg.train.max_steps == 7
    assert cfg.train.loss == "mse_denoiser" and cfg.train.time == "uniform"
    assert cfg.model.dropout == 0.1 and cfg.train.seed == 3 and cfg.sample.steps == 5 and cfg.sample.float64


def test_model_size_fills_dimensions_then_single_overrides_win():
    cfg = build_config("tiny", ["model.size=dit-small", "n_layers=3"])
    assert cfg.model.d_model == MODEL_SIZES["dit-small"]["d_model"] and cfg.model.n_layers == 3


def test_toml_file_with_base_preset(tmp_path):
    f = tmp_path / "my.toml"
    f.write_text('preset = "tiny"\n[train]\nlr = 0.005\n[data]\nphrases_n = 6\n')
    cfg = build_config(str(f), ["max_steps=9"])
    assert cfg.train.lr == 0.005 and cfg.data.phrases_n == 6 and cfg.train.max_steps == 9
    assert cfg.preset == "my"


@pytest.mark.parametrize(
    "preset, overrides, match",
    [
        ("nope", [], "unknown preset"),
        ("tiny", ["nokey=1"], "unknown config key"),
        ("tiny", ["train.nokey=1"], "unknown config key"),
        ("tiny", ["lr=abc"], "bad value for train.lr"),
        ("tiny", ["max_steps=1.5"], "bad value for train.max_steps"),
        ("tiny", ["steps=0"], "sample.steps must be >= 1"),
        ("tiny", ["loss=l1"], "bad value for train.loss"),
        ("tiny", ["model.size=huge"], "unknown model size"),
        ("tiny", ["lr"], "expected key=value"),
        ("tiny", ["d_model=30"], "multiple of"),
    ],
)
def test_bad_config_is_a_config_error(preset, overrides, match):
    with pytest.raises(ConfigError, match=match):
        build_config(preset, overrides)
