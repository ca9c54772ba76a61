"""`rollout-service mcp`: a Model Context Protocol server on stdio, so that a coding agent (Claude
Code, Cursor, ...) can watch and steer a training run: status, versions, rollback, a probe
generation, the int8/bf16 report.

Each tool makes RolloutClient calls with the API key and TLS files the bridge was started with: the
service checks that key's role (api/access.py) as for any other client, and the bridge has no key of
its own. It calls only the addresses it was started with (the service, and the bf16 server the
report compares it with): no tool takes an address, so an agent misled by text it read (a
completion, a label) cannot send the key anywhere else. A failed call (the server's status code and message, an unreachable server) comes back as
an MCP tool error, `is_error` with the text "CODE: message", and the bridge goes on serving. Results
are JSON objects (structured content, and the same as text).
"""

from __future__ import annotations

import datetime
from collections.abc import Iterator, Mapping
from contextlib import ExitStack, contextmanager
from dataclasses import asdict
from typing import Annotated, Any

from google.protobuf.message import Message
from mcp.server.mcpserver import MCPServer
from mcp.server.mcpserver.exceptions import ToolError
from mcp.types import ToolAnnotations
from pydantic import Field
from rollout_client import RolloutClient, RolloutClientError

from rollout_service.tools.report import DEFAULT_PROMPTS, measure

STATUS_TIMEOUT_S = 10.0
# Generation and the report's calls wait behind the training run's rollouts on the same engines.
GENERATE_TIMEOUT_S = 120.0
# Probes and reports stay small: the agent is beside a training run, not a load generator.
MAX_PROMPTS = 8
MAX_PROBE_TOKENS = 128
MAX_REPORT_TOKENS = 64
MAX_REPORT_SAMPLES = 8
READ_ONLY = ToolAnnotations(read_only_hint=True, open_world_hint=False)


def _plain(message: Message) -> dict[str, Any]:
    """A message as JSON values, with 64-bit integers as numbers (MessageToDict makes them strings)."""
    def value(v: Any) -> Any:
        return _plain(v) if isinstance(v, Message) else v

    out: dict[str, Any] = {}
    for field in message.DESCRIPTOR.fields:
        v = getattr(message, field.name)
        if field.message_type is not None and field.message_type.GetOptions().map_entry:
            out[field.name] = {k: value(x) for k, x in v.items()}
        elif field.is_repeated:
            out[field.name] = [value(x) for x in v]
        elif field.message_type is not None:
            out[field.name] = _plain(v) if message.HasField(field.name) else None
        else:
            out[field.name] = v
    return out


@contextmanager
def _tool_errors(where: str) -> Iterator[None]:
    """A failed call as the tool's error: the server's code and message, naming the server."""
    try:
        yield
    except RolloutClientError as exc:
        raise ToolError(f"{where}: {exc}") from None


class Bridge:
    """The tools, bound to one service (`address`), the bf16 server its report compares it with
    (`bf16_address`, optional) and one set of connection settings (`connection`: RolloutClient's
    api_key, root_certificates, client_certificate, client_key)."""

    def __init__(self, address: str, connection: Mapping[str, Any], bf16_address: str | None = None):
        self.address = address
        self.bf16_address = bf16_address
        self.connection = dict(connection)
        # Made now, so that bad TLS files or settings stop the command before it serves.
        self.client = RolloutClient(address, timeout=GENERATE_TIMEOUT_S, **self.connection)

    def status(self) -> dict[str, Any]:
        """The service's status now: model, quantization, the weight version every replica serves
        (weight_version), the newest committed one (committed_version), replicas and the version each
        serves (replica_versions), the last push's figures (last_push: version, label, bytes, seconds;
        null before the first push), request and token counters, uptime."""
        with _tool_errors(self.address):
            status = _plain(self.client.status(timeout=STATUS_TIMEOUT_S))
        status.pop("shared_memory")  # same-host push plumbing; its token is no figure for an agent
        return {"address": self.address, **status}

    def versions(self) -> dict[str, Any]:
        """The committed weight versions the service keeps, newest first: version, label, commit time
        (unix seconds and ISO 8601 UTC), tensors, bytes. Any of them can be rolled back to."""
        with _tool_errors(self.address):
            kept = self.client.list_versions(timeout=STATUS_TIMEOUT_S)
        return {"versions": [
            {**_plain(v), "committed": datetime.datetime.fromtimestamp(v.committed_at, datetime.timezone.utc).isoformat()}
            for v in kept
        ]}

    def rollback(
        self,
        to_version: Annotated[int, Field(ge=1, description="A kept version (see the versions tool) to serve again.")],
        expected_version: Annotated[int | None, Field(
            ge=0, description="Refuse unless this is the newest committed version (so as not to undo a push made meanwhile).",
        )] = None,
    ) -> dict[str, Any]:
        """Serve a kept version's weights again, as a new version (the newest + 1; versions only grow,
        so trainers and samples see the change). Needs an admin key: it undoes the trainers' pushes."""
        with _tool_errors(self.address):
            result = self.client.rollback(to_version, expected_version=expected_version)
        return {"version": result.version, "rolled_back_to": to_version}

    def generate(
        self,
        prompts: Annotated[list[str], Field(min_length=1, max_length=MAX_PROMPTS, description="Text prompts.")],
        max_tokens: Annotated[int, Field(ge=1, le=MAX_PROBE_TOKENS, description="Tokens per completion.")] = 16,
        temperature: Annotated[float, Field(ge=0.0, le=2.0, description="0 decodes greedily.")] = 0.0,
        seed: Annotated[int | None, Field(description="Sampling seed (temperature > 0).")] = None,
    ) -> dict[str, Any]:
        """A probe generation on the served weights: per prompt, the text, its token count, the weight
        version that produced it, its mean logprob and why it ended ("stop" or "length")."""
        with _tool_errors(self.address):
            completions = self.client.generate(
                prompts, max_tokens=max_tokens, temperature=temperature, seed=seed, timeout=GENERATE_TIMEOUT_S
            )
        return {"completions": [
            {
                "prompt": prompts[c.prompt_index], "text": s.text, "tokens": len(s.token_ids),
                "prompt_tokens": len(c.prompt_token_ids), "weight_version": s.weight_version,
                "mean_logprob": float(s.logprobs.mean()) if s.token_ids else None, "finish_reason": s.finish_reason,
            }
            for c in completions for s in c.samples
        ]}

    def report(
        self,
        prompts: Annotated[list[str] | None, Field(
            min_length=1, max_length=MAX_PROMPTS, description="Text prompts (default: a built-in set of 8).",
        )] = None,
        n: Annotated[int, Field(ge=1, le=MAX_REPORT_SAMPLES, description="Samples per prompt.")] = 2,
        max_tokens: Annotated[int, Field(ge=1, le=MAX_REPORT_TOKENS, description="Tokens per sample.")] = 16,
        seed: Annotated[int, Field(description="Sampling seed.")] = 0,
        tis_cap: Annotated[float, Field(gt=1.0, description="TIS cap for the weight statistics.")] = 2.0,
    ) -> dict[str, Any]:
        """Is quantized rollout safe for this model? The service (quantized) samples, the bf16 server
        the bridge was started with (--bf16-address) scores the same tokens (Δ = logp_bf16 - logp_quant); returns the figures of `rollout-service
        report`: |Δlogprob| mean and p50/p90/p99/max, KL(quant ‖ bf16), TIS weight mean/min and share
        clipped, greedy agreement (identical continuations, tokens before the first divergence),
        tokens/s of each; and each server's quantization and weight version (compare like with like)."""
        if self.bf16_address is None:
            raise ToolError("report: the bridge was started without --bf16-address (a bf16 server of the same model to compare with)")
        bf16_address, quant_address = self.bf16_address, self.address
        with _tool_errors(f"report between bf16 {bf16_address} and quantized {quant_address}"), ExitStack() as stack:
            bf16, quant = (stack.enter_context(RolloutClient(a, timeout=GENERATE_TIMEOUT_S, **self.connection))
                           for a in (bf16_address, quant_address))
            servers = {side: (address, c.status(timeout=STATUS_TIMEOUT_S))
                       for side, address, c in (("bf16", bf16_address, bf16), ("quantized", quant_address, quant))}
            figures, _ = measure(bf16, quant, prompts or DEFAULT_PROMPTS, n=n, max_tokens=max_tokens, seed=seed, cap=tis_cap)
        return {
            "figures": asdict(figures),
            **{side: {"address": a, "quantization": s.quantization, "weight_version": s.weight_version}
               for side, (a, s) in servers.items()},
        }

    def server(self) -> MCPServer:
        mcp = MCPServer(
            "rollout-service",
            instructions=f"Watch and steer the rollout-service at {self.address}: status, kept versions, "
            "rollback to one of them, a probe generation, and the quantized-vs-bf16 report.",
        )
        mcp.add_tool(self.status, annotations=READ_ONLY)
        mcp.add_tool(self.versions, annotations=READ_ONLY)
        mcp.add_tool(self.rollback, annotations=ToolAnnotations(destructive_hint=True, idempotent_hint=False))
        mcp.add_tool(self.generate, annotations=READ_ONLY)
        mcp.add_tool(self.report, annotations=READ_ONLY)
        return mcp

    def close(self) -> None:
        self.client.close()
