/**
 * TypeScript client for rollout-service (rollout.v1 over gRPC), on @grpc/grpc-js.
 *
 *   const client = new RolloutClient("localhost:50051");
 *   const [c] = await client.generate({ prompts: ["The trainer"], sampling: { n: 4, maxTokens: 32 } });
 *   c.samples[0].logprobs;                      // exact per-token logprobs of the sampled tokens
 *   await client.push([["model.norm.weight", { dtype: "bfloat16", shape: [256], data }]]);
 *
 * The .proto in protos/ is the contract; it is loaded at runtime with @grpc/proto-loader (the
 * package ships a copy in proto/). Errors are RolloutError carrying the gRPC status code.
 */
import * as path from "node:path";
import * as zlib from "node:zlib";
import * as grpc from "@grpc/grpc-js";
import * as protoLoader from "@grpc/proto-loader";

const PROTO_ROOT = path.resolve(__dirname, "..", "..", "proto");
const SERVICE = "rollout.v1.RolloutService";
const MAX_MESSAGE_BYTES = 256 * 1024 * 1024;
export const DEFAULT_CHUNK_BYTES = 4 * 1024 * 1024;
/** How long push() waits for replicas still loading a committed version (replicasCatchingUp). */
export const CATCH_UP_WAIT_MS = 300_000;
const WAIT_POLL_MS = 500;
// waitForVersion's last status call may outlast its deadline by this much, rather than fail with a
// deadline too short to reach the server (its own DEADLINE_EXCEEDED would hide the version served).
const MIN_STATUS_TIMEOUT_MS = 1_000;

/** Sampling parameters (SamplingParams in the proto); unset fields take the server's defaults. */
export interface SamplingParams {
  n?: number;
  maxTokens?: number;
  temperature?: number;
  topP?: number;
  topK?: number;
  minP?: number;
  stop?: string[];
  stopTokenIds?: number[];
  seed?: number;
  ignoreEos?: boolean;
  logprobs?: number;
  promptLogprobs?: number;
  /** false: token ids and logprobs only, no text (default true). */
  detokenize?: boolean;
  /** End-of-sequence and stop token ids get probability 0 until a sample has this many tokens. */
  minTokens?: number;
  /** > 0; 1 = off. Logits of tokens in the prompt or sample: positive divided by it, negative multiplied. */
  repetitionPenalty?: number;
  /** In [-2, 2]: subtracted from the logit of every token the sample contains. */
  presencePenalty?: number;
  /** In [-2, 2]: subtracted from a token's logit once per time the sample contains it. */
  frequencyPenalty?: number;
  /** Token id -> bias in [-100, 100], added to its logit. */
  logitBias?: Record<number, number>;
  /** When not empty, only these token ids can be sampled. */
  allowedTokenIds?: number[];
}

export interface GenerateOptions {
  /** Text prompts, tokenized by the server. */
  prompts?: string[];
  /** Prompts as token ids (after the text prompts in the batch). */
  promptTokenIds?: number[][];
  sampling?: SamplingParams;
  requestId?: string;
  /** Requests with one sessionId go to one replica (its prefix cache). */
  sessionId?: string;
  /** Deadline of this call in milliseconds (default: the client's timeoutMs). */
  timeoutMs?: number;
}

export type FinishReason = "stop" | "length" | "aborted" | "unspecified";

export interface Sample {
  tokenIds: number[];
  text: string;
  /** logprobs[i]: logprob of tokenIds[i] under the distribution it was sampled from. */
  logprobs: number[];
  finishReason: FinishReason;
  stopReason: string;
  /** The weight version that produced the sample's last token. */
  weightVersion: number;
  firstWeightVersion: number;
  topLogprobs: Map<number, number>[];
}

export interface Completion {
  promptIndex: number;
  promptTokenIds: number[];
  samples: Sample[];
  requestId: string;
  promptLogprobs: number[];
}

export type DType = "bfloat16" | "float16" | "float32";

/** One tensor of a push: raw little-endian row-major bytes of `dtype` and `shape`. */
export interface Tensor {
  dtype: DType;
  shape: number[];
  data: Uint8Array;
}

export interface PushOptions {
  /** Reject (FAILED_PRECONDITION) unless this is the last committed version (Status.committedVersion). */
  expectedVersion?: number;
  label?: string;
  /** "drain" | "abort" | "continue"; empty: the server's setting. */
  inflight?: "" | "drain" | "abort" | "continue";
  chunkBytes?: number;
  timeoutMs?: number;
  /** Called after each chunk with the bytes sent so far. */
  onProgress?: (bytesSent: number) => void;
}

/** load_weights' options: those of a push that a checkpoint read by the server keeps. */
export type LoadOptions = Pick<PushOptions, "expectedVersion" | "label" | "inflight" | "timeoutMs">;

/** rollback's options: a push's fencing and deadline. */
export type RollbackOptions = Pick<PushOptions, "expectedVersion" | "timeoutMs">;

export interface PushResult {
  version: number;
  bytesReceived: number;
  tensorsApplied: number;
  receiveS: number;
  requantizeS: number;
  applyS: number;
  pauseMs: number;
  drainMs: number;
  /** Samples in the engine when generation paused for the push (see the proto). */
  samplesInFlight: number;
  /**
   * Replicas that failed to load the push and load it from the weight store instead (Ray Serve).
   * The push is committed; push() resolves once every replica serves it (up to CATCH_UP_WAIT_MS,
   * then it warns and resolves).
   */
  replicasCatchingUp: string[];
  /** What failed on the server after the commit point without undoing it (each also logged with console.warn). */
  warnings: string[];
  label: string;
  /** Wall time of the call measured by the client. */
  seconds: number;
}

/** A committed version the server's weight store keeps (StoredVersion in the proto). */
export interface StoredVersion {
  version: number;
  label: string;
  /** Seconds since the Unix epoch. */
  committedAt: number;
  tensors: number;
  bytes: number;
}

export interface Status {
  model: string;
  quantization: string;
  dtype: string;
  /** The version every replica serves (their minimum). */
  weightVersion: number;
  /** The version each replica serves, by replica id ("local" for the single-process server). */
  replicaVersions: Record<string, number>;
  /** The last committed version: what `expectedVersion` is compared with; ahead of
   * weightVersion only while a replica still loads it. */
  committedVersion: number;
  maxModelLen: number;
  vocabSize: number;
  logprobsMode: string;
  replicas: number;
  engineVersion: string;
  uptimeS: number;
  counters: Record<string, number>;
  inflightPolicy: string;
}

/** Retries of idempotent calls (Generate, GetStatus) by gRPC's own retry policy. */
export interface RetryPolicy {
  maxAttempts: number; // 1..5, first try included
  initialBackoffS: number;
  maxBackoffS: number;
  backoffMultiplier: number;
  codes: string[]; // gRPC status names, e.g. ["UNAVAILABLE"]
}

export const DEFAULT_RETRY: RetryPolicy = {
  maxAttempts: 5,
  initialBackoffS: 0.5,
  maxBackoffS: 10,
  backoffMultiplier: 2,
  codes: ["UNAVAILABLE"],
};

export interface ClientOptions {
  /** Default deadline of every call, ms (default 600 000). */
  timeoutMs?: number;
  retry?: RetryPolicy;
  /** Use TLS (system roots, or rootCerts PEM). */
  tls?: boolean;
  rootCerts?: Buffer;
  /** This client's certificate and private key (PEM), for a server that requires client
   * certificates (mutual TLS); they imply TLS. */
  clientCert?: Buffer;
  clientKey?: Buffer;
  /** Sent as `authorization: Bearer <key>` on every call. */
  apiKey?: string;
}

/** A failed call: `code` is the gRPC status (grpc.status), `details` the server's message. */
export class RolloutError extends Error {
  constructor(
    readonly code: grpc.status,
    readonly details: string,
  ) {
    super(`${grpc.status[code]}: ${details}`);
    this.name = "RolloutError";
  }
}

function toRolloutError(err: unknown): RolloutError {
  const e = err as grpc.ServiceError;
  return new RolloutError(e.code ?? grpc.status.UNKNOWN, e.details ?? String(err));
}

const FINISH: Record<string, FinishReason> = {
  FINISH_REASON_STOP: "stop",
  FINISH_REASON_LENGTH: "length",
  FINISH_REASON_ABORTED: "aborted",
};

const DTYPE_BYTES: Record<DType, number> = { bfloat16: 2, float16: 2, float32: 4 };

function serviceConfig(retry: RetryPolicy): string {
  const methodConfig: Record<string, unknown> = {
    name: ["Generate", "GenerateStream", "GetStatus"].map((method) => ({ service: SERVICE, method })),
  };
  if (retry.maxAttempts > 1) {
    methodConfig.retryPolicy = {
      maxAttempts: retry.maxAttempts,
      initialBackoff: `${retry.initialBackoffS}s`,
      maxBackoff: `${retry.maxBackoffS}s`,
      backoffMultiplier: retry.backoffMultiplier,
      retryableStatusCodes: retry.codes,
    };
  }
  return JSON.stringify({ methodConfig: [methodConfig] });
}

function loadService(): grpc.ServiceClientConstructor {
  const definition = protoLoader.loadSync("rollout/v1/rollout.proto", {
    includeDirs: [PROTO_ROOT],
    keepCase: false, // camelCase fields
    longs: Number,
    enums: String,
    defaults: true,
    oneofs: true,
  });
  const pkg = grpc.loadPackageDefinition(definition) as any;
  return pkg.rollout.v1.RolloutService as grpc.ServiceClientConstructor;
}

// eslint-disable-next-line @typescript-eslint/no-explicit-any
type Raw = any;

function completionFrom(c: Raw): Completion {
  return {
    promptIndex: c.promptIndex,
    promptTokenIds: c.promptTokenIds,
    requestId: c.requestId,
    promptLogprobs: c.promptLogprobs,
    samples: c.samples.map(
      (s: Raw): Sample => ({
        tokenIds: s.tokenIds,
        text: s.text,
        logprobs: s.logprobs,
        finishReason: FINISH[s.finishReason] ?? "unspecified",
        stopReason: s.stopReason,
        weightVersion: s.weightVersion,
        firstWeightVersion: s.firstWeightVersion,
        topLogprobs: s.topLogprobs.map(
          (t: Raw) => new Map<number, number>(t.tokenIds.map((id: number, i: number) => [id, t.logprobs[i]])),
        ),
      }),
    ),
  };
}

function checkTensor(name: string, t: Tensor): void {
  const itemsize = DTYPE_BYTES[t.dtype];
  if (itemsize === undefined) {
    throw new TypeError(`${name}: dtype ${t.dtype} is not one of bfloat16, float16, float32`);
  }
  const expected = t.shape.reduce((a, b) => a * b, 1) * itemsize;
  if (t.data.byteLength !== expected) {
    throw new RangeError(`${name}: ${t.data.byteLength} bytes, but shape [${t.shape}] of ${t.dtype} needs ${expected}`);
  }
}

export class RolloutClient {
  private readonly stub: grpc.Client & Record<string, Function>;
  private readonly metadata: grpc.Metadata;
  readonly timeoutMs: number;

  constructor(
    readonly address: string,
    options: ClientOptions = {},
  ) {
    const Service = loadService();
    if ((options.clientCert === undefined) !== (options.clientKey === undefined)) {
      throw new Error("clientCert and clientKey go together: give both or neither");
    }
    const creds =
      options.tls || options.rootCerts || options.clientCert
        ? grpc.credentials.createSsl(options.rootCerts ?? null, options.clientKey ?? null, options.clientCert ?? null)
        : grpc.credentials.createInsecure();
    this.stub = new Service(address, creds, {
      "grpc.max_send_message_length": MAX_MESSAGE_BYTES,
      "grpc.max_receive_message_length": MAX_MESSAGE_BYTES,
      "grpc.service_config": serviceConfig(options.retry ?? DEFAULT_RETRY),
    }) as any;
    this.timeoutMs = options.timeoutMs ?? 600_000;
    this.metadata = new grpc.Metadata();
    if (options.apiKey) this.metadata.set("authorization", `Bearer ${options.apiKey}`);
  }

  private deadline(timeoutMs?: number): grpc.CallOptions {
    return { deadline: Date.now() + (timeoutMs ?? this.timeoutMs) };
  }

  private unary<T>(method: string, request: object, timeoutMs?: number): Promise<T> {
    return new Promise((resolve, reject) => {
      this.stub[method](request, this.metadata, this.deadline(timeoutMs), (err: unknown, response: T) =>
        err ? reject(toRolloutError(err)) : resolve(response),
      );
    });
  }

  /** One Completion per prompt, in batch order (text prompts first, then token-id prompts). */
  async generate(options: GenerateOptions): Promise<Completion[]> {
    const request = {
      prompts: [
        ...(options.prompts ?? []).map((text) => ({ text })),
        ...(options.promptTokenIds ?? []).map((tokenIds) => ({ tokenIds })),
      ],
      sampling: options.sampling ?? {},
      requestId: options.requestId ?? "",
      sessionId: options.sessionId ?? "",
    };
    const response = await this.unary<Raw>("Generate", request, options.timeoutMs);
    return response.completions.map(completionFrom);
  }

  /** Model, settings, current weight version, replicas and counters. */
  async status(timeoutMs?: number): Promise<Status> {
    const s = await this.unary<Raw>("GetStatus", {}, timeoutMs);
    return {
      model: s.model,
      quantization: s.quantization,
      dtype: s.dtype,
      weightVersion: s.weightVersion,
      replicaVersions: s.replicaVersions ?? {},
      committedVersion: s.committedVersion ?? 0,
      maxModelLen: s.maxModelLen,
      vocabSize: s.vocabSize,
      logprobsMode: s.logprobsMode,
      replicas: s.replicas,
      engineVersion: s.engineVersion,
      uptimeS: s.uptimeS,
      counters: s.counters ?? {},
      inflightPolicy: s.inflightPolicy,
    };
  }

  /** The committed versions the weight store keeps, newest first: those a delta push may name as its base. */
  async listVersions(timeoutMs?: number): Promise<StoredVersion[]> {
    const r = await this.unary<Raw>("ListVersions", {}, timeoutMs);
    return r.versions.map((v: Raw) => ({
      version: v.version, label: v.label, committedAt: v.committedAt, tensors: v.tensors, bytes: v.bytes,
    }));
  }

  /**
   * Stream new weights (any iterable or async iterable of [name, Tensor]) into the server; resolves
   * once they serve as the new version. Each tensor is declared (with its CRC-32) just before its
   * chunks, so a generator producing tensors one at a time is sent without a second copy. Backpressure
   * is respected. Never retried: a push refused or failed before its commit changed nothing, but
   * after a deadline or a lost connection it may have committed: read status() before pushing again.
   */
  async push(
    weights: Iterable<[string, Tensor]> | AsyncIterable<[string, Tensor]>,
    options: PushOptions = {},
  ): Promise<PushResult> {
    const chunkBytes = options.chunkBytes ?? DEFAULT_CHUNK_BYTES;
    if (!(chunkBytes > 0)) throw new RangeError(`chunkBytes=${chunkBytes} must be positive`);
    const started = performance.now();
    let resolveCall!: (r: Raw) => void;
    let rejectCall!: (e: RolloutError) => void;
    const done = new Promise<Raw>((resolve, reject) => {
      resolveCall = resolve;
      rejectCall = reject;
    });
    const call: grpc.ClientWritableStream<object> = this.stub.PushWeights(
      this.metadata,
      this.deadline(options.timeoutMs),
      (err: unknown, response: Raw) => (err ? rejectCall(toRolloutError(err)) : resolveCall(response)),
    );
    const write = (message: object) =>
      new Promise<void>((resolve) => (call.write(message) ? resolve() : call.once("drain", resolve)));
    let failed = false;
    done.catch(() => (failed = true));
    try {
      const header: Raw = { label: options.label ?? "", inflight: options.inflight ?? "" };
      if (options.expectedVersion !== undefined) header.expectedVersion = options.expectedVersion;
      await write({ header });
      let index = 0;
      let sent = 0;
      for await (const [name, tensor] of weights as AsyncIterable<[string, Tensor]>) {
        if (failed) break; // the server already answered with an error
        checkTensor(name, tensor);
        const data = tensor.data;
        const crc32 = (zlib as unknown as { crc32(d: Uint8Array): number }).crc32(data);
        await write({ declare: { tensors: [{ name, dtype: tensor.dtype, shape: tensor.shape, nbytes: data.byteLength, crc32 }] } });
        for (let offset = 0; offset < data.byteLength; offset += chunkBytes) {
          const piece = data.subarray(offset, Math.min(offset + chunkBytes, data.byteLength));
          await write({ chunk: { tensorIndex: index, offset, data: Buffer.from(piece.buffer, piece.byteOffset, piece.byteLength) } });
          sent += piece.byteLength;
          options.onProgress?.(sent);
        }
        index += 1;
      }
      if (!failed) await write({ commit: {} });
      call.end();
    } catch (err) {
      call.cancel(); // a bad tensor on our side: the server discards the partial push
      throw err;
    }
    return this.committed(await done, started);
  }

  /**
   * Have the server read a safetensors checkpoint (an object-store URL it reads with its own
   * credentials, e.g. "s3://bucket/step-120/", or a path under its --load-dirs; one file, or a
   * directory with model.safetensors.index.json or model.safetensors) and serve it as the new
   * version, as a push of the same tensors would. Never retried, as a push is not (push()).
   */
  async loadWeights(url: string, options: LoadOptions = {}): Promise<PushResult> {
    const started = performance.now();
    const request: Raw = { url, label: options.label ?? "", inflight: options.inflight ?? "" };
    if (options.expectedVersion !== undefined) request.expectedVersion = options.expectedVersion;
    return this.committed(await this.unary<Raw>("LoadWeights", request, options.timeoutMs), started);
  }

  /**
   * Serve a kept version's weights again, as a new version (committed + 1, labelled
   * "rollback to v<toVersion>"; the versions between stay); resolves once it serves. Needs an admin
   * key. NOT_FOUND (naming the kept versions) for a version listVersions() does not list;
   * FAILED_PRECONDITION for a stale expectedVersion. Never retried, as a push is not (push()): after a
   * deadline it may have committed.
   */
  async rollback(toVersion: number, options: RollbackOptions = {}): Promise<PushResult> {
    const started = performance.now();
    const request: Raw = { toVersion };
    if (options.expectedVersion !== undefined) request.expectedVersion = options.expectedVersion;
    return this.committed(await this.unary<Raw>("Rollback", request, options.timeoutMs), started);
  }

  /** The result of a committed push, load or rollback, once every replica serves it. */
  private async committed(r: Raw, started: number): Promise<PushResult> {
    const warnings: string[] = r.warnings ?? [];
    for (const text of warnings) console.warn(`push committed as version ${r.version}, with a problem: ${text}`);
    const catchingUp: string[] = r.replicasCatchingUp ?? [];
    if (catchingUp.length > 0) {
      // Committed; the version is served once they have it, so the caller's next samples are of it.
      try {
        await this.waitForVersion(r.version, CATCH_UP_WAIT_MS);
      } catch (err) {
        if (!(err instanceof RolloutError)) throw err; // the push is committed: never fail it now
        console.warn(
          `weight version ${r.version} is committed, but replica(s) ${catchingUp.join(", ")} still load it ` +
            `from the weight store (${err.details}); they serve older samples until then`,
        );
      }
    }
    return {
      version: r.version,
      bytesReceived: r.bytesReceived,
      tensorsApplied: r.tensorsApplied,
      receiveS: r.receiveS,
      requantizeS: r.requantizeS,
      applyS: r.applyS,
      pauseMs: r.pauseMs,
      drainMs: r.drainMs,
      samplesInFlight: r.samplesInFlight,
      replicasCatchingUp: catchingUp,
      warnings,
      label: r.label,
      seconds: (performance.now() - started) / 1000,
    };
  }

  /**
   * Resolve once the server serves weight version >= `version` on every replica (for example a
   * version pushed by another process), with that status; DEADLINE_EXCEEDED after `timeoutMs`.
   */
  async waitForVersion(version: number, timeoutMs = 300_000, pollMs = WAIT_POLL_MS): Promise<Status> {
    const deadline = Date.now() + timeoutMs;
    for (;;) {
      const status = await this.status(Math.max(deadline - Date.now(), MIN_STATUS_TIMEOUT_MS));
      if (status.weightVersion >= version) return status;
      if (Date.now() + pollMs > deadline) {
        throw new RolloutError(
          grpc.status.DEADLINE_EXCEEDED,
          `weight version ${version} not served after ${timeoutMs / 1000} s (serving ${status.weightVersion})`,
        );
      }
      await new Promise((resolve) => setTimeout(resolve, pollMs));
    }
  }

  close(): void {
    this.stub.close();
  }
}
