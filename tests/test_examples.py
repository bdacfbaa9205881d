"""Every reference config and example validates: ridley's own configs with `ridley
validate`, the collector, Tempo and Kubernetes files against the structure their
consumers require. They need no root."""
import os
import pathlib
import re
import subprocess

import pytest
import yaml

from conftest import RIDLEY, ROOT

EXAMPLES = ROOT / "examples" / "otel-collector"


@pytest.fixture(autouse=True)
def kernel():
    """Overrides the end-to-end suite's kernel check: validation touches no kernel."""
    assert RIDLEY.exists(), f"{RIDLEY} is not built"


def validate(path):
    # What the DaemonSet's downward API sets.
    env = {**os.environ, "POD_IP": "10.1.2.3"}
    proc = subprocess.run([str(RIDLEY), "validate", "--config", str(path)], capture_output=True,
                          text=True, env=env)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().endswith(")") and ": valid (" in proc.stdout
    return proc.stdout


@pytest.mark.parametrize("path", sorted((ROOT / "config").glob("*.yaml")), ids=lambda p: p.name)
def test_reference_configs_validate(path):
    validate(path)


def manifests():
    return {(d["kind"], d["metadata"]["name"]): d
            for d in yaml.safe_load_all((EXAMPLES / "kubernetes" / "ridley.yaml").read_text())}


def test_daemonset_has_least_privilege_and_probes_that_match_the_config(tmp_path):
    docs = manifests()
    ds = docs[("DaemonSet", "ridley")]
    pod = ds["spec"]["template"]["spec"]
    assert pod["hostPID"] is True and not pod.get("hostNetwork", False)
    assert pod["serviceAccountName"] == "ridley"
    (container,) = pod["containers"]
    sc = container["securityContext"]
    assert sc["privileged"] is False and sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"] == {"drop": ["ALL"], "add": ["SYS_ADMIN", "SYS_PTRACE", "NET_ADMIN"]}
    assert container["resources"]["limits"]["memory"] and container["resources"]["requests"]["cpu"]
    assert container["livenessProbe"]["httpGet"]["path"] == "/livez"
    assert container["readinessProbe"]["httpGet"]["path"] == "/"
    port = {p["name"]: p["containerPort"] for p in container["ports"]}["health"]
    assert container["args"] == ["run", "--config", "/etc/ridley/ridley.yaml"]
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    assert mounts["/sys/kernel/btf"]["readOnly"] is True
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes[mounts["/sys/kernel/btf"]["name"]]["hostPath"]["path"] == "/sys/kernel/btf"

    # The ConfigMap's config is valid, and serves health where the probes look.
    config_text = docs[("ConfigMap", "ridley")]["data"]["ridley.yaml"]
    config = yaml.safe_load(config_text)
    assert config["extensions"]["health_check"]["endpoint"] == f"${{env:POD_IP}}:{port}"
    env = {e["name"]: e for e in container["env"]}
    assert env["POD_IP"]["valueFrom"]["fieldRef"]["fieldPath"] == "status.podIP"
    path = tmp_path / "ridley.yaml"
    path.write_text(config_text)
    assert "(2 pipelines, 1 receivers)" in validate(path)


def test_rbac_is_read_only_and_matches_the_readme():
    role = manifests()[("ClusterRole", "ridley")]
    assert all(set(rule["verbs"]) == {"list", "watch"} for rule in role["rules"])
    readme = (ROOT / "README.md").read_text()
    (documented,) = re.findall(r"```yaml\n(apiVersion: rbac.authorization.k8s.io/v1\nkind: ClusterRole\n.*?)```",
                               readme, re.S)
    assert yaml.safe_load(documented)["rules"] == role["rules"]
    binding = manifests()[("ClusterRoleBinding", "ridley")]
    assert binding["roleRef"]["name"] == "ridley"
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "ridley", "namespace": "ridley"}]


def test_one_producer_of_the_service_graph_series_per_store():
    """Tempo's metrics-generator writes traces_service_graph_* into the stack's
    Prometheus; nothing else may (a second producer counts every edge twice)."""
    config = yaml.safe_load((EXAMPLES / "collector.yaml").read_text())
    defined = {role: set(config.get(role) or {}) for role in ("receivers", "processors", "exporters")}
    for name, pipeline in config["service"]["pipelines"].items():
        for role in ("receivers", "processors", "exporters"):
            for component in pipeline.get(role, []):
                assert component in defined[role], (name, role, component)
    assert "connectors" not in config, "no servicegraph connector beside Tempo's generator"
    store = config["exporters"]["prometheusremotewrite"]["endpoint"]
    tempo = yaml.safe_load((EXAMPLES / "tempo.yaml").read_text())
    assert tempo["overrides"]["defaults"]["metrics_generator"]["processors"] == ["service-graphs"]
    assert [w["url"] for w in tempo["metrics_generator"]["storage"]["remote_write"]] == [store]
    # ridley's own servicegraph processor stays out of the configs that feed this stack.
    for path in (ROOT / "config" / "in-cluster-collector.yaml",):
        processors = yaml.safe_load(path.read_text()).get("processors") or {}
        assert "servicegraph" not in processors, path
    cm = manifests()[("ConfigMap", "ridley")]
    ridley = yaml.safe_load(next(iter(cm["data"].values())))
    assert "servicegraph" not in (ridley.get("processors") or {})


def test_tempo_counts_sampled_pairs_with_the_multiplier():
    tempo = yaml.safe_load((EXAMPLES / "tempo.yaml").read_text())
    graphs = tempo["metrics_generator"]["processor"]["service_graphs"]
    assert graphs["span_multiplier_key"] == "ridley.sampling.ratio"
    assert tempo["overrides"]["defaults"]["metrics_generator"]["processors"] == ["service-graphs"]


def test_collector_in_kubernetes_matches_the_standalone_config():
    docs = {(d["kind"], d["metadata"]["name"]): d
            for d in yaml.safe_load_all((EXAMPLES / "kubernetes" / "collector.yaml").read_text())}
    config = yaml.safe_load(docs[("ConfigMap", "otel-collector")]["data"]["collector.yaml"])
    standalone = yaml.safe_load((EXAMPLES / "collector.yaml").read_text())
    assert config["service"] == standalone["service"]
    assert "connectors" not in config and "connectors" not in standalone
    service = docs[("Service", "otel-collector")]
    # ridley's in-cluster config points here.
    ridley = yaml.safe_load((ROOT / "config" / "in-cluster-collector.yaml").read_text())
    host, port = ridley["exporters"]["otlp"]["endpoint"].split(":-")[1].rstrip("}").rsplit(":", 1)
    assert host == f"{service['metadata']['name']}.{service['metadata']['namespace']}.svc"
    assert int(port) in [p["port"] for p in service["spec"]["ports"]]


def test_compose_wires_every_piece():
    compose = yaml.safe_load((EXAMPLES / "compose.yaml").read_text())
    services = compose["services"]
    assert set(services) == {"ridley", "otel-collector", "tempo", "jaeger", "prometheus", "grafana"}
    ridley = services["ridley"]
    assert ridley["pid"] == "host" and ridley["cap_add"] == ["SYS_ADMIN", "SYS_PTRACE", "NET_ADMIN"]
    for service in services.values():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            assert (EXAMPLES / source).exists(), source


def test_grafana_provisioning_and_dashboard():
    import json
    datasources = yaml.safe_load((EXAMPLES / "grafana/provisioning/datasources/datasources.yaml").read_text())
    by_uid = {d["uid"]: d for d in datasources["datasources"]}
    assert by_uid["tempo"]["jsonData"]["serviceMap"]["datasourceUid"] == "prometheus"
    dashboard = json.loads((EXAMPLES / "grafana/dashboards/ridley.json").read_text())
    kinds = {p["type"] for p in dashboard["panels"]}
    # Grafana's built-in panel ids are case-sensitive: `nodeGraph`, not `nodegraph`.
    builtin = {"nodeGraph", "timeseries", "table", "stat", "bargauge", "gauge", "piechart",
               "heatmap", "text", "barchart", "histogram", "state-timeline", "status-history"}
    assert kinds <= builtin, kinds - builtin
    assert "nodeGraph" in kinds
    exprs = " ".join(t.get("expr", "") for p in dashboard["panels"] for t in p["targets"])
    # The series the panels read are the ones ridley and Tempo's generator emit.
    for series in ("ridley_link_bytes_total", "ridley_link_connections_failed_total",
                   "traces_service_graph_request_total", "traces_service_graph_request_client_seconds_bucket"):
        assert series in exprs, series
    for p in dashboard["panels"]:
        for t in p["targets"]:
            assert t["datasource"]["uid"] in by_uid


def test_kustomize_renders_every_manifest_unchanged():
    """`kubectl apply -k examples/otel-collector/kubernetes` applies exactly the objects
    of the two manifests, as written (kustomize renders offline)."""
    kubernetes = EXAMPLES / "kubernetes"
    rendered = subprocess.run(["kubectl", "kustomize", str(kubernetes)], capture_output=True,
                              text=True, timeout=60)
    assert rendered.returncode == 0, rendered.stderr
    ours = {(d["kind"], d["metadata"].get("namespace", ""), d["metadata"]["name"]): d
            for path in ("ridley.yaml", "collector.yaml")
            for d in yaml.safe_load_all((kubernetes / path).read_text()) if d}
    got = {(d["kind"], d["metadata"].get("namespace", ""), d["metadata"]["name"]): d
           for d in yaml.safe_load_all(rendered.stdout) if d}
    assert got == ours


@pytest.mark.parametrize("path", ["ridley.yaml", "collector.yaml"])
def test_manifests_match_the_kubernetes_schemas(path):
    """Every object against the Kubernetes OpenAPI schemas (kubernetes-validate, strict:
    an unknown or misplaced field is an error), for the oldest and newest versions the
    DaemonSet's fields need."""
    import kubernetes_validate
    docs = [d for d in yaml.safe_load_all((EXAMPLES / "kubernetes" / path).read_text()) if d]
    for version in ("1.30", "1.33"):
        for doc in docs:
            kubernetes_validate.validate(doc, version, strict=True)
    # The check can fail: a misspelled field in a copy of the first object is refused.
    broken = {**docs[0], "metadata": {**docs[0]["metadata"], "lables": {"x": "y"}}}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, "1.33", strict=True)


def typed_dashboard_problems(dashboard_json):
    """What Grafana's own typed models (grafana-foundation-sdk) cannot place: a panel
    type without a registered panel plugin, a query its datasource's model does not
    decode, a query that loses its expression on the way."""
    from grafana_foundation_sdk.cog import runtime as cogruntime
    from grafana_foundation_sdk.cog.plugins import register_default_plugins
    from grafana_foundation_sdk.models import dashboard, prometheus, tempo

    register_default_plugins()
    model = dashboard.Dashboard.from_json(dashboard_json)
    problems = []
    for raw, panel in zip(dashboard_json["panels"], model.panels):
        if cogruntime.panelcfg_config(panel.type_val) is None:
            problems.append(f"panel {raw['title']!r}: no panel plugin {panel.type_val!r}")
        for raw_target, target in zip(raw.get("targets", []), panel.targets or []):
            if isinstance(target, prometheus.Dataquery):
                if target.expr != raw_target.get("expr"):
                    problems.append(f"panel {raw['title']!r}: expression lost")
            elif isinstance(target, tempo.TempoQuery):
                if target.query_type != raw_target.get("queryType"):
                    problems.append(f"panel {raw['title']!r}: Tempo query type lost")
            else:
                problems.append(f"panel {raw['title']!r}: query of unknown type {type(target).__name__}")
    return problems


@pytest.mark.parametrize("name", ["ridley.json", "ridley-prometheus.json"])
def test_every_dashboard_parses_into_grafanas_typed_models(name):
    import json
    dashboard = json.loads((EXAMPLES / "grafana/dashboards" / name).read_text())
    assert typed_dashboard_problems(dashboard) == []


def test_the_prometheus_only_dashboard_names_no_datasource_of_ours():
    """Any Prometheus: every panel and query goes through the `datasource` variable (no
    uid of the example stack), the map is a Node Graph of node and edge frames, and the
    namespace and workload filters apply to every query."""
    import json
    dashboard = json.loads((EXAMPLES / "grafana/dashboards/ridley-prometheus.json").read_text())
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    assert {"namespace", "workload"} <= set(variables)
    for v in ("namespace", "workload"):
        assert variables[v]["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
    targets = [t for p in dashboard["panels"] for t in p["targets"]]
    assert all(p["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
               for p in dashboard["panels"])
    assert all(t["datasource"] == {"type": "prometheus", "uid": "${datasource}"} for t in targets)
    assert all('=~"$namespace"' in t["expr"] and '=~"$workload"' in t["expr"] for t in targets)
    graph = dashboard["panels"][0]
    assert graph["type"] == "nodeGraph"
    assert [t["refId"] for t in graph["targets"]] == ["nodes", "edges"]
    rename = graph["transformations"][0]["options"]["renameByName"]
    assert rename == {"Value #nodes": "mainstat", "Value #edges": "mainstat"}


def test_dashboard_parses_into_grafanas_typed_models():
    import copy
    import json
    dashboard = json.loads((EXAMPLES / "grafana/dashboards/ridley.json").read_text())
    # The check would have caught the panel id this dashboard once shipped with.
    broken = copy.deepcopy(dashboard)
    broken["panels"][0]["type"] = "nodegraph"
    assert typed_dashboard_problems(broken) == ["panel 'Service map': no panel plugin 'nodegraph'"]
