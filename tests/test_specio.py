"""Reading spec and object files (bpfgen/specio.py): YAML and JSON, lines, and the limits that
keep hostile input (bpfgen runs as root) from hanging or crashing it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from bpfgen import specio
from bpfgen.cli import cli
from bpfgen.errors import SpecError
from bpfgen.spec import load_spec, parse_spec, spec_to_dict

ROOT = Path(__file__).resolve().parent.parent
SEED = ROOT / "examples" / "seed.yaml"
CORPUS = sorted([*ROOT.glob("examples/*.yaml"), *(ROOT / "tests" / "specs").rglob("*.yaml")])


@pytest.fixture(params=["libyaml", "pure"])
def parser(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Each test that takes it runs with libyaml's parser and with PyYAML's pure-Python one
    (what specio falls back to where PyYAML has no libyaml)."""
    if request.param == "pure":
        monkeypatch.setattr(specio, "_EventSource", yaml.SafeLoader)
    elif not yaml.__with_libyaml__:
        pytest.skip("PyYAML is built without libyaml")
    return request.param


def problem_of(text: str, filename: str = "t.yaml"):
    """The one problem load_document reports for text."""
    with pytest.raises(SpecError) as caught:
        specio.load_document(text, filename)
    (problem,) = caught.value.problems
    assert problem.file == filename
    return problem


def validate(path: Path):
    """bpfgen validate PATH through the CLI."""
    return CliRunner().invoke(cli, ["validate", str(path)])


def assert_one_line_refusal(result, contains: str) -> None:
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("bpfgen: "), result.stderr
    assert contains in lines[0]


def billion_laughs(levels: int = 9, width: int = 9) -> str:
    lines = [f"a0: &a0 [{', '.join(['lol'] * width)}]"]
    for i in range(1, levels):
        lines.append(f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * width)}]")
    return "\n".join(lines) + "\n"


def seed_with(**changes: object) -> dict:
    """The seed spec as data, with top-level changes."""
    return {**spec_to_dict(load_spec(SEED)), **changes}


# --- what is read: the same as yaml.safe_load --------------------------------------------------


@pytest.mark.parametrize("path", CORPUS, ids=lambda path: str(path.relative_to(ROOT)))
def test_yaml_data_is_what_safe_load_gives(path: Path):
    text = path.read_text()
    try:
        expected = yaml.safe_load(text)
    except yaml.YAMLError:
        with pytest.raises(SpecError):
            specio.load_document(text, path.name)
        return
    assert specio.load_document(text, path.name).data == expected


def test_yaml_scalars_and_tags(parser: str):
    text = """\
plain: [null, ~, true, no, 0x1F, 1_000, 0o17, 1:20, 1.5e+3, .inf, 2001-12-14, "2001-12-14", '12']
tagged: [!!str 1, !!int '12', ! 12, !!float '2', !!binary aGVsbG8=, !!null '']
keys: {1: int, "1": str, =: value, '<<': quoted}
"""
    assert specio.load_document(text).data == yaml.safe_load(text)


@pytest.mark.parametrize("text, message", [
    ("a: !tag 1\n", "could not determine a constructor for the tag '!tag'"),
    ("a: !!set {x}\n", "the tag 'tag:yaml.org,2002:set' is not supported"),
    ("a: 2001-13-01\n", "cannot read the value '2001-13-01' as timestamp: month must be in 1..12"),
    ("a: !!bool maybe\n", "cannot read the value 'maybe' as bool"),
    ("? [a, b]\n: 1\n", "found unhashable key"),
    ("a: *nowhere\n", "found undefined alias 'nowhere'"),
    ("a: &x 1\nb: &x 2\n", "found duplicate anchor 'x'"),
    ("a: &x [1, *x]\n", "alias *x is inside the node it refers to (a recursive structure)"),
    ("a: &x {b: *x}\n", "alias *x is inside the node it refers to"),
    ("<<: 1\n", "expected a mapping or list of mappings for merging, but found a scalar"),
    ("--- 1\n--- 2\n", "expected a single document in the stream"),
    ("a: [1\n", "malformed YAML"),
    ("a: \x07\n", "unacceptable character"),
])
def test_what_yaml_cannot_give_is_one_problem_with_a_line(parser: str, text: str, message: str):
    problem = problem_of(text)
    assert message in problem.message and problem.line is not None


def test_a_reader_error_has_its_line_after_multibyte_characters(parser: str):
    assert problem_of("a: é\nb: ééé\nc: \x07\n").line == 3


def test_empty_documents_have_no_data():
    for text in ("", "# only a comment\n", "~\n", "---\n"):
        document = specio.load_document(text)
        assert document.data is None and document.duplicates == []


# --- merge keys --------------------------------------------------------------------------------

MERGED_SPEC = """\
apiVersion: bpfgen/v1
kind: ServiceSpec
metadata: {name: merged}
nodes:
  - {name: node0, address: 172.26.50.101}
services:
  - name: web
    type: NodePort
    ports:
      - &http
        name: http
        protocol: TCP
        port: 80
        nodePort: 30080
    backends:
      - &backend
        address: 10.0.1.1
        node: node0
  - name: api
    type: NodePort
    ports:
      - <<: *http
        nodePort: 30081
    backends:
      - <<: *backend
        address: 10.0.1.2
      - {<<: *backend, address: 10.0.1.3}
"""


def test_merge_keys_in_a_spec_still_work(parser: str):
    assert specio.load_document(MERGED_SPEC).data == yaml.safe_load(MERGED_SPEC)
    web, api = parse_spec(MERGED_SPEC, "merged.yaml").services
    assert [(p.name, p.protocol, p.port, p.node_port) for p in api.ports] == [("http", "TCP", 80, 30081)]
    assert [(str(b.address), b.node) for b in api.backends] == [("10.0.1.2", "node0"), ("10.0.1.3", "node0")]


def test_a_problem_in_a_merged_value_has_the_line_where_it_is_written(parser: str):
    text = MERGED_SPEC.replace("port: 80\n", "port: 0\n").replace("nodePort: 30081", "nodPort: 30081")
    problems = pytest.raises(SpecError, parse_spec, text, "m.yaml").value.problems
    assert [(p.line, p.path) for p in problems] == [
        (13, "services[0].ports[0].port"),
        (13, "services[1].ports[0].port"),  # merged from line 13
        (23, "services[1].ports[0].nodPort"),
    ]


def test_merge_precedence_follows_the_yaml_spec(parser: str):
    text = """\
one: &one {shared: 1, only1: 1}
two: &two {shared: 2, only2: 2}
listed: {<<: [*one, *two]}
overridden: {<<: *one, shared: 3}
twice: {<<: *one, <<: *two}
"""
    data = specio.load_document(text).data
    # "Keys in mapping nodes earlier in the sequence override keys specified in later mapping
    # nodes" (yaml.org/type/merge.html), as PyYAML did up to 6.0.3; 6.0.4 lets the later one
    # win for keys of more than one character (yaml/pyyaml#953).
    assert data["listed"] == {"shared": 1, "only1": 1, "only2": 2}
    assert data["overridden"] == {"shared": 3, "only1": 1}
    assert data["twice"] == {"shared": 2, "only1": 1, "only2": 2}
    document = specio.load_document(text)
    paths = ("listed.shared", "listed.only2", "overridden.shared")
    assert [document.line_of(path) for path in paths] == [1, 2, 4]


# --- hostile input -----------------------------------------------------------------------------


def test_a_billion_laughs_is_refused_at_the_expansion_limit(parser: str, tmp_path: Path):
    text = billion_laughs()
    assert len(text) < 1024
    problem = problem_of(text)
    assert problem.message == f"aliases expand the document past the limit of {specio.MAX_EXPANDED:,} nodes"
    assert problem.line == 7  # 9**7 nodes: a7 is the first level past 4,000,000
    path = tmp_path / "laughs.yaml"
    path.write_text(text)
    assert_one_line_refusal(validate(path), "laughs.yaml:7: aliases expand the document past the limit")


def test_aliases_within_the_limit_are_fine(parser: str):
    data = specio.load_document(billion_laughs(levels=5)).data  # 9**5 = 59,049 'lol's
    assert data["a4"][8][8][8][8][8] == "lol" and data["a4"][0] is data["a4"][8]  # shared, not copied


@pytest.mark.parametrize("name, text, line", [
    ("lists.yaml", "[" * 100_000 + "]" * 100_000 + "\n", 1),
    ("mappings.yaml", "{a: " * 50_000 + "1" + "}" * 50_000 + "\n", 1),
    ("block.yaml", "".join(" " * i + "a:\n" for i in range(100)), specio.MAX_DEPTH + 1),
    ("sequences.yaml", "- " * 100 + "x\n", 1),
    ("lists.json", "[" * 100_000 + "]" * 100_000 + "\n", 1),
    ("mappings.json", '{"a": ' * 50_000 + "1" + "}" * 50_000 + "\n", 1),
    ("deep.json", "[\n" * 70 + "]" * 70, specio.MAX_DEPTH + 1),  # deeper than the limit, not than json's
])
def test_deep_nesting_is_one_line_with_no_traceback(
    parser: str, tmp_path: Path, name: str, text: str, line: int
):
    problem = problem_of(text, name)
    message = f"nested deeper than the limit of {specio.MAX_DEPTH} levels"
    assert (problem.message, problem.line) == (message, line)
    path = tmp_path / name
    path.write_text(text)
    assert_one_line_refusal(validate(path), f"{name}:{line}: nested deeper than the limit of 64 levels")


@pytest.mark.parametrize("text", [
    "[" * specio.MAX_DEPTH + "]" * specio.MAX_DEPTH,
    "[" * specio.MAX_DEPTH + "1" + "]" * specio.MAX_DEPTH + "\n",
    "{a: " * specio.MAX_DEPTH + "1" + "}" * specio.MAX_DEPTH + "\n",
])
def test_nesting_up_to_the_limit_is_fine(parser: str, text: str):
    specio.load_document(text, "t.yaml")
    specio.load_document(text.replace("a:", '"a":'), "t.json")


def test_the_node_limit(parser: str, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(specio, "MAX_NODES", 100)
    assert specio.load_document("[" + ", ".join(["x"] * 99) + "]").data == ["x"] * 99
    problem = problem_of("[\n" + ",\n".join(["x"] * 100) + "]")
    assert (problem.message, problem.line) == ("the document has more nodes than the limit of 100", 101)
    assert specio.load_document(json.dumps(["x"] * 99), "t.json").data == ["x"] * 99
    problem = problem_of(json.dumps(["x"] * 100), "t.json")
    assert problem.message == "the document has more nodes than the limit of 100"
    # what looks like nodes in strings is not counted, nor an empty container's nothing
    assert specio.load_document(json.dumps(["[{,:" * 100]), "t.json").data == ["[{,:" * 100]
    assert specio.load_document(json.dumps([[]] * 50 + [{}] * 49), "t.json").data == [[]] * 50 + [{}] * 49


def test_the_node_limit_counts_the_whole_stream(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(specio, "MAX_NODES", 10)
    with pytest.raises(SpecError, match="more nodes than the limit of 10"):
        specio.load_documents("--- [1, 2, 3, 4]\n--- [1, 2, 3, 4]\n--- [1, 2]\n")


def test_a_file_over_the_size_cap_is_refused_without_reading_it(tmp_path: Path):
    path = tmp_path / "huge.yaml"
    with path.open("wb") as file:
        file.truncate(1 << 40)  # sparse: a terabyte that takes no space; reading it would not end
    with pytest.raises(SpecError) as caught:
        load_spec(path)
    (problem,) = caught.value.problems
    assert str(problem) == f"{path}: the file is too large: 1,099,511,627,776 bytes, the limit is 64 MiB"
    assert_one_line_refusal(validate(path), "the file is too large")


def test_at_most_the_cap_and_one_byte_are_read(tmp_path: Path):
    # a file that says nothing of its size (a device, a pipe) is read up to the cap only
    with pytest.raises(SpecError, match="the file is too large: more than 1,000 bytes, the limit is"):
        specio.read_file("/dev/zero", limit=1000)
    path = tmp_path / "exact.yaml"
    path.write_text("a" * 1000)
    assert specio.read_file(path, limit=1000) == "a" * 1000
    with pytest.raises(SpecError, match="1,001 bytes"):
        path.write_text("a" * 1001)
        specio.read_file(path, limit=1000)


def test_unreadable_files(tmp_path: Path):
    latin1 = tmp_path / "latin1.yaml"
    latin1.write_bytes(b"a: 1\nname: caf\xe9\n")
    with pytest.raises(SpecError) as caught:
        specio.read_file(latin1)
    assert str(caught.value) == f"{latin1}:2: cannot read the file: it is not UTF-8 text"
    with pytest.raises(SpecError, match="cannot read the file: No such file or directory"):
        specio.read_file(tmp_path / "missing.yaml")


# --- JSON --------------------------------------------------------------------------------------


def test_a_json_spec_is_read_by_json(tmp_path: Path):
    path = tmp_path / "seed.json"
    path.write_text(json.dumps(seed_with(), indent=2))
    assert load_spec(path) == load_spec(SEED)
    path.write_text(json.dumps(seed_with()))  # one line
    assert load_spec(path) == load_spec(SEED)


def test_json_problems_have_lines(tmp_path: Path):
    data = seed_with()
    data["services"][0]["ports"][1]["port"] = 0
    data["services"][0]["ports"][0]["nodPort"] = 1
    del data["nodes"][1]["address"]
    text = json.dumps(data, indent=2)
    lines = text.splitlines()

    def line_of(fragment: str, after: int = 0) -> int:
        return next(i + 1 for i, line in enumerate(lines) if i >= after and fragment in line)

    path = tmp_path / "bad.json"
    path.write_text(text)
    problems = {p.path: p for p in pytest.raises(SpecError, load_spec, path).value.problems}
    assert problems["services[0].ports[0].nodPort"].line == line_of('"nodPort"')
    assert problems["services[0].ports[1].port"].line == line_of('"port": 0')
    assert problems["nodes[1].address"].line == line_of("{", line_of('"name": "node1"') - 2)  # its mapping
    assert problems["nodes[1].address"].message == "missing required field 'address'"


@pytest.mark.parametrize("text, message, line", [
    ('{"a": 1,\n "b": }', "malformed JSON: Expecting value", 2),
    ('{"a": [1,\n NaN]}', "malformed JSON: NaN is not a JSON value", 2),
    ("", "malformed JSON: Expecting value", 1),
])
def test_malformed_json(text: str, message: str, line: int):
    problem = problem_of(text, "t.json")
    assert (problem.message, problem.line) == (message, line)


def test_text_that_looks_like_json_but_is_yaml(parser: str):
    assert specio.load_document("{a: 1, b: [x, y]}").data == {"a": 1, "b": ["x", "y"]}
    assert specio.load_document("[NaN]").data == ["NaN"]
    assert "malformed YAML" in problem_of("{a: [1}\n").message


def test_a_json_text_keeps_json_meanings():
    # YAML 1.1 would make 1e3 a string and "\/" is JSON's escape of '/'
    assert specio.load_document('{"n": 1e3, "s": "a\\/b"}').data == {"n": 1000.0, "s": "a/b"}
    assert specio.load_document('\ufeff{"a": 1}', "t.json").data == {"a": 1}  # a byte order mark


def test_a_kubernetes_list_is_one_document():
    text = json.dumps({"apiVersion": "v1", "kind": "List", "items": [
        {"apiVersion": "v1", "kind": "Service", "metadata": {"name": name}} for name in ("a", "b")
    ]}, indent=4)
    (document,) = specio.load_documents(text, "objects.json")
    assert [item["metadata"]["name"] for item in document.data["items"]] == ["a", "b"]
    name_b = text.splitlines().index('                "name": "b"') + 1
    assert document.line_of("items[1].metadata.name") == name_b


# --- duplicate keys ----------------------------------------------------------------------------


def test_duplicate_keys_in_yaml(parser: str):
    text = "a:\n  b: 1\n  c: 2\n  b: 3\nlist:\n  - {x: 1, y: 2,\n     x: 3}\n"
    text += "anchored: &m {k: 1, k: 2}\nalias: *m\n"
    document = specio.load_document(text)
    assert document.data == yaml.safe_load(text)
    assert document.duplicates == [
        ("a.b", "duplicate key 'b' (first on line 2)"),
        ("list[0].x", "duplicate key 'x' (first on line 6)"),
        ("anchored.k", "duplicate key 'k' (first on line 8)"),  # once: where it is written
    ]
    assert [document.line_of(path) for path, _ in document.duplicates] == [4, 7, 8]


def test_a_merged_key_is_no_duplicate(parser: str):
    assert specio.load_document("m: &m {a: 1}\nn: {<<: *m, a: 2}\n").duplicates == []


def test_duplicate_keys_in_json():
    text = '{"a": {"b": 1,\n  "c": 2,\n  "b": 3},\n "list": [{"x": 1}, {"x": 1,\n "x": 2, "x": 3}]}'
    document = specio.load_document(text, "t.json")
    assert document.data == {"a": {"b": 3, "c": 2}, "list": [{"x": 1}, {"x": 3}]}
    assert document.duplicates == [
        ("a.b", "duplicate key 'b' (first on line 1)"),
        ("list[1].x", "duplicate key 'x' (first on line 4)"),
        ("list[1].x", "duplicate key 'x' (first on line 4)"),
    ]
    assert document.line_of("a.b") == 3 and document.line_of("list[1].x") == 5


def test_a_duplicate_key_in_a_spec_is_a_problem(tmp_path: Path):
    data = seed_with()
    twice = '"namespace": "default", "namespace": "x",'
    text = json.dumps(data, indent=2).replace('"namespace": "default",', twice)
    path = tmp_path / "dup.json"
    path.write_text(text)
    (problem,) = pytest.raises(SpecError, load_spec, path).value.problems
    line = text.splitlines().index(f"      {twice}") + 1
    message = f"duplicate key 'namespace' (first on line {line})"
    assert str(problem) == f"{path}:{line}: services[0].namespace: {message}"


# --- lines -------------------------------------------------------------------------------------


def test_line_of(parser: str):
    text = """\
metadata:
  name: x
  annotations:
    kubectl.kubernetes.io/last-applied: "{}"
    a.b: 1
    a: {b: 2}
items:
  - first
  -
    nested: [1,
      2]
"""
    document = specio.load_document(text)
    assert [document.line_of(path) for path in (
        "", "metadata", "metadata.name", "metadata.annotations.kubectl.kubernetes.io/last-applied",
        "metadata.annotations.a.b", "metadata.annotations.a", "items[1].nested[1]",
        "items[1].missing", "items[9]", "metadata.name.deeper", "nowhere",
    )] == [1, 1, 2, 4, 5, 6, 11, 10, 7, 2, 1]  # items[1]: where its mapping starts
    json_document = specio.load_document(json.dumps(yaml.safe_load(text), indent=1), "t.json")
    assert json_document.data == document.data
    assert json_document.line_of("metadata.annotations.kubectl.kubernetes.io/last-applied") == 5
    assert json_document.line_of("items[1].nested[1]") == 17


# --- streams of documents ----------------------------------------------------------------------


def test_multi_document_streams(parser: str):
    text = """\
apiVersion: v1
kind: Service
metadata: &meta {name: a}
---
# the second
apiVersion: v1
kind: Service
metadata:
  name: b
  name: c
---
---
- &meta [anchors are per document]
- *meta
"""
    documents = specio.load_documents(text, "objects.yaml")
    assert [d.data for d in documents] == list(yaml.safe_load_all(text))
    assert [d.line_of("metadata.name") for d in documents[:2]] == [3, 10]
    assert documents[1].duplicates == [("metadata.name", "duplicate key 'name' (first on line 9)")]
    assert (documents[2].data, documents[2].line_of("")) == (None, 12)  # an empty node
    assert documents[3].line_of("[1]") == 14
    assert specio.load_documents("", "empty.yaml") == []
    assert "expected a single document" in problem_of(text).message


def test_a_bad_document_in_a_stream_is_one_problem(parser: str):
    with pytest.raises(SpecError) as caught:
        specio.load_documents("a: 1\n---\nb: [\n", "objects.yaml")
    (problem,) = caught.value.problems
    assert problem.message.startswith("malformed YAML") and problem.line is not None
