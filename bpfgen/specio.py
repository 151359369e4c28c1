"""Reading spec and object files: size cap, YAML through libyaml, JSON, limits, lazy line map.

bpfgen runs as root and reads files others may write, so reading is bounded before anything
else looks at the data:

- a file is read only up to MAX_BYTES (its size is checked first, and at most MAX_BYTES + 1
  bytes are read whatever the file claims);
- a document nests at most MAX_DEPTH collections deep, has at most MAX_NODES nodes written in
  it and at most MAX_EXPANDED once its aliases are expanded (what pydantic, or any consumer,
  walks). Nothing here recurses along the nesting before the depth is known to be bounded.

YAML is read as libyaml's event stream (the pure-Python parser of PyYAML if libyaml is absent),
and built into data in one linear pass: every node is seen once, an alias costs its anchor's
memoised size. The result is what yaml.safe_load gives (YAML 1.1 scalars, merge keys `<<`),
except that recursive aliases and the tags !!set, !!omap and !!pairs are refused. JSON (a file
named *.json, or text that starts with `{` or `[` and parses as JSON) goes through the json
module.

The happy path keeps no line information at all: Document.line_of parses the text again the
first time it is asked (YAML: the events into a small tree of lines; JSON: only the containers
along the asked paths, each indexed once) and walks down it along the path.

    text = read_file(path)                  # SpecError: unreadable, too large, not UTF-8
    doc = load_document(text, path)         # SpecError: malformed, or over a limit
    doc.data, doc.duplicates, doc.line_of("services[0].ports[0].nodePort")
"""

from __future__ import annotations

import bisect
import gc
import json
import os
import re
import stat
from contextlib import contextmanager
from typing import Any, Callable, Iterator

import yaml
from yaml.constructor import SafeConstructor
from yaml.events import (
    AliasEvent,
    DocumentEndEvent,
    DocumentStartEvent,
    MappingEndEvent,
    MappingStartEvent,
    ScalarEvent,
    SequenceEndEvent,
    SequenceStartEvent,
)
from yaml.nodes import ScalarNode
from yaml.resolver import Resolver

from bpfgen.errors import Problem, SpecError

try:  # libyaml's parser; PyYAML's pure-Python one only where PyYAML was built without it
    from yaml import CSafeLoader as _EventSource
except ImportError:  # pragma: no cover - depends on how PyYAML was built
    from yaml import SafeLoader as _EventSource  # type: ignore[assignment]

MAX_BYTES = 64 << 20  # a file; 10,000 services with 10 backends each are 6 MB of YAML
MAX_DEPTH = 64  # nested collections; a spec nests 5 deep, Kubernetes objects rarely 20
MAX_NODES = 4_000_000  # nodes written (scalars, keys, lists, mappings); that spec has 740,719
MAX_EXPANDED = 4_000_000  # nodes once aliases are expanded (includes the written ones)

Found = list[tuple[str, str]]  # (path, message)


class Document:
    """One document read from a file: its data, its duplicate keys, the line of any path.

    data is what yaml.safe_load or json.loads would give (None for an empty document).
    duplicates are (path, message) of the keys given twice in one mapping (the last one wins,
    as in YAML and JSON). line_of(path) is the 1-based line of a path like
    services[0].ports[0].nodePort (a mapping entry's is its key's) or, if the path is not in
    the file (a missing field, a key taken from a merge), the line of its nearest ancestor that
    is; None if the document has no line (an empty one).
    """

    __slots__ = ("data", "filename", "_lines", "_index", "_duplicates", "_raw_duplicates")

    def __init__(self, data: Any, filename: str, lines: _Lines, index: int, raw_duplicates: list):
        self.data = data
        self.filename = filename
        self._lines = lines
        self._index = index
        self._raw_duplicates = raw_duplicates  # (path, key) pairs, messages made when asked
        self._duplicates: Found | None = None

    @property
    def duplicates(self) -> Found:
        if self._duplicates is None:
            self._duplicates = [
                (path, f"duplicate key '{key}' (first on line {self._lines.line_of(self._index, path, True)})")
                for path, key in self._raw_duplicates
            ]
        return self._duplicates

    def line_of(self, path: str) -> int | None:
        return self._lines.line_of(self._index, path)

    def __repr__(self) -> str:
        return f"Document({self.filename!r}, {type(self.data).__name__})"


# --- reading a file ----------------------------------------------------------------------------


def read_file(path: str | os.PathLike[str], limit: int = MAX_BYTES) -> str:
    """The text of the file at path: at most limit bytes of UTF-8. SpecError (one problem,
    naming the file) if it cannot be read, is larger than limit or is not UTF-8."""
    filename = os.fspath(path)

    def refuse(message: str, line: int | None = None) -> SpecError:
        return SpecError([Problem(filename, "", message, line)])

    try:
        with open(path, "rb") as file:
            info = os.fstat(file.fileno())
            if stat.S_ISREG(info.st_mode) and info.st_size > limit:
                raise refuse(_too_large(limit, info.st_size))
            data = file.read(limit + 1)  # a file that grows, or is not a regular one, stops here
    except OSError as err:
        raise refuse(f"cannot read the file: {err.strerror or err}") from None
    if len(data) > limit:
        raise refuse(_too_large(limit))
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise refuse("cannot read the file: it is not UTF-8 text", data.count(b"\n", 0, err.start) + 1) from None


def _too_large(limit: int, size: int | None = None, what: str = "file") -> str:
    size_text = f"{size:,} bytes" if size is not None else f"more than {limit:,} bytes"
    return f"the {what} is too large: {size_text}, the limit is {limit / (1 << 20):g} MiB"


# --- loading documents -------------------------------------------------------------------------


def load_document(text: str, filename: str = "<spec>") -> Document:
    """The one document in text (YAML or JSON); SpecError if it is malformed, over a limit, or
    a YAML stream of several documents. An empty text is one document whose data is None."""
    documents = _load(text, filename, single=True)
    return documents[0] if documents else Document(None, filename, _NO_LINES, 0, [])


def load_documents(text: str, filename: str = "<spec>") -> list[Document]:
    """The documents of a YAML stream (`---` separated; none if it is empty) or the one of a
    JSON text (a Kubernetes `v1 List` is one document: its items are in data["items"]).
    SpecError if any is malformed; the limits apply to the whole stream."""
    return _load(text, filename, single=False)


_LEADING_SPACE = re.compile(r"[ \t\r\n]*")


def _load(text: str, filename: str, single: bool) -> list[Document]:
    if len(text) > MAX_BYTES:
        raise _problem(filename, _too_large(MAX_BYTES, what="text"))
    if text.startswith("\ufeff"):
        text = text[1:]  # a byte order mark: YAML skips it, json refuses it
    is_json = filename.lower().endswith(".json")
    start = _LEADING_SPACE.match(text).end()
    if is_json or text[start : start + 1] in ("{", "["):
        document = _load_json(text, filename, strict=is_json)
        if document is not None:
            return [document]
        # not JSON after all: a YAML flow collection, or malformed (YAML says where)
    return _load_yaml(text, filename, single)


def _problem(filename: str, message: str, line: int | None = None) -> SpecError:
    return SpecError([Problem(filename, "", message, line)])


def join_path(path: str, key: object) -> str:
    """A child's path: services + 0 -> services[0], services[0] + name -> services[0].name."""
    if isinstance(key, int) and not isinstance(key, bool):
        return f"{path}[{key}]"
    return f"{path}.{key}" if path else str(key)


@contextmanager
def _no_gc() -> Iterator[None]:
    """The cyclic GC paused: building a million containers that all stay alive makes it
    traverse them again and again (it triples the time of a large document), and none of
    them can be garbage yet."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


# --- YAML --------------------------------------------------------------------------------------

_MISSING = object()
_NO_KEY = object()  # a mapping waiting for its next key


class _Merge:
    """The plain key `<<` (YAML 1.1's merge key)."""

    def __repr__(self) -> str:
        return "<<"


_MERGE = _Merge()

_STR = "tag:yaml.org,2002:str"
_SEQ = "tag:yaml.org,2002:seq"
_MAP = "tag:yaml.org,2002:map"
_SCALAR_TAGS = {  # the tags of SafeConstructor that make scalars
    f"tag:yaml.org,2002:{name}" for name in ("null", "bool", "int", "float", "binary", "timestamp", "str")
}
_RESOLVERS = Resolver.yaml_implicit_resolvers  # what yaml.SafeLoader resolves plain scalars by
_CONSTRUCTOR = SafeConstructor()


class _Bad(Exception):
    """A problem at the current event (its line is added where it is caught)."""


def _plain(value: str) -> Any:
    """A plain scalar as yaml.safe_load makes it: null, bool, int, float, timestamp or str."""
    for tag, regexp in _RESOLVERS.get(value[:1], []) + _RESOLVERS.get(None, []):
        if regexp.match(value):
            break
    else:
        return value
    if tag == "tag:yaml.org,2002:merge":
        return _MERGE
    if tag == "tag:yaml.org,2002:value":  # `=`: SafeConstructor has no constructor but for keys
        return value
    return _construct(tag, value)


def _tagged(tag: str, value: str) -> Any:
    """A scalar with an explicit tag (!!str, !!int…)."""
    if tag == "tag:yaml.org,2002:merge":
        return _MERGE
    if tag not in _SCALAR_TAGS:
        raise _Bad(f"malformed YAML: could not determine a constructor for the tag {tag!r} on a scalar")
    return _construct(tag, value)


def _construct(tag: str, value: str) -> Any:
    if tag == _STR:
        return value
    try:
        return SafeConstructor.yaml_constructors[tag](_CONSTRUCTOR, ScalarNode(tag, value))
    except (ValueError, yaml.YAMLError) as err:  # 2001-13-01, an int of 5,000 digits, bad base64
        problem = err.problem if isinstance(err, yaml.MarkedYAMLError) else err
        raise _Bad(f"cannot read the value {_short(value)} as {tag.rsplit(':', 1)[-1]}: {problem}") from None


def _short(value: str) -> str:
    return repr(value if len(value) <= 40 else value[:37] + "...")


def _kind(obj: Any) -> str:
    return "a mapping" if isinstance(obj, dict) else "a list" if isinstance(obj, list) else "a scalar"


class _Frame:
    """A collection being built."""

    __slots__ = ("obj", "is_map", "key", "start", "anchor", "merges", "line")


def _events(text: str) -> tuple[Any, Callable[[], Any]]:
    """A parser of text and its get_event (None after the last event); yaml.YAMLError."""
    parser = _EventSource(text)
    return parser, parser.get_event


def _load_yaml(text: str, filename: str, single: bool) -> list[Document]:
    try:
        roots, duplicates = _build(text, filename, single)
    except yaml.YAMLError as err:
        message, line = _describe_yaml_error(err, text)
        raise _problem(filename, f"malformed YAML: {message}", line) from None
    except UnicodeEncodeError:  # a str with lone surrogates, which no file decodes to
        raise _problem(filename, "the text is not valid Unicode") from None
    lines = _YamlLines(text)
    return [Document(root, filename, lines, i, dups) for i, (root, dups) in enumerate(zip(roots, duplicates))]


def _build(text: str, filename: str, single: bool) -> tuple[list[Any], list[list[tuple[str, str]]]]:
    """The data of each document of the YAML stream text and the duplicate keys of each, as
    (path, key); SpecError over a limit or for what yaml.safe_load would not construct,
    yaml.YAMLError if malformed. One pass over the parser's events: no recursion, and an alias
    costs its anchor's size in the expanded count, known when the anchor's node ended."""
    parser, get_event = _events(text)
    roots: list[Any] = []
    duplicates: list[list[tuple[str, str]]] = []
    stack: list[_Frame] = []
    anchors: dict[str, tuple[Any, int] | None] = {}  # None: its node is not finished yet
    cache: dict[str, Any] = {}  # plain scalar -> its value (they are immutable)
    root: Any = None
    dups: list[tuple[str, str]] = []
    nodes = expanded = 0
    event = None
    try:
        with _no_gc():
            for event in iter(get_event, None):
                cls = event.__class__
                if cls is ScalarEvent:
                    nodes += 1
                    expanded += 1
                    if expanded > MAX_EXPANDED or nodes > MAX_NODES:
                        raise _too_many(filename, nodes, event)
                    tag = event.tag
                    if tag is None or tag == "!":
                        if event.implicit[0]:
                            obj = cache.get(event.value, _MISSING)
                            if obj is _MISSING:
                                obj = cache[event.value] = _plain(event.value)
                        else:
                            obj = event.value
                    else:
                        obj = _tagged(tag, event.value)
                    if event.anchor is not None:
                        _anchor(anchors, event, (obj, 1))
                elif cls is MappingStartEvent or cls is SequenceStartEvent:
                    nodes += 1
                    expanded += 1
                    if expanded > MAX_EXPANDED or nodes > MAX_NODES:
                        raise _too_many(filename, nodes, event)
                    if len(stack) >= MAX_DEPTH:
                        line = event.start_mark.line + 1
                        raise _problem(filename, f"nested deeper than {MAX_DEPTH} levels", line)
                    frame = _Frame()
                    frame.is_map = is_map = cls is MappingStartEvent
                    tag = event.tag
                    if tag is not None and tag != "!" and tag != (_MAP if is_map else _SEQ):
                        raise _Bad(f"malformed YAML: the tag {tag!r} is not supported on {'a mapping' if is_map else 'a list'}")
                    frame.obj = {} if is_map else []
                    frame.key = _NO_KEY
                    frame.start = expanded - 1
                    frame.anchor = event.anchor
                    frame.merges = None
                    frame.line = event.start_mark.line + 1
                    if event.anchor is not None:
                        _anchor(anchors, event, None)
                    stack.append(frame)
                    continue
                elif cls is MappingEndEvent or cls is SequenceEndEvent:
                    frame = stack.pop()
                    obj = frame.obj
                    if frame.merges is not None:
                        merged: dict = {}
                        for source in frame.merges:
                            merged.update(source)
                        merged.update(obj)
                        obj = merged
                    if frame.anchor is not None:
                        anchors[frame.anchor] = (obj, expanded - frame.start)
                elif cls is AliasEvent:
                    entry = anchors.get(event.anchor, _MISSING)
                    if entry is _MISSING:
                        raise _Bad(f"malformed YAML: found undefined alias '{event.anchor}'")
                    if entry is None:
                        raise _Bad(f"alias *{event.anchor} is inside the node it refers to (a recursive structure)")
                    obj, size = entry
                    expanded += size
                    if expanded > MAX_EXPANDED:
                        line = event.start_mark.line + 1
                        message = f"its aliases expand the document to more than {MAX_EXPANDED:,} nodes"
                        raise _problem(filename, message, line)
                elif cls is DocumentStartEvent:
                    if single and roots:
                        raise _Bad("malformed YAML: expected a single document in the stream; but found another document")
                    anchors = {}  # anchors are the document's
                    root, dups = None, []
                    continue
                elif cls is DocumentEndEvent:
                    roots.append(root)
                    duplicates.append(dups)
                    continue
                else:  # the stream's start and end
                    continue

                if not stack:
                    root = "<<" if obj is _MERGE else obj
                    continue
                top = stack[-1]
                if not top.is_map:
                    top.obj.append("<<" if obj is _MERGE else obj)
                    continue
                key = top.key
                if key is _NO_KEY:
                    if type(obj) is dict or type(obj) is list:
                        raise _Bad(f"malformed YAML: found unhashable key ({_kind(obj)})")
                    top.key = obj
                    continue
                top.key = _NO_KEY
                if obj is _MERGE:
                    obj = "<<"
                if key is _MERGE:
                    if type(obj) is dict:
                        sources = [obj]
                    elif type(obj) is list and all(type(item) is dict for item in obj):
                        sources = obj[::-1]  # the first mapping listed wins
                    else:
                        kind = _kind(obj) if type(obj) is not list else "a list with other things than mappings"
                        raise _Bad(f"malformed YAML: expected a mapping or list of mappings for merging, but found {kind}")
                    if top.merges is None:
                        top.merges = []
                    top.merges += sources
                    continue
                mapping = top.obj
                if key in mapping:
                    dups.append((join_path(_path_of(stack), key), str(key)))
                mapping[key] = obj
    except _Bad as err:
        line = event.start_mark.line + 1 if event is not None and event.start_mark is not None else None
        raise _problem(filename, str(err), line) from None
    finally:
        parser.dispose()
    return roots, duplicates


def _anchor(anchors: dict, event: Any, value: Any) -> None:
    if event.anchor in anchors:
        raise _Bad(f"malformed YAML: found duplicate anchor '{event.anchor}'")
    anchors[event.anchor] = value


def _too_many(filename: str, nodes: int, event: Any) -> SpecError:
    line = event.start_mark.line + 1
    if nodes > MAX_NODES:
        return _problem(filename, f"the document has more than {MAX_NODES:,} nodes", line)
    return _problem(filename, f"its aliases expand the document to more than {MAX_EXPANDED:,} nodes", line)


def _path_of(stack: list[_Frame]) -> str:
    """The path of the collection on top of the stack (only computed for a problem)."""
    path = ""
    for parent in stack[:-1]:
        if parent.is_map:
            step = parent.key if parent.key is not _NO_KEY else "?"
        else:
            step = len(parent.obj)
        path = join_path(path, step)
    return path


def _describe_yaml_error(err: yaml.YAMLError, text: str) -> tuple[str, int | None]:
    """A YAML error as (message, line)."""
    if isinstance(err, yaml.MarkedYAMLError):
        mark = err.problem_mark or err.context_mark
        message = "; ".join(part for part in (err.context, err.problem) if part)
        return message, mark.line + 1 if mark else None
    if isinstance(err, yaml.reader.ReaderError):
        if isinstance(err.character, int):  # PyYAML's reader: a position in characters
            line = text.count("\n", 0, err.position) + 1
            return f"unacceptable character #x{err.character:04x}: {err.reason}", line
        # libyaml's: a position in bytes of the UTF-8 text
        line = text.encode("utf-8", "surrogatepass")[: err.position].count(b"\n") + 1
        return f"unacceptable character: {err.reason}", line
    return str(err), None


# --- lines, computed when asked ----------------------------------------------------------------


class _Node:
    """A collection in a line tree: keys is None for a list; lines[i] and children[i] are an
    entry's line (a mapping entry's key) and its value (a _Node, None for a scalar, or what
    the tree expands into one later); merges are what `<<` merges in (a mapping, or a list of
    them), in the order they apply: the last one wins."""

    __slots__ = ("line", "keys", "lines", "children", "merges")

    def __init__(self, line: int, is_map: bool):
        self.line = line
        self.keys: list[str | None] | None = [] if is_map else None
        self.lines: list[int] = []
        self.children: list[Any] = []
        self.merges: list[_Node] = []


_INDEX = re.compile(r"\[(\d+)\]")


class _Lines:
    """The lines of the documents of one text, found when asked."""

    def roots(self) -> list[tuple[int | None, Any]]:
        """(line, root node) of each document."""
        raise NotImplementedError

    def expand(self, child: Any) -> _Node | None:
        return child

    def line_of(self, index: int, path: str, first: bool = False) -> int | None:
        """The line of path in document index (see Document.line_of); with first, the line
        of the first of a duplicate key's entries instead of the last."""
        line, node = self.roots()[index]
        rest, top = path, True
        while rest and (node := self.expand(node)) is not None:
            if node.keys is None:
                match = _INDEX.match(rest)
                if not match or int(match[1]) >= len(node.children):
                    break
                i = int(match[1])
                rest = rest[match.end() :]
            else:
                if not top:
                    if rest[0] != ".":
                        break
                    rest = rest[1:]
                found = _find_key(node, rest, first)
                if found is None:
                    break
                node, i = found
                rest = rest[len(node.keys[i]) :]
            line, node = node.lines[i], node.children[i]
            top = False
        return line


def _find_key(mapping: _Node, rest: str, first: bool) -> tuple[_Node, int] | None:
    """(mapping, i) of the entry whose key starts the path rest (the longest such key, as keys
    may contain '.' or '['), looked up in mapping, then in what it merges, in the order of
    precedence; None if there is none."""
    stack, seen = [mapping], set()
    while stack:
        node = stack.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        if node.keys is None:  # `<<: [*a, *b]`: a wins over b
            stack.extend(child for child in reversed(node.children) if child is not None)
            continue
        best = None
        for i, key in enumerate(node.keys):
            if key is None or not rest.startswith(key):
                continue
            if len(rest) != len(key) and rest[len(key)] not in ".[":
                continue
            if best is None or len(key) > len(node.keys[best]) or (len(key) == len(node.keys[best]) and not first):
                best = i  # the longest key; of a duplicate key, the last entry (or the first)
        if best is not None:
            return node, best
        stack.extend(node.merges)  # the last one applied wins: popped first
    return None


class _NoLines(_Lines):
    def roots(self) -> list[tuple[int | None, Any]]:
        return [(None, None)]


_NO_LINES = _NoLines()


class _YamlLines(_Lines):
    """The line tree of a YAML stream, built from its events the first time it is asked (the
    stream was read once already, so it is within the limits)."""

    def __init__(self, text: str):
        self._text = text
        self._roots: list[tuple[int | None, Any]] | None = None

    def roots(self) -> list[tuple[int | None, Any]]:
        if self._roots is None:
            with _no_gc():
                self._roots = self._build()
            self._text = ""
        return self._roots

    def _build(self) -> list[tuple[int | None, Any]]:
        parser, get_event = _events(self._text)
        roots: list[tuple[int | None, Any]] = []
        stack: list[_Node] = []
        waiting: list[bool] = []  # per mapping on the stack: is its next node a key?
        anchors: dict[str, Any] = {}
        merge_next: list[bool] = []  # per mapping: is the value being read that of a `<<`?
        try:
            for event in iter(get_event, None):
                cls = event.__class__
                line = event.start_mark.line + 1
                if cls is ScalarEvent:
                    node = None
                    if event.tag is None or event.tag == "!":
                        key = _plain(event.value) if event.implicit[0] else event.value
                    else:
                        key = _tagged(event.tag, event.value)
                    if event.anchor is not None:
                        anchors[event.anchor] = (None, key)
                elif cls is MappingStartEvent or cls is SequenceStartEvent:
                    node = _Node(line, cls is MappingStartEvent)
                    if event.anchor is not None:
                        anchors[event.anchor] = (node, None)
                    if stack:
                        self._attach(stack, waiting, merge_next, line, node, None)
                    else:
                        roots[-1] = (line, node)
                    stack.append(node)
                    waiting.append(True)
                    merge_next.append(False)
                    continue
                elif cls is MappingEndEvent or cls is SequenceEndEvent:
                    stack.pop()
                    waiting.pop()
                    merge_next.pop()
                    continue
                elif cls is AliasEvent:
                    node, key = anchors[event.anchor]
                elif cls is DocumentStartEvent:
                    anchors = {}
                    roots.append((None, None))
                    continue
                else:
                    continue
                if not stack:
                    roots[-1] = (line, node)
                    continue
                self._attach(stack, waiting, merge_next, line, node, key)
        finally:
            parser.dispose()
        return roots

    @staticmethod
    def _attach(stack: list[_Node], waiting: list[bool], merge_next: list[bool], line: int,
                node: Any, key: Any) -> None:
        """Add a node (a _Node, or None for a scalar whose value is key) to the top of the stack."""
        top = stack[-1]
        if top.keys is None:
            top.lines.append(line)
            top.children.append(node)
        elif waiting[-1]:  # a key
            waiting[-1] = False
            merge_next[-1] = key is _MERGE
            if not merge_next[-1]:
                top.keys.append(None if node is not None else str(key))
                top.lines.append(line)
                top.children.append(None)
        else:  # its value
            waiting[-1] = True
            if merge_next[-1]:
                if node is not None:
                    top.merges.append(node)
            else:
                top.children[-1] = node


# --- JSON --------------------------------------------------------------------------------------

_JSON_STRING = re.compile(r'"(?:[^"\\]|\\.)*"', re.DOTALL)
_JSON_TOKEN = re.compile(r'"(?:[^"\\]|\\.)*"|[\[\]{}]|(NaN|-?Infinity)', re.DOTALL)


class _Constant(Exception):
    pass


def _reject_constant(name: str) -> Any:
    raise _Constant(name)


def _load_json(text: str, filename: str, strict: bool) -> Document | None:
    """The document of a JSON text; None if it is not JSON and not strict (then it may be
    YAML); SpecError if it is malformed (strict) or over a limit."""
    bound = 1 + sum(map(text.count, ",:[{"))  # every node but the root follows one of them
    if bound > MAX_NODES:
        bound = 1 + sum(map(_JSON_STRING.sub('""', text).count, ",:[{"))  # not those in strings
        if bound > MAX_NODES:  # (as YAML it would be as many)
            raise _problem(filename, f"the document has more than {MAX_NODES:,} nodes")
    flagged: dict[int, list[str]] = {}  # id of a dict with duplicate keys -> those keys

    def pairs(items: list[tuple[str, Any]]) -> dict:
        mapping = dict(items)
        if len(mapping) != len(items):
            seen: set[str] = set()
            flagged[id(mapping)] = [key for key, _ in items if key in seen or seen.add(key)]
        return mapping

    try:
        with _no_gc():
            data = json.loads(text, object_pairs_hook=pairs, parse_constant=_reject_constant)
    except json.JSONDecodeError as err:
        if not strict:
            return None
        raise _problem(filename, f"malformed JSON: {err.msg}", err.lineno) from None
    except RecursionError:
        raise _problem(filename, f"nested deeper than {MAX_DEPTH} levels", _json_too_deep(text)) from None
    except _Constant as err:
        if not strict:
            return None  # YAML reads NaN as a string
        line = next((_line_at(text, m.start()) for m in _JSON_TOKEN.finditer(text) if m[1]), None)
        raise _problem(filename, f"malformed JSON: {err} is not a JSON value", line) from None
    except ValueError as err:  # an int of more than 4,300 digits
        raise _problem(filename, f"malformed JSON: {err}") from None
    if not _json_depth_ok(data):
        raise _problem(filename, f"nested deeper than {MAX_DEPTH} levels", _json_too_deep(text))
    lines = _JsonLines(text)
    raw = _json_duplicates(data, flagged) if flagged else []
    return Document(data, filename, lines, 0, raw)


def _line_at(text: str, pos: int) -> int:
    return text.count("\n", 0, pos) + 1


def _json_depth_ok(data: Any) -> bool:
    """Whether data nests at most MAX_DEPTH collections deep (without recursing)."""
    if type(data) is not dict and type(data) is not list:
        return True
    stack = [(data, 1)]
    pop, push = stack.pop, stack.append
    while stack:
        obj, depth = pop()
        if depth > MAX_DEPTH:
            return False
        for child in obj.values() if type(obj) is dict else obj:
            if type(child) is dict or type(child) is list:
                push((child, depth + 1))
    return True


def _json_too_deep(text: str) -> int | None:
    """The line where a JSON text nests deeper than MAX_DEPTH."""
    depth = 0
    for match in _JSON_TOKEN.finditer(text):
        token = match[0]
        if token in "[{":
            depth += 1
            if depth > MAX_DEPTH:
                return _line_at(text, match.start())
        elif token in "]}":
            depth -= 1
    return None


def _json_duplicates(data: Any, flagged: dict[int, list[str]]) -> list[tuple[str, str]]:
    """(path, key) of the duplicate keys: where the dicts flagged while decoding are."""
    found: list[tuple[str, str]] = []
    stack = [("", data)]
    while stack:
        path, obj = stack.pop()
        if type(obj) is dict:
            for key in flagged.get(id(obj), ()):
                found.append((join_path(path, key), key))
            children = obj.items()
        elif type(obj) is list:
            children = enumerate(obj)
        else:
            continue
        stack.extend(
            (join_path(path, key), child)
            for key, child in reversed(list(children))
            if type(child) is dict or type(child) is list
        )
    return found


class _JsonLines(_Lines):
    """The lines of a JSON text: a container is indexed (its entries' positions, with the C
    scanner of json to skip over their values) only when a path goes through it."""

    _WS = re.compile(r"[ \t\n\r]*")

    def __init__(self, text: str):
        self._text = text
        self._newlines: list[int] | None = None
        self._scan = json.JSONDecoder().scan_once
        self._nodes: dict[int, _Node] = {}

    def _line(self, pos: int) -> int:
        if self._newlines is None:
            self._newlines = [m.start() for m in re.finditer("\n", self._text)]
        return bisect.bisect_left(self._newlines, pos) + 1

    def roots(self) -> list[tuple[int | None, Any]]:
        start = self._WS.match(self._text).end()
        return [(self._line(start), start if self._text[start : start + 1] in ("{", "[") else None)]

    def expand(self, child: Any) -> _Node | None:
        if child is None or isinstance(child, _Node):
            return child
        node = self._nodes.get(child)
        if node is None:
            node = self._nodes[child] = self._index(child)
        return node

    def _index(self, pos: int) -> _Node:
        text, ws, scan = self._text, self._WS, self._scan
        is_map = text[pos] == "{"
        node = _Node(self._line(pos), is_map)
        close = "}" if is_map else "]"
        pos = ws.match(text, pos + 1).end()
        while text[pos] != close:
            if is_map:
                key, end = json.decoder.scanstring(text, pos + 1)
                node.keys.append(key)
                node.lines.append(self._line(pos))
                pos = ws.match(text, ws.match(text, end).end() + 1).end()  # past the ':'
            else:
                node.lines.append(self._line(pos))
            node.children.append(pos if text[pos] in "{[" else None)
            _, end = scan(text, pos)
            pos = ws.match(text, end).end()
            if text[pos] == ",":
                pos = ws.match(text, pos + 1).end()
        return node
