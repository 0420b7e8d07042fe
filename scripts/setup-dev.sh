#!/usr/bin/env bash
# Set-up for training, development and the tests (as root or with sudo): Debian packages for the
# model package (PyTorch and friends), nats-server (shared feature cache, slide jobs),
# libopenslide0, and the Python client's build and test (gRPC, protoc with the gRPC Python plugin,
# venv) and openssl (test certificates). Serving needs none of this (scripts/setup-serving.sh). Idempotent; safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."

# Python client (clients/python): grpc_tools.protoc of Debian's python3-grpc-tools is protoc 3.5,
# which refuses proto3 `optional`, so the stubs are made with protobuf-compiler (3.21) and
# protobuf-compiler-grpc's grpc_python_plugin.
debs=(python3-torch python3-onnx python3-numpy python3-scipy python3-pil python3-pytest python3-flake8 black nats-server libopenslide0 openssl
  python3-grpcio python3-protobuf protobuf-compiler protobuf-compiler-grpc python3-venv python3-pip python3-setuptools python3-wheel)
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
echo "setup: Debian packages for training, development and tests present"
