#!/bin/sh
# Install peftserve into a virtual environment. The one recipe behind `make install` and the
# container image (deploy/kubernetes/Containerfile), so CI runs the image's install steps.
# Usage: PYTHON=python3.11 scripts/install.sh VENV EXTRAS   (EXTRAS: e.g. server,dev,bench)
set -eu
venv=$1
extras=$2
python=${PYTHON:-python3.11}
test -x "$venv/bin/python" || "$python" -m venv "$venv"
"$venv/bin/pip" install --quiet --upgrade pip
# torch==2.13.0 goes in first and alone: anything that pulls an unpinned torch before it would
# fetch whichever build the index serves (gigabytes of CUDA packages on a CPU machine).
"$venv/bin/pip" install --quiet torch==2.13.0
"$venv/bin/pip" install --quiet -e ".[$extras]"
