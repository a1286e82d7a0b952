#!/bin/sh
# Three integrand nodes and HAProxy on this machine, on one PostgreSQL database (docs/cluster.md).
#
#   INTEGRAND_STORE_DSN=postgresql://postgres@127.0.0.1:5432/integrand examples/cluster/run.sh
#
# Webhooks go to http://127.0.0.1:8080/hooks/demo; HAProxy's view of the nodes is at
# http://127.0.0.1:8404/stats. Ctrl-C stops everything (each node finishes its in-flight work).
set -eu
cd "$(dirname "$0")"
: "${INTEGRAND_STORE_DSN:?set INTEGRAND_STORE_DSN to the PostgreSQL database the nodes share}"
# The demo source's signing secret (the same one config.toml and the tests use); use your own.
export DEMO_WEBHOOK_SECRET="${DEMO_WEBHOOK_SECRET:-whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw}"
export INTEGRAND_STORE_DSN
INTEGRAND="${INTEGRAND:-$(command -v integrand || echo ../../.venv/bin/integrand)}"
HAPROXY="${HAPROXY:-$(command -v haproxy || echo ../../.venv/tools/usr/sbin/haproxy)}"

pids=""
stop() {
    trap - INT TERM EXIT
    [ -n "$pids" ] && kill $pids 2>/dev/null
    wait
}
trap stop INT TERM EXIT

for n in 1 2 3; do
    "$INTEGRAND" check -c "node$n.toml" >/dev/null
    "$INTEGRAND" run -c "node$n.toml" &
    pids="$pids $!"
done
"$HAPROXY" -c -q -f haproxy.cfg
"$HAPROXY" -f haproxy.cfg -db &
pids="$pids $!"
echo "three nodes behind http://127.0.0.1:8080 (try: $INTEGRAND send demo -c node1.toml --url http://127.0.0.1:8080/hooks/demo < event.json)"
wait
