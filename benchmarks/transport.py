"""Throughput and overhead of the gRPC transport on loopback, against a plain socket copy.

- Throughput of one large message each way (server -> client: a FIT carrying the payload as a
  tensor; client -> server: an UPDATE carrying it), over TLS and insecure, compared with copying
  the same bytes through a plain TCP socket between two threads. The client runs in its own
  process; both sides report their peak extra resident memory during the transfer.
- Per-round overhead with 50 connected clients (one process, 50 threads, each answering a FIT
  with a tiny UPDATE), against the in-process transport doing the same encode/decode work.

    python benchmarks/transport.py                       # 100 MB and 1 GB, 50 clients
    python benchmarks/transport.py --sizes-mb 100 --clients 20 --rounds 10
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time

import torch

from fedtune.config import load_recipe
from fedtune.transport.auth import (
    Authenticator,
    client_token,
    load_tokens,
    server_credentials,
)
from fedtune.transport.certs import make_certs
from fedtune.transport.codec import decode, encode
from fedtune.transport.grpc_client import ServerConnection
from fedtune.transport.grpc_server import GrpcServerTransport
from fedtune.transport.inprocess import InProcessTransport
from fedtune.wire import Message, MessageKind

MB = 1024**2
PAGE = os.sysconf("SC_PAGE_SIZE")


class PeakRss:
    """Samples this process's resident memory every 5 ms; `extra` is the peak above the start."""

    def __init__(self) -> None:
        self.start = self.peak = self._rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    @staticmethod
    def _rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * PAGE

    def _run(self) -> None:
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, self._rss())

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._rss())
        return self.peak - self.start


def section_for(certs: str, insecure: bool, max_bytes: int):
    transport = {"kind": "grpc", "address": "127.0.0.1:0", "insecure": insecure,
                 "tokens": f"{certs}/tokens.json", "token_file": f"{certs}/{{name}}.token",
                 "max_message_bytes": max_bytes, "round_timeout": 600}
    if not insecure:
        transport["tls"] = {"ca": f"{certs}/ca.pem", "cert": f"{certs}/server.pem",
                            "key": f"{certs}/server.key"}
    return load_recipe({"federation": {"clients": 1}, "transport": transport}).transport


def start_server(section, clients: list[str]) -> tuple[GrpcServerTransport, str]:
    auth = Authenticator(clients, load_tokens(section.tokens), mutual_tls=False)
    creds = None if section.insecure else server_credentials(section.tls, False)
    server = GrpcServerTransport(section, clients, auth, credentials=creds)
    return server, server.start()


def payload_tensor(nbytes: int) -> torch.Tensor:
    """float32, like an adapter or model (so decoding checks every value is finite)."""
    return torch.full((nbytes // 4,), 0.5)


# ------------------------------------------------------------------ the client processes


def worker_transfer(args: argparse.Namespace) -> None:
    """One client: receives payloads (measuring memory), answers with tiny or payload replies."""
    section = section_for(args.certs, args.insecure, args.max_bytes)
    token = client_token(f"{args.certs}/client_0.token", "client_0")
    conn = ServerConnection(section, "client_0", address=args.address, token=token)
    report = []
    rss = PeakRss()
    for data in conn.messages():
        report.append({"direction": "down", "bytes": len(data), "extra_rss": rss.stop(),
                       "stream_s": conn.last_receive[1]})
        msg = decode(data)
        del data
        if msg.kind == MessageKind.FINISH:
            break
        size = int(msg.meta["reply_bytes"])
        start = time.perf_counter()
        tensors = {"p": payload_tensor(size)} if size else {}
        made = time.perf_counter() - start  # making the payload is not the transport's time
        reply = encode(Message(MessageKind.UPDATE, msg.round, "client_0", "server", tensors=tensors,
                               meta={"n_examples": 1, "make_s": made}))
        del tensors, msg
        rss = PeakRss()
        conn.push(reply, timeout=600)
        if size:
            report.append({"direction": "up", "bytes": len(reply), "extra_rss": rss.stop()})
        del reply
        rss = PeakRss()
    conn.close()
    print(json.dumps(report))


def worker_fleet(args: argparse.Namespace) -> None:
    """`args.clients` clients as threads, each answering FIT with a tiny UPDATE."""
    section = section_for(args.certs, args.insecure, args.max_bytes)
    names = [f"client_{i}" for i in range(args.clients)]

    def run(name: str) -> None:
        conn = ServerConnection(section, name, address=args.address,
                                token=client_token(f"{args.certs}/{name}.token", name))
        for data in conn.messages():
            msg = decode(data)
            if msg.kind == MessageKind.FINISH:
                break
            conn.push(echo(msg, name), timeout=600)
        conn.close()

    threads = [threading.Thread(target=run, args=(n,), daemon=True) for n in names]
    for t in threads:
        t.start()
    for t in threads:
        t.join(600)


def echo(msg: Message, name: str) -> bytes:
    return encode(Message(MessageKind.UPDATE, msg.round, name, "server",
                          tensors={k: v + 1 for k, v in msg.tensors.items()}, meta={"n_examples": 1}))


def spawn(kind: str, args: argparse.Namespace, address: str, insecure: bool, **extra) -> subprocess.Popen:
    cmd = [sys.executable, __file__, "--worker", kind, "--certs", args.certs, "--address", address,
           "--max-bytes", str(args.max_bytes)]
    if insecure:
        cmd.append("--insecure")
    for key, value in extra.items():
        cmd += [f"--{key}", str(value)]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)


# ------------------------------------------------------------------ measurements


def socket_copy(nbytes: int) -> float:
    """MB/s of copying `nbytes` through a loopback TCP socket between two threads."""
    data = memoryview(bytearray(nbytes))
    sink = memoryview(bytearray(nbytes))
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]

    def receive() -> None:
        conn, _ = listener.accept()
        got = 0
        while got < nbytes:
            got += conn.recv_into(sink[got:], min(nbytes - got, 4 * MB))
        conn.close()

    thread = threading.Thread(target=receive)
    thread.start()
    start = time.perf_counter()
    with socket.create_connection(("127.0.0.1", port)) as out:
        out.sendall(data)
    thread.join()
    seconds = time.perf_counter() - start
    listener.close()
    return nbytes / MB / seconds


def transfers(args: argparse.Namespace, insecure: bool) -> list[dict]:
    section = section_for(args.certs, insecure, args.max_bytes)
    server, address = start_server(section, ["client_0"])
    client = spawn("transfer", args, address, insecure)
    rows = []
    try:
        assert server.wait_for_clients(60) == ["client_0"], "the client did not join"
        for round_, size_mb in enumerate(args.sizes_mb, 1):
            nbytes = int(size_mb * MB)
            payload = {"p": payload_tensor(nbytes)}
            rss = PeakRss()
            start = time.perf_counter()
            server.send(Message(MessageKind.FIT, round_, "server", "client_0", tensors=payload,
                                meta={"reply_bytes": 0}))
            assert server.collect(round_, ["client_0"], timeout=600), "no reply"
            down = time.perf_counter() - start
            down_rss = rss.stop()
            del payload
            rss = PeakRss()
            start = time.perf_counter()
            server.send(Message(MessageKind.FIT, round_, "server", "client_0", tensors={},
                                meta={"reply_bytes": nbytes}))
            replies = server.collect(round_, ["client_0"], timeout=600)
            up = time.perf_counter() - start - replies[0].meta["make_s"]
            up_rss = rss.stop()
            assert replies and replies[0].tensors["p"].numel() * 4 == nbytes
            del replies
            rows.append({"size_mb": size_mb, "down_s": down, "up_s": up, "up_stream_s": server.last_upload[1],
                         "server_rss_down": down_rss, "server_rss_up": up_rss})
        server.send(Message(MessageKind.FINISH, 0, "server", "client_0"))
        server.collect(0, [], timeout=60)
        out, _ = client.communicate(timeout=600)
    finally:
        server.close()
        if client.poll() is None:
            client.kill()
    report = json.loads(out.strip().splitlines()[-1])
    downs = [r for r in report if r["direction"] == "down" and r["bytes"] > MB]
    ups = [r for r in report if r["direction"] == "up"]
    for row, d, u in zip(rows, downs, ups):
        row["client_rss_down"], row["client_rss_up"] = d["extra_rss"], u["extra_rss"]
        row["down_stream_s"] = d["stream_s"]
    return rows


def rounds_overhead(args: argparse.Namespace, insecure: bool) -> dict:
    names = [f"client_{i}" for i in range(args.clients)]
    section = section_for(args.certs, insecure, args.max_bytes)
    server, address = start_server(section, names)
    fleet = spawn("fleet", args, address, insecure, clients=args.clients)
    tensors = {"w": torch.randn(16, 16)}  # a tiny update: 1 KB
    try:
        start = time.perf_counter()
        joined = server.wait_for_clients(120)
        join_s = time.perf_counter() - start
        assert len(joined) == len(names), f"{len(joined)} of {len(names)} joined"
        times = []
        for round_ in range(1, args.rounds + 1):
            start = time.perf_counter()
            for name in names:
                server.send(Message(MessageKind.FIT, round_, "server", name, tensors=tensors, meta={}))
            got = server.collect(round_, names, timeout=120)
            times.append(time.perf_counter() - start)
            assert len(got) == len(names)
        for name in names:
            server.send(Message(MessageKind.FINISH, 0, "server", name))
        server.collect(0, [], timeout=60)
        fleet.wait(timeout=120)
    finally:
        server.close()
        if fleet.poll() is None:
            fleet.kill()
    return {"join_s": join_s, "round_s": sorted(times)[len(times) // 2]}


def inprocess_round(args: argparse.Namespace) -> float:
    names = [f"client_{i}" for i in range(args.clients)]
    endpoints = {n: (lambda data, n=n: echo(decode(data), n)) for n in names}
    transport = InProcessTransport(endpoints)
    tensors = {"w": torch.randn(16, 16)}
    times = []
    for round_ in range(1, args.rounds + 1):
        start = time.perf_counter()
        for name in names:
            transport.send(Message(MessageKind.FIT, round_, "server", name, tensors=tensors, meta={}))
        assert len(transport.collect(round_, names)) == len(names)
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes-mb", type=float, nargs="+", default=[100, 1024])
    ap.add_argument("--clients", type=int, default=50)
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--worker", choices=["transfer", "fleet"], help=argparse.SUPPRESS)
    ap.add_argument("--certs", help=argparse.SUPPRESS)
    ap.add_argument("--address", help=argparse.SUPPRESS)
    ap.add_argument("--insecure", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--max-bytes", type=int, default=4 * 1024**3, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker == "transfer":
        return worker_transfer(args)
    if args.worker == "fleet":
        return worker_fleet(args)

    with tempfile.TemporaryDirectory() as certs:
        make_certs(certs, [f"client_{i}" for i in range(max(1, args.clients))])
        args.certs = certs
        print(f"# gRPC transport on loopback ({os.cpu_count()} CPU cores), chunks of 4 MiB\n")
        print("| payload | mode | socket copy MB/s | streamed down / up MB/s | ratio to socket down / up "
              "| end to end down / up MB/s | server extra RSS down / up MB | client extra RSS down / up MB |")
        print("|---:|---|---:|---:|---:|---:|---:|---:|")
        for insecure in (True, False):
            for row in transfers(args, insecure):
                mb = row["size_mb"]
                sock = socket_copy(int(mb * MB))
                sdown, sup = mb / row["down_stream_s"], mb / row["up_stream_s"]
                print(f"| {mb:.0f} MB | {'insecure' if insecure else 'TLS'} | {sock:.0f} "
                      f"| {sdown:.0f} / {sup:.0f} | {sdown / sock:.2f} / {sup / sock:.2f} "
                      f"| {mb / row['down_s']:.0f} / {mb / row['up_s']:.0f} "
                      f"| {row['server_rss_down'] / MB:.0f} / {row['server_rss_up'] / MB:.0f} "
                      f"| {row['client_rss_down'] / MB:.0f} / {row['client_rss_up'] / MB:.0f} |",
                      flush=True)
        print("\nstreamed: first to last frame at the receiver; end to end: from send() until the "
              "receiver has the decoded message (encode, stream, reassemble, decode, codec checks).")
        print(f"\n# One round with {args.clients} connected clients (tiny 1 KB updates; median of "
              f"{args.rounds} rounds)\n")
        print("| transport | join s | round ms | per client ms |")
        print("|---|---:|---:|---:|")
        local = inprocess_round(args)
        print(f"| in-process | - | {local * 1e3:.1f} | {local * 1e3 / args.clients:.2f} |")
        for insecure in (True, False):
            r = rounds_overhead(args, insecure)
            print(f"| gRPC {'insecure' if insecure else 'TLS'} | {r['join_s']:.1f} | {r['round_s'] * 1e3:.1f} "
                  f"| {r['round_s'] * 1e3 / args.clients:.2f} |", flush=True)


if __name__ == "__main__":
    main()
