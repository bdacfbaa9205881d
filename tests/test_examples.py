"""Every reference config and example validates: ridley's own configs with `ridley
validate`, the collector, Tempo and Kubernetes files against the structure their
consumers require. They need no root."""
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
    proc = subprocess.run([str(RIDLEY), "validate", "--config", str(path)], capture_output=True, text=True)
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
    assert sc["capabilities"] == {"drop": ["ALL"], "add": ["BPF", "PERFMON", "SYS_ADMIN", "SYS_PTRACE"]}
    assert container["resources"]["limits"]["memory"] and container["resources"]["requests"]["cpu"]
    assert container["livenessProbe"]["httpGet"]["path"] == "/livez"
    assert container["readinessProbe"]["httpGet"]["path"] == "/"
    port = {p["name"]: p["containerPort"] for p in container["ports"]}["health"]
    assert container["args"] == ["run", "--config", "/etc/ridley/ridley.yaml"]

    # The ConfigMap's config is valid, and serves health where the probes look.
    config_text = docs[("ConfigMap", "ridley")]["data"]["ridley.yaml"]
    config = yaml.safe_load(config_text)
    assert config["extensions"]["health_check"]["endpoint"] == f"0.0.0.0:{port}"
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


def test_collector_config_wires_the_servicegraph_connector():
    config = yaml.safe_load((EXAMPLES / "collector.yaml").read_text())
    defined = {role: set(config.get(role, {})) for role in ("receivers", "processors", "exporters", "connectors")}
    for name, pipeline in config["service"]["pipelines"].items():
        for role in ("receivers", "processors", "exporters"):
            for component in pipeline.get(role, []):
                assert component in defined[role] | defined["connectors"], (name, role, component)
    pipelines = config["service"]["pipelines"]
    assert "servicegraph" in pipelines["traces"]["exporters"]
    assert "servicegraph" in pipelines["metrics"]["receivers"]
    assert config["connectors"]["servicegraph"]["store"]["max_items"] >= 1000


def test_tempo_counts_sampled_pairs_with_the_multiplier():
    tempo = yaml.safe_load((EXAMPLES / "tempo.yaml").read_text())
    graphs = tempo["metrics_generator"]["processor"]["service_graphs"]
    assert graphs["span_multiplier_key"] == "ridley.sampling.ratio"
    assert tempo["overrides"]["defaults"]["metrics_generator"]["processors"] == ["service-graphs"]
