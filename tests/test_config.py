"""The config system: presets, TOML files, dotted overrides and their errors."""

from __future__ import annotations

import sys

import pytest

from gpt2lab import cli, config
from gpt2lab.errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib


def test_defaults_then_preset_then_file_then_overrides(tmp_path):
    toml = tmp_path / "run.toml"
    toml.write_text("[train]\nlr = 1e-3\nmax_steps = 7\n[model]\nn_layer = 5\n")
    cfg = config.resolve("gpt2-medium", toml, ["train.lr=3e-4", "--model.dropout=0.1"])
    assert cfg.model.n_layer == 5  # file beats preset
    assert cfg.model.n_embd == 1024  # preset beats default
    assert cfg.train.lr == 3e-4  # flag beats file
    assert cfg.train.max_steps == 7
    assert cfg.model.dropout == 0.1


@pytest.mark.parametrize(
    "override, value",
    [
        ("train.compile=true", True),
        ("train.compile=0", False),
        ("train.max_steps=1e3", 1000),
        ("sample.top_k=none", None),
        ("sample.top_k=40", 40),
        ("train.device=cuda:1", "cuda:1"),
    ],
)
def test_override_values_follow_the_field_type(override, value):
    section, key = override.split("=")[0].split(".")
    assert getattr(getattr(config.resolve(overrides=[override]), section), key) == value


def test_flags_beat_overrides_and_a_file_gives_only_the_sections_asked_for(tmp_path):
    toml = tmp_path / "config.toml"
    toml.write_text("[sample]\ntop_k = 5\ntemperature = 0.5\n[train]\nlr = 1e-3\n")
    cfg = config.resolve(
        config_file=toml,
        overrides=["sample.top_k=7"],
        flags={"sample.top_k": 9, "sample.stop": ("a,b", "\n"), "sample.seed": None},
        sections=["sample"],
    )
    assert cfg.sample.top_k == 9 and cfg.sample.temperature == 0.5
    assert cfg.sample.stop == ("a,b", "\n")  # typed flags are not split like override strings
    assert cfg.sample.seed is None and cfg.train.lr == config.TrainConfig().lr


@pytest.mark.parametrize(
    "flags, option",
    [
        ({"sample.temperature": float("nan")}, "--temperature"),
        ({"sample.seed": 10**30}, "--seed"),  # an `int | None` field
        ({"eval.limit": 0}, "--limit"),  # a range check of the section
        ({"eval.batch_size": 10**30}, "--batch-size"),
    ],
)
def test_errors_from_a_commands_own_options_name_those_options(flags, option):
    """`gpt2lab sample --seed 1e30` is told to fix --seed, not --sample.seed (which sample does
    not take) nor a bare key."""
    with pytest.raises(ConfigError) as e:
        config.resolve(flags=flags)
    message = e.value.render(cli.as_flag)
    assert message.endswith(option) or f"{option} " in message, message
    assert "`" not in message and "--sample." not in message and "--eval." not in message


def test_flatten_and_unflatten_are_inverses():
    tree = config.to_dict(config.Config())
    flat = config.flatten(tree)
    assert flat["train.lr"] == config.TrainConfig().lr and "model" not in flat
    assert config.unflatten(flat) == tree
    assert config.all_keys(config.Config()) == list(flat)


def test_misspelled_override_suggests_the_real_key():
    # the library names keys; cli.py shows them as flags (tests/test_cli.py)
    with pytest.raises(ConfigError, match=r"did you mean `train\.lr`\?"):
        config.resolve(overrides=["train.lrr=1"])
    with pytest.raises(ConfigError, match=r"model\.n_layer"):
        config.resolve(overrides=["model.nlayer=2"])
    with pytest.raises(ConfigError) as e:
        config.resolve(overrides=["train.lrr=1"])
    assert "--" not in str(e.value)


def test_bad_values_and_sections_fail():
    with pytest.raises(ConfigError, match="not a valid int"):
        config.resolve(overrides=["train.max_steps=lots"])
    with pytest.raises(ConfigError, match="one of random, sequential"):
        config.resolve(overrides=["data.sampling=shuffle"])
    with pytest.raises(ConfigError, match="divisible"):
        config.resolve(overrides=["model.n_head=5"])
    with pytest.raises(ConfigError, match="unknown preset"):
        config.resolve("gtp2")


def test_toml_errors_name_the_file(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[train\nlr=")
    with pytest.raises(ConfigError, match="bad.toml"):
        config.resolve(config_file=bad)
    unknown = tmp_path / "unknown.toml"
    unknown.write_text("[trian]\nlr = 1\n")
    with pytest.raises(ConfigError, match="did you mean train"):
        config.resolve(config_file=unknown)


def test_toml_round_trip():
    cfg = config.resolve("gpt2", overrides=["train.lr=2e-4", "sample.top_p=0.9"])

    again = config.merge(config.Config(), tomllib.loads(config.to_toml(cfg)))
    assert again == cfg
    assert config.from_dict(config.Config, config.to_dict(cfg)) == cfg


def test_gpt2_preset_shapes_match_the_paper():
    shapes = {
        k: (v.n_layer, v.n_embd) for k, v in config.MODEL_PRESETS.items() if k.startswith("gpt2")
    }
    assert shapes["gpt2"] == (12, 768) and shapes["gpt2-medium"] == (24, 1024)
    assert shapes["gpt2-large"] == (36, 1280) and shapes["gpt2-xl"] == (48, 1600)


def test_recipe_presets_have_the_recipes_shapes_and_every_preset_a_source():
    assert set(config.PRESET_SOURCES) == set(config.PRESETS)
    pile = config.resolve("pile-10k").model
    assert (pile.n_layer, pile.n_embd, pile.block_size) == (6, 256, 1024)
    assert pile.n_head == 8 and "6 heads" in config.PRESET_SOURCES["pile-10k"]  # 6 do not divide
    owt = config.resolve("openwebtext-10k")
    assert (owt.model.n_layer, owt.model.block_size) == (2, 512)
    assert (owt.train.micro_batch_size, owt.train.grad_accum_steps) == (32, 16)
    assert (owt.train.lr, owt.train.lr_schedule) == (5e-4, "cosine")
    tiny = config.resolve("tinystories")
    assert tiny.train.max_minutes == 15.0 and tiny.model.n_embd <= 128


def test_config_command_prints_the_preset_source_as_a_toml_comment(capsys):
    assert cli.main(["config", "--preset", "pile-10k"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("# preset pile-10k: recipe 'pile-10k 6x256'")
    assert config.merge(config.Config(), tomllib.loads(out)) == config.resolve("pile-10k")
