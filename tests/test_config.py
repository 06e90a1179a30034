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
    cfg = build_config(
        "tiny",
        [
            "lr=0.01",
            "train.max_steps=7",
            "loss=mse_denoiser",
            "time=uniform",
            "model.dropout=0.1",
            "seed=3",
            "steps=5",
            "sample.float64=true",
        ],
    )
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
        ("tiny", ["greedy_of=mode"], "bad value for diffusion.greedy_of"),
        ("tiny", ["diffusion.t_min=0"], "diffusion.t_min must be in"),
        ("tiny", ["curriculum_steps=-1"], "curriculum_steps must be >= 0"),
    ],
)
def test_bad_config_is_a_config_error(preset, overrides, match):
    with pytest.raises(ConfigError, match=match):
        build_config(preset, overrides)


def test_diffusion_section_reaches_the_baselines():
    from fmlm.methods import build_method

    cfg = build_config(
        "tiny", ["method=duo", "curriculum_steps=7", "greedy_of=xhat", "greedy_tail=false", "t_min=0.01"]
    )
    cfg.model.vocab_size, cfg.model.max_seq_len = 9, 8
    duo = build_method(cfg)
    assert (duo.curriculum_steps, duo.greedy_of, duo.greedy_tail, duo.t_min) == (7, "xhat", False, 0.01)
    cfg = build_config("tiny", ["method=mdlm", "mdlm_time_conditioning=true"])
    cfg.model.vocab_size, cfg.model.max_seq_len = 9, 8
    assert build_method(cfg).time_conditioning


def test_resume_accepts_a_config_saved_before_a_section_existed():
    from fmlm.train import check_resumable

    cur = build_config("tiny", []).to_dict()
    old = {k: v for k, v in cur.items() if k != "diffusion"}
    check_resumable(old, cur)  # the missing section counts as its defaults
    changed = build_config("tiny", ["curriculum_steps=5"]).to_dict()
    with pytest.raises(ConfigError, match="diffusion.curriculum_steps"):
        check_resumable(old, changed)
