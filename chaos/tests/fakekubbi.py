#!/usr/bin/env python3
"""A stand-in for `kubbi serve` used to develop and test the chaos harness without the real
binary: the lowest node id of --bootstrap is the only leader; other nodes forward to it. State
is an fsync'd JSON-lines log in the leader's data directory, so kill -9 loses nothing, but a
leader that is down or cut off makes the cluster unavailable. It answers the admin calls the
harness makes (API keys, cluster status, per-replica digests).

`--bug NAME` (or FAKEKUBBI_BUG) plants one bug so an end-to-end run shows the checker catching
it (tests/test_planted.py); FAKEKUBBI_SEED (or --bug-seed) seeds the bug's own dice:

  double-claim        a claim of a burned kubbi succeeds 1 time in 4 (a stale burn check)
  lose                1 kubbi write in 20 is acknowledged but never reaches the log, so it is
                      gone after the leader restarts (fsync skipped on an error path)
  bytes               1 single-content claim in 10 returns the content with a byte appended
  corrupt-500         1 create in 6 stores ciphertext that no longer authenticates: every claim
                      of it counts the retrieval, then fails decryption and answers
                      500 {"error": "internal_error", ...} (a retry with its Idempotency-Key too)
  stale-preview       1 preview or producer read in 3 is served from the state before the
                      kubbi's last claim or delete (a replica one entry behind): an old
                      retrieval_count, or `active` for a burned or deleted kubbi
  claim-after-expiry  a claim checks only the stored status, not the deadline: an expired kubbi
                      can still be claimed (previews still answer 410 expired)

    chaos/run --bin chaos/tests/fakekubbi.py ...   (the script is executable)
"""
import argparse
import base64
import hashlib
import json
import os
import random
import secrets
import sys
import threading
import time
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def iso(ms):
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ms / 1000)) + f".{int(ms % 1000):03d}Z"


BUGS = ("double-claim", "lose", "bytes", "corrupt-500", "stale-preview", "claim-after-expiry")


class State:
    def __init__(self, path, bug, seed=None):
        self.path = path
        self.bug = bug
        self.dice = random.Random(seed)  # the planted bug's choices (seeded for the tests)
        self.lock = threading.Lock()
        self.kubbis = {}
        self.by_token = {}
        self.idem = {}
        self.keys = set()
        self.applied = 0
        good = 0
        if os.path.exists(path):
            with open(path, "rb") as f:
                for line in f:
                    try:
                        e = json.loads(line)
                    except ValueError:
                        break
                    if not line.endswith(b"\n"):
                        break
                    self.apply(e)
                    good += len(line)
            # A torn last line (killed mid-write) is cut off, so later entries stay readable.
            with open(path, "r+b") as f:
                f.truncate(good)
        self.f = open(path, "a")

    def chance(self, n):
        """The planted bug fires 1 time in n."""
        return self.dice.randrange(n) == 0

    def log(self, e):
        if not (self.bug == "lose" and e["t"] != "key" and self.chance(20)):
            self.f.write(json.dumps(e) + "\n")
            self.f.flush()
            os.fsync(self.f.fileno())
        self.apply(e)

    def apply(self, e):
        self.applied += 1
        t = e["t"]
        if t == "key":
            self.keys.add(e["key"])
        elif t == "create":
            self.kubbis[e["id"]] = e["k"]
            self.by_token[e["token"]] = e["id"]
            if e.get("idem"):
                self.idem[e["idem"]] = e["resp"]
        elif t == "claim":
            k = self.kubbis.get(e["id"])
            if k is None:  # its create never reached the log (--bug lose): replayed as lost
                return
            k["prev"] = {"status": k["status"], "count": k["count"]}
            k["count"] += 1
            if k["max"] is not None and k["count"] >= k["max"]:
                k["status"] = "burned"
            if e.get("idem"):
                self.idem[e["idem"]] = e["resp"]
        elif t == "delete":
            k = self.kubbis.get(e["id"])
            if k is None:
                return
            k["prev"] = {"status": k["status"], "count": k["count"]}
            k["status"] = "deleted"

    def digest(self):
        h = hashlib.sha256()
        for kid in sorted(self.kubbis):
            k = self.kubbis[kid]
            h.update(json.dumps([kid, k["status"], k["count"]]).encode())
        return h.hexdigest()

    def view(self, k):
        """What a read (preview, producer detail) sees: with stale-preview, sometimes the state
        before the last claim or delete."""
        if self.bug == "stale-preview" and "prev" in k and self.chance(3):
            return k["prev"]
        return k


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *a):
        pass

    def send(self, code, obj):
        raw = json.dumps(obj).encode()
        self.send_response(code)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(raw)))
        self.end_headers()
        self.wfile.write(raw)

    def body(self):
        n = int(self.headers.get("content-length") or 0)
        return json.loads(self.rfile.read(n)) if n else None

    def forward(self, method):
        srv = self.server
        data = self.rfile.read(int(self.headers.get("content-length") or 0))
        req = urllib.request.Request(f"http://{srv.leader_http}{self.path}", data=data or None, method=method,
                                     headers={k: v for k, v in self.headers.items() if k.lower() != "host"})
        try:
            with urllib.request.urlopen(req, timeout=4) as r:
                raw, code = r.read(), r.status
        except urllib.error.HTTPError as e:
            raw, code = e.read(), e.code
        except Exception:  # noqa: BLE001
            return self.send(503, {"error": "unavailable", "message": "leader unreachable"})
        self.send_response(code)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(raw)))
        self.end_headers()
        self.wfile.write(raw)

    def handle_any(self, method):
        srv = self.server
        p = self.path.split("?")[0]
        if p == "/health/live":
            return self.send(200, {"status": "ok"})
        if p in ("/health/ready", "/health"):
            return self.send(200, {"status": "ok"})
        if p == "/admin/v1/cluster":
            return self.send(200, {"node_id": srv.node_id, "nodes": [], "shards": [
                {"id": i, "leader": srv.leader_id, "term": 1, "replicas": [srv.leader_id], "learners": [],
                 "applied_index": 1, "last_log_index": 1, "replication_lag": {}} for i in range(2)]})
        if p == "/admin/v1/digest":
            # Local replicas only: the leader holds the one replica of each group.
            if not srv.is_leader:
                return self.send(200, {"node_id": srv.node_id, "groups": []})
            with srv.state.lock:
                d, n = srv.state.digest(), srv.state.applied
            return self.send(200, {"node_id": srv.node_id, "groups": [
                {"id": i, "applied_index": n, "digest": d} for i in range(2)]})
        if not srv.is_leader:
            return self.forward(method)
        st = srv.state
        auth = (self.headers.get("authorization") or "")[7:]
        idem = self.headers.get("idempotency-key")
        now = int(time.time() * 1000)
        with st.lock:
            if p == "/admin/v1/api-keys" and method == "POST":
                self.body()
                key = "kb_" + secrets.token_urlsafe(24)
                st.log({"t": "key", "key": key})
                return self.send(201, {"api_key": key, "id": key[:8]})
            if p == "/api/v1/kubbis" and method == "POST":
                b = self.body()
                if auth not in st.keys:
                    return self.send(401, {"error": "unauthorized"})
                if idem and idem in st.idem:
                    return self.send(201, st.idem[idem])
                kid = secrets.token_hex(8)
                token = secrets.token_urlsafe(32)
                exp = now + b.get("ttl_seconds", 900) * 1000
                k = {"id": kid, "owner": auth, "max": b.get("max_retrievals"), "count": 0, "status": "active",
                     "exp": exp, "created": now, "content": b.get("content"), "files": b.get("files"),
                     "content_type": b.get("content_type")}
                if st.bug == "corrupt-500" and st.chance(6):
                    k["corrupt"] = True
                resp = {"id": kid, "claim_token": token, "status": "active", "max_retrievals": k["max"],
                        "created_at": iso(now), "expires_at": iso(exp)}
                st.log({"t": "create", "id": kid, "token": token, "k": k, "idem": idem, "resp": resp})
                return self.send(201, resp)
            if p.startswith("/api/v1/kubbis/"):
                kid = p.rsplit("/", 1)[1]
                k = st.kubbis.get(kid)
                if k is None or k["owner"] != auth:
                    return self.send(404, {"error": "not_found"})
                if method == "GET":
                    v = st.view(k)
                    status = v["status"] if v["status"] != "active" or now < k["exp"] else "expired"
                    return self.send(200, {"id": kid, "status": status, "retrieval_count": v["count"]})
                status = k["status"] if k["status"] != "active" or now < k["exp"] else "expired"
                if status != "active":
                    return self.send(409, {"error": "conflict", "status": status})
                st.log({"t": "delete", "id": kid})
                return self.send(200, {"id": kid, "status": "deleted", "retrieval_count": k["count"]})
            if p.startswith("/r/"):
                parts = p.split("/")
                kid = st.by_token.get(parts[2])
                if kid is None:
                    return self.send(404, {"error": "not_found"})
                k = st.kubbis[kid]
                claim = method == "POST" and len(parts) > 3 and parts[3] == "claim"
                v = k if claim else st.view(k)
                status = v["status"] if v["status"] != "active" or now < k["exp"] else "expired"
                if claim and st.bug == "claim-after-expiry":
                    status = k["status"]  # the deadline is not checked
                if claim and idem and idem in st.idem:
                    resp = st.idem[idem]
                    if resp.get("error"):
                        return self.send(500, resp)
                    return self.send(200, resp)
                if status != "active" and not (claim and st.bug == "double-claim" and status == "burned"
                                               and st.chance(4)):
                    return self.send(410, {"error": "expired" if status == "expired" else "gone", "status": status})
                if not claim:
                    return self.send(200, {"status": "active", "retrieval_count": v["count"],
                                           "max_retrievals": k["max"]})
                n = k["count"] + 1
                burned = k["max"] is not None and n >= k["max"]
                if k.get("corrupt"):
                    # The retrieval is counted (and burns), then decryption fails: the error envelope
                    # of an internal failure, as kubbi answers when authenticated decryption fails.
                    resp = {"error": "internal_error", "message": "internal error"}
                    st.log({"t": "claim", "id": kid, "idem": idem, "resp": resp})
                    return self.send(500, resp)
                resp = {"retrieval_count": n, "burned": burned}
                if k["files"] is not None:
                    resp["type"] = "kubbi_package"
                    resp["files"] = k["files"]
                else:
                    c = k["content"]
                    if st.bug == "bytes" and st.chance(10):
                        c = c + "x"
                    resp["content"] = c
                st.log({"t": "claim", "id": kid, "idem": idem, "resp": resp})
                return self.send(200, resp)
        return self.send(404, {"error": "not_found"})

    def do_GET(self):
        self.handle_any("GET")

    def do_POST(self):
        self.handle_any("POST")

    def do_DELETE(self):
        self.handle_any("DELETE")


def main():
    if len(sys.argv) < 2 or sys.argv[1] != "serve":
        sys.exit("usage: fakekubbi.py serve ...")
    ap = argparse.ArgumentParser()
    ap.add_argument("--node-id", type=int)
    ap.add_argument("--data-dir")
    ap.add_argument("--http-addr")
    ap.add_argument("--internal-addr")
    ap.add_argument("--bootstrap")
    ap.add_argument("--join")
    ap.add_argument("--bug", default=os.environ.get("FAKEKUBBI_BUG") or None, choices=BUGS)
    ap.add_argument("--bug-seed", default=os.environ.get("FAKEKUBBI_SEED"))
    a, _ = ap.parse_known_args(sys.argv[2:])
    leader_id, leader_http = None, None
    if a.bootstrap:
        first = sorted(a.bootstrap.split(","), key=lambda s: int(s.split("=")[0]))[0]
        leader_id = int(first.split("=")[0])
        leader_http = first.split("=")[1].split("@")[0].rsplit(":", 1)[0] + ":" + a.http_addr.rsplit(":", 1)[1]
    else:
        leader_id, leader_http = 1, a.join.rsplit(":", 1)[0][:-1] + "1:" + a.http_addr.rsplit(":", 1)[1]
    host, port = a.http_addr.rsplit(":", 1)
    srv = ThreadingHTTPServer((host, int(port)), Handler)
    srv.daemon_threads = True
    srv.node_id = a.node_id
    srv.leader_id = leader_id
    srv.leader_http = leader_http
    srv.is_leader = a.node_id == leader_id
    os.makedirs(a.data_dir, exist_ok=True)
    srv.state = State(os.path.join(a.data_dir, "fake.log"), a.bug, a.bug_seed) if srv.is_leader else None
    srv.serve_forever()


if __name__ == "__main__":
    main()
