"""The Helm chart: rendered for each profile, checked against the Kubernetes OpenAPI schemas, the
CRD, values.schema.json, and the operator's own list of API calls (least-privilege RBAC)."""
from __future__ import annotations

import copy
import importlib.util
import json

import jsonschema
import kubernetes_validate
import pytest
import yaml

from djinn.spec import parse_spec
from deploy_support import CHART, CHART_CRD, CRD_NAME, PROFILES, ROOT, TOP_CRD, deep_merge, profile_values

K8S_VERSION = "1.30"
SCHEMA = json.loads((CHART / "values.schema.json").read_text())
GROUP, VERSION, KIND = "djinn.io", "v1alpha1", "AgentScalingExperiment"


def by_kind(objs, kind, component=None):
    return [o for o in objs if o["kind"] == kind
            and (component is None or o["metadata"].get("labels", {}).get("app.kubernetes.io/component") == component)]


def one(objs, kind, component=None):
    found = by_kind(objs, kind, component)
    assert len(found) == 1, f"expected one {kind} ({component}), got {[o['metadata']['name'] for o in found]}"
    return found[0]


def pod_specs(objs):
    for o in objs:
        if o["kind"] in ("Deployment", "Job", "StatefulSet", "DaemonSet"):
            yield o, o["spec"]["template"]["spec"]


def rule_triples(rules):
    return {(g, r, v) for rule in rules for g in rule["apiGroups"] for r in rule["resources"] for v in rule["verbs"]}


# ---------------------------------------------------------------- chart metadata and files


def test_chart_yaml(pyproject):
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert chart["apiVersion"] == "v2"
    assert chart["name"] == "djinn-bench"
    assert chart["appVersion"] == "0.1.0" == pyproject["project"]["version"]
    # KubeRay is installed separately (Chart.yaml and docs/kubernetes.md say why): no dependencies
    # that would need `helm dependency build` with network access before every install.
    assert not chart.get("dependencies")
    assert "kuberay" in (CHART / "Chart.yaml").read_text()


def test_crd_copy_is_byte_identical_to_the_generated_crd():
    assert TOP_CRD.exists(), f"charts/djinn-bench/crds/{CRD_NAME} exists but crds/{CRD_NAME} does not"
    assert CHART_CRD.exists(), f"copy it: cp crds/{CRD_NAME} charts/djinn-bench/crds/"
    assert CHART_CRD.read_bytes() == TOP_CRD.read_bytes(), \
        f"charts/djinn-bench/crds/{CRD_NAME} differs from crds/{CRD_NAME}: cp crds/{CRD_NAME} charts/djinn-bench/crds/"
    extra = {p.name for p in (CHART / "crds").iterdir()} - {CRD_NAME}
    assert not extra, f"unexpected files in charts/djinn-bench/crds: {extra}"


def test_crd_is_a_valid_custom_resource_definition(crd):
    kubernetes_validate.validate(crd, K8S_VERSION, strict=True)
    assert crd["spec"]["group"] == GROUP and crd["spec"]["names"]["kind"] == KIND
    assert any(v["name"] == VERSION and v["served"] and v["storage"] for v in crd["spec"]["versions"])


def test_rbac_rules_file_is_generated_from_the_operator(api_calls):
    spec = importlib.util.spec_from_file_location("gen_operator_rbac", ROOT / "scripts" / "gen-operator-rbac.py")
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)
    expected = gen.render(sorted(api_calls))
    actual = (CHART / "files" / "operator-rbac.yaml").read_text()
    assert actual == expected, "charts/djinn-bench/files/operator-rbac.yaml is stale: python scripts/gen-operator-rbac.py"


# ---------------------------------------------------------------- values.schema.json


def test_values_schema_is_draft07_and_accepts_the_defaults_and_profiles():
    assert SCHEMA["$schema"] == "http://json-schema.org/draft-07/schema#"
    jsonschema.Draft7Validator.check_schema(SCHEMA)
    defaults = yaml.safe_load((CHART / "values.yaml").read_text())
    for profile in PROFILES:
        jsonschema.Draft7Validator(SCHEMA).validate(deep(defaults, profile_values(profile)))


def deep(base, override):
    return deep_merge(base, override)


def mutate(values: dict, path: str, value):
    out = copy.deepcopy(values)
    node = out
    keys = path.split(".")
    for key in keys[:-1]:
        node = node.setdefault(key, {})
    node[keys[-1]] = value
    return out


BAD_VALUES = [
    ("wrong type: replicas as text", "operator.replicas", "two"),
    ("negative replicas", "operator.replicas", -1),
    ("two kopf operators", "operator.replicas", 2),
    ("unknown top-level key", "imagee", {"repository": "x"}),
    ("unknown key under operator", "operator.replica", 1),
    ("image tag latest", "image.tag", "latest"),
    ("operator image tag latest", "operator.image.tag", "latest"),
    ("server image tag latest", "serverImage.tag", "latest"),
    ("image tag with a space", "image.tag", "0.1 0"),
    ("uppercase image repository", "image.repository", "GHCR.io/Djinn"),
    ("bad pull policy", "image.pullPolicy", "Sometimes"),
    ("negative backoffLimit", "experiment.backoffLimit", -1),
    ("deadline below a minute", "experiment.activeDeadlineSeconds", 5),
    ("gpu as text", "experiment.gpu", "yes"),
    ("bad gpu placement", "experiment.gpuPlacement", "shared"),
    ("negative cpu request", "operator.resources.requests.cpu", "-1"),
    ("negative memory limit", "operator.resources.limits.memory", -512),
    ("bad toleration effect", "experiment.tolerations", [{"key": "nvidia.com/gpu", "effect": "Never"}]),
    ("nodeSelector value not a string", "experiment.nodeSelector", {"gpu": True}),
    ("bucket with uppercase", "s3.bucket", "My_Bucket"),
    ("prefix with a leading slash", "s3.prefix", "/experiments"),
    ("endpoint without scheme", "s3.endpoint", "minio:9000"),
    ("IRSA annotation not a string", "serviceAccount.annotations", {"eks.amazonaws.com/role-arn": 7}),
    ("minio tag latest", "minio.image.tag", "latest"),
    ("minio tag empty", "minio.image.tag", ""),
    ("short minio password", "minio.rootPassword", "short"),
    ("example agent count 0", "example.spec.agentCounts", [0, 1]),
    ("negative sleep", "example.spec.sleepSeconds", -1),
    ("watchNamespace not a DNS label", "operator.watchNamespace", "Djinn_NS"),
    ("watchNamespace with an empty item", "operator.watchNamespace", "djinn,,x"),
    ("liveness port negative", "operator.livenessProbe.port", -8080),
]


@pytest.mark.parametrize("why,path,value", BAD_VALUES, ids=[b[0] for b in BAD_VALUES])
def test_values_schema_rejects_bad_values(why, path, value):
    values = mutate(yaml.safe_load((CHART / "values.yaml").read_text()), path, value)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.Draft7Validator(SCHEMA).validate(values)


@pytest.mark.parametrize("why,path,value", BAD_VALUES, ids=[b[0] for b in BAD_VALUES])
def test_helm_rejects_bad_values(helm, why, path, value):
    """The same values through Helm's own schema validation (what `helm install` runs)."""
    values = mutate(profile_values("kind"), path, value)
    with pytest.raises(helm.error):
        helm.validate_schema(values)


def test_helm_accepts_the_profiles(helm):
    for profile in PROFILES:
        helm.validate_schema(profile_values(profile))


@pytest.mark.parametrize("profile", sorted(PROFILES))
def test_helm_lint_strict(helm, profile):
    assert helm.lint(profile_values(profile, example={"enabled": True})) == []


# ---------------------------------------------------------------- rendered objects

RENDER_CASES = {
    "default": {},
    "default-example": {"example": {"enabled": True}},
    "kind": {},
    "kind-example": {"example": {"enabled": True}},
    "eks-a100": {},
    "eks-a100-example": {"example": {"enabled": True}},
    "kind-one-namespace": {"operator": {"watchNamespace": "djinn"}},
    "kind-two-namespaces": {"operator": {"watchNamespace": "djinn,team-a"}},
}


@pytest.fixture(scope="module", params=sorted(RENDER_CASES))
def rendered(request, render):
    case = request.param
    profile = case.split("-example")[0].split("-one-")[0].split("-two-")[0]
    return case, render(profile, **RENDER_CASES[case])


def test_every_object_validates_against_the_kubernetes_openapi_schema(rendered):
    case, objs = rendered
    assert objs
    for obj in objs:
        if obj["apiVersion"] == f"{GROUP}/{VERSION}":
            continue  # custom resources: checked against the CRD below
        try:
            kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{case}: {obj['kind']}/{obj['metadata']['name']}: {exc}")


def test_custom_resources_validate_against_the_crd_and_the_spec_model(rendered, crd):
    from djinn.spec import parse_document, parse_spec

    case, objs = rendered
    version = next(v for v in crd["spec"]["versions"] if v["name"] == VERSION)
    # OpenAPI v3.0 schemas keep draft-04 semantics (exclusiveMinimum is a boolean): Draft4Validator
    validator = jsonschema.Draft4Validator(version["schema"]["openAPIV3Schema"])
    for obj in by_kind(objs, KIND):
        errors = sorted(validator.iter_errors(obj), key=str)
        assert not errors, f"{case}: {obj['metadata']['name']}: " + "; ".join(
            f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in errors)
        parse_document(obj)


def test_custom_resources_parse_with_the_spec_model(rendered):
    from djinn.spec import parse_document, parse_spec

    case, objs = rendered
    for obj in by_kind(objs, KIND):
        name, spec = parse_document(obj)
        assert name == obj["metadata"]["name"]
        assert spec.output.is_s3


def test_pods_are_non_root_and_pinned(rendered):
    case, objs = rendered
    for owner, spec in pod_specs(objs):
        where = f"{case}: {owner['kind']}/{owner['metadata']['name']}"
        assert spec["securityContext"]["runAsNonRoot"] is True, where
        assert spec["securityContext"]["runAsUser"] != 0, where
        for c in spec["containers"] + spec.get("initContainers", []):
            image = c["image"]
            assert ":" in image.rsplit("/", 1)[-1] and not image.endswith(":latest"), f"{where}: {image}"
            assert c["securityContext"]["allowPrivilegeEscalation"] is False, where
            assert c["securityContext"]["capabilities"]["drop"] == ["ALL"], where
            assert c["resources"].get("limits") and c["resources"].get("requests"), f"{where}: resources"


def test_everything_is_in_the_release_namespace_or_cluster_scoped(rendered):
    case, objs = rendered
    watch = RENDER_CASES[case].get("operator", {}).get("watchNamespace", "")
    allowed = {"djinn", *filter(None, watch.split(","))}
    for obj in objs:
        ns = obj["metadata"].get("namespace")
        if obj["kind"] in ("ClusterRole", "ClusterRoleBinding"):
            assert ns is None
        else:
            assert ns in allowed, f"{case}: {obj['kind']}/{obj['metadata']['name']} in {ns}"


def test_operator_deployment(rendered):
    case, objs = rendered
    dep = one(objs, "Deployment", "operator")
    assert dep["spec"]["strategy"]["type"] == "Recreate"
    assert dep["spec"]["replicas"] == 1
    pod = dep["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    assert c["command"] == ["python", "-m", "djinn_operator"]
    env = {e["name"]: e for e in c["env"]}
    watch = RENDER_CASES[case].get("operator", {}).get("watchNamespace", "")
    assert env["WATCH_NAMESPACE"]["value"] == watch
    assert env["LIVENESS_ENDPOINT"]["value"] == "http://0.0.0.0:8080/healthz"
    assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "health"}
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert c["securityContext"]["readOnlyRootFilesystem"] is True
    sa = one(objs, "ServiceAccount", "operator")
    assert pod["serviceAccountName"] == sa["metadata"]["name"]
    bindings = by_kind(objs, "ClusterRoleBinding", "operator") + by_kind(objs, "RoleBinding", "operator")
    assert bindings
    for b in bindings:
        assert b["subjects"] == [{"kind": "ServiceAccount", "name": sa["metadata"]["name"], "namespace": "djinn"}]


# ---------------------------------------------------------------- RBAC == djinn_operator.k8s.API_CALLS


@pytest.mark.parametrize("watch", ["", "djinn", "djinn,team-a"],
                         ids=["all-namespaces", "one-namespace", "two-namespaces"])
def test_operator_rbac_is_exactly_the_operators_api_calls(render, api_calls, watch):
    objs = render("kind", operator={"watchNamespace": watch})
    roles = {(o["kind"], o["metadata"]["name"]): o for o in by_kind(objs, "ClusterRole", "operator")
             + by_kind(objs, "Role", "operator")}
    granted = set()
    for o in by_kind(objs, "ClusterRole", "operator") + by_kind(objs, "Role", "operator"):
        for rule in o["rules"]:
            assert "*" not in rule["verbs"] + rule["resources"] + rule["apiGroups"], f"wildcard in {rule}"
            assert not rule.get("resourceNames") and not rule.get("nonResourceURLs")
        granted |= rule_triples(o["rules"])
    assert granted == api_calls, (f"missing: {sorted(api_calls - granted)}; "
                                  f"not called by the operator: {sorted(granted - api_calls)}")
    # every role is bound to the operator's service account, and nothing else is bound to it
    bindings = by_kind(objs, "ClusterRoleBinding", "operator") + by_kind(objs, "RoleBinding", "operator")
    assert {(b["roleRef"]["kind"], b["roleRef"]["name"]) for b in bindings} == set(roles)
    assert {(b["metadata"].get("namespace"), b["roleRef"]["name"]) for b in bindings} == \
        {(o["metadata"].get("namespace"), o["metadata"]["name"]) for o in
         by_kind(objs, "ClusterRole", "operator") + by_kind(objs, "Role", "operator")}
    if watch:
        roles_ns = sorted(o["metadata"]["namespace"] for o in by_kind(objs, "Role", "operator"))
        assert roles_ns == sorted(watch.split(","))
        for o in by_kind(objs, "Role", "operator"):
            assert rule_triples(o["rules"]) == {c for c in api_calls if (c[0], c[1].split("/")[0]) not in _cluster_scoped()}
        cluster = by_kind(objs, "ClusterRole", "operator")
        for o in cluster:  # only cluster-scoped resources stay cluster-wide
            for g, r, _ in rule_triples(o["rules"]):
                assert (g, r.split("/")[0]) in _cluster_scoped(), f"{g}/{r} granted cluster-wide"


def _cluster_scoped():
    spec = importlib.util.spec_from_file_location("gen_operator_rbac", ROOT / "scripts" / "gen-operator-rbac.py")
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)
    scoped = set(gen.CLUSTER_SCOPED)
    scoped |= {k for k, v in gen.crd_scopes().items() if v == "Cluster"}
    return scoped


def test_rbac_can_be_turned_off(render):
    objs = render("kind", rbac={"create": False})
    assert not [o for o in objs if o["kind"] in ("ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding")
                and o["metadata"]["labels"]["app.kubernetes.io/component"] == "operator"]


def test_cleanup_hook_rbac_is_limited_to_the_example(render):
    objs = render("kind", example={"enabled": True})
    role = one(objs, "Role", "cleanup")
    assert role["rules"] == [{"apiGroups": [GROUP], "resources": ["agentscalingexperiments"],
                              "resourceNames": ["agent-scaling-kind"], "verbs": ["get", "delete"]}]
    job = one(objs, "Job", "cleanup")
    assert job["metadata"]["annotations"]["helm.sh/hook"] == "pre-delete"
    assert job["spec"]["template"]["spec"]["serviceAccountName"] == role["metadata"]["name"]
    compile(job["spec"]["template"]["spec"]["containers"][0]["args"][0], "cleanup-hook", "exec")


# ---------------------------------------------------------------- profiles


def test_kind_profile(render):
    objs = render("kind", example={"enabled": True})
    exp = one(objs, KIND)
    spec = exp["spec"]
    assert spec["modelId"] == "sshleifer/tiny-gpt2"
    assert spec["weights"] == "synthetic"
    assert spec["cluster"]["gpu"] is False
    assert spec["cluster"]["imagePullPolicy"] == "Never"
    assert not spec["cluster"]["image"].endswith(":latest")
    minio = one(objs, "Service", "minio")
    assert spec["output"] == {"uri": "s3://djinn-results/experiments", "region": "us-east-1",
                              "endpointUrl": f"http://{minio['metadata']['name']}.djinn.svc:9000"}
    secret = one(objs, "Secret", "minio")
    assert {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"} <= set(secret["stringData"])
    assert spec["cluster"]["credentialsSecret"] == secret["metadata"]["name"]
    assert spec["cluster"]["serviceAccountName"] == one(objs, "ServiceAccount", "workload")["metadata"]["name"]
    assert "nvidia.com/gpu" not in json.dumps(objs)

    bucket = one(objs, "Job", "minio")
    assert bucket["metadata"]["annotations"]["helm.sh/hook"] == "post-install,post-upgrade"
    compile(bucket["spec"]["template"]["spec"]["containers"][0]["args"][0], "bucket-job", "exec")
    # the operator reads and writes the same MinIO
    op = one(objs, "Deployment", "operator")["spec"]["template"]["spec"]["containers"][0]
    assert {"name": "AWS_ENDPOINT_URL_S3", "value": spec["output"]["endpointUrl"]} in op["env"]
    assert op["envFrom"] == [{"secretRef": {"name": secret["metadata"]["name"]}}]
    for _, pod in pod_specs(objs):
        for c in pod["containers"]:
            if c["image"].startswith("djinn-"):
                assert c["imagePullPolicy"] == "Never"


def test_kind_example_file_is_the_charts_kind_example(render):
    """examples/experiment-kind.yaml, applied by hand, runs what kind-up.sh's chart example runs, in its namespace."""
    chart = one(render("kind", example={"enabled": True}), KIND)
    file = yaml.safe_load((ROOT / "examples" / "experiment-kind.yaml").read_text())
    assert file["metadata"] == {"name": chart["metadata"]["name"], "namespace": chart["metadata"]["namespace"]}
    assert parse_spec(file["spec"]) == parse_spec(chart["spec"])


def test_eks_a100_profile(render):
    objs = render("eks-a100", example={"enabled": True})
    cluster = one(objs, KIND)["spec"]["cluster"]
    assert cluster["gpu"] is True
    assert cluster["nodeSelector"] == {"node.kubernetes.io/instance-type": "p4de.24xlarge"}
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in cluster["tolerations"]
    assert cluster["serverImage"].startswith("ghcr.io/djinn-bench/djinn-bench-server:")
    assert cluster["rayImage"] == cluster["serverImage"]
    assert "credentialsSecret" not in cluster  # IRSA, no static keys
    for component in ("operator", "workload"):
        sa = one(objs, "ServiceAccount", component)
        assert sa["metadata"]["annotations"]["eks.amazonaws.com/role-arn"].startswith("arn:aws:iam::")
    assert not by_kind(objs, "Deployment", "minio")
    op = one(objs, "Deployment", "operator")["spec"]["template"]["spec"]["containers"][0]
    assert "envFrom" not in op
    assert not any(e["name"] == "AWS_ENDPOINT_URL_S3" for e in op["env"])
    assert one(objs, KIND)["spec"]["output"]["uri"] == "s3://djinn-bench-results/experiments"


def test_example_spec_fields_given_in_values_win(render):
    objs = render("kind", example={"enabled": True, "spec": {
        "output": {"uri": "s3://other/prefix"}, "cluster": {"gpu": True, "image": "djinn-bench:9.9.9"}}})
    spec = one(objs, KIND)["spec"]
    assert spec["output"] == {"uri": "s3://other/prefix"}
    assert spec["cluster"]["gpu"] is True and spec["cluster"]["image"] == "djinn-bench:9.9.9"
    assert spec["cluster"]["imagePullPolicy"] == "Never"  # the rest still from the values


def test_notes_tell_how_to_fetch_results(helm):
    notes = helm.render(profile_values("kind", example={"enabled": True}))["djinn-bench/templates/NOTES.txt"]
    assert "djinn-bench analyze --input s3://djinn-results/experiments/djinn/agent-scaling-kind" in notes
    assert "port-forward svc/djinn-bench-minio 9000:9000" in notes


def test_pull_secrets_reach_every_pod_of_the_chart_and_of_the_example(render):
    """A private registry: the chart's own pods and every pod the operator creates for the example."""
    objs = render("kind", example={"enabled": True}, imagePullSecrets=[{"name": "regcred"}])
    pods = list(pod_specs(objs))
    assert pods and all(pod.get("imagePullSecrets") == [{"name": "regcred"}] for _, pod in pods), \
        [o["metadata"]["name"] for o, pod in pods if pod.get("imagePullSecrets") != [{"name": "regcred"}]]
    assert one(objs, KIND)["spec"]["cluster"]["imagePullSecrets"] == ["regcred"]
    assert "imagePullSecrets" not in one(render("kind", example={"enabled": True}), KIND)["spec"]["cluster"]


def test_weights_sources_reach_the_example(render):
    cluster = one(render("eks-a100", example={"enabled": True}, experiment={"hfTokenSecret": "hf-token",
                                                                            "modelClaim": "llama"}), KIND)["spec"]["cluster"]
    assert cluster["hfTokenSecret"] == "hf-token" and cluster["modelClaim"] == "llama"
    assert "hfTokenSecret" not in one(render("eks-a100", example={"enabled": True}), KIND)["spec"]["cluster"]


def test_kind_example_fits_a_laptop(render):
    """Phased placement: at most one GPU-holder pod (server or Ray head) and one client Job run at once;
    their requests must fit a 4-CPU, 8 GiB laptop with room for the control plane (2 CPU, 4 GiB)."""
    from djinn.spec import parse_quantity

    for spec in (one(render("kind", example={"enabled": True}), KIND)["spec"],
                 yaml.safe_load((ROOT / "examples" / "experiment-kind.yaml").read_text())["spec"]):
        c = parse_spec(spec).cluster
        assert c.gpu_placement == "phased" and not c.gpu
        cpu = lambda q: float(q[:-1]) / 1000 if q.endswith("m") else float(q)  # noqa: E731
        assert cpu(c.server_cpu) + cpu(c.client_cpu) <= 2
        assert parse_quantity(c.server_memory) + parse_quantity(c.client_memory) <= 4 * 2**30
