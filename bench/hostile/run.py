#!/usr/bin/env python3
"""Hostile-peer benchmark of the mjpfl coordinator: memory, descriptors, and honest progress.

Each attack runs against a fresh `mjpfl coordinator` (a small 3-round FedAvg federation on
Fashion-MNIST). While it runs, /proc/PID/status (VmRSS, VmHWM) and /proc/PID/fd are sampled every
0.2 s and two honest `mjpfl client` processes try to finish the federation. See README.md.

    python bench/hostile/run.py --mjpfl /tmp/mjpfl-before [--scenarios idle,h2-submit,...]

The `mtls-*` and `creds-*` scenarios run the coordinator as deployed: per-client credentials
(`mjpfl secrets init`), mutual TLS, own observer and Status tokens.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import fcntl
import hashlib
import os
import re
import resource
import selectors
import shutil
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
PROTO = REPO / "proto" / "federation.proto"
GRPC_CODES = {0: "OK", 1: "CANCELLED", 2: "UNKNOWN", 3: "INVALID_ARGUMENT", 4: "DEADLINE_EXCEEDED",
              5: "NOT_FOUND", 6: "ALREADY_EXISTS", 7: "PERMISSION_DENIED", 8: "RESOURCE_EXHAUSTED",
              9: "FAILED_PRECONDITION", 10: "ABORTED", 11: "OUT_OF_RANGE", 12: "UNIMPLEMENTED",
              13: "INTERNAL", 14: "UNAVAILABLE", 15: "DATA_LOSS", 16: "UNAUTHENTICATED"}
MIB = 1 << 20


def load_stubs(out: Path):
    """Generates federation_pb2(_grpc) from the .proto into `out` (as examples/python-client)."""
    import grpc_tools
    from grpc_tools import protoc

    well_known = Path(grpc_tools.__file__).parent / "_proto"
    rc = protoc.main(["grpc_tools.protoc", f"-I{PROTO.parent}", f"-I{well_known}",
                      f"--python_out={out}", f"--grpc_python_out={out}", str(PROTO)])
    if rc != 0:
        raise SystemExit(f"protoc failed on {PROTO} (exit {rc})")
    sys.path.insert(0, str(out))
    import federation_pb2
    import federation_pb2_grpc
    return federation_pb2, federation_pb2_grpc


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


CONFIG = """\
[federation]
rounds = 3
min_clients = 2
clients_per_round = 2
min_fit = 2

[model]
preset = "vit-micro-28"

[data]
dataset = "fashion-mnist"
data_dir = "{data_dir}"
test_limit = 500
round_test_limit = 500
eval_jigsaw_metrics = false

[training]
update_kind = "fedavg"
local_steps = 5
batch_size = 16

[partition]
kind = "iid"
count = 2

[server]
listen = "127.0.0.1:{port}"
"""

# Deployment mode: what `mjpfl secrets init` prints that the coordinator needs, plus the Status
# token.
DEPLOY_CONFIG = """
[server.tls]
cert = "{d}/server.pem"
key = "{d}/server.key"
client_ca = "{d}/ca.pem"

[auth]
clients_file = "{d}/clients.toml"
observer_token_file = "{d}/observer.token"
status_token_file = "{d}/status.token"
"""


def mem_available_mib() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) / 1024
    return float("inf")


class Sampler(threading.Thread):
    """Samples VmRSS, VmHWM (MiB) and the fd count of `pid` every `period` seconds."""

    def __init__(self, pid: int, abort: threading.Event, min_avail_mib: float, period=0.2):
        super().__init__(daemon=True)
        self.pid, self.abort, self.min_avail, self.period = pid, abort, min_avail_mib, period
        self.samples: list[tuple[float, float, float, int]] = []  # (t, rss, hwm, fds)
        self.stop = threading.Event()
        self.abort_reason = ""

    def sample(self):
        try:
            fields = {}
            for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
                k, _, v = line.partition(":")
                fields[k] = v
            fds = len(os.listdir(f"/proc/{self.pid}/fd"))
            rss = int(fields["VmRSS"].split()[0]) / 1024
            hwm = int(fields["VmHWM"].split()[0]) / 1024
        except (OSError, KeyError, ValueError):
            return None  # gone (or a zombie)
        s = (time.time(), rss, hwm, fds)
        self.samples.append(s)
        return s

    def run(self):
        while not self.stop.is_set():
            s = self.sample()
            avail = mem_available_mib()
            if s and avail < self.min_avail and not self.abort.is_set():
                self.abort_reason = (f"machine MemAvailable fell to {avail:.0f} MiB "
                                     f"(coordinator RSS {s[1]:.0f} MiB): attack stopped early")
                self.abort.set()
            self.stop.wait(self.period)

    def last(self):
        return self.samples[-1] if self.samples else None

    def window(self, t0, t1):
        return [s for s in self.samples if t0 <= s[0] <= t1]


class Ctx:
    """What an attack gets: the address, stubs, and hooks to start the honest clients / hold."""

    def __init__(self, args, port, pb2, pb2g, run_dir, logs, abort, secrets_dir=None):
        self.args, self.port, self.pb2, self.pb2g = args, port, pb2, pb2g
        self.target = f"127.0.0.1:{port}"
        self.run_dir, self.logs, self.abort = run_dir, logs, abort
        self.secrets = secrets_dir  # deployment mode (mutual TLS, per-client credentials)
        self.honest: list[subprocess.Popen] = []
        self.honest_t0 = None
        self.honest_exit: dict[int, float] = {}
        self.attack_t0 = None  # when the attack was in place
        self.notes: list[str] = []
        self.held: list = []  # pool identities the attacker holds (flocked files)
        self.coord: subprocess.Popen | None = None  # the coordinator under test

    def start_honest(self):
        if self.honest:
            return
        self.honest_t0 = time.time()
        if self.secrets:  # each takes the first free identity of the pool
            conn = ["--coordinator", f"https://{self.target}", "--tls-ca",
                    str(self.secrets / "ca.pem"), "--tls-domain", "localhost",
                    "--credential-pool", str(self.secrets / "clients")]
        else:
            conn = ["--coordinator", f"http://{self.target}"]
        for i in range(2):
            log = open(self.logs / f"honest-{i}.log", "w")
            p = subprocess.Popen(
                [self.args.mjpfl, "client", *conn,
                 "--data-dir", str(self.args.data_dir), "--name", f"honest-{i}"],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
            self.honest.append(p)
            threading.Thread(target=self._watch, args=(i, p), daemon=True).start()

    def _watch(self, i, p):
        p.wait()
        self.honest_exit[i] = time.time()

    def hold(self, seconds):
        end = time.time() + seconds
        while time.time() < end and not self.abort.is_set():
            time.sleep(0.1)

    async def ahold(self, seconds):
        end = time.time() + seconds
        while time.time() < end and not self.abort.is_set():
            await asyncio.sleep(0.1)

    def hold_identity(self, client_id: str) -> str:
        """Takes `client_id` out of the credential pool (the exclusive flock the pool's clients
        take on DIR/clients/<id>/lock) until the case ends; returns its credential."""
        d = self.secrets / "clients" / client_id
        f = open(d / "lock", "a")
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        self.held.append(f)
        return (d / "credential").read_text().strip()

    def channel_credentials(self, who: str | None):
        """gRPC channel credentials trusting the deployment's CA, with `who`'s certificate
        (`operator`, `clients/client-000`, ...) or none."""
        import grpc

        ca = (self.secrets / "ca.pem").read_bytes()
        if who is None:
            return grpc.ssl_channel_credentials(root_certificates=ca)
        d = self.secrets / who
        return grpc.ssl_channel_credentials(root_certificates=ca,
                                            private_key=(d / "key.pem").read_bytes(),
                                            certificate_chain=(d / "cert.pem").read_bytes())

    def aio_channel(self, who: str | None = None):
        import grpc.aio

        if not self.secrets:
            return grpc.aio.insecure_channel(self.target, options=grpc_opts())
        return grpc.aio.secure_channel(self.target, self.channel_credentials(who),
                                       options=grpc_opts() + [
                                           ("grpc.ssl_target_name_override", "localhost")])

    def status_request(self):
        tok = (self.secrets / "status.token").read_text().strip() if self.secrets else ""
        return self.pb2.StatusRequest(status_token=tok)

    def rounds_committed(self) -> int:
        f = self.run_dir / "rounds.jsonl"
        return len([line for line in f.read_text().splitlines() if line.strip()]) \
            if f.exists() else 0


def counts(c: collections.Counter) -> str:
    return ", ".join(f"{k} x{v}" for k, v in c.most_common()) or "none"


# ------------------------------------------------------------------------------------------------
# Attacks. Each returns a one-line description of what the coordinator did, seen from the attacker.
# ------------------------------------------------------------------------------------------------


def attack_none(ctx: Ctx) -> str:
    ctx.attack_t0 = time.time()
    ctx.start_honest()
    return "-"


def attack_idle(ctx: Ctx, n=2000, hold=20.0) -> str:
    """`n` raw TCP connections that never send a byte, held `hold` s. Every socket (handshaked
    or still in the backlog) is watched for the server closing it; times are seconds since the
    connects began."""
    socks, refused = [], collections.Counter()
    t_conn = time.time()
    for _ in range(n):
        s = socket.socket()
        s.setblocking(False)
        err = s.connect_ex(("127.0.0.1", ctx.port))
        if err not in (0, 115):  # 115 = EINPROGRESS
            refused[os.strerror(err)] += 1
            s.close()
            continue
        socks.append(s)
    time.sleep(3.0)  # let handshakes complete (or stall in a full backlog)

    def connected(s):
        try:
            s.getpeername()
            return True
        except OSError:
            return False

    established = [s for s in socks if connected(s)]
    est_set = set(established)
    ctx.attack_t0 = time.time()
    ctx.start_honest()
    sel = selectors.DefaultSelector()
    for s in socks:  # a socket still connecting turns readable only if it fails or is closed
        sel.register(s, selectors.EVENT_READ)
    closed, close_t = collections.Counter(), {"handshaked": [], "later": []}
    coord_exit = None  # the coordinator exits once the honest federation finished
    end = time.time() + hold
    while time.time() < end and not ctx.abort.is_set():
        if coord_exit is None and ctx.coord is not None and ctx.coord.poll() is not None:
            coord_exit = time.time() - t_conn
        for key, _ in sel.select(0.5):
            try:
                data = key.fileobj.recv(4096)
                why = "EOF" if not data else None
            except ConnectionResetError:
                why = "RST"
            except BlockingIOError:
                continue
            except OSError as e:
                why = type(e).__name__
            if why:
                closed[why] += 1
                close_t["handshaked" if key.fileobj in est_set else "later"].append(
                    time.time() - t_conn)
                sel.unregister(key.fileobj)
    late = sum(1 for s in socks if s not in est_set and connected(s))
    still = len(sel.get_map())
    for s in socks:
        s.close()
    out = (f"{len(socks)} connects: {len(established)} handshaked within 3 s "
           f"({len(socks) - len(established)} stalled in a full backlog, {late} later), "
           f"refused: {counts(refused)}; server closed in {hold:.0f} s: {counts(closed)}")

    def span(ts):
        ts = sorted(ts)
        return f"{ts[0]:.1f}-{ts[-1]:.1f} s, median {ts[len(ts) // 2]:.1f}"

    if close_t["handshaked"] or close_t["later"]:
        parts = [f"{len(ts)} {k} at {span(ts)}" for k, ts in close_t.items() if ts]
        out += " (" + "; ".join(parts) + " after the connects)"
    out += f"; still open at release: {still}"
    if coord_exit is not None:  # what stayed open was then never accepted (half-open)
        out += f" (the coordinator had exited at {coord_exit:.1f} s, its federation done)"
    return out


def tls_client_context(ctx: Ctx) -> ssl.SSLContext:
    """Trusts the deployment's CA, offers ALPN h2, and has no client certificate."""
    c = ssl.create_default_context(cafile=str(ctx.secrets / "ca.pem"))
    c.set_alpn_protocols(["h2"])
    return c


def ssl_reason(e: Exception) -> str:
    return f"{type(e).__name__} {getattr(e, 'reason', None) or e}"


def attack_h2(ctx: Ctx, path: str, size=MIB, conns=300, streams=16, hold=40.0,
              tls=False) -> str:
    """Per connection `streams` POSTs to `path`, each announcing a `size`-byte gRPC message and
    sending all but 8 bytes of it (as the flow-control window allows), never finished; held
    `hold` s. With `tls`: over TLS (the deployment's CA, ALPN h2) without a client
    certificate."""
    import h2.config
    import h2.connection
    import h2.events
    import h2.exceptions

    total = 5 + size - 8  # the prefix and all but 8 bytes of the message
    blob = b"\x00" + size.to_bytes(4, "big") + bytes(size)
    sel = selectors.DefaultSelector()
    conn_fail = collections.Counter()
    handshakes = collections.Counter()  # with tls: what the attacker's side of each handshake saw
    tls_ctx = tls_client_context(ctx) if tls else None
    states = []
    outcome: dict[tuple[int, int], tuple[str, float]] = {}
    headers = [(":method", "POST"), (":scheme", "https" if tls else "http"),
               (":authority", ctx.target),
               (":path", path), ("content-type", "application/grpc"), ("te", "trailers")]
    for i in range(conns):
        try:
            s = socket.create_connection(("127.0.0.1", ctx.port), timeout=5)
        except OSError as e:
            conn_fail[type(e).__name__] += 1
            continue
        if tls:
            try:
                s = tls_ctx.wrap_socket(s, server_hostname="localhost",
                                        do_handshake_on_connect=False)
                s.settimeout(5)
                s.do_handshake()
                handshakes[f"completed ({s.version()}, ALPN {s.selected_alpn_protocol()})"] += 1
            except (OSError, ssl.SSLError) as e:
                handshakes[f"failed: {ssl_reason(e)}"] += 1
                s.close()
                continue
        s.setblocking(False)
        c = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True,
                                                                 header_encoding="utf-8"))
        c.initiate_connection()
        st = {"i": i, "sock": s, "h2": c, "out": bytearray(), "sent": {}, "open": True,
              "pend": None}  # pend: a TLS write to retry with the same bytes
        for _ in range(streams):
            sid = c.get_next_available_stream_id()
            c.send_headers(sid, headers)
            st["sent"][sid] = 0
        st["out"] += c.data_to_send()
        states.append(st)
        sel.register(s, selectors.EVENT_READ, st)
    ctx.attack_t0 = time.time()
    ctx.start_honest()
    sent_bytes, all_sent_at = 0, None
    wire = [0]  # bytes the sockets took (with tls: what went out encrypted, records included)

    def resolve(st, sid, what):
        key = (st["i"], sid)
        if key not in outcome:
            outcome[key] = (what, time.time() - ctx.attack_t0)
        st["sent"].pop(sid, None)

    def close_conn(st, what):
        st["open"] = False
        for sid in range(1, 2 * streams, 2):  # every stream of this connection not yet resolved
            resolve(st, sid, what)
        try:
            sel.unregister(st["sock"])
        except (KeyError, ValueError):
            pass

    end = time.time() + hold
    while time.time() < end and not ctx.abort.is_set():
        busy = False
        for st in states:
            if not st["open"]:
                continue
            c = st["h2"]
            while len(st["out"]) < (256 << 10):
                progressed = False
                for sid, done in list(st["sent"].items()):
                    if done >= total:
                        continue
                    try:
                        w = min(c.local_flow_control_window(sid), c.max_outbound_frame_size,
                                total - done)
                        if w > 0:
                            c.send_data(sid, blob[done:done + w])
                            st["sent"][sid] = done + w
                            sent_bytes += w
                            progressed = True
                    except (h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError):
                        resolve(st, sid, "stream closed")
                st["out"] += c.data_to_send()
                if not progressed:
                    break
            if st["out"] or st["pend"]:
                try:
                    if tls:  # a retried SSL write must pass the same bytes
                        if st["pend"] is None:
                            st["pend"] = bytes(st["out"][:1 << 16])
                            del st["out"][:len(st["pend"])]
                        n = st["sock"].send(st["pend"])
                        st["pend"] = st["pend"][n:] or None
                    else:
                        n = st["sock"].send(st["out"])
                        del st["out"][:n]
                    wire[0] += n
                    busy = busy or n > 0
                except (BlockingIOError, ssl.SSLWantWriteError, ssl.SSLWantReadError):
                    pass
                except ssl.SSLError as e:
                    close_conn(st, f"connection closed ({ssl_reason(e)})")
                except OSError as e:
                    close_conn(st, f"connection closed ({type(e).__name__})")
        if all_sent_at is None and all(d >= total for st in states for d in st["sent"].values()
                                       ) and not any(st["out"] or st["pend"] for st in states):
            all_sent_at = time.time() - ctx.attack_t0
        for key, _ in sel.select(0 if busy else 0.05):
            st = key.data
            if not st["open"]:
                continue
            try:
                if tls:  # drain what the TLS layer has decrypted, so nothing waits unseen
                    data = b""
                    while True:
                        try:
                            chunk = st["sock"].recv(1 << 16)
                        except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
                            break
                        except ssl.SSLZeroReturnError:
                            chunk = b""
                        if not chunk:
                            if not data:
                                raise EOFError
                            break
                        data += chunk
                    if not data:
                        continue
                else:
                    data = st["sock"].recv(1 << 16)
            except EOFError:
                close_conn(st, "connection closed by server (EOF)")
                continue
            except BlockingIOError:
                continue
            except ssl.SSLError as e:
                close_conn(st, f"connection closed ({ssl_reason(e)})")
                continue
            except OSError as e:
                close_conn(st, f"connection closed ({type(e).__name__})")
                continue
            if not data:
                close_conn(st, "connection closed by server (EOF)")
                continue
            try:
                events = st["h2"].receive_data(data)
            except h2.exceptions.ProtocolError as e:
                close_conn(st, f"h2 protocol error ({type(e).__name__}: {str(e)[:80]})")
                continue
            for ev in events:
                if isinstance(ev, (h2.events.ResponseReceived, h2.events.TrailersReceived)):
                    hd = dict(ev.headers)
                    if "grpc-status" in hd:
                        code = GRPC_CODES.get(int(hd["grpc-status"]), hd["grpc-status"])
                        msg = urllib.parse.unquote(hd.get("grpc-message", ""))[:100]
                        resolve(st, ev.stream_id, f"gRPC {code}" + (f" '{msg}'" if msg else ""))
                elif isinstance(ev, h2.events.StreamReset):
                    resolve(st, ev.stream_id, f"RST_STREAM {getattr(ev.error_code, 'name', ev.error_code)}")
                elif isinstance(ev, h2.events.DataReceived):
                    st["h2"].acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
                elif isinstance(ev, h2.events.ConnectionTerminated):
                    code = getattr(ev.error_code, "name", ev.error_code)
                    close_conn(st, f"GOAWAY {code}")
            st["out"] += st["h2"].data_to_send()
    opened = len(states) * streams
    still = opened - len(outcome)
    for st in states:
        st["sock"].close()
    by = collections.defaultdict(list)
    for what, t in outcome.values():
        by[what].append(t)
    parts = [f"{w} x{len(ts)} (at {min(ts):.0f}-{max(ts):.0f} s)" for w, ts in
             sorted(by.items(), key=lambda kv: -len(kv[1]))]
    parts.append(f"open at release x{still}")
    out = (f"TLS handshakes (no client certificate): {counts(handshakes)}; " if tls else "")
    out += (f"{len(states)} conns x {streams} streams, {sent_bytes / MIB:.0f} MiB sent"
           + (f" (all by {all_sent_at:.0f} s)" if all_sent_at is not None else " (not all)")
           + (f", {wire[0] / 1024:.0f} KiB of it written to the TLS sockets" if tls else "")
           + (f", connect failures: {counts(conn_fail)}" if conn_fail else "")
           + "; streams: " + "; ".join(parts))
    return out


def grpc_opts():
    return [("grpc.use_local_subchannel_pool", 1),
            ("grpc.max_receive_message_length", 4 * MIB),
            ("grpc.max_send_message_length", MIB + (64 << 10))]


def join_req(pb2, ctx, name, secret=None):
    return pb2.JoinRequest(client_name=name, join_secret=ctx.args.secret if secret is None
                           else secret, partition_hint=-1,
                           capabilities=pb2.Capabilities(device="numpy", num_examples=1))


def attack_downloads(ctx: Ctx, n=200, hold=20.0) -> str:
    """After round 1 commits, `n` DownloadModel streams of the previous version, each read for
    one message and then left unread for `hold` s."""
    import grpc
    import grpc.aio

    pb2, pb2g = ctx.pb2, ctx.pb2g

    async def go():
        ctx.start_honest()
        main = grpc.aio.insecure_channel(ctx.target, options=grpc_opts())
        stub = pb2g.FederationStub(main)
        deadline = time.time() + 180
        while True:
            try:
                s = await stub.Status(pb2.StatusRequest(), timeout=5)
                if s.model_version >= 1:
                    break
            except grpc.aio.AioRpcError:
                pass
            if time.time() > deadline:
                return "round 1 never committed: attack not run"
            await asyncio.sleep(0.1)
        j = await stub.Join(join_req(pb2, ctx, "dl-attacker"), timeout=10)
        version = s.model_version - 1
        chans = [grpc.aio.insecure_channel(ctx.target, options=grpc_opts()) for _ in range(n)]
        calls = [pb2g.FederationStub(ch).DownloadModel(pb2.DownloadModelRequest(
            session_token=j.session_token, model_version=version)) for ch in chans]

        async def first(c):
            try:
                m = await asyncio.wait_for(c.read(), 15)
                return "ended at once" if m is grpc.aio.EOF else "first message read"
            except grpc.aio.AioRpcError as e:
                return e.code().name
            except asyncio.TimeoutError:
                return "no first message in 15 s"

        firsts = collections.Counter(await asyncio.gather(*(first(c) for c in calls)))
        ctx.attack_t0 = time.time()
        await ctx.ahold(hold)
        ended = collections.Counter()
        for c in calls:
            ended[(await c.code()).name if c.done() else "open"] += 1
        for c in calls:
            c.cancel()
        for ch in chans:
            await ch.close()
        try:  # after the hold: was the attacker's (idle) session sampled into a round?
            t = await stub.GetTask(pb2.GetTaskRequest(session_token=j.session_token), timeout=12)
            kind = t.WhichOneof("kind")
            sampled = f"round {t.train.round}" if kind == "train" else f"no ({kind})"
        except grpc.aio.AioRpcError as e:
            sampled = f"? ({e.code().name})"
        await main.close()
        return (f"v{version} after v{s.model_version} committed; first read: {counts(firsts)}; "
                f"after {hold:.0f} s unread: {counts(ended)}; attacker session sampled for "
                f"training: {sampled}")

    return asyncio.run(go())


async def poll_status(ctx: Ctx, stop: float, seen: list, errors: collections.Counter):
    """Status every second until `stop` (deployment mode: the operator's certificate and the
    Status token); appends connected_clients to `seen`."""
    import grpc.aio

    ch = ctx.aio_channel("operator")
    stub = ctx.pb2g.FederationStub(ch)
    while time.time() < stop and not ctx.abort.is_set():
        try:
            r = await stub.Status(ctx.status_request(), timeout=5)
            seen.append(r.connected_clients)
        except grpc.aio.AioRpcError as e:
            errors[e.code().name] += 1
        await asyncio.sleep(1.0)
    await ch.close()


def seen_clients(seen: list, errors: collections.Counter) -> str:
    if not seen:
        return f"connected_clients from Status: no answer ({counts(errors)})"
    out = f"connected_clients from Status: {seen[-1]}" + (
        f" at the end (min {min(seen)}, max {max(seen)} over {len(seen)} polls, 1/s)"
        if len(seen) > 1 else " after")
    return out + (f", Status errors: {counts(errors)}" if errors else "")


def attack_sybils(ctx: Ctx, n=500, hold=60.0, nchan=40, pooled: str | None = None) -> str:
    """`n` Joins with the shared secret, each then polling GetTask (never submitting) `hold` s.
    With `pooled` (deployment mode): all with that one client's credential, over mutual TLS with
    its certificate, the identity held out of the pool the honest clients take theirs from."""
    import grpc
    import grpc.aio

    pb2, pb2g = ctx.pb2, ctx.pb2g
    secret = ctx.hold_identity(pooled) if pooled else None

    async def go():
        chans = [ctx.aio_channel(f"clients/{pooled}" if pooled else None) for _ in range(nchan)]
        stubs = [pb2g.FederationStub(ch) for ch in chans]

        async def join(i):
            try:
                r = await stubs[i % nchan].Join(join_req(pb2, ctx, f"sybil-{i}", secret),
                                                timeout=30)
                return r.session_token, "OK"
            except grpc.aio.AioRpcError as e:
                return None, e.code().name

        joined = await asyncio.gather(*(join(i) for i in range(n)))
        join_codes = collections.Counter(code for _, code in joined)
        ctx.attack_t0 = time.time()
        ctx.start_honest()
        stop = time.time() + hold
        tasks, trained = collections.Counter(), set()
        seen, status_err = [], collections.Counter()
        status = asyncio.ensure_future(poll_status(ctx, stop, seen, status_err)) if pooled \
            else None

        async def poll(i, tok):
            while time.time() < stop and not ctx.abort.is_set():
                try:
                    t = await stubs[i % nchan].GetTask(pb2.GetTaskRequest(session_token=tok),
                                                       timeout=max(1.0, min(15.0, stop - time.time())))
                    kind = t.WhichOneof("kind")
                    tasks[kind] += 1
                    if kind == "finished":
                        return
                    if kind == "train":
                        trained.add(i)
                    await asyncio.sleep(t.wait.retry_after_ms / 1000 if kind == "wait" else 0.25)
                except grpc.aio.AioRpcError as e:
                    if time.time() < stop - 0.5:
                        tasks[e.code().name] += 1
                        await asyncio.sleep(1.0)

        await asyncio.gather(*(poll(i, tok) for i, (tok, _) in enumerate(joined) if tok))
        if status:
            await status
        for ch in chans:
            await ch.close()
        out = (f"Join: {counts(join_codes)}; GetTask over {hold:.0f} s: {counts(tasks)}; "
               f"{len(trained)} sybils were handed a training task; rounds committed during the "
               f"hold: {ctx.rounds_committed()}")
        return out + (f"; {seen_clients(seen, status_err)}" if pooled else "")

    return asyncio.run(go())


def forged_credentials(ctx: Ctx, n: int, real: str) -> list[tuple[str, str]]:
    """`n` (kind, credential) pairs, none valid, cycling through kinds of forgery. `real` is
    client-000's credential (the attacker's own, held out of the pool)."""
    real_id, _, real_secret = real.partition(":")
    other = (ctx.secrets / "clients" / "client-001" / "credential").read_text().strip()
    other_id, _, other_secret = other.partition(":")

    def rnd(k=32):
        return os.urandom(k).hex()

    kinds = [
        ("unknown id", lambda i: f"client-9{i:04d}:{rnd()}"),
        ("own id, wrong secret", lambda i: f"{real_id}:{rnd()}"),
        ("honest client's id, wrong secret", lambda i: f"{other_id}:{rnd()}"),
        ("honest client's id, own secret", lambda i: f"{other_id}:{real_secret}"),
        ("own secret, no id", lambda i: real_secret),
        ("honest client's secret flipped", lambda i: f"{other_id}:{other_secret[:-1]}"
                                                     f"{'0' if other_secret[-1] != '0' else '1'}"),
        ("shared secret 'mjpfl'", lambda i: ctx.args.secret),
        ("empty", lambda i: ""),
        ("4 KiB junk", lambda i: f"{real_id}:" + "A" * 4096),
    ]
    return [(kinds[i % len(kinds)][0], kinds[i % len(kinds)][1](i)) for i in range(n)]


def attack_creds_wrong(ctx: Ctx, n=2000, nchan=40, parallel=200) -> str:
    """`n` Joins with forged credentials over mutual TLS (client-000's certificate, held out of
    the pool), at most `parallel` in flight, fired once both honest clients have joined."""
    import grpc.aio

    pb2, pb2g = ctx.pb2, ctx.pb2g
    real = ctx.hold_identity("client-000")
    forged = forged_credentials(ctx, n, real)

    async def go():
        chans = [ctx.aio_channel("clients/client-000") for _ in range(nchan)]
        stubs = [pb2g.FederationStub(ch) for ch in chans]
        gate = asyncio.Semaphore(parallel)
        by_kind = collections.defaultdict(collections.Counter)
        msgs = collections.Counter()

        async def join(i, kind, cred):
            async with gate:
                try:
                    await stubs[i % nchan].Join(join_req(pb2, ctx, f"forger-{i}", cred),
                                                timeout=30)
                    by_kind[kind]["OK"] += 1
                except grpc.aio.AioRpcError as e:
                    by_kind[kind][e.code().name] += 1
                    msgs[(e.details() or "")[:90]] += 1

        ctx.start_honest()
        seen0 = []
        op = ctx.aio_channel("operator")
        wait_end = time.time() + 60
        while time.time() < wait_end and not (seen0 and seen0[-1] >= 2):
            try:
                r = await pb2g.FederationStub(op).Status(ctx.status_request(), timeout=5)
                seen0.append(r.connected_clients)
            except grpc.aio.AioRpcError:
                pass
            await asyncio.sleep(0.05)
        await op.close()
        ctx.attack_t0 = time.time()
        await asyncio.gather(*(join(i, k, c) for i, (k, c) in enumerate(forged)))
        took = time.time() - ctx.attack_t0
        seen, err = [], collections.Counter()
        await poll_status(ctx, time.time() + 0.5, seen, err)
        for ch in chans:
            await ch.close()
        total = collections.Counter()
        for c in by_kind.values():
            total.update(c)
        odd = [f"{k}: {counts(c)}" for k, c in by_kind.items()
               if set(c) != {"UNAUTHENTICATED"}]
        out = (f"{n} Joins ({len(by_kind)} kinds of forgery) in {took:.1f} s, from "
               f"{seen0[-1] if seen0 else '?'} honest clients joined (round "
               f"{ctx.rounds_committed() + 1}): {counts(total)}"
               + (f"; not refused as UNAUTHENTICATED: {'; '.join(odd)}" if odd else
                  "; every kind UNAUTHENTICATED")
               + f"; messages: " + "; ".join(f"'{m}' x{c}" for m, c in msgs.most_common(2))
               + f"; {seen_clients(seen, err)}")
        return out

    return asyncio.run(go())


ATTACKS = {
    "baseline": ("baseline (no attack)", attack_none),
    "idle": ("2000 idle TCP connections, 20 s", attack_idle),
    "h2-submit": ("300x16 unfinished 1 MiB SubmitUpdate messages, no credentials, 40 s",
                  lambda ctx: attack_h2(ctx, "/mjpfl.v1.Federation/SubmitUpdate")),
    "h2-join": ("300x16 unfinished 1 MiB Join messages, no credentials, 40 s",
                lambda ctx: attack_h2(ctx, "/mjpfl.v1.Federation/Join")),
    "h2-submit-256k": ("300x16 unfinished SubmitUpdate messages of 256 KiB (the header cap), "
                       "no credentials, 40 s",
                       lambda ctx: attack_h2(ctx, "/mjpfl.v1.Federation/SubmitUpdate", 256 << 10)),
    "h2-join-64k": ("300x16 unfinished Join messages of 64 KiB (the small-call cap), "
                    "no credentials, 40 s",
                    lambda ctx: attack_h2(ctx, "/mjpfl.v1.Federation/Join", 64 << 10)),
    "downloads": ("200 abandoned DownloadModel streams of an old version, 20 s", attack_downloads),
    "sybils": ("500 sybil Joins polling GetTask, never submitting, 60 s", attack_sybils),
    # Deployment mode (DEPLOY): per-client credentials, mutual TLS, own Status/observer tokens.
    "mtls-baseline": ("mTLS: baseline (no attack)", attack_none),
    "mtls-h2-submit-256k": ("mTLS: 300x16 unfinished SubmitUpdate messages of 256 KiB over TLS "
                            "without a client certificate, 40 s",
                            lambda ctx: attack_h2(ctx, "/mjpfl.v1.Federation/SubmitUpdate",
                                                  256 << 10, tls=True)),
    "mtls-idle-tcp": ("mTLS: 2000 idle TCP connections, 20 s", attack_idle),
    "creds-sybils": ("mTLS: 500 sybil Joins with ONE valid credential (client-000, its "
                     "certificate), polling GetTask, 60 s",
                     lambda ctx: attack_sybils(ctx, pooled="client-000")),
    "creds-wrong": ("mTLS: 2000 Joins with forged credentials (client-000's certificate)",
                    attack_creds_wrong),
}
DEPLOY = {k for k in ATTACKS if k.startswith(("mtls-", "creds-"))}


# ------------------------------------------------------------------------------------------------


def run_case(key, args, pb2, pb2g, nofile_soft):
    title, attack = ATTACKS[key]
    work = Path(tempfile.mkdtemp(prefix=f"hostile-{key}-", dir=args.work_dir))
    port = free_port()
    config = work / "coordinator.toml"
    text = CONFIG.format(data_dir=args.data_dir, port=port)
    secrets_dir = None
    if key in DEPLOY:  # 3 identities: client-000 for the attacker's use, 2 for the honest
        secrets_dir = work / "secrets"
        r = subprocess.run([args.mjpfl, "secrets", "init", "--dir", str(secrets_dir),
                            "--clients", "3", "--server-name", "localhost", "--server-name",
                            "127.0.0.1"], capture_output=True, text=True)
        if r.returncode != 0:
            raise SystemExit(f"[{key}] mjpfl secrets init failed (rc {r.returncode}):\n"
                             f"{r.stdout}{r.stderr}")
        text += DEPLOY_CONFIG.format(d=secrets_dir)
    config.write_text(text)
    run_dir = work / "run"
    coord_log = open(work / "coordinator.log", "w")

    def limit_fds():  # the coordinator gets the ordinary descriptor limit, not ours
        resource.setrlimit(resource.RLIMIT_NOFILE, (nofile_soft, resource.getrlimit(
            resource.RLIMIT_NOFILE)[1]))

    coord = subprocess.Popen([args.mjpfl, "coordinator", "--config", str(config), "--run-dir",
                              str(run_dir)], stdout=coord_log, stderr=subprocess.STDOUT,
                             stdin=subprocess.DEVNULL, preexec_fn=limit_fds)
    deadline = time.time() + 120
    while "coordinator listening" not in (work / "coordinator.log").read_text():
        if coord.poll() is not None or time.time() > deadline:
            tail = (work / "coordinator.log").read_text()[-2000:]
            raise SystemExit(f"[{key}] coordinator did not start (rc {coord.poll()}):\n{tail}")
        time.sleep(0.1)
    abort = threading.Event()
    sampler = Sampler(coord.pid, abort, args.min_mem_available_mib)
    sampler.start()
    time.sleep(1.0)
    before = sampler.last()
    ctx = Ctx(args, port, pb2, pb2g, run_dir, work, abort, secrets_dir)
    ctx.coord = coord
    print(f"[{key}] {title}: coordinator pid {coord.pid} on :{port}, files in {work}", flush=True)
    t_attack = time.time()
    try:
        did = attack(ctx)
    except Exception as e:  # an attack that broke is reported, not hidden
        did = f"attack raised {type(e).__name__}: {e}"
    if sampler.abort_reason:
        did += f" -- {sampler.abort_reason}"
    t_release = time.time()
    print(f"[{key}] released after {t_release - t_attack:.1f} s: {did}", flush=True)
    time.sleep(5.0)
    after = sampler.last() if coord.poll() is None else None
    after_note = "" if after else " (exited)"
    if after is None and sampler.samples:
        after = sampler.samples[-1]
        after_note = " (last sample before exit)"
    ctx.start_honest()  # no-op unless the attack never started them
    h_deadline = ctx.honest_t0 + args.honest_timeout
    while len(ctx.honest_exit) < 2 and time.time() < h_deadline:
        time.sleep(0.2)
    honest_rcs = [p.poll() for p in ctx.honest]
    for p in ctx.honest:
        if p.poll() is None:
            p.kill()
            p.wait()
    rounds = ctx.rounds_committed()
    finished = all(rc == 0 for rc in honest_rcs) and rounds >= 3
    wall = (max(ctx.honest_exit.values()) - ctx.honest_t0) if len(ctx.honest_exit) == 2 else None
    if finished:
        honest = f"yes ({rounds}/3 rounds), {wall:.1f} s"
    else:
        honest = (f"no ({rounds}/3 rounds; client exit codes {honest_rcs}) after "
                  f"{time.time() - ctx.honest_t0:.0f} s")
    # What each honest client said at its end (re-joins and refused updates mark disruption).
    summaries = []
    for i in range(len(ctx.honest)):
        m = re.search(r"^(\S+): (\d+) updates accepted, (\d+) refused, (\d+) joins",
                      (work / f"honest-{i}.log").read_text(errors="replace"), re.M)
        summaries.append(m.groups() if m else None)
    if any(x is None or x[2] != "0" or x[3] != "1" for x in summaries):
        honest += "; per client (id, accepted, refused, joins): " + ", ".join(
            "(" + ", ".join(x) + ")" if x else "(no summary)" for x in summaries)
    elif secrets_dir:
        honest += " as " + ", ".join(x[0] for x in summaries)
    # The coordinator should exit by itself once the federation finished.
    exit_note = ""
    if finished:
        t_fin = max(ctx.honest_exit.values())
        try:
            coord.wait(timeout=30)
            exit_note = f"exited by itself rc {coord.returncode}"
        except subprocess.TimeoutExpired:
            exit_note = f"still running {time.time() - t_fin:.0f} s after the federation finished"
    elif coord.poll() is not None:
        exit_note = f"EXITED rc {coord.returncode} before the federation finished"
    else:
        exit_note = "still serving at the honest timeout: stopped with SIGTERM"
    if coord.poll() is None:
        coord.terminate()
        try:
            coord.wait(timeout=20)
        except subprocess.TimeoutExpired:
            exit_note += "; ignored SIGTERM for 20 s, killed"
            coord.kill()
            coord.wait()
    for f in ctx.held:  # the attacker's pool identities
        f.close()
    sampler.stop.set()
    sampler.join()
    with open(work / "samples.csv", "w") as f:  # t since the attack began, for a closer look
        f.write("t_s,vmrss_mib,vmhwm_mib,fds\n")
        f.writelines(f"{t - t_attack:.2f},{r:.1f},{h:.1f},{n}\n" for t, r, h, n in sampler.samples)
    win = sampler.window(t_attack, time.time())
    peak_rss = max((s[1] for s in win), default=float("nan"))
    peak_hwm = max((s[2] for s in win), default=float("nan"))
    peak_fds = max((s[3] for s in win), default=0)
    log_text = (work / "coordinator.log").read_text(errors="replace")
    levels = collections.Counter(w for w in ("WARN", "ERROR", "panicked") for line in
                                 log_text.splitlines() if w in line)
    if levels:
        exit_note += f"; coordinator log: {counts(levels)} lines"
    row = {
        "attack": title,
        "did": did + (f" [coordinator {exit_note}]" if exit_note else ""),
        "rss": f"{before[1]:.0f} / {peak_rss:.0f} (HWM {peak_hwm:.0f}) / {after[1]:.0f}{after_note}",
        "fds": f"{before[3]} / {peak_fds} / {after[3]}{after_note}",
        "honest": honest,
    }
    print(f"[{key}] RSS {row['rss']} MiB, fds {row['fds']}, honest: {honest}; {exit_note}",
          flush=True)
    return row


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mjpfl", required=True, help="the mjpfl binary under test")
    ap.add_argument("--data-dir", type=Path, default=Path("/work/main/data"))
    ap.add_argument("--secret", default="mjpfl", help="the federation's join secret")
    ap.add_argument("--scenarios", "--only", dest="scenarios",
                    help="comma-separated subset to run (default: all) of: " + ",".join(ATTACKS))
    ap.add_argument("--honest-timeout", type=float, default=150.0,
                    help="seconds the honest clients get from their start")
    ap.add_argument("--min-mem-available-mib", type=float, default=3072.0,
                    help="stop an attack early if the machine's MemAvailable falls below this")
    ap.add_argument("--work-dir", default=None, help="where per-attack temp dirs go (default $TMPDIR)")
    ap.add_argument("--out", type=Path, default=HERE / "last-run.md")
    args = ap.parse_args()
    args.mjpfl = str(Path(args.mjpfl).resolve())
    args.data_dir = args.data_dir.resolve()
    keys = [k.strip() for k in args.scenarios.split(",") if k.strip()] if args.scenarios \
        else list(ATTACKS)
    unknown = [k for k in keys if k not in ATTACKS]
    if unknown:
        ap.error(f"unknown scenarios {unknown}; known: {', '.join(ATTACKS)}")
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 65536), hard))  # the attacker's side
    stub_dir = Path(tempfile.mkdtemp(prefix="hostile-stubs-"))
    pb2, pb2g = load_stubs(stub_dir)
    load0, t0 = os.getloadavg()[0], time.time()
    rows = [run_case(k, args, pb2, pb2g, soft) for k in keys]
    load1 = os.getloadavg()
    shutil.rmtree(stub_dir, ignore_errors=True)
    digest = hashlib.sha256(Path(args.mjpfl).read_bytes()).hexdigest()[:12]
    commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
                            capture_output=True, text=True).stdout.strip()
    lines = [
        f"# Hostile-peer run, {time.strftime('%Y-%m-%d %H:%M:%S')}",
        "",
        f"Binary `{args.mjpfl}` (sha256 {digest}), checkout {commit}, {os.cpu_count()} CPUs, "
        f"coordinator fd limit {soft}. RSS in MiB (VmRSS; HWM = VmHWM), sampled every 0.2 s; "
        "peak over the attack and the honest federation; after = 5 s after the attack released. "
        f"Machine load average {load0:.1f} at the start, {load1[0]:.1f} / {load1[1]:.1f} / "
        f"{load1[2]:.1f} (1/5/15 min) at the end of the {(time.time() - t0) / 60:.0f}-minute run.",
        "",
        "| attack | what the coordinator did (seen by the attacker) | RSS before / peak / after "
        "| fds before / peak / after | honest federation finished |",
        "|---|---|---|---|---|",
    ]
    lines += [f"| {r['attack']} | {r['did']} | {r['rss']} | {r['fds']} | {r['honest']} |"
              for r in rows]
    text = "\n".join(lines) + "\n"
    print("\n" + text)
    args.out.write_text(text)
    print(f"written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
