#!/usr/bin/env bash
# The tests: set up this machine (idempotent), then static checks, fast unit tests, and the
# end-to-end lab tests (real QEMU, etcd, namespaces). Screens go to artifacts/.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
export PATH="$PWD/.venv/bin:$PATH"
echo "==> mypy (strict) on src/"
mypy src
echo "==> import-linter contracts"
lint-imports
echo "==> ruff"
ruff check src tests
echo "==> unit tests"
pytest -q tests/unit -p no:cacheprovider
echo "==> lab tests (real QEMU, etcd, namespaces)"
pytest -q tests/lab -p no:cacheprovider --timeout=600 "$@"
