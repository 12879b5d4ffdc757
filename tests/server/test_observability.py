"""GET /metrics, GET /ready and the structured logs, against real servers."""

from __future__ import annotations

import json

import aiohttp
import websockets
from prometheus_client.parser import text_string_to_metric_families

from tests.utils import Api, ServerProcess

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


async def scrape(session: aiohttp.ClientSession, server: ServerProcess) -> tuple[str, Samples]:
    async with session.get(server.url + "/metrics") as response:
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        text = await response.text()
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return text, samples


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


async def test_metrics_count_what_happened_without_client_ids(start_server, session, topic) -> None:
    server = start_server()
    api = Api(session, server.url)
    _, before = await scrape(session, server)
    assert value(before, "wsrelay_connections") == 0
    assert value(before, "wsrelay_ready") == 1
    sub = await api.connect(1, [topic])
    other = await api.connect(2, [topic], fmt="raw")
    assert await api.publish(topic, "one") == 2
    assert await api.publish(f"{topic}.nobody", "two") == 0
    await sub.message()
    await other.raw()
    text, during = await scrape(session, server)
    assert value(during, "wsrelay_connections") == 2
    assert value(during, "wsrelay_registrations") == 2
    assert value(during, "wsrelay_topics") == 1
    assert value(during, "wsrelay_publishes_total") == 2
    assert value(during, "wsrelay_deliveries_total") == 2
    assert value(during, "wsrelay_connections_opened_total") == 2
    assert value(during, "wsrelay_frames_sent_total") >= 2
    assert value(during, "wsrelay_sent_bytes_total") > 0
    assert value(during, "wsrelay_outbox_bytes") == 0  # both clients keep up
    assert value(during, "wsrelay_slow_consumer_disconnects_total") == 0
    hist = "wsrelay_http_request_duration_seconds_count"
    assert value(during, hist, method="POST", route="/publish", status="200") == 2

    await other.close()
    status, _ = await api.call("DELETE", f"/register/{sub.id}")
    assert status == 200
    await sub.closed()
    await api.call("DELETE", f"/register/{sub.id}")  # 404
    text, after = await scrape(session, server)
    assert value(after, "wsrelay_connections") == 0
    assert value(after, "wsrelay_connections_closed_total", code="1000") == 2
    assert value(after, hist, method="DELETE", route="/register/{client_id}", status="200") == 1
    assert value(after, hist, method="DELETE", route="/register/{client_id}", status="404") == 1
    assert sub.id not in text and other.id not in text and sub.id[:8] not in text

    # probing random paths adds no series: they share one "unmatched" route label
    for i in range(20):
        await api.call("GET", f"/no/such/path/{i}")
    _, probed = await scrape(session, server)
    series = [k for k in probed if k[0] == hist]
    assert value(probed, hist, method="GET", route="unmatched", status="404") == 20
    assert len(series) == len([k for k in after if k[0] == hist]) + 1


async def test_ready_answers_200_while_the_node_accepts_publishes(api: Api) -> None:
    assert await api.call("GET", "/ready") == (200, {"status": "ready"})


async def test_json_logs_one_line_per_connection_and_refusal(start_server, session, topic):
    server = start_server("--log-format", "json", "--max-message-size", "100")
    api = Api(session, server.url)
    sub = await api.connect(7, [topic])
    await sub.close()  # closed by the client
    big = await api.connect(8, [topic])
    await big.ws.send("x" * 200)  # closed by the server: 1009
    await big.closed()
    await api.call("DELETE", f"/register/{sub.id}")
    await api.call("DELETE", f"/register/{sub.id}")  # refused: 404
    ws = await websockets.connect(sub.url.replace(sub.id, big.id))  # big's, reconnected
    await api.call("DELETE", f"/register/{big.id}")  # closed by the server: 1000
    await ws.wait_closed()
    await api.call("GET", "/health")
    assert server.stop() == 0
    lines = [line for line in server.output if not line.startswith("wsrelay listening on")]
    entries = [json.loads(line) for line in lines]  # every log line is one JSON object
    assert all({"time", "level", "logger", "message"} <= e.keys() for e in entries)
    opened = [e for e in entries if e.get("event") == "ws_open"]
    closed = [e for e in entries if e.get("event") == "ws_close"]
    assert [e["client"] for e in opened] == [sub.id[:8] + "…", big.id[:8] + "…", big.id[:8] + "…"]
    assert [(e["code"], e["by"]) for e in closed] == [
        (1000, "client"),
        (1009, "server"),
        (1000, "server"),
    ]
    assert closed[2]["reason"] == "unregistered"
    refused = [e for e in entries if e.get("event") == "http_refused"]
    assert [(e["route"], e["status"], e["code"]) for e in refused] == [
        ("/register/{client_id}", 404, "unknown_client")
    ]
    assert sub.id not in server.log() and big.id not in server.log()


async def test_the_memory_history_reports_its_size_and_evictions(start_server, session) -> None:
    server = start_server("--history-memory", "16KiB")
    api = Api(session, server.url)
    _, before = await scrape(session, server)
    assert value(before, "wsrelay_history_evicted_topics_total") == 0
    assert value(before, "wsrelay_gaps_total") == 0
    for i in range(40):
        await api.publish(f"history.{i}", "x" * 1000)
    _, after = await scrape(session, server)
    assert 0 < value(after, "wsrelay_history_bytes") <= 16 * 1024
    assert value(after, "wsrelay_history_evicted_topics_total") >= 20
    status, first = await api.call("GET", "/history", params={"topic": "history.0"})
    assert status == 200 and first["publications"] == []  # evicted: the oldest went first
    status, last = await api.call("GET", "/history", params={"topic": "history.39"})
    assert [p["message"] for p in last["publications"]] == ["x" * 1000]
