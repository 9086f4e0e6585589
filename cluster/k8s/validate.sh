#!/usr/bin/env bash
# Static checks of the Kubernetes manifests in this directory; no cluster needed.
#
#   1. kubernetes-validate --strict on every manifest (all *.yaml but kustomization.yaml, which is
#      not a Kubernetes object), against the newest Kubernetes schema the installed
#      kubernetes-validate bundles (or K8S_VERSION=1.xx). kubernetes-validate only WARNS, exit 0,
#      when it has no schema for a kind/apiVersion (a typo there would pass silently), so every
#      output line must be an INFO "passed" line.
#   2. If kubectl (or kustomize) is installed: the kustomization renders, and the rendered
#      objects pass the same validation.
#   3. Invariants a schema cannot see: env var names the node knows, probe paths, the join list
#      against the advertise address, the headless Service, mounted file paths, herald.toml keys,
#      the Secret template's token lines, the kustomization's resource list.
#
# Usage: cluster/k8s/validate.sh  (from any directory). Exits non-zero on any failure.
set -euo pipefail
cd "$(dirname "$0")"

MIN_K8S=1.30 # lifecycle.preStop.sleep is used (beta and on by default since 1.30)
PY=python3
KV=(kubernetes-validate)

# A private virtualenv, for when pip may not install into the system Python ("externally
# managed", PEP 668).
use_venv() {
    local venv="${TMPDIR:-/tmp}/herald-k8s-validate-venv"
    echo "== pip refused; installing kubernetes-validate into the virtualenv $venv"
    python3 -m venv "$venv"
    "$venv/bin/pip" install --quiet --disable-pip-version-check kubernetes-validate
    KV=("$venv/bin/kubernetes-validate")
    PY="$venv/bin/python"
}
if ! command -v kubernetes-validate >/dev/null 2>&1; then
    echo "== kubernetes-validate not found: pip install --quiet kubernetes-validate"
    if python3 -m pip install --quiet --disable-pip-version-check kubernetes-validate; then
        # A --user or similar install may not be on PATH: use the module.
        command -v kubernetes-validate >/dev/null 2>&1 || KV=(python3 -m kubernetes_validate)
    else
        use_venv
    fi
fi
# The invariant checks (step 3) read YAML with PyYAML (a dependency of kubernetes-validate).
if ! "$PY" -c 'import yaml' 2>/dev/null; then
    "$PY" -m pip install --quiet --disable-pip-version-check pyyaml || use_venv
fi

KV_VERSION=$("${KV[@]}" --version)
# The help text names the default version, which is the newest schema the package bundles.
LATEST=$(COLUMNS=1000 "${KV[@]}" --help | sed -n 's/.*Defaults to \([0-9][0-9.]*\).*/\1/p')
K8S_VERSION=${K8S_VERSION:-$LATEST}
if [[ -z "$K8S_VERSION" ]]; then
    echo "FAIL: cannot tell which Kubernetes versions kubernetes-validate $KV_VERSION bundles" >&2
    exit 1
fi
if ! printf '%s\n%s\n' "$MIN_K8S" "$K8S_VERSION" | sort -V -C; then
    echo "FAIL: Kubernetes schema $K8S_VERSION is older than $MIN_K8S (preStop.sleep); upgrade kubernetes-validate" >&2
    exit 1
fi

manifests=()
for f in *.yaml; do
    [[ "$f" == kustomization.yaml ]] || manifests+=("$f")
done

failed=0
# validate LABEL FILE: strict schema validation; any line other than INFO (WARN, ERROR) fails.
validate() {
    local out rc=0
    out=$("${KV[@]}" --strict -k "$K8S_VERSION" "$2" 2>&1) || rc=$?
    printf '%s\n' "$out" | sed "s|^|    |"
    if ((rc != 0)) || grep -qv '^INFO .* passed for resource ' <<<"$out"; then
        echo "  FAIL: $1" >&2
        failed=1
    fi
}

echo "== 1. kubernetes-validate $KV_VERSION --strict, Kubernetes schema $K8S_VERSION (newest bundled: $LATEST)"
for f in "${manifests[@]}"; do
    validate "$f" "$f"
done

echo "== 2. kustomization renders"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
render=()
if command -v kubectl >/dev/null 2>&1; then
    render=(kubectl kustomize .)
elif command -v kustomize >/dev/null 2>&1; then
    render=(kustomize build .)
fi
if ((${#render[@]})); then
    if "${render[@]}" >"$tmp/rendered.yaml"; then
        echo "    ${render[*]}: $(grep -c '^kind:' "$tmp/rendered.yaml") objects"
        validate "rendered kustomization" "$tmp/rendered.yaml"
    else
        echo "  FAIL: ${render[*]}" >&2
        failed=1
    fi
else
    echo "    SKIP: neither kubectl nor kustomize is installed (resources are still checked in step 3)"
fi

echo "== 3. invariants"
"$PY" - "${manifests[@]}" <<'PY' || failed=1
import sys, yaml

# Environment variables the container may set: the `herald node` settings plus the downward API.
ALLOWED_ENV = {
    "POD_NAME", "POD_NAMESPACE",
    "HERALD_NODE_ID", "HERALD_NODE_ID_FROM_HOSTNAME", "HERALD_HTTP", "HERALD_PEER",
    "HERALD_ADVERTISE", "HERALD_ADVERTISE_HTTP", "HERALD_JOIN", "HERALD_DATA_DIR", "HERALD_CLUSTER_SECRET_FILE",
    "HERALD_TOKENS_FILE", "HERALD_CONFIG", "HERALD_LOG_FORMAT",
}
# herald.toml keys from the README's configuration reference and src/config.rs (unknown keys stop
# the node).
TOML_KEYS = {
    "": {"node_id", "node_id_from_hostname", "cluster_id", "data_dir", "log_format",
         "shutdown_timeout_ms", "http", "wal", "handlers", "auth", "cluster", "raft", "subscriptions"},
    "http": {"addr", "max_body_bytes", "max_batch_events", "allow_unauthenticated_remote"},
    "wal": {"fsync", "max_batch"},
    "handlers": {"workers", "mailbox_capacity", "max_inflight_bytes", "max_instances", "max_attempts",
                 "backoff_initial_ms", "backoff_max_ms", "call_timeout_ms", "webhook_timeout_ms", "webhook_allow", "webhook_deny"},
    "cluster": {"peer", "advertise", "join", "secret_file", "ping_interval_ms", "phi_threshold",
                "min_std_deviation_ms", "down_after_ms", "degraded_after_ms", "redeliver_after_ms",
                "dedup_window"},
    "raft": {"voters", "tick_ms", "election_ticks", "heartbeat_ticks", "load_factor"},
    "auth": {"tokens", "tokens_file"},
}

errors = []
def check(ok, what):
    print(("    ok   " if ok else "    FAIL ") + what)
    if not ok:
        errors.append(what)

objs = {}
for path in sys.argv[1:]:
    for doc in yaml.safe_load_all(open(path)):
        if doc:
            objs[(doc["kind"], doc["metadata"]["name"])] = doc

sts = objs[("StatefulSet", "herald")]
pod = sts["spec"]["template"]["spec"]
c = next(c for c in pod["containers"] if c["name"] == "herald")
env = {e["name"]: e.get("value") for e in c["env"]}
names = [e["name"] for e in c["env"]]

unknown = sorted(set(names) - ALLOWED_ENV)
check(not unknown, f"env var names are known to herald node (unknown: {unknown or 'none'})")
check(len(names) == len(set(names)), "no env var is set twice")
check(("HERALD_NODE_ID" in env) != ("HERALD_NODE_ID_FROM_HOSTNAME" in env),
      "exactly one of HERALD_NODE_ID / HERALD_NODE_ID_FROM_HOSTNAME")
check(names.index("POD_NAME") < names.index("HERALD_ADVERTISE")
      and names.index("POD_NAMESPACE") < min(names.index("HERALD_ADVERTISE"), names.index("HERALD_JOIN")),
      "POD_NAME/POD_NAMESPACE are defined before the variables that use them")

ports = {p["name"]: p["containerPort"] for p in c["ports"]}
def probe(kind):
    g = (c.get(kind) or {}).get("httpGet") or {}
    return g.get("path"), ports.get(g.get("port"), g.get("port"))
check(probe("livenessProbe") == ("/healthz", 7070), f"liveness probe is GET /healthz on 7070 (got {probe('livenessProbe')})")
check(probe("readinessProbe") == ("/readyz", 7070), f"readiness probe is GET /readyz on 7070 (got {probe('readinessProbe')})")
check(ports.get("http") == 7070 and ports.get("peer") == 7170, "container ports http 7070, peer 7170")

# The first join entry must be exactly herald-0's advertise address: that pod founds the cluster.
def advertise(i):
    return env["HERALD_ADVERTISE"].replace("$(POD_NAME)", f"{sts['metadata']['name']}-{i}")
join = env["HERALD_JOIN"].split(",")
check(join[0] == advertise(0), f"the first HERALD_JOIN entry is pod 0's advertise address ({advertise(0)})")
check(all(j in [advertise(i) for i in range(sts["spec"]["replicas"])] for j in join),
      "every HERALD_JOIN entry is the advertise address of a pod of the StatefulSet")

svc = objs.get(("Service", sts["spec"]["serviceName"]), {}).get("spec", {})
check(svc.get("clusterIP") == "None" and svc.get("publishNotReadyAddresses") is True
      and 7170 in [p["port"] for p in svc.get("ports", [])],
      f"serviceName {sts['spec']['serviceName']} is headless, publishes not-ready pods, has port 7170")
check(f".{sts['spec']['serviceName']}." in env["HERALD_ADVERTISE"], "HERALD_ADVERTISE uses the headless Service's DNS name")

# Files named by env vars lie on a mount; for ConfigMap/Secret volumes the file is one of its keys.
vols = {v["name"]: v for v in pod["volumes"]}
vols.update({t["metadata"]["name"]: {} for t in sts["spec"].get("volumeClaimTemplates", [])})
def source(var, want_dir=False):
    path = env[var]
    for m in c["volumeMounts"]:
        mp = m["mountPath"].rstrip("/")
        if want_dir and path.rstrip("/") == mp:
            return True
        if not want_dir and path.startswith(mp + "/"):
            key, v = path[len(mp) + 1:], vols.get(m["name"], {})
            ref = ("ConfigMap", v["configMap"]["name"]) if "configMap" in v else \
                  ("Secret", v["secret"]["secretName"]) if "secret" in v else None
            if ref is None:
                return True
            o = objs.get(ref, {})
            return key in {**o.get("data", {}), **o.get("stringData", {})}
    return False
check(source("HERALD_DATA_DIR", want_dir=True), "HERALD_DATA_DIR is a mounted volume")
for var in ("HERALD_CONFIG", "HERALD_CLUSTER_SECRET_FILE", "HERALD_TOKENS_FILE"):
    check(source(var), f"{var} ({env[var]}) is a key of a mounted ConfigMap/Secret")

# herald.toml: only documented keys.
try:
    import tomllib
except ImportError:
    tomllib = None
if tomllib is None:
    print("    SKIP herald.toml keys (needs Python 3.11+ tomllib)")
else:
    cfg = tomllib.loads(objs[("ConfigMap", "herald-config")]["data"]["herald.toml"])
    bad = sorted({k for k in cfg if k not in TOML_KEYS[""]} |
                 {f"{t}.{k}" for t, v in cfg.items() if isinstance(v, dict) for k in v if k not in TOML_KEYS.get(t, set())})
    check(not bad, f"herald.toml keys are documented (unknown: {bad or 'none'})")

# The Secret template: a cluster secret and at least one "<role> <token>" line (without tokens the
# node binds loopback only and the probes fail).
sec = objs[("Secret", "herald-secret")]["stringData"]
lines = [l.split() for l in sec.get("api-tokens", "").splitlines() if l.strip() and not l.lstrip().startswith("#")]
check(bool(sec.get("cluster-secret", "").strip()), "Secret template has a cluster-secret")
check(bool(lines) and all(len(l) == 2 and l[0] in ("admin", "publish") and len(l[1]) >= 8 for l in lines),
      "Secret template's api-tokens lines are '<admin|publish> <token of 8+ chars>'")

# kustomization.yaml lists every manifest except the Secret template, and nothing missing.
kust = yaml.safe_load(open("kustomization.yaml"))
listed = set(kust.get("resources", []))
want = set(sys.argv[1:]) - {"secret.yaml"}
check(listed == want, f"kustomization resources = the manifests but secret.yaml (missing: {sorted(want - listed) or 'none'}, extra: {sorted(listed - want) or 'none'})")

sys.exit(1 if errors else 0)
PY

if ((failed)); then
    echo "== FAILED" >&2
    exit 1
fi
echo "== all checks passed (${#manifests[@]} manifests: ${manifests[*]}; kubernetes-validate $KV_VERSION, Kubernetes $K8S_VERSION)"
