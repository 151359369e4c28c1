"""The lab's traffic ends: a pod server that tells each peer what address it saw, and a
client that sends one request. Both run inside network namespaces:

    python -m bpfgen.labnet serve --tcp 80 --udp 80 --log FILE
    python -m bpfgen.labnet request tcp 172.26.50.101 30645

A TCP request is answered with one JSON line, then the server closes; requests "delay S"
(answered S seconds late), "echo" (everything after the answer is echoed until the peer
closes), "send N" and "recv N" (bulk) change that. A UDP datagram starting with "quiet"
is logged and not answered (a one-way flow).
"""

from __future__ import annotations

import argparse
import json
import socket
import socketserver
import sys
import threading
import time

GREETING = b"hello from the client\n"


def _reply(proto: str, local: tuple, peer: tuple) -> bytes:
    return (json.dumps({"proto": proto, "peer": f"{peer[0]}:{peer[1]}", "local": f"{local[0]}:{local[1]}"}) + "\n").encode()


class _Log:
    def __init__(self, path: str | None):
        self.lock = threading.Lock()
        self.file = open(path, "a", buffering=1) if path else None

    def write(self, data: bytes) -> None:
        if self.file:
            with self.lock:
                self.file.write(data.decode())


def _bulk(sock: socket.socket, first: bytes) -> None:
    """Bulk transfers for tests of large (GSO) packets: a request "send N" is answered
    with N bytes; "recv N" makes the server read N bytes and answer with the count."""
    words = first.split()
    if len(words) != 2 or words[0] not in (b"send", b"recv"):
        return
    size = int(words[1])
    if words[0] == b"send":
        chunk = b"x" * 65536
        while size > 0:
            size -= sock.send(chunk[: min(size, len(chunk))])
        return
    got = 0
    while got < size:
        data = sock.recv(1 << 20)
        if not data:
            break
        got += len(data)
    sock.sendall(b"%d\n" % got)


def _echo(sock: socket.socket) -> None:
    """A long-lived connection (request "echo"): every later read is sent back, without
    a deadline, until the peer closes."""
    sock.settimeout(None)
    while True:
        data = sock.recv(65536)
        if not data:
            return
        sock.sendall(data)


def serve(tcp_ports: list[int], udp_ports: list[int], log_path: str | None, bind: str = "0.0.0.0") -> None:
    log = _Log(log_path)

    class TcpHandler(socketserver.BaseRequestHandler):
        def handle(self) -> None:
            self.request.settimeout(10)
            try:
                first = self.request.recv(4096)
                words = first.split()
                if len(words) == 2 and words[0] == b"delay":  # answer late (a half-closed request)
                    time.sleep(float(words[1]))
                data = _reply("TCP", self.request.getsockname(), self.client_address)
                log.write(data)
                self.request.sendall(data)
                if words == [b"echo"]:
                    _echo(self.request)
                else:
                    _bulk(self.request, first)
            except OSError:
                pass

    class UdpHandler(socketserver.BaseRequestHandler):
        def handle(self) -> None:
            first, sock = self.request
            data = _reply("UDP", sock.getsockname(), self.client_address)
            log.write(data)
            if not first.startswith(b"quiet"):  # a one-way flow: logged, never answered
                sock.sendto(data, self.client_address)

    class TcpServer(socketserver.ThreadingTCPServer):
        allow_reuse_address = True
        daemon_threads = True
        request_queue_size = 1024

    servers: list[socketserver.BaseServer] = [TcpServer((bind, p), TcpHandler) for p in tcp_ports]
    servers += [socketserver.ThreadingUDPServer((bind, p), UdpHandler) for p in udp_ports]
    threads = [threading.Thread(target=s.serve_forever, daemon=True) for s in servers]
    for t in threads:
        t.start()
    print("ready", flush=True)
    for t in threads:
        t.join()


def read_line(sock: socket.socket) -> bytes:
    """One line from a stream socket; ConnectionError if it closes before the line ends."""
    data = b""
    while not data.endswith(b"\n"):
        chunk = sock.recv(4096)
        if not chunk:
            raise ConnectionError(f"closed before a whole line ({data!r})")
        data += chunk
    return data


def request(proto: str, host: str, port: int, timeout: float = 5.0) -> dict:
    """One request; returns what the server saw and where the answer came from."""
    if proto.upper() == "TCP":
        with socket.create_connection((host, port), timeout=timeout) as s:
            s.sendall(GREETING)
            data = read_line(s)
            answer_from = s.getpeername()
            local = s.getsockname()
    else:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.settimeout(timeout)
            s.connect((host, port))  # a connected UDP socket only accepts replies from host:port
            s.send(GREETING)
            data, answer_from = s.recvfrom(4096)
            local = s.getsockname()
    seen = json.loads(data)
    return {
        "proto": proto.upper(),
        "client": f"{local[0]}:{local[1]}",
        "frontend": f"{host}:{port}",
        "reply_from": f"{answer_from[0]}:{answer_from[1]}",
        "pod_saw_peer": seen["peer"],
        "pod": seen["local"],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bpfgen.labnet")
    sub = parser.add_subparsers(dest="cmd", required=True)
    p_serve = sub.add_parser("serve")
    p_serve.add_argument("--tcp", type=int, action="append", default=[])
    p_serve.add_argument("--udp", type=int, action="append", default=[])
    p_serve.add_argument("--log")
    p_serve.add_argument("--bind", default="0.0.0.0")
    p_req = sub.add_parser("request")
    p_req.add_argument("proto", choices=["tcp", "udp", "TCP", "UDP"])
    p_req.add_argument("host")
    p_req.add_argument("port", type=int)
    args = parser.parse_args(argv)
    if args.cmd == "serve":
        serve(args.tcp, args.udp, args.log, args.bind)
        return 0
    try:
        print(json.dumps(request(args.proto, args.host, args.port)))
    except (OSError, ValueError) as e:
        print(f"request failed: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
