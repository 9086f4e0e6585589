#!/usr/bin/env bash
# Creates the certificates of the compose cluster (cluster/docker-compose.yml): a cluster CA and
# one certificate per node, issued with a `herald` binary (`herald cert ca`, `herald cert node`).
# cluster/build-image.sh calls it with the binary it just built; run it by hand with
#
#   HERALD_BIN=target/debug/herald cluster/make-certs.sh
#
# Layout (the compose file mounts each node's directory read-only at /etc/herald/tls):
#
#   $HERALD_CERTS_DIR/ca.pem, ca.key          the CA (ca.key never leaves this directory)
#   $HERALD_CERTS_DIR/herald-N/node.pem       node N's certificate: SAN URI
#                                             spiffe://<cluster>/node/N, DNS herald-N and
#                                             localhost, IP 127.0.0.1
#   $HERALD_CERTS_DIR/herald-N/node.key       its private key
#   $HERALD_CERTS_DIR/herald-N/ca.pem         the CA certificate the node trusts
#
# Idempotent: an existing CA is kept (delete the directory, or HERALD_CERTS_FORCE=1, for a new
# one), and a node certificate is issued again only when it is missing or was issued by another CA.
#
# Environment:
#   HERALD_BIN        the herald binary (default: `herald` on PATH)
#   HERALD_CERTS_DIR  where to write (default: cluster/certs; the compose file reads the same
#                     variable, so give an absolute path when you set it)
#   HERALD_NODES      how many nodes (default 3: herald-1 … herald-3)
#   HERALD_CLUSTER_ID the cluster id bound in the certificates (default: herald's default,
#                     `herald`; must match the nodes' cluster_id)
#   HERALD_CERTS_UID  the uid the nodes run as (default 10001, the image's user)
#   HERALD_CERTS_FORCE=1  a new CA and new node certificates
#
# The nodes run as uid 10001 and must read their key through the bind mount. Run as root, the
# script gives each node directory to that uid and keeps node.key 0600. Otherwise it cannot chown:
# node.key is made readable (0644) inside its node directory, and the certificates directory
# itself is 0700, so other users of this machine still cannot reach any key.
set -euo pipefail
cd "$(dirname "$0")/.."

bin=${HERALD_BIN:-herald}
dir=${HERALD_CERTS_DIR:-cluster/certs}
nodes=${HERALD_NODES:-3}
uid=${HERALD_CERTS_UID:-10001}
force=${HERALD_CERTS_FORCE:-0}
cluster=()
[ -n "${HERALD_CLUSTER_ID:-}" ] && cluster=(--cluster "$HERALD_CLUSTER_ID")

if ! "$bin" cert --help >/dev/null 2>&1; then
  echo "error: '$bin cert --help' failed: HERALD_BIN must be a herald binary with the cert command" >&2
  exit 1
fi

mkdir -p "$dir"
chmod 0700 "$dir"

if [ "$force" = 1 ] || [ ! -s "$dir/ca.pem" ] || [ ! -s "$dir/ca.key" ]; then
  echo "==> new cluster CA in $dir"
  "$bin" cert ca --dir "$dir" "${cluster[@]}" --force
else
  echo "==> keeping the CA in $dir"
fi

for n in $(seq 1 "$nodes"); do
  out="$dir/herald-$n"
  if [ "$force" != 1 ] && [ -s "$out/node.pem" ] && [ -s "$out/node.key" ] \
     && cmp -s "$dir/ca.pem" "$out/ca.pem"; then
    echo "    herald-$n: keeping its certificate"
    continue
  fi
  mkdir -p "$out"
  "$bin" cert node --ca-dir "$dir" --out "$out" --id "$n" "${cluster[@]}" \
    --dns "herald-$n" --dns localhost --ip 127.0.0.1 --force
  for f in node.pem node.key ca.pem; do
    if [ ! -s "$out/$f" ]; then
      echo "error: herald cert node did not write $out/$f" >&2
      exit 1
    fi
  done
  echo "    herald-$n: issued $out/node.pem (node id $n)"
done

# Readable by the nodes' uid inside the containers (see the header).
for n in $(seq 1 "$nodes"); do
  out="$dir/herald-$n"
  chmod 0755 "$out"
  chmod 0644 "$out/node.pem" "$out/ca.pem"
  if [ "$(id -u)" = 0 ]; then
    chown -R "$uid:$uid" "$out"
    chmod 0600 "$out/node.key"
  else
    chmod 0644 "$out/node.key"
  fi
done
