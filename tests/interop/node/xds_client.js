// The @grpc/grpc-js xDS client driver of tests/e2e/test_xds_grpc_js.py.
//
//   GRPC_XDS_BOOTSTRAP=FILE node tests/interop/node/xds_client.js TARGET METHOD CALLS
//
// Registers @grpc/grpc-js-xds (the xds: resolver and its balancers), makes
// CALLS sequential unary calls with raw Buffer messages to METHOD on TARGET
// (`xds:///oap`), the first waiting for the channel to be ready, and prints
// one JSON line: {"ok": n, "failed": n, "errors": ["CODE details", ...]}.
// Both packages come from .tools/node (NODE_PATH), put there by
// scripts/install-interop-peers.
'use strict';

const grpc = require('@grpc/grpc-js');
const xds = require('@grpc/grpc-js-xds');

const identity = (buffer) => buffer;

function call(client, method, first) {
  return new Promise((resolve) => {
    const deadline = new Date(Date.now() + (first ? 20000 : 5000));
    client.makeUnaryRequest(
      method,
      identity,
      identity,
      Buffer.from('x'),
      new grpc.Metadata({ waitForReady: first }),
      { deadline },
      (error) => resolve(error),
    );
  });
}

async function main() {
  const [target, method, calls] = process.argv.slice(2);
  xds.register();
  const client = new grpc.Client(target, grpc.credentials.createInsecure());
  const result = { ok: 0, failed: 0, errors: [] };
  for (let i = 0; i < Number(calls); i++) {
    const error = await call(client, method, i === 0);
    if (error) {
      result.failed++;
      if (result.errors.length < 10) result.errors.push(`${grpc.status[error.code]} ${error.details}`);
    } else {
      result.ok++;
    }
  }
  client.close();
  process.stdout.write(JSON.stringify(result) + '\n');
  process.exit(0);
}

main().catch((error) => {
  process.stderr.write(String(error && error.stack ? error.stack : error) + '\n');
  process.exit(1);
});
