#!/bin/sh
# Install the LiteLLM proxy in its own virtualenv, bench/.venv-litellm (gitignored), so
# that bench/run.py can measure it on the same upstream as the proxy. Separate from the
# project's .venv: LiteLLM pins its own versions of shared packages.
#
#     bench/litellm.sh                 # the newest litellm[proxy] on PyPI
#     bench/litellm.sh 1.109.1         # a given version
#
# PYTHON picks the interpreter (default: python3). Run it again to upgrade.
set -eu

here=$(cd "$(dirname "$0")" && pwd)
venv="$here/.venv-litellm"
python=${PYTHON:-python3}
spec="litellm[proxy]"
if [ $# -gt 0 ]; then
    spec="litellm[proxy]==$1"
fi

if [ ! -x "$venv/bin/python" ]; then
    "$python" -m venv "$venv"
fi
"$venv/bin/python" -m pip install --quiet --upgrade pip
"$venv/bin/python" -m pip install --quiet --upgrade "$spec"
"$venv/bin/litellm" --version 2>/dev/null || "$venv/bin/python" -m pip show litellm | grep -i '^version'
echo "installed in $venv"
