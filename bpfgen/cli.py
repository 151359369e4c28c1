"""The command line: a thin click layer over the bpfgen library.

Exit codes: 0 ok, 1 failure, 2 bad input or usage. Machine-readable output (-o json)
goes to stdout alone; messages go to stderr.
"""

from __future__ import annotations

import contextlib
import functools
import json
import sys
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Callable

import click

from .errors import EXIT_FAILURE, BpfgenError, SpecError, unwind_on_sigterm


class Context:
    def __init__(self, debug: bool):
        self.debug = debug


def _fail(lines: list[str], code: int) -> None:
    for line in lines:
        click.secho(f"bpfgen: {line}" if line is lines[0] else f"  {line}", fg="red", err=True)
    sys.exit(code)


def handle_errors(fn: Callable) -> Callable:
    """Turn bpfgen's errors into a message and an exit code; tracebacks only with --debug."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        debug = click.get_current_context().find_object(Context)
        try:
            with _notes_to_stderr():
                return fn(*args, **kwargs)
        except BpfgenError as e:
            if debug and debug.debug:
                from .libbpf import VerifierError

                if isinstance(e, VerifierError):
                    click.echo(e.verifier_log, err=True)  # the whole log, not only its tail
                raise
            lines = e.lines() + list(getattr(e, "__notes__", []))
            if len(lines) > 1 and isinstance(e, SpecError):
                # Spec problems: one line each, same prefix.
                for line in lines:
                    click.secho(f"bpfgen: {line}", fg="red", err=True)
                sys.exit(e.exit_code)
            _fail(lines, e.exit_code)
        except OSError as e:  # a file or tool the library met on its way, not a bug
            if debug and debug.debug:
                raise
            where = f"{e.filename}: " if e.filename else ""
            _fail([f"{where}{e.strerror or e}"], EXIT_FAILURE)
        except KeyboardInterrupt:
            _fail(["interrupted"], EXIT_FAILURE)

    return wrapper


@contextlib.contextmanager
def _notes_to_stderr() -> Any:
    """Notes about a spec (bpfgen.kube.SpecNote warnings: what Kubernetes input skipped or
    decided) printed to stderr, each once however often the spec is read."""
    from .kube import SpecNote

    shown: set[str] = set()
    with warnings.catch_warnings():
        warnings.simplefilter("always", SpecNote)
        original = warnings.showwarning

        def show(message: Any, category: Any, *args: Any, **kwargs: Any) -> None:
            if not issubclass(category, SpecNote):
                original(message, category, *args, **kwargs)
            elif str(message) not in shown:
                shown.add(str(message))
                click.echo(f"bpfgen: note: {message}", err=True)

        warnings.showwarning = show
        yield


def output_option(fn: Callable) -> Callable:
    return click.option(
        "-o", "--output", type=click.Choice(["text", "json"]), default="text", show_default=True,
        help="Output format; json goes to stdout alone.",
    )(fn)


def node_options(fn: Callable) -> Callable:
    fn = click.option("--node", help="The spec node (default: the node whose address the interface carries).")(fn)
    fn = click.option("--netns", help="Network namespace (/run/netns/NAME) of the node; bpfgen enters it itself.")(fn)
    return fn


def emit_json(payload: Any) -> None:
    click.echo(json.dumps(payload, indent=2, sort_keys=False))


def info(message: str) -> None:
    click.echo(message, err=True)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--debug", is_flag=True, help="Show tracebacks and full logs on errors.")
@click.version_option(package_name="bpfgen")
@click.pass_context
def cli(ctx: click.Context, debug: bool) -> None:
    """Compile declarative NodePort/ClusterIP service specs into eBPF datapaths, load them, look inside."""
    ctx.obj = Context(debug)


def settings_option(fn: Callable) -> Callable:
    return click.option("--settings", type=click.Path(dir_okay=False, path_type=Path),
                        help="Beside Kubernetes objects: a file holding their bpfgen/v1 Settings document.")(fn)


@cli.command()
@click.argument("spec", type=click.Path(dir_okay=False, path_type=Path))
@settings_option
@handle_errors
def validate(spec: Path, settings: Path | None) -> None:
    """Check a spec file and report every problem in it."""
    from .spec import load_spec

    s = load_spec(spec, settings)
    info(f"{spec}: ok ({len(s.nodes)} nodes, {len(s.services)} services)")


@cli.command(name="compile")
@click.argument("spec", type=click.Path(dir_okay=False, path_type=Path))
@click.option("-o", "--out", "out_dir", type=click.Path(file_okay=False, path_type=Path),
              help="Build directory (default: out/<metadata.name>/).")
@settings_option
@handle_errors
def compile_cmd(spec: Path, out_dir: Path | None, settings: Path | None) -> None:
    """Validate SPEC, plan it, render the datapath's C and compile its one BPF object."""
    from .build import compile_spec

    build = compile_spec(spec, out_dir, settings=settings)
    for name in build.manifest["files"]:
        click.echo(str(build.dir / name))
    info(f"compiled {build.name}: one object for {len(build.nodes)} node(s) in {build.dir}")


@cli.command()
@click.argument("obj", metavar="OBJECT", type=click.Path(dir_okay=False, path_type=Path))
@output_option
@handle_errors
def inspect(obj: Path, output: str) -> None:
    """List the programs, maps, license and BTF of any BPF object file."""
    from .inspect import inspect_object
    from .text import format_inspect

    result = inspect_object(obj)
    if output == "json":
        emit_json(result.to_dict())
    else:
        click.echo(format_inspect(result), nl=False)


@cli.command()
def schema() -> None:
    """Print the JSON Schema of the spec format."""
    from .spec import json_schema

    click.echo(json.dumps(json_schema(), indent=2, sort_keys=True))


@cli.command()
@click.option("--iface", required=True, help="The node's interface (in --netns if given).")
@click.option("--build", "build_dir", type=click.Path(file_okay=False, path_type=Path),
              help="Build directory (default: the single build under out/).")
@click.option("--spec", type=click.Path(dir_okay=False, path_type=Path), help="Compile SPEC first and load that.")
@settings_option
@click.option("--verifier-log", type=click.Path(dir_okay=False, path_type=Path),
              help="If the verifier rejects the program, write its whole log to this file.")
@node_options
@handle_errors
def load(iface: str, build_dir: Path | None, spec: Path | None, settings: Path | None, node: str | None,
         netns: str | None, verifier_log: Path | None) -> None:
    """Load a node's datapath, pin its maps, fill them and attach to IFACE (tc)."""
    from .build import compile_spec
    from .errors import UsageError
    from .libbpf import VerifierError
    from .loader import load as do_load

    if build_dir and spec:
        raise UsageError("give --build or --spec, not both")
    if settings and not spec:
        raise UsageError("--settings goes with --spec")
    try:
        result = do_load(iface, build=(lambda: compile_spec(spec, settings=settings)) if spec else build_dir,
                         node=node, netns=netns)
    except VerifierError as e:
        if verifier_log:
            try:
                verifier_log.write_text(e.verifier_log)
                info(f"the whole verifier log is in {verifier_log}")
            except OSError as write_error:
                e.add_note(f"could not write the verifier log to {verifier_log}: {write_error.strerror}")
        raise
    for message in result.messages:
        info(message)
    progs = ", ".join(f"{hook} {p['name']} id {p['id']}" for hook, p in result.programs.items())
    entries = f"{result.written} entries written, {result.deleted} deleted"
    if result.updated:
        kept = "programs kept" if result.programs_kept else "programs replaced"
        info(f"updated node {result.node} on {result.iface}: {entries}, {kept} ({progs})")
    else:
        info(f"loaded node {result.node} on {result.iface}: {progs}; {entries}; maps pinned in {result.pin_dir}")


@cli.command()
@click.option("--iface", required=True, help="The interface the node is loaded on.")
@click.option("--node", help="The node to unload (default: the node loaded on IFACE); also clears a node "
              "whose namespace is gone.")
@click.option("--netns", help="Network namespace (/run/netns/NAME) of the node; bpfgen enters it itself.")
@handle_errors
def unload(iface: str, node: str | None, netns: str | None) -> None:
    """Detach a node's programs, remove its pins (and the clsact qdisc bpfgen made)."""
    from .loader import unload as do_unload

    r = do_unload(iface, node=node, netns=netns)
    qdisc = ", removed the clsact qdisc" if r.removed_qdisc else ""
    info(f"unloaded node {r.node} from {r.iface}: detached {', '.join(r.detached) or 'nothing'}, "
         f"removed {len(r.removed_pins)} pins{qdisc}")


@cli.command()
@output_option
@handle_errors
def status(output: str) -> None:
    """What bpfgen has loaded, per node."""
    from .loader import status as do_status
    from .text import format_status

    rows = do_status()
    if output == "json":
        emit_json(rows)
        return
    if not rows:
        info("nothing loaded")
        return
    click.echo(format_status(rows), nl=False)


def read_options(fn: Callable) -> Callable:
    fn = click.option("--node", help="The node whose state to read (default: the node of this network namespace, "
                      "or the only one loaded).")(fn)
    fn = click.option("--netns", help="Read the node loaded in network namespace NAME.")(fn)
    return output_option(fn)


def _show(rows: Any, output: str, text: Callable[[Any], str]) -> None:
    if output == "json":
        emit_json(rows)
    else:
        click.echo(text(rows), nl=False)


STREAM_CHUNK = 1000  # rows per write of a streamed table


_JSON_STR = json.encoder.encode_basestring_ascii  # (what json.dumps writes a str as: C code)
_JSON_HEADS: dict[tuple, list[str]] = {}  # (a dict's keys, its indent) -> its members' line heads


def _json_indented(value: Any, pad: str = "") -> str:
    """json.dumps(value, indent=2), byte for byte, its lines after the first indented by
    pad: at a few times the speed of json's own indenting encoder, which is pure Python
    (a dump writes 100,000s of entries of the same few shapes). Types other than JSON's
    own, and dicts whose keys are not all strings, are left to json.dumps."""
    kind = type(value)
    if kind is str:
        return _JSON_STR(value)
    if kind is int:
        return int.__repr__(value)
    if value is None or kind is bool:
        return "null" if value is None else "true" if value else "false"
    inner = pad + "  "
    if kind is dict:
        if not value:
            return "{}"
        keys = tuple(value)
        if not all(type(k) is str for k in keys):  # (before the cache: a str subclass may equal a str)
            return json.dumps(value, indent=2).replace("\n", "\n" + pad)
        heads = _JSON_HEADS.get((keys, pad))
        if heads is None:
            heads = [inner + _JSON_STR(k) + ": " for k in keys]
            if len(_JSON_HEADS) < 1024:
                _JSON_HEADS[keys, pad] = heads
        return "{\n" + ",\n".join([
            head + (_JSON_STR(v) if type(v) is str else int.__repr__(v) if type(v) is int else _json_indented(v, inner))
            for head, v in zip(heads, value.values())]) + "\n" + pad + "}"
    if kind is list or kind is tuple:
        if not value:
            return "[]"
        return "[\n" + ",\n".join([inner + _json_indented(v, inner) for v in value]) + "\n" + pad + "]"
    return json.dumps(value, indent=2).replace("\n", "\n" + pad)


def _echo_json_list(items: Iterable[Any], depth: int = 0) -> None:
    """A JSON list as emit_json writes it at nesting depth depth (no newline after),
    STREAM_CHUNK items at a time as they are read."""
    pad = "  " * (depth + 1)
    chunk: list[str] = []
    opened = False  # (its "[" written)

    def flush() -> None:
        nonlocal opened
        click.echo(("," if opened else "[") + "\n" + ",\n".join(chunk), nl=False)
        opened = True
        chunk.clear()

    for item in items:
        chunk.append(pad + _json_indented(item, pad))
        if len(chunk) == STREAM_CHUNK:
            flush()
    if chunk:
        flush()
    click.echo("\n" + "  " * depth + "]" if opened else "[]", nl=False)


def _stream(rows: Iterable[dict], output: str, text: Callable[[list[dict]], str]) -> None:
    """A table of one row per entry (text: a line each), written as it is read, so that
    a busy node's 500,000 conntrack entries are never all held: JSON as emit_json writes
    a list, the text a chunk of rows at a time."""
    if output == "json":
        _echo_json_list(rows)
        click.echo("")
        return
    chunk: list[dict] = []
    for row in rows:
        chunk.append(row)
        if len(chunk) == STREAM_CHUNK:
            click.echo(text(chunk), nl=False)
            chunk = []
    if chunk:
        click.echo(text(chunk), nl=False)


@cli.group()
def maps() -> None:
    """Read a node's pinned maps."""


@maps.command(name="dump")
@click.argument("map_name", metavar="[MAP]", required=False)
@read_options
@handle_errors
def maps_dump(map_name: str | None, node: str | None, netns: str | None, output: str) -> None:
    """Print MAP (default: every map) decoded by its BTF; JSON in bpftool's shape."""
    from .state import resolve_loaded_node
    from .text import stream_map_dump
    from .views import dump_maps

    # (each map written as its entries are read: a busy node's conntrack is never held whole)
    shown = False
    for d in dump_maps(resolve_loaded_node(node, netns), map_name):
        if output == "json":
            _stream_map_json(d, first=not shown)
        else:
            for chunk in stream_map_dump(d):
                click.echo(chunk, nl=False)
        shown = True
    if output == "json":
        click.echo("\n]" if shown else "[]")
    elif not shown:
        click.echo("")


def _stream_map_json(d: Any, first: bool) -> None:
    """One map of `maps dump -o json`, written as emit_json would write the list of maps."""
    def indented(value: Any, by: str) -> str:
        return json.dumps(value, indent=2).replace("\n", "\n" + by)

    head = ",\n".join(f"    {json.dumps(k)}: {indented(v, '    ')}" for k, v in d.header.items())
    click.echo(("[" if first else ",") + "\n  {\n" + head + ',\n    "entries": ', nl=False)
    _echo_json_list(d.entries, depth=2)
    if d.array:
        click.echo(f',\n    "zero_slots": {d.zero_slots}', nl=False)
    click.echo("\n  }", nl=False)


def _table(name: str, group_help: str, list_help: str, rows: str, text: str, stream: bool = False) -> None:
    """A `bpfgen NAME list` command: an operator's table read from a node's pinned maps
    (views.<rows> gives the rows, text.<text> their text form; stream: a row per line,
    written as they are read)."""

    @cli.group(name=name, help=group_help)
    def group() -> None:
        pass

    @group.command(name="list", help=list_help)
    @read_options
    @handle_errors
    def list_cmd(node: str | None, netns: str | None, output: str) -> None:
        from . import text as texts, views
        from .state import resolve_loaded_node

        (_stream if stream else _show)(getattr(views, rows)(resolve_loaded_node(node, netns)), output,
                                       getattr(texts, text))


_table("service", "The service table as the kernel holds it.",
       "ID, frontend, type and backends of every frontend, from the node's pinned maps.",
       "service_list", "format_service_list")
_table("ct", "Conntrack entries.",
       "The node's conntrack entries (SVC: client -> frontend; OUT: the flow as it leaves for its backend), in "
       "the kernel's order.",
       "ct_rows", "format_ct_list", stream=True)
_table("affinity", "ClientIP session affinity.",
       "The client addresses kept on a backend (group: the frontends of one service port) and the seconds left.",
       "affinity_list", "format_affinity_list")
_table("nat", "SNAT entries.", "The node's SNAT pairs (OUT: XLATE_SRC, IN: XLATE_DST), in the kernel's order.",
       "nat_rows", "format_nat_list", stream=True)


@cli.group()
def lab() -> None:
    """The spec's cluster emulated in network namespaces (nothing in the root namespace)."""


def lab_prefix(fn: Callable) -> Callable:
    return click.option("--prefix", default="bgl", show_default=True,
                        help="Prefix of the lab's namespace names.")(fn)


@lab.command(name="up")
@click.argument("spec", required=False, type=click.Path(dir_okay=False, path_type=Path))
@lab_prefix
@handle_errors
def lab_up(spec: Path | None, prefix: str) -> None:
    """Create namespaces for SPEC's nodes, pods and a client (default: examples/seed.yaml)."""
    from .lab import up

    result = up(spec, prefix)
    info(f"lab {prefix} up: client {result.client_address} in {result.client_ns}")
    for name, n in result.nodes.items():
        info(f"  node {name}: {n['address']} on {n['iface']} in {n['ns']}")
    for p in result.pods:
        ports = ", ".join([f"{x}/TCP" for x in p.tcp] + [f"{x}/UDP" for x in p.udp])
        info(f"  pod {p.address} on {p.node} in {p.ns}, serving {ports}")


@lab.command(name="down")
@lab_prefix
@handle_errors
def lab_down(prefix: str) -> None:
    """Remove everything the lab made (and unload bpfgen from its nodes)."""
    from .lab import down

    removed = down(prefix)
    info(f"lab {prefix} down: removed {', '.join(removed) or 'nothing'}")


@lab.command(name="demo")
@click.argument("spec", required=False, type=click.Path(dir_okay=False, path_type=Path))
@lab_prefix
@click.option("--keep", is_flag=True, help="Leave the lab up afterwards.")
@output_option
@handle_errors
def lab_demo(spec: Path | None, prefix: str, keep: bool, output: str) -> None:
    """Run the NodePort walk end to end in the lab and show what each step did."""
    from .lab import demo
    from .text import format_ct_list, format_nat_list, format_service_list

    report = demo(spec, prefix, keep)
    if output == "json":
        emit_json(report)
        return
    click.echo(f"compiled {report['spec']} into {report['build']}; loaded on {', '.join(report['loaded'])}\n")
    for r in report["requests"]:
        click.echo(f"{r['proto']} client {r['client']} -> {r['frontend']}: reply from {r['reply_from']}, "
                   f"pod {r['pod']} saw the peer {r['pod_saw_peer']}")
    click.echo(f"\nbpfgen service list --node {report['node']}")
    click.echo(format_service_list(report["services"]), nl=False)
    click.echo(f"\nbpfgen ct list --node {report['node']}")
    click.echo(format_ct_list(report["conntrack"]), nl=False)
    click.echo(f"\nbpfgen nat list --node {report['node']}")
    click.echo(format_nat_list(report["nat"]), nl=False)
    click.echo("\nwhat the pods saw:")
    for name, p in report["pods"].items():
        for seen in p["saw"]:
            click.echo(f"  {name} {p['address']} on {p['node']}: {seen['proto']} from {seen['peer']}")
    if report["kept"]:
        info(f"\nthe lab is still up: `bpfgen lab down --prefix {prefix}` removes it")


def main() -> None:
    unwind_on_sigterm()
    cli(prog_name="bpfgen")


if __name__ == "__main__":
    main()
