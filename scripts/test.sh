#!/usr/bin/env bash
# All tests: lint, the model package (pytest), the committed bundle still matching the code, and the
# TypeScript unit and integration tests (real services over loopback gRPC, real nats-server).
set -euo pipefail
cd "$(dirname "$0")/.."
echo "== lint: TypeScript (ESLint, Prettier) and Python (flake8, black)"
npm run lint --silent
echo "== protos: buf lint, and no breaking change against the last release (protos/releases)"
npx buf lint protos
npx buf breaking protos --against protos/releases/v0.1.0.binpb
/usr/bin/python3 -m flake8 --config .flake8 model
black --check --quiet model
/usr/bin/python3 -m flake8 --config .flake8 --extend-exclude clients/python/cfrsam_client/_gen,clients/python/build clients/python
(cd clients/python && black --check --quiet .)
echo "== model package (pytest)"
(cd model && /usr/bin/python3 -m pytest -q)
echo "== committed bundle models/tiny matches the model code"
(cd model && /usr/bin/python3 -m cfrsam.export --check ../models/tiny)
echo "== TypeScript (vitest: unit + integration)"
npm test
