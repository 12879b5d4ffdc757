/**
 * wsrelay.js: the browser client of a wsrelay server.
 *
 * A plain ES module with no dependencies, served by every relay at
 * `GET /client/wsrelay.js`. It keeps one WebSocket open, reconnects with
 * exponential backoff and full jitter, and after each reconnect sends the whole
 * topic set again, so a client never has to track what the server remembers.
 *
 * Recovery: nothing is missed across a reconnect while the server can help it. The
 * client keeps each topic's position (the offset of the last message it received, in
 * the topic's epoch), connects with `?recover=true` and sends those positions with its
 * topics (`since`); the server replays what was published after them, then the live
 * stream. A message that arrives twice (an offset already received) is dropped. When a
 * topic cannot be recovered (its history was lost, e.g. the relay restarted on the
 * memory broker, or the client was away too long) or publications were lost on their way
 * (a `gap` frame), the client emits `notrecovered` for it: reload what the page derives
 * from that topic from your own backend.
 *
 * Patterns: `subscribe("news.*")` (the server's wildcard subscriptions) brings the
 * messages of every matching topic, each with its own topic's name; `on("news.*", …)`
 * handles them, matched locally by the same rules ({@link topicMatches}). A pattern has
 * no position, so what it brings while disconnected is not recovered.
 *
 * The check: a browser shows a page neither the status nor the headers of a refused
 * WebSocket upgrade, only a close with 1006. So after a connection that failed before
 * opening, wsrelay.js asks the relay with a plain `GET` on the same URL, its query
 * replaced by `?origin=<the page's origin>` (which the relay checks like the `Origin`
 * header, which a browser leaves out of a GET to the page's own origin). The relay
 * answers it as it would have answered the upgrade: 404 (the registration is gone:
 * `register` again, or stop without one), 403 `origin_not_allowed` (the page's origin is
 * not in the relay's `--allowed-origin`: stop, with that error), 503 with `Retry-After`
 * (below), else 426 (not an upgrade: just try again). The relay lets pages of any origin
 * read these answers (`Access-Control-Allow-Origin: *` on its two WebSocket routes
 * only), so the check works from any page; it is sent without cookies.
 *
 * SSE fallback: when the WebSocket fails before opening and the check (below) reaches
 * the relay all the same (426: it answers HTTP, so something on the way, e.g. a proxy,
 * drops upgrades), the client switches to server-sent events for good (`relay.transport`
 * becomes `"sse"`, with a `transport` event): an `EventSource` on `/sse/<id>` (or
 * `/sse?token=`) brings the same frames, and commands, publishes and presence queries are
 * posted to `/sse/<id>` (`text/plain`, so no preflight), with the same answers and
 * refusals. Every (re)connection passes the client's positions as `last_event_id`, so
 * the stream resumes as a WebSocket's `since` would; the client closes the
 * `EventSource` when a stream breaks and reconnects with its own backoff.
 *
 * Retry-After: a node shedding load refuses with 503 (or 429) and `Retry-After`.
 * wsrelay.js honours it (waits that long, at most `maxRetryAfter`, plus a random 0 to
 * 20%, at least 0 to `minDelay`, instead of its backoff) wherever it can read it: a
 * `register` callback that returns the `fetch` Response of your backend (which passes
 * on the relay's status and header), a `register` or `token` callback that throws an
 * error with a `retryAfter` (seconds), and the check (the relay answers it 503 when its
 * registration store is unreachable). It cannot for a refused WebSocket upgrade as
 * such (e.g. 503 `too_many_connections`, which a plain GET is not refused with: a full
 * node answers the check 426), so that one is followed by the backoff like any other
 * drop. Cross-origin, your backend's `Retry-After` is readable only if it sends
 * `Access-Control-Expose-Headers: Retry-After` (the relay does, on the check).
 *
 * @example
 * import { Relay } from "/client/wsrelay.js";
 * const relay = new Relay({
 *   // your backend calls POST /register (it holds the API key) and passes its answer
 *   // on, status and Retry-After included: wsrelay.js reads the Response itself
 *   register: () => fetch("/my-backend/relay", { method: "POST" }),
 * });
 * relay.on("cats", (message, topic) => console.log(topic, message));
 * relay.addEventListener("state", (event) => console.log(event.detail.state));
 * await relay.connect();
 * await relay.subscribe("cats", "dogs");
 * // where a namespace lets this client publish (grants come with the registration
 * // your backend makes: POST /register {"grants": {"publish": ["chat:*"]}})
 * const { offset } = await relay.publish("chat:1", "hi", { skipSelf: true });
 * // a message may be any JSON value: handlers receive it parsed
 * await relay.publish("chat:1", { text: "hi", mentions: [42] });
 * // where the namespace has presence = true (and join_leave = true for the events)
 * const { clients, total } = await relay.presence("chat:1");
 * const { numClients, numUsers } = await relay.presenceStats("chat:1");
 * relay.addEventListener("join", (event) => console.log("joined", event.detail.user));
 * relay.addEventListener("leave", (event) => console.log("left", event.detail.client));
 *
 * Close codes (see the server's README): 1000 (registration deleted), 1002, 1003, 1007,
 * 1008, 1009 (the client sent something wrong) and 4500-4999 (4500 replaced by a newer
 * connection, 4503 banned: the user was disconnected everywhere) stop the client; anything
 * else (1001 going away, 1006 dropped, 1011 server error, 4000-4499) reconnects. The
 * check also stops it: on 403 `origin_not_allowed`, and on 404 when it has no `register`
 * to call (a `url` whose registration is gone, or `token` on a relay without tokens).
 * @module wsrelay
 */

/** Characters a topic may hold (the server also limits the length). */
const TOPIC = /^[A-Za-z0-9_\-.:/@]+$/;
/** Characters a pattern may hold: a topic's, `*` and `>`. */
const PATTERN = /^[A-Za-z0-9_\-.:/@*>]+$/;

/**
 * Whether `text` is a pattern (holds `*` or `>`) rather than a topic.
 * @param {string} text
 * @returns {boolean}
 */
export function isPattern(text) {
  return text.includes("*") || text.includes(">");
}

/**
 * Whether `topic` matches `pattern`, by the server's rules (its `core/patterns.py`,
 * NATS semantics). Segments are separated by `.`; in `pattern`, `*` matches any run of
 * characters within one segment (as a whole segment, at least one character: `news.*`
 * matches `news.eu`, not `news.eu.fr` nor `news`), `>` as the whole last segment
 * matches the rest, one or more segments (`news.>` matches `news.eu` and `news.eu.fr`,
 * not `news` nor `news.`); everything else matches itself. A pattern without `*` or
 * `>` matches only the topic equal to it.
 * @param {string} pattern
 * @param {string} topic
 * @returns {boolean}
 */
export function topicMatches(pattern, topic) {
  if (!isPattern(pattern)) return pattern === topic;
  let regex = compiled.get(pattern);
  if (!regex) {
    if (compiled.size >= 4096) compiled.clear();
    const segments = pattern.split(".");
    const parts = segments.map((segment, index) => {
      if (segment === ">" && index === segments.length - 1) return "[^\\n]+";
      if (segment === "*") return "[^.]+";
      return segment.split("*").map(escapeRegExp).join("[^.]*");
    });
    regex = new RegExp(`^(?:${parts.join("\\.")})$`);
    compiled.set(pattern, regex);
  }
  return regex.test(topic);
}

/** Patterns compiled by {@link topicMatches}. @type {Map<string, RegExp>} */
const compiled = new Map();

function escapeRegExp(text) {
  return text.replace(/[.*+?^${}()|[\]\\/-]/g, "\\$&");
}

/** The states a {@link Relay} goes through, reported by its `state` event. */
export const States = Object.freeze({
  /** Constructed, `connect()` not called yet. */
  IDLE: "idle",
  /** Registering (if needed) and opening the WebSocket. */
  CONNECTING: "connecting",
  /** The WebSocket is open. */
  OPEN: "open",
  /** Closed by the network or the server; waiting `delay` ms before trying again. */
  RECONNECTING: "reconnecting",
  /** Stopped for good: `close()` was called, or the server said not to reconnect. */
  CLOSED: "closed",
});

/**
 * What a client should do after the server closed its connection with `code`.
 * @param {number} code a WebSocket close code
 * @returns {"reconnect" | "stop"}
 */
export function closeAction(code) {
  if ([1000, 1002, 1003, 1007, 1008, 1009].includes(code)) return "stop";
  if (code >= 4500 && code <= 4999) return "stop";
  return "reconnect";
}

/** An error frame from the server, a refused command, or a refused HTTP request. */
export class RelayError extends Error {
  /**
   * @param {string} code the server's error code, e.g. `invalid_topic`
   * @param {string} message what went wrong
   * @param {{status?: number | null, retryAfter?: number | null}} [http] for an HTTP
   *   answer: its status, and its `Retry-After` in seconds (null without one)
   */
  constructor(code, message, { status = null, retryAfter = null } = {}) {
    super(message);
    this.name = "RelayError";
    /** @type {string} */
    this.code = code;
    /** The HTTP status, or null for an error frame. @type {number | null} */
    this.status = status;
    /** Seconds the server asked to wait before trying again, or null. @type {number | null} */
    this.retryAfter = retryAfter;
  }
}

/**
 * Seconds to wait from a `Retry-After` header: a number of seconds, or an HTTP date
 * (the time until it, 0 if past). Null without one, or for one that is neither.
 * @param {string | null | undefined} value the header
 * @returns {number | null}
 */
export function parseRetryAfter(value) {
  if (value === null || value === undefined) return null;
  const text = String(value).trim();
  if (/^\+?(\d+\.?\d*|\.\d+)(e[+-]?\d+)?$/i.test(text)) {
    const seconds = Number(text); // "1e9" too: the cap applies later
    return Number.isFinite(seconds) ? seconds : null;
  }
  if (!/\d\d:\d\d:\d\d/.test(text)) return null; // not a date: Date.parse would guess
  const when = Date.parse(text);
  return Number.isNaN(when) ? null : Math.max(0, (when - Date.now()) / 1000);
}

/**
 * The {@link RelayError} for a refused HTTP answer: the code and message of its
 * `{"error": …}` body, its status, and its `Retry-After` for a 429 or 5xx.
 * @param {Response} response
 * @returns {Promise<RelayError>}
 */
export async function responseError(response) {
  const body = await response.json().catch(() => null);
  const status = response.status;
  const retryAfter =
    status === 429 || status >= 500 ? parseRetryAfter(response.headers.get("Retry-After")) : null;
  return new RelayError(
    body?.error?.code ?? `http_${status}`,
    body?.error?.message ?? `HTTP ${status}`,
    { status, retryAfter },
  );
}

/**
 * @typedef {object} RelayOptions
 * @property {string} [url] the WebSocket URL: `url` from `POST /register`
 *   (`ws://host/ws/<id>`), or with `token`, the server's `ws://host/ws`. A relative or
 *   `http(s)://` URL is turned into the matching `ws(s)://` one.
 * @property {() => Promise<string | {url: string} | Response>} [register] called for a
 *   URL when there is none yet, and again when the current one is gone (the server
 *   answers 404 because the registration expired or the server lost it). Usually asks
 *   your backend, which calls `POST /register` with the API key. It may return the
 *   backend's `fetch` Response itself (`register: () => fetch("/my-backend/relay")`):
 *   a 2xx holds the `POST /register` answer, anything else is an error, and a 429 or
 *   5xx with `Retry-After` sets the wait before the next try. An error it throws with
 *   a numeric `retryAfter` (seconds) does the same. The 404 is detected by the check
 *   (a plain `GET` on the URL, which the relay lets pages of any origin read); a 503
 *   with `Retry-After` to it also sets the wait. Without `register`, a 404 stops the
 *   client with that error (`unknown_client`): nothing can bring the URL back.
 * @property {string | (() => Promise<string>)} [token] a signed connection token
 *   for `GET /ws?token=`; a function is called again before every connection, so it can
 *   fetch a fresh one (an error it throws with a `retryAfter` sets the wait).
 * @property {number} [minDelay=500] ms: the first reconnect waits up to this long
 * @property {number} [maxDelay=30000] ms: no reconnect waits longer, unless the server
 *   asked for longer with `Retry-After`
 * @property {number} [maxRetryAfter=300000] ms: a longer `Retry-After` counts as this
 *   (a broken or hostile server's `1e9` must not park the client)
 * @property {number} [stableAfter=5000] ms a connection must stay open before the
 *   backoff starts again from `minDelay`
 */

/**
 * A connection to a wsrelay server that survives restarts and network drops.
 *
 * Events (`relay.addEventListener(name, (event) => event.detail)`):
 * - `state`: `{state, previous}`, one of {@link States}; going to `reconnecting` also
 *   `{delay, retryAfter}`: the ms it waits, and the server's `Retry-After` (seconds)
 *   when that set the delay, else null (the backoff did).
 * - `open`: `{url, transport}` (the URL without any token; `"websocket"` or `"sse"`),
 *   after each successful connection.
 * - `transport`: `{transport: "sse"}`, once, when the client falls back to server-sent
 *   events (see above).
 * - `close`: `{code, reason, reconnect, delay}`; `reconnect` says whether it will try
 *   again, after `delay` ms (always the backoff: a close carries no `Retry-After`).
 * - `subscribed`: `{topics, positions}`, the server's whole topic set after each
 *   command, and the position (`{offset, epoch}`) of each topic the command named.
 * - `notrecovered`: `{topic, offset, epoch, previous, reason}`: messages of `topic` may
 *   have been missed; the stream goes on after `offset` in `epoch`. `previous` is the
 *   position the client had (`{offset, epoch}`, or null), `reason` one of
 *   `"epoch_changed"` (the topic's history was lost, e.g. the relay restarted on the
 *   memory broker), `"too_far_behind"` (the history no longer reaches back that far)
 *   and `"gap"` (the server lost publications on their way to this client). It comes
 *   before any message after that position.
 * - `join`, `leave`: `{topic, user, client}`: a connection subscribed to `topic`
 *   (subscribed by a command, or connected with it among its topics), or unsubscribed or
 *   disconnected, on any node, where the topic's namespace has `presence` and
 *   `join_leave`; `client` is its public id (as in {@link Relay#presence}), `user` its
 *   user id or null. Never for this client's own subscriptions; live only (none while
 *   disconnected: ask {@link Relay#presence} after `subscribed`), and not ordered
 *   with the topic's messages.
 * - `error`: `{error}`: a {@link RelayError} from the server (not a refused
 *   {@link Relay#publish} or presence query: its promise rejects instead) (with
 *   `status` and `retryAfter` for an HTTP refusal), a failed `register` or `token`
 *   call, or a frame
 *   that was not JSON. The connection carries on, unless the state goes to `closed`
 *   right after: the check's refusals that stop the client (403 `origin_not_allowed`;
 *   404 without `register`) are this event, then `closed`, and `connect()` rejects
 *   with the same error.
 *
 * Messages are not events: register handlers with {@link Relay#on}.
 */
export class Relay extends EventTarget {
  #url;
  #register;
  #token;
  #minDelay;
  #maxDelay;
  #maxRetryAfter;
  #stableAfter;
  /** @type {WebSocket | SseSocket | null} */
  #socket = null;
  /** `"websocket"`, or `"sse"` once the WebSocket proved blocked (see {@link Relay#transport}). */
  #transport = "websocket";
  #state = States.IDLE;
  #stopped = false;
  /** @type {Set<string>} */
  #topics = new Set();
  /** Whether `subscribe`/`unsubscribe` was ever called: then the set is ours to resend. */
  #managed = false;
  /** @type {Map<string, Set<Function>>} */
  #handlers = new Map();
  #attempt = 0;
  #timer = null;
  #openedAt = 0;
  /** Commands sent on the current socket, answered in order. */
  #pending = [];
  /** Callers waiting for the next resubscription (commands made while disconnected). */
  #waiting = [];
  /** `connect()` callers waiting for the next open. */
  #connecting = [];
  /** Whether the previous attempt failed before opening (then run the check). */
  #checkGone = false;
  /** Each topic's position, `{offset, epoch}`: the last message received. */
  #positions = new Map();
  /**
   * Client publishes and presence queries sent and not answered yet, by id:
   * `{resolve, reject, lost}`, `lost` the error they reject with if the connection goes.
   */
  #requests = new Map();
  #nextId = 0;

  /** @param {RelayOptions} options */
  constructor({
    url,
    register,
    token,
    minDelay = 500,
    maxDelay = 30000,
    maxRetryAfter = 300000,
    stableAfter = 5000,
  } = {}) {
    super();
    if (!url && !register) throw new TypeError("Relay needs a url or a register callback");
    if (token && !url) throw new TypeError("a token needs the server's url (ws://host/ws)");
    this.#url = url ? toWebSocketUrl(url) : null;
    this.#register = register ?? null;
    this.#token = token ?? null;
    this.#minDelay = minDelay;
    this.#maxDelay = maxDelay;
    this.#maxRetryAfter = maxRetryAfter;
    this.#stableAfter = stableAfter;
  }

  /** The current state, one of {@link States}. */
  get state() {
    return this.#state;
  }

  /** The topics this client wants, sorted. */
  get topics() {
    return [...this.#topics].sort();
  }

  /**
   * The transport in use: `"websocket"`, or `"sse"` once the client fell back to
   * server-sent events (the WebSocket failed before opening while a plain GET on its URL
   * reached the relay: a proxy on the way drops upgrades). It stays on SSE from then on.
   * @returns {"websocket" | "sse"}
   */
  get transport() {
    return this.#transport;
  }

  /** The WebSocket URL in use (without a token), or null before the first one. */
  get url() {
    return this.#url;
  }

  /**
   * Each topic's position: the offset of the last message received and its epoch (or
   * where the server said the stream starts). A copy.
   * @returns {Object<string, {offset: number, epoch: string}>}
   */
  get positions() {
    return Object.fromEntries([...this.#positions].map(([topic, p]) => [topic, { ...p }]));
  }

  /**
   * Start connecting (and keep reconnecting) if not already.
   * @returns {Promise<void>} resolves once open; rejects if the client stops first
   */
  connect() {
    if (this.#state === States.OPEN) return Promise.resolve();
    const opened = new Promise((resolve, reject) => this.#connecting.push({ resolve, reject }));
    if (this.#state === States.IDLE || this.#state === States.CLOSED) {
      this.#stopped = false;
      this.#attempt = 0;
      this.#run();
    }
    return opened;
  }

  /**
   * Add topics. Sent now if open, else with the whole set when the connection opens.
   * A topic may be a pattern (the server's wildcard subscriptions): `news.*` (one
   * segment: `news.eu`, not `news.eu.fr`) or `news.>` (one or more), each wildcard a
   * whole segment. A pattern has no position: it is never sent with `since`, and what
   * it brings while the client is away is not recovered (subscribe to a topic by name
   * to recover it).
   * @param {...string} topics topics or patterns
   * @returns {Promise<string[]>} the server's topic set once it has acknowledged;
   *   rejects with a {@link RelayError} if it refused (the topics are then dropped), or
   *   a TypeError for a topic that cannot be valid (nothing is sent)
   */
  subscribe(...topics) {
    const invalid = topicProblem(topics, "subscription");
    if (invalid) return Promise.reject(invalid);
    const added = topics.filter((t) => !this.#topics.has(t));
    for (const t of topics) this.#topics.add(t);
    return this.#command({ subscribe: topics }, () => {
      for (const t of added) this.#topics.delete(t);
    });
  }

  /**
   * Remove topics (a pattern is removed as subscribed: `news.*` leaves `news.eu`, if
   * subscribed by name, alone).
   * @param {...string} topics topics or patterns
   * @returns {Promise<string[]>} the server's topic set once it has acknowledged
   */
  unsubscribe(...topics) {
    const invalid = topicProblem(topics, "subscription");
    if (invalid) return Promise.reject(invalid);
    const removed = topics.filter((t) => this.#topics.has(t));
    for (const t of topics) this.#topics.delete(t);
    return this.#command(
      { unsubscribe: topics },
      () => {
        for (const t of removed) this.#topics.add(t);
      },
      // Forget where they were: subscribing again later starts from then, not from here.
      () => topics.forEach((t) => this.#topics.has(t) || this.#positions.delete(t)),
    );
  }

  /**
   * Publish `message` to `topic` as this client, over its own WebSocket, where the
   * topic's namespace allows it (`publish = "granted"` with a matching publish grant in
   * the registration or token, or `"subscribers"` with the topic subscribed to; by
   * default no client may publish). It reaches every subscriber of the topic, this
   * client too unless `skipSelf` (its own copy may come before or after the answer).
   * `message` is a string, or any value `JSON.stringify` turns into JSON (an object, an
   * array, a number, a boolean, null): handlers receive that value.
   * @param {string} topic
   * @param {*} message a string, or any JSON value
   * @param {{skipSelf?: boolean, idempotencyKey?: string}} [options] `idempotencyKey`:
   *   a repeat within the server's window publishes nothing and answers the first
   *   position with `duplicate: true`
   * @returns {Promise<{offset: number, epoch: string, duplicate: boolean}>} where the
   *   server put it. Rejects with a {@link RelayError} whose `code` is the server's
   *   (`forbidden_topic`, `rate_limited`, `message_too_large`, `invalid_topic`…; the
   *   connection stays open), `not_connected` when the client is not open (nothing
   *   was sent), or `publish_interrupted` when the connection was lost before the
   *   answer (it may or may not have been published: publish again with the same
   *   `idempotencyKey` to be sure); a TypeError for a topic that cannot be valid or a
   *   message that is not JSON (undefined, a function, a BigInt, a cycle).
   */
  publish(topic, message, { skipSelf = false, idempotencyKey } = {}) {
    const invalid = topicProblem([topic]);
    if (invalid) return Promise.reject(invalid);
    let text;
    try {
      text = typeof message === "string" ? null : JSON.stringify(message);
    } catch (error) {
      return Promise.reject(new TypeError(`message is not JSON: ${error.message}`));
    }
    if (text === undefined) return Promise.reject(new TypeError("message must be a string or a JSON value"));
    if (this.#state !== States.OPEN || !this.#socket) {
      return Promise.reject(
        new RelayError("not_connected", `cannot publish while ${this.#state}: nothing was sent`),
      );
    }
    const id = (this.#nextId += 1);
    const body = { topic, message, id };
    if (skipSelf) body.skip_self = true;
    if (idempotencyKey !== undefined && idempotencyKey !== null) body.idempotency_key = idempotencyKey;
    return new Promise((resolve, reject) => {
      this.#requests.set(id, { resolve, reject, lost: publishInterrupted });
      this.#socket.send(JSON.stringify({ publish: body }));
    });
  }

  /**
   * Who is subscribed to `topic`, on every node, asked over this client's WebSocket (no
   * API key: allowed where this client may subscribe to the topic, which it need not
   * be, and the topic's namespace has `presence = true`). Connections are named by
   * their public id (never a registration id), oldest first.
   * @param {string} topic a topic name (not a pattern)
   * @returns {Promise<{topic: string, clients: PresenceClient[], total: number}>} at
   *   most 1000 `clients`; `total` counts them all. Rejects with a {@link RelayError}
   *   whose `code` is the server's: `forbidden_topic` (this client may not subscribe
   *   to it), `presence_disabled` (the topic keeps no presence), `invalid_topic`,
   *   `broker_unavailable` (the connection stays open); `not_connected` when the client
   *   is not open (nothing was sent), `connection_failed` when the connection was lost
   *   before the answer; a TypeError for a topic that cannot be valid.
   */
  presence(topic) {
    return this.#ask("presence", topic);
  }

  /**
   * How many connections are subscribed to `topic` on every node, and how many distinct
   * users they belong to (anonymous connections are clients, not users); asked and
   * refused as {@link Relay#presence}.
   * @param {string} topic
   * @returns {Promise<{topic: string, numClients: number, numUsers: number}>}
   */
  presenceStats(topic) {
    return this.#ask("presence_stats", topic);
  }

  /**
   * Call `handler(message, topic, offset)` for each message on `topic`, or on every
   * topic for `"*"`; `offset` is the message's place in its topic (see `positions`).
   * `topic` may be a pattern, matched by the server's rules ({@link topicMatches}):
   * `on("news.*", …)` receives `news.eu`'s messages, `on("news.>", …)` `news.eu.fr`'s
   * too, `on("chat:*", …)` `chat:1`'s (here, unlike in a subscription, `*` may be part
   * of a segment). A bare `"*"` keeps meaning every topic, not the single-segment
   * pattern. A message reaches each registration it matches once (a handler added for
   * both `news.eu` and `news.*` is called twice).
   * `message` is what was published: a string, or the JSON value (already parsed; a
   * string holding JSON text stays a string). Handling does not subscribe: call
   * {@link Relay#subscribe} too.
   * @param {string} topic a topic, a pattern, or `"*"` for every topic
   * @param {(message: *, topic: string, offset: number) => void} handler
   * @returns {() => void} a function that removes the handler
   */
  on(topic, handler) {
    const invalid = topic === "*" ? null : topicProblem([topic], "handler");
    if (invalid) throw invalid;
    if (typeof handler !== "function") throw new TypeError("handler must be a function");
    let set = this.#handlers.get(topic);
    if (!set) this.#handlers.set(topic, (set = new Set()));
    set.add(handler);
    return () => this.off(topic, handler);
  }

  /**
   * Remove a handler added with {@link Relay#on}.
   * @param {string} topic
   * @param {Function} handler
   */
  off(topic, handler) {
    this.#handlers.get(topic)?.delete(handler);
  }

  /**
   * Close the connection and stop reconnecting. The registration is left alone (your
   * backend may delete it with `DELETE /register/<id>`).
   * @param {number} [code=1000]
   * @param {string} [reason=""]
   */
  close(code = 1000, reason = "") {
    this.#stopped = true;
    clearTimeout(this.#timer);
    this.#timer = null;
    const socket = this.#socket;
    this.#socket = null;
    if (socket) {
      socket.close(code, reason);
      this.#emit("close", { code, reason, reconnect: false, delay: null });
    }
    this.#stop(new Error("the client was closed"));
  }

  // -- internals ------------------------------------------------------------------------

  /** Send the query `{[name]: topic, id}`; its answer (or error frame) carries the id. */
  #ask(name, topic) {
    const invalid = topicProblem([topic]);
    if (invalid) return Promise.reject(invalid);
    if (this.#state !== States.OPEN || !this.#socket) {
      return Promise.reject(
        new RelayError("not_connected", `cannot ask for ${name} while ${this.#state}`),
      );
    }
    const id = (this.#nextId += 1);
    const lost = () =>
      new RelayError("connection_failed", `the connection was lost before the ${name} answer`);
    return new Promise((resolve, reject) => {
      this.#requests.set(id, { resolve, reject, lost });
      this.#socket.send(JSON.stringify({ [name]: topic, id }));
    });
  }

  #command(body, revert, done = () => {}) {
    this.#managed = true;
    return new Promise((resolve, reject) => {
      const entry = {
        resolve: (topics) => (done(), resolve(topics)),
        reject: (error) => (revert(), reject(error)),
      };
      if (this.#stopped) {
        entry.reject(new Error("the client is closed"));
      } else if (this.#state === States.OPEN && this.#socket) {
        this.#pending.push(entry);
        const since = this.#since(body.subscribe ?? []);
        this.#socket.send(JSON.stringify(since ? { ...body, since } : body));
      } else {
        this.#waiting.push(entry); // answered by the resubscription when it opens
      }
    });
  }

  async #run() {
    this.#setState(States.CONNECTING);
    let url;
    try {
      if (this.#checkGone && this.#url) {
        const refusal = await check(this.#url);
        if (this.#stopped) return;
        if (refusal === UPGRADE_BLOCKED) {
          // The relay answers HTTP, yet the WebSocket failed: something on the way (a proxy)
          // drops upgrades. Server-sent events pass where plain HTTP does.
          if (this.#transport !== "sse") {
            this.#transport = "sse";
            this.#emit("transport", { transport: "sse" });
          }
        } else if (refusal?.status === 404 && this.#register && !this.#token) {
          this.#url = null; // the registration is gone: register again
        } else if (refusal) {
          this.#fail(refusal);
          return;
        }
      }
      url = await this.#socketUrl();
    } catch (error) {
      if (this.#stopped) return;
      this.#emit("error", { error });
      this.#retry(retryAfterOf(error));
      return;
    }
    if (this.#stopped) return;
    let opened = false;
    const socket =
      this.#transport === "sse" ? new SseSocket(url, eventId(this.#positions)) : new WebSocket(url);
    this.#socket = socket;
    socket.addEventListener("open", () => {
      if (socket !== this.#socket) return;
      opened = true;
      this.#checkGone = false;
      this.#openedAt = Date.now();
      this.#setState(States.OPEN);
      this.#resubscribe();
      this.#emit("open", { url: this.#url, transport: this.#transport });
      for (const waiter of this.#connecting.splice(0)) waiter.resolve();
    });
    socket.addEventListener("message", (event) => {
      if (socket === this.#socket) this.#frame(event.data);
    });
    socket.addEventListener("close", (event) => {
      if (socket !== this.#socket) return; // replaced, or closed by close()
      this.#socket = null;
      this.#interrupt();
      this.#waiting.push(...this.#pending.splice(0)); // answered after the next open
      if (opened && Date.now() - this.#openedAt >= this.#stableAfter) this.#attempt = 0;
      if (opened && closeAction(event.code) === "stop") {
        this.#stopped = true;
        this.#emit("close", { code: event.code, reason: event.reason, reconnect: false, delay: null });
        this.#stop(new RelayError("closed", `closed by the server (${event.code} ${event.reason})`));
        return;
      }
      this.#checkGone = !opened;
      const delay = this.#retry();
      this.#emit("close", { code: event.code, reason: event.reason, reconnect: true, delay });
    });
  }

  async #socketUrl() {
    if (this.#token) {
      const token = typeof this.#token === "function" ? await this.#token() : this.#token;
      const url = new URL(this.#url);
      url.searchParams.set("token", token);
      url.searchParams.set("recover", "true");
      return url.href;
    }
    if (!this.#url) {
      let answer = await this.#register();
      if (typeof Response !== "undefined" && answer instanceof Response) {
        if (!answer.ok) throw await responseError(answer);
        answer = await answer.json();
      }
      const url = typeof answer === "string" ? answer : answer?.url;
      if (!url) throw new TypeError("register() must return the url from POST /register");
      this.#url = toWebSocketUrl(url);
    }
    // The server holds the topics' publications until the first command, whose `since`
    // they are replayed after: nothing slips between the replay and the live stream.
    const url = new URL(this.#url);
    url.searchParams.set("recover", "true");
    return url.href;
  }

  /**
   * Schedule the next attempt; returns its delay in ms: the backoff, or after a
   * refusal with `Retry-After` (seconds) that wait, capped, plus 0-20% (at least 0 to
   * `minDelay`) of jitter, so that clients refused together do not return together.
   * @param {number | null} [retryAfter]
   */
  #retry(retryAfter = null) {
    let delay;
    if (retryAfter === null) {
      const ceiling = Math.min(this.#maxDelay, this.#minDelay * 2 ** this.#attempt);
      delay = Math.round(Math.random() * ceiling); // full jitter
    } else {
      const base = Math.min(retryAfter * 1000, this.#maxRetryAfter);
      delay = Math.round(base + Math.random() * Math.max(0.2 * base, this.#minDelay));
    }
    this.#attempt += 1;
    this.#setState(States.RECONNECTING, { delay, retryAfter });
    this.#timer = setTimeout(() => {
      this.#timer = null;
      if (!this.#stopped) this.#run();
    }, delay);
    return delay;
  }

  /**
   * The first command on a new connection, which the server waits for (it holds the
   * topics' publications until then): the whole topic set, or for a client that never
   * called subscribe (its topics came with the registration) the topics it knows a
   * position for; with the position of each known one.
   */
  #resubscribe() {
    if (this.#transport === "sse" && !this.#managed) {
      // The stream opened with the registration's topics, recovered from the positions
      // passed with it (last_event_id): nothing to send.
      const topics = this.#socket.topics;
      for (const entry of this.#waiting.splice(0)) entry.resolve(topics);
      return;
    }
    const waiting = this.#waiting.splice(0);
    const topics = this.#managed ? this.topics : [...this.#positions.keys()].sort();
    const body = this.#managed ? { topics } : { subscribe: topics };
    const since = this.#since(topics);
    if (since) body.since = since;
    this.#pending.push({
      resolve: (answer) => waiting.forEach((entry) => entry.resolve(answer)),
      reject: (error) => waiting.forEach((entry) => entry.reject(error)),
      // The app sent no command: its acknowledgement is no `subscribed` event, as before.
      quiet: !this.#managed,
    });
    this.#socket.send(JSON.stringify(body));
  }

  /** The known positions of `topics`, as a command's `since`, or null if none. */
  #since(topics) {
    const since = {};
    for (const topic of topics) {
      if (isPattern(topic)) continue; // a pattern has no position (the server refuses one)
      const position = this.#positions.get(topic);
      if (position?.epoch) since[topic] = { offset: position.offset, epoch: position.epoch };
    }
    return Object.keys(since).length ? since : null;
  }

  /**
   * Take the positions of an acknowledgement; emits `notrecovered` for each topic the
   * server could not recover.
   */
  #acknowledged(positions) {
    for (const [topic, answer] of Object.entries(positions ?? {})) {
      const known = this.#positions.get(topic) ?? null;
      let offset = answer.offset;
      // Messages received after the command was sent are past the position answered. A
      // recovered answer to an empty position (a topic never published then) names the
      // real epoch, with the same numbering.
      const empty = known && known.epoch.startsWith("g:") && answer.recovered === true;
      if (known && (known.epoch === answer.epoch || empty)) {
        offset = Math.max(offset, known.offset);
      }
      this.#positions.set(topic, { offset, epoch: answer.epoch });
      if (answer.recovered === false) {
        const reason = known && known.epoch === answer.epoch ? "too_far_behind" : "epoch_changed";
        this.#notRecovered(topic, { offset, epoch: answer.epoch }, known, reason);
      }
    }
  }

  #notRecovered(topic, position, previous, reason) {
    this.#emit("notrecovered", { topic, ...position, previous: previous && { ...previous }, reason });
  }

  #frame(data) {
    let frame;
    try {
      frame = JSON.parse(data);
    } catch {
      this.#emit("error", { error: new RelayError("invalid_frame", "a frame was not JSON") });
      return;
    }
    if (frame.type === "message") {
      const known = this.#positions.get(frame.topic);
      if (typeof frame.offset === "number" && known) {
        // Frames carry no epoch: the acknowledgement before them set this topic's.
        if (frame.offset <= known.offset) return; // received already (an overlapping replay)
        known.offset = frame.offset;
      }
      const keys = [frame.topic, "*"];
      for (const key of this.#handlers.keys()) {
        if (key !== "*" && isPattern(key) && topicMatches(key, frame.topic)) keys.push(key);
      }
      for (const key of keys) {
        for (const handler of this.#handlers.get(key) ?? []) {
          try {
            handler(frame.message, frame.topic, frame.offset);
          } catch (error) {
            reportError(error);
          }
        }
      }
    } else if (frame.type === "subscribed") {
      const entry = this.#pending.shift();
      this.#acknowledged(frame.positions);
      entry?.resolve(frame.topics);
      if (!entry?.quiet) {
        this.#emit("subscribed", { topics: frame.topics, positions: frame.positions ?? {} });
      }
      // Not after its own command (nothing more to learn), nor from a server that
      // sends no positions (it would never stop asking).
      if (!entry?.learning && frame.positions) this.#learnPositions(frame.topics);
    } else if (frame.type === "gap") {
      const known = this.#positions.get(frame.topic) ?? null;
      let offset = frame.offset;
      if (known && known.epoch === frame.epoch) offset = Math.max(offset, known.offset);
      this.#positions.set(frame.topic, { offset, epoch: frame.epoch });
      this.#notRecovered(frame.topic, { offset, epoch: frame.epoch }, known, "gap");
    } else if (frame.type === "published") {
      this.#answered(frame.id)?.resolve({
        offset: frame.offset,
        epoch: frame.epoch,
        duplicate: frame.duplicate === true,
      });
    } else if (frame.type === "presence") {
      this.#answered(frame.id)?.resolve({
        topic: frame.topic,
        clients: (frame.clients ?? []).map(presenceClient),
        total: frame.total,
      });
    } else if (frame.type === "presence_stats") {
      this.#answered(frame.id)?.resolve({
        topic: frame.topic,
        numClients: frame.num_clients,
        numUsers: frame.num_users,
      });
    } else if (frame.type === "join" || frame.type === "leave") {
      const { topic, user = null, client } = frame;
      this.#emit(frame.type, { topic, user, client });
    } else if (frame.type === "error" && frame.id !== undefined && frame.id !== null) {
      // A refused publish or presence query: its promise rejects; never a command's error.
      this.#answered(frame.id)?.reject(
        new RelayError(frame.error?.code ?? "error", frame.error?.message ?? ""),
      );
    } else if (frame.type === "error") {
      const error = new RelayError(frame.error?.code ?? "error", frame.error?.message ?? "");
      this.#pending.shift()?.reject(error);
      this.#emit("error", { error });
    }
  }

  /**
   * A client whose topics came with its registration learns their positions (to
   * recover them after the next drop) by subscribing to them once more, quietly.
   */
  #learnPositions(topics) {
    if (this.#managed || !this.#socket || this.#state !== States.OPEN) return;
    // Patterns have no position to learn.
    const unknown = (topics ?? []).filter(
      (topic) => !isPattern(topic) && !this.#positions.has(topic),
    );
    if (unknown.length === 0) return;
    this.#pending.push({ resolve() {}, reject() {}, quiet: true, learning: true });
    this.#socket.send(JSON.stringify({ subscribe: unknown }));
  }

  /** Stop for good on `error`, a refusal no retry can change. */
  #fail(error) {
    this.#stopped = true;
    this.#emit("error", { error });
    this.#stop(error);
  }

  /** The request waiting for the answer `id`, taken off the waiting list (or undefined). */
  #answered(id) {
    const entry = this.#requests.get(id);
    this.#requests.delete(id);
    return entry;
  }

  /**
   * Reject every publish and presence query waiting for its answer: the connection is
   * gone.
   */
  #interrupt() {
    for (const entry of this.#requests.values()) entry.reject(entry.lost());
    this.#requests.clear();
  }

  #stop(error) {
    this.#interrupt();
    this.#setState(States.CLOSED);
    for (const entry of this.#waiting.splice(0)) entry.reject(error);
    for (const entry of this.#pending.splice(0)) entry.reject(error);
    for (const waiter of this.#connecting.splice(0)) waiter.reject(error);
  }

  #setState(state, more = {}) {
    if (state === this.#state) return;
    const previous = this.#state;
    this.#state = state;
    this.#emit("state", { state, previous, ...more });
  }

  #emit(type, detail) {
    this.dispatchEvent(new CustomEvent(type, { detail }));
  }
}

/** What a publish waiting for its answer rejects with when the connection is lost. */
function publishInterrupted() {
  return new RelayError(
    "publish_interrupted",
    "the connection was lost before the publish was answered: it may or may not have been published",
  );
}

/**
 * One connection of a presence answer.
 * @typedef {object} PresenceClient
 * @property {string} client its public id (32 hex digits; never the registration id)
 * @property {string | null} user its user id, as a string; null: anonymous
 * @property {string} node the node holding it (`node` in that node's `GET /stats`)
 * @property {number} connectedAt when it opened, in seconds since the Unix epoch (that
 *   node's clock)
 */

/** @returns {PresenceClient} */
function presenceClient({ client, user, node, connected_at: connectedAt }) {
  return { client, user: user ?? null, node, connectedAt };
}

/**
 * A TypeError for the first topic that cannot be valid, or null. With `patterns`,
 * patterns are valid too: `"subscription"` as the server accepts them in a
 * subscription (`*` and `>` whole segments, `>` the last), `"handler"` as
 * {@link topicMatches} reads them (`*` may also be part of a segment, `chat:*`).
 * @param {unknown[]} topics
 * @param {"subscription" | "handler" | null} [patterns=null]
 */
function topicProblem(topics, patterns = null) {
  if (topics.length === 0) return new TypeError("give at least one topic");
  for (const topic of topics) {
    if (typeof topic === "string" && TOPIC.test(topic)) continue;
    if (!patterns || typeof topic !== "string" || !isPattern(topic)) {
      return new TypeError(`invalid topic ${JSON.stringify(topic)}: use letters, digits and _-.:/@`);
    }
    const problem = patternProblem(topic, patterns === "subscription");
    if (problem) return new TypeError(`invalid pattern ${JSON.stringify(topic)}: ${problem}`);
  }
  return null;
}

/** What is wrong with the pattern `text`, or null (the server's `validate_subscription`). */
function patternProblem(text, wholeSegments) {
  if (!PATTERN.test(text)) return "use letters, digits and _-.:/@, with * and >";
  const segments = text.split(".");
  for (const [index, segment] of segments.entries()) {
    if (segment.includes(">") && (segment !== ">" || index !== segments.length - 1)) {
      return "> may only be the whole last segment (news.>)";
    }
    if (wholeSegments && segment.includes("*") && segment !== "*") {
      return "in a subscription * must be a whole segment (news.*), not part of one";
    }
  }
  return null;
}

function toWebSocketUrl(url) {
  const absolute = new URL(url, globalThis.location?.href);
  if (absolute.protocol === "http:") absolute.protocol = "ws:";
  else if (absolute.protocol === "https:") absolute.protocol = "wss:";
  return absolute.href;
}

/**
 * The check after a failed connection: a plain GET on `url` (its query replaced by the
 * page's origin), which the relay answers as it would the upgrade, with CORS for any
 * origin. Returns the {@link RelayError} of a refusal that retrying the same URL cannot
 * change: 404 (the registration is gone, or on `/ws`, tokens are off) or 403
 * (`origin_not_allowed`); else null (426: the WebSocket may work now; or no answer at
 * all). Throws the RelayError of a refusal that says when to come back (a 503 or 429
 * with `Retry-After`, e.g. the registration store is unreachable), so the client waits
 * that long instead of opening a WebSocket the node would refuse too.
 * @param {string} url the WebSocket URL
 * @returns {Promise<RelayError | null>}
 */
async function check(url) {
  const http = new URL(url);
  http.protocol = http.protocol === "wss:" ? "https:" : "http:";
  http.search = "";
  // A browser sends no Origin header with a GET to the page's own origin: name it here,
  // so that the relay's --allowed-origin answers this check as it did the WebSocket.
  const origin = globalThis.location?.origin;
  if (origin && origin !== "null") http.searchParams.set("origin", origin);
  let response;
  try {
    response = await fetch(http, { cache: "no-store", credentials: "omit" });
  } catch {
    return null; // unreachable (or a relay too old to allow CORS): cannot tell
  }
  if (response.status === 404 || response.status === 403) return responseError(response);
  if (response.status === 426) return UPGRADE_BLOCKED; // the relay is there; upgrades are not
  if (response.status === 429 || response.status >= 500) {
    const error = await responseError(response);
    if (error.retryAfter !== null) throw error;
  }
  return null;
}

/** The `retryAfter` (seconds) a thrown error carries, or null. */
function retryAfterOf(error) {
  const seconds = error?.retryAfter;
  return typeof seconds === "number" && Number.isFinite(seconds) && seconds >= 0 ? seconds : null;
}

/** What {@link check} answers when the relay was reached but the WebSocket was not. */
const UPGRADE_BLOCKED = Symbol("upgrade blocked");

/** Characters an SSE event id may take (the relay's limit). */
const MAX_EVENT_ID = 1024;

/**
 * The SSE event id naming `positions` (`1;topic=epoch.offset;…`, sorted), as the relay
 * makes them, to resume a stream from: within {@link MAX_EVENT_ID}, ending with `;~`
 * when topics had to be left out (the relay then answers them not recovered).
 * @param {Map<string, {offset: number, epoch: string}>} positions
 * @returns {string}
 */
export function eventId(positions) {
  let id = "1";
  for (const topic of [...positions.keys()].sort()) {
    const { offset, epoch } = positions.get(topic);
    if (!epoch) continue;
    const part = `;${topic}=${epoch}.${offset}`;
    if (id.length + part.length > MAX_EVENT_ID - 2) return `${id};~`;
    id += part;
  }
  return id;
}

/**
 * Server-sent events dressed as the part of a WebSocket a {@link Relay} uses: the
 * stream (`GET /sse/<id>`, or `/sse?token=`) brings the frames, `send` posts a command
 * (`POST /sse/<id>`, `text/plain`: no preflight) and hands its answer on as a frame (a
 * refusal as an error frame; a subscription's acknowledgement comes down the stream).
 * `open` fires once the opening acknowledgement arrived (`topics` then holds its topic
 * set); `close` when the stream ends, with the code of the relay's close event (1006 if
 * it just broke: the Relay reconnects, passing its positions as `last_event_id`).
 */
class SseSocket extends EventTarget {
  #source;
  #commands = null;
  #queue = Promise.resolve();
  #opened = false;
  #ended = false;
  /** The topic set of the opening acknowledgement. @type {string[]} */
  topics = [];

  constructor(url, lastEventId) {
    super();
    const http = new URL(url);
    http.protocol = http.protocol === "wss:" ? "https:" : "http:";
    http.pathname = http.pathname.replace(/\/ws(\/[^/]*)?$/, "/sse$1");
    http.searchParams.delete("recover");
    if (lastEventId && lastEventId !== "1") http.searchParams.set("last_event_id", lastEventId);
    this.#commands = http;
    this.#source = new EventSource(http.href);
    this.#source.addEventListener("message", (event) => this.#frame(event.data));
    this.#source.addEventListener("error", () => this.#end(1006, ""));
  }

  send(text) {
    const body = JSON.parse(text);
    const id = body.publish?.id ?? body.id;
    this.#queue = this.#queue.then(() => this.#post(text, id));
  }

  close() {
    this.#ended = true;
    this.#source.close();
  }

  async #post(text, id) {
    if (this.#ended) return;
    let frame;
    try {
      const response = await fetch(this.#commands, {
        method: "POST",
        body: text,
        headers: { "Content-Type": "text/plain" },
        credentials: "omit",
      });
      frame = await response.json();
      if (!response.ok) frame = { type: "error", error: frame.error };
    } catch (error) {
      frame = { type: "error", error: { code: "connection_failed", message: String(error) } };
    }
    if (frame.type === "subscribed" || this.#ended) return; // it comes down the stream
    if (frame.type === "error" && id !== undefined && id !== null) frame.id = id;
    this.dispatchEvent(new MessageEvent("message", { data: JSON.stringify(frame) }));
  }

  #frame(data) {
    let frame = null;
    try {
      frame = JSON.parse(data);
    } catch {
      // handed on: the Relay reports a frame that is not JSON
    }
    if (frame?.type === "stream") {
      const commands = new URL(this.#commands);
      commands.pathname = commands.pathname.replace(/\/sse(\/[^/]*)?$/, `/sse/${frame.id}`);
      commands.search = "";
      this.#commands = commands;
      return;
    }
    if (frame?.type === "close") {
      this.#end(frame.code, frame.reason ?? "");
      return;
    }
    this.dispatchEvent(new MessageEvent("message", { data }));
    if (!this.#opened && frame?.type === "subscribed") {
      this.#opened = true;
      this.topics = frame.topics;
      this.dispatchEvent(new Event("open"));
    }
  }

  #end(code, reason) {
    if (this.#ended) return;
    this.#ended = true;
    this.#source.close();
    this.dispatchEvent(Object.assign(new Event("close"), { code, reason }));
  }
}
