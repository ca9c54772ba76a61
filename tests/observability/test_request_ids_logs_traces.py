"""Request ids, log lines and trace context without an engine: what a caller's id becomes, the
shape of a JSON log line in a call, and the carrier that takes a call to a replica."""

from __future__ import annotations

import io
import json
import logging

import pytest

from rollout_service.config import ServerConfig
from rollout_service.observe import calls, logs, tracing

CALLER_TRACE = "0af7651916cd43dd8448eb211c80319c"
CALLER_PARENT = "b7ad6b7169203331"


@pytest.mark.parametrize("given", ["trainer-step-12/rollout-3", "a" * calls.MAX_REQUEST_ID])
def test_a_usable_request_id_is_kept(given):
    assert calls.request_id(given) == given


@pytest.mark.parametrize("given", [
    None, "", "   ", "a" * (calls.MAX_REQUEST_ID + 1), "two\nlines", "tab\there", "naïve",
    "x] INFO rollout_service.serve.push: version 9 committed",  # would forge a text log line
])
def test_an_unusable_request_id_is_replaced_by_a_new_one(given):
    made = calls.request_id(given)
    assert made != given and len(made) == 32 and made.isalnum()
    assert calls.request_id(given) != made  # a new one each time


def _logged(log_format: str, call: calls.Call | None) -> str:
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(logs.json_formatter() if log_format == "json" else logs.TextFormatter())
    handler.addFilter(logs.RequestIdFilter())
    logger = logging.getLogger("rollout_service.test_logs")
    logger.addHandler(handler)
    logger.propagate = False
    try:
        if call is None:
            logger.warning("outside %s", "a call")
        else:
            with calls.serving(call):
                try:
                    raise ValueError("bad tensor")
                except ValueError:
                    logger.exception("push %s failed", "v3")
    finally:
        logger.removeHandler(handler)
    return out.getvalue()


def test_a_json_line_in_a_call_has_its_request_id_and_the_exception():
    (line,) = _logged("json", calls.Call("req-42", "PushWeights")).splitlines()
    record = json.loads(line)
    assert record["message"] == "push v3 failed" and record["request_id"] == "req-42"
    assert record["level"] == "ERROR" and record["logger"] == "rollout_service.test_logs"
    assert "ValueError: bad tensor" in record["exception"] and record["time"].startswith("20")


def test_a_json_line_outside_a_call_has_no_request_id():
    record = json.loads(_logged("json", None))
    assert record["message"] == "outside a call" and "request_id" not in record


def test_a_text_line_shows_the_request_id_after_the_logger():
    assert " ERROR rollout_service.test_logs [req-42]: push v3 failed\n" in _logged("text", calls.Call("req-42", "PushWeights"))
    assert " WARNING rollout_service.test_logs: outside a call\n" in _logged("text", None)


def test_the_carrier_takes_the_request_id_and_span_to_a_replica(memory_spans):
    parent = tracing.extract({"traceparent": f"00-{CALLER_TRACE}-{CALLER_PARENT}-01"})
    with tracing.span("ingress", parent) as ingress, calls.serving(calls.Call("req-7", "Generate", tracing.within(ingress))):
        carried = tracing.carrier()
    assert carried[tracing.REQUEST_ID] == "req-7" and CALLER_TRACE in carried["traceparent"]
    # The replica's side, where no call is current (a Serve replica's process).
    with tracing.continued(carried, "apply") as context:
        assert calls.current() == calls.Call("req-7", "apply", context)
        with tracing.span("replica.apply", context, version=3):
            pass
    assert calls.current() is None
    spans = {s.name: s for s in memory_spans.get_finished_spans()}
    assert spans["replica.apply"].parent.span_id == spans["ingress"].context.span_id
    assert spans["ingress"].parent.span_id == int(CALLER_PARENT, 16)
    assert {s.context.trace_id for s in spans.values()} == {int(CALLER_TRACE, 16)}
    assert spans["replica.apply"].attributes["rollout.version"] == 3


def test_a_replica_in_the_callers_process_keeps_the_call(memory_spans):
    """The single-process server's replica runs inside the ingress's call: the call stays as it is."""
    call = calls.Call("req-8", "Generate")
    with calls.serving(call), tracing.continued(tracing.carrier(), "generate_stream"):
        assert calls.current() is call


def test_a_failed_block_is_recorded_on_its_span_and_a_cancelled_one_is_not(memory_spans):
    with pytest.raises(ValueError), tracing.span("push.prepare"):
        raise ValueError("replica r1 failed to prepare")
    with pytest.raises(GeneratorExit), tracing.span("replica.generate"):
        raise GeneratorExit
    failed, cancelled = memory_spans.get_finished_spans()
    assert not failed.status.is_ok and failed.events[0].name == "exception"
    assert cancelled.status.is_unset and cancelled.attributes["rollout.cancelled"] is True


def test_tracing_is_off_without_an_endpoint(tiny_model, monkeypatch):
    for name in ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_SDK_DISABLED"):
        monkeypatch.delenv(name, raising=False)
    config = ServerConfig(model=tiny_model)
    assert tracing.endpoint(config) is None and not tracing.setup(config)
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector:4317")
    assert tracing.endpoint(config) == "http://collector:4317"
    assert tracing.endpoint(config.model_copy(update={"otlp_endpoint": "http://mine:4317"})) == "http://mine:4317"
    monkeypatch.setenv("OTEL_SDK_DISABLED", "true")
    assert tracing.endpoint(config) is None
