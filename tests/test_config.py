"""ServerConfig: documented fields, checked once."""

import pytest
from pydantic import ValidationError

from rollout_service.config import ServerConfig


def test_every_field_has_a_description():
    assert all(f.description for f in ServerConfig.model_fields.values())


def test_model_must_be_a_checkpoint_directory(tmp_path):
    with pytest.raises(ValidationError, match="no config.json"):
        ServerConfig(model=tmp_path)


def test_choices_and_bounds_are_enforced(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    assert ServerConfig(model=tmp_path).quantization == "none"
    for bad in ({"dtype": "float16"}, {"logprobs_mode": "both"}, {"port": 70000}, {"kv_cache_gib": 0}):
        with pytest.raises(ValidationError):
            ServerConfig(model=tmp_path, **bad)


def test_environment_variables_fill_unset_fields(tmp_path, monkeypatch):
    (tmp_path / "config.json").write_text("{}")
    monkeypatch.setenv("ROLLOUT_DTYPE", "float32")
    monkeypatch.setenv("ROLLOUT_MAX_INFLIGHT_SEQUENCES", "7")
    config = ServerConfig(model=tmp_path)
    assert config.dtype == "float32" and config.max_inflight_sequences == 7
