#!/usr/bin/env bash
# Installs the real servers and clients the end-to-end tests drive: nginx, curl, iproute2,
# bpftool, PostgreSQL 15, MariaDB 10.11 and Redis 7 (servers and their command-line clients)
# from Debian,
# Flask, gunicorn, requests, the OpenTelemetry SDK and kubernetes-validate (the Kubernetes
# OpenAPI schemas, offline) from PyPI (into tests/.venv). Idempotent:
# a second run only checks.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"

need_apt=()
command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ] || need_apt+=(nginx-light)
command -v curl >/dev/null 2>&1 || need_apt+=(curl)
command -v ip >/dev/null 2>&1 || need_apt+=(iproute2)
command -v bpftool >/dev/null 2>&1 || [ -x /usr/sbin/bpftool ] || need_apt+=(bpftool)
command -v capsh >/dev/null 2>&1 || [ -x /usr/sbin/capsh ] || need_apt+=(libcap2-bin)
[ -x /usr/lib/postgresql/15/bin/postgres ] || need_apt+=(postgresql-15 postgresql-client-15)
[ -x /usr/sbin/mariadbd ] || need_apt+=(mariadb-server mariadb-client)
command -v redis-server >/dev/null 2>&1 || need_apt+=(redis-server redis-tools)
# TLS peers: the openssl CLI makes the tests' certificates; Go builds the crypto/tls test program
# (stdlib only, offline); the JDK (already on these machines) runs a JSSE client.
command -v openssl >/dev/null 2>&1 || need_apt+=(openssl)
command -v go >/dev/null 2>&1 || need_apt+=(golang-go)
command -v java >/dev/null 2>&1 || need_apt+=(openjdk-17-jdk-headless)
# `loupe top` is tested in a real terminal.
command -v tmux >/dev/null 2>&1 || need_apt+=(tmux)
if [ ${#need_apt[@]} -gt 0 ]; then
  echo "setup: apt-get install ${need_apt[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need_apt[@]}" >/dev/null
  # The packages start system services on their default ports; the tests run their own.
  for svc in nginx postgresql mariadb redis-server; do
    systemctl stop "$svc" >/dev/null 2>&1 || true
  done
  pkill -x nginx >/dev/null 2>&1 || true
  pkill -x redis-server >/dev/null 2>&1 || true
  pkill -x mariadbd >/dev/null 2>&1 || true
  pg_ctlcluster 15 main stop >/dev/null 2>&1 || true
fi

venv="$here/.venv"
stamp="$venv/.loupe-requirements"
if [ ! -f "$stamp" ] || ! cmp -s "$here/apps/requirements.txt" "$stamp"; then
  echo "setup: python venv with $(tr '\n' ' ' < "$here/apps/requirements.txt")"
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q --disable-pip-version-check -r "$here/apps/requirements.txt"
  cp "$here/apps/requirements.txt" "$stamp"
fi

# Node.js peers (@grpc/grpc-js: pure JavaScript, no native build).
node_dir="$here/.node"
node_stamp="$node_dir/.loupe-package"
if [ ! -f "$node_stamp" ] || ! cmp -s "$here/apps/package.json" "$node_stamp"; then
  echo "setup: npm packages of tests/apps/package.json"
  mkdir -p "$node_dir"
  cp "$here/apps/package.json" "$node_dir/package.json"
  (cd "$node_dir" && npm install --silent --no-audit --no-fund >/dev/null)
  cp "$here/apps/package.json" "$node_stamp"
fi
