"""`serve`'s options are ServerConfig's fields: each option's default and help are its field's, every
field has one, --help groups them by concern, the README's table is theirs, and an option left out
leaves the environment, FlashRL and the --config file in charge."""

from __future__ import annotations

import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
import typer
from pydantic_core import PydanticUndefined
from rich.markup import escape
from typer.testing import CliRunner

from rollout_service import cli, config_options
from rollout_service.config import CONCERNS, ServerConfig

# serve's options that are not fields, and why.
CLI_ONLY = {
    "config_file": "--config: a file of fields",
    "no_http": "--no-http: http_port None",
    "log_level": "--log-level: logging, not the server",
}


def _serve_options() -> dict:
    command = typer.main.get_command(cli.app).commands["serve"]
    return {p.name: p for p in command.params}


def test_every_option_has_its_fields_default_and_help():
    options = _serve_options()
    for name, field in ServerConfig.model_fields.items():
        option = options[name]
        assert config_options.flag(name) in option.opts, name
        assert option.default == (None if field.default is PydanticUndefined else field.default), name
        assert option.help == escape(field.description), name
        if option.show_default is not True:
            assert option.show_default == config_options.default_text(field), name


def test_every_field_is_an_option_or_listed_as_left_out():
    options = set(_serve_options())
    fields = set(ServerConfig.model_fields)
    assert fields - options == set(config_options.EXCLUDED)
    assert options - fields == set(CLI_ONLY)


def test_help_groups_options_by_concern_and_shows_choices_and_defaults():
    out = CliRunner().invoke(cli.app, ["serve", "--help"], env={"COLUMNS": "200"}).output
    for title in CONCERNS:
        assert f"─ {title} ─" in out
    assert "<none|int8|fp8|fp8_channel>" in out and "[default: 50051]" in out
    assert "[default: (the model's maximum)]" in out


def test_readme_options_table_is_the_fields():
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    table = readme.split(config_options.README_START)[1].split(config_options.README_END)[0]
    assert table.strip() == config_options.readme_table().strip(), (
        "README's serve options are out of date: python -m rollout_service.config_options README.md"
    )


@pytest.fixture
def started(monkeypatch) -> list[ServerConfig]:
    """The configs `serve --backend local` would start, instead of starting them."""
    configs: list[ServerConfig] = []
    monkeypatch.setitem(sys.modules, "rollout_service.server", types.SimpleNamespace(run=configs.append))
    monkeypatch.setattr(cli, "_setup_logging", lambda *args: None)
    for name in [n for n in os.environ if n.startswith(("ROLLOUT_", "FLASHRL_"))]:
        monkeypatch.delenv(name)
    return configs


def test_options_left_out_leave_the_environment_and_config_file_in_charge(tiny_model, tmp_path, started):
    (tmp_path / "c.yaml").write_text("seed: 3\nport: 7\n")
    args = ["serve", "--model", str(tiny_model), "--backend", "local", "--config", str(tmp_path / "c.yaml")]
    result = CliRunner().invoke(
        cli.app, [*args, "--port", "0", "--autoscale", "1,2", "--no-shared-memory", "--no-http"],
        env={"ROLLOUT_DTYPE": "float32", "ROLLOUT_API_KEYS_FILE": str(tmp_path / "keys")},
    )
    assert result.exit_code == 0, result.output
    (config,) = started
    assert (config.dtype, config.seed, config.port, config.http_port) == ("float32", 3, 0, None)
    assert config.autoscale == (1, 2) and config.shared_memory is False and config.api_keys == tmp_path / "keys"
    assert config.max_num_seqs == ServerConfig.model_fields["max_num_seqs"].default


def test_a_bad_choice_or_bound_names_the_option(tiny_model, started):
    bad_choice = CliRunner().invoke(cli.app, ["serve", "--model", str(tiny_model), "--inflight", "wait"])
    assert bad_choice.exit_code == 2 and "--inflight" in bad_choice.output
    bad_bound = CliRunner().invoke(cli.app, ["serve", "--model", str(tiny_model), "--autoscale", "3,1"])
    assert bad_bound.exit_code == 2 and "--autoscale" in bad_bound.output and not started


def test_the_cli_starts_without_importing_torch():
    # The options are built from the config at import; torch would add seconds to every command.
    code = "import sys, rollout_service.cli; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
