#!/usr/bin/env bash
# Builds the Herald node image from a static binary compiled on this host (no image is pulled).
#
#   cluster/build-image.sh                         # the `herald` binary → image herald:local
#   cluster/build-image.sh --example user_login    # your handlers: any bin or example of the crate
#   IMAGE=registry.example.com/herald:1.0 cluster/build-image.sh
#
# Then it creates the compose cluster's certificates with the binary it built
# (cluster/make-certs.sh: a CA in cluster/certs, kept when it exists, and one certificate per node
# in cluster/certs/herald-N; HERALD_CERTS_DIR for another directory, HERALD_CERTS=0 to skip).
#
# The binary is linked statically (glibc's crt-static), in its own target dir so that it never
# waits on, nor invalidates, the debug and release builds.
set -euo pipefail
cd "$(dirname "$0")/.."

image=${IMAGE:-herald:local}
target=x86_64-unknown-linux-gnu
export CARGO_TARGET_DIR=${HERALD_IMAGE_TARGET_DIR:-$PWD/target/image}
select=("$@")
[ ${#select[@]} -eq 0 ] && select=(--bin herald)
case "${select[0]}" in
  --bin) binary="$CARGO_TARGET_DIR/$target/release/${select[1]}" ;;
  --example) binary="$CARGO_TARGET_DIR/$target/release/examples/${select[1]}" ;;
  *) echo "usage: $0 [--bin NAME | --example NAME]" >&2; exit 2 ;;
esac

echo "==> building a static ${select[*]} (target dir $CARGO_TARGET_DIR)"
RUSTFLAGS='-C target-feature=+crt-static' cargo build --release --locked --target "$target" "${select[@]}"
if ldd "$binary" 2>&1 | grep -q '=>'; then
  echo "error: $binary is dynamically linked; a scratch image cannot run it" >&2
  exit 1
fi

context=$(mktemp -d)
trap 'rm -rf "$context"' EXIT
# Debug info stays on the host (target/image); symbols stay in the image for backtraces.
if command -v objcopy >/dev/null 2>&1; then
  objcopy --strip-debug "$binary" "$context/herald"
else
  cp "$binary" "$context/herald"
fi
mkdir "$context/data"
echo "==> docker build -t $image"
docker build --quiet -f cluster/Dockerfile -t "$image" "$context"
docker image ls "$image" --format '{{.Repository}}:{{.Tag}}  {{.Size}}  {{.ID}}'

if [ "${HERALD_CERTS:-1}" != 0 ]; then
  echo "==> certificates for the compose nodes"
  HERALD_BIN="$binary" cluster/make-certs.sh
fi
