"""The one table from error types to gRPC codes and HTTP statuses."""

import grpc
import pytest

from rollout_service import errors


@pytest.mark.parametrize(
    "exc, code, http",
    [
        (errors.InvalidArgument("sampling.top_p", "bad"), grpc.StatusCode.INVALID_ARGUMENT, 400),
        (errors.Overloaded("full"), grpc.StatusCode.RESOURCE_EXHAUSTED, 429),
        (errors.DeadlineExceeded("late"), grpc.StatusCode.DEADLINE_EXCEEDED, 504),
        (errors.Cancelled("gone"), grpc.StatusCode.CANCELLED, 499),
        (errors.EngineUnavailable("dead"), grpc.StatusCode.UNAVAILABLE, 503),
        (errors.ConfigError("no"), grpc.StatusCode.FAILED_PRECONDITION, 500),
        (errors.Unauthenticated("no key"), grpc.StatusCode.UNAUTHENTICATED, 401),
        (errors.PermissionDenied("eval"), grpc.StatusCode.PERMISSION_DENIED, 403),
        (errors.TooLarge("body"), grpc.StatusCode.RESOURCE_EXHAUSTED, 413),
        (errors.StorageFull("disk"), grpc.StatusCode.RESOURCE_EXHAUSTED, 507),
        (errors.StorageUnavailable("read-only"), grpc.StatusCode.UNAVAILABLE, 503),
        (KeyError("x"), grpc.StatusCode.INTERNAL, 500),
    ],
)
def test_each_error_maps_to_one_grpc_code_and_http_status(exc, code, http):
    assert errors.grpc_status(exc) == code
    assert errors.http_status(exc) == http


def test_invalid_argument_message_starts_with_the_field():
    exc = errors.InvalidArgument("prompts[2].token_ids[5]", "token id 9999 is outside the vocabulary")
    assert str(exc) == "prompts[2].token_ids[5]: token id 9999 is outside the vocabulary"
    assert exc.field == "prompts[2].token_ids[5]"


def test_internal_errors_do_not_leak_their_text_to_clients():
    assert "secret" not in errors.public_message(RuntimeError("secret path /etc/x"))
    assert errors.public_message(errors.Overloaded("full")) == "full"
