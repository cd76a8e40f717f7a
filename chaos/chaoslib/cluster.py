"""kubbi node processes, each in its own network namespace, with their storage variants.

Storage per node (chosen by the run):
  plain   a directory under the run directory
  lazyfs  the data directory is a FUSE mount (lazyfs.py) over a backing directory that keeps
          only fsync'd bytes; a "power loss" kills the node and the FUSE daemon together
  small   the data directory is a size-limited tmpfs that the nemesis fills ("disk full")
Clock: a node started with `skew=True` runs under libfaketime with FAKETIME_TIMESTAMP_FILE, so
the nemesis can move its wall clock at run time (monotonic time is left alone).
"""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request

from . import netns

HERE = os.path.dirname(os.path.abspath(__file__))
HTTP_PORT = 8080
INTERNAL_PORT = 7070
FAKETIME_LIBS = ["/usr/lib/x86_64-linux-gnu/faketime/libfaketimeMT.so.1",
                 "/usr/lib/aarch64-linux-gnu/faketime/libfaketimeMT.so.1",
                 "/usr/lib/faketime/libfaketimeMT.so.1"]


def fusermount():
    return shutil.which("fusermount") or shutil.which("fusermount3") or "fusermount"


def faketime_lib():
    for p in FAKETIME_LIBS:
        if os.path.exists(p):
            return p
    return None


def http_json(method, url, body=None, token=None, timeout=3.0, headers=None):
    """Returns (status, json-or-None). Raises on transport errors."""
    data = None if body is None else json.dumps(body).encode()
    h = {"content-type": "application/json"} if body is not None else {}
    if token:
        h["authorization"] = f"Bearer {token}"
    if headers:
        h.update(headers)
    req = urllib.request.Request(url, data=data, method=method, headers=h)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            raw = r.read()
            return r.status, (json.loads(raw) if raw else None)
    except urllib.error.HTTPError as e:
        raw = e.read()
        try:
            return e.code, json.loads(raw)
        except ValueError:
            return e.code, None


class Node:
    def __init__(self, cluster, i, storage="plain", skew=False, join=None):
        self.c = cluster
        self.id = i
        self.ip = netns.ip_of(i)
        self.http = f"{self.ip}:{HTTP_PORT}"
        self.internal = f"{self.ip}:{INTERNAL_PORT}"
        self.zone = f"chaos/z{i}"
        self.storage = storage
        self.skew = skew
        self.join = join  # internal address to join through, else bootstrap
        self.bin = None  # this node's kubbi binary when not the cluster's (a rolling upgrade)
        self.dir = os.path.join(cluster.dir, f"node{i}")
        self.backing = os.path.join(cluster.dir, f"node{i}.backing")
        self.log = os.path.join(cluster.dir, f"node{i}.log")
        self.skew_file = os.path.join(cluster.dir, f"node{i}.faketime")
        self.pending_file = os.path.join(cluster.dir, f"node{i}.lazyfs-pending.json")
        self.proc = None
        self.fuse = None
        self.stopped = False  # SIGSTOPped
        self.removed = False

    # storage
    def prepare(self):
        os.makedirs(self.dir, exist_ok=True)
        if self.storage == "small":
            subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={self.c.small_mb}m", "tmpfs", self.dir], check=True)
        elif self.storage == "lazyfs":
            os.makedirs(self.backing, exist_ok=True)
            self.mount_fuse()
        if self.skew:
            with open(self.skew_file, "w") as f:
                f.write("+0\n")

    def mount_fuse(self):
        py = "/usr/bin/python3" if os.path.exists("/usr/bin/python3") else sys.executable
        flog = open(os.path.join(self.c.dir, f"node{self.id}.lazyfs.log"), "ab")
        self.fuse = subprocess.Popen([py, os.path.join(HERE, "lazyfs.py"), self.backing, self.dir, self.pending_file],
                                     stdout=flog, stderr=flog, start_new_session=True)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if os.path.ismount(self.dir):
                return
            if self.fuse.poll() is not None:
                break
            time.sleep(0.05)
        raise RuntimeError(f"lazyfs for node {self.id} did not mount (see node{self.id}.lazyfs.log)")

    def unsynced(self):
        try:
            with open(self.pending_file) as f:
                return json.load(f)
        except (OSError, ValueError):
            return None

    def drop_unsynced(self):
        """Power loss of the lazyfs layer: its memory (the unsynced bytes) is gone."""
        if self.fuse is not None:
            os.kill(self.fuse.pid, signal.SIGKILL)
            self.fuse.wait()
            self.fuse = None
        subprocess.run([fusermount(), "-uz", self.dir], capture_output=True)
        deadline = time.monotonic() + 5
        while os.path.ismount(self.dir) and time.monotonic() < deadline:
            time.sleep(0.05)
        self.mount_fuse()

    def unmount(self):
        if self.storage == "lazyfs":
            if self.fuse is not None and self.fuse.poll() is None:
                subprocess.run([fusermount(), "-u", self.dir], capture_output=True)
                try:
                    self.fuse.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    os.kill(self.fuse.pid, signal.SIGKILL)
            subprocess.run([fusermount(), "-uz", self.dir], capture_output=True)
        elif self.storage == "small":
            subprocess.run(["umount", "-l", self.dir], capture_output=True)

    # process
    def cmd(self):
        c = self.c
        args = [self.bin or c.bin, "serve", "--node-id", str(self.id), "--data-dir", self.dir,
                "--http-addr", self.http, "--internal-addr", self.internal, "--zone", self.zone,
                "--initial-groups", str(c.groups), "--raft-heartbeat-ms", str(c.heartbeat_ms),
                "--raft-snapshot-every", str(c.snapshot_every), "--ip-link-rate", "0",
                "--cluster-secret-file", c.secret_file, "--node-key-file", c.keys_file,
                "--admin-token-file", c.admin_file]
        if self.join:
            args += ["--join", self.join]
        else:
            args += ["--bootstrap", c.bootstrap]
        return args

    def env(self):
        env = dict(os.environ)
        env.setdefault("RUST_LOG", "info")
        if self.skew:
            lib = faketime_lib()
            env["LD_PRELOAD"] = lib
            env["FAKETIME_TIMESTAMP_FILE"] = self.skew_file
            env["FAKETIME_DONT_FAKE_MONOTONIC"] = "1"
            env["FAKETIME_CACHE_DURATION"] = "1"
            env["FAKETIME_DONT_RESET"] = "1"
        return env

    def start(self):
        log = open(self.log, "ab")
        log.write(f"\n=== chaos: start node {self.id} at {time.strftime('%H:%M:%S')} ===\n".encode())
        log.flush()
        argv = ["nsenter", f"--net=/run/netns/{netns.ns_name(self.id)}", "--"] + self.cmd()
        self.proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=log, env=self.env(),
                                     start_new_session=True)
        self.stopped = False
        log.close()

    def alive(self):
        return self.proc is not None and self.proc.poll() is None

    def kill9(self):
        if self.alive():
            if self.stopped:
                os.kill(self.proc.pid, signal.SIGCONT)
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        self.stopped = False

    def terminate(self, timeout=10):
        if not self.alive():
            return
        if self.stopped:
            os.kill(self.proc.pid, signal.SIGCONT)
            self.stopped = False
        os.kill(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill9()

    def sigstop(self):
        if self.alive():
            os.kill(self.proc.pid, signal.SIGSTOP)
            self.stopped = True

    def sigcont(self):
        if self.alive() and self.stopped:
            os.kill(self.proc.pid, signal.SIGCONT)
        self.stopped = False

    def set_skew(self, seconds):
        with open(self.skew_file + ".tmp", "w") as f:
            f.write(f"{seconds:+d}\n" if isinstance(seconds, int) else f"{seconds:+.1f}\n")
        os.replace(self.skew_file + ".tmp", self.skew_file)

    def url(self, path):
        return f"http://{self.http}{path}"

    def live(self, timeout=1.0):
        try:
            st, _ = http_json("GET", self.url("/health/live"), timeout=timeout)
            return st == 200
        except Exception:  # noqa: BLE001
            return False

    def ready(self, timeout=1.0):
        try:
            st, _ = http_json("GET", self.url("/health/ready"), timeout=timeout)
            return st == 200
        except Exception:  # noqa: BLE001
            return False

    def status(self, timeout=3.0):
        st, body = http_json("GET", self.url("/admin/v1/cluster"), token=self.c.admin, timeout=timeout)
        if st != 200:
            raise RuntimeError(f"cluster status {st}: {body}")
        return body


class Cluster:
    def __init__(self, run_dir, bin_path, n, groups=0, heartbeat_ms=100, snapshot_every=1000,
                 lazy=(), small=(), skewed=(), small_mb=256):
        self.dir = run_dir
        self.bin = bin_path
        self.upgrade_bin = None  # chaos --upgrade-bin: rolling_restart alternates binaries
        self.n = n
        self.groups = groups
        self.heartbeat_ms = heartbeat_ms
        self.snapshot_every = snapshot_every
        self.small_mb = small_mb
        self.secret_file = os.path.join(run_dir, "cluster-secret")
        self.keys_file = os.path.join(run_dir, "node-keys.json")
        self.admin_file = os.path.join(run_dir, "admin-token")
        self.admin = None
        self.nodes = {}
        for i in range(1, n + 1):
            storage = "lazyfs" if i in lazy else "small" if i in small else "plain"
            self.nodes[i] = Node(self, i, storage=storage, skew=i in skewed)
        self.bootstrap = ",".join(f"{nd.id}={nd.internal}@{nd.zone}" for nd in self.nodes.values())

    def write_secrets(self):
        import base64
        import secrets
        self.admin = secrets.token_urlsafe(32)
        for path, text in ((self.admin_file, self.admin + "\n"),
                           (self.secret_file, secrets.token_urlsafe(32) + "\n"),
                           (self.keys_file, json.dumps({"current": 1, "keys": [
                               {"id": 1, "key": base64.b64encode(secrets.token_bytes(32)).decode()}]}))):
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(text)

    def start(self, timeout=120):
        self.write_secrets()
        for nd in self.active():
            netns.add_node(nd.id)
            nd.prepare()
        for nd in self.active():
            nd.start()
        self.wait_led(timeout)

    def active(self):
        return [nd for nd in self.nodes.values() if not nd.removed]

    def wait_led(self, timeout):
        deadline = time.monotonic() + timeout
        last = None
        while time.monotonic() < deadline:
            for nd in self.active():
                if not nd.alive():
                    raise RuntimeError(f"node {nd.id} exited during start-up; see {nd.log}")
            try:
                st = self.any_status()
                shards = st.get("shards", [])
                if shards and all(isinstance(s.get("leader"), int) for s in shards):
                    return st
                last = f"{sum(isinstance(s.get('leader'), int) for s in shards)}/{len(shards)} groups led"
            except Exception as e:  # noqa: BLE001
                last = str(e)
            time.sleep(0.3)
        raise RuntimeError(f"cluster not led within {timeout}s: {last}")

    def any_status(self, timeout=3.0):
        err = None
        for nd in self.active():
            if not nd.alive() or nd.stopped:
                continue
            try:
                return nd.status(timeout=timeout)
            except Exception as e:  # noqa: BLE001
                err = e
        raise RuntimeError(f"no node answered cluster status: {err}")

    def leaders(self):
        """{shard id: leader node id} from any node that answers."""
        st = self.any_status()
        return {s["id"]: s.get("leader") for s in st.get("shards", [])}

    def stop(self):
        for nd in self.nodes.values():
            nd.terminate()

    def release(self, keep):
        """Unmounts node storage; with `keep`, copies a tmpfs data directory out first."""
        for nd in self.nodes.values():
            if keep and nd.storage == "small" and os.path.ismount(nd.dir):
                shutil.copytree(nd.dir, nd.dir + ".kept", dirs_exist_ok=True)
            nd.unmount()

    def wipe(self):
        shutil.rmtree(self.dir, ignore_errors=True)
