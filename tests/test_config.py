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


def test_binding_beyond_loopback_needs_api_keys_or_insecure(tiny_model, tmp_path):
    import pydantic

    from rollout_service.config import ServerConfig, is_loopback

    assert all(map(is_loopback, ["127.0.0.1", "127.5.5.5", "::1", "[::1]", "localhost"]))
    assert not any(map(is_loopback, ["0.0.0.0", "10.0.0.1", "::", "myhost"]))
    with pytest.raises(pydantic.ValidationError, match="not a loopback address"):
        ServerConfig(model=tiny_model, host="0.0.0.0")
    assert ServerConfig(model=tiny_model, host="0.0.0.0", insecure=True).insecure
    keys = tmp_path / "keys"
    keys.write_text("eval:" + "k" * 20 + "\n")
    assert ServerConfig(model=tiny_model, host="0.0.0.0", api_keys=keys).api_keys == keys


@pytest.mark.parametrize(
    "given, problem",
    [
        ({"tls_cert": "CERT"}, "tls_cert and tls_key go together"),
        ({"tls_client_ca": "CERT"}, "tls_client_ca needs tls_cert"),
    ],
)
def test_tls_and_key_settings_are_checked_at_start(tiny_model, tmp_path, given, problem):
    import pydantic

    from rollout_service.config import ServerConfig

    cert = tmp_path / "cert.pem"
    cert.write_text("x")
    with pytest.raises(pydantic.ValidationError, match=problem):
        ServerConfig(model=tiny_model, **{k: cert for k in given})


def test_secret_files_are_checked_where_they_are_read_not_where_the_config_is_built(tiny_model, tmp_path):
    from rollout_service.config import ServerConfig
    from rollout_service.errors import ConfigError

    config = ServerConfig(model=tiny_model, api_keys=tmp_path / "on-the-head-node-only")  # Serve's build task
    with pytest.raises(ConfigError, match="api_keys=.* is not a file"):
        config.check_secret_files()
