#!/usr/bin/env node
// example.external-node: an external sandboxer plugin in Node.js, with no sandboxer code.
//
// It speaks the wire protocol (DESIGN section 7) by hand: newline-delimited JSON-RPC 2.0 over
// the connected Unix socket the host passes as fd 3. The plugin speaks first (the handshake,
// carrying the cookie from SANDBOXER_MAGIC_COOKIE), waits for the host's answer, then serves
// requests. Requests are handled concurrently: `sleep` answers from a timer while other calls
// go on. It exits when the host sends sandboxer.shutdown (after the answer is written) or
// closes the socket.
//
//   greet(name)  -> "Hello, NAME!"  (greeting from init's config, default "Hello")
//   add(a, b)    -> a + b
//   sleep(ms)    -> ms, after ms milliseconds (0..60000)
//   increment()  -> the counter after adding one; the counter is the hot-reload state
'use strict';

const net = require('net');

const RPC_FD = 3;
const MAX_FRAME = 16 * 1024 * 1024;
const PLUGIN = { name: 'node-hello', version: '1.0.0' };
const METHODS = ['greet', 'add', 'sleep', 'increment'];

const PARSE_ERROR = -32700;
const INVALID_REQUEST = -32600;
const METHOD_NOT_FOUND = -32601;
const INVALID_PARAMS = -32602;

let greeting = 'Hello';
let counter = 0;

class RpcError extends Error {
  constructor(code, message) {
    super(message);
    this.code = code;
  }
}

function die(message) {
  process.stderr.write(`node-hello: ${message}\n`);
  process.exit(1);
}

const cookie = process.env.SANDBOXER_MAGIC_COOKIE;
if (!cookie) {
  die('this is a sandboxer plugin; load it with sandboxer (SANDBOXER_MAGIC_COOKIE is not set)');
}

let sock;
try {
  sock = new net.Socket({ fd: RPC_FD, readable: true, writable: true });
} catch (err) {
  die(`fd ${RPC_FD} is not the host's socket: ${err.message}`);
}
sock.on('error', (err) => die(`socket error: ${err.message}`));
sock.on('end', () => process.exit(0)); // the host closed the connection

function send(message, callback) {
  sock.write(JSON.stringify(message) + '\n', callback);
}

function log(level, message) {
  send({ jsonrpc: '2.0', method: 'sandboxer.log', params: { level, message } });
}

function expectParams(params, count, what) {
  if (!Array.isArray(params) || params.length !== count) {
    throw new RpcError(INVALID_PARAMS, what);
  }
  return params;
}

function isNumber(x) {
  return typeof x === 'number' && Number.isFinite(x);
}

// Each handler returns a value or a Promise of one; throwing RpcError answers an error.
const handlers = {
  greet(params) {
    const [name] = expectParams(params, 1, 'greet takes one argument: a name (string)');
    if (typeof name !== 'string') throw new RpcError(INVALID_PARAMS, 'greet: name must be a string');
    return `${greeting}, ${name}!`;
  },
  add(params) {
    const [a, b] = expectParams(params, 2, 'add takes two arguments: numbers');
    if (!isNumber(a) || !isNumber(b)) throw new RpcError(INVALID_PARAMS, 'add: both arguments must be numbers');
    return a + b;
  },
  sleep(params) {
    const [ms] = expectParams(params, 1, 'sleep takes one argument: milliseconds');
    if (!isNumber(ms) || ms < 0 || ms > 60000) throw new RpcError(INVALID_PARAMS, 'sleep: ms must be 0..60000');
    return new Promise((resolve) => setTimeout(() => resolve(ms), ms));
  },
  increment(params) {
    expectParams(params, 0, 'increment takes no arguments');
    counter += 1;
    return counter;
  },
  'sandboxer.init'(params) {
    const [config] = expectParams(params, 1, 'sandboxer.init takes one argument: the config object');
    if (config === null || typeof config !== 'object' || Array.isArray(config)) {
      throw new RpcError(INVALID_PARAMS, 'sandboxer.init: config must be an object');
    }
    if (config.greeting !== undefined) {
      if (typeof config.greeting !== 'string') throw new RpcError(INVALID_PARAMS, 'config.greeting must be a string');
      greeting = config.greeting;
    }
    log('info', `initialised; greeting is ${JSON.stringify(greeting)}`);
    return null;
  },
  'sandboxer.health'(params) {
    expectParams(params, 0, 'sandboxer.health takes no arguments');
    return { ok: true, message: '' };
  },
  'sandboxer.export_state'(params) {
    expectParams(params, 0, 'sandboxer.export_state takes no arguments');
    return { counter };
  },
  'sandboxer.import_state'(params) {
    const [state, fromVersion] = expectParams(params, 2, 'sandboxer.import_state takes (state, from_version)');
    if (state === null || typeof state !== 'object' || !Number.isSafeInteger(state.counter)) {
      throw new RpcError(INVALID_PARAMS, 'sandboxer.import_state: state must be {"counter": integer}');
    }
    counter = state.counter;
    log('info', `imported counter ${counter} from version ${fromVersion}`);
    return null;
  },
};

async function handleRequest(msg) {
  const { id, method, params } = msg;
  if (method === 'sandboxer.shutdown') {
    // Answer, and exit only once the answer has been handed to the kernel.
    send({ jsonrpc: '2.0', id, result: null }, () => process.exit(0));
    return;
  }
  const handler = Object.prototype.hasOwnProperty.call(handlers, method) ? handlers[method] : null;
  try {
    if (!handler) throw new RpcError(METHOD_NOT_FOUND, `no such method: ${method}`);
    const result = await handler(params === undefined ? [] : params);
    send({ jsonrpc: '2.0', id, result: result === undefined ? null : result });
  } catch (err) {
    const code = err instanceof RpcError ? err.code : 1;
    send({ jsonrpc: '2.0', id, error: { code, message: err.message } });
  }
}

function handleMessage(msg) {
  if (msg === null || typeof msg !== 'object' || msg.jsonrpc !== '2.0' || typeof msg.method !== 'string') {
    send({ jsonrpc: '2.0', id: null, error: { code: INVALID_REQUEST, message: 'not a JSON-RPC 2.0 request' } });
    return;
  }
  if (msg.id === undefined) {
    // Notifications: sandboxer.cancel (and anything else) needs no answer; a sleep runs out.
    return;
  }
  handleRequest(msg);
}

let handshakeDone = false;

function handleHandshakeReply(msg) {
  if (!msg || msg.id !== 0 || msg.method !== undefined) die(`expected the handshake reply, got ${JSON.stringify(msg)}`);
  if (msg.error) die(`handshake refused: ${JSON.stringify(msg.error)}`);
  if (!msg.result || msg.result.protocol !== 1) die(`handshake: unexpected reply ${JSON.stringify(msg)}`);
  handshakeDone = true;
}

let pending = '';
sock.setEncoding('utf8');
sock.on('data', (chunk) => {
  pending += chunk;
  let newline;
  while ((newline = pending.indexOf('\n')) >= 0) {
    const line = pending.slice(0, newline);
    pending = pending.slice(newline + 1);
    if (line.trim() === '') continue;
    let msg;
    try {
      msg = JSON.parse(line);
    } catch (err) {
      if (!handshakeDone) die(`handshake: the host sent invalid JSON: ${err.message}`);
      send({ jsonrpc: '2.0', id: null, error: { code: PARSE_ERROR, message: `invalid JSON: ${err.message}` } });
      continue;
    }
    if (!handshakeDone) handleHandshakeReply(msg);
    else handleMessage(msg);
  }
  if (pending.length > MAX_FRAME) die("a frame from the host exceeds the 16 MiB frame limit");
});

send({
  jsonrpc: '2.0',
  id: 0,
  method: 'sandboxer.handshake',
  params: { cookie, protocols: [1], plugin: PLUGIN, methods: METHODS },
});
