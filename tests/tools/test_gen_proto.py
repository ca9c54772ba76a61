"""The committed generated code is exactly what `make proto` produces from protos/."""

from pathlib import Path

from rollout_service.tools.gen_proto import DEFAULT_OUT, PACKAGE_PREFIX, generate


def test_committed_generated_code_is_current(tmp_path):
    fresh = generate(tmp_path)
    assert fresh, "no .proto files found"
    for path in fresh:
        committed = DEFAULT_OUT / path.relative_to(tmp_path)
        assert committed.read_text() == path.read_text(), f"{committed} is stale: run `make proto`"


def test_every_message_field_in_the_proto_is_documented():
    proto = (Path(__file__).parents[2] / "protos/rollout/v1/rollout.proto").read_text().splitlines()
    for i, line in enumerate(proto):
        stripped = line.strip()
        if stripped.endswith(";") and "=" in stripped and not stripped.startswith(("//", "syntax", "package", "option")):
            above = proto[i - 1].strip()
            assert above.startswith("//") or "//" in stripped or above.endswith("{"), f"undocumented field: {stripped}"
    assert PACKAGE_PREFIX == "rollout_client/_proto"
