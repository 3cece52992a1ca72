#!/usr/bin/env bash
# Instructions the gateway and the connector spend per request, counted by callgrind: the
# difference between a run of N2 and a run of N1 requests, divided by N2-N1, so start-up and
# handshakes cancel out. Instruction counts repeat on a shared, noisy machine; timings do not.
#
#   scripts/callgrind-per-request.sh [N1] [N2]          # keep-alive, defaults 500 2500
#   MODE=handshake scripts/callgrind-per-request.sh 200 700
#   MODE=handshake EXTRA=--tls-resumption scripts/callgrind-per-request.sh 200 700
#   KEEP=/tmp/cg scripts/callgrind-per-request.sh     # also keep the callgrind files there
#
# Needs valgrind and curl, and a release build (cargo build --release -p portcullis).
set -euo pipefail
cd "$(dirname "$0")/.."
N1=${1:-500}; N2=${2:-2500}
# PORTCULLIS=/path/to/another/build measures that binary instead (an earlier commit, say).
P=${PORTCULLIS:-$PWD/target/release/portcullis}
[ -x "$P" ] || { echo "build first: cargo build --release -p portcullis" >&2; exit 2; }
command -v valgrind >/dev/null || { echo "install valgrind (apt-get install valgrind)" >&2; exit 2; }
work=$(mktemp -d)
trap 'pkill -f "$work" 2>/dev/null || true; rm -rf "$work"' EXIT
"$P" pki init --out "$work/lab" >/dev/null
cd "$work/lab"
MP_PORT=${MP_PORT:-19001}; GW_PORT=${GW_PORT:-19443}
printf 'listen = "127.0.0.1:%s"\ncert = "mp/server.crt"\nkey = "mp/server.key"\ntrusted_roots = ["ca/root.crt"]\n' "$MP_PORT" > mp.toml
printf 'listen = "127.0.0.1:%s"\ncert = "gateway/server.crt"\nkey = "gateway/server.key"\ntrusted_roots = ["ca/root.crt"]\nconnector_roots = ["ca/root.crt"]\nallowed_connectors = ["Portcullis Connector Channel"]\n[log]\nconsole = "off"\n' "$GW_PORT" > gateway.toml
printf 'connector_id = "c1"\ngateways = ["localhost:%s"]\ngateway_roots = ["ca/root.crt"]\nchannel_cert = "connector/channel.crt"\nchannel_key = "connector/channel.key"\nclient_cert_store = "connector/store"\nallowed_roots = ["ca/root.crt"]\nendpoint_roots = ["ca/root.crt"]\n[log]\nconsole = "off"\nfile = "logs/SMS_Cloud_ProxyConnector.log"\n[[endpoints]]\nid = 7\nname = "SMS_MP"\nurl = "https://localhost:%s"\n' "$GW_PORT" "$MP_PORT" > connector.toml

run() {
  "$P" mp --config "$work/lab/mp.toml" > mp.out 2>&1 &
  local mp=$!
  valgrind --tool=callgrind --callgrind-out-file="$work/gw.$1" "$P" gateway --config "$work/lab/gateway.toml" > gw.out 2>&1 &
  local gw=$!
  sleep 3
  valgrind --tool=callgrind --callgrind-out-file="$work/cn.$1" "$P" connector --config "$work/lab/connector.toml" > cn.out 2>&1 &
  local cn=$!
  for _ in $(seq 1 100); do
    sleep 0.3
    # ServiceMetadata names channels to an authenticated device only.
    curl -s --cacert ca/root.crt --cert devices/device-001.crt --key devices/device-001.key \
      "https://localhost:$GW_PORT/CCM_PROXY_MUTUALAUTH/ServiceMetadata" | grep -q '"channels":2' && break
  done
  "$P" bench load "https://localhost:$GW_PORT/CCM_PROXY_MUTUALAUTH/7/SMS_MP/.sms_aut?MPLIST" --ca ca/root.crt \
    --cert devices/device-001.crt --key devices/device-001.key -c 4 -n "$1" --timeout 60 \
    --mode "${MODE:-keepalive}" ${EXTRA:-} 2>/dev/null | sed -n 2p
  kill -TERM "$cn"; wait "$cn" 2>/dev/null || true
  kill -TERM "$gw"; wait "$gw" 2>/dev/null || true
  kill "$mp"; wait "$mp" 2>/dev/null || true
}
total() { callgrind_annotate "$1" 2>/dev/null | awk '/PROGRAM TOTALS/ && !done {gsub(",","",$1); print $1; done=1}'; }
run "$N1"; run "$N2"
if [ -n "${KEEP:-}" ]; then mkdir -p "$KEEP" && cp "$work"/gw.* "$work"/cn.* "$KEEP"/; fi
for c in gw:gateway cn:connector; do
  a=$(total "$work/${c%%:*}.$N1"); b=$(total "$work/${c%%:*}.$N2")
  echo "${c#*:}: $(( (b - a) / (N2 - N1) )) instructions per request (${MODE:-keepalive}${EXTRA:+ $EXTRA})"
done
