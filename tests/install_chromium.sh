#!/bin/sh
# Installs headless Chromium (Debian's package) for tests/test_report.py, which renders report.html in a real browser.
# Run as root; does nothing where chromium is already installed.
set -e
command -v chromium || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium > /dev/null)
