"""Config loading: merge order, overrides, and the errors a user sees for bad input."""
from __future__ import annotations

import pytest
import yaml

from pipeline import config
from pipeline.config import ConfigError


def write_exp(tmp_path, body: dict):
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(body))
    return path


def test_defaults_stage_files_and_experiment_merge():
    base = config.load()
    demo = config.load("demo")
    assert base.encode.codec == "encodec" and demo.encode.codec == "mel"
    # stage files are read (Aurl.ai's bug: they never were)
    assert base.stage2.kl is not None and base.stage2.kl.beta == 0.05
    assert base.stage1.gan is None and base.stage3.gan.loss == "bce"
    # the experiment overrides one key deep and keeps the siblings from the stage file
    exp = yaml.safe_load((config.CONFIG_DIR / "experiments" / "demo.yaml").read_text())
    assert demo.stage3.gan.adv_ramp_epochs == exp["stage3"]["gan"]["adv_ramp_epochs"]
    assert demo.stage3.gan.adv_ramp_epochs != base.stage3.gan.adv_ramp_epochs
    assert demo.stage3.gan.label_smoothing == base.stage3.gan.label_smoothing


def test_stages_share_no_mutable_state():
    cfg = config.load("demo")
    cfg.stage1.loss.latent_l1 = 123.0
    cfg.stage1.enabled_parts.append("vae")
    assert cfg.stage2.loss.latent_l1 != 123.0
    assert config.load("demo").stage1.enabled_parts == ["transformer"]


def test_command_line_override_types():
    cfg = config.load("demo", overrides=["data.chunk_seconds=10", "stage3.gan.loss=hinge",
                                         "data.silence_db=null", "pairs.shuffle_targets=true"])
    assert cfg.data.chunk_seconds == 10.0 and isinstance(cfg.data.chunk_seconds, float)
    assert cfg.stage3.gan.loss == "hinge"
    assert cfg.data.silence_db is None
    assert cfg.pairs.shuffle_targets is True


def test_unknown_key_in_file_names_key_file_and_closest(tmp_path):
    exp = write_exp(tmp_path, {"data": {"chunk_secs": 4}})
    with pytest.raises(ConfigError) as err:
        config.load(str(exp))
    msg = str(err.value)
    assert "data.chunk_secs" in msg and str(exp) in msg and "data.chunk_seconds" in msg


def test_unknown_section_is_an_error(tmp_path):
    exp = write_exp(tmp_path, {"stage4": {"epochs": 1}})
    with pytest.raises(ConfigError, match="unknown key 'stage4'"):
        config.load(str(exp))


def test_unknown_override_key():
    with pytest.raises(ConfigError, match=r"unknown key 'stage1\.epoch'.*stage1\.epochs"):
        config.load("demo", overrides=["stage1.epoch=3"])


@pytest.mark.parametrize("override, fragment", [
    ("stage1.epochs=abc", "'stage1.epochs' must be an integer, got str 'abc'"),
    ("data.chunk_seconds=[1, 2]", "'data.chunk_seconds' must be a number"),
    ("pairs.shuffle_targets=3", "'pairs.shuffle_targets' must be true or false"),
    ("data.channels=3", "'data.channels' = 3 is not one of [1, 2]"),
    ("data.sample_rate=-1", "'data.sample_rate' = -1 is out of range"),
    ("pairs.val_fraction=1.5", "'pairs.val_fraction' = 1.5 is out of range"),
    ("stage3.gan.loss=wgan", "'stage3.gan.loss' = 'wgan' is not one of"),
    ("model.transformer.heads=3", "must be divisible by"),
])
def test_wrong_type_or_range_names_key_and_value(override, fragment):
    with pytest.raises(ConfigError) as err:
        config.load("demo", overrides=[override])
    assert fragment in str(err.value)


def test_malformed_override():
    with pytest.raises(ConfigError, match="must look like key.sub=value"):
        config.load("demo", overrides=["stage1.epochs"])


def test_missing_experiment_file():
    with pytest.raises(ConfigError, match="config file not found"):
        config.load("no_such_experiment")


def test_missing_key_is_an_error(tmp_path):
    cfg_dir = tmp_path / "configs"
    for sub in ("cluster", "stages"):
        (cfg_dir / sub).mkdir(parents=True)
    src = config.CONFIG_DIR
    defaults = yaml.safe_load((src / "defaults.yaml").read_text())
    del defaults["data"]["chunk_seconds"]
    (cfg_dir / "defaults.yaml").write_text(yaml.safe_dump(defaults))
    (cfg_dir / "cluster" / "local.yaml").write_text((src / "cluster" / "local.yaml").read_text())
    for name in config.STAGE_FILES:
        (cfg_dir / "stages" / name).write_text((src / "stages" / name).read_text())
    with pytest.raises(ConfigError, match="missing key 'data.chunk_seconds'"):
        config.load(config_dir=cfg_dir)


def test_resolved_config_round_trips(tmp_path):
    cfg = config.load("demo", overrides=["stage2.lr=0.01"])
    path = config.write_resolved(cfg, tmp_path)
    again = config.from_dict(yaml.safe_load(path.read_text()))
    assert again == cfg
    assert not list(tmp_path.glob(".*tmp-*"))


def test_both_cluster_profiles_load():
    local = config.load(cluster="local")
    slurm = config.load(cluster="slurm")
    assert local.cluster.executor == "local" and slurm.cluster.executor == "slurm"
    assert slurm.cluster.steps["stage3"].gpus_per_node == 4


def test_load_resolved_names_the_missing_file(tmp_path):
    with pytest.raises(ConfigError, match=r"no resolved config at .*config.resolved.yaml"):
        config.load_resolved(tmp_path)
    cfg = config.load("demo")
    config.write_resolved(cfg, tmp_path)
    assert config.load_resolved(tmp_path) == cfg


def test_exponent_without_a_dot_is_a_number():
    # YAML 1.1 reads 1e-4 as a string; a learning rate written that way is still a number
    assert config.load("demo", overrides=["stage3.lr=1e-4"]).stage3.lr == 1e-4
    with pytest.raises(ConfigError, match="'stage3.lr' must be a number"):
        config.load("demo", overrides=["stage3.lr=fast"])


def test_a_key_written_twice_is_an_error(tmp_path):
    path = tmp_path / "twice.yaml"
    path.write_text("stage3:\n  epochs: 3\nstage3:\n  epochs: 4\n")
    with pytest.raises(ConfigError, match=r"twice.yaml, line 3: key 'stage3' appears twice"):
        config.load(str(path))


def test_an_experiment_extends_another(tmp_path):
    child = write_exp(tmp_path, {"extends": "demo", "stage3": {"epochs": 3}})
    cfg, demo = config.load(str(child)), config.load("demo")
    assert cfg.stage3.epochs == 3 and cfg.data.chunk_seconds == demo.data.chunk_seconds
    loop = tmp_path / "loop.yaml"
    loop.write_text(f"extends: {loop}\n")
    with pytest.raises(ConfigError, match="loops back"):
        config.load(str(loop))


@pytest.mark.parametrize("name", ["demo", "musigan", "powermuse", "aurl", "musicvae"])
def test_every_shipped_experiment_is_valid(name):
    cfg = config.load(name)
    config.validate(cfg)
    assert cfg.run.name == name
