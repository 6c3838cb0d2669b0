#!/usr/bin/env bash
# Checks everything under deploy/ that can be checked without Docker or Kubernetes:
#   - Prometheus: `promtool check config` (prometheus.yml and the rule files it names),
#     `promtool check rules` and the alert unit tests (`promtool test rules alerts_test.yml`);
#   - systemd: `systemd-analyze verify` of the units (ExecStart pointed at /bin/true, since the
#     binaries are not installed here); skipped with a notice only where systemd-analyze is
#     missing or cannot verify even a trivial unit;
#   - Grafana: the dashboard is JSON of the expected shape, its queries are valid PromQL, and
#     every metric name in a dashboard query or an alert rule is one the code exports (or one of
#     the worker's partition gauges listed below);
#   - Kubernetes and compose files parse, and their cross-references hold (selectors, probe
#     ports, WORKER_COUNT = replicas, the Dockerfile and the Prometheus config they name).
# Installs Debian's `prometheus` (for promtool) and PyYAML if missing, as deploy/services.sh does;
# idempotent, and a few seconds once they are installed. Exits non-zero on the first failure.
set -euo pipefail
cd "$(dirname "$0")/.."

log() { printf 'check: %s\n' "$*" >&2; }
fail() {
  printf 'check: FAILED: %s\n' "$*" >&2
  exit 1
}

as_root() {
  if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo -n "$@"; fi
}

apt_updated=0
install_packages() {
  if [ "$apt_updated" -eq 0 ]; then
    log "apt-get update"
    as_root env DEBIAN_FRONTEND=noninteractive apt-get update -q >/dev/null
    apt_updated=1
  fi
  log "installing $*"
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q "$@" >/dev/null
}

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

# Runs a command, printing its output only when it fails.
quietly() {
  local what=$1 output
  shift
  if output=$("$@" 2>&1); then
    log "ok: $what"
  else
    printf '%s\n' "$output" >&2
    fail "$what"
  fi
}

# --- Prometheus ------------------------------------------------------------------------------

# The package may start its service on :9090; unless something listened there before, stop it
# again (as deploy/services.sh does).
ensure_promtool() {
  if command -v promtool >/dev/null 2>&1; then return 0; fi
  local was_listening=0
  if port_open 9090; then was_listening=1; fi
  install_packages --no-install-recommends prometheus
  if [ "$was_listening" -eq 0 ]; then
    if [ -d /run/systemd/system ]; then
      as_root systemctl disable --now prometheus.service >/dev/null 2>&1 || true
    else
      as_root /etc/init.d/prometheus stop >/dev/null 2>&1 || true
    fi
  fi
  command -v promtool >/dev/null 2>&1 || fail "promtool is still missing after installing prometheus"
}

check_prometheus() {
  ensure_promtool
  quietly "promtool check config deploy/prometheus/prometheus.yml" \
    promtool check config deploy/prometheus/prometheus.yml
  quietly "promtool check rules deploy/prometheus/alerts.yml" \
    promtool check rules deploy/prometheus/alerts.yml
  quietly "promtool test rules deploy/prometheus/alerts_test.yml" \
    promtool test rules deploy/prometheus/alerts_test.yml
}

# --- systemd ---------------------------------------------------------------------------------

check_systemd() {
  if ! command -v systemd-analyze >/dev/null 2>&1; then
    log "NOTICE: systemd-analyze is not installed: the systemd units are NOT verified"
    return 0
  fi
  local dir="$work/systemd" output unit name
  mkdir -p "$dir"
  # Can systemd-analyze verify anything here (it needs no running systemd, but some containers
  # lack what it loads)? A trivial unit must pass silently.
  printf '[Unit]\nDescription=probe\n[Service]\nExecStart=/bin/true\n' >"$dir/check-probe.service"
  if ! output=$(systemd-analyze verify --man=no "$dir/check-probe.service" 2>&1) || [ -n "$output" ]; then
    log "NOTICE: systemd-analyze cannot verify units in this environment: the systemd units are NOT verified"
    printf '%s\n' "$output" >&2
    return 0
  fi
  rm "$dir/check-probe.service"
  for unit in deploy/systemd/*.service; do
    name=$(basename "$unit")
    grep -q '^ExecStart=/' "$unit" || fail "$unit has no absolute ExecStart"
    sed -E 's|^ExecStart=/[^ ]*|ExecStart=/bin/true|' "$unit" >"$dir/$name"
    # A template is verified as written and as an instance (specifiers expanded).
    case "$name" in
      *@.service) cp "$dir/$name" "$dir/${name%@.service}@0.service" ;;
    esac
  done
  # Unit files parse with "…, ignoring." warnings and exit 0, so any line about our units fails
  # the check; lines about units they reference (postgresql.service, …) are only shown.
  local status=0
  output=$(cd "$dir" && systemd-analyze verify --man=no --recursive-errors=no ./*.service 2>&1) || status=$?
  local ours
  ours=$(printf '%s\n' "$output" | grep -E "$dir|sessions-" || true)
  if [ "$status" -ne 0 ] || [ -n "$ours" ]; then
    printf '%s\n' "$output" >&2
    fail "systemd-analyze verify deploy/systemd/*.service"
  fi
  if [ -n "$output" ]; then
    log "systemd-analyze about units ours refer to (not failing):"
    printf '%s\n' "$output" >&2
  fi
  log "ok: systemd-analyze verify deploy/systemd/*.service"
}

# --- Grafana, metric names, Kubernetes, compose (Python) --------------------------------------

python_with_yaml() {
  local candidate
  for candidate in python3 /usr/bin/python3; do
    if command -v "$candidate" >/dev/null 2>&1 && "$candidate" -c 'import yaml' 2>/dev/null; then
      printf '%s\n' "$candidate"
      return 0
    fi
  done
  install_packages python3-yaml
  /usr/bin/python3 -c 'import yaml' || fail "PyYAML is still missing after installing python3-yaml"
  printf '%s\n' /usr/bin/python3
}

check_files() {
  local python
  python=$(python_with_yaml)
  "$python" - "$work/dashboard-rules.yml" <<'PY' || fail "Grafana dashboard, metric names, Kubernetes and compose files"
import json, pathlib, re, sys
import yaml

errors = []
def error(message):
    errors.append(message)

# Metric names the code exports: metrics::counter!/gauge!/histogram!("name", ...).
kinds = {}
for source in list(pathlib.Path("api").rglob("*.rs")) + list(pathlib.Path("worker").rglob("*.rs")) \
        + list(pathlib.Path("shared").rglob("*.rs")):
    for kind, name in re.findall(r'metrics::(counter|gauge|histogram)!\(\s*"([A-Za-z_:][A-Za-z0-9_:]*)"',
                                 source.read_text()):
        kinds[name] = kind
if not kinds:
    error("found no metrics::counter!/gauge!/histogram! in api/, worker/, shared/")
# Histograms whose name ends with a suffix given buckets in telemetry.rs are Prometheus
# histograms (_bucket, _sum, _count); the others are rendered as summaries (quantile, _sum, _count).
suffixes = re.findall(r'Matcher::Suffix\("([^"]+)"', pathlib.Path("shared/src/telemetry.rs").read_text())
series = {"up"}
for name, kind in kinds.items():
    if kind != "histogram":
        series.add(name)
    elif any(name.endswith(suffix) for suffix in suffixes):
        series.update({name + "_bucket", name + "_sum", name + "_count"})
    else:
        series.update({name, name + "_sum", name + "_count"})

used = set()
def check_expr(where, expr):
    without_strings = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    for token in re.findall(r'[A-Za-z_:][A-Za-z0-9_:]*', without_strings):
        if token.startswith(("sessions_", "process_")) or token == "up":
            used.add(token)
            if token not in series:
                error(f"{where}: {token} is not a metric the code exports (expr: {expr})")

# Grafana dashboard.
dashboard_path = "deploy/grafana/sessions-dashboard.json"
dashboard = json.loads(pathlib.Path(dashboard_path).read_text())
if not isinstance(dashboard.get("schemaVersion"), int) or dashboard["schemaVersion"] < 36:
    error(f"{dashboard_path}: schemaVersion missing or older than 36")
for key in ("title", "uid", "panels", "templating"):
    if key not in dashboard:
        error(f"{dashboard_path}: no {key}")
variables = {v.get("name"): v for v in dashboard.get("templating", {}).get("list", [])}
if variables.get("DS_PROMETHEUS", {}).get("type") != "datasource":
    error(f"{dashboard_path}: no datasource variable DS_PROMETHEUS")
datasource = {"type": "prometheus", "uid": "${DS_PROMETHEUS}"}
ids = set()
expressions = 0
dashboard_queries = []
for panel in dashboard.get("panels", []):
    title = panel.get("title", "?")
    if panel.get("id") in ids:
        error(f"{dashboard_path}: duplicate panel id {panel.get('id')}")
    ids.add(panel.get("id"))
    grid = panel.get("gridPos", {})
    if grid.get("x", 0) + grid.get("w", 0) > 24:
        error(f"{dashboard_path}: panel {title!r} is wider than the grid")
    if panel.get("type") == "row":
        continue
    if panel.get("datasource") != datasource:
        error(f"{dashboard_path}: panel {title!r} does not use ${{DS_PROMETHEUS}}")
    if not panel.get("targets"):
        error(f"{dashboard_path}: panel {title!r} has no query")
    for target in panel.get("targets", []):
        if target.get("datasource") != datasource:
            error(f"{dashboard_path}: a query of {title!r} does not use ${{DS_PROMETHEUS}}")
        expressions += 1
        check_expr(f"{dashboard_path} panel {title!r}", target.get("expr", ""))
        dashboard_queries.append((title, target.get("expr", "")))
for variable in variables.values():
    if variable.get("type") == "query":
        definition = variable.get("definition", "")
        check_expr(f"{dashboard_path} variable {variable.get('name')}", definition)

# Alert rules use the same names.
alerts = yaml.safe_load(pathlib.Path("deploy/prometheus/alerts.yml").read_text())
for group in alerts.get("groups", []):
    for rule in group.get("rules", []):
        check_expr(f"alerts.yml {rule.get('alert') or rule.get('record')}", str(rule.get("expr", "")))

# The dashboard's queries as recording rules, so that promtool checks their PromQL syntax.
substitutions = {"$__rate_interval": "1m", "$__range": "1h", "$instance": ".*"}
rules = []
for number, (title, expr) in enumerate(dashboard_queries):
    for variable, value in substitutions.items():
        expr = expr.replace(variable, value)
    if "$" in expr:
        error(f"{dashboard_path}: panel {title!r} uses an unknown variable: {expr}")
    rules.append({"record": f"dashboard:query{number}", "expr": expr})
pathlib.Path(sys.argv[1]).write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))

not_shown = sorted(name for name in kinds
                   if not any(s.startswith(name) for s in used))
if not_shown:
    print("note: metrics on no dashboard panel and in no alert: " + ", ".join(not_shown), file=sys.stderr)

# Kubernetes manifests.
def documents(path):
    try:
        return [d for d in yaml.safe_load_all(pathlib.Path(path).read_text()) if d is not None]
    except yaml.YAMLError as problem:
        error(f"{path}: {problem}")
        return []

def env_of(container):
    return {e["name"]: e for e in container.get("env", [])}

for path in sorted(pathlib.Path("deploy/kubernetes").glob("*.yaml")):
    docs = documents(path)
    services = [d for d in docs if d.get("kind") == "Service"]
    for doc in docs:
        for key in ("apiVersion", "kind"):
            if key not in doc:
                error(f"{path}: a document without {key}")
        name = doc.get("metadata", {}).get("name")
        if not name:
            error(f"{path}: a {doc.get('kind')} without metadata.name")
        if doc.get("kind") not in ("Deployment", "StatefulSet"):
            continue
        spec = doc["spec"]
        template = spec["template"]
        labels = template["metadata"]["labels"]
        selector = spec["selector"]["matchLabels"]
        if any(labels.get(k) != v for k, v in selector.items()):
            error(f"{path}: {name}: selector {selector} does not match the pod labels {labels}")
        if not any(all(labels.get(k) == v for k, v in s["spec"].get("selector", {}).items())
                   for s in services):
            error(f"{path}: {name}: no Service selects its pods")
        for container in template["spec"]["containers"]:
            ports = {p.get("name"): p["containerPort"] for p in container.get("ports", [])}
            for probe in ("readinessProbe", "livenessProbe"):
                port = container.get(probe, {}).get("httpGet", {}).get("port")
                if port is None:
                    error(f"{path}: {name}: no {probe}")
                elif port not in ports and port not in ports.values():
                    error(f"{path}: {name}: {probe} port {port} is not a container port")
            if not any(e.get("secretRef", {}).get("name") == "sessions-env"
                       for e in container.get("envFrom", [])):
                error(f"{path}: {name}: no envFrom secretRef sessions-env")
            env = env_of(container)
            if doc["kind"] == "StatefulSet":
                headless = [s for s in services if s["metadata"]["name"] == spec.get("serviceName")
                            and s["spec"].get("clusterIP") == "None"]
                if not headless:
                    error(f"{path}: {name}: serviceName is not a headless Service in this file")
                count = env.get("WORKER_COUNT", {}).get("value")
                if count != str(spec.get("replicas")):
                    error(f"{path}: {name}: WORKER_COUNT {count!r} differs from replicas {spec.get('replicas')}")
                field = env.get("WORKER_INDEX", {}).get("valueFrom", {}).get("fieldRef", {}).get("fieldPath")
                if field != "metadata.labels['apps.kubernetes.io/pod-index']":
                    error(f"{path}: {name}: WORKER_INDEX does not come from the pod-index label")
                if env.get("SESSIONS_WORKER_HTTP_ADDR", {}).get("value", "").split(":")[-1] != str(ports.get("health")):
                    error(f"{path}: {name}: SESSIONS_WORKER_HTTP_ADDR is not the health port")
            else:
                if env.get("SESSIONS_MODE", {}).get("value") != "production":
                    error(f"{path}: {name}: SESSIONS_MODE is not production")
                if env.get("SESSIONS_HTTP_ADDR", {}).get("value", "").split(":")[-1] != str(ports.get("http")):
                    error(f"{path}: {name}: SESSIONS_HTTP_ADDR is not the http port")

# Compose.
compose_path = pathlib.Path("deploy/compose.yaml")
compose = documents(compose_path)
compose = compose[0] if compose else {}
services = compose.get("services", {})
for required in ("postgres", "redis", "rabbitmq", "api", "prometheus"):
    if required not in services:
        error(f"{compose_path}: no {required} service")
workers = {n: s for n, s in services.items() if "WORKER_INDEX" in s.get("environment", {})}
indexes = sorted(int(s["environment"]["WORKER_INDEX"]) for s in workers.values())
if indexes != list(range(len(workers))) or not workers:
    error(f"{compose_path}: WORKER_INDEX values {indexes} are not 0..{len(workers) - 1}")
for name, service in workers.items():
    if service["environment"].get("WORKER_COUNT") != str(len(workers)):
        error(f"{compose_path}: {name}: WORKER_COUNT is not {len(workers)}")
for name, service in services.items():
    build = service.get("build")
    if isinstance(build, dict):
        context = compose_path.parent / build.get("context", ".")
        if not (context / build.get("dockerfile", "Dockerfile")).is_file():
            error(f"{compose_path}: {name}: no {build.get('dockerfile')} in {context}")
prometheus_config = pathlib.Path("deploy/prometheus/prometheus.yml").read_text()
for target in ('"127.0.0.1:3032"', '"127.0.0.1:3031"'):
    if target not in prometheus_config:
        error(f"deploy/prometheus/prometheus.yml no longer has the target {target} that "
              "compose.yaml and tests/tests/prometheus_scrape.rs rewrite")
dockerfile = pathlib.Path("deploy/Dockerfile").read_text()
for binary in ("sessions-api", "sessions-worker"):
    if f"target/release/{binary}" not in dockerfile:
        error(f"deploy/Dockerfile does not ship {binary}")

if errors:
    print("\n".join(errors), file=sys.stderr)
    sys.exit(1)
print(f"check: ok: Grafana dashboard ({expressions} queries), metric names ({len(kinds)} known), "
      "Kubernetes and compose files", file=sys.stderr)
PY
  quietly "PromQL of the dashboard's queries (promtool check rules)" \
    promtool check rules "$work/dashboard-rules.yml"
}

check_prometheus
check_systemd
check_files
log "all deploy checks passed"
