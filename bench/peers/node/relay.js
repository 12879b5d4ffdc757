'use strict';
// Minimal Node.js relay of the seed API (reference peer for bench/fanout.py).
//
// The seed design, written the idiomatic Node way: a Map of registered clients; a publish loops
// over every client and calls ws.send(message) on those subscribed to the topic (and owned by
// user_id, when one is given). Messages are delivered as raw text, so `?format=raw` is implied.
//
//   node relay.js [--host 127.0.0.1] [--port 8000]      (or HOST / PORT in the environment)
//
// Prints `node-relay listening on http://<host>:<port>` once the socket is bound (--port 0 picks
// a free port).

const crypto = require('node:crypto');
const http = require('node:http');
const { WebSocketServer } = require('ws');
const { parseArgs } = require('../args.js');

/** @type {Map<string, {userId: unknown, topics: Set<string>, ws: import('ws').WebSocket | null}>} */
const clients = new Map();

function sendJson(res, status, body) {
  const data = JSON.stringify(body);
  res.writeHead(status, { 'content-type': 'application/json', 'content-length': Buffer.byteLength(data) });
  res.end(data);
}

function readJson(req, callback) {
  const chunks = [];
  req.on('data', (chunk) => chunks.push(chunk));
  req.on('end', () => {
    let body;
    try {
      body = chunks.length ? JSON.parse(Buffer.concat(chunks).toString('utf8')) : {};
    } catch {
      body = undefined;
    }
    callback(body);
  });
}

function register(req, res) {
  readJson(req, (body) => {
    if (!body || typeof body !== 'object') return sendJson(res, 400, { error: 'invalid JSON' });
    const id = crypto.randomUUID().replaceAll('-', '');
    const topics = Array.isArray(body.topics) ? body.topics : ['cats'];
    clients.set(id, { userId: body.user_id ?? null, topics: new Set(topics), ws: null });
    sendJson(res, 200, { id, url: `ws://${req.headers.host}/ws/${id}` });
  });
}

function publish(req, res) {
  readJson(req, (body) => {
    if (!body || typeof body.topic !== 'string' || typeof body.message !== 'string') {
      return sendJson(res, 400, { error: 'expected {topic, user_id, message}' });
    }
    const userId = body.user_id ?? null;
    let recipients = 0;
    for (const client of clients.values()) {
      if (client.ws === null) continue;
      if (userId !== null && client.userId !== userId) continue;
      if (!client.topics.has(body.topic)) continue;
      client.ws.send(body.message);
      recipients++;
    }
    sendJson(res, 200, { recipients });
  });
}

const server = http.createServer((req, res) => {
  const path = req.url.split('?', 1)[0];
  if (req.method === 'GET' && path === '/health') return sendJson(res, 200, { status: 'ok' });
  if (req.method === 'POST' && path === '/register') return register(req, res);
  if (req.method === 'POST' && path === '/publish') return publish(req, res);
  if (req.method === 'DELETE' && path.startsWith('/register/')) {
    clients.delete(path.slice('/register/'.length));
    return sendJson(res, 200, {});
  }
  return sendJson(res, 404, { error: 'not found' });
});

const wss = new WebSocketServer({ noServer: true });

server.on('upgrade', (req, socket, head) => {
  const path = req.url.split('?', 1)[0];
  const id = path.startsWith('/ws/') ? path.slice('/ws/'.length) : '';
  const client = clients.get(id);
  if (client === undefined) {
    socket.end('HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n');
    return;
  }
  wss.handleUpgrade(req, socket, head, (ws) => {
    client.ws = ws;
    ws.on('message', (data) => {
      try {
        const command = JSON.parse(data.toString('utf8'));
        if (Array.isArray(command.topics)) client.topics = new Set(command.topics);
      } catch {
        // The seed ignores malformed commands.
      }
    });
    ws.on('close', () => clients.delete(id));
    ws.on('error', () => clients.delete(id));
  });
});

const { host, port } = parseArgs(process.argv.slice(2));
server.listen(port, host, () => {
  const address = server.address();
  console.log(`node-relay listening on http://${host}:${address.port}`);
});

for (const signal of ['SIGINT', 'SIGTERM']) {
  process.on(signal, () => process.exit(0));
}
