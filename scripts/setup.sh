#!/usr/bin/env bash
# Full set-up of a fresh clone (what CI runs): the Debian packages for training, development and
# the tests (scripts/setup-dev.sh), then serving: npm dependencies, generated protos, the
# TypeScript build and the `cfrsam` command (scripts/setup-serving.sh, Node and npm alone; what
# ./run.sh runs). Idempotent; safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup-dev.sh
./scripts/setup-serving.sh
echo "setup: done"
