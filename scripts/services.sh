#!/usr/bin/env bash
# Makes sure the servers the service tests talk to are up on their standard local ports:
# PostgreSQL on 127.0.0.1:5432 (trust auth for user postgres) and Redis on 127.0.0.1:6379.
# Starts them when they are down and installs them from Debian's packages when they are missing.
set -euo pipefail

log() { echo "services: $*" >&2; }

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

wait_port() {
    for _ in $(seq 1 60); do
        port_open "$1" && return 0
        sleep 1
    done
    log "port $1 did not open"
    return 1
}

apt_install() {
    export DEBIAN_FRONTEND=noninteractive
    if [ -z "${APT_UPDATED:-}" ]; then apt-get update -qq; APT_UPDATED=1; fi
    apt-get install -y -qq "$@" >/dev/null
}

ensure_postgres() {
    if port_open 5432; then log "postgres is up"; return 0; fi
    if ! ls /etc/postgresql/*/main >/dev/null 2>&1; then
        log "installing postgresql"
        apt_install postgresql
    fi
    local version
    version=$(ls /etc/postgresql | sort -V | tail -n 1)
    local hba="/etc/postgresql/$version/main/pg_hba.conf"
    # Tests connect as postgres over TCP without a password (local development servers only).
    if ! grep -q "lorp-ci" "$hba"; then
        sed -i '1i host all all 127.0.0.1/32 trust # lorp-ci\nhost all all ::1/128 trust # lorp-ci\nlocal all all trust # lorp-ci' "$hba"
    fi
    log "starting postgres $version"
    pg_ctlcluster --skip-systemctl-redirect "$version" main start || pg_ctlcluster "$version" main start
    wait_port 5432
}

ensure_redis() {
    if port_open 6379; then log "redis is up"; return 0; fi
    if ! command -v redis-server >/dev/null; then
        log "installing redis"
        apt_install redis-server
    fi
    mkdir -p /var/lib/redis /var/log/redis
    log "starting redis"
    redis-server --daemonize yes --bind 127.0.0.1 -::1 --port 6379 --save "" --appendonly no \
        --dir /var/lib/redis --logfile /var/log/redis/ci.log
    wait_port 6379
}

ensure_postgres
ensure_redis
