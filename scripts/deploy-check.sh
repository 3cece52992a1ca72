#!/usr/bin/env bash
# Checks deploy/ with the tools each format has (README.md, "Deploy"); .ci/run installs them.
#
#   scripts/deploy-check.sh [PORTCULLIS_BINARY]
#
# - deploy/Dockerfile: hadolint (no image is built here: there is no container runtime);
# - deploy/kubernetes/*.yaml: kubernetes-validate --strict (unknown fields are errors) against
#   the oldest Kubernetes the manifests need (1.33: the preStop sleep action on by default)
#   and the newest the installed kubernetes-validate knows;
# - deploy/systemd/*.service: `systemd-analyze verify`, where the machine has it (any message
#   fails: verify itself exits 0 on an unknown key), and `systemd-analyze security` at most 2.0 (threshold 20: tenths).
#   verify wants ExecStart's program to exist: the units are checked with PORTCULLIS_BINARY
#   (default target/debug/portcullis, else /bin/true) in its place.
# The configurations in the ConfigMaps are parsed by portcullis itself in
# crates/portcullis/tests/cli/deploy.rs (cargo test -p portcullis --test cli deploy).
set -euo pipefail
cd "$(dirname "$0")/.."

oldest=1.33.0
newest=$(kubernetes-validate --help | sed -n 's/.*Defaults to \([0-9.]*\).*/\1/p')
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

echo "hadolint deploy/Dockerfile"
hadolint deploy/Dockerfile

for version in "$oldest" "$newest"; do
  echo "kubernetes-validate --strict -k $version deploy/kubernetes/*.yaml"
  kubernetes-validate --strict --quiet -k "$version" deploy/kubernetes/*.yaml
done

if command -v systemd-analyze >/dev/null 2>&1; then
  binary=${1:-target/debug/portcullis}
  [ -x "$binary" ] || binary=/bin/true
  binary=$(realpath "$binary")
  mkdir "$work/units"
  for unit in deploy/systemd/*.service; do
    sed "s#/usr/local/bin/portcullis#$binary#" "$unit" > "$work/units/$(basename "$unit")"
  done
  echo "systemd-analyze verify deploy/systemd/*.service (ExecStart: $binary)"
  said=$(systemd-analyze verify "$work"/units/*.service 2>&1) || { echo "$said"; exit 1; }
  if [ -n "$said" ]; then
    echo "$said"
    exit 1
  fi
  for unit in "$work"/units/*.service; do
    systemd-analyze security --offline=yes --threshold=20 "$unit" | tail -1
  done
else
  echo "systemd-analyze is not on this machine: the systemd units are not verified"
fi
echo "deploy/: all checks passed"
