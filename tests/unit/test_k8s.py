"""deploy/k8s/: the Kubernetes manifests, offline.

- Every built-in resource against the Kubernetes OpenAPI schemas, strict (no unknown field), as
  kubernetes-validate bundles them: the oldest version the manifests claim and the newest bundled.
- The KEDA ScaledObject (a CRD, in no bundled schema) against ``SCALEDOBJECT``, a schema written from
  KEDA's documented ScaledObject fields and redis-streams parameters; its HPA ``behavior`` against
  the Kubernetes schema of HorizontalPodAutoscalerBehavior.
- What the server needs of them (``problems``): each vqdiff container's settings are worked out as
  ``vqdiff serve`` would (its args through the CLI parser, its env, the variables Kubernetes adds for
  Services), so an unknown ``VQDIFF_*`` name or a bad value fails here as it would at start-up; the
  roles, the termination grace periods against the drains, probe and metrics ports against the
  settings, the model volume, Redis persistence, the disruption budgets, and the ScaledObject's
  target, stream, group and address against the workers and Redis.

Every check can fail: ``test_a_broken_manifest_is_caught`` breaks each one in memory.
"""

from __future__ import annotations

import base64
import copy
import importlib.resources
import itertools
import json
import shutil
import subprocess
from pathlib import Path, PurePosixPath
from urllib.parse import urlparse

import jsonschema
import kubernetes_validate
import pytest
import referencing
import yaml

from vqdiff.cli import build_parser
from vqdiff.server.broker import GROUP, key
from vqdiff.server.main import ANSWER_S
from vqdiff.server.settings import ROLES, Settings, from_args
from vqdiff.server.worker import FLUSH_S

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "k8s"
# 1.30: the preStop sleep action (api.yaml); and the newest schemas the package bundles
KUBERNETES = ("1.30", ".".join(kubernetes_validate.latest_version().split(".")[:2]))
STEP_S = 5.0  # one engine step of a full batch and its decodes (ITHQ on a GPU), at most: an assumption
MARGIN_S = 5.0  # what a grace period must leave beyond the bound it covers
POD = "vqdiff-worker-5f7d8c9b4-x2x7q"  # what a fieldRef metadata.name gives: a pod name


def load(folder: Path) -> list[dict]:
    """The resources a kustomization lists, in order, each with its file under ``_file``."""
    kust = yaml.safe_load((folder / "kustomization.yaml").read_text())
    out = []
    for name in kust["resources"]:
        for doc in yaml.safe_load_all((folder / name).read_text()):
            if doc:
                out.append({**doc, "_file": name})
    return out


def plain(r: dict) -> dict:
    return {k: v for k, v in r.items() if k != "_file"}


BASE, KEDA = load(K8S), load(K8S / "keda")


# -- the ScaledObject's schema, from KEDA's documentation ----------------------------------------------

def _strings(*names: str) -> dict:
    return {n: {"type": "string"} for n in names}


_INT = {"type": "integer", "minimum": 0}
# The redis-streams trigger's metadata: the documented parameters, all strings (the CRD's metadata is
# a map of strings). consumerGroup picks XPENDING (pendingEntriesCount) or, with lagCount, XINFO
# GROUPS' lag (Redis 7+); without it, XLEN (streamLength).
_REDIS_STREAMS = {
    "type": "object",
    "properties": _strings("address", "host", "port", "usernameFromEnv", "passwordFromEnv", "stream",
                           "consumerGroup", "pendingEntriesCount", "streamLength", "lagCount",
                           "activationLagCount", "enableTLS", "unsafeSsl", "databaseIndex", "addressFromEnv",
                           "hostFromEnv", "portFromEnv"),
    "additionalProperties": False,
    "required": ["stream"],
    "anyOf": [{"required": ["address"]}, {"required": ["host"]}, {"required": ["addressFromEnv"]},
              {"required": ["hostFromEnv"]}],
    "dependentRequired": {"lagCount": ["consumerGroup"], "pendingEntriesCount": ["consumerGroup"]},
}
SCALEDOBJECT = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "additionalProperties": False,
    "properties": {
        "apiVersion": {"const": "keda.sh/v1alpha1"},
        "kind": {"const": "ScaledObject"},
        "metadata": {"$ref": "https://kubernetes.io/api/_definitions.json#/$defs/"
                             "io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta", "required": ["name"]},
        "spec": {
            "type": "object",
            "required": ["scaleTargetRef", "triggers"],
            "additionalProperties": False,
            "properties": {
                "scaleTargetRef": {
                    "type": "object", "required": ["name"], "additionalProperties": False,
                    "properties": _strings("apiVersion", "kind", "name", "envSourceContainerName"),
                },
                "pollingInterval": _INT, "cooldownPeriod": _INT, "initialCooldownPeriod": _INT,
                "idleReplicaCount": _INT, "minReplicaCount": _INT, "maxReplicaCount": _INT,
                "fallback": {
                    "type": "object", "required": ["failureThreshold", "replicas"], "additionalProperties": False,
                    "properties": {"failureThreshold": _INT, "replicas": _INT},
                },
                "advanced": {
                    "type": "object", "additionalProperties": False,
                    "properties": {
                        "restoreToOriginalReplicaCount": {"type": "boolean"},
                        "horizontalPodAutoscalerConfig": {
                            "type": "object", "additionalProperties": False,
                            "properties": {
                                "name": {"type": "string"},
                                "behavior": {"$ref": "https://kubernetes.io/api/_definitions.json#/$defs/"
                                                     "io.k8s.api.autoscaling.v2.HorizontalPodAutoscalerBehavior"},
                            },
                        },
                        "scalingModifiers": {
                            "type": "object", "required": ["target", "formula"], "additionalProperties": False,
                            "properties": {**_strings("target", "activationTarget", "formula"),
                                           "metricType": {"enum": ["AverageValue", "Value"]}},
                        },
                    },
                },
                "triggers": {
                    "type": "array", "minItems": 1,
                    "items": {
                        "type": "object", "required": ["type", "metadata"], "additionalProperties": False,
                        "properties": {
                            "type": {"type": "string"},
                            "name": {"type": "string"},
                            "metadata": {"type": "object", "additionalProperties": {"type": "string"}},
                            "useCachedMetrics": {"type": "boolean"},
                            "metricType": {"enum": ["AverageValue", "Value", "Utilization"]},
                            "authenticationRef": {
                                "type": "object", "required": ["name"], "additionalProperties": False,
                                "properties": {"name": {"type": "string"},
                                               "kind": {"enum": ["TriggerAuthentication",
                                                                 "ClusterTriggerAuthentication"]}},
                            },
                        },
                        "if": {"properties": {"type": {"const": "redis-streams"}}},
                        "then": {"properties": {"metadata": _REDIS_STREAMS}},
                    },
                },
            },
        },
    },
}


def _kubernetes_definitions() -> referencing.Registry:
    """The Kubernetes schemas' shared definitions (kubernetes-validate's copy), for the ScaledObject's
    metadata and HPA behavior."""
    path = (importlib.resources.files("kubernetes_validate") / "kubernetes-json-schema"
            / f"v{KUBERNETES[-1]}.0-local-strict" / "_definitions.json")
    return referencing.Resource.from_contents(json.loads(path.read_text())) @ referencing.Registry()


_SCALEDOBJECT_VALIDATOR = jsonschema.Draft202012Validator(SCALEDOBJECT, registry=_kubernetes_definitions())


def schema_errors(resources: list[dict], version: str = KUBERNETES[-1]) -> list[str]:
    out = []
    for r in resources:
        where = f"{r.get('_file')}: {r.get('kind')}/{r.get('metadata', {}).get('name')}"
        if r.get("kind") == "ScaledObject":
            out += [f"{where}: {'.'.join(map(str, e.absolute_path))}: {e.message}"
                    for e in _SCALEDOBJECT_VALIDATOR.iter_errors(plain(r))]
            continue
        try:
            kubernetes_validate.validate(plain(r), version, strict=True)
        except kubernetes_validate.ValidationError as e:
            out.append(f"{where}: {'.'.join(map(str, e.path))}: {e.message}")
        except kubernetes_validate.SchemaNotFoundError as e:
            out.append(f"{where}: {e.message}")
    return out


# -- what the server needs of the manifests ------------------------------------------------------------

def find(resources: list[dict], kind: str, name: str | None = None) -> list[dict]:
    return [r for r in resources if r.get("kind") == kind and (name is None or r["metadata"]["name"] == name)]


def is_vqdiff(container: dict) -> bool:
    """The server's containers: the image named vqdiff (any registry, any tag)."""
    return PurePosixPath(container.get("image", "").split("@")[0].rsplit(":", 1)[0]).name == "vqdiff"


def pod_spec(workload: dict) -> dict:
    return workload["spec"]["template"]["spec"]


def grace_period(workload: dict) -> int:
    return pod_spec(workload).get("terminationGracePeriodSeconds", 30)  # Kubernetes' default


def selects(selector: dict, labels: dict) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def link_variables(service: dict) -> dict[str, str]:
    """The variables the kubelet adds to every container of a pod with enableServiceLinks (the
    default) for a Service in its namespace, named after the Service."""
    n = service["metadata"]["name"].upper().replace("-", "_")
    ports = service["spec"].get("ports", [])
    env = {f"{n}_SERVICE_HOST": "10.0.0.1"}
    for i, p in enumerate(ports):
        proto = p.get("protocol", "TCP")
        if i == 0:
            env |= {f"{n}_SERVICE_PORT": str(p["port"]), f"{n}_PORT": f"{proto.lower()}://10.0.0.1:{p['port']}"}
        if "name" in p:
            env[f"{n}_SERVICE_PORT_{p['name'].upper().replace('-', '_')}"] = str(p["port"])
        base = f"{n}_PORT_{p['port']}_{proto}"
        env |= {base: f"{proto.lower()}://10.0.0.1:{p['port']}", f"{base}_PROTO": proto.lower(),
                f"{base}_PORT": str(p["port"]), f"{base}_ADDR": "10.0.0.1"}
    return env


def container_env(workload: dict, container: dict, resources: list[dict]) -> dict[str, str]:
    """The environment the container starts with: its env entries resolved against the manifests'
    ConfigMaps and Secrets (an optional reference to one that is absent: unset), and the Services'
    link variables unless the pod turns them off."""
    env = {}
    if pod_spec(workload).get("enableServiceLinks", True):
        for s in find(resources, "Service"):
            env |= link_variables(s)
    for e in container.get("env", []):
        source = e.get("valueFrom")
        if source is None:
            env[e["name"]] = e.get("value", "")
            continue
        if "fieldRef" in source:
            field = source["fieldRef"]["fieldPath"]
            env[e["name"]] = {"metadata.name": POD, "metadata.namespace": "ns"}.get(field, "x")
            continue
        kind, ref = ("ConfigMap", source["configMapKeyRef"]) if "configMapKeyRef" in source else \
            ("Secret", source["secretKeyRef"])
        values = {}
        for r in find(resources, kind, ref["name"]):
            data = r.get("data", {})
            values = {**({k: base64.b64decode(v).decode() for k, v in data.items()} if kind == "Secret" else data),
                      **r.get("stringData", {})}
        if ref["key"] in values:
            env[e["name"]] = values[ref["key"]]
        elif not ref.get("optional"):
            raise ValueError(f"{e['name']}: {kind} {ref['name']} with key {ref['key']} is not in the manifests")
    return env


def settings_of(workload: dict, container: dict, resources: list[dict]) -> Settings:
    """The container's settings as `vqdiff serve` works them out (the image's entrypoint is `vqdiff`,
    the container's args its command line); raises what the server would refuse to start on."""
    if container.get("command") not in (None, ["vqdiff"]):
        raise ValueError(f"command {container['command']}: the args must reach the image's entrypoint, vqdiff")
    args = container.get("args", [])
    if args[:1] != ["serve"]:
        raise ValueError(f"args {args}: not `vqdiff serve`")
    try:
        parsed = build_parser().parse_args(args)
    except SystemExit:
        raise ValueError(f"args {args}: `vqdiff serve` refuses them") from None
    settings = from_args(parsed, container_env(workload, container, resources))
    settings.check_role()
    return settings


def servers(resources: list[dict]) -> list[tuple[dict, dict]]:
    return [(w, c) for kind in ("Deployment", "StatefulSet") for w in find(resources, kind)
            for c in pod_spec(w)["containers"] if is_vqdiff(c)]


def port_number(container: dict, port) -> int | None:
    """A probe's or a Service's port: a number, or the name of one of the container's ports."""
    if isinstance(port, int):
        return port
    return next((p["containerPort"] for p in container.get("ports", []) if p.get("name") == port), None)


def sleep_s(container: dict) -> float:
    """How long the preStop hook sleeps (the sleep action, or exec sleep N); 0 without one."""
    hook = container.get("lifecycle", {}).get("preStop", {})
    if "sleep" in hook:
        return float(hook["sleep"]["seconds"])
    command = hook.get("exec", {}).get("command", [])
    return float(command[1]) if len(command) == 2 and command[0] in ("sleep", "/bin/sleep") else 0.0


def check_probes(where: str, container: dict, port: int, problems: list[str]) -> None:
    ports = [p["containerPort"] for p in container.get("ports", [])]
    if port not in ports:
        problems.append(f"{where}: the settings' port {port} is not a containerPort ({ports})")
    for probe, path in (("livenessProbe", "/healthz"), ("readinessProbe", "/readyz"), ("startupProbe", None)):
        get = container.get(probe, {}).get("httpGet")
        if get is None:
            problems.append(f"{where}: no HTTP {probe}")
            continue
        if path is not None and get.get("path") != path:
            problems.append(f"{where}: {probe} asks {get.get('path')}, not {path}")
        if port_number(container, get.get("port")) != port:
            problems.append(f"{where}: {probe} port {get.get('port')} is not the settings' port {port}")


def check_scrape(where: str, workload: dict, port: int, problems: list[str]) -> None:
    a = workload["spec"]["template"].get("metadata", {}).get("annotations", {})
    want = {"prometheus.io/scrape": "true", "prometheus.io/port": str(port), "prometheus.io/path": "/metrics"}
    for k, v in want.items():
        if a.get(k) != v:
            problems.append(f"{where}: annotation {k} is {a.get(k)!r}, not {v!r}")


def check_worker(where: str, w: dict, c: dict, s: Settings, problems: list[str]) -> None:
    if not s.device.startswith("cuda") or s.dtype != "bf16":
        problems.append(f"{where}: device {s.device} / dtype {s.dtype}, not cuda / bf16")
    res = c.get("resources", {})
    gpus = [str(res.get(k, {}).get("nvidia.com/gpu")) for k in ("limits", "requests") if k in res]
    if not gpus or any(g != "1" for g in gpus):
        problems.append(f"{where}: not one nvidia.com/gpu in limits (and requests): {gpus}")
    name = next((e for e in c.get("env", []) if e["name"] == "VQDIFF_WORKER_NAME"), {})
    if name.get("valueFrom", {}).get("fieldRef", {}).get("fieldPath") != "metadata.name":
        problems.append(f"{where}: VQDIFF_WORKER_NAME is not the pod's name (fieldRef metadata.name)")
    if s.worker_port == 0:
        problems.append(f"{where}: the worker port is off: no probes, no metrics")
    check_probes(where, c, s.worker_port, problems)
    check_scrape(where, w, s.worker_port, problems)
    bound, limit = sleep_s(c) + s.grace_s + FLUSH_S + STEP_S + MARGIN_S, grace_period(w)
    if not limit > bound:
        problems.append(f"{where}: terminationGracePeriodSeconds {limit} does not cover the drain: grace "
                        f"{s.grace_s} + flush {FLUSH_S} + a step {STEP_S} + margin {MARGIN_S} = {bound}")
    model = PurePosixPath(str(s.model)) if s.model is not None else None
    if model is None or not model.is_absolute():
        problems.append(f"{where}: VQDIFF_MODEL {s.model} is not a folder path (the embedded model has no volume)")
        return
    volumes = {v["name"]: v for v in pod_spec(w).get("volumes", [])}
    mounts = [m for m in c.get("volumeMounts", []) if model == PurePosixPath(m["mountPath"])
              or PurePosixPath(m["mountPath"]) in model.parents]
    if not mounts:
        problems.append(f"{where}: no volume is mounted at {model} or above it")
    for m in mounts:
        volume = volumes.get(m["name"], {})
        if not m.get("readOnly") or volume.get("persistentVolumeClaim", {}).get("readOnly") is False:
            problems.append(f"{where}: the model volume {m['name']} is not mounted read-only")


def check_api(where: str, w: dict, c: dict, s: Settings, models: set[str], problems: list[str]) -> None:
    if w["spec"].get("replicas", 1) < 2:
        problems.append(f"{where}: replicas {w['spec'].get('replicas', 1)}: fewer than 2 API nodes")
    check_probes(where, c, s.http_port, problems)
    check_scrape(where, w, s.http_port, problems)
    if s.grpc_port and s.grpc_port not in [p["containerPort"] for p in c.get("ports", [])]:
        problems.append(f"{where}: the gRPC port {s.grpc_port} is not a containerPort")
    if sleep_s(c) < 1:
        problems.append(f"{where}: no preStop sleep: SIGTERM would refuse requests the endpoints still route")
    bound, limit = sleep_s(c) + s.grace_s + ANSWER_S + MARGIN_S, grace_period(w)
    if not limit > bound:
        problems.append(f"{where}: terminationGracePeriodSeconds {limit} does not cover the drain: preStop "
                        f"{sleep_s(c)} + grace {s.grace_s} + answers {ANSWER_S} + margin {MARGIN_S} = {bound}")
    if s.model is not None and s.model.name not in models:
        problems.append(f"{where}: the default model {s.model.name!r} is none the workers serve ({sorted(models)})")


def check_services(resources: list[dict], settings: dict, problems: list[str]) -> None:
    """The API's Service: selects the API pods alone, and reaches the HTTP and gRPC ports."""
    api = [(w, c, s) for w, c, s in settings.values() if s.role == "api"]
    for w, c, s in api:
        labels = w["spec"]["template"]["metadata"]["labels"]
        services = [v for v in find(resources, "Service") if selects(v["spec"].get("selector", {}), labels)]
        if len(services) != 1:
            problems.append(f"{w['metadata']['name']}: {len(services)} Services select the API pods, not 1")
            continue
        targets = {port_number(c, p.get("targetPort", p["port"])) for p in services[0]["spec"]["ports"]}
        for port in (s.http_port, s.grpc_port or None):
            if port and port not in targets:
                problems.append(f"Service {services[0]['metadata']['name']}: no port reaches the API's {port}")
    for v in find(resources, "Service"):
        chosen = [w for w in find(resources, "Deployment") + find(resources, "StatefulSet")
                  if selects(v["spec"].get("selector", {}), w["spec"]["template"]["metadata"]["labels"])]
        if len(chosen) != 1:
            problems.append(f"Service {v['metadata']['name']}: selects {len(chosen)} workloads, not 1")


def check_redis(resources: list[dict], settings: dict, problems: list[str]) -> tuple[str, int, int] | None:
    """One Redis URL for every server; an in-cluster Redis keeps an append-only file, fsynced every
    second (deploy/README.md). Returns (host, port, db)."""
    urls = {s.redis_url for _, _, s in settings.values()}
    if len(urls) != 1:
        problems.append(f"the servers name {len(urls)} Redis URLs: {sorted(map(str, urls))}")
        return None
    url = urlparse(urls.pop())
    target = (url.hostname, url.port or 6379, int(url.path.strip("/") or 0))
    for v in find(resources, "Service", url.hostname):
        if target[1] not in [p["port"] for p in v["spec"]["ports"]]:
            problems.append(f"Service {url.hostname}: no port {target[1]} (the Redis URL's)")
        for ss in find(resources, "StatefulSet"):
            if not selects(v["spec"]["selector"], ss["spec"]["template"]["metadata"]["labels"]):
                continue
            args = [a for c in pod_spec(ss)["containers"] for a in c.get("command", []) + c.get("args", [])]
            pairs = dict(itertools.pairwise(args))
            for flag, value in (("--appendonly", "yes"), ("--appendfsync", "everysec")):
                if pairs.get(flag) != value:
                    problems.append(f"StatefulSet {ss['metadata']['name']}: {flag} is {pairs.get(flag)!r}, not {value}")
            if not ss["spec"].get("volumeClaimTemplates"):
                problems.append(f"StatefulSet {ss['metadata']['name']}: no volume for the append-only file")
    return target


def check_budgets(resources: list[dict], settings: dict, problems: list[str]) -> None:
    for w in {id(w): w for w, _, _ in settings.values()}.values():
        labels = w["spec"]["template"]["metadata"]["labels"]
        pdbs = [p for p in find(resources, "PodDisruptionBudget")
                if selects(p["spec"]["selector"].get("matchLabels", {}), labels)]
        if len(pdbs) != 1:
            problems.append(f"{w['metadata']['name']}: {len(pdbs)} PodDisruptionBudgets select its pods, not 1")
    for p in find(resources, "PodDisruptionBudget"):
        chosen = [w for w in find(resources, "Deployment") + find(resources, "StatefulSet")
                  if selects(p["spec"]["selector"].get("matchLabels", {}), w["spec"]["template"]["metadata"]["labels"])]
        if len(chosen) != 1:
            problems.append(f"PodDisruptionBudget {p['metadata']['name']}: selects {len(chosen)} workloads, not 1")


def check_scaling(base: list[dict], keda: list[dict], settings: dict, redis: tuple | None, problems: list[str]) -> None:
    for so in find(keda, "ScaledObject"):
        where = f"ScaledObject {so['metadata']['name']}"
        spec, ref = so["spec"], so["spec"]["scaleTargetRef"]
        if ref.get("kind", "Deployment") != "Deployment" or ref.get("apiVersion", "apps/v1") != "apps/v1":
            problems.append(f"{where}: scaleTargetRef is a {ref.get('kind')}, not an apps/v1 Deployment")
        workers = [(w, c, s) for w, c, s in settings.values()
                   if s.role == "worker" and w["kind"] == "Deployment" and w["metadata"]["name"] == ref["name"]]
        if not workers:
            problems.append(f"{where}: scaleTargetRef {ref['name']!r} is no worker Deployment")
            continue
        w, _, s = workers[0]
        if "replicas" in w["spec"]:
            problems.append(f"Deployment {ref['name']}: sets replicas, which an apply resets under the autoscaler")
        # an API node is ready only while a live worker published a model: with none, nothing is
        # enqueued, and nothing scales the workers up again
        if spec.get("minReplicaCount", 0) < 1 or "idleReplicaCount" in spec:
            problems.append(f"{where}: minReplicaCount {spec.get('minReplicaCount', 0)} (or an idleReplicaCount): "
                            f"with no worker the API nodes are not ready and nothing scales up")
        if spec.get("maxReplicaCount", 100) < spec.get("minReplicaCount", 0):
            problems.append(f"{where}: maxReplicaCount below minReplicaCount")
        grace = grace_period(w)
        hpa = spec.get("advanced", {}).get("horizontalPodAutoscalerConfig", {})
        down = hpa.get("behavior", {}).get("scaleDown", {})
        policies = down.get("policies", [])
        if down.get("stabilizationWindowSeconds", 300) < grace or not policies or any(
                p["type"] != "Pods" or p["value"] * grace > p["periodSeconds"] for p in policies):
            problems.append(f"{where}: scaleDown may remove workers faster than one per drain "
                            f"(terminationGracePeriodSeconds {grace}): {down}")
        stream = key("jobs", s.model.name if s.model is not None else "")
        for i, t in enumerate(spec["triggers"]):
            m, at = t.get("metadata", {}), f"{where}: trigger {t.get('name', i)}"
            if t["type"] != "redis-streams":
                problems.append(f"{at}: type {t['type']}, not redis-streams")
                continue
            if m.get("stream") != stream:
                problems.append(f"{at}: stream {m.get('stream')!r}, not the workers' {stream!r}")
            if m.get("consumerGroup") != GROUP:
                problems.append(f"{at}: consumerGroup {m.get('consumerGroup')!r}, not {GROUP!r}")
            if not ({"lagCount", "pendingEntriesCount"} & set(m)):
                problems.append(f"{at}: neither lagCount nor pendingEntriesCount: not the group's work")
            if redis is not None:
                host, port, db = redis
                # KEDA's operator dials from its own namespace: an in-cluster Service needs this one's
                want = f"{host}.NAMESPACE.svc:{port}" if find(base, "Service", host) else f"{host}:{port}"
                if m.get("address") != want:
                    problems.append(f"{at}: address {m.get('address')!r}, not {want!r} (the Redis URL's)")
                if int(m.get("databaseIndex", 0)) != db:
                    problems.append(f"{at}: databaseIndex {m.get('databaseIndex', 0)}, not the Redis URL's {db}")


def problems(base: list[dict] = BASE, keda: list[dict] = KEDA) -> list[str]:
    """Everything the server needs of the manifests that a schema can't say; [] when all holds."""
    out: list[str] = []
    for r in base + keda:
        if "namespace" in r.get("metadata", {}):
            out.append(f"{r['_file']}: {r['kind']}/{r['metadata']['name']} names a namespace")
    settings = {}
    for w, c in servers(base):
        where = f"{w['kind']}/{w['metadata']['name']} container {c['name']}"
        try:
            s = settings_of(w, c, base)
        except ValueError as e:  # BadSetting, an unknown VQDIFF_* name, a flag `vqdiff serve` refuses
            out.append(f"{where}: the server would not start: {e}")
            continue
        if s.role not in ROLES[1:]:
            out.append(f"{where}: role {s.role}, not api or worker")
            continue
        if w["spec"]["template"]["metadata"]["labels"].get("app.kubernetes.io/component") != s.role:
            out.append(f"{where}: role {s.role} under the component label "
                       f"{w['spec']['template']['metadata']['labels'].get('app.kubernetes.io/component')}")
        settings[where] = (w, c, s)
    models = {s.model.name for _, _, s in settings.values() if s.role == "worker" and s.model is not None}
    if not any(s.role == "api" for _, _, s in settings.values()) or not models:
        out.append(f"not one API and one worker Deployment: {sorted(settings)}")
    for where, (w, c, s) in settings.items():
        if s.role == "worker":
            check_worker(where, w, c, s, out)
        else:
            check_api(where, w, c, s, models, out)
    check_services(base, settings, out)
    redis = check_redis(base, settings, out)
    check_budgets(base, settings, out)
    check_scaling(base, keda, settings, redis, out)
    return out


# -- the tests -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("version", KUBERNETES)
def test_the_built_in_resources_match_the_kubernetes_schemas(version):
    kinds = {r["kind"] for r in BASE}
    assert {"Deployment", "Service", "StatefulSet", "PodDisruptionBudget", "ConfigMap"} <= kinds
    assert schema_errors(BASE, version) == []


def test_the_scaledobject_matches_kedas_documented_spec():
    assert [r["kind"] for r in KEDA] == ["ScaledObject"]
    assert schema_errors(KEDA) == []


def test_the_manifests_agree_with_the_server():
    assert problems() == []


def test_the_kustomizations_list_every_manifest_and_name_no_namespace():
    for folder in (K8S, K8S / "keda"):
        kust = yaml.safe_load((folder / "kustomization.yaml").read_text())
        assert "namespace" not in kust
        files = {p.name for p in folder.glob("*.yaml")} - {"kustomization.yaml"}
        assert sorted(files) == sorted(kust["resources"]), folder


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl (its built-in kustomize) is not installed")
def test_kustomize_builds_what_the_files_hold():
    """`kubectl kustomize` (offline: local files only) yields the resources read here, unchanged."""
    for folder, resources in ((K8S, BASE), (K8S / "keda", KEDA)):
        built = subprocess.run(["kubectl", "kustomize", str(folder)], capture_output=True, text=True,
                               timeout=60, check=True).stdout
        docs = [d for d in yaml.safe_load_all(built) if d]
        assert sorted(map(_ident, docs)) == sorted(map(_ident, resources))
        assert sorted(docs, key=_ident) == sorted(map(plain, resources), key=_ident)


def _ident(r: dict) -> tuple[str, str]:
    return r["kind"], r["metadata"]["name"]


def _ctr(resources, name):
    return next(c for w in find(resources, "Deployment", name) for c in pod_spec(w)["containers"])


def _env(resources, name, var, value=None, **source):
    env = _ctr(resources, name)["env"]
    env[:] = [e for e in env if e["name"] != var] + [{"name": var, **({"value": value} if source == {} else source)}]


def _trigger(keda, **metadata):
    for t in find(keda, "ScaledObject")[0]["spec"]["triggers"]:
        t["metadata"].update(metadata)


def _replace(items: list, old, new) -> None:
    items[items.index(old)] = new


def _so(keda):
    return find(keda, "ScaledObject")[0]["spec"]


# each: what breaks, in place on copies of (base, keda), and a piece of the problem it must raise
BREAKS = {
    "an unknown VQDIFF_* name": (lambda b, k: _env(b, "vqdiff-worker", "VQDIFF_MAX_ROW", "64"), "no such setting"),
    "a bad value": (lambda b, k: _env(b, "vqdiff-worker", "VQDIFF_DTYPE", "fp8"), "VQDIFF_DTYPE: 'fp8'"),
    "service links on": (lambda b, k: pod_spec(find(b, "Deployment", "vqdiff-api")[0]).pop("enableServiceLinks"),
                         "no such setting"),
    "a flag serve refuses": (lambda b, k: _ctr(b, "vqdiff-api")["args"].append("--max-row=2"), "refuses them"),
    "the single role": (lambda b, k: _ctr(b, "vqdiff-api").update(args=["serve", "--role", "single"]),
                        "not api or worker"),
    "no Redis URL": (lambda b, k: find(b, "ConfigMap", "vqdiff")[0]["data"].pop("redis-url"), "not in the manifests"),
    "a role under the other label": (lambda b, k: _ctr(b, "vqdiff-worker").update(args=["serve", "--role", "api"]),
                                     "under the component label"),
    "worker grace period short": (lambda b, k: pod_spec(find(b, "Deployment", "vqdiff-worker")[0]).update(
        terminationGracePeriodSeconds=40), "does not cover the drain"),
    "worker drain longer": (lambda b, k: _env(b, "vqdiff-worker", "VQDIFF_GRACE_S", "60"), "does not cover the drain"),
    "api grace period short": (lambda b, k: pod_spec(find(b, "Deployment", "vqdiff-api")[0]).update(
        terminationGracePeriodSeconds=40), "does not cover the drain"),
    "api drain longer": (lambda b, k: _env(b, "vqdiff-api", "VQDIFF_GRACE_S", "45"), "does not cover the drain"),
    "no preStop sleep": (lambda b, k: _ctr(b, "vqdiff-api").pop("lifecycle"), "no preStop sleep"),
    "one API node": (lambda b, k: find(b, "Deployment", "vqdiff-api")[0]["spec"].update(replicas=1), "fewer than 2"),
    "worker port moved": (lambda b, k: _env(b, "vqdiff-worker", "VQDIFF_WORKER_PORT", "9001"), "not a containerPort"),
    "probe on the wrong port": (lambda b, k: _ctr(b, "vqdiff-worker")["livenessProbe"]["httpGet"].update(port=8000),
                                "livenessProbe port 8000"),
    "readiness on /healthz": (lambda b, k: _ctr(b, "vqdiff-api")["readinessProbe"]["httpGet"].update(path="/healthz"),
                              "not /readyz"),
    "api port moved": (lambda b, k: _env(b, "vqdiff-api", "VQDIFF_HTTP_PORT", "8080"), "8080"),
    "scrape port wrong": (lambda b, k: find(b, "Deployment", "vqdiff-worker")[0]["spec"]["template"]["metadata"][
        "annotations"].update({"prometheus.io/port": "8000"}), "prometheus.io/port"),
    "no GPU": (lambda b, k: [r.pop("nvidia.com/gpu") for r in _ctr(b, "vqdiff-worker")["resources"].values()],
               "nvidia.com/gpu"),
    "a fixed worker name": (lambda b, k: _env(b, "vqdiff-worker", "VQDIFF_WORKER_NAME", "worker"), "pod's name"),
    "model writable": (lambda b, k: _ctr(b, "vqdiff-worker")["volumeMounts"][0].update(readOnly=False), "read-only"),
    "model outside the volume": (lambda b, k: _env(b, "vqdiff-worker", "VQDIFF_MODEL", "/data/vq-diffusion-ithq"),
                                 "no volume is mounted"),
    "api default is no worker's model": (lambda b, k: _env(b, "vqdiff-api", "VQDIFF_MODEL", "ithq"),
                                         "none the workers serve"),
    "worker serves another model": (lambda b, k: _env(b, "vqdiff-worker", "VQDIFF_MODEL", "/models/other"),
                                    "not the workers' 'vqdiff:jobs:other'"),
    "Redis without fsync every second": (lambda b, k: _replace(
        pod_spec(find(b, "StatefulSet", "vqdiff-redis")[0])["containers"][0]["args"], "everysec", "no"),
        "--appendfsync"),
    "a hard-coded namespace": (lambda b, k: find(b, "Service", "vqdiff-api")[0]["metadata"].update(namespace="prod"),
                               "names a namespace"),
    "no budget for the workers": (lambda b, k: b.remove(find(b, "PodDisruptionBudget", "vqdiff-worker")[0]),
                                  "0 PodDisruptionBudgets"),
    "Service selects every pod": (lambda b, k: find(b, "Service", "vqdiff-api")[0]["spec"]["selector"].pop(
        "app.kubernetes.io/component"), "selects 3 workloads"),
    "scaling another Deployment": (lambda b, k: _so(k)["scaleTargetRef"].update(name="vqdiff-workers"),
                                   "no worker Deployment"),
    "scaling to zero": (lambda b, k: _so(k).update(minReplicaCount=0), "minReplicaCount 0"),
    "worker replicas fixed": (lambda b, k: find(b, "Deployment", "vqdiff-worker")[0]["spec"].update(replicas=2),
                              "sets replicas"),
    "another stream": (lambda b, k: _trigger(k, stream="vqdiff:jobs:ithq"), "stream 'vqdiff:jobs:ithq'"),
    "another group": (lambda b, k: _trigger(k, consumerGroup="consumers"), "consumerGroup 'consumers'"),
    "a short Redis name for KEDA": (lambda b, k: _trigger(k, address="vqdiff-redis:6379"),
                                    "address 'vqdiff-redis:6379'"),
    "another database": (lambda b, k: _trigger(k, databaseIndex="1"), "databaseIndex 1"),
    "stream length, not the group's work": (lambda b, k: [t["metadata"].pop(n, None) for t in _so(k)["triggers"]
                                                          for n in ("lagCount", "pendingEntriesCount")],
                                            "neither lagCount nor pendingEntriesCount"),
    "fast scale-down": (lambda b, k: _so(k)["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]["scaleDown"][
        "policies"][0].update(periodSeconds=15), "faster than one per drain"),
}


@pytest.mark.parametrize("name", BREAKS)
def test_a_broken_manifest_is_caught(name):
    base, keda = copy.deepcopy(BASE), copy.deepcopy(KEDA)
    breaks, expected = BREAKS[name]
    breaks(base, keda)
    found = problems(base, keda)
    assert any(expected in p for p in found), found


SCHEMA_BREAKS = {
    "an unknown container field": (BASE, lambda r: _ctr(r, "vqdiff-api").update(stratupProbe={}), "stratupProbe"),
    "a port as text": (BASE, lambda r: _ctr(r, "vqdiff-worker")["ports"][0].update(containerPort="8001"),
                       "containerPort"),
    "a PDB field misspelt": (BASE, lambda r: find(r, "PodDisruptionBudget")[0]["spec"].update(maxUnavaliable=1),
                             "maxUnavaliable"),
    "a ScaledObject field misspelt": (KEDA, lambda r: _so(r).update(minReplicas=1), "minReplicas"),
    "a trigger number unquoted": (KEDA, lambda r: _trigger(r, lagCount=16), "lagCount"),
    "an undocumented redis-streams parameter": (KEDA, lambda r: _trigger(r, lag="16"), "lag"),
    "a target without a name": (KEDA, lambda r: _so(r)["scaleTargetRef"].pop("name"), "name"),
    "an HPA behavior field misspelt": (KEDA, lambda r: _so(r)["advanced"]["horizontalPodAutoscalerConfig"]["behavior"][
        "scaleDown"].update(stabilisationWindowSeconds=300), "stabilisationWindowSeconds"),
}


@pytest.mark.parametrize("name", SCHEMA_BREAKS)
def test_a_schema_violation_is_caught(name):
    resources, breaks, expected = SCHEMA_BREAKS[name]
    resources = copy.deepcopy(resources)
    breaks(resources)
    found = schema_errors(resources)
    assert any(expected in p for p in found), found
