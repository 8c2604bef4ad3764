#!/usr/bin/env bash
# Herald's whole test suite, as a newcomer and CI run it:
#   formatting, clippy (warnings are errors), every test including those that need real
#   services (started here on 127.0.0.1), docs without warnings, and benches built.
# The cargo target directory lives outside the clone so repeat runs are incremental.
set -euo pipefail
cd "$(dirname "$0")/.."

export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/herald-target}"
export CARGO_TERM_COLOR="${CARGO_TERM_COLOR:-never}"
# Incremental state only helps edit-compile loops; in the cached CI target it grew by
# gigabytes a run (a full disk was seen here).
export CARGO_INCREMENTAL="${CARGO_INCREMENTAL:-0}"

step() { echo; echo "==> $*"; }

step "cargo fmt --check"
cargo fmt --all -- --check

step "cargo clippy (all targets, -D warnings)"
cargo clippy --workspace --all-targets --locked -- -D warnings

step "cargo clippy (the replay engine alone: --no-default-features, -D warnings)"
cargo clippy -p herald-connectors -p herald-engine --locked --no-default-features -- -D warnings

step "services on 127.0.0.1"
eval "$(scripts/services.sh start)"
trap 'scripts/services.sh stop' EXIT

step "cargo test (all tests, including those that need services)"
# Tests that need a real service are #[ignore]d so a bare `cargo test` passes offline;
# here the services are up, so they run too.
cargo test --workspace --all-targets --locked --no-fail-fast -- --include-ignored 2>&1 | tee "${CARGO_TARGET_DIR}/test.log"
passed=$(grep -Eo '[0-9]+ passed' "${CARGO_TARGET_DIR}/test.log" | awk '{s+=$1} END {print s+0}')
failed=$(grep -Eo '[0-9]+ failed' "${CARGO_TARGET_DIR}/test.log" | awk '{s+=$1} END {print s+0}')

step "cargo doc (no warnings)"
RUSTDOCFLAGS="-D warnings" cargo doc --workspace --no-deps --locked --quiet

echo
echo "all: $passed passed, $failed failed"
