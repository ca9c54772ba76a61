"""The verl plugin's logic that needs no engine: where the address comes from, how verl's
sampling params are filled in, and how a trajectory's turns find their session."""

from __future__ import annotations

import pytest

from tests.trainers import require_trainer

require_trainer("verl")  # skipped where not installed; in CI a failure
from verl.workers.config import RolloutConfig  # noqa: E402

from rollout_client.integrations.connection import ENV, Connection  # noqa: E402
from rollout_client.integrations.verl.server import fill_sampling  # noqa: E402
from rollout_client.integrations.verl.sessions import TrajectorySessions  # noqa: E402


@pytest.fixture(autouse=True)
def no_service_environment(monkeypatch):
    for var in ENV.values():
        monkeypatch.delenv(var, raising=False)


def test_the_connection_comes_from_rollout_custom_then_the_environment(monkeypatch):
    monkeypatch.setenv("ROLLOUT_SERVICE_ADDRESS", "env:1")
    monkeypatch.setenv("ROLLOUT_SERVICE_API_KEY", "k-env")
    monkeypatch.setenv("ROLLOUT_SERVICE_TLS", "true")
    assert Connection.from_custom(None) == Connection("env:1", api_key="k-env", tls=True)
    assert Connection.from_custom({"address": "svc:2", "timeout": 30}) == Connection("svc:2", api_key="k-env", tls=True, timeout=30.0)
    assert Connection.from_custom({"address": None, "tls": False}).address == "env:1"  # null: the environment's
    assert "k-env" not in repr(Connection.from_custom(None))  # a key never lands in a log line


def test_a_bad_tls_or_timeout_names_where_it_came_from(monkeypatch):
    with pytest.raises(ValueError, match=r"custom.tls='maybe': expected true or false"):
        Connection.from_custom({"address": "svc:1", "tls": "maybe"})
    monkeypatch.setenv("ROLLOUT_SERVICE_TIMEOUT", "soon")
    with pytest.raises(ValueError, match=r"ROLLOUT_SERVICE_TIMEOUT='soon': expected seconds"):
        Connection.from_custom({"address": "svc:1"})
    with pytest.raises(ValueError, match=r"custom.timeout=0.0: must be positive"):
        Connection.from_custom({"address": "svc:1", "timeout": 0})


def test_an_unknown_custom_key_or_no_address_is_a_clear_error(monkeypatch):
    monkeypatch.delenv("ROLLOUT_SERVICE_ADDRESS", raising=False)
    with pytest.raises(ValueError, match=r"custom.address=HOST:PORT or the ROLLOUT_SERVICE_ADDRESS"):
        Connection.from_custom({})
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['adress'\]"):
        Connection.from_custom({"adress": "svc:1"})


def test_client_certificates_come_in_pairs_from_custom_or_the_environment(monkeypatch):
    monkeypatch.setenv("ROLLOUT_SERVICE_ADDRESS", "svc:1")
    monkeypatch.setenv("ROLLOUT_SERVICE_CLIENT_CERTIFICATE", "/c.pem")
    with pytest.raises(ValueError, match="ROLLOUT_SERVICE_CLIENT_KEY: client_certificate and client_key go together"):
        Connection.from_custom({})
    connection = Connection.from_custom({"client_key": "/k.pem"})
    assert (connection.client_certificate, connection.client_key) == ("/c.pem", "/k.pem")
    assert "/k.pem" not in repr(connection)


CONFIG = RolloutConfig(name="rollout_service", prompt_length=64, response_length=32)


def test_max_tokens_is_filled_as_verls_vllm_server_fills_it():
    fill = lambda n, sp, ctx=256: fill_sampling(CONFIG, n, sp, ctx, 0)[0]["max_tokens"]  # noqa: E731
    assert fill(10, {}) == 32  # the response length
    assert fill(90, {}) == 6  # prompt + response length bounds it: 64 + 32 - 90
    assert fill(10, {"max_tokens": 5}) == fill(10, {"max_new_tokens": 5}) == 5
    assert fill(250, {"max_tokens": 100}) == 6  # never past the context
    with pytest.raises(ValueError, match="no room for a response"):
        fill(256, {})


def test_verls_sampling_keys_become_the_services():
    params, want = fill_sampling(CONFIG, 3, {"temperature": 0.7, "top_k": -1, "logprobs": True, "top_p": None}, 256, 0)
    assert want and params == {
        "temperature": 0.7, "top_k": 0, "max_tokens": 32, "repetition_penalty": 1.0, "ignore_eos": False, "detokenize": False,
    }
    seeded = RolloutConfig(name="rollout_service", full_determinism=True, seed=40)
    assert fill_sampling(seeded, 3, {}, 256, replica_rank=2)[0]["seed"] == 42  # as verl's server seeds
    with pytest.raises(ValueError, match=r"\['best_of'\] have no rollout-service equivalent"):
        fill_sampling(CONFIG, 3, {"best_of": 2}, 256, 0)


def test_a_turn_continuing_an_earlier_one_keeps_its_session_and_new_prompts_get_new_ones():
    sessions = TrajectorySessions("verl-r0")
    first = sessions.session_for([1, 2, 3])
    assert first.startswith("verl-r0-") and sessions.session_for([1, 2, 3]) != first  # n samples of one prompt spread
    sessions.record(first, [1, 2, 3, 10, 11])  # turn 1: prompt + response
    assert sessions.session_for([1, 2, 3, 10, 11, 50, 51]) == first  # turn 2 appends a tool result
    second = sessions.session_for([1, 2, 3, 10, 99])  # diverges inside turn 1's response: not a continuation
    assert second != first
    sessions.record(first, [1, 2, 3, 10, 11, 50, 51, 12])
    sessions.record("short", [1, 2])
    assert sessions.session_for([1, 2, 3, 10, 11, 50, 51, 12, 60]) == first  # the longest match wins
    assert sessions.session_for([1, 2, 9]) == "short"


def test_old_sequences_are_forgotten_past_the_capacity():
    sessions = TrajectorySessions("verl-r0", capacity=2)
    for i in range(3):
        sessions.record(f"s{i}", [i, i])
    assert sessions.session_for([0, 0, 5]).startswith("verl-r0-")  # forgotten
    assert sessions.session_for([2, 2, 5]) == "s2"
