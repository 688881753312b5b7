#!/usr/bin/env bash
# Starts the local services the tests need (RabbitMQ, NATS with JetStream,
# PostgreSQL) when they are down, and waits until each accepts connections.
set -euo pipefail

up() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

wait_for() { # name port seconds
    local name=$1 port=$2 deadline=$((SECONDS + $3))
    until up "$port"; do
        if ((SECONDS > deadline)); then
            echo "services: $name did not come up on 127.0.0.1:$port" >&2
            return 1
        fi
        sleep 0.5
    done
    echo "services: $name up on 127.0.0.1:$port"
}

if ! up 5672; then
    echo "services: starting RabbitMQ"
    rabbitmq-server -detached || true
fi
if ! up 4222; then
    echo "services: starting NATS"
    mkdir -p /var/lib/nats-server
    start-stop-daemon --start --oknodo --background --exec /usr/sbin/nats-server -- \
        -a 127.0.0.1 -p 4222 -js -sd /var/lib/nats-server -l /var/log/nats-server.log
fi
if ! up 5432; then
    echo "services: starting PostgreSQL"
    pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | head -n1)" main start || true
fi

wait_for RabbitMQ 5672 90
wait_for NATS 4222 30
wait_for PostgreSQL 5432 60
# The database the tests use.
if command -v psql >/dev/null; then
    psql -h 127.0.0.1 -U postgres -tAc "SELECT 1 FROM pg_database WHERE datname='test'" 2>/dev/null | grep -q 1 ||
        psql -h 127.0.0.1 -U postgres -c "CREATE DATABASE test" >/dev/null 2>&1 || true
fi
