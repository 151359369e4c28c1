"""The command line: a thin click layer over the bpfgen library.

Exit codes: 0 ok, 1 failure, 2 bad input or usage. Machine-readable output (-o json)
goes to stdout alone; messages go to stderr.
"""

from __future__ import annotations

import functools
import json
import sys
from pathlib import Path
from typing import Any, Callable

import click

from .errors import EXIT_FAILURE, EXIT_USAGE, BpfgenError


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
            return fn(*args, **kwargs)
        except BpfgenError as e:
            if debug and debug.debug:
                raise
            lines = e.lines()
            if len(lines) > 1 and getattr(e, "problems", None):
                # Spec problems: one line each, same prefix.
                for line in lines:
                    click.secho(f"bpfgen: {line}", fg="red", err=True)
                sys.exit(e.exit_code)
            _fail(lines, e.exit_code)
        except KeyboardInterrupt:
            _fail(["interrupted"], EXIT_FAILURE)

    return wrapper


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


@cli.command()
@click.argument("spec", type=click.Path(dir_okay=False, path_type=Path))
@handle_errors
def validate(spec: Path) -> None:
    """Check a spec file and report every problem in it."""
    from .spec import load_spec

    s = load_spec(spec)
    info(f"{spec}: ok ({len(s.nodes)} nodes, {len(s.services)} services)")


@cli.command(name="compile")
@click.argument("spec", type=click.Path(dir_okay=False, path_type=Path))
@click.option("-o", "--out", "out_dir", type=click.Path(file_okay=False, path_type=Path),
              help="Build directory (default: out/<metadata.name>/).")
@handle_errors
def compile_cmd(spec: Path, out_dir: Path | None) -> None:
    """Validate SPEC, render the datapath's C and compile one BPF object per node."""
    from .build import compile_spec

    build = compile_spec(spec, out_dir)
    for name in build.manifest["files"]:
        click.echo(str(build.dir / name))
    for node in build.nodes:
        click.echo(str(build.object_path(node)))
    info(f"compiled {build.name}: {len(build.nodes)} node object(s) in {build.dir}")


@cli.command()
@click.argument("obj", metavar="OBJECT", type=click.Path(dir_okay=False, path_type=Path))
@output_option
@handle_errors
def inspect(obj: Path, output: str) -> None:
    """List the programs, maps, license and BTF of any BPF object file."""
    from .inspect import format_text, inspect_object

    result = inspect_object(obj)
    if output == "json":
        emit_json(result.to_dict())
    else:
        click.echo(format_text(result), nl=False)


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
@node_options
@handle_errors
def load(iface: str, build_dir: Path | None, spec: Path | None, node: str | None, netns: str | None) -> None:
    """Load a node's datapath, pin its maps, fill them and attach to IFACE (tc)."""
    from .loader import load as do_load

    result = do_load(iface, build=build_dir, spec=spec, node=node, netns=netns)
    for message in result.messages:
        info(message)
    progs = ", ".join(f"{hook} {p['name']} id {p['id']}" for hook, p in result.programs.items())
    verb = "updated" if result.updated else "loaded"
    info(f"{verb} node {result.node} on {result.iface}: {progs}; maps pinned in {result.pin_dir}")


@cli.command()
@click.option("--iface", required=True, help="The interface the node is loaded on.")
@node_options
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

    rows = do_status()
    if output == "json":
        emit_json(rows)
        return
    if not rows:
        info("nothing loaded")
        return
    for r in rows:
        where = f"{r['iface']}" + (f" (netns {r['netns']})" if r["netns"] else "")
        progs = ", ".join(f"{hook}={p['name']}#{p['id']}" for hook, p in r["programs"].items())
        click.echo(f"{r['node']}: {where} spec {r['spec']} loaded {r['loaded_at']} updated {r['updated_at']}")
        click.echo(f"  programs: {progs}")
        click.echo(f"  pins: {r['pin_dir']}{'' if r['pinned'] else ' (missing!)'}")


def main() -> None:
    cli(prog_name="bpfgen")


if __name__ == "__main__":
    main()
