/**
 * The TypeScript client against a real rollout-service (vLLM engine on the project's tiny model).
 *
 * With ROLLOUT_ADDRESS and ROLLOUT_MODEL set (the Python test suite does this, sharing its
 * server), it uses that server; otherwise it makes the tiny model and starts
 * `rollout-service serve --backend local` itself with ROLLOUT_PYTHON (default ../../.venv/bin/python).
 */
import { after, before, test } from "node:test";
import * as assert from "node:assert/strict";
import { ChildProcess, execFileSync, spawn } from "node:child_process";
import * as fs from "node:fs";
import * as os from "node:os";
import * as path from "node:path";
import * as grpc from "@grpc/grpc-js";
import { RolloutClient, RolloutError, Tensor } from "../src/index";

const REPO = path.resolve(__dirname, "..", "..", "..", "..");
const READY = /rollout-service ready: grpc=(\S+):(\d+)/;
let server: ChildProcess | undefined;
let client: RolloutClient;
let modelDir: string;

async function startServer(): Promise<string> {
  const python = process.env.ROLLOUT_PYTHON ?? path.join(REPO, ".venv", "bin", "python");
  const work = fs.mkdtempSync(path.join(os.tmpdir(), "rollout-ts-"));
  modelDir = path.join(work, "tiny-model");
  execFileSync(python, ["-c", `from rollout_service.models.tiny import make_tiny_model; make_tiny_model(${JSON.stringify(modelDir)})`]);
  const proc = spawn(
    python,
    ["-m", "rollout_service.cli", "serve", "--backend", "local", "--model", modelDir, "--port", "0", "--no-http", "--max-model-len", "256"],
    { stdio: ["ignore", "pipe", "pipe"], cwd: REPO },
  );
  server = proc;
  return new Promise((resolve, reject) => {
    let log = "";
    const timer = setTimeout(() => reject(new Error(`server not ready after 400 s:\n${log.slice(-3000)}`)), 400_000);
    const onData = (buf: Buffer) => {
      log += buf.toString();
      const m = READY.exec(log);
      if (m) {
        clearTimeout(timer);
        resolve(`${m[1]}:${m[2]}`);
      }
    };
    proc.stdout!.on("data", onData);
    proc.stderr!.on("data", onData);
    proc.on("exit", (code) => reject(new Error(`server exited with ${code} before ready:\n${log.slice(-3000)}`)));
  });
}

/** One tensor of a safetensors file (8-byte little-endian header length, JSON header, data). */
function readSafetensor(file: string, name: string): Tensor {
  const buf = fs.readFileSync(file);
  const headerLen = Number(buf.readBigUInt64LE(0));
  const header = JSON.parse(buf.subarray(8, 8 + headerLen).toString());
  const entry = header[name];
  assert.ok(entry, `${name} not in ${file}`);
  assert.equal(entry.dtype, "BF16");
  const [start, end] = entry.data_offsets;
  return { dtype: "bfloat16", shape: entry.shape, data: new Uint8Array(buf.subarray(8 + headerLen + start, 8 + headerLen + end)) };
}

const GREEDY = { promptTokenIds: [[11, 22, 33, 44, 55, 66]], sampling: { maxTokens: 8, temperature: 0, ignoreEos: true } };

before(async () => {
  const address = process.env.ROLLOUT_ADDRESS ?? (await startServer());
  modelDir = process.env.ROLLOUT_MODEL ?? modelDir;
  client = new RolloutClient(address, { timeoutMs: 120_000 });
});

after(() => {
  client?.close();
  server?.kill("SIGTERM");
});

test("status reports the served model and its vocabulary", async () => {
  const status = await client.status();
  assert.equal(status.vocabSize, 2048);
  assert.equal(status.model, path.resolve(modelDir));
  assert.ok(status.weightVersion >= 0);
});

test("generate returns token ids with one logprob each, n samples per prompt, text and token prompts", async () => {
  const completions = await client.generate({
    prompts: ["The trainer computes"],
    promptTokenIds: [[5, 6, 7, 8]],
    sampling: { n: 3, maxTokens: 6, temperature: 1.0, seed: 1, ignoreEos: true },
    requestId: "ts-1",
  });
  assert.equal(completions.length, 2);
  assert.deepEqual(completions.map((c) => c.promptIndex), [0, 1]);
  assert.deepEqual(completions[1].promptTokenIds, [5, 6, 7, 8]);
  for (const c of completions) {
    assert.equal(c.requestId, "ts-1");
    assert.equal(c.samples.length, 3);
    for (const s of c.samples) {
      assert.equal(s.tokenIds.length, 6);
      assert.equal(s.logprobs.length, 6);
      assert.ok(s.logprobs.every((lp) => lp <= 0 && Number.isFinite(lp)));
      assert.equal(s.finishReason, "length");
    }
  }
});

test("top logprobs come back as maps holding the sampled token", async () => {
  const [c] = await client.generate({ promptTokenIds: [[9, 10, 11]], sampling: { maxTokens: 4, temperature: 0, logprobs: 3, ignoreEos: true } });
  const s = c.samples[0];
  s.topLogprobs.forEach((top, i) => {
    assert.ok(top.size >= 3);
    assert.ok(Math.abs(top.get(s.tokenIds[i])! - s.logprobs[i]) < 1e-6);
  });
});

test("allowed token ids, logit bias and min tokens reach the sampler", async () => {
  const sampling = { n: 2, maxTokens: 6, minTokens: 6, temperature: 1.0, seed: 2, allowedTokenIds: [5, 6, 7], logitBias: { 5: -100 }, repetitionPenalty: 1.1 };
  const [c] = await client.generate({ promptTokenIds: [[9, 10, 11]], sampling });
  for (const s of c.samples) {
    assert.equal(s.tokenIds.length, 6);
    assert.ok(s.tokenIds.every((t) => t === 6 || t === 7), `${s.tokenIds}`);
  }
});

test("a bad request is a RolloutError with INVALID_ARGUMENT naming the field", async () => {
  await assert.rejects(
    client.generate({ promptTokenIds: [[1, 2]], sampling: { topP: 1.5 } }),
    (err: unknown) => err instanceof RolloutError && err.code === grpc.status.INVALID_ARGUMENT && /top_p/.test(err.details),
  );
});

test("push changes the served weights and version; pushing the original back restores the outputs", async () => {
  const original = readSafetensor(path.join(modelDir, "model.safetensors"), "model.norm.weight");
  // Start from the checkpoint's value (a shared server may hold another test's push).
  const base = await client.push([["model.norm.weight", original]], { label: "ts restore" });
  const before = (await client.generate(GREEDY))[0].samples[0];
  assert.equal(before.weightVersion, base.version);

  // The norm's weights negated: bf16's sign bit is the high bit of each 2-byte little-endian value.
  const flipped = new Uint8Array(original.data);
  for (let i = 1; i < flipped.length; i += 2) flipped[i] ^= 0x80;
  let progress = 0;
  const pushed = await client.push(
    (function* () {
      yield ["model.norm.weight", { ...original, data: flipped }] as [string, Tensor];
    })(),
    { label: "ts flip", chunkBytes: 100, expectedVersion: base.version, onProgress: (n) => (progress = n) },
  );
  assert.equal(pushed.version, base.version + 1);
  assert.equal(pushed.label, "ts flip");
  assert.equal(pushed.tensorsApplied, 1);
  assert.equal(pushed.bytesReceived, 512);
  assert.equal(progress, 512);
  const changed = (await client.generate(GREEDY))[0].samples[0];
  assert.equal(changed.weightVersion, pushed.version);
  assert.notDeepEqual(changed.tokenIds, before.tokenIds);

  const restored = await client.push([["model.norm.weight", original]], { label: "ts restore" });
  const again = (await client.generate(GREEDY))[0].samples[0];
  assert.equal(again.weightVersion, restored.version);
  assert.deepEqual(again.tokenIds, before.tokenIds);
  assert.deepEqual(again.logprobs, before.logprobs);

  const [newest, previous] = await client.listVersions();
  assert.deepEqual([newest.version, newest.label, previous.version], [restored.version, "ts restore", pushed.version]);
  assert.ok(newest.committedAt >= previous.committedAt && newest.tensors >= 1 && newest.bytes >= 512);
});

test("rollback serves a kept version again as a new version; a version not kept is NOT_FOUND naming the kept ones", async () => {
  const [newest, previous] = await client.listVersions();
  const served = (await client.generate(GREEDY))[0].samples[0];
  const back = await client.rollback(previous.version, { expectedVersion: newest.version });
  assert.deepEqual([back.version, back.label, back.bytesReceived], [newest.version + 1, `rollback to v${previous.version}`, 0]);
  const [listed] = await client.listVersions();
  assert.deepEqual([listed.version, listed.label], [back.version, back.label]);
  // Then forward again to what was served before, so the tests after see the same weights.
  const forward = await client.rollback(newest.version);
  const again = (await client.generate(GREEDY))[0].samples[0];
  assert.equal(again.weightVersion, forward.version);
  assert.deepEqual([again.tokenIds, again.logprobs], [served.tokenIds, served.logprobs]);
  await assert.rejects(
    client.rollback(10_000),
    (err: unknown) => err instanceof RolloutError && err.code === grpc.status.NOT_FOUND && /version 10000 is not kept/.test(err.details),
  );
  assert.equal((await client.status()).committedVersion, forward.version);
});

test("a push with a stale expectedVersion is FAILED_PRECONDITION and changes nothing", async () => {
  const version = (await client.status()).weightVersion;
  const original = readSafetensor(path.join(modelDir, "model.safetensors"), "model.norm.weight");
  await assert.rejects(
    client.push([["model.norm.weight", original]], { expectedVersion: version + 7 }),
    (err: unknown) => err instanceof RolloutError && err.code === grpc.status.FAILED_PRECONDITION,
  );
  assert.equal((await client.status()).weightVersion, version);
});

test("a tensor whose bytes do not match its shape is refused before anything is committed", async () => {
  const version = (await client.status()).weightVersion;
  await assert.rejects(
    client.push([["model.norm.weight", { dtype: "bfloat16", shape: [256], data: new Uint8Array(10) }]]),
    /model.norm.weight: 10 bytes, but shape \[256\] of bfloat16 needs 512/,
  );
  assert.equal((await client.status()).weightVersion, version);
});

test("loadWeights of a path outside the server's load dirs is PERMISSION_DENIED naming the option, nothing committed", async () => {
  const version = (await client.status()).committedVersion;
  await assert.rejects(
    client.loadWeights(modelDir, { label: "ts load" }),
    (err: unknown) => err instanceof RolloutError && err.code === grpc.status.PERMISSION_DENIED && /load_dirs/.test(err.details),
  );
  assert.equal((await client.status()).committedVersion, version);
});
