"""Where ServerConfig values come from besides flags: config files and FlashRL's environment.

Precedence, highest first: `serve` flags, ROLLOUT_<FIELD> variables, FLASHRL_* variables, the
`--config` file, the defaults. The project's own names stay primary; FlashRL's are accepted so
that a FlashRL setup runs unchanged:

    FLASHRL_CONFIG=bf16 | int8 | fp8 | ...             -> quantization none | int8 | fp8 | ... (FLASHRL_FN)
    FLASHRL_CONFIG=/path/config.yaml                   -> that file (this project's or FlashRL's format)
    FLASHRL_LMHEAD_FP32=1                              -> lm_head_fp32 = true
    FLASHRL_LOGGING_LEVEL=DEBUG, FLASHRL_LOGGING_FILE=path  -> the server's log level / a log file

A config file is YAML: either ServerConfig's field names (what `rollout-service setup` writes), or
FlashRL's `{configs: [{fn, model, profile, ...}]}` (the first entry; FlashRL's vLLM-patching
keys such as load_format have no meaning here and are reported as ignored).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path

from rollout_service.config import ServerConfig
from rollout_service.errors import ConfigError
from rollout_service.quant.registry import FORMATS

log = logging.getLogger(__name__)

# FlashRL's `fn` names with an exact counterpart here. FlashRL's pruned / "fast" int8 variants
# change the arithmetic and have none.
FLASHRL_FN = {"bf16": "none"} | {name: spec.name for spec in FORMATS.values() for name in spec.flashrl_names}
_FLASHRL_KEYS = {"fn": "quantization", "model": "model", "profile": "profile"}
_TRUE = {"1", "true", "yes", "on"}


def _quantization(fn: str, where: str) -> str:
    if fn not in FLASHRL_FN:
        raise ConfigError(f"{where}: FlashRL fn {fn!r} has no counterpart here; use one of {sorted(FLASHRL_FN)}")
    return FLASHRL_FN[fn]


def load_config_file(path: Path) -> dict:
    """ServerConfig fields from a YAML file in this project's or FlashRL's format."""
    import yaml

    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {str(path)!r} is not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {str(path)!r}: expected a mapping of settings, got {type(data).__name__}")
    if "configs" in data:  # FlashRL's setup output
        entries = data["configs"]
        if not entries:
            raise ConfigError(f"config file {str(path)!r}: `configs` is empty")
        entry = entries[0]
        out = {field: entry[key] for key, field in _FLASHRL_KEYS.items() if entry.get(key) is not None}
        if "quantization" in out:
            out["quantization"] = _quantization(out["quantization"], str(path))
        ignored = sorted(set(entry) - set(_FLASHRL_KEYS))
        if ignored:
            log.warning("%s: FlashRL settings without meaning for this service ignored: %s", path, ", ".join(ignored))
    else:
        unknown = sorted(set(data) - set(ServerConfig.model_fields))
        if unknown:
            raise ConfigError(f"config file {str(path)!r}: unknown setting(s) {unknown}; see `rollout-service serve --help`")
        out = dict(data)
    for key in ("model", "profile"):  # relative paths are relative to the file
        if isinstance(out.get(key), str) and not Path(out[key]).is_absolute():
            out[key] = str((path.parent / out[key]).resolve())
    return out


def flashrl_settings(environ: Mapping[str, str] = os.environ) -> dict:
    """ServerConfig fields from FLASHRL_CONFIG and FLASHRL_LMHEAD_FP32."""
    out: dict = {}
    value = environ.get("FLASHRL_CONFIG", "").strip()
    if value:
        if value in FLASHRL_FN:
            out["quantization"] = FLASHRL_FN[value]
        elif Path(value).expanduser().is_file():
            out.update(load_config_file(Path(value).expanduser()))
        else:
            raise ConfigError(
                f"FLASHRL_CONFIG={value!r} is neither one of {sorted(FLASHRL_FN)} nor an existing config file"
            )
    if "FLASHRL_LMHEAD_FP32" in environ:
        out["lm_head_fp32"] = environ["FLASHRL_LMHEAD_FP32"].strip().lower() in _TRUE
    return out


def flashrl_logging(environ: Mapping[str, str] = os.environ) -> tuple[str | None, Path | None]:
    """(level, file) from FLASHRL_LOGGING_LEVEL / FLASHRL_LOGGING_FILE (None where unset)."""
    level = environ.get("FLASHRL_LOGGING_LEVEL") or None
    if level is not None and level.upper() not in ("CRITICAL", "ERROR", "WARNING", "INFO", "DEBUG"):
        raise ConfigError(f"FLASHRL_LOGGING_LEVEL={level!r} is not a logging level (DEBUG, INFO, WARNING, ERROR)")
    file = environ.get("FLASHRL_LOGGING_FILE") or None
    return (level.upper() if level else None), (Path(file) if file else None)


def merge(flags: dict, file: dict, flashrl: dict, environ: Mapping[str, str] = os.environ) -> dict:
    """Flags win; ROLLOUT_<FIELD> variables (read by ServerConfig itself) beat FLASHRL_* and the
    file; FLASHRL_* beat the file."""
    out = dict(flags)
    for source in (flashrl, file):
        for key, value in source.items():
            if key not in out and f"ROLLOUT_{key.upper()}" not in environ:
                out[key] = value
    return out
