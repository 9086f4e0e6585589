#!/usr/bin/env bash
# HTTP API conformance (issue 14 point 8): schemathesis against a running node's /openapi.json.
#
# Starts one `herald node` (plain HTTP on loopback, plaintext peers on loopback, a temporary data
# directory, tokens of every scope) and runs schemathesis over every operation of the document
# once per caller: with an admin token, a publish token, a read token and no token. It fails (exit
# 1) on any finding: a 5xx, a status code, content type, header or body the document does not
# declare, an operation that ignores its declared security, an undeclared method not answered
# 405 with `Allow`, a schema-violating request accepted, or a node that panicked.
#
# Usage: .ci/schemathesis.sh [path/to/herald]   (default: `cargo build --bin herald`, debug)
# Environment: HERALD_SCHEMATHESIS_EXAMPLES (examples per operation and phase, default 10),
# HERALD_SCHEMATHESIS_CHECKS (only these checks; default: those of .ci/schemathesis.toml),
# HERALD_SCHEMATHESIS_ARGS (more `st run` options, e.g. `--report har --report-dir /tmp/st` to see every request).
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$(pwd)

# Pinned: a newer schemathesis may add checks; bump it on purpose.
schemathesis_version=4.32.5
# pip puts `st` in the interpreter's scripts directory, which may not be on PATH.
st="$(python3 -c 'import sysconfig; print(sysconfig.get_path("scripts"))')/st"
[ -x "$st" ] || st=st
if ! "$st" --version 2>/dev/null | grep -qx "st, version $schemathesis_version"; then
  python3 -m pip install --quiet --disable-pip-version-check "schemathesis==$schemathesis_version"
  st="$(python3 -c 'import sysconfig; print(sysconfig.get_path("scripts"))')/st"
fi
"$st" --version

herald=${1:-}
if [ -z "$herald" ]; then
  cargo build --quiet --bin herald
  herald=${CARGO_TARGET_DIR:-target}/debug/herald
fi
herald=$(realpath "$herald")
examples=${HERALD_SCHEMATHESIS_EXAMPLES:-10}

work=$(mktemp -d)
node_pid=
cleanup() {
  if [ -n "$node_pid" ]; then
    kill "$node_pid" 2>/dev/null || true
    wait "$node_pid" 2>/dev/null || true
  fi
  rm -rf "$work"
}
trap cleanup EXIT

# Random tokens: nothing of this run is reusable elsewhere.
token() { head -c 24 /dev/urandom | od -An -tx1 | tr -d ' \n'; }
admin_token=$(token)
publish_token=$(token)
read_token=$(token)
cat >"$work/tokens" <<EOF
admin   $admin_token   st-admin
publish $publish_token st-publish
read    $read_token    st-read
EOF

"$herald" node --node-id 1 --http 127.0.0.1:0 --peer 127.0.0.1:0 --insecure-peers \
  --data-dir "$work/data" --tokens-file "$work/tokens" >"$work/node.out" 2>"$work/node.log" &
node_pid=$!

url=
for _ in $(seq 1 300); do
  url=$(sed -n 's/.* listening on \(http:\/\/[^ ]*\).*/\1/p' "$work/node.out" | head -n 1)
  if [ -n "$url" ] && [ "$(curl -s -o /dev/null -w '%{http_code}' "$url/readyz")" = 200 ]; then
    break
  fi
  kill -0 "$node_pid" 2>/dev/null || { echo "herald exited:" >&2; tail -n 30 "$work/node.log" >&2; exit 1; }
  sleep 0.1
done
[ "$(curl -s -o /dev/null -w '%{http_code}' "$url/readyz")" = 200 ] || {
  echo "herald did not become ready at '$url'" >&2
  tail -n 30 "$work/node.log" >&2
  exit 1
}
echo "herald ready at $url"

# The checks (and their exceptions, each with its reason) are in .ci/schemathesis.toml.
checks=()
if [ -n "${HERALD_SCHEMATHESIS_CHECKS:-}" ]; then checks=(--checks "$HERALD_SCHEMATHESIS_CHECKS"); fi

failed=0
run() {
  local who=$1
  shift
  echo
  echo "==> schemathesis as $who"
  # A request unanswered within --request-timeout is a finding too (no operation may hang).
  # Run from the temporary directory: schemathesis and hypothesis leave caches in the current one.
  if ! (cd "$work" && "$st" --no-color --config-file "$repo/.ci/schemathesis.toml" run "$url/openapi.json" \
    "${checks[@]}" \
    --max-examples "$examples" \
    --seed 1 \
    --workers 1 \
    --generation-database none \
    --request-timeout 10 \
    ${HERALD_SCHEMATHESIS_ARGS:-} \
    "$@"); then
    failed=1
  fi
}
run "admin" -H "Authorization: Bearer $admin_token"
run "publish" -H "Authorization: Bearer $publish_token"
run "read" -H "Authorization: Bearer $read_token"
run "no token"

if grep -n "panicked" "$work/node.log" >&2; then
  echo "herald panicked during the run" >&2
  failed=1
fi
kill -0 "$node_pid" 2>/dev/null || { echo "herald died during the run" >&2; failed=1; }
if [ "$failed" != 0 ]; then
  echo "schemathesis found responses that do not match the document (see above)" >&2
  tail -n 40 "$work/node.log" >&2
  exit 1
fi
echo "schemathesis: every response matched the document"
