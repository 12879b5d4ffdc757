"""Kernel cost of one small loopback TCP send / recv on this machine (calibration for fanout.py).

    python bench/loopback.py [--size 100] [--count 200000]

A relay that writes each delivery with its own syscall pays at least the ``send`` figure per
delivery, and a subscriber that reads each frame separately pays the ``recv`` figure, whatever
the language. Compare with "server CPU us/delivery" and "client CPU us/delivery".
"""

from __future__ import annotations

import argparse
import socket
import time


def measure(size: int, count: int) -> dict[str, float]:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        sender = socket.create_connection(listener.getsockname())
        receiver, _ = listener.accept()
    with sender, receiver:
        sender.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        payload = b"x" * size
        start = time.perf_counter()
        for _ in range(count):
            sender.send(payload)
            receiver.recv(65536)
        pair = (time.perf_counter() - start) / count
        start = time.perf_counter()
        for i in range(count):
            sender.send(payload)
            if i % 100 == 99:  # drain in big reads, so the loop times the sends
                while True:
                    try:
                        receiver.recv(1 << 20, socket.MSG_DONTWAIT)
                    except BlockingIOError:
                        break
        send = (time.perf_counter() - start) / count
    return {"send_us": send * 1e6, "send_recv_us": pair * 1e6, "recv_us": (pair - send) * 1e6}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--size", type=int, default=100, help="bytes per send (default 100)")
    parser.add_argument("--count", type=int, default=200_000, help="sends to time")
    args = parser.parse_args()
    r = measure(args.size, args.count)
    print(
        f"loopback TCP, {args.size} B: send {r['send_us']:.1f} us, "
        f"recv {r['recv_us']:.1f} us, send+recv {r['send_recv_us']:.1f} us (wall, per call)"
    )


if __name__ == "__main__":
    main()
