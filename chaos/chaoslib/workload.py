"""Seeded client workload and the history it records.

Each client thread has its own RNG (seed, client index) and sends creates (single and package,
ttl_seconds 2 s to 1 h, max_retrievals 1..5 or unlimited), previews, claims and deletes to a
random node. Every HTTP attempt is one history line (see checker.py for the format). Creates
always carry an Idempotency-Key and are retried with it after an indeterminate answer; half of
the claims carry one and are retried the same way; deletes and the other claims are not
retried. Answers are classified:

  ok     2xx
  fail   a definite answer: 404, 409, 410 (and other 4xx, counted as unexpected), or a
         connection refused before anything was sent (status null: no effect possible)
  info   indeterminate: timeout, reset, or a 5xx on a create/claim/delete (it may still apply)
"""
import base64
import hashlib
import http.client
import json
import random
import socket
import threading
import time
import uuid

TTLS = [2, 3, 5, 8, 15, 30, 60, 120, 600, 3600]
MAXES = [1, 1, 2, 3, 4, 5, None]
MAX_OPS_PER_KUBBI = 10
# Hot-key phases: every so often a few fresh kubbis with 1-5 retrievals become the target of
# most claims of every client (bare and keyed), so claims of one kubbi overlap by the dozen.
HOT_KUBBIS = 3
HOT_SHARE = 0.8
HOT_TTL = 600


def content_hash_single(s):
    return hashlib.sha256(s.encode()).hexdigest()


def content_hash_files(files):
    """files: [(name, bytes)] in order."""
    h = hashlib.sha256()
    for name, b in files:
        h.update(name.encode() + b"\0" + str(len(b)).encode() + b"\0" + b)
    return h.hexdigest()


def hash_claim_body(b):
    if b.get("type") == "kubbi_package" or "files" in b:
        files = []
        for f in b.get("files") or []:
            c = f.get("content") or ""
            raw = base64.b64decode(c) if f.get("encoding") == "base64" else c.encode()
            files.append((f.get("name"), raw))
        return content_hash_files(files)
    c = b.get("content")
    if not isinstance(c, str):
        c = json.dumps(c)
    return content_hash_single(c)


class History:
    def __init__(self, path, t_zero):
        self.f = open(path, "a", buffering=1)
        self.lock = threading.Lock()
        self.t_zero = t_zero
        self.entries = []

    def now(self):
        return time.monotonic() - self.t_zero

    def record(self, e):
        with self.lock:
            self.entries.append(e)
            self.f.write(json.dumps(e, separators=(",", ":")) + "\n")

    def close(self):
        self.f.close()


class Kubbi:
    def __init__(self, k, kid, token, api_key, mx, ttl, h, t1):
        self.k, self.id, self.token, self.api_key = k, kid, token, api_key
        self.max, self.ttl, self.h, self.created = mx, ttl, h, t1
        self.ops = 0
        self.terminal = False
        self.after_terminal = 0


class Workload:
    def __init__(self, seed, nodes_fn, api_keys, history, clients=16, timeout=5.0, think=(0.0, 0.05),
                 hot_period=0.0, hot_window=0.0):
        self.seed = seed
        self.nodes_fn = nodes_fn  # -> list of "ip:port" currently in the cluster
        self.api_keys = api_keys
        self.h = history
        self.n_clients = clients
        self.timeout = timeout
        self.think = think
        self.pool = []  # live kubbis clients pick from
        self.all = []  # every acknowledged kubbi (for the final sweep)
        self.lock = threading.Lock()
        self.stop_flag = threading.Event()
        self.threads = []
        self.counter = 0
        # Hot-key phases (off when hot_period is 0): the kubbis of the current one, if any.
        self.hot_period, self.hot_window = hot_period, hot_window
        self.hot = []
        self.hot_stats = {"phases": 0, "kubbis": 0, "claims": 0}

    # transport
    def request(self, node, method, path, body=None, token=None, idem=None, timeout=None):
        """Returns (outcome, status, json body, error) where outcome is ok/fail/info."""
        host, port = node.split(":")
        conn = http.client.HTTPConnection(host, int(port), timeout=timeout or self.timeout)
        headers = {}
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            headers["content-type"] = "application/json"
        if token:
            headers["authorization"] = f"Bearer {token}"
        if idem:
            headers["idempotency-key"] = idem
        sent = False
        try:
            conn.connect()
            sent = True
            conn.request(method, path, body=data, headers=headers)
            r = conn.getresponse()
            raw = r.read()
            try:
                js = json.loads(raw) if raw else {}
            except ValueError:
                js = {}
            if 200 <= r.status < 300:
                return "ok", r.status, js, None
            err = js.get("error") if isinstance(js, dict) else None
            if r.status >= 500:
                return "info", r.status, js, err or "server_error"
            return "fail", r.status, js, err
        except ConnectionRefusedError:
            return ("info" if sent else "fail"), None, {}, "refused"
        except (socket.timeout, TimeoutError):
            return ("info" if sent else "fail"), None, {}, "timeout"
        except (OSError, http.client.HTTPException) as e:
            return ("info" if sent else "fail"), None, {}, type(e).__name__
        finally:
            conn.close()

    def attempt(self, client, rng, op, lop, k, method, path, body=None, token=None, idem=None, extra=None,
                parse=None, node=None):
        node = node or rng.choice(self.nodes_fn())
        t0 = self.h.now()
        w0 = time.time()
        outcome, status, js, err = self.request(node, method, path, body, token, idem)
        t1 = self.h.now()
        r = {}
        if isinstance(js, dict):
            if outcome == "ok" and parse:
                r = parse(js)
            elif status in (409, 410):
                r = {"status": js.get("status")}
        e = {"op": op, "lop": lop, "k": k, "client": client, "node": node, "t0": round(t0, 6),
             "t1": round(t1, 6), "w0": round(w0, 3), "outcome": outcome, "status": status,
             "error": err, "r": r}
        if extra:
            e.update(extra)
        self.h.record(e)
        return outcome, status, js

    def retrying(self, client, rng, tries, *a, **kw):
        for i in range(tries):
            outcome, status, js = self.attempt(client, rng, *a, **kw)
            if outcome == "ok" or (outcome == "fail" and status is not None):
                return outcome, status, js
            if self.stop_flag.is_set() and i >= 1:
                break
            time.sleep(rng.uniform(0.1, 0.6))
        return outcome, status, js

    # operations
    def new_key(self, client):
        with self.lock:
            self.counter += 1
            return f"c{client}-{self.counter}"

    def create(self, client, rng, node=None, mx=None, ttl=None):
        ttl = ttl or rng.choice(TTLS)
        mx = mx or rng.choice(MAXES)
        body = {"ttl_seconds": ttl}
        if mx is not None:
            body["max_retrievals"] = mx
        if rng.random() < 0.65:
            s = rng.randbytes(rng.randint(8, 1500)).hex()
            body["content"] = s
            body["content_type"] = rng.choice(["text/plain", "text/markdown"])
            h = content_hash_single(s)
        else:
            files, spec = [], []
            for j in range(rng.randint(1, 3)):
                name = f"f{j}-{rng.randint(0, 9999)}.bin" if j % 2 else f"f{j}.txt"
                if j % 2:
                    raw = rng.randbytes(rng.randint(1, 3000))
                    spec.append({"name": name, "content": base64.b64encode(raw).decode(),
                                 "content_type": "application/octet-stream", "encoding": "base64"})
                else:
                    txt = "line " + rng.randbytes(rng.randint(1, 800)).hex()
                    raw = txt.encode()
                    spec.append({"name": name, "content": txt, "content_type": "text/plain", "role": "data"})
                files.append((name, raw))
            body["files"] = spec
            h = content_hash_files(files)
        k = self.new_key(client)
        api_key = rng.choice(self.api_keys)
        idem = str(uuid.UUID(int=rng.getrandbits(128)))
        outcome, status, js = self.retrying(
            client, rng, 4, "create", f"{k}/create", k, "POST", "/api/v1/kubbis", body=body, token=api_key,
            idem=idem, extra={"ttl": ttl, "max": mx, "h": h, "pkg": "files" in body},
            parse=lambda j: {"id": j.get("id"), "expires_at": j.get("expires_at")}, node=node)
        if outcome == "ok" and js.get("claim_token"):
            kb = Kubbi(k, js.get("id"), js["claim_token"], api_key, mx, ttl, h, self.h.now())
            with self.lock:
                if client not in ("recovery", "hot"):
                    self.pool.append(kb)
                self.all.append(kb)
            return kb
        return None

    @staticmethod
    def parse_preview(j):
        return {"status": j.get("status"), "count": j.get("retrieval_count"), "remaining": j.get("remaining_reads")}

    @staticmethod
    def parse_claim(j):
        return {"h": hash_claim_body(j), "count": j.get("retrieval_count"), "burned": j.get("burned"),
                "remaining": j.get("remaining_reads")}

    @staticmethod
    def parse_detail(j):
        return {"status": j.get("status"), "count": j.get("retrieval_count")}

    def preview(self, client, rng, kb, node=None):
        return self.attempt(client, rng, "preview", f"{kb.k}/p{rng.getrandbits(40)}", kb.k, "GET",
                            f"/r/{kb.token}", parse=self.parse_preview, node=node)

    def claim(self, client, rng, kb, idem=None):
        lop = f"{kb.k}/c{rng.getrandbits(40)}"
        if idem is None and rng.random() < 0.5:
            idem = str(uuid.UUID(int=rng.getrandbits(128)))
        if idem:
            return self.retrying(client, rng, 3, "claim", lop, kb.k, "POST", f"/r/{kb.token}/claim", idem=idem,
                                 parse=self.parse_claim)
        return self.attempt(client, rng, "claim", lop, kb.k, "POST", f"/r/{kb.token}/claim", parse=self.parse_claim)

    def delete(self, client, rng, kb):
        return self.attempt(client, rng, "delete", f"{kb.k}/d{rng.getrandbits(40)}", kb.k, "DELETE",
                            f"/api/v1/kubbis/{kb.id}", token=kb.api_key, parse=self.parse_detail)

    def detail(self, client, rng, kb, node=None):
        return self.attempt(client, rng, "detail", f"{kb.k}/g{rng.getrandbits(40)}", kb.k, "GET",
                            f"/api/v1/kubbis/{kb.id}", token=kb.api_key, parse=self.parse_detail, node=node)

    def pick(self, rng):
        with self.lock:
            if not self.pool:
                return None
            kb = rng.choice(self.pool)
            kb.ops += 1
            if kb.ops >= MAX_OPS_PER_KUBBI or kb.after_terminal > 2:
                self.pool.remove(kb)
            return kb

    def note(self, kb, status, js):
        if status in (409, 410) or (status == 200 and isinstance(js, dict) and js.get("burned")):
            with self.lock:
                kb.terminal = True
                kb.after_terminal += 1

    def hot_ids(self):
        """Ids of the current hot-key phase's kubbis (empty between phases)."""
        with self.lock:
            return [kb.id for kb in self.hot if kb.id]

    def hot_loop(self):
        """Every hot_period seconds, a phase of hot_window seconds in which most claims of every
        client go to HOT_KUBBIS fresh kubbis of 1-5 retrievals."""
        rng = random.Random(f"{self.seed}/hot")
        while not self.stop_flag.wait(self.hot_period):
            made = [self.create("hot", rng, mx=rng.randint(1, 5), ttl=HOT_TTL) for _ in range(HOT_KUBBIS)]
            made = [kb for kb in made if kb is not None]
            if not made:
                continue
            with self.lock:
                self.hot = made
                self.hot_stats["phases"] += 1
                self.hot_stats["kubbis"] += len(made)
            self.stop_flag.wait(self.hot_window)
            with self.lock:
                self.hot = []

    def client_loop(self, client):
        rng = random.Random(f"{self.seed}/client/{client}")
        while not self.stop_flag.is_set():
            with self.lock:
                n = len(self.pool)
                hot = list(self.hot)
            if hot and rng.random() < HOT_SHARE:
                # No think time: the point is claims of one kubbi racing each other.
                kb = rng.choice(hot)
                self.claim(client, rng, kb)
                with self.lock:
                    self.hot_stats["claims"] += 1
                continue
            x = rng.random()
            if n < 8 or x < 0.25:
                self.create(client, rng)
            else:
                kb = self.pick(rng)
                if kb is None:
                    continue
                if x < 0.5:
                    _, st, js = self.preview(client, rng, kb)
                elif x < 0.92:
                    _, st, js = self.claim(client, rng, kb)
                else:
                    _, st, js = self.delete(client, rng, kb)
                self.note(kb, st, js)
            if self.think[1] > 0:
                time.sleep(rng.uniform(*self.think))

    def start(self):
        for c in range(self.n_clients):
            t = threading.Thread(target=self.client_loop, args=(c,), name=f"client{c}", daemon=True)
            t.start()
            self.threads.append(t)
        if self.hot_period > 0 and self.hot_window > 0:
            t = threading.Thread(target=self.hot_loop, name="hot", daemon=True)
            t.start()
            self.threads.append(t)

    def stop(self, timeout=60):
        self.stop_flag.set()
        deadline = time.monotonic() + timeout
        for t in self.threads:
            t.join(max(0.1, deadline - time.monotonic()))

    # final sweep after healing
    def sweep(self, threads=16, deadline_s=1500, per_kubbi_s=30):
        """Reads every acknowledged kubbi back: producer detail, consumer preview, and a claim of
        each one still claimable (checks the bytes). Retries until a definite answer."""
        items = list(self.all)
        rng0 = random.Random(f"{self.seed}/sweep")
        rng0.shuffle(items)
        lock = threading.Lock()
        end = time.monotonic() + deadline_s
        unresolved = []

        def definite(fn):
            stop = min(end, time.monotonic() + per_kubbi_s)
            while time.monotonic() < stop:
                outcome, st, js = fn()
                if outcome == "ok" or (outcome == "fail" and st is not None):
                    return outcome, st, js
                time.sleep(0.3)
            return None, None, None

        def worker(w):
            rng = random.Random(f"{self.seed}/sweep/{w}")
            while True:
                with lock:
                    if not items:
                        return
                    kb = items.pop()
                o, st, js = definite(lambda: self.detail("sweep", rng, kb))
                if o is None:
                    unresolved.append(kb.k)
                    continue
                if js.get("status") != "active" and rng.random() < 0.9:
                    continue  # ended: the producer's view (status, count) is checked; preview a sample
                o, st, js = definite(lambda: self.preview("sweep", rng, kb))
                if o is None:
                    unresolved.append(kb.k)
                    continue
                if o == "ok" and js.get("status") == "active":
                    idem = str(uuid.UUID(int=rng.getrandbits(128)))
                    self.claim("sweep", rng, kb, idem=idem)

        ts = [threading.Thread(target=worker, args=(w,), daemon=True) for w in range(threads)]
        for t in ts:
            t.start()
        for t in ts:
            t.join()
        return unresolved
