"""The shapes world's training job read with the job spec's machinery: strict keys, types and captions."""

import dataclasses

import pytest
import yaml

from pipeline.config import ConfigError
from pipeline.training.world_config import DEFAULT_CONFIG, load_train_config
from pipeline.world import generator


def _write(tmp_path, raw):
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_shipped_job_config_loads_and_holds_valid_captions():
    config = load_train_config(DEFAULT_CONFIG)
    assert config.unet.batch > 0 and config.vae.channels[0] > 0
    for caption in config.data.heldout_captions:
        assert len(generator.parse_caption(caption)["objects"]) == 1


def test_unknown_config_key_is_named(tmp_path):
    raw = yaml.safe_load(DEFAULT_CONFIG.read_text())
    raw["unet"]["learning_rate"] = 0.1
    with pytest.raises(ValueError, match="learning_rate"):
        load_train_config(_write(tmp_path, raw))


def test_bad_heldout_caption_is_rejected(tmp_path):
    raw = yaml.safe_load(DEFAULT_CONFIG.read_text())
    raw["data"]["heldout_captions"] = ["a pink circle on a white background"]
    with pytest.raises(ValueError, match="pink"):
        load_train_config(_write(tmp_path, raw))


def test_errors_are_config_errors_naming_the_dotted_key(tmp_path):
    raw = yaml.safe_load(DEFAULT_CONFIG.read_text())
    # YAML 1.1 reads 1.0e9 (no exponent sign) as a string: a number field must refuse it.
    raw["vae"]["max_minutes"] = "1.0e9"
    with pytest.raises(ConfigError, match=r"vae\.max_minutes: expected a number"):
        load_train_config(_write(tmp_path, raw))
    del raw["vae"]
    with pytest.raises(ConfigError, match="vae: is required"):
        load_train_config(_write(tmp_path, raw))
    raw = yaml.safe_load(DEFAULT_CONFIG.read_text())
    raw["data"]["heldout_captions"] = ["a red star on a gray background", "a red cat on a gray background"]
    with pytest.raises(ConfigError, match=r"data\.heldout_captions\.1"):
        load_train_config(_write(tmp_path, raw))


def test_types_defaults_and_overrides(tmp_path):
    raw = yaml.safe_load(DEFAULT_CONFIG.read_text())
    del raw["oracle"]["blur_sigma_max"], raw["oracle"]["decoded_fraction"]
    raw["unet"]["min_snr_gamma"] = None
    config = load_train_config(_write(tmp_path, raw), ["unet.steps=7", "data.heldout_captions=[]"])
    assert (config.oracle.blur_sigma_max, config.oracle.decoded_fraction) == (0.0, 0.0)
    assert config.unet.min_snr_gamma is None and config.unet.steps == 7
    assert config.data.heldout_captions == () and isinstance(config.vae.channels, tuple)
    assert isinstance(config.oracle.max_minutes, float)
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.unet.steps = 1
