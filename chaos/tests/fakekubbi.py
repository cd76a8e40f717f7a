#!/usr/bin/env python3
"""A stand-in for `kubbi serve` used to develop and test the chaos harness without the real
binary: the lowest node id of --bootstrap is the only leader; other nodes forward to it. State
is an fsync'd JSON-lines log in the leader's data directory, so kill -9 loses nothing, but a
leader that is down or cut off makes the cluster unavailable. `--bug double-claim|lose|bytes`
plants a bug so an end-to-end run can show the checker catching it.

    chaos/run --bin chaos/tests/fakekubbi.py ...   (the script is executable)
"""
import argparse
import base64
import hashlib
import json
import os
import secrets
import sys
import threading
import time
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def iso(ms):
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ms / 1000)) + f".{int(ms % 1000):03d}Z"


class State:
    def __init__(self, path, bug):
        self.path = path
        self.bug = bug
        self.lock = threading.Lock()
        self.kubbis = {}
        self.by_token = {}
        self.idem = {}
        self.keys = set()
        if os.path.exists(path):
            with open(path) as f:
                for line in f:
                    try:
                        self.apply(json.loads(line))
                    except ValueError:
                        break
        self.f = open(path, "a")

    def log(self, e):
        if not (self.bug == "lose" and secrets.randbelow(20) == 0):
            self.f.write(json.dumps(e) + "\n")
            self.f.flush()
            os.fsync(self.f.fileno())
        self.apply(e)

    def apply(self, e):
        t = e["t"]
        if t == "key":
            self.keys.add(e["key"])
        elif t == "create":
            self.kubbis[e["id"]] = e["k"]
            self.by_token[e["token"]] = e["id"]
            if e.get("idem"):
                self.idem[e["idem"]] = e["resp"]
        elif t == "claim":
            k = self.kubbis[e["id"]]
            k["count"] += 1
            if k["max"] is not None and k["count"] >= k["max"]:
                k["status"] = "burned"
            if e.get("idem"):
                self.idem[e["idem"]] = e["resp"]
        elif t == "delete":
            self.kubbis[e["id"]]["status"] = "deleted"


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
                resp = {"id": kid, "claim_token": token, "status": "active", "max_retrievals": k["max"],
                        "created_at": iso(now), "expires_at": iso(exp)}
                st.log({"t": "create", "id": kid, "token": token, "k": k, "idem": idem, "resp": resp})
                return self.send(201, resp)
            if p.startswith("/api/v1/kubbis/"):
                kid = p.rsplit("/", 1)[1]
                k = st.kubbis.get(kid)
                if k is None or k["owner"] != auth:
                    return self.send(404, {"error": "not_found"})
                status = k["status"] if k["status"] != "active" or now < k["exp"] else "expired"
                if method == "GET":
                    return self.send(200, {"id": kid, "status": status, "retrieval_count": k["count"]})
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
                status = k["status"] if k["status"] != "active" or now < k["exp"] else "expired"
                claim = method == "POST" and len(parts) > 3 and parts[3] == "claim"
                if claim and idem and idem in st.idem:
                    return self.send(200, st.idem[idem])
                if status != "active" and not (claim and st.bug == "double-claim" and status == "burned"
                                               and secrets.randbelow(4) == 0):
                    return self.send(410, {"error": "expired" if status == "expired" else "gone", "status": status})
                if not claim:
                    return self.send(200, {"status": "active", "retrieval_count": k["count"],
                                           "max_retrievals": k["max"]})
                n = k["count"] + 1
                resp = {"retrieval_count": n, "burned": k["max"] is not None and n >= k["max"]}
                if k["files"] is not None:
                    resp["type"] = "kubbi_package"
                    resp["files"] = k["files"]
                else:
                    c = k["content"]
                    if st.bug == "bytes" and secrets.randbelow(10) == 0:
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
    ap.add_argument("--bug", default=os.environ.get("FAKEKUBBI_BUG"))
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
    srv.state = State(os.path.join(a.data_dir, "fake.log"), a.bug) if srv.is_leader else None
    srv.serve_forever()


if __name__ == "__main__":
    main()
