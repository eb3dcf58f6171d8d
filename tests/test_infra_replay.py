"""The cluster replay (infra/knative/replay/): rendered, validated, and run.

Static: the kustomization renders offline with `kubectl kustomize`, every object passes
the Kubernetes API schema in strict mode, the Job's size comes from plan.env, the pods
reach only what they need, and the one volume replay writes is not the live one.

Behaviour: the rendered containers' commands, with the kubelet's ``$(NAME)`` expansion
done here from the rendered ConfigMaps and each ``JOB_COMPLETION_INDEX``, are run
through the real CLI against the test S3 server: every index of the Indexed Job, then the
verify Job, which must find the rebuilt files identical to the live writer's.
"""

from __future__ import annotations

import datetime as dt
import functools
import re
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import pytest
from test_infra_static import (
    BASE,
    KNATIVE,
    NAMESPACE,
    ROOT,
    _StrictLoader,
    config_env_names,
    env_values,
    kustomization,
    load_documents,
    pod_container,
    read_env_file,
    run_offline,
    validate_object,
    yaml,
)
from test_replay import DAY1, DAY2, upload_two_days

from hisparc_datastore import cli
from hisparc_datastore.config import Settings
from hisparc_datastore.storage.store import Bucket

REPLAY = KNATIVE / "replay"
PLAN = REPLAY / "plan.env"
WRITER_IMAGE = "hisparc-datastore-writer"
#: The exit status with which the CLI refuses (bad arguments, a file it did not write).
REFUSED = 2


@functools.cache
def rendered() -> tuple[dict[str, Any], ...]:
    """`kubectl kustomize` of a copy whose secrets are the examples."""
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed: `kubectl kustomize` renders the kustomization")
    with tempfile.TemporaryDirectory(prefix="kustomize-replay-") as scratch:
        folder = Path(scratch) / "replay"
        shutil.copytree(REPLAY, folder, ignore=shutil.ignore_patterns("*.env"))
        shutil.copy2(PLAN, folder / PLAN.name)
        shutil.copy2(REPLAY / "replay.env", folder / "replay.env")
        for example in (folder / "secrets").glob("*.example"):
            example.with_name(example.name.removesuffix(".example")).write_bytes(
                example.read_bytes()
            )
        result = run_offline(kubectl, "kustomize", str(folder))
    assert result.returncode == 0, result.stderr
    return tuple(doc for doc in yaml.load_all(result.stdout, Loader=_StrictLoader) if doc)


def find(kind: str, name: str) -> dict[str, Any]:
    found = [doc for doc in rendered() if doc["kind"] == kind
             and re.fullmatch(rf"{re.escape(name)}(-[a-z0-9]{{10}})?", doc["metadata"]["name"])]
    assert len(found) == 1, f"expected one {kind} {name}, found {len(found)}"
    return found[0]


def job(name: str) -> dict[str, Any]:
    return find("Job", name)


def pod(name: str) -> dict[str, Any]:
    return job(name)["spec"]["template"]["spec"]


def environment(container: dict[str, Any], index: int | None = None) -> dict[str, str]:
    """What the kubelet gives the container: its ConfigMaps' data, its literal values,
    and, in an Indexed Job, JOB_COMPLETION_INDEX."""
    values: dict[str, str] = {}
    for source in container.get("envFrom", []):
        values.update(find("ConfigMap", source["configMapRef"]["name"])["data"])
    values.update({k: v for k, v in env_values(container).items() if isinstance(v, str)})
    if index is not None:
        values["JOB_COMPLETION_INDEX"] = str(index)
    return values


def expand(arguments: list[str], values: dict[str, str]) -> list[str]:
    """The kubelet's $(NAME) expansion; a name it does not know would stay as written,
    so here it is an error."""
    def replace(match: re.Match[str]) -> str:
        assert match.group(1) in values, f"$({match.group(1)}) is not in the environment"
        return values[match.group(1)]

    return [re.sub(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", replace, argument)
            for argument in arguments]


def command_line(name: str, index: int | None = None) -> list[str]:
    container = pod_container(pod(name))
    assert container["command"] == ["datastore"], "the writer image's CLI"
    return expand(container["args"], environment(container, index))


def parse(arguments: list[str]) -> Any:
    """The CLI's own parser: what the command line means to the program it runs."""
    parser = cli.build_parser()
    return parser.parse_args(arguments)


# --- static ------------------------------------------------------------------------------


def test_every_rendered_object_validates() -> None:
    kinds = sorted(doc["kind"] for doc in rendered())
    assert kinds == ["ConfigMap", "ConfigMap", "Job", "Job", "NetworkPolicy", "NetworkPolicy",
                     "PersistentVolumeClaim", "Secret"]
    for doc in rendered():
        validate_object(doc)
        assert doc["metadata"]["namespace"] == NAMESPACE, doc["metadata"]["name"]


def test_the_kustomization_lists_every_manifest_beside_it() -> None:
    listed = kustomization("replay")["resources"]
    assert sorted(listed) == sorted(
        path.name for path in REPLAY.glob("*.yaml") if path.name != "kustomization.yaml"
    )


def test_the_job_size_is_plan_env_s() -> None:
    plan = read_env_file(PLAN)
    spec = job("replay")["spec"]
    assert spec["completionMode"] == "Indexed"
    assert spec["completions"] == int(plan["REPLAY_SHARDS"])
    assert spec["parallelism"] == int(plan["REPLAY_PARALLELISM"]) <= spec["completions"]
    first, last = (dt.date.fromisoformat(plan[k]) for k in ("REPLAY_FROM", "REPLAY_TO"))
    assert first <= last and (last - first).days + 1 >= spec["completions"], (
        "more shards than days leaves pods with nothing to do"
    )
    assert spec["backoffLimitPerIndex"] >= 1, "a lost pod is retried"
    (refusal,) = [rule for rule in spec["podFailurePolicy"]["rules"]
                  if rule["action"] == "FailIndex"]
    assert refusal["onExitCodes"]["values"] == [REFUSED], "a refusal is not retried"
    assert job("replay-verify")["spec"]["suspend"] is True, "started when the shards are done"


def test_every_index_runs_its_own_shard_into_the_replay_volume() -> None:
    shards = job("replay")["spec"]["completions"]
    for index in (0, shards - 1):
        args = parse(command_line("replay", index))
        assert args.command == "replay"
        assert args.shard == (index, shards)
        assert args.replace and args.skip_finished and args.no_progress
        assert not args.verify_only
        assert args.jobs == int(read_env_file(PLAN)["REPLAY_JOBS"])
    verify = parse(command_line("replay-verify"))
    assert verify.verify_only and verify.shard is None
    assert (verify.first, verify.last, verify.out) == (args.first, args.last, args.out)


def mounts(name: str) -> dict[str, tuple[str, bool]]:
    """Mount path -> (claim or secret, read-only) of a Job's container."""
    spec = pod(name)
    volumes = {volume["name"]: volume for volume in spec["volumes"]}
    found = {}
    for mount in pod_container(spec)["volumeMounts"]:
        volume = volumes[mount["name"]]
        source = (volume.get("persistentVolumeClaim", {}).get("claimName")
                  or volume.get("secret", {}).get("secretName") or "emptyDir")
        read_only = mount.get("readOnly", False) or volume.get(
            "persistentVolumeClaim", {}).get("readOnly", False)
        found[mount["mountPath"]] = (source, read_only)
    return found


def test_replay_writes_only_its_own_volume_and_never_the_live_one() -> None:
    out = str(parse(command_line("replay", 0)).out)
    replay_mounts = mounts("replay")
    assert replay_mounts[out] == ("datastore-replay", False)
    assert "datastore-data" not in {source for source, _ in replay_mounts.values()}
    assert out != "/data", "data_dir of the image's config.ini"
    claim = find("PersistentVolumeClaim", "datastore-replay")
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"], "pods on every node write it"
    verify_mounts = mounts("replay-verify")
    assert verify_mounts["/data"] == ("datastore-data", True)
    assert verify_mounts[out] == ("datastore-replay", True)
    # The live volume is ReadWriteOnce: the verify pod goes where the writer runs.
    affinity = pod("replay-verify")["affinity"]["podAffinity"]
    (term,) = affinity["requiredDuringSchedulingIgnoredDuringExecution"]
    assert term["labelSelector"]["matchLabels"] == {"app.kubernetes.io/component": "writer"}
    for name in ("replay", "replay-verify"):
        spec = pod(name)
        assert spec["automountServiceAccountToken"] is False
        assert spec["securityContext"]["runAsNonRoot"] is True
        context = pod_container(spec)["securityContext"]
        assert context["readOnlyRootFilesystem"] and not context["allowPrivilegeEscalation"]
        assert mounts(name)["/etc/hisparc-datastore/stations"] == ("datastore-stations", True)


def test_the_pods_reach_only_what_they_need() -> None:
    labels = {name: job(name)["spec"]["template"]["metadata"]["labels"]
              for name in ("replay", "replay-verify")}
    policies = [doc for doc in rendered() if doc["kind"] == "NetworkPolicy"]
    for name, pod_labels in labels.items():
        (policy,) = [p for p in policies if all(
            pod_labels.get(k) == v for k, v in p["spec"]["podSelector"]["matchLabels"].items()
        )]
        assert policy["spec"]["policyTypes"] == ["Egress"]
        if name == "replay-verify":
            assert "egress" not in policy["spec"], "the verify pod reads two volumes, no more"
        else:
            ports = sorted(port["port"] for rule in policy["spec"]["egress"]
                           for port in rule["ports"])
            assert ports == [53, 53, 9000], "DNS and the S3 server"


def test_settings_are_config_keys_and_the_bucket_is_the_app_s() -> None:
    replay_env = read_env_file(REPLAY / "replay.env")
    assert set(replay_env) <= config_env_names()
    app_env = read_env_file(BASE / "datastore.env")
    bucket = {key for key in app_env if key.startswith("DATASTORE_BUCKET_")}
    assert {key: replay_env.get(key) for key in bucket} == {key: app_env[key] for key in bucket}
    container = pod_container(pod("replay"))
    secrets = {item["valueFrom"]["secretKeyRef"]["name"] for item in container["env"]
               if "valueFrom" in item}
    assert len(secrets) == 1 and secrets.pop().startswith("datastore-replay-s3-"), (
        "a key of its own (read-only), not the writer's"
    )
    assert "env" not in pod_container(pod("replay-verify")) or not any(
        "valueFrom" in item for item in pod_container(pod("replay-verify"))["env"]
    ), "the verify needs no credentials"


def test_the_image_is_the_writer_s_and_secrets_are_placeholders() -> None:
    production = {image["name"]: image for image in kustomization("overlays/production")["images"]}
    (image,) = kustomization("replay")["images"]
    assert image == production[WRITER_IMAGE], "the replay runs the writer's release"
    for name in ("replay", "replay-verify"):
        assert pod_container(pod(name))["image"].startswith(image["newName"])
    for path in (REPLAY / "secrets").glob("*.example"):
        assert all(value.startswith("CHANGE-ME") for value in read_env_file(path).values())
    ignored = (REPLAY / "secrets" / ".gitignore").read_text().splitlines()
    assert "*" in ignored and "!*.example" in ignored
    if shutil.which("git") and (ROOT / ".git").exists():
        real = "infra/knative/replay/secrets/s3.env"
        assert subprocess.run(["git", "check-ignore", "-q", real], cwd=ROOT).returncode == 0


# --- behaviour ---------------------------------------------------------------------------


def test_the_jobs_commands_rebuild_and_verify_an_archive(
    bucket: Bucket, settings: Settings, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Every index of the rendered Job, run as its pod would (its command line with this
    test's dates, shard count and volume), then the verify Job's command line."""
    upload_two_days(bucket, settings)
    out = tmp_path / "replay-volume"
    shards = 3  # two days in three shards: index 0 has none, and must still report

    def as_here(arguments: list[str]) -> list[str]:
        plan = {"--from": str(DAY1), "--to": str(DAY2), "--late-days": "3",
                "--out": str(out)}
        changed = list(arguments)
        for flag, value in plan.items():
            if flag in changed:
                changed[changed.index(flag) + 1] = value
        if "--shard" in changed:
            index = changed[changed.index("--shard") + 1].split("/")[0]
            changed[changed.index("--shard") + 1] = f"{index}/{shards}"
        return changed

    for index in range(shards):
        assert cli.main(as_here(command_line("replay", index))) == 0, index
    capsys.readouterr()
    assert cli.main(as_here(command_line("replay-verify"))) == 0
    printed = capsys.readouterr().out
    assert f"shards: {shards} expected" in printed and "verify: identical" in printed, printed
    # The Job applied again: finished indexes exit at once, an unfinished one (its pod
    # died before the report) starts over its own days.
    report = out / "replay-reports" / f"{DAY1}_{DAY2}" / f"shard-0002-of-000{shards}.json"
    before = report.read_text()
    capsys.readouterr()
    assert cli.main(as_here(command_line("replay", 2))) == 0
    assert "nothing to do" in capsys.readouterr().out and report.read_text() == before
    report.unlink()
    assert cli.main(as_here(command_line("replay", 2))) == 0
    assert "nothing to do" not in capsys.readouterr().out and report.exists()
    assert cli.main(as_here(command_line("replay-verify"))) == 0


def test_the_verify_mounts_the_claim_the_storage_kustomization_makes() -> None:
    """The verify Job mounts the claim the storage kustomization makes."""
    claims = [doc["metadata"]["name"] for doc in
              load_documents(KNATIVE / "storage" / "data-pvc.yaml")]
    assert mounts("replay-verify")["/data"][0] in claims
