#!/usr/bin/env bash
# Installs the off-the-shelf systems `portcullis bench compare` measures Portcullis against:
#   - nginx, from Debian's packages (apt-get; run as root or with sudo), used at /usr/sbin/nginx;
#   - rathole, from crates.io, built into target/bench-tools/bin/rathole (never committed).
# Both are skipped when already present. Re-run any time; it does nothing the second time.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ -x /usr/sbin/nginx ] || command -v nginx >/dev/null 2>&1; then
  echo "nginx: already installed ($(command -v nginx || echo /usr/sbin/nginx))"
else
  echo "nginx: installing from Debian's packages"
  sudo_cmd=()
  if [ "$(id -u)" -ne 0 ]; then sudo_cmd=(sudo); fi
  export DEBIAN_FRONTEND=noninteractive
  "${sudo_cmd[@]}" apt-get update -q
  "${sudo_cmd[@]}" apt-get install -y -q --no-install-recommends nginx
fi

root="target/bench-tools"
if [ -x "$root/bin/rathole" ]; then
  echo "rathole: already installed ($root/bin/rathole)"
elif command -v rathole >/dev/null 2>&1; then
  echo "rathole: already on PATH ($(command -v rathole))"
else
  echo "rathole: building from crates.io into $root (takes a few minutes)"
  # Not --locked: rathole 0.5.0's lock file pins time 0.3.29, which no longer compiles with
  # current Rust (E0282 in format_description). Only the plain-TCP and Noise transports are
  # built: the comparison uses plain TCP, and this keeps OpenSSL (native-tls) out of it.
  cargo install rathole --version 0.5.0 --root "$root" --no-default-features \
    --features server,client,noise
fi
echo "done: run \`portcullis bench compare --help\`"
