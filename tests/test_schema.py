"""The committed JSON Schema of the spec format is the one the models generate."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from bpfgen.spec import json_schema

ROOT = Path(__file__).resolve().parent.parent
SCHEMA = ROOT / "schemas" / "bpfgen-v1.schema.json"
VALID = [ROOT / "examples" / "seed.yaml", *sorted((ROOT / "tests" / "specs" / "good").glob("*.yaml"))]


def test_committed_schema_is_up_to_date():
    generated = json.dumps(json_schema(), indent=2, sort_keys=True) + "\n"
    assert SCHEMA.read_text() == generated, f"{SCHEMA} is stale: run `python -m bpfgen.spec --write-schema`"


def test_schema_describes_the_format():
    schema = json_schema()
    assert schema["$schema"].startswith("https://json-schema.org/")
    assert schema["title"]
    assert set(schema["required"]) == {"apiVersion", "kind", "metadata", "nodes"}
    cluster = schema["$defs"]["Cluster"]["properties"]
    for name in ("nodePortRange", "snatPortRange"):
        assert cluster[name]["type"] == "string" and "pattern" in cluster[name]
    assert all(definition["additionalProperties"] is False for definition in schema["$defs"].values())


@pytest.mark.parametrize("path", VALID, ids=lambda path: path.name)
def test_valid_specs_validate_against_the_schema(path: Path):
    jsonschema = pytest.importorskip("jsonschema")
    jsonschema.validate(yaml.safe_load(path.read_text()), json.loads(SCHEMA.read_text()))
