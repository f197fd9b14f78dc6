"""deploy/kubernetes/ checked offline: every built-in object against Kubernetes' own schemas (kubernetes-validate
bundles them; strict: unknown fields fail), every KEDA ScaledObject against KEDA's CRD schema vendored in
deploy/kubernetes/crds/ (made strict the same way), and the wiring between them: each command line parses with
the real `chiron` CLI, each role's ScaledObject targets that role's Deployment and asks the scaler's Service for
that role, and the ScaledObjects' min/max match the scaler's role limits."""

from __future__ import annotations

import copy
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml

from services import cli
from services.global_scaler.providers import ROLES

DEPLOY = Path(__file__).resolve().parent.parent / "deploy" / "kubernetes"
MANIFESTS = ("engines.yaml", "control-plane.yaml", "scaledobjects.yaml")
K8S_VERSIONS = ("1.30.0", kubernetes_validate.latest_version())  # gRPC probes are GA from 1.27


def load_all() -> list[dict]:
    docs = []
    for name in MANIFESTS:
        docs += [d for d in yaml.safe_load_all((DEPLOY / name).read_text()) if d]
    return docs


DOCS = load_all()


def by_kind(kind: str) -> dict[str, dict]:
    return {d["metadata"]["name"]: d for d in DOCS if d["kind"] == kind}


def strict(schema: dict) -> dict:
    """A copy of a CRD's structural schema that rejects unknown fields (the API server would silently prune them)
    wherever the schema lists its properties and does not preserve unknown fields."""
    schema = copy.deepcopy(schema)

    def walk(s: dict) -> None:
        if "properties" in s and not s.get("x-kubernetes-preserve-unknown-fields") and "additionalProperties" not in s:
            s["additionalProperties"] = False
        for sub in s.get("properties", {}).values():
            walk(sub)
        for key in ("items", "additionalProperties"):
            if isinstance(s.get(key), dict):
                walk(s[key])
        for key in ("anyOf", "allOf", "oneOf"):
            for sub in s.get(key, []):
                walk(sub)
    walk(schema)
    return schema


def scaledobject_schema() -> dict:
    crd = yaml.safe_load((DEPLOY / "crds" / "keda.sh_scaledobjects.yaml").read_text())
    assert crd["spec"]["group"] == "keda.sh" and crd["spec"]["names"]["kind"] == "ScaledObject"
    version = next(v for v in crd["spec"]["versions"] if v["name"] == "v1alpha1")
    return strict(version["schema"]["openAPIV3Schema"])


def container(obj: dict) -> dict:
    (c,) = obj["spec"]["template"]["spec"]["containers"]
    return c


def parse(c: dict):
    """The container's `chiron ...` command line, parsed by the real CLI (unknown flags or bad values fail)."""
    assert c["command"] == ["chiron"]
    sub, *args = c["args"]
    return cli.main.commands[sub].make_context(sub, list(args)).params


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_builtin_objects_are_valid_kubernetes(version):
    builtin = [d for d in DOCS if d["apiVersion"] != "keda.sh/v1alpha1"]
    assert {d["kind"] for d in builtin} == {"Deployment", "StatefulSet", "Service"}
    for d in builtin:
        try:
            kubernetes_validate.validate(d, version, strict=True)
        except kubernetes_validate.ValidationError as e:
            pytest.fail(f"{d['kind']}/{d['metadata']['name']} (Kubernetes {version}): {e.message} at {list(e.path)}")


def test_scaledobjects_are_valid_for_kedas_crd():
    schema = scaledobject_schema()
    objs = by_kind("ScaledObject")
    assert len(objs) == len(ROLES)
    for name, so in objs.items():
        errors = sorted(jsonschema.Draft202012Validator(schema).iter_errors(so), key=lambda e: list(e.path))
        assert not errors, f"ScaledObject/{name}: " + "; ".join(f"{e.message} at {list(e.path)}" for e in errors)
    # The strict schema does catch a misspelt field.
    bad = copy.deepcopy(next(iter(objs.values())))
    bad["spec"]["pollingIntervall"] = 5
    assert not jsonschema.Draft202012Validator(schema).is_valid(bad)


def test_one_engine_deployment_and_scaledobject_per_role_wired_to_the_scaler():
    deployments, services, scaled = by_kind("Deployment"), by_kind("Service"), by_kind("ScaledObject")
    scaler = parse(container(deployments["chiron-scaler"]))
    assert scaler["provider"] == "keda" and scaler["host"] == "0.0.0.0"
    scaler_svc = services["chiron-scaler"]
    (port,) = scaler_svc["spec"]["ports"]
    assert port["port"] == scaler["port"]
    queue_port = services["chiron-queue"]["spec"]["ports"][0]["port"]
    limits = {"interactive": scaler["lim_i"], "mixed": scaler["lim_m"], "batch": scaler["lim_b"]}
    for role in ROLES:
        dep = deployments[f"chiron-engine-{role}"]
        c = container(dep)
        args = parse(c)
        assert args["role"] == role and args["etcd"] == scaler["etcd"]
        # BATCH and MIXED agents lease batch work from the queue; INTERACTIVE ones do not.
        assert args["queue_addr"] == (None if role == "interactive" else f"chiron-queue:{queue_port}")
        assert {p["containerPort"] for p in c["ports"]} == {args["port"]}
        assert "nvidia.com/gpu" in c["resources"]["limits"]

        (so,) = [s for s in scaled.values() if s["spec"]["scaleTargetRef"]["name"] == dep["metadata"]["name"]]
        assert so["spec"]["scaleTargetRef"].get("kind", "Deployment") == "Deployment"
        (trigger,) = so["spec"]["triggers"]
        assert trigger["type"] in ("external", "external-push") and trigger.get("metricType") == "AverageValue"
        assert trigger["metadata"] == {"scalerAddress": f"chiron-scaler:{port['port']}", "role": role}
        lo, hi = (int(x) for x in limits[role].split(":"))
        assert (so["spec"]["minReplicaCount"], so["spec"]["maxReplicaCount"]) == (lo, hi)
        # The HPA must not second-guess the policy's counts (it paces and delays them itself).
        behavior = so["spec"]["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]
        for direction in ("scaleUp", "scaleDown"):
            assert behavior[direction]["stabilizationWindowSeconds"] == 0 and behavior[direction]["tolerance"] == "0"
    # BATCH and MIXED may scale to zero; INTERACTIVE keeps its minimum.
    assert scaled["chiron-engine-batch"]["spec"]["minReplicaCount"] == 0


def test_services_select_their_pods_and_name_their_ports():
    workloads = {**by_kind("Deployment"), **by_kind("StatefulSet")}
    services = by_kind("Service")
    assert set(services) == {"chiron-router", "chiron-gateway", "chiron-queue", "chiron-scaler"}
    for name, svc in services.items():
        selected = [w for w in workloads.values()
                    if svc["spec"]["selector"].items() <= w["spec"]["template"]["metadata"]["labels"].items()]
        assert [w["metadata"]["name"] for w in selected] == [name]
        c = container(selected[0])
        ports = {p["name"]: p["containerPort"] for p in c["ports"]}
        for p in svc["spec"]["ports"]:
            assert p["targetPort"] in ports and ports[p["targetPort"]] == p["port"]
        args = parse(c)
        assert args["port"] == svc["spec"]["ports"][0]["port"] and args["host"] == "0.0.0.0"
    # Every workload's own selector matches its pods.
    for w in workloads.values():
        assert w["spec"]["selector"]["matchLabels"].items() <= w["spec"]["template"]["metadata"]["labels"].items()
    # Addresses the services use for each other point at these Services.
    router = parse(container(workloads["chiron-router"]))
    gateway = parse(container(workloads["chiron-gateway"]))
    assert router["queue_addr"] == "chiron-queue:50051" and gateway["router_addr"] == "chiron-router:50050"
