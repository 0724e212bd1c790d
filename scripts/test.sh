#!/usr/bin/env bash
# Run the whole test suite: installs what is missing (venv, PDS + PLC harness, official
# client, Kafka-protocol broker wheel), then pytest. Extra args go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
SHARED=${TAPFLOW_SHARED:-$(cd .. && pwd)/shared}
export TAPFLOW_SHARED=$SHARED
if [ -d "$SHARED/harness" ]; then
  bash "$SHARED/harness/pds/setup.sh" >&2
  bash "$SHARED/harness/client/setup.sh" >&2
fi
export KAFKA_VENV=$(pwd)/.venv
exec .venv/bin/python -m pytest -q -p no:cacheprovider "$@"
