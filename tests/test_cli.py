"""`rollout-service serve` refuses bad settings at once, with the option named."""

import socket
import subprocess
import sys


def _serve(*args):
    cmd = [sys.executable, "-m", "rollout_service.cli", "serve", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


def test_bad_option_value_exits_2_naming_the_option(tiny_model):
    r = _serve("--model", str(tiny_model), "--dtype", "float16")
    assert r.returncode == 2 and "--dtype" in r.stderr and "float16" in r.stderr


def test_missing_model_directory_exits_2(tmp_path):
    r = _serve("--model", str(tmp_path / "nope"))
    assert r.returncode == 2 and "no config.json" in r.stderr


def test_taken_port_fails_before_the_engine_starts(tiny_model):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        r = _serve("--model", str(tiny_model), "--port", str(port), "--no-http")
    assert r.returncode == 2 and f"port={port}" in r.stderr, r.stderr


def test_fp8_is_refused_on_cpu_with_a_clear_reason(tiny_model, tmp_path):
    r = _serve("--model", str(tiny_model), "--quantization", "fp8", "--port", "0", "--no-http", "--cache-dir", str(tmp_path))
    assert r.returncode == 2 and "needs a GPU" in r.stderr, r.stderr[-2000:]


def test_a_quantized_mixture_of_experts_is_refused_with_a_clear_reason(tmp_path):
    from rollout_service.models.tiny import TinyModelSpec, make_tiny_model

    moe = make_tiny_model(tmp_path / "moe", TinyModelSpec(arch="qwen3-moe", layers=1, hidden=128, heads=2, kv_heads=1))
    r = _serve("--model", str(moe), "--quantization", "int8", "--port", "0", "--no-http", "--cache-dir", str(tmp_path))
    assert r.returncode == 2 and "mixture of experts (4 experts)" in r.stderr and "needs AMX" in r.stderr, r.stderr[-2000:]


def test_prequantized_checkpoint_with_quantization_flag_is_refused(tiny_model, tmp_path):
    from rollout_service.quant.checkpoint import quantize_checkpoint
    from rollout_service.quant.recipe import Recipe

    quantized = quantize_checkpoint(tiny_model, tmp_path / "q", Recipe("int8"))
    r = _serve("--model", str(quantized), "--quantization", "int8", "--port", "0", "--no-http")
    assert r.returncode == 2 and "already quantized" in r.stderr, r.stderr[-2000:]


def test_a_network_host_without_api_keys_is_refused_naming_the_way_out(tiny_model):
    r = _serve("--model", str(tiny_model), "--host", "0.0.0.0", "--backend", "local")
    assert r.returncode == 2 and "not a loopback address" in r.stderr and "--insecure" in r.stderr, r.stderr


def test_a_bad_keys_file_fails_at_start_naming_its_line(tiny_model, tmp_path):
    keys = tmp_path / "keys"
    keys.write_text("trainer:" + "k" * 20 + "\nroot:" + "k" * 20 + "\n")
    r = _serve("--model", str(tiny_model), "--api-keys", str(keys), "--backend", "local", "--port", "0", "--no-http")
    assert r.returncode == 2 and f"{keys}:2: unknown role 'root'" in r.stderr, r.stderr[-2000:]


def test_make_key_prints_a_key_once_and_appends_only_its_digest(tmp_path):
    from rollout_service.api.access import KeyRing, Operation, digest

    keys = tmp_path / "keys"
    cmd = [sys.executable, "-m", "rollout_service.cli", "make-key", "trainer", "--append", str(keys)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=True)
    key = r.stdout.strip()
    assert keys.read_text() == f"trainer:sha256:{digest(key)}\n"
    assert keys.stat().st_mode & 0o777 == 0o600
    caller = KeyRing(keys).lookup(key)
    assert caller is not None and caller.may(Operation.PUSH)
    keys.write_text(f"admin:{'a' * 20}")  # no newline after its last line
    second = subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=True).stdout.strip()
    ring = KeyRing(keys)
    assert ring.lookup("a" * 20).role == "admin" and ring.lookup(second).role == "trainer"
    bad = subprocess.run([*cmd[:4], "root"], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "roles are trainer, eval, admin" in bad.stderr
