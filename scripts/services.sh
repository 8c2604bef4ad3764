#!/usr/bin/env bash
# Installs (once, into a cache outside the clone) and starts the real services Herald's
# tests use, bound to 127.0.0.1 only. Prints `export` lines for the test environment.
#
#   eval "$(scripts/services.sh start)"   # install if needed, start, export endpoints
#   scripts/services.sh stop
#
# Services:
#   s3s-fs  an S3-compatible object store (crates.io), serving a scratch directory.
#   postgres PostgreSQL 15 (Debian's package; installed with apt when missing), a
#           throwaway cluster on 127.0.0.1 (trust auth), the stand-in SQL warehouse.
#   tansu   an Apache-Kafka-compatible broker (crates.io), storing its log in SQLite (a
#           file under the run directory, removed at each start). Not its in-memory
#           storage: there a produce takes its offsets before it writes the batch, and a
#           fetch in between serves the batch after it, so a consumer at the head of a
#           partition that two producers write (HTTP ingest and delivery feedback) was seen
#           to skip a whole batch. Tests that restart a broker start their own tansu
#           (HERALD_TANSU_BIN) on S3 storage.
#           HERALD_TANSU_STORAGE=memory keeps the in-memory storage (the benchmarks that
#           measure through the broker use it, as their published figures did).
#   aiosmtpd a real SMTP server (PyPI, in a venv). Tests start their own on a free port
#           with a Maildir of their own (HERALD_SMTPD_PYTHON -m aiosmtpd ...).
set -euo pipefail

TOOLS="${HERALD_TOOLS_DIR:-$HOME/.cache/herald-tools}"
RUN="${HERALD_RUN_DIR:-${TMPDIR:-/tmp}/herald-services}"
S3_PORT="${HERALD_S3_PORT:-19000}"
S3_VERSION="0.14.1"   # 0.15+ needs a newer rustc than the workspace's MSRV allows
KAFKA_PORT="${HERALD_KAFKA_PORT:-19092}"
PG_PORT="${HERALD_PG_PORT:-15432}"
PG_BIN="/usr/lib/postgresql/15/bin"
TANSU_VERSION="0.6.0"
TANSU_FEATURES="dynostore,libsql"
TANSU_STORAGE="${HERALD_TANSU_STORAGE:-sqlite}"
SMTPD_VERSION="1.4.6"

log() { echo "services: $*" >&2; }

install_s3() {
  if [ -x "$TOOLS/bin/s3s-fs" ] && "$TOOLS/bin/s3s-fs" --version 2>/dev/null | grep -q "$S3_VERSION"; then
    return
  fi
  log "installing s3s-fs $S3_VERSION into $TOOLS (about 2 minutes, once)"
  # Its own target dir, so it never invalidates the workspace's build cache.
  CARGO_TARGET_DIR="$TOOLS/build" cargo install "s3s-fs@$S3_VERSION" --features binary --locked \
    --root "$TOOLS" --quiet >&2
}

install_tansu() {
  local stamp="$TOOLS/bin/.tansu-features"
  if [ -x "$TOOLS/bin/tansu" ] && "$TOOLS/bin/tansu" --version 2>/dev/null | grep -q "$TANSU_VERSION" \
    && [ "$(cat "$stamp" 2>/dev/null)" = "$TANSU_FEATURES" ]; then
    return
  fi
  log "installing tansu $TANSU_VERSION into $TOOLS (about 10 minutes on 2 cores, once)"
  # --locked: some features fail to compile otherwise; dynostore: S3 storage (the tests
  # that restart a broker); libsql: the shared broker's storage (SQLite).
  CARGO_TARGET_DIR="$TOOLS/build" cargo install "tansu@$TANSU_VERSION" --features "$TANSU_FEATURES" \
    --locked --force --root "$TOOLS" --quiet >&2
  echo "$TANSU_FEATURES" >"$stamp"
}

start_pg() {
  if [ ! -x "$PG_BIN/initdb" ]; then
    log "installing postgresql-15 (apt)"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q postgresql-15 >&2
  fi
  local dir="$RUN/pg"
  if [ -f "$dir/data/postmaster.pid" ] && runuser -u postgres -- "$PG_BIN/pg_ctl" -D "$dir/data" status >/dev/null 2>&1; then
    log "postgres already running on 127.0.0.1:$PG_PORT"
    return
  fi
  mkdir -p "$dir"; chown postgres "$dir"; chmod 755 "$RUN"
  if [ ! -f "$dir/data/PG_VERSION" ]; then
    runuser -u postgres -- "$PG_BIN/initdb" -D "$dir/data" -U postgres --auth=trust --no-sync >/dev/null
  fi
  runuser -u postgres -- "$PG_BIN/pg_ctl" -D "$dir/data" -l "$dir/pg.log" -w start \
    -o "-c listen_addresses=127.0.0.1 -p $PG_PORT -k $dir -c fsync=off" >/dev/null
  log "postgres on 127.0.0.1:$PG_PORT (data in $dir)"
}

install_smtpd() {
  local venv="$TOOLS/smtpd-venv"
  if [ -x "$venv/bin/python" ] && "$venv/bin/python" -c 'import aiosmtpd' 2>/dev/null; then
    return
  fi
  log "installing aiosmtpd $SMTPD_VERSION (PyPI) into $venv"
  python3 -m venv "$venv" >&2
  "$venv/bin/pip" install --quiet "aiosmtpd==$SMTPD_VERSION" >&2
}

install_sdks() {
  # The official Segment and RudderStack Node server SDKs, for compatibility tests.
  local dir="$TOOLS/npm"
  if [ -d "$dir/node_modules/@segment/analytics-node" ] && [ -d "$dir/node_modules/@rudderstack/rudder-sdk-node" ]; then
    return
  fi
  if ! command -v npm >/dev/null; then log "npm not found: the SDK compatibility test will fail"; return; fi
  log "installing the Segment and RudderStack Node SDKs from npm into $dir"
  mkdir -p "$dir"
  [ -f "$dir/package.json" ] || echo '{"name":"herald-sdk-clients","private":true}' >"$dir/package.json"
  (cd "$dir" && npm install --no-audit --no-fund --silent \
    @segment/analytics-node@3.1.0 @rudderstack/rudder-sdk-node@3.0.13 >&2)
}

wait_port() {
  local port=$1 i
  for i in $(seq 1 100); do
    if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then return 0; fi
    sleep 0.1
  done
  log "nothing listening on 127.0.0.1:$port after 10 s"; return 1
}

start() {
  install_s3
  mkdir -p "$RUN/s3/herald-test"
  if [ -f "$RUN/s3.pid" ] && kill -0 "$(cat "$RUN/s3.pid")" 2>/dev/null; then
    log "s3s-fs already running on 127.0.0.1:$S3_PORT"
  else
    "$TOOLS/bin/s3s-fs" --host 127.0.0.1 --port "$S3_PORT" \
      --access-key herald --secret-key herald-secret "$RUN/s3" >"$RUN/s3.log" 2>&1 &
    echo $! >"$RUN/s3.pid"
    wait_port "$S3_PORT"
    log "s3s-fs on 127.0.0.1:$S3_PORT (bucket herald-test, data in $RUN/s3)"
  fi
  install_tansu
  if [ -f "$RUN/kafka.pid" ] && kill -0 "$(cat "$RUN/kafka.pid")" 2>/dev/null; then
    log "tansu already running on 127.0.0.1:$KAFKA_PORT"
  else
    local storage="memory://tansu/" where="in-memory storage"
    if [ "$TANSU_STORAGE" != memory ]; then
      # A fresh broker each start, as the in-memory one is.
      rm -rf "$RUN/tansu"
      storage="sqlite://tansu.db" where="its log in SQLite ($RUN/tansu)"
    fi
    # The SQLite path is relative to the broker's working directory.
    mkdir -p "$RUN/tansu"
    (cd "$RUN/tansu" && exec "$TOOLS/bin/tansu" broker --listener-url "tcp://127.0.0.1:$KAFKA_PORT" \
      --advertised-listener-url "tcp://127.0.0.1:$KAFKA_PORT" \
      --storage-engine "$storage") >"$RUN/kafka.log" 2>&1 &
    echo $! >"$RUN/kafka.pid"
    wait_port "$KAFKA_PORT"
    log "tansu (Kafka protocol) on 127.0.0.1:$KAFKA_PORT, $where"
  fi
  start_pg
  echo "export HERALD_TEST_POSTGRES=postgres://postgres@127.0.0.1:$PG_PORT/postgres"
  install_sdks
  echo "export HERALD_NODE_MODULES=$TOOLS/npm/node_modules"
  install_smtpd
  echo "export HERALD_SMTPD_PYTHON=$TOOLS/smtpd-venv/bin/python"
  echo "export HERALD_TEST_KAFKA=127.0.0.1:$KAFKA_PORT"
  echo "export HERALD_TANSU_BIN=$TOOLS/bin/tansu"
  echo "export HERALD_TEST_S3_DIR=$RUN/s3"
  echo "export AWS_ENDPOINT_URL=http://127.0.0.1:$S3_PORT"
  echo "export AWS_ALLOW_HTTP=true"
  echo "export AWS_ACCESS_KEY_ID=herald"
  echo "export AWS_SECRET_ACCESS_KEY=herald-secret"
  echo "export AWS_REGION=us-east-1"
  echo "export HERALD_TEST_S3_BUCKET=herald-test"
}

stop() {
  if [ -f "$RUN/pg/data/postmaster.pid" ]; then
    runuser -u postgres -- "$PG_BIN/pg_ctl" -D "$RUN/pg/data" stop -m fast >/dev/null 2>&1 || true
  fi
  if [ -f "$RUN/kafka.pid" ]; then kill "$(cat "$RUN/kafka.pid")" 2>/dev/null || true; rm -f "$RUN/kafka.pid"; fi
  if [ -f "$RUN/s3.pid" ]; then kill "$(cat "$RUN/s3.pid")" 2>/dev/null || true; rm -f "$RUN/s3.pid"; fi
}

case "${1:-start}" in
  start) start ;;
  stop) stop ;;
  *) echo "usage: $0 start|stop" >&2; exit 2 ;;
esac
