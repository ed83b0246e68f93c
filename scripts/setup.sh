#!/usr/bin/env bash
# Installs every Debian package BioQuant's build, tests and tools need.
# Non-interactive and idempotent: safe to run again.
set -euo pipefail
packages=(
  build-essential cmake ninja-build pkg-config
  libgtest-dev libgmock-dev libbenchmark-dev
  nlohmann-json3-dev libcli11-dev
  libpcre2-dev libsentencepiece-dev libutf8proc-dev libssl-dev
  libcpp-httplib-dev libsqlite3-dev zlib1g-dev
  chromium  # the report test renders index.html headless (skipped where chromium is absent)
)
SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends "${packages[@]}" >/dev/null
echo "setup: installed ${#packages[@]} packages"
