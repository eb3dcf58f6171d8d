"""The monitoring in infra/monitoring/: scrape configuration, alert rules, dashboard.

Always, without a cluster: the YAML parses (no key given twice), the PodMonitor and the
PrometheusRule have the shape their CRDs want (kubernetes-validate has no schemas for
custom resources, so the fields used here are written out below), every alert has an
expression, a `for`, a severity, a summary and a description with a command to run,
PromQL is balanced and names only metrics hisparc_datastore.metrics declares (with their
labels), every alert has a promtool case that fires it and a section in the README, the
dashboard's panels query what they are titled, and the metrics port agrees with the
Knative manifests and their network policy.

With promtool on PATH (Debian: `apt-get install prometheus`; .ci/run installs it when it
can): `promtool check rules` and `promtool test rules` on the rules taken out of the
PrometheusRule, and the dashboard's queries through promtool's parser.  Without it those
tests skip and say why.
"""

from __future__ import annotations

import functools
import json
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.metrics import MetricWrapperBase

from hisparc_datastore import metrics, serve

yaml = pytest.importorskip("yaml", reason="PyYAML is not installed (pip install pyyaml)")

ROOT = Path(__file__).resolve().parents[1]
MONITORING = ROOT / "infra" / "monitoring"
PODMONITOR = MONITORING / "podmonitor.yaml"
RULES = MONITORING / "rules.yaml"
RULES_TEST = MONITORING / "rules-test.yaml"
DASHBOARD = MONITORING / "grafana-dashboard.json"
README = MONITORING / "README.md"
KNATIVE_BASE = ROOT / "infra" / "knative" / "base"
#: The rule file rules-test.yaml loads: the PrometheusRule's spec, taken out by the test.
EXTRACTED_RULES = "datastore-rules.yaml"

FUNCTIONS = ("upload", "writer")
#: The label Knative puts on every pod of a Service's revisions, and its name on a target.
SERVICE_POD_LABEL = "serving.knative.dev/service"
SERVICE_TARGET_LABEL = "serving_knative_dev_service"
#: The name Knative gives the one containerPort of a Service's container in the pod.
KNATIVE_USER_PORT_NAME = "user-port"
#: Ports Knative's queue-proxy (and its profiler) listens on inside every pod.
QUEUE_PROXY_PORTS = {8008, 8012, 8013, 8022, 8112, 9090, 9091}
#: Labels a target carries besides a metric's own (the PodMonitor's, or annotation
#: scraping's labelmap of the pod labels).
TARGET_LABELS = {
    "namespace", "pod", "container", "job", "instance", "endpoint",
    SERVICE_TARGET_LABEL, "serving_knative_dev_revision",
}
SEVERITIES = {"critical", "warning", "info"}
#: The shortest `for:` of an alert: several scrapes (30 s) and evaluations (1 m), so one
#: odd sample never pages anybody.
MIN_FOR_SECONDS = 5 * 60
#: prometheus-operator's Duration (the CRD's pattern).
DURATION = re.compile(
    r"^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?"
    r"(([0-9]+)ms)?)$")
DURATION_UNITS = {"y": 365 * 86400, "w": 7 * 86400, "d": 86400, "h": 3600, "m": 60,
                  "s": 1, "ms": 0.001}
METRIC_NAME = re.compile(r"\bdatastore_[a-z_]+")
RECORDED_NAME = re.compile(r"\bdatastore:[a-z0-9_:]+")
SELECTOR = re.compile(r"\b((?:datastore_|up\b)[a-z_]*)\s*\{([^}]*)\}")
MATCHER = re.compile(r"([a-zA-Z_][a-zA-Z0-9_]*)\s*(=~|!~|!=|=)\s*\"")
RELABEL_ACTIONS = {
    "replace", "keep", "drop", "hashmod", "labelmap", "labeldrop", "labelkeep",
    "lowercase", "uppercase", "keepequal", "dropequal",
}


# --- loading ---------------------------------------------------------------------------


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key given twice in one mapping (PyYAML keeps the last)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r}", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def load_one(path: Path) -> dict[str, Any]:
    with path.open(encoding="utf-8") as handle:
        documents = [doc for doc in yaml.load_all(handle, Loader=_StrictLoader) if doc]
    assert len(documents) == 1 and isinstance(documents[0], dict), path
    return documents[0]


@functools.cache
def podmonitor() -> dict[str, Any]:
    return load_one(PODMONITOR)


@functools.cache
def prometheus_rule() -> dict[str, Any]:
    return load_one(RULES)


@functools.cache
def rules_test() -> dict[str, Any]:
    return load_one(RULES_TEST)


@functools.cache
def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text(encoding="utf-8"))


def rules() -> Iterator[dict[str, Any]]:
    for group in prometheus_rule()["spec"]["groups"]:
        yield from group["rules"]


def alerts() -> list[dict[str, Any]]:
    return [rule for rule in rules() if "alert" in rule]


def seconds(duration: str) -> float:
    assert DURATION.match(duration), f"not a duration: {duration!r}"
    return sum(int(number) * DURATION_UNITS[unit]
               for number, unit in re.findall(r"(\d+)(ms|[ywdhms])", duration))


def panels() -> list[dict[str, Any]]:
    """The dashboard's panels, rows left out, those inside collapsed rows included."""
    found = []
    for panel in dashboard()["panels"]:
        if panel["type"] == "row":
            found.extend(panel.get("panels", []))
        else:
            found.append(panel)
    return found


def panel_queries() -> list[tuple[str, str]]:
    return [(panel["title"], target["expr"]) for panel in panels()
            for target in panel["targets"]]


# --- what hisparc_datastore.metrics declares -------------------------------------------


@functools.cache
def declared_metrics() -> dict[str, tuple[str, ...]]:
    """Every sample name the functions can serve -> the metric's own labels."""
    samples: dict[str, tuple[str, ...]] = {}
    for value in vars(metrics).values():
        if not isinstance(value, MetricWrapperBase):
            continue
        name, kind, labels = value._name, value._type, tuple(value._labelnames)
        suffixes = {"counter": ("_total", "_created"), "gauge": ("",),
                    "histogram": ("_bucket", "_sum", "_count", "_created")}[kind]
        for suffix in suffixes:
            samples[name + suffix] = labels + (("le",) if suffix == "_bucket" else ())
    assert samples, "hisparc_datastore.metrics declares no metric"
    return samples


def test_the_declared_metrics_are_read_correctly() -> None:
    """The check below is only as good as this reading of prometheus_client's objects."""
    declared = declared_metrics()
    assert declared["datastore_uploads_total"] == ("code",)
    assert declared["datastore_writer_lag_seconds_bucket"] == ("le",)
    assert declared["datastore_writer_backlog_oldest_seconds"] == ()
    assert "datastore_uploads" not in declared


# --- PromQL, statically --------------------------------------------------------------


def without_strings(expr: str) -> str:
    """The expression with its string literals emptied (their brackets do not count)."""
    return re.sub(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`', '""', expr)


def without_strings_but_values(expr: str) -> str:
    """Braces inside label values would end a selector early: blank them, keep quotes."""
    return re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)


def balance_errors(expr: str) -> list[str]:
    pairs = {")": "(", "]": "[", "}": "{"}
    stack: list[str] = []
    for char in without_strings(expr):
        if char in "([{":
            stack.append(char)
        elif char in pairs and (not stack or stack.pop() != pairs[char]):
            return [f"unbalanced {char!r}"]
    return [f"unclosed {opener!r}" for opener in stack]


def promql_errors(expr: str, recorded: set[str]) -> list[str]:
    """What is wrong with an expression without a PromQL parser: brackets, names, labels."""
    errors = balance_errors(expr)
    declared = declared_metrics()
    for name in METRIC_NAME.findall(expr):
        if name not in declared:
            errors.append(f"{name} is not declared in hisparc_datastore.metrics")
    for name in RECORDED_NAME.findall(expr):
        if name not in recorded:
            errors.append(f"{name} is not a recording rule of rules.yaml")
    for name, matchers in SELECTOR.findall(without_strings_but_values(expr)):
        allowed = TARGET_LABELS | set(declared.get(name, ()))
        for label, _ in MATCHER.findall(matchers):
            if label not in allowed:
                errors.append(f"{name} has no label {label!r}")
    return errors


@pytest.mark.parametrize("expr, problem", [
    ("sum(rate(datastore_uploads_total[5m])", "unclosed"),
    ("max(datastore_writer_backlog_objects})", "unbalanced"),
    ("datastore_writer_backlog_age_seconds > 1", "not declared"),
    ('sum(rate(datastore_uploads_total{codes="404"}[5m]))', "no label 'codes'"),
    ("datastore:no_such_rule > 0", "not a recording rule"),
])
def test_the_static_promql_check_can_fail(expr: str, problem: str) -> None:
    assert any(problem in error for error in promql_errors(expr, set())), expr


def test_the_static_promql_check_passes_good_expressions() -> None:
    """Brackets inside strings do not count; a recording rule that exists is fine."""
    expr = ('label_replace(sum by (code) (rate(datastore_uploads_total{code=~"(404|205)", '
            'namespace="x"}[5m])), "answer", "$1", "code", "(.*)}") '
            '> on (code) datastore:answers:rate5m')
    assert promql_errors(expr, {"datastore:answers:rate5m"}) == []


# --- the PodMonitor --------------------------------------------------------------------


def metrics_port() -> int:
    """The port the PodMonitor points every target at."""
    endpoint = only(podmonitor()["spec"]["podMetricsEndpoints"])
    ports = {int(rule["replacement"].rsplit(":", 1)[1])
             for rule in endpoint["relabelings"] if rule.get("targetLabel") == "__address__"}
    assert len(ports) == 1, f"the address relabelings disagree on the port: {ports}"
    return ports.pop()


def only(items: list[Any]) -> Any:
    assert len(items) == 1, items
    return items[0]


PODMONITOR_SPEC_FIELDS = {
    "selector", "namespaceSelector", "jobLabel", "podTargetLabels", "podMetricsEndpoints",
    "sampleLimit", "targetLimit", "attachMetadata",
}
ENDPOINT_FIELDS = {
    "port", "portNumber", "path", "scheme", "interval", "scrapeTimeout", "honorLabels",
    "honorTimestamps", "relabelings", "metricRelabelings", "params", "filterRunning",
}
RELABEL_FIELDS = {
    "sourceLabels", "separator", "targetLabel", "regex", "modulus", "replacement", "action",
}


def test_the_podmonitor_has_the_crd_shape() -> None:
    document = podmonitor()
    assert document["apiVersion"] == "monitoring.coreos.com/v1"
    assert document["kind"] == "PodMonitor"
    assert set(document) == {"apiVersion", "kind", "metadata", "spec"}
    assert document["metadata"]["name"] and "namespace" not in document["metadata"]
    spec = document["spec"]
    assert set(spec) <= PODMONITOR_SPEC_FIELDS, set(spec) - PODMONITOR_SPEC_FIELDS
    assert spec["podMetricsEndpoints"], "no endpoint"
    for endpoint in spec["podMetricsEndpoints"]:
        assert set(endpoint) <= ENDPOINT_FIELDS, set(endpoint) - ENDPOINT_FIELDS
        assert not ({"port", "portNumber"} <= set(endpoint)), "port and portNumber"
        for field in ("interval", "scrapeTimeout"):
            if field in endpoint:
                assert DURATION.match(endpoint[field]), (field, endpoint[field])
        for rule in endpoint.get("relabelings", []):
            assert set(rule) <= RELABEL_FIELDS, set(rule) - RELABEL_FIELDS
            assert rule.get("action", "replace").lower() in RELABEL_ACTIONS, rule
            for label in rule.get("sourceLabels", []):
                assert re.fullmatch(r"[a-zA-Z_][a-zA-Z0-9_]*", label), label
            if rule.get("action", "replace") == "replace":
                assert "targetLabel" in rule, rule
            re.compile(rule.get("regex", "(.*)"))  # RE2 is stricter; promtool checks it


def test_the_podmonitor_selects_both_functions_by_knative_label() -> None:
    selector = podmonitor()["spec"]["selector"]
    assert "matchLabels" not in selector
    expression = only(selector["matchExpressions"])
    assert expression == {"key": SERVICE_POD_LABEL, "operator": "In",
                          "values": list(FUNCTIONS)}
    assert SERVICE_POD_LABEL in podmonitor()["spec"]["podTargetLabels"]


def test_the_podmonitor_scrapes_the_metrics_port_not_the_declared_one() -> None:
    """Knative declares one port per pod; port/portNumber only filter declared ports,
    so the one user-port target per pod is kept and its address rewritten."""
    endpoint = only(podmonitor()["spec"]["podMetricsEndpoints"])
    assert endpoint["port"] == KNATIVE_USER_PORT_NAME
    assert endpoint.get("path", "/metrics") == "/metrics"
    port = metrics_port()
    assert port not in QUEUE_PROXY_PORTS, f"{port}: the queue-proxy listens there"
    addresses = [rule for rule in endpoint["relabelings"]
                 if rule.get("targetLabel") == "__address__"]
    for rule in addresses:
        assert rule["sourceLabels"] == ["__meta_kubernetes_pod_ip"]
    ipv4 = "10.1.2.3"
    ipv6 = "fd00:10:244::7"
    assert relabel_address(addresses, ipv4) == f"{ipv4}:{port}"
    assert relabel_address(addresses, ipv6) == f"[{ipv6}]:{port}"


def relabel_address(rules: list[dict[str, Any]], pod_ip: str) -> str | None:
    """Prometheus' replace action on one source label (anchored regex, ${1})."""
    address = None
    for rule in rules:
        found = re.fullmatch(rule.get("regex", "(.*)"), pod_ip)
        if found:
            groups = (found.group(0), *found.groups())
            address = re.sub(r"\$\{(\d+)\}|\$(\d+)",
                             lambda ref, groups=groups: groups[int(ref.group(1) or ref.group(2))],
                             rule["replacement"])
    return address


def test_the_monitoring_kustomization_holds_the_scrape_config_and_rules() -> None:
    kustomization = load_one(MONITORING / "kustomization.yaml")
    assert kustomization["namespace"] == "hisparc-datastore"
    assert sorted(kustomization["resources"]) == ["podmonitor.yaml", "rules.yaml"]


# --- the Knative manifests agree -------------------------------------------------------


def knative_service(name: str) -> dict[str, Any]:
    path = KNATIVE_BASE / f"{name}-service.yaml"
    if not path.exists():
        pytest.skip(f"{path.relative_to(ROOT)} not found")
    return load_one(path)


def env_file(path: Path) -> dict[str, str]:
    values = {}
    if path.exists():
        for line in path.read_text(encoding="utf-8").splitlines():
            if line.strip() and not line.lstrip().startswith("#") and "=" in line:
                key, value = line.split("=", 1)
                values[key.strip()] = value.strip()
    return values


@pytest.mark.parametrize("name", FUNCTIONS)
def test_the_functions_serve_metrics_where_prometheus_scrapes(name: str) -> None:
    """The port each Knative Service's container serves its metrics on: METRICS_PORT from
    the container's env, else from datastore.env (the ConfigMap), else the launcher's
    default.  It must be the PodMonitor's, and the prometheus.io/port annotation's."""
    service = knative_service(name)
    template = service["spec"]["template"]
    container = only(template["spec"]["containers"])
    env = {item["name"]: item.get("value") for item in container.get("env", [])}
    configured = env.get(serve.METRICS_PORT_ENV) or env_file(
        KNATIVE_BASE / "datastore.env").get(serve.METRICS_PORT_ENV)
    served = int(configured) if configured else serve.DEFAULT_METRICS_PORT
    assert served not in QUEUE_PROXY_PORTS, (
        f"{name} would serve its metrics on {served}, where Knative's queue-proxy listens "
        f"in the same pod: set {serve.METRICS_PORT_ENV}={metrics_port()} in the container")
    assert served == metrics_port(), (
        f"{name} serves its metrics on {served}, the PodMonitor scrapes {metrics_port()}")
    annotations = template.get("metadata", {}).get("annotations", {})
    if "prometheus.io/port" in annotations:
        assert annotations["prometheus.io/port"] == str(served)
        assert annotations.get("prometheus.io/scrape") == "true"
        assert annotations.get("prometheus.io/path", "/metrics") == "/metrics"
    assert [port["containerPort"] for port in container.get("ports", [])] in ([], [8080]), (
        "Knative accepts one containerPort; the metrics port is not declared")


def test_the_network_policy_lets_prometheus_reach_the_metrics_port() -> None:
    path = KNATIVE_BASE / "networkpolicy.yaml"
    if not path.exists():
        pytest.skip(f"{path.relative_to(ROOT)} not found")
    with path.open(encoding="utf-8") as handle:
        policies = [doc for doc in yaml.load_all(handle, Loader=_StrictLoader) if doc]
    port = metrics_port()
    for name in FUNCTIONS:
        allowing = [
            policy["metadata"]["name"] for policy in policies
            if policy["kind"] == "NetworkPolicy"
            and policy["spec"]["podSelector"].get("matchLabels", {}).get(
                "app.kubernetes.io/component") == name
            for rule in policy["spec"].get("ingress", [])
            if rule.get("from") and any(item.get("port") == port
                                        for item in rule.get("ports", []))
        ]
        assert allowing, f"no NetworkPolicy lets anyone reach {name}'s pods on {port}"


# --- the PrometheusRule ------------------------------------------------------------------


def test_the_prometheus_rule_has_the_crd_shape() -> None:
    document = prometheus_rule()
    assert document["apiVersion"] == "monitoring.coreos.com/v1"
    assert document["kind"] == "PrometheusRule"
    assert set(document) == {"apiVersion", "kind", "metadata", "spec"}
    assert document["metadata"]["name"] and "namespace" not in document["metadata"]
    assert set(document["spec"]) == {"groups"}
    names = [group["name"] for group in document["spec"]["groups"]]
    assert len(names) == len(set(names)), "group names must be unique"
    for group in document["spec"]["groups"]:
        assert set(group) <= {"name", "interval", "rules", "limit"}, group["name"]
        assert group["rules"], f"group {group['name']} is empty"
        if "interval" in group:
            assert DURATION.match(group["interval"]), group["interval"]
        for rule in group["rules"]:
            assert ("alert" in rule) != ("record" in rule), rule
            allowed = ({"alert", "expr", "for", "labels", "annotations"} if "alert" in rule
                       else {"record", "expr", "labels"})
            assert set(rule) <= allowed, (rule.get("alert") or rule["record"],
                                          set(rule) - allowed)
            assert isinstance(rule["expr"], str) and rule["expr"].strip()


def test_every_alert_has_for_severity_summary_and_a_command_to_run() -> None:
    found = alerts()
    assert found
    names = [rule["alert"] for rule in found]
    assert len(names) == len(set(names)), "alert names must be unique"
    for rule in found:
        name = rule["alert"]
        assert re.fullmatch(r"Datastore[A-Z][A-Za-z0-9]+", name), name
        assert seconds(rule["for"]) >= MIN_FOR_SECONDS, f"{name}: for {rule['for']} flaps"
        assert rule["labels"]["severity"] in SEVERITIES, name
        annotations = rule["annotations"]
        assert set(annotations) == {"summary", "description"}, name
        assert annotations["summary"].strip() and len(annotations["summary"]) <= 120, name
        assert re.search(r"`[^`]+`", annotations["description"]), (
            f"{name}: the description names no command to run")
        for text in annotations.values():
            assert text.count("{{") == text.count("}}"), name


def test_recording_rules_follow_the_naming_convention() -> None:
    for rule in rules():
        if "record" in rule:
            assert re.fullmatch(r"datastore:[a-z0-9_]+:[a-z0-9_]+", rule["record"]), rule["record"]


@pytest.mark.parametrize("rule", list(rules()), ids=lambda r: r.get("alert") or r["record"])
def test_rule_promql_is_balanced_and_names_declared_metrics(rule: dict[str, Any]) -> None:
    recorded = {other["record"] for other in rules() if "record" in other}
    assert promql_errors(rule["expr"], recorded) == []


def test_every_alert_fires_in_a_promtool_case_and_every_case_names_an_alert() -> None:
    fired: set[str] = set()
    quiet: set[str] = set()
    for case in rules_test()["tests"]:
        for check in case.get("alert_rule_test", []):
            (fired if check["exp_alerts"] else quiet).add(check["alertname"])
    names = {rule["alert"] for rule in alerts()}
    assert rules_test()["rule_files"] == [EXTRACTED_RULES]
    assert names - fired == set(), "alerts no promtool case fires"
    assert names - quiet == set(), "alerts no promtool case shows quiet"
    assert (fired | quiet) - names == set(), "promtool cases of alerts that do not exist"


def test_every_alert_has_a_section_in_the_readme() -> None:
    text = README.read_text(encoding="utf-8")
    missing = [rule["alert"] for rule in alerts() if f"### {rule['alert']}" not in text]
    assert not missing, f"infra/monitoring/README.md lacks a section for {missing}"


# --- the dashboard ------------------------------------------------------------------------

#: Panel title -> metric names its queries must use.
EXPECTED_PANELS = {
    "Uploads/s by answer code": {"datastore_uploads_total"},
    "Upload latency p50 / p99": {"datastore_upload_duration_seconds_bucket"},
    "Events/s accepted": {"datastore_upload_events_sum"},
    "Writer objects/s by outcome": {"datastore_writer_objects_total"},
    "Rows/s appended": {"datastore_writer_rows_total"},
    "End-to-end lag p50 / p99": {"datastore_writer_lag_seconds_bucket"},
    "Backlog in incoming/ and its oldest object": {
        "datastore_writer_backlog_objects", "datastore_writer_backlog_oldest_seconds"},
    "Failed objects": {"datastore_writer_failed_objects"},
    "Waiting objects": {"datastore_writer_waiting_objects"},
    "Day files' volume free": {
        "datastore_data_volume_free_bytes", "datastore_data_volume_size_bytes"},
    "Stations silent longest": {"datastore_station_last_upload_timestamp_seconds"},
}
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}


def test_the_dashboard_has_a_datasource_variable_every_query_uses() -> None:
    board = dashboard()
    assert board["uid"] and board["title"] and board.get("id") is None
    variables = {variable["name"]: variable for variable in board["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    for variable in variables.values():
        if variable["type"] == "query":
            assert variable["datasource"] == DATASOURCE, variable["name"]
    for panel in panels():
        assert panel["datasource"] == DATASOURCE, panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["datasource"] == DATASOURCE, panel["title"]
            assert target["refId"], panel["title"]
        refs = [target["refId"] for target in panel["targets"]]
        assert len(refs) == len(set(refs)), panel["title"]


def test_the_dashboard_panels_query_what_they_are_titled() -> None:
    used: dict[str, set[str]] = {}
    for title, expr in panel_queries():
        used.setdefault(title, set()).update(METRIC_NAME.findall(expr))
    for title, names in EXPECTED_PANELS.items():
        assert title in used, f"no panel {title!r}"
        assert names <= used[title], (title, names - used[title])
    table = only([panel for panel in panels() if panel["title"] == "Stations silent longest"])
    assert table["type"] == "table"
    assert only(table["targets"])["instant"] is True


@pytest.mark.parametrize("title, expr", panel_queries(), ids=lambda v: v[:40])
def test_dashboard_promql_is_balanced_and_names_declared_metrics(title: str, expr: str) -> None:
    assert promql_errors(expr, set()) == [], title


def test_the_dashboard_layout_has_no_overlaps() -> None:
    ids = [panel["id"] for panel in dashboard()["panels"]]
    assert len(ids) == len(set(ids))
    taken: set[tuple[int, int]] = set()
    for panel in dashboard()["panels"]:
        grid = panel["gridPos"]
        assert grid["x"] >= 0 and grid["x"] + grid["w"] <= 24, panel["title"]
        cells = {(x, y) for x in range(grid["x"], grid["x"] + grid["w"])
                 for y in range(grid["y"], grid["y"] + grid["h"])}
        assert not cells & taken, f"{panel['title']} overlaps another panel"
        taken |= cells


# --- every name under infra/monitoring/ ---------------------------------------------------


def test_every_metric_name_under_monitoring_is_declared() -> None:
    """What tests/test_metrics.py checks against served functions, against the source."""
    used: set[str] = set()
    for path in MONITORING.rglob("*"):
        if path.suffix in (".yaml", ".yml", ".json"):
            used |= set(METRIC_NAME.findall(path.read_text(encoding="utf-8")))
    assert used, "no metric used"
    assert sorted(used - set(declared_metrics())) == []


# --- promtool -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def promtool() -> str:
    found = shutil.which("promtool")
    if found is None:
        pytest.skip("promtool is not on PATH (Debian: apt-get install prometheus); "
                    "only the static checks ran")
    return found


def run_promtool(promtool: str, *args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    result = subprocess.run([promtool, *args], cwd=cwd, capture_output=True, text=True,
                            timeout=120)
    print(result.stdout, result.stderr, sep="\n")
    return result


@pytest.fixture
def extracted(tmp_path: Path) -> Path:
    """The PrometheusRule's groups as a plain rule file, the unit tests beside it."""
    (tmp_path / EXTRACTED_RULES).write_text(
        yaml.safe_dump({"groups": prometheus_rule()["spec"]["groups"]}, sort_keys=False),
        encoding="utf-8")
    shutil.copy(RULES_TEST, tmp_path / RULES_TEST.name)
    return tmp_path


def test_promtool_check_rules(promtool: str, extracted: Path) -> None:
    result = run_promtool(promtool, "check", "rules", EXTRACTED_RULES, cwd=extracted)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(list(rules()))} rules found" in result.stdout


def test_promtool_test_rules(promtool: str, extracted: Path) -> None:
    result = run_promtool(promtool, "test", "rules", RULES_TEST.name, cwd=extracted)
    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_test_rules_can_fail(promtool: str, extracted: Path) -> None:
    """A rule that no longer fires when its case says it must fails the unit tests."""
    rule_file = extracted / EXTRACTED_RULES
    text = rule_file.read_text(encoding="utf-8")
    assert "datastore_writer_failed_objects) > 0" in text
    rule_file.write_text(text.replace("datastore_writer_failed_objects) > 0",
                                      "datastore_writer_failed_objects) > 1000"),
                         encoding="utf-8")
    result = run_promtool(promtool, "test", "rules", RULES_TEST.name, cwd=extracted)
    assert result.returncode != 0 and "DatastoreFailedObjects" in result.stdout + result.stderr


def test_promtool_parses_the_dashboard_queries(promtool: str, tmp_path: Path) -> None:
    """Grafana's variables replaced by values, each query checked as a recording rule."""
    queries = [
        {"record": f"dashboard:panel_{number}:query",
         "expr": expr.replace("$__rate_interval", "5m").replace("$namespace", "ns")}
        for number, (_, expr) in enumerate(panel_queries())
    ]
    (tmp_path / "dashboard.yaml").write_text(
        yaml.safe_dump({"groups": [{"name": "dashboard", "rules": queries}]}),
        encoding="utf-8")
    result = run_promtool(promtool, "check", "rules", "dashboard.yaml", cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
