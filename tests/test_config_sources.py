"""Config files (this project's and FlashRL's) and FlashRL's environment variables, mapped onto
ServerConfig with the documented precedence."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from rollout_service.config import ServerConfig
from rollout_service.config_sources import flashrl_logging, flashrl_settings, load_config_file, merge
from rollout_service.errors import ConfigError


@pytest.mark.parametrize(
    "value, quantization",
    [("bf16", "none"), ("int8", "int8"), ("fp8", "fp8"), ("fp8_vllm", "fp8"), ("fp8_channel", "fp8_channel")],
)
def test_flashrl_config_names_select_the_quantization(value, quantization):
    assert flashrl_settings({"FLASHRL_CONFIG": value}) == {"quantization": quantization}


def test_flashrl_lmhead_fp32_and_logging_are_honoured(tmp_path):
    assert flashrl_settings({"FLASHRL_LMHEAD_FP32": "1"}) == {"lm_head_fp32": True}
    assert flashrl_settings({"FLASHRL_LMHEAD_FP32": "0"}) == {"lm_head_fp32": False}
    assert flashrl_logging({"FLASHRL_LOGGING_LEVEL": "debug", "FLASHRL_LOGGING_FILE": str(tmp_path / "x.log")}) == (
        "DEBUG", tmp_path / "x.log")
    with pytest.raises(ConfigError, match="FLASHRL_LOGGING_LEVEL='loud'"):
        flashrl_logging({"FLASHRL_LOGGING_LEVEL": "loud"})


def test_an_unknown_flashrl_config_is_a_clear_error():
    with pytest.raises(ConfigError, match="FLASHRL_CONFIG='int4' is neither"):
        flashrl_settings({"FLASHRL_CONFIG": "int4"})
    with pytest.raises(ConfigError, match="FlashRL fn 'int8_prune' has no counterpart"):
        load_config_file(_flashrl_file("int8_prune"))


def _flashrl_file(fn: str) -> Path:
    """A config as FlashRL's `flashrl setup` writes it."""
    import tempfile

    path = Path(tempfile.mkdtemp()) / ".flashrl_config.yaml"
    path.write_text(yaml.safe_dump({"configs": [{"fn": fn, "model": "/m", "profile": "/p.pt", "load_format": "auto"}]}))
    return path


def test_a_flashrl_config_file_maps_fn_model_and_profile():
    assert flashrl_settings({"FLASHRL_CONFIG": str(_flashrl_file("int8"))}) == {
        "quantization": "int8", "model": "/m", "profile": "/p.pt"}


def test_our_config_file_is_read_with_paths_relative_to_it_and_unknown_keys_refused(tmp_path):
    (tmp_path / "c.yaml").write_text("model: model\nquantization: int8\nmax_model_len: 256\n")
    assert load_config_file(tmp_path / "c.yaml") == {
        "model": str((tmp_path / "model").resolve()), "quantization": "int8", "max_model_len": 256}
    (tmp_path / "bad.yaml").write_text("model: m\nquantisation: int8\n")
    with pytest.raises(ConfigError, match=r"unknown setting\(s\) \['quantisation'\]"):
        load_config_file(tmp_path / "bad.yaml")
    with pytest.raises(ConfigError, match="does not exist"):
        load_config_file(tmp_path / "none.yaml")


def test_flags_beat_rollout_env_beat_flashrl_beat_the_file():
    file = {"quantization": "int8", "dtype": "float32", "max_model_len": 64, "seed": 3}
    flashrl = {"quantization": "fp8", "lm_head_fp32": True, "seed": 4}
    env = {"ROLLOUT_SEED": "9"}
    merged = merge({"max_model_len": 128}, file, flashrl, env)
    assert merged == {"max_model_len": 128, "quantization": "fp8", "lm_head_fp32": True, "dtype": "float32"}


def test_a_profile_for_another_format_is_refused(tiny_model, tmp_path):
    from rollout_service.quant.recipe import Recipe

    path = Recipe("int8").save(tmp_path / "p.pt")
    assert ServerConfig(model=tiny_model, quantization="int8", profile=path).recipe().fn == "int8"
    with pytest.raises(ValueError, match="is for int8, but quantization='fp8'"):
        ServerConfig(model=tiny_model, quantization="fp8", profile=path)
