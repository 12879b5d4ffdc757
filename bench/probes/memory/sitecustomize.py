"""Where an idle connection's memory goes: a probe loaded into ``wsrelay serve`` (0012).

    PYTHONTRACEMALLOC=1 PYTHONPATH=src:bench/probes/memory python -m wsrelay serve ...
    kill -USR2 <pid>    # before the connections: the first tracemalloc snapshot
    kill -USR1 <pid>    # while they are idle: /tmp/memprobe.<pid> is written

The report: traced growth per ``NativeConnection`` by allocation line and by file, then the
``sys.getsizeof`` of one connection's objects (its slots, the websockets protocol and its
attributes, the session and client). ``bench/probes/memory/run.sh`` does the whole run.
Loaded only with ``PYTHONTRACEMALLOC`` set; it is a measuring aid, not part of wsrelay.
"""

from __future__ import annotations

import gc
import os
import signal
import sys
import tracemalloc
from typing import Any, TextIO

_snapshots: dict[str, tracemalloc.Snapshot] = {}


def _short(path: str) -> str:
    return path.split("site-packages/")[-1].split("src/")[-1]


def _show(out: TextIO, name: str, obj: object) -> None:
    inner = getattr(obj, "__dict__", None)
    extra = f" + __dict__ {sys.getsizeof(inner)}" if inner is not None else ""
    out.write(f"{name:40} {type(obj).__name__:24} {sys.getsizeof(obj)}{extra}\n")


def _fields(obj: object) -> list[tuple[str, Any]]:
    names = [s for k in type(obj).__mro__ for s in getattr(k, "__slots__", ())]
    names += list(getattr(obj, "__dict__", {}) or {})
    found = []
    for name in sorted(set(names)):
        try:
            value = getattr(obj, name)
        except AttributeError:
            continue
        if value is not None and not isinstance(value, (bool, int, float)):
            found.append((name, value))
    return found


def _walk(out: TextIO, connection: object) -> None:
    out.write("--- one connection, sys.getsizeof of each object\n")
    _show(out, "NativeConnection", connection)
    for name, value in _fields(connection):
        _show(out, f"  .{name}", value)
        if type(value).__name__ in ("WebSocketProtocol", "Session", "Client"):
            for inner_name, inner in _fields(value):
                _show(out, f"    .{inner_name}", inner)


def _before(*_: object) -> None:
    gc.collect()
    _snapshots["before"] = tracemalloc.take_snapshot()


def _after(*_: object) -> None:
    gc.collect()
    after = tracemalloc.take_snapshot()
    connections = [o for o in gc.get_objects() if type(o).__name__ == "NativeConnection"]
    n = len(connections)
    with open(f"/tmp/memprobe.{os.getpid()}", "w") as out:
        out.write(f"connections {n}\n")
        if "before" in _snapshots and n:
            stats = after.compare_to(_snapshots["before"], "lineno")
            out.write(f"traced growth per connection {sum(s.size_diff for s in stats) / n:.0f} B\n")
            for s in stats[:45]:
                frame = s.traceback[0]
                where = f"{_short(frame.filename)}:{frame.lineno}"
                out.write(f"{s.size_diff / n:8.1f} B {s.count_diff / n:6.2f} blocks  {where}\n")
            out.write("--- by file\n")
            for s in after.compare_to(_snapshots["before"], "filename")[:20]:
                out.write(f"{s.size_diff / n:8.1f} B  {_short(s.traceback[0].filename)}\n")
        if n:
            _walk(out, connections[0])


if os.environ.get("PYTHONTRACEMALLOC"):
    signal.signal(signal.SIGUSR2, _before)
    signal.signal(signal.SIGUSR1, _after)
