#!/bin/sh
# Idle connections' memory by owner (docs/decisions/0012): wsrelay serve with the probe in
# this directory, N idle subscribers from bench/fanout.py, the report in /tmp/memprobe.<pid>.
#   N=8000 sh bench/probes/memory/run.sh
set -e
cd "$(dirname "$0")/../../.."
N=${N:-8000}
PORT=$(python -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
PYTHONTRACEMALLOC=1 PYTHONPATH=src:bench/probes/memory WSRELAY_MAX_CONNECTIONS=$((N + 100)) \
    taskset -c 0 python -m wsrelay serve --host 127.0.0.1 --port "$PORT" >/tmp/memprobe.log 2>&1 &
SERVER=$!
for _ in $(seq 100); do curl -sf "http://127.0.0.1:$PORT/health" >/dev/null && break; sleep 0.2; done
kill -USR2 $SERVER
sleep 1
python bench/fanout.py --target "http://127.0.0.1:$PORT" --server-pid $SERVER --scenario idle \
    --clients "$N" --hold 12 --pin >/tmp/memprobe.out 2>/dev/null &
BENCH=$!
while [ "$(ss -Htn state established "( sport = :$PORT )" | wc -l)" -lt "$N" ]; do sleep 0.2; done
sleep 3
kill -USR1 $SERVER
wait $BENCH
kill $SERVER
wait $SERVER || true
cat "/tmp/memprobe.$SERVER"
