"""The single-process server (`--backend local`) as users run it, with `--log-format json` and
`--otlp-endpoint` pointing at an OTLP receiver in this process (the session's `trainer_server`):
its production exporter sends the spans there, and its log file holds the JSON lines."""

from __future__ import annotations

import grpc
import httpx
import pytest

from tests.observability import traced

pytestmark = pytest.mark.engine


def test_generate_spans_form_one_chain_under_the_callers_span(trainer_server, otlp_sink):
    with grpc.insecure_channel(trainer_server.grpc_address) as channel:
        traced.generate_in_callers_trace(otlp_sink, channel)


def test_a_refused_call_returns_its_request_id(trainer_server):
    with grpc.insecure_channel(trainer_server.grpc_address) as channel, \
            httpx.Client(base_url=trainer_server.http_url, timeout=60) as http:
        traced.refused_generate_has_its_id(channel, http)


def test_a_push_has_a_span_per_phase_and_its_request_id_on_its_log_lines(trainer_server, otlp_sink, tiny_model):
    """(Every test that uses trainer_server pushes the weights it needs first: this push of one
    tensor changes nothing another test relies on.)"""
    with httpx.Client(base_url=trainer_server.http_url, timeout=120) as http:
        request_id = traced.push_in_callers_trace(otlp_sink, http, tiny_model)
    records = traced.json_lines_with(request_id, trainer_server.log_path.read_text().splitlines())
    applied = [r for r in records if r["logger"] == "rollout_service.replica" and "serves version" in r["message"]]
    assert applied and applied[0]["level"] == "INFO" and applied[0]["time"]
