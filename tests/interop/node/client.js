// The @grpc/grpc-js client driver of the agent-shim interop tests.
//
//   node tests/interop/node/client.js --target HOST:PORT --plan JSON
//
// Runs the plan (tests/interop/protocol.py, docs/interop.md) against the
// target with raw Buffer messages (identity serializers, no protos) and prints
// one JSON result line. @grpc/grpc-js comes from .tools/node (NODE_PATH), put
// there by scripts/install-interop-peers.
'use strict';

const crypto = require('crypto');
const grpc = require('@grpc/grpc-js');

const UNARY = '/interop.Echo/Unary';
const SERVER_STREAM = '/interop.Echo/ServerStream';
const CLIENT_STREAM = '/interop.Echo/ClientStream';
const BIDI = '/interop.Echo/Bidi';
const MAX_MESSAGE_BYTES = 64 * 1024 * 1024;
const MAX_TEXT_BYTES = 64 * 1024;
const STATE_NAMES = ['IDLE', 'CONNECTING', 'READY', 'TRANSIENT_FAILURE', 'SHUTDOWN'];

const identity = (buffer) => buffer;
const utf8 = new TextDecoder('utf-8', { fatal: true });
const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

function pattern(size, seed) {
  const buffer = Buffer.allocUnsafe(size);
  for (let i = 0; i < size; i++) buffer[i] = (i + seed) & 0xff;
  return buffer;
}

function messageBytes(spec) {
  if (spec.text !== undefined) return Buffer.from(spec.text, 'utf8');
  return pattern(spec.size, spec.seed);
}

function describe(buffer) {
  const info = {
    len: buffer.length,
    sha256: crypto.createHash('sha256').update(buffer).digest('hex'),
  };
  if (buffer.length <= MAX_TEXT_BYTES) {
    try {
      info.text = utf8.decode(buffer);
    } catch (_) {
      // not UTF-8: no text
    }
  }
  return info;
}

function mdJson(metadata) {
  const out = {};
  if (!metadata) return out;
  for (const [key, values] of Object.entries(metadata.toJSON())) {
    out[key] = values.map((v) => (Buffer.isBuffer(v) ? v.toString('hex') : String(v)));
  }
  return out;
}

function wireMetadata(pairs) {
  const metadata = new grpc.Metadata();
  for (const [key, value] of pairs || []) {
    metadata.add(key, key.endsWith('-bin') ? Buffer.from(value, 'hex') : value);
  }
  return metadata;
}

// Events of one call as awaitables: headers, messages in order, the status.
class Observed {
  constructor(call, readable) {
    this.call = call;
    this.headers = {};
    this.queue = [];
    this.waiters = [];
    this.finished = !readable; // no more messages
    this.status = null;
    call.on('metadata', (md) => {
      this.headers = mdJson(md);
    });
    this.statusPromise = new Promise((resolve) => {
      call.on('status', (status) => {
        this.status = status;
        resolve(status);
        this.end();
      });
    });
    call.on('error', () => {}); // the status event carries it
    if (readable) {
      call.on('data', (message) => {
        const waiter = this.waiters.shift();
        if (waiter) waiter(message);
        else this.queue.push(message);
      });
      call.on('end', () => this.end());
    }
  }

  end() {
    this.finished = true;
    for (const waiter of this.waiters.splice(0)) waiter(null);
  }

  // The next message, or null once the stream has ended.
  next() {
    if (this.queue.length) return Promise.resolve(this.queue.shift());
    if (this.finished) return Promise.resolve(null);
    return new Promise((resolve) => this.waiters.push(resolve));
  }

  // Writes one message, waiting for flow control; false once the call ended.
  async write(message) {
    if (this.status) return false;
    let flushed;
    try {
      flushed = this.call.write(message);
    } catch (_) {
      return false;
    }
    if (!flushed && !this.status) {
      await Promise.race([
        new Promise((resolve) => this.call.once('drain', resolve)),
        this.statusPromise,
      ]);
    }
    return !this.status;
  }
}

async function runCall(client, spec) {
  const method = spec.method;
  const metadata = wireMetadata(spec.metadata);
  const options = { deadline: new Date(Date.now() + (spec.timeout_ms || 10000)) };
  const messages = (spec.messages || []).map(messageBytes);
  const cancelAfter = spec.cancel_after === undefined ? -1 : spec.cancel_after;
  const halfClose = spec.half_close !== false;
  const received = [];
  const result = { name: spec.name, method };
  let cancelled = false;
  let observed;
  let unaryReply = null;

  const got = (message) => {
    received.push(message);
    if (cancelAfter >= 0 && received.length === cancelAfter) {
      observed.call.cancel();
      cancelled = true;
    }
  };

  try {
    if (method === UNARY || method === CLIENT_STREAM) {
      let replied;
      const reply = new Promise((resolve) => {
        replied = (err, value) => resolve(err ? null : value);
      });
      if (method === UNARY) {
        const call = client.makeUnaryRequest(
          method, identity, identity, messages[0], metadata, options, replied);
        observed = new Observed(call, false);
      } else {
        const call = client.makeClientStreamRequest(
          method, identity, identity, metadata, options, replied);
        observed = new Observed(call, false);
        for (let i = 0; i < messages.length; i++) {
          if (i && spec.interval_ms) await sleep(spec.interval_ms);
          if (!(await observed.write(messages[i]))) break;
        }
        if (!observed.status && halfClose) observed.call.end();
      }
      unaryReply = await reply;
      if (unaryReply) received.push(unaryReply);
    } else if (method === SERVER_STREAM) {
      const call = client.makeServerStreamRequest(
        method, identity, identity, messages[0], metadata, options);
      observed = new Observed(call, true);
      let message;
      while (!cancelled && (message = await observed.next()) !== null) got(message);
    } else {
      const call = client.makeBidiStreamRequest(method, identity, identity, metadata, options);
      observed = new Observed(call, true);
      let ended = false;
      for (let i = 0; i < messages.length; i++) {
        if (i && spec.interval_ms) await sleep(spec.interval_ms);
        if (!(await observed.write(messages[i]))) {
          ended = true;
          break;
        }
        if (spec.pingpong) {
          const reply = await observed.next();
          if (reply === null) {
            ended = true;
            break;
          }
          got(reply);
          if (cancelled) break;
        }
      }
      if (!ended && !cancelled && cancelAfter >= 0 && received.length >= cancelAfter) {
        observed.call.cancel();
        cancelled = true;
      }
      if (!ended && !cancelled && halfClose) observed.call.end();
      let message;
      while (!cancelled && (message = await observed.next()) !== null) got(message);
    }
  } catch (err) {
    result.error = String(err && err.stack ? err.stack : err);
  }
  const status = await observed.statusPromise;
  result.code = status.code;
  result.details = status.details || '';
  result.headers = observed.headers;
  result.trailers = mdJson(status.metadata);
  result.sent = messages.map(describe);
  result.received = received.map(describe);
  return result;
}

function watchStates(client, states) {
  const channel = client.getChannel();
  let current = channel.getConnectivityState(false);
  let stopped = false;
  const watch = () => {
    channel.watchConnectivityState(current, Date.now() + 600000, (err) => {
      if (stopped) return;
      if (!err) {
        current = channel.getConnectivityState(false);
        states.push(STATE_NAMES[current] || String(current));
      }
      watch();
    });
  };
  watch();
  return () => {
    stopped = true;
  };
}

async function runCalls(client, plan) {
  const specs = plan.calls || [];
  if (plan.parallel) {
    return { calls: await Promise.all(specs.map((spec) => runCall(client, spec))) };
  }
  const results = [];
  const states = [];
  let stopWatching = null;
  for (const spec of specs) {
    if (!spec.method) {
      await sleep(spec.sleep_ms || 0);
      continue;
    }
    results.push(await runCall(client, spec));
    if (plan.watch_state && !stopWatching) stopWatching = watchStates(client, states);
  }
  const out = { calls: results };
  if (stopWatching) {
    stopWatching();
    out.states = states;
    out.final_state = STATE_NAMES[client.getChannel().getConnectivityState(false)];
  }
  return out;
}

// Every stream open at once: each waits for its first echo, and only when all
// have theirs does each send its second message and half-close.
async function runStreams(client, plan) {
  const n = plan.streams;
  const options = { deadline: new Date(Date.now() + (plan.timeout_ms || 60000)) };
  let waiting = n;
  let firstEchoes = 0;
  let openAll;
  const allOpen = new Promise((resolve) => {
    openAll = resolve;
  });
  const arrive = () => {
    waiting -= 1;
    if (waiting === 0) openAll();
  };

  const one = async (i) => {
    const id = `${plan.id_prefix}-${i}`;
    const call = client.makeBidiStreamRequest(
      BIDI, identity, identity, wireMetadata([['x-call-id', id]]), options);
    const observed = new Observed(call, true);
    let arrived = false;
    const failure = async (step, extra) => {
      if (!arrived) arrive();
      arrived = true;
      call.cancel();
      const status = await observed.statusPromise;
      return { failure: { index: i, step, code: status.code, details: status.details, ...extra } };
    };
    for (let round = 0; round < 2; round++) {
      const want = Buffer.from(`${id}-${round}`);
      if (!(await observed.write(want))) return failure('send');
      const got = await observed.next();
      if (got === null) return failure('recv');
      if (!got.equals(want)) return failure('echo', { got: got.toString() });
      if (round === 0) {
        firstEchoes += 1;
        arrived = true;
        arrive();
        await allOpen;
      }
    }
    call.end();
    if ((await observed.next()) !== null) return failure('eof');
    const status = await observed.statusPromise;
    if (status.code !== 0) return failure('status');
    return { backend: (observed.headers['x-backend'] || [''])[0] };
  };

  const outcomes = await Promise.all(Array.from({ length: n }, (_, i) => one(i)));
  const backends = {};
  const failures = [];
  let ok = 0;
  for (const outcome of outcomes) {
    if (outcome.failure) {
      if (failures.length < 10) failures.push(outcome.failure);
    } else {
      ok += 1;
      backends[outcome.backend] = (backends[outcome.backend] || 0) + 1;
    }
  }
  return { streams: n, first_echoes: firstEchoes, ok, failures, backends };
}

function loopCall(plan, k) {
  const id = `${plan.id_prefix}-${k}`;
  const unary = k % 2 === 0;
  return {
    name: id,
    method: unary ? UNARY : CLIENT_STREAM,
    metadata: [['x-call-id', id], ['x-sleep-ms', String(plan.sleep_ms)]],
    messages: Array(unary ? 1 : 3).fill({ text: id }),
    timeout_ms: 20000,
  };
}

// Unary and client-streaming calls in turn from `concurrency` workers until
// stdin closes (or max_seconds / max_calls).
async function runLoop(client, plan) {
  let stopped = false;
  process.stdin.on('end', () => {
    stopped = true;
  });
  process.stdin.on('error', () => {
    stopped = true;
  });
  process.stdin.resume();
  const giveUp = Date.now() + plan.max_seconds * 1000;
  let counter = 0;
  let total = 0;
  let ok = 0;
  let reason = 'stdin closed';
  const failures = [];
  const backends = {};
  const worker = async () => {
    while (!stopped) {
      if (Date.now() > giveUp) {
        reason = 'max_seconds';
        return;
      }
      counter += 1;
      if (counter > plan.max_calls) {
        reason = 'max_calls';
        return;
      }
      const result = await runCall(client, loopCall(plan, counter));
      total += 1;
      if (result.code === 0) {
        ok += 1;
        const name = (result.headers['x-backend'] || [''])[0];
        backends[name] = (backends[name] || 0) + 1;
      } else if (failures.length < 10) {
        failures.push({ name: result.name, code: result.code, details: result.details });
      }
    }
  };
  await Promise.all(Array.from({ length: plan.concurrency }, worker));
  process.stdin.pause();
  return { total, ok, failed: total - ok, failures, backends, stop_reason: reason };
}

function channelOptions(plan) {
  const options = {
    'grpc.max_receive_message_length': MAX_MESSAGE_BYTES,
    'grpc.max_send_message_length': MAX_MESSAGE_BYTES,
    'grpc.enable_http_proxy': 0,
  };
  const channel = plan.channel || {};
  if (channel.keepalive_ms) {
    options['grpc.keepalive_time_ms'] = channel.keepalive_ms;
    options['grpc.keepalive_timeout_ms'] = channel.keepalive_timeout_ms || 20000;
    options['grpc.keepalive_permit_without_calls'] = 1;
  }
  return options;
}

function emit(value, code) {
  process.stdout.write(`${JSON.stringify(value)}\n`, () => process.exit(code));
}

async function main() {
  const args = process.argv.slice(2);
  const flag = (name) => {
    const i = args.indexOf(name);
    return i >= 0 ? args[i + 1] : undefined;
  };
  const target = flag('--target');
  let plan;
  try {
    plan = JSON.parse(flag('--plan'));
  } catch (err) {
    emit({ fatal: `bad plan: ${err}` }, 2);
    return;
  }
  const client = new grpc.Client(target, grpc.credentials.createInsecure(), channelOptions(plan));
  let out;
  if (plan.mode === 'calls') out = await runCalls(client, plan);
  else if (plan.mode === 'streams') out = await runStreams(client, plan);
  else if (plan.mode === 'loop') out = await runLoop(client, plan);
  else out = { fatal: `unknown mode ${plan.mode}` };
  client.close();
  out.client = 'node';
  out.mode = plan.mode;
  emit(out, 0);
}

main().catch((err) => emit({ fatal: String(err && err.stack ? err.stack : err) }, 1));
