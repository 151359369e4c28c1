"""Reading spec and object files: size cap, YAML through libyaml, JSON, limits, lazy line map.

bpfgen runs as root and reads files others may write, so reading is bounded before anything
else looks at the data:

- a file is read only up to MAX_BYTES (its size is checked first, and at most MAX_BYTES + 1
  bytes are read whatever the file claims);
- a document nests at most MAX_DEPTH collections deep, has at most MAX_NODES nodes written in
  it and at most MAX_EXPANDED once its aliases are expanded (what pydantic, or any consumer,
  walks); the node counts are over a whole stream of documents.

Each violation is one SpecError with one Problem: the file, and the line where that is useful.

YAML is read as the event stream of libyaml's parser (PyYAML's pure-Python one if PyYAML was
built without libyaml) and built into data in one pass with a stack of its own: nothing
recurses along the nesting (PyYAML's C composer, yaml.CSafeLoader's, does, in C, with no limit
of its own: with Debian 12's python3-yaml and libyaml 0.2.5, 50,000 nested `[` are a SIGSEGV;
the libyaml of PyYAML's 6.0.4 wheels refuses more than 1,000 levels), every node is seen
once, and an alias costs its anchor's size, known when the anchor's node ended, so a billion
laughs stops at the alias that passes MAX_EXPANDED. The data is what
yaml.safe_load gives (YAML 1.1 scalars, merge keys `<<`), except that: recursive aliases and
the tags !!set, !!omap and !!pairs are refused; in `<<: [*a, *b]` the first mapping wins, as
the merge key's spec says (PyYAML 6.0.4 lets the last one win for keys of two characters or
more: yaml/pyyaml#953); `=` and `<<` as values are strings. A merge counts the whole size of
what it merges, even the keys overridden. JSON (a file named *.json, or a text that starts
with `{` or `[` and parses as JSON) goes through the json module (it recurses in C, under
the interpreter's recursion limit: a RecursionError is a problem like the others).

The happy path keeps no line information at all: Document.line_of reads the text again the
first time it is asked (YAML: its events, into flat arrays of 20 bytes an entry; JSON: only
the containers along the asked paths, each indexed once with json's C scanner) and walks down
along the path.

    text = read_file(path)                  # SpecError: unreadable, too large, not UTF-8
    doc = load_document(text, path)         # SpecError: malformed, or over a limit
    doc.data, doc.duplicates, doc.line_of("services[0].ports[0].nodePort")
    docs = load_documents(text, path)       # a YAML stream (`---`), or the one JSON document
"""

from __future__ import annotations

import bisect
import json
import os
import re
import stat
from array import array
from typing import Any, Callable

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
MAX_NODES = 2_000_000  # nodes written (scalars, keys, lists, mappings); that spec has 740,719
MAX_EXPANDED = 2_000_000  # nodes once aliases are expanded (so at least the written ones)

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

    __slots__ = ("data", "filename", "_lines", "_index", "_root_line", "_duplicates", "_raw_duplicates")

    def __init__(self, data: Any, filename: str, lines: _Lines, index: int, root_line: int | None,
                 raw_duplicates: list[tuple[str, str]]):
        self.data = data
        self.filename = filename
        self._lines = lines  # those of the whole text, built when first asked
        self._index = index  # of this document in the text
        self._root_line = root_line  # known without them
        self._raw_duplicates = raw_duplicates  # (path, key), their messages made when asked
        self._duplicates: Found | None = None

    @property
    def duplicates(self) -> Found:
        if self._duplicates is None:
            first = self._lines.line_of
            self._duplicates = [
                (path, f"duplicate key '{key}' (first on line {first(self._index, path, True)})")
                for path, key in self._raw_duplicates
            ]
        return self._duplicates

    def line_of(self, path: str) -> int | None:
        if not path:
            return self._root_line
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
        line = data.count(b"\n", 0, err.start) + 1
        raise refuse("cannot read the file: it is not UTF-8 text", line) from None


def _too_large(limit: int, size: int | None = None, what: str = "file") -> str:
    size_text = f"{size:,} bytes" if size is not None else f"more than {limit:,} bytes"
    return f"the {what} is too large: {size_text}, the limit is {limit / (1 << 20):g} MiB"


# --- loading documents -------------------------------------------------------------------------


def load_document(text: str, filename: str = "<spec>") -> Document:
    """The one document in text (YAML or JSON); SpecError if it is malformed, over a limit, or
    a YAML stream of several documents. An empty text is one document whose data is None."""
    documents = _load(text, filename, single=True)
    return documents[0] if documents else Document(None, filename, _NO_LINES, 0, None, [])


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
_CACHED = 100_000  # distinct plain scalars remembered (a spec repeats few: keys, nodes, ports)


class _Bad(Exception):
    """A problem in a YAML document: at line, or at the current event's if None."""

    def __init__(self, message: str, line: int | None = None):
        super().__init__(message)
        self.line = line


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
    except Exception as err:  # 2001-13-01, an int of 5,000 digits, !!bool maybe, bad base64
        message = f"cannot read the value {_short(value)} as {tag.rsplit(':', 1)[-1]}"
        if isinstance(err, yaml.MarkedYAMLError):
            message += f": {err.problem}"
        elif isinstance(err, ValueError) and str(err):
            message += f": {err}"
        raise _Bad(message) from None


def _short(value: str) -> str:
    return repr(value if len(value) <= 40 else value[:37] + "...")


def _kind(obj: Any) -> str:
    return "a mapping" if isinstance(obj, dict) else "a list" if isinstance(obj, list) else "a scalar"


class _Frame:
    """A collection being built."""

    __slots__ = ("obj", "is_map", "key", "start", "anchor", "merges", "line")  # line: its start


def _events(text: str) -> tuple[Any, Callable[[], Any]]:
    """A parser of text and its get_event (None after the last event); yaml.YAMLError."""
    parser = _EventSource(text)
    return parser, parser.get_event


def _load_yaml(text: str, filename: str, single: bool) -> list[Document]:
    try:
        roots, root_lines, duplicates = _build(text, filename, single)
    except yaml.YAMLError as err:
        message, line = _describe_yaml_error(err, text, in_bytes=_EventSource is not yaml.SafeLoader)
        raise _problem(filename, f"malformed YAML: {message}", line) from None
    except UnicodeEncodeError:  # a str with lone surrogates, which no file decodes to
        raise _problem(filename, "the text is not valid Unicode") from None
    lines = _YamlLines(text)
    return [
        Document(root, filename, lines, i, line, dups)
        for i, (root, line, dups) in enumerate(zip(roots, root_lines, duplicates))
    ]


def _build(
    text: str, filename: str, single: bool
) -> tuple[list[Any], list[int | None], list[list[tuple[str, str]]]]:
    """The data of each document of the YAML stream text, the line of its root and its
    duplicate keys as (path, key); SpecError over a limit or for what yaml.safe_load would
    not construct, yaml.YAMLError if malformed. One pass over the parser's events: no recursion, and an alias
    costs its anchor's size in the expanded count, known when the anchor's node ended."""
    parser, get_event = _events(text)
    roots: list[Any] = []
    root_lines: list[int | None] = []
    duplicates: list[list[tuple[str, str]]] = []
    stack: list[_Frame] = []
    anchors: dict[str, tuple[Any, int] | None] = {}  # None: its node is not finished yet
    cache: dict[str, Any] = {}  # plain scalar -> its value (they are immutable), up to a bound
    root: Any = None
    root_line: int | None = None
    dups: list[tuple[str, str]] = []
    nodes = expanded = 0
    event = None
    try:
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
                            obj = _plain(event.value)
                            if len(cache) < _CACHED:
                                cache[event.value] = obj
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
                    raise _problem(filename, f"nested deeper than the limit of {MAX_DEPTH} levels", line)
                frame = _Frame()
                frame.is_map = is_map = cls is MappingStartEvent
                tag = event.tag
                if tag is not None and tag != "!" and tag != (_MAP if is_map else _SEQ):
                    kind = "a mapping" if is_map else "a list"
                    raise _Bad(f"malformed YAML: the tag {tag!r} is not supported on {kind}")
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
                    message = f"alias *{event.anchor} is inside the node it refers to (a recursive structure)"
                    raise _Bad(message)
                obj, size = entry
                expanded += size
                if expanded > MAX_EXPANDED:
                    line = event.start_mark.line + 1
                    message = f"aliases expand the document past the limit of {MAX_EXPANDED:,} nodes"
                    raise _problem(filename, message, line)
            elif cls is DocumentStartEvent:
                if single and roots:
                    message = "expected a single document in the stream; but found another document"
                    raise _Bad(f"malformed YAML: {message}")
                anchors = {}  # anchors are the document's
                root, root_line, dups = None, None, []
                continue
            elif cls is DocumentEndEvent:
                roots.append(root)
                root_lines.append(root_line)
                duplicates.append(dups)
                continue
            else:  # the stream's start and end
                continue

            if not stack:
                root = "<<" if obj is _MERGE else obj
                ended = cls is MappingEndEvent or cls is SequenceEndEvent
                root_line = frame.line if ended else event.start_mark.line + 1
                continue
            top = stack[-1]
            if not top.is_map:
                top.obj.append("<<" if obj is _MERGE else obj)
                continue
            key = top.key
            if key is _NO_KEY:
                if type(obj) is dict or type(obj) is list:
                    raise _Bad(f"malformed YAML: found unhashable key ({_kind(obj)})", _start(cls, frame))
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
                    message = f"expected a mapping or list of mappings for merging, but found {kind}"
                    raise _Bad(f"malformed YAML: {message}", _start(cls, frame))
                if top.merges is None:
                    top.merges = []
                top.merges += sources
                continue
            mapping = top.obj
            if key in mapping:
                dups.append((join_path(_path_of(stack), key), str(key)))
            mapping[key] = obj
    except _Bad as err:
        line = err.line if err.line is not None else event.start_mark.line + 1 if event is not None else None
        raise _problem(filename, str(err), line) from None
    finally:
        parser.dispose()
    return roots, root_lines, duplicates


def _start(cls: type, frame: _Frame) -> int | None:
    """The line where the node of the event of class cls starts, if that is not the event's:
    that of a collection ended by the event."""
    return frame.line if cls is MappingEndEvent or cls is SequenceEndEvent else None


def _anchor(anchors: dict, event: Any, value: Any) -> None:
    if event.anchor in anchors:
        raise _Bad(f"malformed YAML: found duplicate anchor '{event.anchor}'")
    anchors[event.anchor] = value


def _too_many(filename: str, nodes: int, event: Any) -> SpecError:
    line = event.start_mark.line + 1
    if nodes > MAX_NODES:
        return _problem(filename, f"the document has more nodes than the limit of {MAX_NODES:,}", line)
    return _problem(filename, f"aliases expand the document past the limit of {MAX_EXPANDED:,} nodes", line)


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


def _describe_yaml_error(err: yaml.YAMLError, text: str, in_bytes: bool) -> tuple[str, int | None]:
    """A YAML error as (message, line); in_bytes: a reader error's position counts bytes of
    the UTF-8 text (libyaml), not characters (PyYAML's reader)."""
    if isinstance(err, yaml.MarkedYAMLError):
        mark = err.problem_mark or err.context_mark
        message = "; ".join(part for part in (err.context, err.problem) if part)
        return message, mark.line + 1 if mark else None
    if isinstance(err, yaml.reader.ReaderError):
        before = text.encode("utf-8", "surrogatepass")[: err.position] if in_bytes else text[: err.position]
        line = before.count(b"\n" if in_bytes else "\n") + 1
        character = f" #x{err.character:04x}" if isinstance(err.character, int) else ""
        return f"unacceptable character{character}: {err.reason}", line
    return str(err), None


# --- lines, computed when asked ----------------------------------------------------------------


class _Node:
    """A view of one collection, made when a path goes through it. keys is None for a list;
    lines[i] and children[i] are an entry's line (a mapping entry's is its key's) and its
    value (a handle that _Lines.expand makes a _Node of; None for a scalar); merges are the
    handles of what `<<` merges in (a mapping, or a list of them) in the order they apply (the
    last one wins); by_key maps a key to its (first, last) entry, made when first looked up."""

    __slots__ = ("keys", "lines", "children", "merges", "by_key")

    def __init__(self, is_map: bool):
        self.keys: list[str | None] | None = [] if is_map else None
        self.lines: list[int] = []
        self.children: list[Any] = []
        self.merges: list[Any] = []
        self.by_key: dict[str, tuple[int, int]] | None = None


_INDEX = re.compile(r"\[(\d+)\]")
_STEP_END = re.compile(r"[.\[]")


class _Lines:
    """The lines of the documents of one text, found when asked."""

    def roots(self) -> list[tuple[int | None, Any]]:
        """(line, handle of the root collection or None) of each document."""
        raise NotImplementedError

    def expand(self, handle: Any) -> _Node | None:
        """The view of a collection (None for None), made once."""
        raise NotImplementedError

    def line_of(self, index: int, path: str, first: bool = False) -> int | None:
        """The line of path in document index (see Document.line_of); with first, the line
        of the first of a duplicate key's entries instead of the last."""
        line, handle = self.roots()[index]
        rest, top = path, True
        while rest and (node := self.expand(handle)) is not None:
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
                found = _find_key(node, rest, first, self.expand)
                if found is None:
                    break
                node, i = found
                rest = rest[len(node.keys[i]) :]
            line, handle = node.lines[i], node.children[i]
            top = False
        return line


def _find_key(
    mapping: _Node, rest: str, first: bool, expand: Callable[[Any], _Node | None]
) -> tuple[_Node, int] | None:
    """(mapping, i) of the entry whose key starts the path rest (the longest such key, as keys
    may contain '.' or '['), looked up in mapping, then in what it merges, in the order of
    precedence; None if there is none."""
    ends = [match.start() for match in _STEP_END.finditer(rest, 1)][::-1]
    ends.insert(0, len(rest))  # where a key may end in rest, the longest first
    stack: list[Any] = [mapping]
    seen: set[int] = set()
    while stack:
        item = stack.pop()
        node = item if isinstance(item, _Node) else expand(item)
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        if node.keys is None:  # `<<: [*a, *b]`: a wins over b
            stack.extend(reversed(node.children))
            continue
        if node.by_key is None:
            node.by_key = {}
            for i, key in enumerate(node.keys):
                if key is not None:
                    node.by_key[key] = (node.by_key.get(key, (i, i))[0], i)
        for end in ends:
            entries = node.by_key.get(rest[:end])
            if entries is not None:
                return node, entries[0] if first else entries[1]  # a duplicate key's first or last
        stack.extend(node.merges)  # the last one applied wins: popped first
    return None


class _NoLines(_Lines):
    def roots(self) -> list[tuple[int | None, Any]]:
        return [(None, None)]

    def expand(self, handle: Any) -> _Node | None:
        return None


_NO_LINES = _NoLines()

_ITEM, _KEY, _VALUE, _MERGED = range(4)  # what the next node of a collection is


class _YamlLines(_Lines):
    """The lines of a YAML stream, read from its events again the first time they are asked
    (the stream was read once already, so it is within the limits), into flat arrays: per
    entry (a list item, or a mapping key and its value) its line, its key, the collection of
    its value and the next entry of its collection; per collection its first and last entry.
    About 20 bytes an entry (a tree of objects would take 300); a view of a collection is made
    only when a path goes through it."""

    def __init__(self, text: str):
        self._text = text
        self._roots: list[tuple[int | None, Any]] | None = None
        self._views: dict[int, _Node] = {}

    def roots(self) -> list[tuple[int | None, Any]]:
        if self._roots is None:
            self._roots = self._build()
            self._text = ""
        return self._roots

    def expand(self, handle: Any) -> _Node | None:
        if handle is None:
            return None
        node = self._views.get(handle)
        if node is None:
            node = self._views[handle] = _Node(bool(self._is_map[handle]))
            entry = self._first[handle]
            while entry >= 0:
                if node.keys is not None:
                    node.keys.append(self._key[entry])
                node.lines.append(self._line[entry])
                child = self._child[entry]
                node.children.append(child if child >= 0 else None)
                entry = self._next[entry]
            node.merges = self._merges.get(handle, [])
        return node

    def _build(self) -> list[tuple[int | None, Any]]:
        line_of, child_of, next_of, key_of = array("i"), array("i"), array("i"), []  # per entry
        first_of, last_of, is_map = array("i"), array("i"), bytearray()  # per collection
        merges: dict[int, list[int]] = {}
        keys: dict[str, str] = {}  # one copy of each key (up to a bound)
        roots: list[tuple[int | None, Any]] = []
        stack: list[list[int]] = []  # [collection, what its next node is, its entry waiting for a value]
        anchors: dict[str, tuple[int, Any]] = {}  # -> (collection or -1, and a scalar's event)
        parser, get_event = _events(self._text)
        try:
            for event in iter(get_event, None):
                cls = event.__class__
                if cls is ScalarEvent:
                    handle, scalar = -1, event
                    if event.anchor is not None:
                        anchors[event.anchor] = (-1, event)
                elif cls is MappingStartEvent or cls is SequenceStartEvent:
                    handle, scalar = len(is_map), None
                    is_map.append(cls is MappingStartEvent)
                    first_of.append(-1)
                    last_of.append(-1)
                    if event.anchor is not None:
                        anchors[event.anchor] = (handle, None)
                elif cls is MappingEndEvent or cls is SequenceEndEvent:
                    stack.pop()
                    continue
                elif cls is AliasEvent:
                    handle, scalar = anchors[event.anchor]
                elif cls is DocumentStartEvent:
                    anchors = {}
                    roots.append((None, None))
                    continue
                else:
                    continue

                if not stack:
                    roots[-1] = (event.start_mark.line + 1, handle if handle >= 0 else None)
                else:
                    top = stack[-1]
                    state = top[1]
                    if state == _VALUE:
                        child_of[top[2]] = handle
                        top[1] = _KEY
                    elif state == _MERGED:
                        if handle >= 0:
                            merges.setdefault(top[0], []).append(handle)
                        top[1] = _KEY
                    else:
                        key = None
                        if state == _KEY:
                            value = _key_of(scalar) if scalar is not None else None
                            if value is _MERGE:
                                top[1] = _MERGED
                                value = _MISSING
                            else:
                                top[1] = _VALUE
                                key = None if value is None and scalar is None else str(value)
                                if key is not None and len(keys) < 100_000:
                                    key = keys.setdefault(key, key)
                        else:
                            value = None
                        if value is not _MISSING:
                            entry = len(line_of)
                            line_of.append(event.start_mark.line + 1)
                            child_of.append(handle if state == _ITEM else -1)
                            next_of.append(-1)
                            key_of.append(key)
                            collection = top[0]
                            if last_of[collection] < 0:
                                first_of[collection] = entry
                            else:
                                next_of[last_of[collection]] = entry
                            last_of[collection] = entry
                            top[2] = entry
                if handle >= 0 and (cls is MappingStartEvent or cls is SequenceStartEvent):
                    stack.append([handle, _KEY if cls is MappingStartEvent else _ITEM, -1])
        finally:
            parser.dispose()
        self._line, self._child, self._next, self._key = line_of, child_of, next_of, key_of
        self._first, self._is_map, self._merges = first_of, is_map, merges
        return roots


def _key_of(event: Any) -> Any:
    """The value of a scalar event, as the data has it (only wanted for keys)."""
    if event.tag is None or event.tag == "!":
        return _plain(event.value) if event.implicit[0] else event.value
    return _tagged(event.tag, event.value)


# --- JSON --------------------------------------------------------------------------------------

_JSON_STRING = re.compile(r'"(?:[^"\\]|\\.)*"', re.DOTALL)
_JSON_EMPTY = re.compile(r"\[[ \t\n\r]*\]|\{[ \t\n\r]*\}")
_JSON_TOKEN = re.compile(r'"(?:[^"\\]|\\.)*"|[\[\]{}]|(NaN|-?Infinity)', re.DOTALL)


class _Constant(Exception):
    pass


def _reject_constant(name: str) -> Any:
    raise _Constant(name)


def _load_json(text: str, filename: str, strict: bool) -> Document | None:
    """The document of a JSON text; None if it is not JSON and not strict (then it may be
    YAML); SpecError if it is malformed (strict) or over a limit."""
    bound = 1 + sum(map(text.count, ",:[{"))  # every node but the root follows one of them
    if bound > MAX_NODES:  # count again without strings, and less the empty containers
        bare = _JSON_STRING.sub('""', text)
        bound = 1 + sum(map(bare.count, ",:[{")) - len(_JSON_EMPTY.findall(bare))
        if bound > MAX_NODES:
            if not strict:
                return None  # YAML counts them exactly, and says where the limit is passed
            raise _problem(filename, f"the document has more nodes than the limit of {MAX_NODES:,}")
    flagged: dict[int, list[str]] = {}  # id of a dict with duplicate keys -> those keys

    def pairs(items: list[tuple[str, Any]]) -> dict:
        mapping = dict(items)
        if len(mapping) != len(items):
            seen: set[str] = set()
            flagged[id(mapping)] = [key for key, _ in items if key in seen or seen.add(key)]
        return mapping

    try:
        data = json.loads(text, object_pairs_hook=pairs, parse_constant=_reject_constant)
    except json.JSONDecodeError as err:
        if not strict:
            return None
        raise _problem(filename, f"malformed JSON: {err.msg}", err.lineno) from None
    except RecursionError:  # json recurses in C, with the interpreter's limit (1,000 deep)
        raise _too_deep_json(filename, text) from None
    except _Constant as err:
        if not strict:
            return None  # YAML reads NaN as a string
        line = next((_line_at(text, m.start()) for m in _JSON_TOKEN.finditer(text) if m[1]), None)
        raise _problem(filename, f"malformed JSON: {err} is not a JSON value", line) from None
    except ValueError as err:  # an int of more than 4,300 digits
        raise _problem(filename, f"malformed JSON: {err}") from None
    if not _json_depth_ok(data):
        raise _too_deep_json(filename, text)
    lines = _JsonLines(text)
    raw = _json_duplicates(data, flagged) if flagged else []
    root_line = _line_at(text, _LEADING_SPACE.match(text).end())
    return Document(data, filename, lines, 0, root_line, raw)


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


def _too_deep_json(filename: str, text: str) -> SpecError:
    """The problem of a JSON text that nests deeper than MAX_DEPTH, at the line where it does."""
    depth, line = 0, None
    for match in _JSON_TOKEN.finditer(text):
        token = match[0]
        if token == "[" or token == "{":
            depth += 1
            if depth > MAX_DEPTH:
                line = _line_at(text, match.start())
                break
        elif token == "]" or token == "}":
            depth -= 1
    return _problem(filename, f"nested deeper than the limit of {MAX_DEPTH} levels", line)


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

    def expand(self, handle: Any) -> _Node | None:  # a handle is the position of a { or [
        if handle is None:
            return None
        node = self._nodes.get(handle)
        if node is None:
            node = self._nodes[handle] = self._index(handle)
        return node

    def _index(self, pos: int) -> _Node:
        text, ws, scan = self._text, self._WS, self._scan
        is_map = text[pos] == "{"
        node = _Node(is_map)
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
