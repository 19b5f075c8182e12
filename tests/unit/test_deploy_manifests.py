"""Offline checks of the Kubernetes manifests and the image in ``deploy/``.

No kubectl, no cluster, no network: a small kustomize-like loader (:func:`build`) renders the base and
each overlay from ``deploy/k8s`` with PyYAML, supporting exactly the kustomization fields the
manifests use (``resources``, ``patches`` as strategic merge or JSON 6902, ``configMapGenerator``,
``images``) and failing loudly on any other, so a new field cannot slip past the checks unrendered.
Generated ConfigMaps keep their plain name (kustomize adds a content hash and rewrites references).
The rendered objects are then checked for what a platform team relies on: gRPC probes on the port the
Service targets, hardened pods, resources, labels, selectors, secrets only by reference, and a
PodDisruptionBudget and HorizontalPodAutoscaler for every replicated Deployment in prod.
"""

from __future__ import annotations

import copy
import json
import re
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
BASE = K8S / "base"
OVERLAYS = ("dev", "prod")
TARGETS = ("base", *OVERLAYS)

Obj = dict[str, Any]

# Base folder -> (proto package folder, gRPC port). The gRPC service name is read from the proto.
SERVICES = {
    "audience": ("audience", 50051),
    "scheduler": ("scheduler", 50052),
    "delivery-email": ("delivery", 50053),
    "delivery-sms": ("delivery", 50053),
    "delivery-push": ("delivery", 50053),
    "delivery-direct-mail": ("delivery", 50053),
    "profile": ("profile", 50054),
}
# Base folder -> prefix of the service's own settings (CARILLON_<PREFIX>_*).
SETTINGS_PREFIX = {
    "audience": "AUDIENCE",
    "scheduler": "SCHEDULER",
    "delivery-email": "DELIVERY",
    "delivery-sms": "DELIVERY",
    "delivery-push": "DELIVERY",
    "delivery-direct-mail": "DELIVERY",
    "profile": "PROFILE",
}
REQUIRED_LABELS = (
    "app.kubernetes.io/name",
    "app.kubernetes.io/component",
    "app.kubernetes.io/part-of",
    "app.kubernetes.io/version",
)
UID = 10001
PRESTOP_KEYS = ("exec", "sleep")


def channel_of(worker: str) -> str:
    """The channel a delivery worker's name stands for (DNS names have hyphens, channels underscores)."""
    return worker.removeprefix("delivery-").replace("-", "_")


# --------------------------------------------------------------------------------------------------
# A tiny kustomize: just the subset deploy/k8s uses.
# --------------------------------------------------------------------------------------------------

KUSTOMIZATION_FIELDS = {"apiVersion", "kind", "resources", "patches", "configMapGenerator", "images"}
# Strategic-merge keys of the lists the manifests patch (from the Kubernetes API's patchMergeKey).
MERGE_KEYS = {
    "containers": "name",
    "initContainers": "name",
    "env": "name",
    "volumes": "name",
    "volumeMounts": "mountPath",
    "imagePullSecrets": "name",
    "topologySpreadConstraints": "topologyKey",
}


class KustomizeError(Exception):
    """The kustomization uses something this loader does not support, or is wrong."""


def load_yaml_documents(path: Path) -> list[Obj]:
    """The non-empty YAML documents of a manifest file."""
    with path.open(encoding="utf-8") as stream:
        return [doc for doc in yaml.safe_load_all(stream) if doc is not None]


def resource_id(obj: Obj) -> tuple[str, str]:
    """Kind and name: unique within one namespace-free build."""
    return obj["kind"], obj["metadata"]["name"]


def _merge_key(field: str, items: list[Any]) -> str | None:
    if field == "ports":  # container ports merge on containerPort, Service ports on port
        return "containerPort" if all("containerPort" in item for item in items) else "port"
    return MERGE_KEYS.get(field)


def strategic_merge(target: Any, patch: Any, field: str = "") -> Any:
    """Merge ``patch`` into ``target`` like a strategic-merge patch (maps merge, keyed lists merge)."""
    if isinstance(patch, dict):
        if "$patch" in patch or any(key.startswith("$") for key in patch):
            raise KustomizeError(f"unsupported strategic-merge directive in {field or 'patch'}: {sorted(patch)}")
        result = dict(target) if isinstance(target, dict) else {}
        for key, value in patch.items():
            if value is None:
                result.pop(key, None)
            else:
                result[key] = strategic_merge(result.get(key), value, key)
        return result
    if isinstance(patch, list) and isinstance(target, list) and patch and all(isinstance(i, dict) for i in patch):
        key = _merge_key(field, patch + target)
        if key is None:
            return copy.deepcopy(patch)
        # Like kustomize: the patch's items first (merged into their originals), then the untouched rest.
        if any(key not in item for item in patch):
            raise KustomizeError(f"an item of {field} lacks the merge key {key}")
        originals = {item.get(key): item for item in target}
        merged = [strategic_merge(originals.get(item[key], {}), item, field) for item in patch]
        patched = {item[key] for item in patch}
        return merged + [copy.deepcopy(item) for item in target if item.get(key) not in patched]
    return copy.deepcopy(patch)


def _pointer(path: str) -> list[str]:
    if not path.startswith("/"):
        raise KustomizeError(f"JSON pointer must start with /: {path}")
    return [part.replace("~1", "/").replace("~0", "~") for part in path[1:].split("/")]


def json6902(target: Obj, operations: list[Obj]) -> Obj:
    """Apply JSON patch (RFC 6902) operations add, replace and remove."""
    result = copy.deepcopy(target)
    for operation in operations:
        op, parts = operation.get("op"), _pointer(operation.get("path", ""))
        parent: Any = result
        for part in parts[:-1]:
            parent = parent[int(part)] if isinstance(parent, list) else parent[part]
        last = parts[-1]
        if op == "add":
            if isinstance(parent, list):
                parent.insert(len(parent) if last == "-" else int(last), copy.deepcopy(operation["value"]))
            else:
                parent[last] = copy.deepcopy(operation["value"])
        elif op == "replace":
            if isinstance(parent, list):
                parent[int(last)] = copy.deepcopy(operation["value"])
            else:
                if last not in parent:
                    raise KustomizeError(f"replace of a missing path: {operation['path']}")
                parent[last] = copy.deepcopy(operation["value"])
        elif op == "remove":
            del parent[int(last) if isinstance(parent, list) else last]
        else:
            raise KustomizeError(f"unsupported JSON patch op: {op}")
    return result


def _matches(obj: Obj, target: Obj) -> bool:
    unknown = set(target) - {"group", "version", "kind", "name", "labelSelector"}
    if unknown:
        raise KustomizeError(f"unsupported patch target fields: {sorted(unknown)}")
    group, _, version = obj["apiVersion"].rpartition("/")
    if "group" in target and target["group"] != group:
        return False
    if "version" in target and target["version"] != version:
        return False
    if "kind" in target and target["kind"] != obj["kind"]:
        return False
    if "name" in target and not re.fullmatch(target["name"], obj["metadata"]["name"]):
        return False
    labels = obj["metadata"].get("labels", {})
    for term in filter(None, target.get("labelSelector", "").split(",")):
        key, sep, value = term.partition("=")
        if not sep or labels.get(key.strip()) != value.strip():
            return False
    return True


def _apply_patch(resources: list[Obj], folder: Path, entry: Obj) -> list[Obj]:
    if set(entry) - {"path", "patch", "target"} or ("path" in entry) == ("patch" in entry):
        raise KustomizeError(f"a patch needs exactly one of path or patch (and an optional target): {entry}")
    text = (folder / entry["path"]).read_text(encoding="utf-8") if "path" in entry else entry["patch"]
    documents = [doc for doc in yaml.safe_load_all(text) if doc is not None]
    if len(documents) != 1:
        raise KustomizeError(f"a patch holds one document: {entry}")
    patch = documents[0]
    if isinstance(patch, list):
        if "target" not in entry:
            raise KustomizeError(f"a JSON 6902 patch needs a target: {entry}")
        selector = entry["target"]
    else:
        selector = entry.get("target") or {
            "kind": patch["kind"],
            "name": re.escape(patch["metadata"]["name"]),
        }
    hits = 0
    patched = []
    for obj in resources:
        if _matches(obj, selector):
            hits += 1
            if isinstance(patch, list):
                obj = json6902(obj, patch)
            else:
                body = copy.deepcopy(patch)
                body["metadata"] = {**body.get("metadata", {}), "name": obj["metadata"]["name"]}
                obj = strategic_merge(obj, body)
        patched.append(obj)
    if hits == 0:
        raise KustomizeError(f"patch {entry} matches no resource")
    return patched


def _generate_config_maps(resources: list[Obj], entries: list[Obj]) -> list[Obj]:
    for entry in entries:
        if set(entry) - {"name", "literals", "behavior"}:
            raise KustomizeError(f"unsupported configMapGenerator fields: {sorted(entry)}")
        data = {}
        for literal in entry.get("literals", []):
            key, sep, value = literal.partition("=")
            if not sep:
                raise KustomizeError(f"a literal is KEY=VALUE: {literal}")
            data[key] = value
        behavior = entry.get("behavior", "create")
        existing = [obj for obj in resources if resource_id(obj) == ("ConfigMap", entry["name"])]
        if behavior == "create":
            if existing:
                raise KustomizeError(f"ConfigMap {entry['name']} already exists; use behavior: merge")
            resources.append(
                {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": entry["name"]}, "data": data}
            )
        elif behavior in ("merge", "replace"):
            if not existing:
                raise KustomizeError(f"ConfigMap {entry['name']} to {behavior} does not exist")
            base = existing[0].get("data", {}) if behavior == "merge" else {}
            existing[0]["data"] = {**base, **data}
        else:
            raise KustomizeError(f"unsupported configMapGenerator behavior: {behavior}")
    return resources


def _set_images(resources: list[Obj], images: list[Obj]) -> None:
    for image in images:
        if set(image) - {"name", "newName", "newTag"}:
            raise KustomizeError(f"unsupported images fields: {sorted(image)}")
        for obj in resources:
            pod = obj.get("spec", {}).get("template", {}).get("spec", {})
            for container in pod.get("containers", []) + pod.get("initContainers", []):
                name, _, tag = container["image"].partition(":")
                if name == image["name"]:
                    container["image"] = f"{image.get('newName', name)}:{image.get('newTag', tag)}"


def kustomization_of(folder: Path) -> Obj:
    """The parsed kustomization.yaml of a folder, checked for fields this loader understands."""
    path = folder / "kustomization.yaml"
    if not path.is_file():
        raise KustomizeError(f"{folder} has no kustomization.yaml")
    kustomization = yaml.safe_load(path.read_text(encoding="utf-8"))
    unknown = set(kustomization) - KUSTOMIZATION_FIELDS
    if unknown:
        raise KustomizeError(f"{path}: unsupported fields {sorted(unknown)}")
    if kustomization.get("kind", "Kustomization") != "Kustomization":
        raise KustomizeError(f"{path}: kind must be Kustomization")
    return kustomization


def build(folder: Path) -> list[Obj]:
    """Render a kustomization folder like ``kustomize build`` (for the supported subset)."""
    kustomization = kustomization_of(folder)
    resources: list[Obj] = []
    for entry in kustomization.get("resources", []):
        path = (folder / entry).resolve()
        resources.extend(build(path) if path.is_dir() else load_yaml_documents(path))
    resources = _generate_config_maps(resources, kustomization.get("configMapGenerator", []))
    for entry in kustomization.get("patches", []):
        resources = _apply_patch(resources, folder, entry)
    _set_images(resources, kustomization.get("images", []))
    ids = [resource_id(obj) for obj in resources]
    duplicates = sorted({i for i in ids if ids.count(i) > 1})
    if duplicates:
        raise KustomizeError(f"{folder}: duplicate resources {duplicates}")
    return resources


# --------------------------------------------------------------------------------------------------
# Helpers and fixtures.
# --------------------------------------------------------------------------------------------------


def target_dir(target: str) -> Path:
    return BASE if target == "base" else K8S / "overlays" / target


_RENDERED: dict[str, list[Obj]] = {}


def rendered(target: str) -> list[Obj]:
    if target not in _RENDERED:
        _RENDERED[target] = build(target_dir(target))
    return copy.deepcopy(_RENDERED[target])


def of_kind(objects: list[Obj], kind: str) -> dict[str, Obj]:
    return {obj["metadata"]["name"]: obj for obj in objects if obj["kind"] == kind}


def deployments_in(target: str) -> Iterator[tuple[str, Obj]]:
    yield from of_kind(rendered(target), "Deployment").items()


def container(deployment: Obj) -> Obj:
    containers = deployment["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1, f"{deployment['metadata']['name']}: one container per pod"
    return containers[0]


def env_of(deployment: Obj) -> dict[str, Obj]:
    return {var["name"]: var for var in container(deployment).get("env", [])}


def grpc_service_name(package_folder: str) -> str:
    """The full name of the service declared in protos/carillon/<folder>/v1/<folder>_service.proto."""
    text = (ROOT / "protos" / "carillon" / package_folder / "v1" / f"{package_folder}_service.proto").read_text()
    package = re.search(r"^package\s+([\w.]+);", text, re.MULTILINE)
    service = re.search(r"^service\s+(\w+)", text, re.MULTILINE)
    assert package and service
    return f"{package.group(1)}.{service.group(1)}"


def container_port(deployment: Obj, port: int | str) -> int:
    """Resolve a port number or port name against the deployment's container ports."""
    ports = container(deployment).get("ports", [])
    for item in ports:
        if port in (item["containerPort"], item.get("name")):
            return int(item["containerPort"])
    raise AssertionError(f"{deployment['metadata']['name']}: no container port {port!r}")


def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return bool(selector) and all(labels.get(key) == value for key, value in selector.items())


def pod_labels(deployment: Obj) -> dict[str, str]:
    return dict(deployment["spec"]["template"]["metadata"].get("labels", {}))


QUANTITY = re.compile(r"^(\d+(?:\.\d+)?)(m|Ki|Mi|Gi|Ti|k|M|G|T)?$")
FACTORS = {
    None: 1,
    "m": 1e-3,
    "k": 1e3,
    "M": 1e6,
    "G": 1e9,
    "T": 1e12,
    "Ki": 2**10,
    "Mi": 2**20,
    "Gi": 2**30,
    "Ti": 2**40,
}


def quantity(value: str | int | float) -> float:
    match = QUANTITY.match(str(value))
    assert match, f"not a Kubernetes quantity: {value!r}"
    return float(match.group(1)) * FACTORS[match.group(2)]


def project_version() -> str:
    return str(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"])


DEPLOYMENT_CASES = [pytest.param(target, name, id=f"{target}-{name}") for target in TARGETS for name in SERVICES]


# --------------------------------------------------------------------------------------------------
# Layout.
# --------------------------------------------------------------------------------------------------


def kustomization_dirs() -> list[Path]:
    return sorted(path.parent for path in K8S.rglob("kustomization.yaml"))


def test_the_base_has_one_folder_per_service_with_deployment_service_and_service_account() -> None:
    folders = sorted(path.name for path in BASE.iterdir() if path.is_dir())
    assert folders == sorted(SERVICES)
    for name in SERVICES:
        kinds = sorted(doc["kind"] for doc in build(BASE / name))
        assert kinds == ["Deployment", "Service", "ServiceAccount"], name
        assert {doc["metadata"]["name"] for doc in build(BASE / name)} == {name}


def test_every_file_a_kustomization_references_exists() -> None:
    for folder in kustomization_dirs():
        kustomization = kustomization_of(folder)
        for entry in kustomization.get("resources", []):
            path = folder / entry
            assert path.is_file() or (path / "kustomization.yaml").is_file(), f"{folder}: missing {entry}"
        for entry in kustomization.get("patches", []):
            if "path" in entry:
                assert (folder / entry["path"]).is_file(), f"{folder}: missing patch {entry['path']}"


def test_every_manifest_in_a_kustomization_folder_is_referenced() -> None:
    for folder in kustomization_dirs():
        kustomization = kustomization_of(folder)
        referenced = {(folder / entry).resolve() for entry in kustomization.get("resources", [])}
        referenced |= {
            (folder / entry["path"]).resolve() for entry in kustomization.get("patches", []) if "path" in entry
        }
        manifests = {path.resolve() for path in folder.iterdir() if path.suffix in (".yaml", ".yml")}
        manifests.discard((folder / "kustomization.yaml").resolve())
        subfolders = {path.resolve() for path in folder.iterdir() if (path / "kustomization.yaml").is_file()}
        assert manifests - referenced == set(), f"{folder}: unreferenced manifests"
        assert subfolders - referenced == set(), f"{folder}: unreferenced kustomization folders"


def test_every_yaml_file_under_deploy_is_a_kubernetes_object_or_a_json_patch() -> None:
    files = sorted(DEPLOY.rglob("*.yaml"))
    assert files
    for path in files:
        for doc in load_yaml_documents(path):
            if isinstance(doc, list):
                assert all({"op", "path"} <= set(operation) for operation in doc), path
            else:
                assert "kind" in doc and ("apiVersion" in doc or doc["kind"] == "Kustomization"), path


@pytest.mark.parametrize("target", TARGETS)
def test_every_target_renders_namespace_free(target: str) -> None:
    objects = rendered(target)
    assert objects
    assert all("namespace" not in obj["metadata"] for obj in objects)
    assert not any(obj["kind"] == "Namespace" for obj in objects)
    assert sorted(of_kind(objects, "Deployment")) == sorted(SERVICES)


# --------------------------------------------------------------------------------------------------
# Probes, ports and the Service in front.
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("target", "name"), DEPLOYMENT_CASES)
def test_the_readiness_probe_asks_grpc_health_for_the_service_on_its_grpc_port(target: str, name: str) -> None:
    deployment = of_kind(rendered(target), "Deployment")[name]
    folder, port = SERVICES[name]
    probe = container(deployment)["readinessProbe"]
    assert set(probe) & {"httpGet", "tcpSocket", "exec"} == set()
    assert isinstance(probe["grpc"]["port"], int)
    assert probe["grpc"]["port"] == port == container_port(deployment, probe["grpc"]["port"])
    assert probe["grpc"]["service"] == grpc_service_name(folder)


@pytest.mark.parametrize(("target", "name"), DEPLOYMENT_CASES)
def test_liveness_and_startup_probes_use_grpc_health_on_the_container_port(target: str, name: str) -> None:
    deployment = of_kind(rendered(target), "Deployment")[name]
    _, port = SERVICES[name]
    for kind in ("livenessProbe", "startupProbe"):
        probe = container(deployment)[kind]
        assert set(probe) & {"httpGet", "tcpSocket", "exec"} == set(), kind
        assert isinstance(probe["grpc"]["port"], int), kind
        assert probe["grpc"]["port"] == port == container_port(deployment, probe["grpc"]["port"]), kind
        assert probe["grpc"].get("service", "") in ("", grpc_service_name(SERVICES[name][0])), kind


@pytest.mark.parametrize(("target", "name"), DEPLOYMENT_CASES)
def test_the_server_listens_on_all_interfaces_at_its_container_port(target: str, name: str) -> None:
    deployment = of_kind(rendered(target), "Deployment")[name]
    args = container(deployment)["args"]
    module = {"audience": "audience_svc", "scheduler": "scheduler_svc", "profile": "profile_stub"}.get(name)
    assert args[0] == (module or "delivery_svc")
    assert args[args.index("--host") + 1] == "0.0.0.0"
    assert int(args[args.index("--port") + 1]) == SERVICES[name][1] == container_port(deployment, "grpc")
    assert "command" not in container(deployment), "the image's ENTRYPOINT is python -m"


@pytest.mark.parametrize(("target", "name"), DEPLOYMENT_CASES)
def test_the_service_targets_the_port_the_probes_check(target: str, name: str) -> None:
    objects = rendered(target)
    deployment, service = of_kind(objects, "Deployment")[name], of_kind(objects, "Service")[name]
    assert service["spec"].get("type", "ClusterIP") == "ClusterIP"
    assert service["spec"].get("clusterIP") != "None"
    (port,) = service["spec"]["ports"]
    assert port["name"] == "grpc"
    assert port["appProtocol"] == "grpc"
    assert port["port"] == SERVICES[name][1]
    target_port = container_port(deployment, port.get("targetPort", port["port"]))
    assert target_port == container(deployment)["readinessProbe"]["grpc"]["port"]


@pytest.mark.parametrize("target", TARGETS)
def test_every_service_selects_exactly_its_deployments_pods(target: str) -> None:
    objects = rendered(target)
    deployments = of_kind(objects, "Deployment")
    for name, service in of_kind(objects, "Service").items():
        selector = service["spec"]["selector"]
        chosen = [other for other, deployment in deployments.items() if selects(selector, pod_labels(deployment))]
        assert chosen == [name], f"Service {name} selects {chosen}"


@pytest.mark.parametrize(("target", "name"), DEPLOYMENT_CASES)
def test_the_deployment_selector_matches_its_pod_labels_but_not_the_version(target: str, name: str) -> None:
    deployment = of_kind(rendered(target), "Deployment")[name]
    selector = deployment["spec"]["selector"]["matchLabels"]
    assert set(deployment["spec"]["selector"]) == {"matchLabels"}
    assert selects(selector, pod_labels(deployment))
    assert "app.kubernetes.io/version" not in selector, "selectors are immutable; the version changes"


@pytest.mark.parametrize("target", TARGETS)
def test_services_point_each_client_at_the_service_of_its_peer(target: str) -> None:
    objects = rendered(target)
    services = {name: svc["spec"]["ports"][0]["port"] for name, svc in of_kind(objects, "Service").items()}
    deployments = of_kind(objects, "Deployment")
    scheduler = env_of(deployments["scheduler"])
    assert scheduler["CARILLON_SCHEDULER_AUDIENCE_TARGET"]["value"] == f"audience:{services['audience']}"
    workers = {channel_of(name): name for name in deployments if name.startswith("delivery-")}
    assert set(workers.values()) == {name for name in SERVICES if name.startswith("delivery-")}
    for name in workers.values():
        delivery = env_of(deployments[name])
        assert delivery["CARILLON_DELIVERY_PROFILE_TARGET"]["value"] == f"profile:{services['profile']}", name
        assert delivery["CARILLON_DELIVERY_AUDIENCE_TARGET"]["value"] == f"audience:{services['audience']}", name
    routes = json.loads(scheduler["CARILLON_SCHEDULER_DELIVERY_TARGETS"]["value"])
    assert routes == {channel: f"{name}:{services[name]}" for channel, name in workers.items()}


@pytest.mark.parametrize("target", TARGETS)
def test_every_delivery_worker_serves_the_channel_its_name_says(target: str) -> None:
    workers = {name: d for name, d in of_kind(rendered(target), "Deployment").items() if name.startswith("delivery-")}
    assert workers
    for name, deployment in workers.items():
        args = container(deployment)["args"]
        assert args[0] == "delivery_svc"
        assert args[args.index("--channel") + 1] == channel_of(name)
        assert args[args.index("--channel") + 1] in ("email", "sms", "push", "direct_mail")


# --------------------------------------------------------------------------------------------------
# Hardening, resources, shutdown and labels.
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("target", "name"), DEPLOYMENT_CASES)
def test_the_pod_runs_as_uid_10001_with_a_read_only_root_and_no_privileges(target: str, name: str) -> None:
    pod = of_kind(rendered(target), "Deployment")[name]["spec"]["template"]["spec"]
    containers = pod["containers"] + pod.get("initContainers", [])
    for item in containers:
        effective = {**pod.get("securityContext", {}), **item.get("securityContext", {})}
        context = item.get("securityContext", {})
        assert effective.get("runAsNonRoot") is True
        assert effective.get("runAsUser") == UID
        assert effective.get("seccompProfile") == {"type": "RuntimeDefault"}
        assert context.get("readOnlyRootFilesystem") is True
        assert context.get("allowPrivilegeEscalation") is False
        assert context.get("privileged", False) is False
        assert context.get("capabilities", {}).get("drop") == ["ALL"]
        assert not context.get("capabilities", {}).get("add")
    assert not pod.get("hostNetwork") and not pod.get("hostPID") and not pod.get("hostIPC")


@pytest.mark.parametrize(("target", "name"), DEPLOYMENT_CASES)
def test_the_writable_paths_are_empty_dir_volumes(target: str, name: str) -> None:
    deployment = of_kind(rendered(target), "Deployment")[name]
    volumes = {v["name"]: v for v in deployment["spec"]["template"]["spec"]["volumes"]}
    mounts = {m["mountPath"]: m["name"] for m in container(deployment)["volumeMounts"]}
    for path in ("/var/lib/carillon", "/tmp"):
        assert path in mounts, path
        assert set(volumes[mounts[path]]) == {"name", "emptyDir"}, path
    config = of_kind(rendered(target), "ConfigMap")["carillon-config"]["data"]
    assert config["CARILLON_DATA_DIR"] == "/var/lib/carillon"
    assert {"configMapRef": {"name": "carillon-config"}} in container(deployment)["envFrom"]


@pytest.mark.parametrize(("target", "name"), DEPLOYMENT_CASES)
def test_the_container_sets_cpu_and_memory_requests_within_its_limits(target: str, name: str) -> None:
    resources = container(of_kind(rendered(target), "Deployment")[name])["resources"]
    for resource in ("cpu", "memory"):
        request, limit = resources["requests"][resource], resources["limits"][resource]
        assert 0 < quantity(request) <= quantity(limit), resource


def test_dev_requests_less_than_prod() -> None:
    dev, prod = dict(deployments_in("dev")), dict(deployments_in("prod"))
    for name in SERVICES:
        for side in ("requests", "limits"):
            for resource in ("cpu", "memory"):
                small = quantity(container(dev[name])["resources"][side][resource])
                large = quantity(container(prod[name])["resources"][side][resource])
                assert small <= large, (name, side, resource)


@pytest.mark.parametrize(("target", "name"), DEPLOYMENT_CASES)
def test_termination_grace_outlasts_the_prestop_delay_and_the_shutdown_grace(target: str, name: str) -> None:
    deployment = of_kind(rendered(target), "Deployment")[name]
    grace = float(env_of(deployment)[f"CARILLON_{SETTINGS_PREFIX[name]}_GRACE_PERIOD_S"]["value"])
    pre_stop = container(deployment).get("lifecycle", {}).get("preStop", {})
    delay = 0.0
    if "exec" in pre_stop:
        command = pre_stop["exec"]["command"]
        assert command[0] == "sleep" and len(command) == 2, command
        delay = float(command[1])
    elif "sleep" in pre_stop:
        delay = float(pre_stop["sleep"]["seconds"])
    assert deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] > delay + grace


@pytest.mark.parametrize("target", TARGETS)
def test_every_object_carries_the_required_labels(target: str) -> None:
    for obj in rendered(target):
        if obj["kind"] in ("Deployment", "Service", "ServiceAccount"):
            labels = obj["metadata"].get("labels", {})
            assert all(labels.get(key) for key in REQUIRED_LABELS), resource_id(obj)
            assert labels["app.kubernetes.io/part-of"] == "carillon"
            assert labels["app.kubernetes.io/name"] == obj["metadata"]["name"]
        if obj["kind"] == "Deployment":
            assert pod_labels(obj) == obj["metadata"]["labels"], resource_id(obj)
        if obj["kind"] in ("PodDisruptionBudget", "HorizontalPodAutoscaler"):
            assert obj["metadata"]["labels"]["app.kubernetes.io/part-of"] == "carillon"


@pytest.mark.parametrize("target", TARGETS)
def test_the_version_label_and_image_tag_are_the_project_version(target: str) -> None:
    version = project_version()
    for name, deployment in deployments_in(target):
        assert pod_labels(deployment)["app.kubernetes.io/version"] == version, name
        image = container(deployment)["image"]
        assert image.rsplit(":", 1)[1] == version, name
        assert image.rsplit(":", 1)[0].rsplit("/", 1)[-1] == "carillon", "one image for every service"


@pytest.mark.parametrize(("target", "name"), DEPLOYMENT_CASES)
def test_the_pod_uses_its_own_service_account_without_a_token(target: str, name: str) -> None:
    objects = rendered(target)
    pod = of_kind(objects, "Deployment")[name]["spec"]["template"]["spec"]
    account = of_kind(objects, "ServiceAccount")[pod["serviceAccountName"]]
    assert pod["serviceAccountName"] == name
    assert account["automountServiceAccountToken"] is False
    assert pod.get("automountServiceAccountToken") is False


# --------------------------------------------------------------------------------------------------
# Secrets.
# --------------------------------------------------------------------------------------------------

SECRET_NAME = re.compile(r"(PASSWORD|SECRET|TOKEN|API_KEY|PRIVATE_KEY|CREDENTIAL|DATABASE_URL)", re.IGNORECASE)
URL_WITH_PASSWORD = re.compile(r"\w+(\+\w+)?://[^/\s:@]+:[^/\s@]+@")


@pytest.mark.parametrize(("target", "name"), DEPLOYMENT_CASES)
def test_the_database_url_comes_from_the_carillon_database_secret(target: str, name: str) -> None:
    variable = env_of(of_kind(rendered(target), "Deployment")[name])["CARILLON_DATABASE_URL"]
    assert "value" not in variable
    reference = variable["valueFrom"]["secretKeyRef"]
    assert (reference["name"], reference["key"]) == ("carillon-database", "url")
    assert reference.get("optional", False) is (target == "dev"), "only dev may run without PostgreSQL"


@pytest.mark.parametrize("target", TARGETS)
def test_no_manifest_holds_a_literal_secret(target: str) -> None:
    objects = rendered(target)
    assert not [obj for obj in objects if obj["kind"] == "Secret"], "create Secrets out of band (deploy/README.md)"
    for name, deployment in deployments_in(target):
        for variable in container(deployment).get("env", []):
            if SECRET_NAME.search(variable["name"]):
                assert "value" not in variable, (name, variable["name"])
                assert "secretKeyRef" in variable["valueFrom"], (name, variable["name"])
    for config_map in of_kind(objects, "ConfigMap").values():
        for key, value in config_map.get("data", {}).items():
            assert not SECRET_NAME.search(key), key
            assert not URL_WITH_PASSWORD.search(value), key
    for path in K8S.rglob("*.yaml"):
        assert not URL_WITH_PASSWORD.search(path.read_text(encoding="utf-8")), path


# --------------------------------------------------------------------------------------------------
# Overlays.
# --------------------------------------------------------------------------------------------------


def test_dev_runs_one_replica_of_everything_with_the_outbox_provider() -> None:
    deployments = dict(deployments_in("dev"))
    assert {name: d["spec"]["replicas"] for name, d in deployments.items()} == dict.fromkeys(SERVICES, 1)
    assert env_of(deployments["delivery-email"])["CARILLON_DELIVERY_EMAIL_PROVIDER"]["value"] == "outbox"
    objects = rendered("dev")
    assert not of_kind(objects, "HorizontalPodAutoscaler")
    assert not of_kind(objects, "PodDisruptionBudget")


def test_prod_runs_several_replicas_of_every_service_and_sends_through_smtp() -> None:
    deployments = dict(deployments_in("prod"))
    assert all(deployments[name]["spec"]["replicas"] > 1 for name in SERVICES)
    delivery = env_of(deployments["delivery-email"])
    assert delivery["CARILLON_DELIVERY_EMAIL_PROVIDER"]["value"] == "smtp"
    assert delivery["CARILLON_DELIVERY_SMTP_HOST"]["value"]
    assert 0 < int(delivery["CARILLON_DELIVERY_SMTP_PORT"]["value"]) < 65536


def test_every_replicated_prod_deployment_has_a_pod_disruption_budget() -> None:
    objects = rendered("prod")
    budgets = of_kind(objects, "PodDisruptionBudget")
    for name, deployment in of_kind(objects, "Deployment").items():
        if deployment["spec"].get("replicas", 1) <= 1:
            continue
        covering = [
            b for b in budgets.values() if selects(b["spec"]["selector"]["matchLabels"], pod_labels(deployment))
        ]
        assert len(covering) == 1, f"{name}: {len(covering)} PodDisruptionBudgets"
        (budget,) = covering
        assert budget["apiVersion"] == "policy/v1"
        if "minAvailable" in budget["spec"]:
            assert int(budget["spec"]["minAvailable"]) < deployment["spec"]["replicas"], name
        else:
            assert int(budget["spec"]["maxUnavailable"]) >= 1, name


def test_every_replicated_prod_deployment_has_a_horizontal_pod_autoscaler() -> None:
    objects = rendered("prod")
    autoscalers = of_kind(objects, "HorizontalPodAutoscaler")
    for name, deployment in of_kind(objects, "Deployment").items():
        replicas = deployment["spec"].get("replicas", 1)
        if replicas <= 1:
            continue
        matching = [
            hpa
            for hpa in autoscalers.values()
            if hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": name}
        ]
        assert len(matching) == 1, f"{name}: {len(matching)} HorizontalPodAutoscalers"
        (hpa,) = matching
        assert hpa["apiVersion"] == "autoscaling/v2"
        assert hpa["spec"]["minReplicas"] == replicas < hpa["spec"]["maxReplicas"]
        for metric in hpa["spec"]["metrics"]:
            if metric["type"] == "Resource":  # utilization is a share of the requests, so they must exist
                assert metric["resource"]["name"] in container(deployment)["resources"]["requests"]


def test_prod_spreads_each_deployment_over_nodes_with_selectors_that_match_its_pods() -> None:
    for name, deployment in deployments_in("prod"):
        constraints = deployment["spec"]["template"]["spec"].get("topologySpreadConstraints", [])
        assert "kubernetes.io/hostname" in {c["topologyKey"] for c in constraints}, name
        for constraint in constraints:
            assert selects(constraint["labelSelector"]["matchLabels"], pod_labels(deployment)), name


# --------------------------------------------------------------------------------------------------
# The image.
# --------------------------------------------------------------------------------------------------


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of deploy/Dockerfile, with continuation lines joined."""
    text = re.sub(r"\\\n", " ", (DEPLOY / "Dockerfile").read_text(encoding="utf-8"))
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1] if " " in line else "") for line in lines]


def test_the_image_runs_python_m_as_uid_10001_on_python_3_11_slim() -> None:
    instructions = dockerfile_instructions()
    stages = [args for op, args in instructions if op == "FROM"]
    arg_values = dict(re.findall(r"(\w+)=(\S+)", " ".join(args for op, args in instructions if op == "ARG")))
    images = {re.sub(r"\$\{(\w+)\}", lambda m: arg_values[m.group(1)], stage.split()[0]) for stage in stages}
    assert images == {"python:3.11-slim"}
    last_stage = max(i for i, (op, _) in enumerate(instructions) if op == "FROM")
    users = [args for op, args in instructions[last_stage:] if op == "USER"]
    assert users and users[-1].split(":")[0] == str(UID), "numeric non-root user, so runAsNonRoot can check it"
    (entrypoint,) = [json.loads(args) for op, args in instructions if op == "ENTRYPOINT"]
    assert entrypoint == ["python", "-m"]


def test_the_image_installs_every_project_package_without_dev_extras() -> None:
    instructions = dockerfile_instructions()
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    packages = [pattern.rstrip("*") for pattern in pyproject["tool"]["setuptools"]["packages"]["find"]["include"]]
    copied = {args.split()[0] for op, args in instructions if op == "COPY" and not args.startswith("--from")}
    for package in packages:
        assert package in copied, f"the Dockerfile does not copy {package}"
    installs = [args for op, args in instructions if op == "RUN" and "pip install" in args]
    assert installs and all("[dev]" not in args and "-e " not in args for args in installs)


# --------------------------------------------------------------------------------------------------
# The loader itself, so a green run means the checks saw patched content.
# --------------------------------------------------------------------------------------------------


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")


DEPLOYMENT_YAML = """
apiVersion: apps/v1
kind: Deployment
metadata: {name: web, labels: {app: web}}
spec:
  replicas: 1
  template:
    spec:
      containers:
        - name: server
          image: carillon:1.0
          env: [{name: A, value: "1"}, {name: B, value: "2"}]
"""


def test_the_loader_applies_strategic_merge_json6902_generators_and_images(tmp_path: Path) -> None:
    _write(tmp_path / "base/web/deployment.yaml", DEPLOYMENT_YAML)
    _write(tmp_path / "base/web/kustomization.yaml", "resources: [deployment.yaml]\nkind: Kustomization\n")
    _write(
        tmp_path / "base/kustomization.yaml",
        "kind: Kustomization\nresources: [web]\nconfigMapGenerator: [{name: cfg, literals: [X=1, Y=2]}]\n",
    )
    _write(
        tmp_path / "overlay/env.yaml",
        "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: web}\n"
        "spec: {template: {spec: {containers: [{name: server, env: [{name: B, value: '3'}, {name: C, value: '4'}]}]}}}"
        "\n",
    )
    _write(
        tmp_path / "overlay/kustomization.yaml",
        """
kind: Kustomization
resources: [../base]
configMapGenerator: [{name: cfg, behavior: merge, literals: [Y=3]}]
patches:
  - path: env.yaml
  - target: {kind: Deployment, labelSelector: app=web}
    patch: '[{"op": "replace", "path": "/spec/replicas", "value": 4}]'
images: [{name: carillon, newName: registry.example/carillon, newTag: "2.0"}]
""",
    )
    objects = build(tmp_path / "overlay")
    deployment = of_kind(objects, "Deployment")["web"]
    assert deployment["spec"]["replicas"] == 4
    assert container(deployment)["env"] == [
        {"name": "B", "value": "3"},
        {"name": "C", "value": "4"},
        {"name": "A", "value": "1"},
    ]
    assert container(deployment)["image"] == "registry.example/carillon:2.0"
    assert of_kind(objects, "ConfigMap")["cfg"]["data"] == {"X": "1", "Y": "3"}


@pytest.mark.parametrize(
    ("kustomization", "reason"),
    [
        ("kind: Kustomization\nresources: [web]\nnamePrefix: x-\n", "unsupported fields"),
        ("kind: Kustomization\nresources: [web]\npatches: [{path: nothing.yaml}]\n", "matches no resource"),
        ("kind: Kustomization\nresources: [web, web/deployment.yaml]\n", "duplicate resources"),
    ],
)
def test_the_loader_refuses_what_it_cannot_render_faithfully(tmp_path: Path, kustomization: str, reason: str) -> None:
    _write(tmp_path / "web/deployment.yaml", DEPLOYMENT_YAML)
    _write(tmp_path / "web/kustomization.yaml", "kind: Kustomization\nresources: [deployment.yaml]\n")
    _write(tmp_path / "nothing.yaml", "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: absent}\n")
    _write(tmp_path / "kustomization.yaml", kustomization)
    with pytest.raises(KustomizeError, match=reason):
        build(tmp_path)
