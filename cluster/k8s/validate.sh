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
#      the Secret template's token lines, the kustomization's resource list; and the security
#      set-up (issue 13): the certs initContainer and what it mounts (the CA only there, the
#      node's TLS files read-only in the node), no cluster secret, the pod and container
#      securityContext, the NetworkPolicy.
#   4. The compose file (../docker-compose.yml): every node read_only, cap_drop ALL,
#      no-new-privileges, a non-root user owning the image's data dir, its own certificate
#      directory mounted read-only, no cluster secret; `docker-compose config` when installed.
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
    "HERALD_ADVERTISE", "HERALD_ADVERTISE_HTTP", "HERALD_JOIN", "HERALD_DATA_DIR",
    "HERALD_PEER_CA", "HERALD_PEER_CERT", "HERALD_PEER_KEY",
    "HERALD_TOKENS_FILE", "HERALD_CONFIG", "HERALD_LOG_FORMAT",
}
# herald.toml keys from the README's configuration reference and src/config.rs (unknown keys stop
# the node).
TOML_KEYS = {
    "": {"node_id", "node_id_from_hostname", "cluster_id", "data_dir", "log_format",
         "shutdown_timeout_ms", "http", "wal", "handlers", "auth", "cluster", "peer_tls", "raft",
         "subscriptions"},
    "http": {"addr", "max_body_bytes", "max_batch_events", "allow_unauthenticated_remote"},
    "wal": {"fsync", "max_batch"},
    "handlers": {"workers", "mailbox_capacity", "max_inflight_bytes", "max_instances", "max_attempts",
                 "backoff_initial_ms", "backoff_max_ms", "call_timeout_ms", "webhook_timeout_ms", "webhook_allow", "webhook_deny"},
    "cluster": {"peer", "advertise", "join", "ping_interval_ms", "phi_threshold",
                "min_std_deviation_ms", "down_after_ms", "degraded_after_ms", "redeliver_after_ms",
                "dedup_window"},
    "raft": {"voters", "tick_ms", "election_ticks", "heartbeat_ticks", "load_factor"},
    "auth": {"tokens", "tokens_file"},
    "peer_tls": {"ca", "cert", "key", "insecure"},
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
for var in ("HERALD_CONFIG", "HERALD_TOKENS_FILE"):
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

# The Secret template: at least one "<role> <token>" line (without tokens the node binds loopback
# only and the probes fail), and no cluster secret (peers authenticate with certificates).
sec = objs[("Secret", "herald-secret")]["stringData"]
lines = [l.split() for l in sec.get("api-tokens", "").splitlines() if l.strip() and not l.lstrip().startswith("#")]
check(set(sec) == {"api-tokens"}, f"Secret template holds api-tokens only, no cluster secret (keys: {sorted(sec)})")
check(bool(lines) and all(len(l) == 2 and l[0] in ("admin", "publish") and len(l[1]) >= 8 for l in lines),
      "Secret template's api-tokens lines are '<admin|publish> <token of 8+ chars>'")

# ---- Peer TLS (issue 13): the initContainer issues the pod's certificate from the CA Secret into
# an emptyDir; the node reads it from there, read-only, and never mounts the CA key.
def mounts_of(container):
    return {m["mountPath"].rstrip("/"): m for m in container.get("volumeMounts", [])}
def volume_at(container, path):
    """The (mount, volume) whose mount holds `path` (a file or the mount dir itself)."""
    for mp, m in mounts_of(container).items():
        if path.rstrip("/") == mp or path.startswith(mp + "/"):
            return m, vols.get(m["name"], {})
    return None, None

check("HERALD_CLUSTER_SECRET_FILE" not in env and "HERALD_INSECURE_PEERS" not in env,
      "no cluster secret and no plaintext peers (HERALD_CLUSTER_SECRET_FILE, HERALD_INSECURE_PEERS unset)")
tls_files = {}
for var in ("HERALD_PEER_CA", "HERALD_PEER_CERT", "HERALD_PEER_KEY"):
    path = env.get(var)
    m, v = volume_at(c, path) if path else (None, None)
    check(m is not None and "emptyDir" in v and m.get("readOnly") is True,
          f"{var} ({path}) is on an emptyDir the node mounts read-only")
    tls_files[var] = path

inits = pod.get("initContainers", [])
init = next((i for i in inits if (i.get("args") or [])[:2] == ["cert", "node"]), None)
check(init is not None, "an initContainer runs `herald cert node`")
init = init or {"args": [], "volumeMounts": []}
args = init["args"]
def opt(name):
    return [args[i + 1] for i, a in enumerate(args[:-1]) if a == name]
out, ca_dir = (opt("--out") or [""])[0], (opt("--ca-dir") or [""])[0]
check(init.get("image") == c["image"], "the initContainer runs the node's image")
check("--id-from-hostname" in args and not opt("--id"),
      "the initContainer takes the node id from the pod name (--id-from-hostname, no --id)")
m_out, v_out = volume_at(init, out) if out else (None, None)
check(m_out is not None and "emptyDir" in v_out and not m_out.get("readOnly"),
      f"the initContainer writes --out {out or '?'} to an emptyDir it mounts writable")
check(bool(out) and tls_files == {"HERALD_PEER_CA": f"{out}/ca.pem", "HERALD_PEER_CERT": f"{out}/node.pem",
                                  "HERALD_PEER_KEY": f"{out}/node.key"}
      and m_out is not None and volume_at(c, out)[0] is not None
      and volume_at(c, out)[0]["name"] == m_out["name"],
      "HERALD_PEER_CA/CERT/KEY are the ca.pem/node.pem/node.key the initContainer writes, on the same volume")
m_ca, v_ca = volume_at(init, ca_dir) if ca_dir else (None, None)
ca_secret = (v_ca or {}).get("secret", {})
check(m_ca is not None and m_ca.get("readOnly") is True and ca_dir.rstrip("/") == m_ca["mountPath"].rstrip("/")
      and ca_secret.get("secretName") == "herald-ca"
      and {i["key"]: i["path"] for i in ca_secret.get("items", [])} == {"ca.pem": "ca.pem", "ca.key": "ca.key"},
      f"--ca-dir {ca_dir or '?'} is the Secret herald-ca (items ca.pem, ca.key), mounted read-only")
ca_vols = {n for n, v in vols.items() if v.get("secret", {}).get("secretName") == "herald-ca"}
main_mounts = {m["name"] for m in c.get("volumeMounts", [])}
check(bool(ca_vols) and not (ca_vols & main_mounts), "the node container does not mount the CA (nor its key)")
check(all(not (ca_vols & {m["name"] for m in x.get("volumeMounts", [])}) for x in pod["containers"]),
      "no container but the initContainer mounts the CA")
init_env = [e["name"] for e in init.get("env", [])]
adv_host = env["HERALD_ADVERTISE"].rsplit(":", 1)[0]
check(adv_host in opt("--dns"), f"the certificate names the advertise host ({adv_host}) as a --dns SAN")
used = {v for a in args for v in ("POD_NAME", "POD_NAMESPACE") if f"$({v})" in a}
check(used <= set(init_env), f"the initContainer defines the variables its args use ({sorted(used)})")

# ---- securityContext: the pod, and every container including the initContainer.
psc = pod.get("securityContext", {})
check(psc.get("runAsNonRoot") is True and isinstance(psc.get("runAsUser"), int) and psc["runAsUser"] > 0
      and isinstance(psc.get("fsGroup"), int) and psc["fsGroup"] > 0,
      f"pod securityContext: runAsNonRoot, a fixed non-root runAsUser and fsGroup ({psc.get('runAsUser')}, {psc.get('fsGroup')})")
check((psc.get("seccompProfile") or {}).get("type") == "RuntimeDefault", "pod securityContext: seccompProfile RuntimeDefault")
for x in inits + pod["containers"]:
    sc = x.get("securityContext", {})
    caps = sc.get("capabilities", {})
    missing = [k for k, ok in [
        ("runAsNonRoot: true", sc.get("runAsNonRoot") is True),
        ("readOnlyRootFilesystem: true", sc.get("readOnlyRootFilesystem") is True),
        ("allowPrivilegeEscalation: false", sc.get("allowPrivilegeEscalation") is False),
        ("capabilities.drop [ALL]", caps.get("drop") == ["ALL"] and not caps.get("add")),
        ("seccompProfile RuntimeDefault", (sc.get("seccompProfile") or {}).get("type") == "RuntimeDefault"),
        ("not privileged", not sc.get("privileged")),
        ("runAsUser non-root if set", sc.get("runAsUser", 1) != 0),
    ] if not ok]
    check(not missing, f"container {x['name']} securityContext (missing: {missing or 'none'})")

# The image's user (cluster/Dockerfile) is the pod's: the data volume's files belong to it.
docker_user = [l.split()[1] for l in open("../Dockerfile") if l.startswith("USER ")]
check(docker_user == [f"{psc.get('runAsUser')}:{psc.get('runAsGroup')}"],
      f"the image's USER {docker_user} is runAsUser:runAsGroup")

# ---- NetworkPolicy: the peer port only from herald pods, the API from herald pods, labelled
# clients and Prometheus; nothing else.
HERALD = sts["spec"]["selector"]["matchLabels"]
CLIENT = {"herald-client": "true"}
PROMETHEUS = {"app.kubernetes.io/name": "prometheus"}
nps = [o for (k, _), o in objs.items() if k == "NetworkPolicy"]
np = next((o for o in nps if o["spec"].get("podSelector", {}).get("matchLabels") == HERALD), None)
check(np is not None, f"a NetworkPolicy selects the herald pods ({HERALD})")
np = (np or {"spec": {}})["spec"]
check("Ingress" in np.get("policyTypes", []), "the NetworkPolicy restricts Ingress")
rules = np.get("ingress", [])
PORTS = {"peer": 7170, "http": 7070}
def rule_ports(r):
    return {PORTS.get(p.get("port"), p.get("port")) for p in r.get("ports", [])}
def peer_kind(f):
    """What an ingress `from` entry admits: herald, client, prometheus, or None (something else)."""
    if "ipBlock" in f or set(f) - {"podSelector", "namespaceSelector"}:
        return None
    labels = (f.get("podSelector") or {}).get("matchLabels")
    if (f.get("podSelector") or {}).get("matchExpressions"):
        return None
    if labels == HERALD and "namespaceSelector" not in f:
        return "herald"
    if labels == CLIENT and "namespaceSelector" not in f:
        return "client"
    if labels == PROMETHEUS:  # may name Prometheus's namespace
        return "prometheus"
    return None
check(bool(rules) and all(r.get("from") and r.get("ports") for r in rules),
      "every ingress rule names its sources and its ports (none is open to all)")
check(all(rule_ports(r) <= {7070, 7170} for r in rules), "the NetworkPolicy opens only ports 7070 and 7170")
peer_from = [peer_kind(f) for r in rules if 7170 in rule_ports(r) for f in r["from"]]
check(peer_from and set(peer_from) == {"herald"}, f"peer port 7170: only from herald pods (got {peer_from})")
http_from = [peer_kind(f) for r in rules if 7070 in rule_ports(r) for f in r["from"]]
check(None not in http_from and "herald" not in http_from and "client" in http_from,
      f"API port 7070: from pods labelled herald-client=true, optionally Prometheus, nothing else; nodes never call each other's API (got {http_from})")

# kustomization.yaml lists every manifest except the Secret template, and nothing missing.
kust = yaml.safe_load(open("kustomization.yaml"))
listed = set(kust.get("resources", []))
want = set(sys.argv[1:]) - {"secret.yaml"}
check(listed == want, f"kustomization resources = the manifests but secret.yaml (missing: {sorted(want - listed) or 'none'}, extra: {sorted(listed - want) or 'none'})")

sys.exit(1 if errors else 0)
PY

echo "== 4. compose file (../docker-compose.yml)"
"$PY" - ../docker-compose.yml ../Dockerfile <<'PY' || failed=1
import re, sys, yaml

errors = []
def check(ok, what):
    print(("    ok   " if ok else "    FAIL ") + what)
    if not ok:
        errors.append(what)

compose = yaml.safe_load(open(sys.argv[1]))  # SafeLoader resolves the `<<: *herald` merge keys
docker = open(sys.argv[2]).read()
image_user = re.search(r"^USER\s+(\S+)", docker, re.M)
image_user = image_user.group(1) if image_user else None
data_owner = re.search(r"^COPY\s+--chown=(\S+)\s+\S+\s+/data\s*$", docker, re.M)
check(image_user is not None and data_owner is not None and data_owner.group(1) == image_user
      and not image_user.startswith("0") and not image_user.startswith("root"),
      f"the image runs as a non-root USER ({image_user}) that owns its /data")

nodes = {n: s for n, s in compose.get("services", {}).items() if re.fullmatch(r"herald-\d+", n)}
check(len(nodes) >= 3, f"the compose file has herald nodes ({sorted(nodes)})")
# "SRC:DST[:MODE]"; SRC may hold ${VAR:-default}, so DST is the last ":/..." part.
VOL = re.compile(r"^(?P<src>.+):(?P<dst>/[^:]*)(?::(?P<mode>ro|rw))?$")
for name, s in sorted(nodes.items()):
    env = s.get("environment") or {}
    if isinstance(env, list):
        env = dict(e.split("=", 1) for e in env)
    user = str(s.get("user", ""))
    missing = [k for k, ok in [
        ("read_only: true", s.get("read_only") is True),
        ("cap_drop: [ALL]", s.get("cap_drop") == ["ALL"] and not s.get("cap_add")),
        ("security_opt no-new-privileges:true", "no-new-privileges:true" in (s.get("security_opt") or [])),
        (f"user: the image's {image_user}", user == image_user),
        ("not privileged", not s.get("privileged")),
        ("no secrets (no cluster secret)", not s.get("secrets")),
        ("no HERALD_CLUSTER_SECRET_FILE / HERALD_INSECURE_PEERS",
         "HERALD_CLUSTER_SECRET_FILE" not in env and "HERALD_INSECURE_PEERS" not in env),
    ] if not ok]
    check(not missing, f"{name}: hardened (missing: {missing or 'none'})")
    mounts = []
    for v in s.get("volumes") or []:
        m = VOL.match(v) if isinstance(v, str) else None
        if m is None:
            check(False, f"{name}: volume {v!r} is SRC:DST[:ro]")
        else:
            mounts.append(m.groupdict())
    writable = [m["dst"] for m in mounts if m["mode"] != "ro"] + list(s.get("tmpfs") or [])
    check(writable == ["/data"], f"{name}: writes only its data dir /data (writable: {writable})")
    data = [m for m in mounts if m["dst"] == "/data"]
    check(len(data) == 1 and "/" not in data[0]["src"] and data[0]["src"] in (compose.get("volumes") or {}),
          f"{name}: /data is a named volume (it starts owned by the image's user)")
    for var, file in (("HERALD_PEER_CA", "ca.pem"), ("HERALD_PEER_CERT", "node.pem"), ("HERALD_PEER_KEY", "node.key")):
        path = env.get(var, "")
        on = [m for m in mounts if path.startswith(m["dst"].rstrip("/") + "/")]
        check(path.endswith("/" + file) and len(on) == 1 and on[0]["mode"] == "ro"
              and on[0]["src"].endswith("/" + name),
              f"{name}: {var} ({path or 'unset'}) is {file} in its own certificate directory (.../{name}), mounted read-only")
    check(not any(m["src"].rstrip("/").endswith("certs}") or m["src"].rstrip("/").endswith("/certs") for m in mounts),
          f"{name}: does not mount the certificates directory itself (the CA key)")
sys.exit(1 if errors else 0)
PY
if command -v docker-compose >/dev/null 2>&1; then
    if docker-compose -f ../docker-compose.yml config -q; then
        echo "    ok   docker-compose config accepts the compose file"
    else
        echo "    FAIL docker-compose config" >&2
        failed=1
    fi
else
    echo "    SKIP docker-compose config: docker-compose is not installed"
fi

if ((failed)); then
    echo "== FAILED" >&2
    exit 1
fi
echo "== all checks passed (${#manifests[@]} manifests: ${manifests[*]}; ../docker-compose.yml; kubernetes-validate $KV_VERSION, Kubernetes $K8S_VERSION)"
