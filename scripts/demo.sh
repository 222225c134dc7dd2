#!/usr/bin/env bash
# The demo: set up this machine (idempotent), then bring up a 3-node lab and live-migrate a
# VM around it while a client stays connected.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
exec .venv/bin/ferry lab demo "$@"
