"""The committed CRD is the generator's output, structural, and agrees with the pydantic spec."""
import copy
import subprocess
import sys
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml

from djinn.spec import ExperimentSpec, OutputSpec, to_document
from djinn_operator import crd

CRD_FILE = Path(__file__).parents[2] / "crds" / "agentscalingexperiments.djinn.io.yaml"
SCHEMA = crd.crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]


def test_committed_crd_matches_the_generator():
    out = subprocess.run([sys.executable, "-m", "djinn_operator.crd"], capture_output=True, text=True, check=True)
    assert CRD_FILE.read_text() == out.stdout == crd.render(), \
        "CRD drifted: python -m djinn_operator.crd > crds/agentscalingexperiments.djinn.io.yaml"


def test_crd_is_a_valid_v1_crd_with_status_columns_and_short_name():
    doc = yaml.safe_load(CRD_FILE.read_text())
    kubernetes_validate.validate(doc, "1.30", strict=True)
    version = doc["spec"]["versions"][0]
    assert doc["spec"]["names"]["shortNames"] == ["ase"] and doc["spec"]["scope"] == "Namespaced"
    assert version["subresources"] == {"status": {}}
    assert [(c["name"], c["jsonPath"]) for c in version["additionalPrinterColumns"]] == [
        ("Phase", ".status.phase"), ("Progress", ".status.progress"), ("Baseline", ".status.current.baseline"),
        ("N", ".status.current.n"), ("Results", ".status.resultsUri"), ("Age", ".metadata.creationTimestamp")]


def walk(node, path="schema"):
    yield path, node
    for key, child in node.get("properties", {}).items():
        yield from walk(child, f"{path}.{key}")
    for key in ("items", "additionalProperties"):
        if isinstance(node.get(key), dict):
            yield from walk(node[key], f"{path}[{key}]")


def to_jsonschema(node):
    """Kubernetes' nullable -> a null type, so jsonschema (draft 4, like OpenAPI v3) can check documents."""
    out = copy.deepcopy(node)
    for _, n in walk(out):
        if n.pop("nullable", False):
            n["type"] = [n["type"], "null"]
            if "enum" in n:
                n["enum"] = [*n["enum"], None]
    return out


def test_schema_is_structural():
    for path, node in walk(SCHEMA):
        assert "type" in node, f"{path} has no type"
        assert not {"$ref", "anyOf", "oneOf", "allOf", "title", "$defs"} & set(node), path
        assert not ("properties" in node and "additionalProperties" in node), path
        if "default" in node:
            jsonschema.Draft4Validator(to_jsonschema(node)).validate(node["default"])
    assert SCHEMA["properties"]["status"]["x-kubernetes-preserve-unknown-fields"] is True


def test_schema_carries_enums_bounds_defaults_and_nullables():
    spec = SCHEMA["properties"]["spec"]["properties"]
    assert "ray_keepalive" in spec["baselines"]["items"]["enum"]
    assert spec["newTokens"] == {"type": "integer", "default": 50, "minimum": 1, "maximum": 4096}
    assert spec["gpuPerActor"]["minimum"] == 0.0001 and "exclusiveMinimum" not in spec["gpuPerActor"]  # Ray's floor
    assert spec["djinnServer"]["nullable"] is True and "default" not in spec["djinnServer"]
    assert spec["cluster"]["properties"]["gpuPlacement"]["default"] == "phased"
    assert spec["output"]["required"] == ["uri"] and spec["output"]["description"]
    # the bounds validation enforces, stated where kubectl explain shows them
    assert spec["agentCounts"]["items"] == {"type": "integer", "minimum": 1, "maximum": 4096}
    assert spec["sleepSeconds"]["maximum"] == 3600 and spec["iterations"]["maximum"] == 1000
    status = SCHEMA["properties"]["status"]["properties"]
    conditions = status["conditions"]
    assert conditions["x-kubernetes-list-type"] == "map" and conditions["x-kubernetes-list-map-keys"] == ["type"]
    assert "type" in conditions["items"]["required"]  # a map list's key must be required
    assert conditions["items"]["properties"]["observedGeneration"]["type"] == "integer"
    assert status["observedGeneration"]["type"] == "integer" and "Queued" in status["phase"]["enum"]


def test_documents_of_the_pydantic_spec_pass_the_schema_and_bad_ones_do_not():
    validator = jsonschema.Draft4Validator(to_jsonschema(SCHEMA))
    full = ExperimentSpec(output=OutputSpec(uri="s3://b/p", endpoint_url="http://minio:9000"),
                          cluster={"tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists"}]})
    validator.validate(to_document("exp1", full, "lab"))
    for bad in ({"baselines": ["warp_drive"]}, {"newTokens": 0}, {"cluster": {"gpuPlacement": "spread"}}):
        with pytest.raises(jsonschema.ValidationError):
            validator.validate({"spec": bad})
