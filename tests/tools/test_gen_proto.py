"""The committed generated code is exactly what `make proto` produces from protos/."""

import re
from pathlib import Path

from rollout_service.tools.gen_proto import DEFAULT_OUT, PACKAGE_PREFIX, generate


def _without_generator_version(code: str) -> str:
    """The code less the grpcio-tools version that wrote it: a new patch release of the generator on
    PyPI changes that line alone, which says nothing about the code being stale."""
    return re.sub(r"^GRPC_GENERATED_VERSION = '[^']*'$", "GRPC_GENERATED_VERSION = ...", code, flags=re.M)


def test_committed_generated_code_is_current(tmp_path):
    fresh = generate(tmp_path)
    assert fresh, "no .proto files found"
    for path in fresh:
        committed = DEFAULT_OUT / path.relative_to(tmp_path)
        assert _without_generator_version(committed.read_text()) == _without_generator_version(path.read_text()), (
            f"{committed} is stale: run `make proto`"
        )


def test_every_message_field_in_the_proto_is_documented():
    proto = (Path(__file__).parents[2] / "protos/rollout/v1/rollout.proto").read_text().splitlines()
    for i, line in enumerate(proto):
        stripped = line.strip()
        if stripped.endswith(";") and "=" in stripped and not stripped.startswith(("//", "syntax", "package", "option")):
            above = proto[i - 1].strip()
            assert above.startswith("//") or "//" in stripped or above.endswith("{"), f"undocumented field: {stripped}"
    assert PACKAGE_PREFIX == "rollout_client/proto"
