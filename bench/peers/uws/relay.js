'use strict';
// The seed API on uWebSockets.js (C++, the server behind Bun and Soketi): a reference peer
// for bench/fanout.py, on its fastest path, its native topic pub/sub.
//
// Each connection subscribes to its topics, and to "<topic>\0<user_id>" for each of them when
// it registered with a user id, so that a publish with a user_id goes to that user's sockets
// only (app.publish on the suffixed topic) and one without to every subscriber (app.publish on
// the topic). Messages go out as raw text, so `?format=raw` is implied, as for the node peer.
//
//   node relay.js [--host 127.0.0.1] [--port 8000]      (or HOST / PORT in the environment)
//
// Prints `uws-relay listening on http://<host>:<port>` once the socket is bound.

const crypto = require('node:crypto');
const uWS = require('uWebSockets.js');
const { parseArgs } = require('../args.js');

/** @type {Map<string, {userId: unknown, topics: string[], ws: object | null}>} */
const clients = new Map();
const NUL = '\u0000';

function sendJson(res, status, body) {
  res.cork(() => {
    res.writeStatus(status).writeHeader('content-type', 'application/json').end(JSON.stringify(body));
  });
}

// uWS hands the body over in chunks whose memory it reuses after each callback: copy them.
function readJson(res, callback) {
  const chunks = [];
  res.onAborted(() => {
    res.aborted = true;
  });
  res.onData((chunk, isLast) => {
    chunks.push(Buffer.from(chunk.slice(0)));
    if (!isLast) return;
    let body;
    try {
      body = chunks.length ? JSON.parse(Buffer.concat(chunks).toString('utf8')) : {};
    } catch {
      body = undefined;
    }
    if (!res.aborted) callback(body);
  });
}

function userTopic(topic, userId) {
  return topic + NUL + String(userId);
}

function follow(ws, client, topics) {
  for (const topic of client.topics) {
    ws.unsubscribe(topic);
    if (client.userId !== null) ws.unsubscribe(userTopic(topic, client.userId));
  }
  client.topics = topics;
  for (const topic of topics) {
    ws.subscribe(topic);
    if (client.userId !== null) ws.subscribe(userTopic(topic, client.userId));
  }
}

const app = uWS.App();

app.get('/health', (res) => sendJson(res, '200 OK', { status: 'ok' }));

app.post('/register', (res, req) => {
  const host = req.getHeader('host');
  readJson(res, (body) => {
    if (!body || typeof body !== 'object') return sendJson(res, '400 Bad Request', { error: 'invalid JSON' });
    const id = crypto.randomUUID().replaceAll('-', '');
    const topics = Array.isArray(body.topics) ? body.topics : ['cats'];
    clients.set(id, { userId: body.user_id ?? null, topics, ws: null });
    sendJson(res, '200 OK', { id, url: `ws://${host}/ws/${id}` });
  });
});

app.post('/publish', (res) => {
  readJson(res, (body) => {
    if (!body || typeof body.topic !== 'string' || typeof body.message !== 'string') {
      return sendJson(res, '400 Bad Request', { error: 'expected {topic, user_id, message}' });
    }
    const userId = body.user_id ?? null;
    const topic = userId === null ? body.topic : userTopic(body.topic, userId);
    const recipients = app.numSubscribers(topic);
    app.publish(topic, body.message, false);
    sendJson(res, '200 OK', { recipients });
  });
});

app.del('/register/:id', (res, req) => {
  clients.delete(req.getParameter(0));
  sendJson(res, '200 OK', {});
});

app.ws('/ws/:id', {
  compression: uWS.DISABLED,
  maxPayloadLength: 64 * 1024,
  maxBackpressure: 1024 * 1024, // wsrelay's --outbox-limit default
  idleTimeout: 0,
  upgrade: (res, req, context) => {
    const id = req.getParameter(0);
    if (!clients.has(id)) {
      res.writeStatus('404 Not Found').end();
      return;
    }
    res.upgrade(
      { id },
      req.getHeader('sec-websocket-key'),
      req.getHeader('sec-websocket-protocol'),
      req.getHeader('sec-websocket-extensions'),
      context,
    );
  },
  open: (ws) => {
    const client = clients.get(ws.getUserData().id);
    if (client === undefined) return ws.end(1000);
    client.ws = ws;
    const topics = client.topics;
    client.topics = [];
    follow(ws, client, topics);
  },
  message: (ws, data) => {
    const client = clients.get(ws.getUserData().id);
    if (client === undefined) return;
    try {
      const command = JSON.parse(Buffer.from(data).toString('utf8'));
      if (Array.isArray(command.topics)) follow(ws, client, command.topics);
    } catch {
      // The seed ignores malformed commands.
    }
  },
  close: (ws) => {
    clients.delete(ws.getUserData().id);
  },
});

app.any('/*', (res) => sendJson(res, '404 Not Found', { error: 'not found' }));

const { host, port } = parseArgs(process.argv.slice(2));
app.listen(host, port, (listenSocket) => {
  if (!listenSocket) {
    console.error(`uws-relay could not listen on ${host}:${port}`);
    process.exit(1);
  }
  console.log(`uws-relay listening on http://${host}:${uWS.us_socket_local_port(listenSocket)}`);
});

for (const signal of ['SIGINT', 'SIGTERM']) {
  process.on(signal, () => process.exit(0));
}
