#!/bin/sh
# Create .venv and install the gateway into it.
#   scripts/bootstrap.sh         the gateway only
#   scripts/bootstrap.sh test    plus everything the test suite needs (apt packages too)
# Works on a fresh Debian 12 with Python 3.11; uses sudo for apt when not root.
set -eu
cd "$(dirname "$0")/.."

want_test=${1:-}
sudo_cmd=""
if [ "$(id -u)" != 0 ]; then sudo_cmd="sudo"; fi

apt_packages=""
need() { apt_packages="$apt_packages $1"; }

python3 -c 'import ensurepip, venv' 2>/dev/null || need python3-venv
if [ "$want_test" = test ]; then
    command -v openssl >/dev/null 2>&1 || need openssl
    command -v chromium >/dev/null 2>&1 || need chromium
    command -v redis-server >/dev/null 2>&1 || need redis-server
    command -v testssl >/dev/null 2>&1 || need testssl.sh
    command -v socat >/dev/null 2>&1 || need socat
fi
if [ -n "$apt_packages" ]; then
    echo "bootstrap: installing$apt_packages with apt-get"
    $sudo_cmd apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo_cmd apt-get install -y -qq $apt_packages >/dev/null
fi

if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
if [ "$want_test" = test ]; then
    .venv/bin/python -m pip install -q -e '.[test]'
else
    .venv/bin/python -m pip install -q .
fi
