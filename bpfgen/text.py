"""Every text form bpfgen prints for people: dumps, the operator's tables, object
summaries, status. The library returns data; the CLI prints it through these."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

from . import layout
from .inspect import ObjectInfo

# Keys that are an index into a table the BTF cannot name.
KEY_LABELS = {"drop_stats": layout.DROP_REASONS.label}


# ---------------------------------------------------------------- maps dump


_PAIR_NAMES = {"s": "src", "d": "dst", "": "addr"}
# A dict's keys -> its fields in compact's form: (name, key, the port's key or None)
_PAIRINGS: dict[tuple, list[tuple[str, Any, Any]]] = {}


def _pairing(keys: tuple) -> list[tuple[str, Any, Any]]:
    """How _pairs shows a dict of these keys: <p>addr and <p>port joined into one field
    named after p (worked out once per set of keys: a dump shows the same few structs
    100,000s of times)."""
    found = _PAIRINGS.get(keys)
    if found is None:
        found = []
        for k in keys:
            if not isinstance(k, str):
                found.append((k, k, None))
            elif k.endswith("port") and k[:-4] + "addr" in keys:
                continue
            elif k.endswith("addr") and k[:-4] + "port" in keys:
                prefix = k[:-4]
                found.append((_PAIR_NAMES.get(prefix, prefix.rstrip("_")), k, prefix + "port"))
            else:
                found.append((k, k, None))
        if len(_PAIRINGS) < 1024:
            _PAIRINGS[keys] = found
    return found


def _pairs(d: dict) -> dict:
    """Join <p>addr with <p>port into one "a.b.c.d:port" field named after p."""
    return {name: d[k] if port is None else f"{d[k]}:{d[port]}" for name, k, port in _pairing(tuple(d))}


def compact(value: Any) -> str:
    """A value on one line: {name=value, ...} (addresses and their ports joined), [a, b]."""
    if isinstance(value, dict):
        fields = {}  # (by name: of two fields of one name, as _pairs has it, the later is shown)
        for name, k, port in _pairing(tuple(value)):
            v = value[k]
            fields[name] = f"{v}:{value[port]}" if port is not None else (
                v if type(v) is str or type(v) is int else compact(v))
        return "{" + ", ".join([f"{k}={v}" for k, v in fields.items()]) + "}"
    if isinstance(value, list):
        return "[" + ", ".join([compact(v) for v in value]) + "]"
    return str(value)


def _sum(values: list[Any]) -> Any:
    """Per-CPU values summed field by field (what an operator wants to read)."""
    first = values[0]
    if isinstance(first, dict):
        return {k: _sum([v[k] for v in values]) for k in first}
    if isinstance(first, (int, float)) and not isinstance(first, bool):
        return sum(values)
    return first


def _is_zero(value: Any) -> bool:
    if isinstance(value, dict):
        return all(_is_zero(v) for v in value.values())
    return value == 0


def _dump_line(label: Any, e: dict) -> tuple[Any, str]:
    """An entry of a dump: its value (per-CPU values summed) and its line."""
    value = _sum([v["value"] for v in e["values"]]) if "values" in e else e["value"]
    key = label(e["key"]) if label and isinstance(e["key"], int) else compact(e["key"])
    return value, f"  {key} => {compact(value)}\n"


def format_map_dump(m: dict, entries: Iterable[dict]) -> str:
    """One map of a dump (its header m: name and type), its entries read one at a time."""
    label = KEY_LABELS.get(m["name"])
    body = []
    count = 0
    summed = ""
    for e in entries:
        count += 1
        if "values" in e:
            summed = ", per-CPU values summed"
        value, line = _dump_line(label, e)
        if m["type"].endswith("array") and _is_zero(value):
            continue  # arrays hold every index: show the ones in use
        body.append(line)
    note = "" if len(body) == count else f", {count - len(body)} zero entries not shown"
    return f"{m['name']} ({m['type']}, {count} entries{note}{summed})\n" + "".join(body)


STREAM_LINES = 1000


def stream_map_dump(d: Any) -> Iterator[str]:
    """format_map_dump of a views.MapDump, in chunks as its entries are read: an array's
    whole (it is small, and its header counts the entries whose values sum to zero, not
    shown), another map's header with the entries it holds as the dump begins, then its
    lines (a busy node's conntrack is never held whole; a live table may change meanwhile,
    so the lines may differ from the count)."""
    if d.array:
        yield format_map_dump(d.header, d.entries)
        return
    count = d.count()
    summed = ", per-CPU values summed" if d.percpu and count else ""
    yield f"{d.header['name']} ({d.header['type']}, {count} entries{summed})\n"
    label = KEY_LABELS.get(d.header["name"])
    lines = []
    for e in d.entries:
        lines.append(_dump_line(label, e)[1])
        if len(lines) == STREAM_LINES:
            yield "".join(lines)
            lines = []
    yield "".join(lines)


def format_dump(maps: list[dict]) -> str:
    return "".join(format_map_dump(m, m["entries"]) for m in maps) or "\n"


# ---------------------------------------------------------------- operator tables


def _service_policies(r: dict) -> str:
    parts = []
    if r.get("traffic_policy") == "Local":
        parts.append("Local")
    if r.get("session_affinity"):
        parts.append(f"ClientIP {r['session_affinity']['timeout_seconds']}s")
    if r.get("health_check_node_port"):
        parts.append(f"healthCheck :{r['health_check_node_port']}")
    if r.get("source_ranges") is not None:
        parts.append("from " + ",".join(r["source_ranges"]))
    return " [" + "; ".join(parts) + "]" if parts else ""


def _backend_text(b: dict) -> str:
    if not b["address"]:
        return f"{b['slot']} => (missing {b['missing']})"
    notes = [b["state"]] if b.get("state", "ready") != "ready" else []
    if not b.get("new_flows", True):
        notes.append("no new flows")
    return f"{b['slot']} => {b['address']}/{b['protocol']}" + (f" ({', '.join(notes)})" if notes else "")


def format_service_list(rows: list[dict]) -> str:
    lines = [f"{'ID':<5}{'Frontend':<27}{'Service Type':<15}Backend"]
    for r in rows:
        empty = {"reject": "(no backends: rejected)", "drop": "(no local backends: dropped)"}.get(
            r.get("no_backend") or "", "(no backends)")
        bes = [_backend_text(b) for b in r["backends"]]
        if not any(b.get("new_flows", True) for b in r["backends"]):
            bes.insert(0, empty)
        lines.append(f"{r['id']:<5}{r['frontend'] + '/' + r['protocol']:<27}{r['type']:<15}{bes[0]}"
                     f"{_service_policies(r)}")
        lines += [" " * 47 + b for b in bes[1:]]
    return "\n".join(lines) + "\n"


def format_affinity_list(rows: list[dict]) -> str:
    out = [f"{r['client']} group={r['group']} ({r['frontend'] or '-'}) => {r['backend'] or '(gone)'} "
           f"backend={r['backend_id']} " + (f"expires={r['expires_in']}s" if r["live"] else "expired")
           for r in rows]
    return "\n".join(out) + ("\n" if out else "")


def format_ct_list(rows: list[dict]) -> str:
    out = []
    for r in rows:
        extra = f" snat={r['snat']}" if r["snat"] else ""
        out.append(
            f"{r['proto']} {r['dir']} {r['src']} -> {r['dst']} expires={r['expires_in']}s "
            f"backend={r['backend_id']} rev_nat={r['rev_nat_id']} flags={','.join(r['flags']) or '-'}{extra}"
        )
    return "\n".join(out) + ("\n" if out else "")


def format_nat_list(rows: list[dict]) -> str:
    return "".join(f"{r['proto']} {r['dir']} {r['src']} -> {r['dst']} {r['xlate']} {r['to']}\n" for r in rows)


# ---------------------------------------------------------------- objects


def _table(header: list[str], rows: list[list[Any]]) -> list[str]:
    cells = [header] + [["-" if v is None else str(v) for v in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    return ["  " + "  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in cells]


def _version_string(version: int) -> str:
    return f"{version >> 16}.{(version >> 8) & 0xFF}.{version & 0xFF}"


def format_inspect(info: ObjectInfo) -> str:
    """A human-readable summary: header line, then program and map tables."""
    lines = [
        f"{info.path}: BPF object ({info.byteorder}-endian)",
        f"  license: {info.license if info.license is not None else '-'}",
        f"  BTF: {'yes' if info.btf else 'no'}, BTF.ext: {'yes' if info.btf_ext else 'no'}",
    ]
    if info.kern_version is not None:
        lines.append(f"  kernel version: {_version_string(info.kern_version)}")

    lines += ["", f"Programs ({len(info.programs)}):"]
    lines += _table(
        ["SECTION", "NAME", "INSNS", "KIND"],
        [[p.section, p.name, p.insns, "subprog" if p.subprog else "prog"] for p in info.programs],
    )
    lines += ["", f"Maps ({len(info.maps)}):"]
    lines += _table(
        ["NAME", "TYPE", "KEY", "VALUE", "MAX", "FLAGS", "PINNING", "KEY TYPE", "VALUE TYPE"],
        [
            [
                m.name + (" (internal)" if m.internal else ""),
                m.type,
                m.key_size,
                m.value_size,
                m.max_entries,
                hex(m.map_flags),
                m.pinning,
                m.key_type,
                m.value_type,
            ]
            for m in info.maps
        ],
    )
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- status


def format_status(rows: list[dict]) -> str:
    """What `bpfgen status` shows of loader.status()'s rows."""
    out: list[str] = []
    for r in rows:
        if not r["record"]:
            out.append(f"{r['node']}: pins in {r['pin_dir']}, no record: {r['note']}")
            continue
        where = f"{r['iface']}" + (f" (netns {r['netns']})" if r["netns"] else "")
        progs = ", ".join(f"{hook}={p['name']}#{p['id']}" for hook, p in r["programs"].items())
        out.append(f"{r['node']}: {where} spec {r['spec']} loaded {r['loaded_at']} updated {r['updated_at']}")
        out.append(f"  programs: {progs}")
        out.append(f"  pins: {r['pin_dir']}{'' if r['pinned'] else ' (missing!)'}")
        if r["stale"]:
            out.append("  stale: the kernel no longer has these programs (interface or namespace removed?); "
                       f"`bpfgen unload --iface {r['iface']} --node {r['node']}` clears it")
        attached = r.get("attached")
        if attached is not None:
            if "error" in attached:
                out.append(f"  attached: cannot tell ({attached['error']})")
            else:
                wrong = [hook for hook, p in r["programs"].items() if attached.get(hook) != p["id"]]
                state = "as recorded" if not wrong else "NOT as recorded: " + ", ".join(
                    f"{hook} has {attached.get(hook) or 'nothing'}" for hook in wrong)
                out.append(f"  attached (tc): {state}")
    return "\n".join(out) + "\n"
