// What a node program does: files in /tmp, child processes, worker threads, an HTTP
// server and client over 127.0.0.1, crypto, zlib, timers, streams. One line per step.
'use strict';
const assert = require('node:assert');
const childProcess = require('node:child_process');
const crypto = require('node:crypto');
const fs = require('node:fs');
const http = require('node:http');
const os = require('node:os');
const path = require('node:path');
const { Worker } = require('node:worker_threads');
const zlib = require('node:zlib');

async function main() {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'compat-'));
  fs.writeFileSync(path.join(dir, 'a.txt'), 'hello\n');
  fs.symlinkSync('a.txt', path.join(dir, 'link'));
  console.log('fs:', fs.readFileSync(path.join(dir, 'link'), 'utf8').trim(),
              fs.readdirSync(dir).sort().join(','));
  await fs.promises.rm(dir, { recursive: true });

  console.log('execSync:', childProcess.execSync('echo $((6 * 7))').toString().trim());
  const child = childProcess.spawn('sh', ['-c', 'read x; echo "got $x"; exit 5'],
                                   { stdio: ['pipe', 'pipe', 'inherit'] });
  child.stdin.end('piped\n');
  let out = '';
  child.stdout.on('data', (d) => { out += d; });
  const code = await new Promise((resolve) => child.on('close', resolve));
  console.log('spawn:', out.trim(), 'exit', code);

  const sum = await new Promise((resolve, reject) => {
    const w = new Worker('const { parentPort } = require("node:worker_threads");' +
                         'parentPort.postMessage([1, 2, 3, 4].reduce((a, b) => a + b));',
                         { eval: true });
    w.on('message', resolve);
    w.on('error', reject);
  });
  console.log('worker:', sum);

  const server = http.createServer((req, res) => res.end(`you asked for ${req.url}`));
  await new Promise((resolve) => server.listen(0, '127.0.0.1', resolve));
  const { port } = server.address();
  const body = await (await fetch(`http://127.0.0.1:${port}/compat`)).text();
  server.close();
  console.log('http:', body);

  console.log('crypto:', crypto.createHash('sha256').update('sandbox').digest('hex').slice(0, 16),
              crypto.randomBytes(8).length);
  const packed = zlib.gzipSync(Buffer.from('x'.repeat(1000)));
  console.log('zlib:', zlib.gunzipSync(packed).length);
  await new Promise((resolve) => setTimeout(resolve, 20));
  console.log('timers: ok');
  assert.strictEqual(os.EOL, '\n');
  console.error('to stderr');
  process.exitCode = 3;
}

main();
