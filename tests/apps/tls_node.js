// An HTTPS server and client in one Node.js process (its OpenSSL is linked into the node
// executable). The server answers /users/N by calling nothing; the client, on a keep-alive
// agent, makes the test's requests when a line arrives on stdin.
//
//   node tls_node.js CERT KEY PORT
'use strict';
const https = require('https');
const fs = require('fs');
const readline = require('readline');

const [cert, key, port] = process.argv.slice(2);
const server = https.createServer({ cert: fs.readFileSync(cert), key: fs.readFileSync(key) }, (req, res) => {
  req.resume();
  req.on('end', () => {
    res.writeHead(req.url.startsWith('/users/') ? 200 : 404, { 'content-type': 'application/json' });
    res.end('{"ok":true}');
  });
});
const agent = new https.Agent({ keepAlive: true, maxSockets: 1, rejectUnauthorized: false });

function get(path, headers) {
  return new Promise((resolve, reject) => {
    const req = https.get({ host: '127.0.0.1', port: Number(port), path, agent, headers }, (res) => {
      res.resume();
      res.on('end', () => resolve(res.statusCode));
    });
    req.on('error', reject);
  });
}

server.listen(Number(port), '127.0.0.1', async () => {
  await get('/warmup', {});
  console.log('ready');
  const lines = readline.createInterface({ input: process.stdin });
  let step = 0;
  lines.on('line', async () => {
    step += 1;
    if (step === 1) {
      const codes = [
        await get('/users/1', {}),
        await get('/users/2', { traceparent: '00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01' }),
        await get('/users/3', { authorization: 'Bearer PLANTED-SECRET-7f3a' }),
      ];
      console.log(codes.every((c) => c === 200) ? 'done' : `failed ${codes}`);
    } else {
      process.exit(0);
    }
  });
});
