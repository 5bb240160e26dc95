#!/usr/bin/env bash
# Runs vhostd's whole test suite (unit, integration with real TAPs in network
# namespaces, end to end with a QEMU guest and DPDK). Needs root on Debian 12;
# installs everything it needs itself. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh
scripts/build-guest.sh
exec .venv/bin/python -m pytest "$@"
