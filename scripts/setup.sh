#!/usr/bin/env bash
# Sets up a fresh clone: system packages (PyTorch and friends for the model package, nats-server
# for the shared cache and slide jobs), npm dependencies, generated protos and compiled services.
# Idempotent; safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."

debs=(python3-torch python3-onnx python3-numpy python3-scipy python3-pil python3-pytest python3-flake8 black nats-server libopenslide0 openssl)
missing=()
for d in "${debs[@]}"; do
  dpkg-query -W -f='${Status}' "$d" 2>/dev/null | grep -q "install ok installed" || missing+=("$d")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "setup: installing Debian packages: ${missing[*]}"
  sudo_cmd=""
  [ "$(id -u)" -ne 0 ] && sudo_cmd="sudo"
  $sudo_cmd apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo_cmd apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi

echo "setup: npm install (from package-lock.json)"
# npm ci refuses this lockfile: the registry mirror lacks buf's other-platform optional packages,
# so they are not locked; npm install keeps every locked version and skips them.
npm install --no-audit --no-fund
echo "setup: build (protos + TypeScript)"
npm run build
echo "setup: done"
