/**
 * push() waits for replicas that are still loading a committed version, against a test-double
 * server (grpc-js) whose status reaches the pushed version on the third call: the real service
 * cannot be made to fail a replica's load on cue from here (tests/serve/test_cluster.py does that).
 */
import { test } from "node:test";
import * as assert from "node:assert/strict";
import * as path from "node:path";
import * as grpc from "@grpc/grpc-js";
import * as protoLoader from "@grpc/proto-loader";
import { RolloutClient, RolloutError } from "../src/index";

function serviceDefinition(): grpc.ServiceDefinition {
  const definition = protoLoader.loadSync("rollout/v1/rollout.proto", {
    includeDirs: [path.resolve(__dirname, "..", "..", "proto")],
    keepCase: false,
    longs: Number,
    enums: String,
    defaults: true,
    oneofs: true,
  });
  return (grpc.loadPackageDefinition(definition) as any).rollout.v1.RolloutService.service;
}

/** Answers every push with version 5, "replica-b" still catching up; serves 5 from the third status. */
async function catchingUpServerDouble(): Promise<{ address: string; statusCalls: () => number; stop: () => void }> {
  let calls = 0;
  const server = new grpc.Server();
  server.addService(serviceDefinition(), {
    PushWeights: (call: grpc.ServerReadableStream<object, object>, callback: grpc.sendUnaryData<object>) => {
      call.on("data", () => undefined);
      call.on("end", () => callback(null, { version: 5, replicasCatchingUp: ["replica-b"] }));
    },
    GetStatus: (_call: unknown, callback: grpc.sendUnaryData<object>) => {
      calls += 1;
      const b = calls < 3 ? 4 : 5;
      callback(null, { weightVersion: Math.min(5, b), committedVersion: 5, replicaVersions: { "replica-a": 5, "replica-b": b } });
    },
  });
  const port = await new Promise<number>((resolve, reject) =>
    server.bindAsync("127.0.0.1:0", grpc.ServerCredentials.createInsecure(), (err, p) => (err ? reject(err) : resolve(p))),
  );
  return { address: `127.0.0.1:${port}`, statusCalls: () => calls, stop: () => server.forceShutdown() };
}

test("a push some replicas still load resolves once every replica serves its version", async () => {
  const double = await catchingUpServerDouble();
  const client = new RolloutClient(double.address, { timeoutMs: 10_000 });
  try {
    const result = await client.push([["w", { dtype: "float32", shape: [2], data: new Uint8Array(8) }]]);
    assert.equal(result.version, 5);
    assert.deepEqual(result.replicasCatchingUp, ["replica-b"]);
    assert.equal(double.statusCalls(), 3);
    const status = await client.status();
    assert.deepEqual(status.replicaVersions, { "replica-a": 5, "replica-b": 5 });
    assert.equal(status.committedVersion, 5);
  } finally {
    client.close();
    double.stop();
  }
});

test("waitForVersion gives up with DEADLINE_EXCEEDED naming the version served", async () => {
  const double = await catchingUpServerDouble();
  const client = new RolloutClient(double.address, { timeoutMs: 10_000 });
  try {
    await assert.rejects(
      client.waitForVersion(9, 1_000, 100),
      (err: unknown) =>
        err instanceof RolloutError && err.code === grpc.status.DEADLINE_EXCEEDED && /version 9 not served .* \(serving 5\)/.test(err.details),
    );
  } finally {
    client.close();
    double.stop();
  }
});
