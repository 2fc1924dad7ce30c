#!/usr/bin/env bash
# Install halfbyte (scripts/install.sh) and run all Python tests, the slow ones (2**31+ elements) included.
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -m "not slow"`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
"${HALFBYTE_VENV:-.venv}/bin/python" -m pytest -p no:cacheprovider -q "$@" tests
