#!/usr/bin/env bash
# Set-up for serving: Node.js (>= 20) and npm alone, no root, no apt, no Python: npm dependencies
# (from package-lock.json), generated protos, the TypeScript build, and the `cfrsam` command.
# What ./run.sh runs. Idempotent; safe to run again.
#   CFRSAM_BIN_DIR=DIR   where to link `cfrsam` (default: ~/.local/bin, or /usr/local/bin as root,
#                        whichever is on PATH); CFRSAM_BIN_DIR=none links nothing.
set -euo pipefail
cd "$(dirname "$0")/.."

node_major=$(node -p 'process.versions.node.split(".")[0]' 2>/dev/null || echo 0)
if [ "$node_major" -lt 20 ]; then
  echo "setup: Node.js >= 20 is needed (found: $(node --version 2>/dev/null || echo none))" >&2
  exit 1
fi

echo "setup: npm install (from package-lock.json)"
# npm ci refuses this lockfile: the registry mirror lacks buf's other-platform optional packages,
# so they are not locked; npm install keeps every locked version and skips them.
npm install --no-audit --no-fund
echo "setup: build (protos + TypeScript)"
npm run build

# `cfrsam`: the gateway's "bin" in node_modules/.bin (npx cfrsam), and on PATH too. npm links a
# workspace's bin only when its target exists at install time; on a fresh clone dist/ is built
# after the install, so the link is made here as npm would make it.
cli="$PWD/services/gateway/dist/cli/main.js"
chmod +x "$cli"
[ -e node_modules/.bin/cfrsam ] || ln -sfn ../@cfrsam/gateway/dist/cli/main.js node_modules/.bin/cfrsam
bin_dir="${CFRSAM_BIN_DIR:-}"
if [ -z "$bin_dir" ]; then
  for d in "$HOME/.local/bin" /usr/local/bin; do
    case ":$PATH:" in *":$d:"*) if [ -w "$d" ] || { [ "$d" = "$HOME/.local/bin" ] && mkdir -p "$d" 2>/dev/null; }; then bin_dir="$d"; break; fi ;; esac
  done
fi
if [ -n "$bin_dir" ] && [ "$bin_dir" != none ]; then
  mkdir -p "$bin_dir"
  ln -sfn "$cli" "$bin_dir/cfrsam"
  echo "setup: cfrsam -> $bin_dir/cfrsam ($(cfrsam --version 2>/dev/null || "$bin_dir/cfrsam" --version))"
else
  echo "setup: cfrsam is node_modules/.bin/cfrsam (npx cfrsam, or add $PWD/node_modules/.bin to PATH)"
fi
echo "setup: serving ready"
