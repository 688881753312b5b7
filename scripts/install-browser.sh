#!/usr/bin/env bash
# Installs Debian's Chromium for the dashboard's browser test
# (examples/booking/tests/dashboard.rs, which drives it from
# examples/booking/tests/python/dashboard_test.py over the DevTools pipe:
# no WebDriver, no npm). A no-op when Chromium is already there.
set -euo pipefail

command -v chromium >/dev/null 2>&1 || {
    sudo=""
    if [ "$(id -u)" -ne 0 ]; then
        sudo="sudo"
    fi
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends chromium fonts-dejavu-core
}
chromium --version 2>/dev/null
