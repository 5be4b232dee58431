"""The Helm chart, rendered and linted without a helm binary or a cluster.

helm-python-sdk renders (what `helm template` gives) and lints strictly (warnings are
errors, values checked against values.schema.json); every rendered manifest is then
validated with kubernetes-validate in strict mode (unknown fields fail). The two custom
resources have no bundled schema there: they are validated against
tests/schemas/prometheus-operator-v1.json, a hand-written subset of the upstream CRD
schemas (the fields this chart can emit, additionalProperties false everywhere).

`python -m tests.test_helm --write-schema` regenerates the `config` section of
values.schema.json after a field was added to shardworker.config.Settings.
"""

from __future__ import annotations

import base64
import copy
import dataclasses
import json
import subprocess
import sys
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import helm_python as helm
import jsonschema
import kubernetes_validate
import pytest
import yaml

from shardworker.config import Settings, env_name, load_settings
from tests.harness.net import free_port

REPO = Path(__file__).resolve().parents[1]
CHART = REPO / "helm" / "shardworker"
SCHEMA_FILE = CHART / "values.schema.json"
DASHBOARDS = REPO / "grafana" / "dashboards"
RULES_FILE = REPO / "grafana" / "alerts" / "shardworker.rules.yaml"
CRD_SCHEMAS = Path(__file__).parent / "schemas" / "prometheus-operator-v1.json"
LINT_KUBE_VERSION = "v1.30.0"
VALIDATE_KUBE_VERSIONS = ("1.30.0", "1.34.0")  # the oldest we lint for, and a current one
RELEASE, NAMESPACE = "sw", "mail"

# Settings the chart sets itself (from its own values), or that are secrets.
CHART_MANAGED = {"workers", "pod_name", "metrics_addr", "admin_addr", "metrics_dir"}

VALUES: dict[str, dict[str, Any]] = {
    "defaults": {},
    "existing-secret": {
        "existingSecret": "shardworker-credentials",
        "existingSecretKeys": {"databaseUrl": "dsn", "redisUrl": "redis", "adminToken": "admin"},
        "admin": {"enabled": True},
    },
    "hpa": {
        "autoscaling": {"enabled": True, "providersPerPod": {"enabled": True}},
    },
    "monitoring-off": {
        "metrics": {
            "podMonitor": {"enabled": False},
            "prometheusRule": {"enabled": False},
            "dashboards": {"enabled": False},
        },
    },
    "console": {
        "secrets": {"adminToken": "t0ken"},
        "admin": {
            "enabled": True,
            "ingress": {
                "enabled": True,
                "className": "nginx",
                "host": "sw-admin.example.com",
                "tlsSecretName": "sw-admin-tls",
                "annotations": {"example.com/allow": "10.0.0.0/8"},
            },
        },
    },
    "5x4": {
        "replicaCount": 5,
        "workersPerPod": 4,
        "resources": {"requests": {"cpu": "4", "memory": "2Gi"}, "limits": {"memory": "4Gi"}},
    },
    # Everything optional at once, so no template goes unvalidated.
    "extras": {
        "secrets": {
            "databaseUrl": "postgresql://u:p@pg/alga",
            "redisUrl": "redis://:p@r:6379/0",
            "adminToken": "t0ken",
        },
        "admin": {"enabled": True},
        "networkPolicy": {
            "enabled": True,
            "metricsFrom": [{"namespaceSelector": {"matchLabels": {"name": "monitoring"}}}],
            "egress": {"enabled": True, "rules": [{"ports": [{"port": 993}, {"port": 5432}]}]},
        },
        "metrics": {
            "podMonitor": {
                "labels": {"release": "kube-prometheus-stack"},
                "relabelings": [
                    {"action": "replace", "targetLabel": "team", "replacement": "mail"}
                ],
            },
            "prometheusRule": {"labels": {"release": "kube-prometheus-stack"}},
            "dashboards": {"annotations": {"grafana_folder": "Email"}},
        },
        "config": {
            "stream_maxlen": 2_000_000,
            "lease_ttl_s": 12.5,
            "publish_event_bus": True,
            "secret_read_chain": ["env", "db"],
        },
        "extraEnv": [{"name": "TENANT_X_imap_password_y", "value": "z"}],
        "podDisruptionBudget": {"minAvailable": 1},
        "metricsDir": {"medium": "Memory"},
        "image": {"digest": "sha256:" + "a" * 64},
        "nodeSelector": {"kubernetes.io/os": "linux"},
        "tolerations": [{"key": "mail", "operator": "Exists", "effect": "NoSchedule"}],
        "affinity": {
            "nodeAffinity": {
                "preferredDuringSchedulingIgnoredDuringExecution": [
                    {
                        "weight": 1,
                        "preference": {
                            "matchExpressions": [
                                {"key": "tier", "operator": "In", "values": ["mail"]}
                            ]
                        },
                    }
                ]
            }
        },
    },
}


# ---------------------------------------------------------------- helpers


def _field_schema(f: dataclasses.Field[Any]) -> dict[str, Any]:
    doc = f.metadata["doc"]
    kinds: dict[str, dict[str, Any]] = {
        "int": {"type": "integer", "minimum": 0},
        "float": {"type": "number", "minimum": 0},
        "bool": {"type": "boolean"},
        "tuple[str, ...]": {
            "oneOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}}]
        },
    }
    return {**kinds.get(str(f.type), {"type": "string"}), "description": doc}


def expected_config_schema() -> dict[str, Any]:
    """The `config` section of values.schema.json, derived from Settings."""
    props = {
        f.name: _field_schema(f)
        for f in dataclasses.fields(Settings)
        if f.name not in CHART_MANAGED and not f.metadata["secret"]
    }
    return {
        "type": "object",
        "additionalProperties": False,
        "description": "SHARDWORKER_* settings by field name; see the README settings table.",
        "properties": props,
    }


def write_config_schema() -> None:
    schema = json.loads(SCHEMA_FILE.read_text())
    schema["properties"]["config"] = expected_config_schema()
    SCHEMA_FILE.write_text(json.dumps(schema, indent=2) + "\n")


def merged(case: str, **extra: Any) -> dict[str, Any]:
    values = copy.deepcopy(VALUES[case])
    values.update(extra)
    return values


def parse(rendered: dict[str, str]) -> list[dict[str, Any]]:
    docs: list[dict[str, Any]] = []
    for path, text in sorted(rendered.items()):
        if path.endswith(".yaml"):
            docs.extend(d for d in yaml.safe_load_all(text) if d)
    return docs


def of_kind(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] == kind]


def one(docs: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    found = of_kind(docs, kind)
    assert len(found) == 1, f"expected one {kind}, got {len(found)}"
    return found[0]


def settings_data(docs: list[dict[str, Any]]) -> dict[str, str]:
    """The SHARDWORKER_* ConfigMap (not a dashboard)."""
    found = [d for d in of_kind(docs, "ConfigMap") if d["metadata"]["name"] == "sw-shardworker"]
    assert len(found) == 1
    data: dict[str, str] = found[0]["data"]
    return data


def pod_specs(docs: list[dict[str, Any]]) -> Iterator[tuple[str, dict[str, Any]]]:
    for d in docs:
        if d["kind"] in ("StatefulSet", "Job"):
            yield d["metadata"]["name"], d["spec"]["template"]["spec"]
        elif d["kind"] == "Pod":
            yield d["metadata"]["name"], d["spec"]


def env_of(container: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {e["name"]: e for e in container.get("env", [])}


@pytest.fixture(scope="module")
def chart() -> Iterator[helm.Chart]:
    with helm.Chart.load(CHART) as loaded:
        yield loaded


@pytest.fixture(scope="module")
def render(chart: helm.Chart) -> Any:
    cache: dict[str, list[dict[str, Any]]] = {}

    def _render(values: dict[str, Any]) -> list[dict[str, Any]]:
        key = json.dumps(values, sort_keys=True)
        if key not in cache:
            cache[key] = parse(chart.render(values=values, name=RELEASE, namespace=NAMESPACE))
        return copy.deepcopy(cache[key])

    return _render


# ---------------------------------------------------------------- lint and validation


@pytest.mark.parametrize("case", list(VALUES))
def test_chart_lints_strictly(case: str) -> None:
    report = helm.lint(CHART, VALUES[case], strict=True, kube_version=LINT_KUBE_VERSION)
    problems = [m for m in report["messages"] if m["severity"] >= 2]
    assert report["errors"] == [] and problems == [], report


@pytest.mark.parametrize("case", list(VALUES))
def test_every_manifest_validates(case: str, render: Any) -> None:
    crds = json.loads(CRD_SCHEMAS.read_text())
    docs = render(VALUES[case])
    assert len(docs) >= 8
    for doc in docs:
        where = f"{doc['kind']}/{doc['metadata']['name']}"
        if doc["apiVersion"] == "monitoring.coreos.com/v1":
            # No schema for custom resources in kubernetes-validate: the CRD subset instead.
            errors = list(jsonschema.Draft7Validator(crds[doc["kind"]]).iter_errors(doc))
            assert not errors, f"{where}: {[e.message for e in errors]}"
            continue
        for version in VALIDATE_KUBE_VERSIONS:
            try:
                kubernetes_validate.validate(doc, version, strict=True)
            except kubernetes_validate.ValidationError as exc:
                pytest.fail(f"{where} (Kubernetes {version}): {exc.message} at {list(exc.path)}")


def test_expected_resources_per_values_file(render: Any) -> None:
    kinds = {case: sorted({d["kind"] for d in render(v)}) for case, v in VALUES.items()}
    base = [
        "ConfigMap",
        "Job",
        "Pod",
        "PodDisruptionBudget",
        "PodMonitor",
        "PrometheusRule",
        "Secret",
        "Service",
        "ServiceAccount",
        "StatefulSet",
    ]
    assert kinds["defaults"] == base
    assert "Secret" not in kinds["existing-secret"]
    assert "HorizontalPodAutoscaler" in kinds["hpa"]
    assert not {"PodMonitor", "PrometheusRule"} & set(kinds["monitoring-off"])
    assert of_kind(render(VALUES["monitoring-off"]), "ConfigMap") == of_kind(
        [d for d in render({}) if "dashboard" not in d["metadata"]["name"]], "ConfigMap"
    )
    assert "NetworkPolicy" in kinds["extras"]
    assert "Ingress" in kinds["console"] and "Ingress" not in kinds["extras"]


def test_console_service_and_optional_ingress(render: Any) -> None:
    assert not [d for d in render({}) if d["metadata"]["name"].endswith("-admin")]
    docs = render(VALUES["console"])
    [service] = [d for d in of_kind(docs, "Service") if d["metadata"]["name"].endswith("-admin")]
    assert service["spec"]["type"] == "ClusterIP"
    assert service["spec"]["ports"] == [{"name": "admin", "port": 9465, "targetPort": "admin",
                                         "protocol": "TCP"}]  # fmt: skip
    [pod_spec] = [d["spec"]["template"] for d in of_kind(docs, "StatefulSet")]
    labels = pod_spec["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= labels.items()
    [ingress] = of_kind(docs, "Ingress")
    rule = ingress["spec"]["rules"][0]
    assert rule["host"] == "sw-admin.example.com"
    backend = rule["http"]["paths"][0]["backend"]["service"]
    assert backend == {"name": service["metadata"]["name"], "port": {"name": "admin"}}
    assert ingress["spec"]["tls"] == [{"hosts": ["sw-admin.example.com"],
                                       "secretName": "sw-admin-tls"}]  # fmt: skip
    only_service = render({**VALUES["console"], "admin": {"enabled": True}})
    assert not of_kind(only_service, "Ingress")


def test_unknown_values_are_rejected(chart: helm.Chart) -> None:
    for bad in (
        {"replicas": 3},
        {"config": {"lease_ttl": 5}},
        {"config": {"workers": 4}},
        {"config": {"database_url": "postgresql://x"}},
        {"workersPerPod": 0},
    ):
        with pytest.raises(helm.HelmValuesError):
            chart.validate_schema(bad)
        report = helm.lint(CHART, bad, strict=True, kube_version=LINT_KUBE_VERSION)
        assert report["errors"] or any(m["severity"] >= 2 for m in report["messages"]), bad


def test_config_schema_matches_settings() -> None:
    schema = json.loads(SCHEMA_FILE.read_text())
    assert schema["additionalProperties"] is False

    def shape(section: dict[str, Any]) -> dict[str, Any]:
        # Names and types must match; descriptions may lag behind a reworded doc string.
        props = section["properties"]
        return {
            name: {k: v for k, v in p.items() if k != "description"} for name, p in props.items()
        }

    current, expected = schema["properties"]["config"], expected_config_schema()
    assert current["additionalProperties"] is False
    assert shape(current) == shape(expected), (
        "values.schema.json is out of date with Settings: "
        "run `.venv/bin/python -m tests.test_helm --write-schema`"
    )


# ---------------------------------------------------------------- single-source monitoring


def test_dashboard_configmaps_are_exactly_the_grafana_files(render: Any) -> None:
    docs = render({})
    data: dict[str, str] = {}
    for cm in of_kind(docs, "ConfigMap"):
        if cm["metadata"].get("labels", {}).get("grafana_dashboard") == "1":
            data.update(cm["data"])
    files = {p.name: p.read_bytes() for p in DASHBOARDS.glob("*.json")}
    assert files, "grafana/dashboards/ has no dashboard"
    assert sorted(data) == sorted(files)
    for name, content in data.items():
        assert content.encode() == files[name], name


def test_prometheus_rule_is_the_rules_file(render: Any) -> None:
    rule = one(render({}), "PrometheusRule")
    expected = yaml.safe_load(RULES_FILE.read_text())["groups"]
    assert rule["spec"]["groups"] == expected


def test_packaged_chart_embeds_grafana_files(tmp_path: Path, render: Any) -> None:
    """helm package follows the files/grafana symlink: the archive is self-contained."""
    archive = Path(helm.package(CHART, destination=tmp_path))
    with tarfile.open(archive) as tar:
        members = {m.name: m for m in tar.getmembers()}
        rules = members["shardworker/files/grafana/alerts/shardworker.rules.yaml"]
        assert rules.isfile()
        extracted = tar.extractfile(rules)
        assert extracted is not None and extracted.read() == RULES_FILE.read_bytes()
    with helm.Chart.load_archive(archive.read_bytes()) as packaged:
        docs = parse(packaged.render(values={}, name=RELEASE, namespace=NAMESPACE))
    assert docs == render({})


# ---------------------------------------------------------------- workload


def test_pods_meet_the_restricted_profile(render: Any) -> None:
    for values in VALUES.values():
        for name, spec in pod_specs(render(values)):
            pod = spec["securityContext"]
            assert pod["runAsNonRoot"] is True and pod["runAsUser"] == 10001, name
            assert pod["seccompProfile"] == {"type": "RuntimeDefault"}, name
            assert spec["automountServiceAccountToken"] is False, name
            for c in spec["containers"]:
                sc = c["securityContext"]
                assert sc["allowPrivilegeEscalation"] is False, name
                assert sc["readOnlyRootFilesystem"] is True, name
                assert sc["capabilities"] == {"drop": ["ALL"]}, name
                mounts = {m["mountPath"] for m in c["volumeMounts"]}
                assert "/tmp" in mounts, name


def test_statefulset_identity_and_workers(render: Any) -> None:
    docs = render(VALUES["5x4"])
    sts = one(docs, "StatefulSet")
    spec = sts["spec"]
    assert spec["replicas"] == 5 and spec["podManagementPolicy"] == "Parallel"
    headless = one(docs, "Service")
    assert headless["spec"]["clusterIP"] == "None"
    assert spec["serviceName"] == headless["metadata"]["name"]
    assert headless["spec"]["selector"].items() <= spec["template"]["metadata"]["labels"].items()
    container = spec["template"]["spec"]["containers"][0]
    assert container["args"] == ["shardworker", "run"]
    pod_name = env_of(container)["POD_NAME"]
    assert pod_name["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    config = settings_data(docs)
    assert config["SHARDWORKER_WORKERS"] == "4"
    metrics_mount = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}["metrics"]
    assert config["SHARDWORKER_METRICS_DIR"] == metrics_mount
    volumes = {v["name"]: v for v in spec["template"]["spec"]["volumes"]}
    assert "emptyDir" in volumes["metrics"]
    spread = spec["template"]["spec"]["topologySpreadConstraints"][0]
    assert spread["labelSelector"]["matchLabels"] == spec["selector"]["matchLabels"]


def test_probes_use_the_health_endpoints(render: Any) -> None:
    sts = one(render({}), "StatefulSet")
    container = sts["spec"]["template"]["spec"]["containers"][0]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports["metrics"] == 9464
    paths = {
        probe: container[probe]["httpGet"]["path"]
        for probe in ("startupProbe", "livenessProbe", "readinessProbe")
    }
    assert paths == {
        "startupProbe": "/healthz",
        "livenessProbe": "/healthz",
        "readinessProbe": "/readyz",
    }
    for probe in paths:
        assert container[probe]["httpGet"]["port"] == "metrics"
        assert "enabled" not in container[probe]


def test_grace_period_exceeds_drain_deadline(chart: helm.Chart, render: Any) -> None:
    sts = one(render({}), "StatefulSet")
    drain = float(settings_data(render({}))["SHARDWORKER_DRAIN_DEADLINE_S"])
    grace = sts["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert grace == 30 and grace > drain == Settings().drain_deadline_s
    for bad in (
        {"terminationGracePeriodSeconds": 20},
        {"config": {"drain_deadline_s": 45}},
        {"config": {"drain_deadline_s": None}, "terminationGracePeriodSeconds": 15},
    ):
        with pytest.raises(helm.HelmRenderError, match="drain_deadline_s"):
            chart.render(values=bad, name=RELEASE, namespace=NAMESPACE)
    ok = render({"terminationGracePeriodSeconds": 60, "config": {"drain_deadline_s": 45}})
    assert one(ok, "StatefulSet")["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] == 60


def test_an_ingress_without_a_host_fails_to_render(chart: helm.Chart) -> None:
    values = {"secrets": {"adminToken": "t"}, "admin": {"enabled": True,
              "ingress": {"enabled": True}}}  # fmt: skip
    with pytest.raises(Exception, match=r"admin\.ingress\.host"):
        chart.render(values=values, name=RELEASE, namespace=NAMESPACE)


def test_invalid_combinations_fail_to_render(chart: helm.Chart) -> None:
    for bad, reason in (
        ({"admin": {"enabled": True}}, "adminToken"),
        ({"admin": {"enabled": True, "port": 9464}, "secrets": {"adminToken": "x"}}, "differ"),
        ({"autoscaling": {"enabled": True, "minReplicas": 5, "maxReplicas": 3}}, "minReplicas"),
        ({"autoscaling": {"enabled": True, "targetCPUUtilizationPercentage": None}}, "metric"),
    ):
        with pytest.raises(helm.HelmRenderError, match=reason):
            chart.render(values=bad, name=RELEASE, namespace=NAMESPACE)


def test_config_values_become_settings_the_service_accepts(render: Any) -> None:
    docs = render(VALUES["extras"])
    data = settings_data(docs)
    assert data["SHARDWORKER_STREAM_MAXLEN"] == "2000000"  # not 2e+06
    assert data["SHARDWORKER_LEASE_TTL_S"] == "12.5"
    assert data["SHARDWORKER_SECRET_READ_CHAIN"] == "env,db"
    secret = next(s for s in of_kind(docs, "Secret") if s["metadata"]["name"] == "sw-shardworker")
    stored = {k: base64.b64decode(v).decode() for k, v in secret["data"].items()}
    assert set(stored) == {"database-url", "redis-url", "secret-keys", "admin-token"}
    environ = dict(data, POD_NAME="sw-shardworker-0")
    for key, field in (
        ("database-url", "database_url"),
        ("redis-url", "redis_url"),
        ("admin-token", "admin_token"),
    ):
        environ[env_name(field)] = stored[key]
    settings = load_settings(environ)
    assert settings.database_url == "postgresql://u:p@pg/alga" and settings.admin_token == "t0ken"
    assert settings.stream_maxlen == 2_000_000 and settings.publish_event_bus is True
    assert settings.secret_read_chain == ("env", "db")
    assert settings.admin_addr == "0.0.0.0:9465" and settings.workers == 2
    sts_env = env_of(one(docs, "StatefulSet")["spec"]["template"]["spec"]["containers"][0])
    secret_env = {n for n, e in sts_env.items() if "secretKeyRef" in e.get("valueFrom", {})}
    assert secret_env == {
        env_name(n) for n in ("database_url", "redis_url", "secret_keys", "admin_token")
    }


def test_secret_rendered_only_without_existing_secret(render: Any) -> None:
    defaults = render({})
    names = {s["metadata"]["name"] for s in of_kind(defaults, "Secret")}
    assert names == {"sw-shardworker", "sw-shardworker-migration"}
    hook_secret = next(
        s for s in of_kind(defaults, "Secret") if s["metadata"]["name"].endswith("-migration")
    )
    assert hook_secret["metadata"]["annotations"]["helm.sh/hook-weight"] == "-10"
    docs = render(VALUES["existing-secret"])
    assert of_kind(docs, "Secret") == []
    sts = one(docs, "StatefulSet")
    assert "checksum/secret" not in sts["spec"]["template"]["metadata"]["annotations"]
    refs = {}
    for _, spec in pod_specs(docs):
        for name, e in env_of(spec["containers"][0]).items():
            ref = e.get("valueFrom", {}).get("secretKeyRef")
            if ref:
                assert ref["name"] == "shardworker-credentials"
                refs[name] = ref["key"]
    assert refs == {
        "SHARDWORKER_DATABASE_URL": "dsn",
        "SHARDWORKER_REDIS_URL": "redis",
        "SHARDWORKER_SECRET_KEYS": "secret-keys",
        "SHARDWORKER_ADMIN_TOKEN": "admin",
    }


def test_checksum_annotations_follow_config_and_secret(render: Any) -> None:
    def checksums(values: dict[str, Any]) -> dict[str, str]:
        sts = one(render(values), "StatefulSet")
        annotations: dict[str, str] = sts["spec"]["template"]["metadata"]["annotations"]
        return annotations

    base = checksums({})
    assert checksums({}) == base
    changed = checksums({"config": {"log_level": "DEBUG"}})
    assert changed["checksum/config"] != base["checksum/config"]
    assert changed["checksum/secret"] == base["checksum/secret"]
    assert checksums({"workersPerPod": 3})["checksum/config"] != base["checksum/config"]
    rotated = checksums({"secrets": {"redisUrl": "redis://other:6379/0"}})
    assert rotated["checksum/secret"] != base["checksum/secret"]


# ---------------------------------------------------------------- availability, hooks, monitoring


def test_hpa_scales_the_statefulset_on_cpu_and_providers(render: Any) -> None:
    docs = render(VALUES["hpa"])
    hpa = one(docs, "HorizontalPodAutoscaler")
    sts = one(docs, "StatefulSet")
    assert "replicas" not in sts["spec"]
    assert hpa["spec"]["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "StatefulSet",
        "name": sts["metadata"]["name"],
    }
    metrics = {m["type"]: m for m in hpa["spec"]["metrics"]}
    assert metrics["Resource"]["resource"]["name"] == "cpu"
    assert metrics["Pods"]["pods"]["metric"]["name"] == "shardworker_providers_owned"
    pdb = one(docs, "PodDisruptionBudget")
    assert pdb["spec"]["selector"]["matchLabels"] == sts["spec"]["selector"]["matchLabels"]


def test_migration_job_is_a_pre_install_hook(render: Any) -> None:
    job = one(render({}), "Job")
    annotations = job["metadata"]["annotations"]
    assert annotations["helm.sh/hook"] == "pre-install,pre-upgrade"
    assert "before-hook-creation" in annotations["helm.sh/hook-delete-policy"]
    container = job["spec"]["template"]["spec"]["containers"][0]
    assert container["args"] == ["shardworker", "migrate"]
    ref = env_of(container)["SHARDWORKER_DATABASE_URL"]["valueFrom"]["secretKeyRef"]
    assert ref["name"] == "sw-shardworker-migration"  # exists before the hook runs
    # A ServiceAccount the chart creates does not exist yet when pre-install hooks run.
    assert job["spec"]["template"]["spec"]["serviceAccountName"] == "default"
    assert of_kind(render({"migration": {"enabled": False}}), "Job") == []


def test_helm_test_pod_checks_both_stores_with_the_release_secret(render: Any) -> None:
    docs = render({})
    pod = one(docs, "Pod")
    assert pod["metadata"]["annotations"]["helm.sh/hook"] == "test"
    container = pod["spec"]["containers"][0]
    script = container["command"][-1]
    assert container["command"][:2] == ["python", "-c"]
    assert "psycopg.connect" in script and ".ping()" in script
    compile(script, "helm-test", "exec")  # the one-liner is valid Python
    sts_container = one(docs, "StatefulSet")["spec"]["template"]["spec"]["containers"][0]
    assert (
        env_of(container)["SHARDWORKER_DATABASE_URL"]
        == env_of(sts_container)["SHARDWORKER_DATABASE_URL"]
    )
    assert container["image"] == sts_container["image"]


def test_helm_test_script_passes_against_real_stores_and_fails_without(
    render: Any, pg_dsn: str, redis_url: str
) -> None:
    """The rendered one-liner, run with the project's interpreter (same psycopg and redis)."""
    command = one(render({}), "Pod")["spec"]["containers"][0]["command"]

    def run(database_url: str, redis: str) -> subprocess.CompletedProcess[str]:
        env = {"SHARDWORKER_DATABASE_URL": database_url, "SHARDWORKER_REDIS_URL": redis}
        return subprocess.run(
            [sys.executable, *command[1:]],
            check=False,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )

    good = run(pg_dsn, redis_url)
    assert good.returncode == 0, good.stderr
    assert good.stdout.split() == ["postgresql:", "ok", "redis:", "ok"]
    bad = run(pg_dsn, f"redis://127.0.0.1:{free_port()}/0")
    assert bad.returncode != 0 and "redis: ok" not in bad.stdout


def test_pod_monitor_labels_and_selector(render: Any) -> None:
    docs = render(VALUES["extras"])
    monitor = one(docs, "PodMonitor")
    assert monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    assert one(docs, "PrometheusRule")["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    pod_labels = one(docs, "StatefulSet")["spec"]["template"]["metadata"]["labels"]
    assert monitor["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    assert monitor["spec"]["podMetricsEndpoints"][0]["port"] == "metrics"
    job_labels = one(docs, "Job")["spec"]["template"]["metadata"]["labels"]
    assert not monitor["spec"]["selector"]["matchLabels"].items() <= job_labels.items()


if __name__ == "__main__":  # pragma: no cover - maintenance helper
    if sys.argv[1:] == ["--write-schema"]:
        write_config_schema()
        print(f"wrote {SCHEMA_FILE.relative_to(REPO)}")
    else:
        sys.exit("usage: python -m tests.test_helm --write-schema")
