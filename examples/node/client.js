#!/usr/bin/env node
// A Node.js client of the Chiron router (service chiron.v1.Router in protos/chiron/v1/router.proto).
//
// Loads the .proto files at run time with @grpc/proto-loader (no generated code), then:
//   1. Generate: one interactive request; prints its tokens as they stream, and the time to first token;
//   2. Submit:   one batch request (SLO class "batch"), stored in the global queue;
//   3. GetResult for the submitted request: its state and queue position.
// The last line on stdout is a JSON summary for scripts and tests:
//   {"generate_tokens": N, "finish_reason": "...", "submitted": "<id>", "state": "...", ...}
// On an RPC error it prints "<Rpc> failed: <STATUS_NAME> (<code>): <details>" on stderr, a JSON line with
// an "error" object on stdout, and exits with 2 (1 for bad command-line arguments).
//
// Usage: node examples/node/client.js [ADDRESS] [options]     (ADDRESS defaults to 127.0.0.1:50050)
//   ADDRESS may list several routers (stateless, interchangeable), separated by commas: a call that fails with
//   UNAVAILABLE at one is made at the next (Generate only before its first message: tokens are never repeated);
//   every channel reconnects at least once a second, so a restarted router is used again at once.
//   --model NAME         model to ask for (default: $CHIRON_MODEL, else llama-3-8b)
//   --max-tokens N       output tokens wanted (default 16)
//   --prompt-tokens N    prompt length; the prompt is the token ids 1..N (default 32)
//   --slo-class NAME     SLO class of the Generate request (default "interactive")
//   --timeout-ms N       deadline of each RPC (default 30000)
//   --quiet              print only the JSON summary (and errors)
// Security, from the environment like every chiron client (services/common/security.py):
//   CHIRON_TOKEN                                  sent as "authorization: Bearer <token>" on every call
//   CHIRON_TLS_CA, CHIRON_TLS_CERT, CHIRON_TLS_KEY TLS (CA to verify the router; certificate and key for mutual TLS)
//   CHIRON_TLS_SERVER_NAME                        the name expected in the router's certificate, if not ADDRESS's host
"use strict";

const fs = require("node:fs");
const path = require("node:path");
const grpc = require("@grpc/grpc-js");
const protoLoader = require("@grpc/proto-loader");

const PROTO_DIR = path.resolve(__dirname, "..", "..", "protos");

function usage(message) {
  if (message) console.error(`error: ${message}`);
  console.error("usage: node examples/node/client.js [ADDRESS] [--model NAME] [--max-tokens N] [--prompt-tokens N] " +
    "[--slo-class NAME] [--timeout-ms N] [--quiet]");
  process.exit(message ? 1 : 0);
}

function parseArgs(argv) {
  const opts = {
    address: "127.0.0.1:50050",
    model: process.env.CHIRON_MODEL || "llama-3-8b",
    maxTokens: 16,
    promptTokens: 32,
    sloClass: "interactive",
    timeoutMs: 30000,
    quiet: false,
  };
  const ints = { "--max-tokens": "maxTokens", "--prompt-tokens": "promptTokens", "--timeout-ms": "timeoutMs" };
  const strings = { "--model": "model", "--slo-class": "sloClass" };
  let positional = 0;
  for (let i = 0; i < argv.length; i++) {
    const arg = argv[i];
    if (arg === "-h" || arg === "--help") usage();
    if (arg === "--quiet") {
      opts.quiet = true;
    } else if (arg in ints || arg in strings) {
      if (i + 1 >= argv.length) usage(`${arg} needs a value`);
      const value = argv[++i];
      if (arg in strings) {
        opts[strings[arg]] = value;
      } else {
        // Deliberately lenient (0 is accepted): the router, not the client, validates requests.
        if (!/^\d+$/.test(value)) usage(`${arg} wants a non-negative integer, got ${JSON.stringify(value)}`);
        opts[ints[arg]] = Number(value);
      }
    } else if (arg.startsWith("-")) {
      usage(`unknown option ${arg}`);
    } else if (positional++ === 0) {
      opts.address = arg;
    } else {
      usage(`unexpected argument ${JSON.stringify(arg)}`);
    }
  }
  return opts;
}

function loadRouterService() {
  const definition = protoLoader.loadSync("chiron/v1/router.proto", {
    includeDirs: [PROTO_DIR],
    keepCase: true, // field names as in the .proto (max_tokens, not maxTokens)
    longs: String, // int64/uint64 as decimal strings (no precision loss); converted where needed
    enums: String, // enum values by name, e.g. "FINISH_REASON_LENGTH"
    defaults: true, // unset fields show their default value
    oneofs: true,
  });
  return grpc.loadPackageDefinition(definition).chiron.v1.Router;
}

function statusName(code) {
  return Object.keys(grpc.status).find((k) => grpc.status[k] === code) || String(code);
}

class RpcFailure extends Error {
  constructor(rpc, err) {
    super(`${rpc} failed: ${statusName(err.code)} (${err.code}): ${err.details || err.message}`);
    this.rpc = rpc;
    this.code = err.code;
    this.details = err.details || err.message;
  }
}

// Channel credentials and call metadata from the CHIRON_* variables; plaintext and no metadata when none is set.
function security() {
  const env = process.env;
  const read = (name) => (env[name] ? fs.readFileSync(env[name]) : null);
  const metadata = new grpc.Metadata();
  if (env.CHIRON_TOKEN) metadata.set("authorization", `Bearer ${env.CHIRON_TOKEN}`);
  const tls = env.CHIRON_TLS_CA || env.CHIRON_TLS_CERT;
  const credentials = tls
    ? grpc.credentials.createSsl(read("CHIRON_TLS_CA"), read("CHIRON_TLS_KEY"), read("CHIRON_TLS_CERT"))
    : grpc.credentials.createInsecure();
  const options = env.CHIRON_TLS_SERVER_NAME ? { "grpc.ssl_target_name_override": env.CHIRON_TLS_SERVER_NAME } : {};
  return { credentials, metadata, options };
}

// Reconnect within a second after an address comes back (grpc-js's default backoff grows to two minutes).
const RECONNECT_OPTIONS = { "grpc.initial_reconnect_backoff_ms": 200, "grpc.max_reconnect_backoff_ms": 1000 };

// One client per router address; call(rpc, attempt) runs attempt(client) on the preferred one and, when it fails
// with UNAVAILABLE before any message arrived (err.received false), on the next, each address once.
function failoverClients(Router, addresses, credentials, options, log) {
  const clients = addresses.map((a) => new Router(a, credentials, { ...RECONNECT_OPTIONS, ...options }));
  let preferred = 0;
  return {
    async call(rpc, attempt) {
      let last = null;
      const start = preferred;
      for (let k = 0; k < clients.length; k++) {
        const i = (start + k) % clients.length;
        try {
          const result = await attempt(clients[i]);
          preferred = i;
          return result;
        } catch (err) {
          if (!(err instanceof RpcFailure) || err.code !== grpc.status.UNAVAILABLE || err.received) throw err;
          if (preferred === i) preferred = (i + 1) % clients.length;
          last = err;
          if (k + 1 < clients.length) log(`${rpc} at ${addresses[i]} unavailable (${err.details}); trying the next router`);
        }
      }
      throw last;
    },
    close() {
      for (const c of clients) c.close();
    },
  };
}

function deadline(opts) {
  return new Date(Date.now() + opts.timeoutMs);
}

function inferenceRequest(opts, requestId, sloClass) {
  return {
    request_id: requestId,
    model: opts.model,
    prompt_token_ids: Array.from({ length: opts.promptTokens }, (_, i) => i + 1),
    max_tokens: opts.maxTokens,
    slo: { slo_class: sloClass },
  };
}

// Generate: resolves with a summary once the stream ends; prints tokens as they arrive.
function generate(client, metadata, opts, log, write) {
  return new Promise((resolve, reject) => {
    const requestId = `node-gen-${process.pid}-${Date.now()}`;
    const started = process.hrtime.bigint();
    const out = { tokens: 0, finish_reason: "", instance_id: "", ttft_ms: null, engine_ttft_ms: null, last: null };
    let received = false; // a message arrived: the request is never sent to another router
    const call = client.Generate({ request: inferenceRequest(opts, requestId, opts.sloClass) }, metadata,
      { deadline: deadline(opts) });
    call.on("data", (msg) => {
      received = true;
      const chunk = msg.chunk || {};
      if (msg.instance_id) out.instance_id = msg.instance_id;
      const ids = chunk.token_ids || [];
      if (ids.length > 0 && out.ttft_ms === null) {
        out.ttft_ms = Number(process.hrtime.bigint() - started) / 1e6;
        out.engine_ttft_ms = chunk.ttft_ms;
        log(`first token after ${out.ttft_ms.toFixed(1)} ms (engine-reported TTFT ${chunk.ttft_ms.toFixed(1)} ms) ` +
          `on ${out.instance_id || "?"}`);
      }
      if (ids.length > 0) write(`${out.tokens === 0 ? "tokens:" : ""} ${ids.join(" ")}`); // as they stream
      out.tokens += ids.length;
      if (chunk.finish_reason && chunk.finish_reason !== "FINISH_REASON_UNSPECIFIED") out.finish_reason = chunk.finish_reason;
      out.last = chunk;
    });
    call.on("error", (err) => reject(Object.assign(new RpcFailure("Generate", err), { received })));
    // grpc-js emits "status" once every message has been delivered; a non-OK status also comes as "error".
    call.on("status", (status) => {
      if (status.code === grpc.status.OK) resolve(out);
    });
  }).then((out) => {
    if (out.last && out.last.num_generated_tokens) log(`engine counted ${out.last.num_generated_tokens} generated tokens`);
    log(`Generate done: ${out.tokens} tokens, ${out.finish_reason || "no finish reason"}`);
    return out;
  });
}

function unary(client, metadata, rpc, request, opts) {
  return new Promise((resolve, reject) => {
    client[rpc](request, metadata, { deadline: deadline(opts) }, (err, response) => {
      if (err) reject(new RpcFailure(rpc, err));
      else resolve(response);
    });
  });
}

async function main() {
  const opts = parseArgs(process.argv.slice(2));
  let midLine = false; // a streamed token line not yet ended (an error may cut the stream short)
  const endLine = () => { if (midLine) process.stdout.write("\n"); midLine = false; };
  const write = opts.quiet ? () => {} : (text) => { process.stdout.write(text); midLine = !text.endsWith("\n"); };
  const log = opts.quiet ? () => {} : (line) => { endLine(); console.log(line); };
  const Router = loadRouterService();
  const { credentials, metadata, options } = security();
  const addresses = opts.address.split(",").map((a) => a.trim()).filter((a) => a);
  if (addresses.length === 0) usage("ADDRESS lists no router");
  const routers = failoverClients(Router, addresses, credentials, options, log);
  try {
    log(`router ${addresses.join(", ")}, model ${opts.model}`);
    const gen = await routers.call("Generate", (client) => generate(client, metadata, opts, log, write));

    const batch = inferenceRequest(opts, `node-batch-${process.pid}-${Date.now()}`, "batch");
    const submitted = await routers.call("Submit", (client) => unary(client, metadata, "Submit", { request: batch }, opts));
    log(`Submit: request ${submitted.request_id} in group ${submitted.group_id}`);

    const { result } = await routers.call("GetResult", (client) =>
      unary(client, metadata, "GetResult", { request_id: submitted.request_id }, opts));
    const position = Number(result.position); // int64, loaded as a string
    const secs = (s) => (Number.isFinite(s) ? `${s.toFixed(1)} s` : "unknown"); // no drain rate seen yet: infinite
    log(`GetResult: ${result.state}, position ${position}, estimated wait ${secs(result.estimated_wait_mean_s)} ` +
      `(p95 ${secs(result.estimated_wait_p95_s)})`);

    endLine();
    console.log(JSON.stringify({
      generate_tokens: gen.tokens,
      finish_reason: gen.finish_reason,
      instance_id: gen.instance_id,
      ttft_ms: gen.ttft_ms,
      engine_ttft_ms: gen.engine_ttft_ms,
      submitted: submitted.request_id,
      group_id: submitted.group_id,
      state: result.state,
      position,
    }));
    return 0;
  } catch (err) {
    if (!(err instanceof RpcFailure)) throw err;
    endLine();
    console.error(err.message);
    console.log(JSON.stringify({ error: { rpc: err.rpc, code: statusName(err.code), details: err.details } }));
    return 2;
  } finally {
    routers.close();
  }
}

main().then(
  (code) => { process.exitCode = code; },
  (err) => { console.error(err && err.stack ? err.stack : err); process.exitCode = 1; },
);
