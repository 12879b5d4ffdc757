// The wsrelay web console: live counters, topics, a subscriber and a publisher.
// Talks to the server it was served by, with the API key (if any) from sessionStorage.
import { Relay, parseRetryAfter } from "../client/wsrelay.js";

const KEY = "wsrelay.apiKey"; // sessionStorage only: gone when the tab closes
const ROOT = new URL(".", location.href); // the server's root, also when mounted under a prefix
const HISTORY = 120; // chart points, one a second
const MESSAGES = 500; // messages kept in the log

const $ = (id) => document.getElementById(id);

class AuthRequired extends Error {}

// -- API ----------------------------------------------------------------------------------

async function api(path, { method = "GET", body } = {}) {
  const headers = { Accept: "application/json" };
  const key = sessionStorage.getItem(KEY);
  if (key) headers.Authorization = `Bearer ${key}`;
  if (body !== undefined) headers["Content-Type"] = "application/json";
  const response = await fetch(new URL(path, ROOT), {
    method,
    headers,
    body: body === undefined ? undefined : JSON.stringify(body),
    cache: "no-store",
  });
  const answer = await response.json().catch(() => null);
  if (response.status === 401) {
    askForKey(key ? "The server refused that key. Enter another one." : null);
    throw new AuthRequired("an API key is needed");
  }
  if (!response.ok) {
    const error = new Error(answer?.error?.message ?? `${method} /${path} answered ${response.status}`);
    error.code = answer?.error?.code ?? null;
    // A 503's Retry-After reaches the client's reconnect loop through register().
    error.retryAfter = parseRetryAfter(response.headers.get("Retry-After"));
    throw error;
  }
  return answer;
}

function setApiStatus(text, ok) {
  const badge = $("api-status");
  badge.textContent = text;
  badge.classList.toggle("ok", ok === true);
  badge.classList.toggle("bad", ok === false);
}

// -- API key ------------------------------------------------------------------------------

const dialog = $("key-dialog");

function askForKey(reason) {
  if (reason) sessionStorage.removeItem(KEY);
  $("key-reason").textContent = reason ?? "This server requires an API key.";
  $("change-key").hidden = false;
  setApiStatus("API key needed", false);
  if (!dialog.open) {
    dialog.showModal();
    $("api-key").focus();
  }
}

$("key-form").addEventListener("submit", (event) => {
  event.preventDefault();
  const input = $("api-key");
  sessionStorage.setItem(KEY, input.value.trim());
  input.value = "";
  dialog.close();
  poll(true);
});

$("change-key").addEventListener("click", () => askForKey(null));

// -- live counters and the chart ----------------------------------------------------------

const series = { publishes: [], deliveries: [] };
let last = null; // the previous /stats answer

function formatRate(value) {
  if (value === null || value === undefined) return "–";
  return value >= 100 ? Math.round(value).toLocaleString() : value.toFixed(1);
}

function formatUptime(seconds) {
  const s = Math.floor(seconds);
  const parts = [[Math.floor(s / 86400), "d"], [Math.floor(s / 3600) % 24, "h"], [Math.floor(s / 60) % 60, "m"], [s % 60, "s"]];
  const first = parts.findIndex(([n]) => n > 0);
  return parts.slice(first === -1 ? 3 : first, (first === -1 ? 3 : first) + 2).map(([n, u]) => n + u).join(" ");
}

function showStats(stats) {
  const at = performance.now() / 1000;
  // With --workers, any worker answers with the workers' sums, which never go back.
  const group = stats.workers > 1;
  if (
    last &&
    (group
      ? stats.workers !== last.workers || stats.publishes < last.publishes || stats.deliveries < last.deliveries
      : stats.node !== last.node || stats.uptime < last.uptime)
  ) {
    // another node, or a restart: the counters started again
    last = null;
    series.publishes.length = 0;
    series.deliveries.length = 0;
  }
  let rates = [null, null];
  const dt = last ? (group ? at - last.at : stats.uptime - last.uptime) : 0;
  if (last && dt > 0) {
    rates = [(stats.publishes - last.publishes) / dt, (stats.deliveries - last.deliveries) / dt];
    push(series.publishes, rates[0]);
    push(series.deliveries, rates[1]);
  }
  last = { ...stats, at };
  $("node").textContent = stats.node;
  $("version").textContent = stats.version;
  $("uptime").textContent = formatUptime(stats.uptime);
  $("broker").textContent = stats.broker;
  $("broker").className = stats.broker === "up" ? "" : "bad-text";
  $("connections").textContent = stats.connections.toLocaleString();
  $("registrations").textContent = stats.registrations === null ? "?" : stats.registrations.toLocaleString();
  $("topics-count").textContent = stats.topics.toLocaleString();
  $("publish-rate").textContent = formatRate(rates[0]);
  $("delivery-rate").textContent = formatRate(rates[1]);
  $("slow-consumers").textContent = stats.slow_consumers.toLocaleString();
  $("chart").setAttribute(
    "aria-label",
    `Publishes and deliveries per second over the last two minutes; now ${formatRate(rates[0])} and ${formatRate(rates[1])}`,
  );
  drawChart();
}

function push(list, value) {
  list.push(value);
  if (list.length > HISTORY) list.shift();
}

function niceCeiling(value) {
  if (value <= 1) return 1;
  const magnitude = 10 ** Math.floor(Math.log10(value));
  for (const step of [1, 2, 5, 10]) if (step * magnitude >= value) return step * magnitude;
  return 10 * magnitude;
}

function drawChart() {
  const canvas = $("chart");
  const ratio = window.devicePixelRatio || 1;
  const width = canvas.clientWidth;
  const height = canvas.clientHeight;
  if (canvas.width !== Math.round(width * ratio) || canvas.height !== Math.round(height * ratio)) {
    canvas.width = Math.round(width * ratio);
    canvas.height = Math.round(height * ratio);
  }
  const ctx = canvas.getContext("2d");
  ctx.setTransform(ratio, 0, 0, ratio, 0, 0);
  ctx.clearRect(0, 0, width, height);
  const style = getComputedStyle(document.documentElement);
  const color = (name) => style.getPropertyValue(name).trim();
  const left = 48;
  const top = 8;
  const bottom = height - 20;
  const right = width - 8;
  const max = niceCeiling(Math.max(0, ...series.publishes, ...series.deliveries));
  const y = (v) => bottom - (v / max) * (bottom - top);
  const x = (i, n) => right - (n - 1 - i) * ((right - left) / (HISTORY - 1));

  ctx.font = "11px system-ui, sans-serif";
  ctx.textBaseline = "middle";
  ctx.textAlign = "right";
  ctx.lineWidth = 1;
  for (let step = 0; step <= 4; step += 1) {
    const value = (max * step) / 4;
    const py = Math.round(y(value)) + 0.5;
    ctx.strokeStyle = color("--grid");
    ctx.beginPath();
    ctx.moveTo(left, py);
    ctx.lineTo(right, py);
    ctx.stroke();
    ctx.fillStyle = color("--muted");
    ctx.fillText(String(+value.toFixed(2)), left - 6, py);
  }
  ctx.textAlign = "left";
  ctx.textBaseline = "alphabetic";
  ctx.fillText("−2 min", left, height - 4);
  ctx.textAlign = "right";
  ctx.fillText("now", right, height - 4);

  for (const [name, values] of [["--deliveries", series.deliveries], ["--publishes", series.publishes]]) {
    if (values.length < 2) continue;
    ctx.strokeStyle = color(name);
    ctx.lineWidth = 2;
    ctx.lineJoin = "round";
    ctx.beginPath();
    values.forEach((v, i) => (i ? ctx.lineTo(x(i, values.length), y(v)) : ctx.moveTo(x(i, values.length), y(v))));
    ctx.stroke();
  }
}

new ResizeObserver(() => drawChart()).observe($("chart"));

// -- topics -------------------------------------------------------------------------------

function showTopics({ topics, total }) {
  const rows = $("topic-rows");
  rows.replaceChildren(
    ...topics.map(({ topic, subscribers }) => {
      const tr = document.createElement("tr");
      const name = document.createElement("td");
      const use = document.createElement("button");
      use.type = "button";
      use.textContent = topic;
      use.title = "Use this topic in the publish and subscribe forms";
      use.addEventListener("click", () => {
        $("publish-topic").value = topic;
        $("subscribe-topics").value = topic;
      });
      name.append(use);
      const count = document.createElement("td");
      count.className = "num";
      count.textContent = subscribers.toLocaleString();
      tr.append(name, count);
      return tr;
    }),
  );
  $("topics-summary").textContent =
    total === 0
      ? "No topic has a subscriber on this node."
      : topics.length < total
        ? `The ${topics.length} busiest of ${total} topics.`
        : `${total} topic${total === 1 ? "" : "s"} with subscribers.`;
}

$("topic-filter").addEventListener("submit", (event) => event.preventDefault());
$("topic-prefix").addEventListener("input", () => refreshTopics());

async function refreshTopics() {
  const query = new URLSearchParams({ limit: "50", prefix: $("topic-prefix").value.trim() });
  showTopics(await api(`topics?${query}`));
}

// -- presence -----------------------------------------------------------------------------

// The connections subscribed to one topic on every node (GET /presence), polled with the
// topics; refreshed at once on each join or leave the subscriber below is told of (it
// is told of them for the topics it follows, where the namespace has join_leave).
let presenceTopic = "";
let presenceAsked = 0; // answers to requests older than the latest are dropped

function shortId(id) {
  return `${id.slice(0, 8)}…`;
}

function cell(text, className = null) {
  const td = document.createElement("td");
  if (className) td.className = className;
  td.textContent = text;
  return td;
}

function showPresence(topic, clients) {
  $("presence-rows").replaceChildren(
    ...clients.map(({ client, user, node, connected_at: connectedAt }) => {
      const tr = document.createElement("tr");
      const id = cell(shortId(client), "id");
      id.title = client; // the public id: never the registration id
      const since = document.createElement("time");
      const at = new Date(connectedAt * 1000);
      since.dateTime = at.toISOString();
      since.textContent = at.toLocaleTimeString();
      const when = cell("");
      when.append(since);
      const who = cell(user ?? "anonymous", user === null ? "muted" : null);
      tr.append(id, who, cell(node, "id"), when);
      return tr;
    }),
  );
  const users = new Set(clients.map((c) => c.user).filter((user) => user !== null)).size;
  const summary = $("presence-summary");
  summary.classList.remove("bad-text");
  summary.textContent =
    clients.length === 0
      ? `No connection is subscribed to ${topic}.`
      : `${clients.length} connection${clients.length === 1 ? "" : "s"}, ` +
        `${users} user${users === 1 ? "" : "s"} subscribed to ${topic}.`;
}

async function refreshPresence() {
  const topic = presenceTopic;
  if (!topic) return;
  const asked = (presenceAsked += 1);
  try {
    const answer = await api(`presence?${new URLSearchParams({ topic })}`);
    if (asked === presenceAsked && topic === presenceTopic) showPresence(topic, answer.clients);
  } catch (error) {
    if (asked !== presenceAsked || error instanceof AuthRequired) return;
    $("presence-rows").replaceChildren();
    const summary = $("presence-summary");
    summary.classList.add("bad-text");
    summary.textContent = error.code ? `Refused (${error.code}): ${error.message}` : error.message;
  }
}

const PRESENCE_HINT = [...$("presence-summary").childNodes]; // shown again for no topic

$("presence-form").addEventListener("submit", (event) => {
  event.preventDefault();
  presenceTopic = $("presence-topic").value.trim();
  presenceAsked += 1; // an answer about the previous topic is no longer wanted
  $("presence-rows").replaceChildren();
  const summary = $("presence-summary");
  summary.classList.remove("bad-text");
  if (presenceTopic) summary.textContent = "…";
  else summary.replaceChildren(...PRESENCE_HINT.map((node) => node.cloneNode(true)));
  refreshPresence();
});

// -- nodes --------------------------------------------------------------------------------
// Every node sharing the broker (GET /nodes), as its last heartbeat said; polled with the topics.

function showNodes({ node: answering, nodes }) {
  $("node-rows").replaceChildren(
    ...nodes.map((n) => {
      const tr = document.createElement("tr");
      const id = cell(n.id, "id");
      if (n.id === answering) {
        id.title = "this answer came from it";
        tr.className = "current";
      }
      const beat = document.createElement("time");
      const at = new Date(n.last_heartbeat * 1000);
      beat.dateTime = at.toISOString();
      beat.textContent = at.toLocaleTimeString();
      const when = cell("");
      when.append(beat);
      const host = cell(`${n.host} (pid ${n.pid})`);
      if (n.group) host.title = `worker of ${n.group}`;
      tr.append(
        id,
        host,
        cell(n.version),
        cell(n.connections.toLocaleString(), "num"),
        cell(n.topics.toLocaleString(), "num"),
        cell(formatUptime(n.uptime)),
        when,
      );
      return tr;
    }),
  );
  const hosts = new Set(nodes.map((n) => n.host)).size;
  $("nodes-summary").textContent =
    `${nodes.length} node${nodes.length === 1 ? "" : "s"} on ${hosts} host${hosts === 1 ? "" : "s"} ` +
    "sharing the broker; each writes its line every third of --presence-ttl.";
}

async function refreshNodes() {
  try {
    showNodes(await api("nodes"));
  } catch (error) {
    if (error instanceof AuthRequired) return;
    const summary = $("nodes-summary");
    summary.textContent = error.code ? `Refused (${error.code}): ${error.message}` : error.message;
  }
}

// -- polling ------------------------------------------------------------------------------

let ticks = 0;
let timer = null;

async function poll(now = false) {
  clearTimeout(timer);
  if (!dialog.open) {
    try {
      showStats(await api("stats"));
      if (now || ticks % 2 === 0) await Promise.all([refreshTopics(), refreshPresence(), refreshNodes()]);
      setApiStatus("live", true);
    } catch (error) {
      if (!(error instanceof AuthRequired)) {
        setApiStatus(error instanceof TypeError ? "server unreachable" : error.message, false);
        $("publish-rate").textContent = "–";
        $("delivery-rate").textContent = "–";
      }
    }
    ticks += 1;
  }
  timer = setTimeout(poll, 1000);
}

// -- publish ------------------------------------------------------------------------------

function userId(input) {
  const value = input.value.trim();
  return value === "" ? null : value;
}

// Publishing as a client goes over the subscriber's own WebSocket, under the topic's
// namespace rules and the grants it registered with; a refusal shows its code.
$("publish-as-client").addEventListener("change", (event) => {
  $("publish-user").disabled = event.target.checked; // a client publish targets no user
});

// The message as typed, or with "JSON value" checked, the value its text holds (an
// object, array, number, true, false, null or a quoted string); throws if it holds none.
function messageValue() {
  const text = $("publish-message").value;
  if (!$("publish-json").checked) return text;
  try {
    return JSON.parse(text);
  } catch (error) {
    throw new Error(`Not JSON: ${error.message}`);
  }
}

async function publishAsClient(result, message) {
  const topic = $("publish-topic").value.trim();
  if (!relay || relay.state !== "open") {
    result.className = "bad";
    result.textContent = "Not connected: subscribe first, then publish as that client.";
    return;
  }
  try {
    const { offset, duplicate } = await relay.publish(topic, message);
    result.textContent = duplicate
      ? `Duplicate of offset ${offset}: nothing was published.`
      : `Published as a client at offset ${offset}.`;
  } catch (error) {
    result.className = "bad";
    result.textContent = error.code ? `Refused (${error.code}): ${error.message}` : String(error.message ?? error);
  }
}

$("publish-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  const result = $("publish-result");
  let message;
  try {
    message = messageValue();
  } catch (error) {
    result.className = "bad";
    result.textContent = error.message; // nothing was sent
    return;
  }
  if ($("publish-as-client").checked) {
    result.className = "";
    result.textContent = "publishing…";
    await publishAsClient(result, message);
    return;
  }
  const body = {
    topic: $("publish-topic").value.trim(),
    message,
    user_id: userId($("publish-user")),
  };
  result.className = "";
  result.textContent = "publishing…";
  try {
    const { recipients } = await api("publish", { method: "POST", body });
    result.textContent = `Delivered to ${recipients} connection${recipients === 1 ? "" : "s"}.`;
  } catch (error) {
    result.className = "bad";
    result.textContent = error.message;
  }
});

// -- subscribe ----------------------------------------------------------------------------

let relay = null;
let received = 0;

const STATES = {
  idle: ["not connected", null],
  connecting: ["connecting…", null],
  open: ["connected", true],
  reconnecting: ["reconnecting…", false],
  closed: ["stopped", false],
};

function showClientState(state) {
  const [text, ok] = STATES[state];
  const el = $("client-state");
  el.textContent = text;
  el.classList.toggle("ok", ok === true);
  el.classList.toggle("bad", ok === false);
}

// What went wrong, for the detail line: the server's message, and for a refusal that
// stops the client for good, what to do about it.
function describe(error) {
  if (error?.code === "origin_not_allowed") {
    return `${error.message} (origin_not_allowed): the relay's --allowed-origin must include ${location.origin}`;
  }
  return error?.message ?? String(error);
}

function detail(text, bad = false) {
  const el = $("client-detail");
  el.textContent = text;
  el.classList.toggle("bad-text", bad);
}

// Chips show what the server acknowledged; while reconnecting they are marked pending
// until the server confirms the resubscription.
function showSubscribed(topics, pending = false) {
  $("subscribed").replaceChildren(
    ...topics.map((topic) => {
      const li = document.createElement("li");
      if (pending) {
        li.className = "pending";
        li.title = "waiting for the server to confirm";
      }
      const name = document.createElement("span");
      name.textContent = topic;
      const remove = document.createElement("button");
      remove.type = "button";
      remove.textContent = "×";
      remove.setAttribute("aria-label", `Unsubscribe from ${topic}`);
      remove.addEventListener("click", () => relay?.unsubscribe(topic).catch((e) => detail(e.message, true)));
      li.append(name, remove);
      return li;
    }),
  );
}

function logRow(topic, message, className = null) {
  const li = document.createElement("li");
  if (className) li.className = className;
  const time = document.createElement("time");
  const now = new Date();
  time.dateTime = now.toISOString();
  time.textContent = now.toLocaleTimeString();
  const name = document.createElement("span");
  name.className = "topic";
  name.textContent = topic;
  const text = document.createElement("span");
  text.className = "text";
  text.textContent = message; // text, never HTML
  li.append(time, name, text);
  const list = $("messages");
  list.prepend(li);
  while (list.children.length > MESSAGES) list.lastElementChild.remove();
}

// A string is shown as its text; any other JSON value as its JSON text, marked as such.
function addMessage(topic, message) {
  if (typeof message === "string") logRow(topic, message);
  else logRow(topic, JSON.stringify(message), "json");
  received += 1;
  $("message-count").textContent = `(${received})`;
}

const LOST = {
  epoch_changed: "the relay lost its history (e.g. it restarted on the memory broker)",
  too_far_behind: "the relay's history no longer reaches back that far",
  gap: "the relay lost publications on their way here",
};

// The client recovers what was published while it was disconnected; when it cannot,
// the log says so where the missing messages would be.
function addNotRecovered({ topic, reason }) {
  logRow(topic, `Not recovered: messages may have been missed; ${LOST[reason] ?? reason}.`, "notice");
}

// Joins and leaves go to the log, not counted as messages; they refresh the presence list
// when it shows their topic.
function addPresenceEvent(verb, { topic, user, client }) {
  const who = user === null ? "anonymous client" : `user ${user}, client`;
  logRow(topic, `${verb}: ${who} ${shortId(client)}`, "presence");
  if (topic === presenceTopic) refreshPresence();
}

function shortUrl(url) {
  return url.replace(/\/ws\/([0-9a-f]{8})[0-9a-f]+/, "/ws/$1…");
}

function newRelay(user, publishGrants = []) {
  const body = { user_id: user, topics: [] };
  if (publishGrants.length) body.grants = { publish: publishGrants };
  const client = new Relay({
    register: async () => (await api("register", { method: "POST", body })).url,
    maxDelay: 5000, // a console should come back quickly
  });
  client.addEventListener("state", (event) => showClientState(event.detail.state));
  client.addEventListener("open", ({ detail: d }) => {
    detail(`on ${shortUrl(d.url)} over ${d.transport === "sse" ? "server-sent events" : "WebSocket"}`);
  });
  client.addEventListener("subscribed", (event) => {
    showSubscribed(event.detail.topics);
    refreshPresence(); // its own join is not announced to it
  });
  client.addEventListener("error", (event) => detail(describe(event.detail.error), true));
  client.addEventListener("close", ({ detail: d }) => {
    const why = `closed (${d.code ?? "no connection"}${d.reason ? `: ${d.reason}` : ""})`;
    detail(d.reconnect ? `${why}; retrying in ${(d.delay / 1000).toFixed(1)} s` : why, !d.reconnect);
    showSubscribed(client.topics, true);
  });
  client.addEventListener("notrecovered", (event) => addNotRecovered(event.detail));
  client.addEventListener("join", (event) => addPresenceEvent("Joined", event.detail));
  client.addEventListener("leave", (event) => addPresenceEvent("Left", event.detail));
  client.on("*", (message, topic) => addMessage(topic, message));
  return client;
}

$("subscribe-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  const input = $("subscribe-topics");
  const topics = input.value.split(/[\s,]+/).filter(Boolean);
  if (topics.length === 0) {
    detail("Enter one or more topics, separated by spaces.", true);
    return;
  }
  try {
    if (!relay) {
      const grants = $("subscribe-grants").value.split(/[\s,]+/).filter(Boolean);
      relay = newRelay(userId($("subscribe-user")), grants);
      $("subscribe-user").disabled = true;
      $("subscribe-grants").disabled = true;
      $("disconnect").disabled = false;
    }
    if (relay.state === "idle" || relay.state === "closed") relay.connect().catch(() => {});
    const pending = relay.subscribe(...topics);
    input.value = "";
    await pending;
  } catch (error) {
    detail(describe(error), true);
  }
});

$("disconnect").addEventListener("click", () => {
  if (!relay) return;
  const url = relay.url;
  relay.close();
  relay = null;
  showClientState("idle");
  showSubscribed([]);
  detail("");
  $("subscribe-user").disabled = false;
  $("subscribe-grants").disabled = false;
  $("disconnect").disabled = true;
  const id = url?.match(/\/ws\/([^/?]+)/)?.[1];
  if (id) {
    api(`register/${id}`, { method: "DELETE" })
      .catch(() => {}) // it may be gone already
      .finally(() => refreshPresence());
  }
});

$("clear-messages").addEventListener("click", () => {
  $("messages").replaceChildren();
  received = 0;
  $("message-count").textContent = "(0)";
});

poll(true);
