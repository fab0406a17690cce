"""Deployment files agree with the code: docker-compose.yml, deploy/k8s and the Dockerfile
name only settings, flags, endpoints and Redis names that exist.

No container engine or cluster runs here, so these checks read the files. Where `kubectl`
is installed, the kustomize overlays are also rendered and the result checked.
"""

from __future__ import annotations

import dataclasses
import re
import shutil
import subprocess
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from shared import keys
from shared.cli import build_parser
from shared.config import Config, env_name, host_port, load_config

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
COMPOSE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile"
OVERLAYS = sorted(p for p in (K8S / "overlays").iterdir() if p.is_dir())

#: What the gateway answers over plain HTTP GET on its port (gateway/server.py).
PROBE_PATHS = {"/healthz", "/readyz"}
CONFIG_ENV = {env_name(f.name) for f in dataclasses.fields(Config)}
ENV_NAME = re.compile(r"\bSTREAMSCRIBE_[A-Z0-9_]+\b")
INTERPOLATION = re.compile(r"\$\{(\w+)(?::?-([^}]*))?\}")


def _yaml_files() -> list[Path]:
    return sorted([COMPOSE, *DEPLOY.rglob("*.yaml"), *DEPLOY.rglob("*.yml")])


def _docs(path: Path) -> list[Any]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def _k8s_objects() -> Iterator[tuple[Path, dict[str, Any]]]:
    """Kubernetes objects and object patches (overlays); not the kustomization files."""
    for path in sorted(K8S.rglob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        for doc in _docs(path):
            if isinstance(doc, dict) and "kind" in doc:
                yield path, doc


def _base_object(kind: str, name: str) -> dict[str, Any]:
    """The one object of that kind and name in base/ or components/."""
    (obj,) = [
        o
        for path, o in _k8s_objects()
        if not _in(path, K8S / "overlays") and o["kind"] == kind and o["metadata"]["name"] == name
    ]
    return obj


def _walk(node: Any) -> Iterator[Any]:
    """Every mapping key and scalar in a YAML tree."""
    if isinstance(node, dict):
        for key, value in node.items():
            yield key
            yield from _walk(value)
    elif isinstance(node, list):
        for item in node:
            yield from _walk(item)
    else:
        yield node


def _containers(obj: dict[str, Any]) -> list[dict[str, Any]]:
    spec = obj.get("spec", {}).get("template", {}).get("spec", {})
    return list(spec.get("containers", []))


def _is_ours(image: str) -> bool:
    return image.split(":")[0].rsplit("/", 1)[-1] == "streamscribe"


def _compose() -> dict[str, Any]:
    (doc,) = _docs(COMPOSE)
    assert isinstance(doc, dict)
    return doc


def _interpolate(value: Any) -> str:
    """Compose's `${NAME:-default}` with nothing set in the environment."""
    return INTERPOLATION.sub(lambda m: m.group(2) or "", str(value))


def _compose_env(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment", {})
    assert isinstance(env, dict), "environment is written as a mapping"
    return {k: _interpolate(v) for k, v in env.items()}


def _seconds(duration: str) -> float:
    match = re.fullmatch(r"(\d+)(s|m)", duration)
    assert match, f"unexpected duration {duration!r}"
    return int(match.group(1)) * (60 if match.group(2) == "m" else 1)


def _configmap_env(overlay: Path | None = None) -> dict[str, str]:
    """The base ConfigMap's data, with an overlay's ConfigMap patch applied."""
    data: dict[str, str] = dict(_base_object("ConfigMap", "streamscribe-config")["data"])
    if overlay is not None:
        for path, obj in _k8s_objects():
            if _in(path, overlay) and obj["kind"] == "ConfigMap":
                for key, value in obj.get("data", {}).items():
                    if value is None:
                        data.pop(key, None)
                    else:
                        data[key] = value
    return data


def _in(path: Path, folder: Path) -> bool:
    return folder in path.parents


# --- every file parses --------------------------------------------------------------------


def test_every_yaml_file_parses() -> None:
    """docker-compose.yml and every YAML file under deploy/ is valid YAML with content."""
    files = _yaml_files()
    assert COMPOSE in files and len(files) > 10
    for path in files:
        assert _docs(path), f"{path} is empty"


def test_env_names_are_config_fields() -> None:
    """Every STREAMSCRIBE_* name in compose and deploy/ (keys, values, literals, comments of
    commands) is the variable of a Config field."""
    seen: set[str] = set()
    for path in _yaml_files():
        for doc in _docs(path):
            for item in _walk(doc):
                for name in ENV_NAME.findall(str(item)):
                    assert name in CONFIG_ENV, f"{path}: {name} is not a setting"
                    seen.add(name)
    assert {"STREAMSCRIBE_REDIS_URL", "STREAMSCRIBE_CERTFILE", "STREAMSCRIBE_SLOTS"} <= seen


# --- docker-compose.yml --------------------------------------------------------------------


def test_compose_commands_parse_with_the_real_cli() -> None:
    """Each streamscribe service's command line is accepted by `streamscribe`'s parser, and
    its environment builds a valid Config."""
    services = _compose()["services"]
    ours = {n: s for n, s in services.items() if _is_ours(_interpolate(s.get("image", "")))}
    assert {"gateway", "worker"} <= set(ours)
    for name, service in ours.items():
        entrypoint = service.get("entrypoint", ["streamscribe"])
        assert entrypoint[0] == "streamscribe"
        argv = [*entrypoint[1:], *service.get("command", [])]
        args = build_parser().parse_args(argv)
        assert args.command == ("status" if name == "status" else name)
        config = load_config({}, environ=_compose_env(service))
        if name == "gateway":
            config.require_tls_choice()
            assert config.host == "0.0.0.0" and config.port == 8765
        assert config.redis_url == "redis://redis:6379/0"


def test_compose_redis_persists_and_gateways_drain() -> None:
    """Valkey runs with AOF (fsync every second) on a volume; gateways get more stop time
    than their drain timeout; gateways and workers scale by replicas."""
    services = _compose()["services"]
    redis_cmd = services["redis"]["command"]
    assert redis_cmd[redis_cmd.index("--appendonly") + 1] == "yes"
    assert redis_cmd[redis_cmd.index("--appendfsync") + 1] == "everysec"
    assert any(v.endswith(":/data") for v in services["redis"]["volumes"])
    gateway = services["gateway"]
    drain_s = load_config({}, environ=_compose_env(gateway)).drain_timeout_s
    assert _seconds(gateway["stop_grace_period"]) > drain_s
    assert gateway["deploy"]["replicas"] >= 1 and services["worker"]["deploy"]["replicas"] >= 1
    health = " ".join(gateway["healthcheck"]["test"])
    assert any(path in health for path in PROBE_PATHS)
    assert "https" in health and "http" in health, "the check follows the TLS choice"


# --- Kubernetes ----------------------------------------------------------------------------


def test_kustomizations_list_files_that_exist() -> None:
    """Every resource, component and patch a kustomization names is there."""
    found = 0
    for kustomization in K8S.rglob("kustomization.yaml"):
        (doc,) = _docs(kustomization)
        entries = [*doc.get("resources", []), *doc.get("components", [])]
        entries += [p["path"] for p in doc.get("patches", []) if "path" in p]
        for entry in entries:
            target = kustomization.parent / entry
            assert target.is_file() or (target / "kustomization.yaml").is_file(), (
                f"{kustomization}: {entry} does not exist"
            )
            found += 1
    assert found > 10


def test_base_is_namespace_less() -> None:
    """Base and components leave the namespace to the overlay."""
    for path, obj in _k8s_objects():
        if not _in(path, K8S / "overlays"):
            assert "namespace" not in obj.get("metadata", {}), f"{path} sets a namespace"


def test_k8s_containers_run_real_commands() -> None:
    """Our containers run `gateway` or `worker` with flags the real parser accepts."""
    roles = []
    for path, obj in _k8s_objects():
        for container in _containers(obj):
            if _is_ours(container.get("image", "")):
                args = build_parser().parse_args(
                    [*container.get("command", [])[1:], *container["args"]]
                )
                roles.append(args.command)
                for env in container.get("env", []):
                    assert env["name"] in CONFIG_ENV, f"{path}: {env['name']}"
    assert sorted(roles) == ["gateway", "worker"]


def test_config_maps_build_valid_configs() -> None:
    """The base settings and each overlay's make a valid Config for both roles; the gateway
    port is the one the container and the probes use."""
    for overlay in [None, *OVERLAYS]:
        env = _configmap_env(overlay)
        if "STREAMSCRIBE_REDIS_URL" not in env:  # it comes from the Secret there
            env["STREAMSCRIBE_REDIS_URL"] = "rediss://user:secret@redis.example:6380/0"
        config = load_config({}, environ=env)
        config.require_tls_choice()
        gw = _base_object("Deployment", "streamscribe-gateway")
        (port,) = _containers(gw)[0]["ports"]
        assert port["containerPort"] == config.port


def test_probes_hit_gateway_endpoints() -> None:
    """Readiness uses /readyz, liveness /healthz, on the gateway's named port; the grace
    period covers preStop plus the drain timeout."""
    gw = _base_object("Deployment", "streamscribe-gateway")
    (container,) = _containers(gw)
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    port_names = {p["name"] for p in container["ports"]}
    for probe in ("readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"]["port"] in port_names
    for path, obj in _k8s_objects():
        for item in _containers(obj):
            for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
                http = item.get(probe, {}).get("httpGet")
                if http is not None and "path" in http:
                    assert http["path"] in PROBE_PATHS, f"{path}: {http['path']}"
    pre_stop_s = int(container["lifecycle"]["preStop"]["exec"]["command"][1])
    drain_s = load_config({}, environ=_configmap_env()).drain_timeout_s
    assert gw["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] > pre_stop_s + drain_s


def test_worker_probes_and_compose_check_hit_its_own_endpoint() -> None:
    """The worker's startup and liveness probes, and its compose healthcheck, GET /healthz
    on the port its `worker_metrics` setting listens on (the named port `metrics`), and
    the scrape annotation names that port too."""
    worker = _base_object("Deployment", "streamscribe-worker")
    (container,) = _containers(worker)
    env = {e["name"]: e["value"] for e in container["env"] if "value" in e}
    config = load_config({}, environ={**_configmap_env(), **env})
    _, port = host_port(config.worker_metrics, "worker_metrics")
    (named,) = container["ports"]
    assert (named["name"], named["containerPort"]) == ("metrics", port)
    for probe in ("startupProbe", "livenessProbe"):
        assert container[probe]["httpGet"] == {"path": "/healthz", "port": "metrics"}
    assert "readinessProbe" not in container
    annotations = worker["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/port"] == str(port)
    service = _compose()["services"]["worker"]
    compose = load_config({}, environ=_compose_env(service))
    _, compose_port = host_port(compose.worker_metrics, "worker_metrics")
    assert f"127.0.0.1:{compose_port}/healthz" in " ".join(service["healthcheck"]["test"])


def test_keda_triggers_watch_the_dispatch_group() -> None:
    """Every dispatch lane (keys.DISPATCH_LANES) has a pending and a lag trigger through
    keys.DISPATCH_GROUP, with thresholds in step with the workers' slots."""
    slots = int(_configmap_env()["STREAMSCRIBE_SLOTS"])
    triggers = [
        t
        for _, obj in _k8s_objects()
        if obj["kind"] == "ScaledObject"
        for t in obj["spec"]["triggers"]
    ]
    assert {t["type"] for t in triggers} == {"redis-streams"}
    kinds = set()
    for trigger in triggers:
        meta = trigger["metadata"]
        assert meta["stream"] in keys.DISPATCH_LANES
        assert meta["consumerGroup"] == keys.DISPATCH_GROUP
        assert all(isinstance(v, str) for v in meta.values()), "KEDA metadata values are strings"
        if "lagCount" in meta:
            kinds.add(("lag", meta["stream"]))
            assert int(meta["lagCount"]) == slots and "activationLagCount" in meta
        if "pendingEntriesCount" in meta:
            kinds.add(("pending", meta["stream"]))
            assert 0 < int(meta["pendingEntriesCount"]) <= slots
    assert kinds == {(kind, lane) for kind in ("lag", "pending") for lane in keys.DISPATCH_LANES}


def test_redis_statefulset_persists_with_aof() -> None:
    """The in-cluster Valkey keeps an append-only file on a volume claim and never evicts."""
    sts = _base_object("StatefulSet", "redis")
    (container,) = _containers(sts)
    args = container["args"]
    assert args[args.index("--appendonly") + 1] == "yes"
    assert args[args.index("--appendfsync") + 1] == "everysec"
    assert args[args.index("--maxmemory-policy") + 1] == "noeviction"
    claims = {c["metadata"]["name"] for c in sts["spec"]["volumeClaimTemplates"]}
    assert {m["name"] for m in container["volumeMounts"]} <= claims


@pytest.mark.parametrize("overlay", OVERLAYS, ids=[o.name for o in OVERLAYS])
def test_overlay_renders_with_kubectl(overlay: Path) -> None:
    """`kubectl kustomize` builds the overlay; every object lands in its namespace; the
    gateway's probe scheme matches its TLS setting."""
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed")
    rendered = subprocess.run(
        [kubectl, "kustomize", str(overlay)], capture_output=True, text=True, check=True, timeout=60
    ).stdout
    objects = [o for o in yaml.safe_load_all(rendered) if o]
    (ns,) = [o["metadata"]["name"] for o in objects if o["kind"] == "Namespace"]
    for obj in objects:
        if obj["kind"] != "Namespace":
            assert obj["metadata"].get("namespace") == ns, obj["metadata"]["name"]
    (cm,) = [o for o in objects if o["kind"] == "ConfigMap"]
    tls = cm["data"].get("STREAMSCRIBE_CERTFILE", "none").lower() != "none"
    (gw,) = [o for o in objects if o["kind"] == "Deployment" and "gateway" in o["metadata"]["name"]]
    (container,) = _containers(gw)
    for probe in ("readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"]["scheme"] == ("HTTPS" if tls else "HTTP")
    mounts = {m["mountPath"] for m in container["volumeMounts"]}
    assert (
        any(cm["data"].get("STREAMSCRIBE_CERTFILE", "").startswith(m + "/") for m in mounts) == tls
    )
    assert {o["kind"] for o in objects} & {"HorizontalPodAutoscaler", "ScaledObject"}


# --- Dockerfile ----------------------------------------------------------------------------


def test_dockerfile_runs_streamscribe_as_non_root() -> None:
    """ENTRYPOINT is the `streamscribe` console script, installed with the worker extra, and
    the container runs as a non-root user."""
    text = DOCKERFILE.read_text()
    instructions = [
        line.split(None, 1) for line in text.splitlines() if line and not line.startswith("#")
    ]
    final_stage = instructions[max(i for i, ins in enumerate(instructions) if ins[0] == "FROM") :]
    entrypoints = [ins[1] for ins in final_stage if ins[0] == "ENTRYPOINT"]
    assert entrypoints == ['["streamscribe"]']
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert pyproject["project"]["scripts"]["streamscribe"] == "shared.cli:main"
    users = [ins[1] for ins in final_stage if ins[0] == "USER"]
    assert users and users[-1].split(":")[0] not in ("0", "root")
    assert "[worker]" in text and "worker" in pyproject["project"]["optional-dependencies"]
    ignored = (ROOT / ".dockerignore").read_text().splitlines()
    for needed in ("pyproject.toml", "README.md", "shared/", "gateway/", "worker/"):
        assert f"!{needed}" in ignored, f".dockerignore keeps {needed} out of the build"
