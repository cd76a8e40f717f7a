"""Checks a recorded kubbi history against the invariants of DESIGN.md.

A history is a list of attempts (one JSON object per HTTP request, see workload.py):

    {"op": "create"|"preview"|"claim"|"delete"|"detail", "lop": logical-op id,
     "k": kubbi key (the client's name for the kubbi), "t0": invoke, "t1": return
     (monotonic seconds, one clock for the whole history), "outcome": "ok"|"fail"|"info",
     "status": HTTP status or null, "error": error code, "r": result fields,
     create only: "ttl", "max" (null = unlimited), "h" (sha256 of the created bytes)}

`outcome` "info" is indeterminate: a timeout, a connection error, or a 5xx on a mutating
request. It may have taken effect at any time after its invoke, or never. Only `503` (the
contract's "outcome unknown, retry") and no answer at all may be indeterminate: any other 5xx
is itself a violation (`server_error`) — authenticated decryption turns wrong or swapped
ciphertext into a `500`, so a history that let a `500` pass as "maybe" would hide wrong bytes. Attempts that share
`lop` are retries of one logical operation with the same Idempotency-Key: together they took
effect at most once, between the first invoke and the last definite return.

Time: expiry is stamped by the shard leader's wall clock; the checker works on the client's
monotonic clock and allows `skew` seconds either way (the stated skew bound: the largest clock
offset injected on any node plus slack for scheduling and rounding). A kubbi created in
[c0, c1] with ttl T expires somewhere in [c0 + T - skew, c1 + T + skew].

Checks, per kubbi:
  server_error          an answer 5xx other than 503 (a server fault, never a retriable answer)
  unexpected_answer     a 4xx other than 404, 409, 410 and 429 (e.g. a lost kubbi answered 400)
Run-level (`run_level`): recovery, convergence, and not_checked when a check could not be made.
  double_claim          more successful claims than max_retrievals, or a retrieval_count seen
                        twice, or a final count over the limit
  lost_create           an acknowledged kubbi answered 404, or expired before its time
  wrong_bytes           a claim returned bytes other than the created ones
  claim_after_terminal  a claim succeeded after a burn or delete had returned, or after expiry
  idempotency           retries of one logical op got different definite answers
  non_linearizable      no sequential order of the ops (WGL search over the model
                        absent -> active(count) -> burned | deleted | expired) explains them
  expiry_disagreement   not linearizable only because answers disagree on whether the kubbi had
                        expired (an "expired" followed by a success): expiry judged by two clocks
"""
import math
from dataclasses import dataclass, field

INF = math.inf


@dataclass
class Op:
    idx: int
    op: str
    lop: str
    k: str
    t0: float
    t1: float  # INF for indeterminate
    outcome: str  # ok | fail | info
    status: object
    error: object
    r: dict
    attempts: list = field(default_factory=list)

    def definite(self):
        return self.outcome != "info"


@dataclass
class Violation:
    kind: str
    kubbi: str
    message: str
    excerpt: list

    def as_dict(self):
        return {"kind": self.kind, "kubbi": self.kubbi, "message": self.message,
                "history": self.excerpt}


MUTATING = {"create", "claim", "delete"}

# The one 5xx the contract makes retriable: the outcome is unknown.
RETRIABLE_5XX = {503}
# 4xx answers outside 404/409/410 that are still not a fault: rate limited, nothing was done.
ALLOWED_REFUSALS = {429}


def contention(attempts):
    """How contended the claims were: claim requests, and those that overlapped in time another
    claim request of the same kubbi (the races exactly-once must survive)."""
    by_k = {}
    for a in attempts:
        if a.get("op") == "claim" and a.get("k") is not None:
            by_k.setdefault(a["k"], []).append((a["t0"], a["t1"]))
    claims = overlapping = 0
    for spans in by_k.values():
        spans.sort()
        claims += len(spans)
        hit = [False] * len(spans)
        reach, owner = float("-inf"), None  # the furthest end so far, and whose it is
        for i, (t0, t1) in enumerate(spans):
            if t0 < reach:
                hit[i] = True
                hit[owner] = True
            if t1 > reach:
                reach, owner = t1, i
        overlapping += sum(hit)
    return {"claims": claims, "claims_overlapping": overlapping}


def server_errors(attempts):
    """Attempts answered with a 5xx other than 503: each is a violation."""
    return [Violation("server_error", a.get("k"),
                      f"{a['op']} answered {a['status']} ({a.get('error')}): a server error is not an "
                      "indeterminate answer", [a])
            for a in attempts
            if isinstance(a.get("status"), int) and a["status"] >= 500 and a["status"] not in RETRIABLE_5XX]


def usable(a, unexpected=None):
    """Drops attempts that carry no information for the model: reads without a definite answer,
    requests refused before they were sent, and 4xx answers outside the contract's 404/409/410
    (counted in `unexpected`)."""
    st = a.get("status")
    if a["outcome"] == "fail" and st is None:
        return False
    if a["op"] not in MUTATING and (a["outcome"] == "info" or (st is not None and st >= 500)):
        return False
    if a["outcome"] == "fail" and st not in (404, 409, 410):
        if unexpected is not None:
            unexpected.append(a)
        return False
    return True


def logical_ops(attempts, unexpected=None):
    """Groups attempts by `lop`; returns (ops, idempotency violations)."""
    groups = {}
    order = []
    for a in attempts:
        if not usable(a, unexpected):
            continue
        key = a.get("lop") or id(a)
        if key not in groups:
            groups[key] = []
            order.append(key)
        groups[key].append(a)
    ops, bad = [], []
    for key in order:
        g = sorted(groups[key], key=lambda a: a["t0"])
        first = g[0]
        definite = [a for a in g if a["outcome"] != "info"]
        if first["op"] not in MUTATING:
            # Reads: each attempt is its own observation; unanswered reads tell nothing.
            for a in definite:
                ops.append(_mk(a, [a], a["outcome"], a["t0"], a["t1"]))
            continue
        if definite:
            outs = {_signature(a) for a in definite}
            if len(outs) > 1:
                bad.append(Violation("idempotency", first.get("k"),
                                     f"retries of {first['op']} {key} got different answers: {sorted(outs)}",
                                     g))
            last = definite[-1]
            ops.append(_mk(last, g, last["outcome"], first["t0"], last["t1"]))
        else:
            ops.append(_mk(first, g, "info", first["t0"], INF))
    return ops, bad


def _signature(a):
    r = a.get("r") or {}
    if a["outcome"] == "ok":
        return ("ok", r.get("h"), r.get("count"), r.get("id"))
    return ("fail", a.get("status"), a.get("error"), r.get("status"))


def _mk(a, g, outcome, t0, t1):
    return Op(idx=-1, op=a["op"], lop=a.get("lop"), k=a.get("k"), t0=t0, t1=t1, outcome=outcome,
              status=a.get("status"), error=a.get("error"), r=a.get("r") or {}, attempts=g)


TERMINAL_OF = {"burned": "B", "deleted": "D", "expired": "E", "active": "A"}


class KubbiModel:
    """Per-kubbi sequential model with time-dependent expiry."""

    def __init__(self, create, skew, sticky_expiry=True):
        self.sticky = sticky_expiry
        self.max = create.attempts[0].get("max")
        self.h = create.attempts[0].get("h")
        ttl = create.attempts[0]["ttl"]
        self.lo = create.t0 + ttl - skew  # earliest real time it may expire
        self.hi = create.t1 + ttl + skew  # latest real time it may still be active

    def candidates(self, s, op):
        st, cnt = s
        if st == "A":
            c = []
            if op.t0 < self.hi:
                c.append(("A", cnt))
            if op.t1 >= self.lo:
                c.append(("E", cnt))
            return c
        return [s]

    def step(self, s, op):
        """Possible next states after linearizing `op` in state `s` (empty: impossible)."""
        out = []
        for st, cnt in self.candidates(s, op):
            nxt = self._step1(st, cnt, op)
            if not self.sticky and s[0] == "A" and st == "E":
                # Diagnosis mode: this op saw the kubbi expired, but later ops may not.
                nxt = [("A", c) if x == "E" else (x, c) for x, c in nxt]
            out.extend(nxt)
        return out

    def _step1(self, st, cnt, op):
        r, M = op.r, self.max
        if st == "N":
            return [("A", 0)] if op.op == "create" and op.outcome in ("ok", "info") else []
        if op.op == "create":
            return []  # a kubbi is created once
        if op.op == "claim":
            if op.outcome == "ok":
                k = r.get("count")
                burned = bool(r.get("burned"))
                if st != "A" or r.get("h") != self.h:
                    return []
                if k is not None and k != cnt + 1:
                    return []
                if M is not None and cnt + 1 > M:
                    return []
                if burned != (M is not None and cnt + 1 == M):
                    return []
                return [("B" if burned else "A", cnt + 1)]
            if op.outcome == "info":
                if st == "A":
                    n = cnt + 1
                    return [("B" if (M is not None and n == M) else "A", n)]
                return [(st, cnt)]
            return self._terminal_answer(st, cnt, op)
        if op.op == "preview":
            if op.outcome == "ok":
                if st == "A" and r.get("status") == "active" and r.get("count", cnt) == cnt:
                    return [(st, cnt)]
                return []
            return self._terminal_answer(st, cnt, op)
        if op.op == "delete":
            if op.outcome == "ok":
                return [("D", cnt)] if st == "A" else []
            if op.outcome == "info":
                return [("D", cnt)] if st == "A" else [(st, cnt)]
            if op.status == 409:
                return [(st, cnt)] if st in "BDE" else []
            return []
        if op.op == "detail":
            if op.outcome != "ok":
                return []
            want = TERMINAL_OF.get(r.get("status"))
            if r.get("count", cnt) != cnt:
                return []
            # The producer's view may lag the clock by the expiry sweep: active is accepted
            # for a kubbi whose deadline passed (consumer reads are held to the strict rule).
            if want == st or (want == "A" and st == "E"):
                return [(st, cnt)]
            return []
        return []

    @staticmethod
    def _terminal_answer(st, cnt, op):
        if op.status == 410:
            want = TERMINAL_OF.get((op.r or {}).get("status"))
            if want is None:
                want = "E" if op.error == "expired" else None
            if want is None:  # 410 gone without a status: burned or deleted
                return [(st, cnt)] if st in "BD" else []
            return [(st, cnt)] if st == want else []
        return []  # 404 or anything else: not explainable


def wgl(ops, model, budget=200000):
    """Wing & Gong / Lowe search. Returns (ok, explored). Indeterminate ops are optional."""
    n = len(ops)
    must = 0
    for i, o in enumerate(ops):
        if o.definite():
            must |= 1 << i
    seen = set()
    explored = 0
    stack = [(0, ("N", 0))]
    while stack:
        done, s = stack.pop()
        if done & must == must:
            return True, explored
        if (done, s) in seen:
            continue
        seen.add((done, s))
        explored += 1
        if explored > budget:
            return None, explored
        pending = [i for i in range(n) if not done >> i & 1]
        min_ret = min(ops[i].t1 for i in pending)
        for i in pending:
            o = ops[i]
            if o.t0 > min_ret:
                continue
            for ns in model.step(s, o):
                stack.append((done | (1 << i), ns))
    return False, explored


def check(attempts, skew=3.0):
    """Returns (violations, stats) for a whole history."""
    by_k = {}
    for a in attempts:
        if a.get("k") is None:
            continue
        by_k.setdefault(a["k"], []).append(a)
    violations = server_errors(attempts)
    stats = {"kubbis": 0, "kubbis_unacknowledged": 0, "searched": 0, "search_budget_exceeded": 0,
             "unexpected_answers": 0}
    unexpected = []
    for k, atts in by_k.items():
        ops, bad = logical_ops(atts, unexpected)
        violations.extend(bad)
        creates = [o for o in ops if o.op == "create"]
        if not creates or creates[0].outcome != "ok":
            stats["kubbis_unacknowledged"] += 1
            continue
        stats["kubbis"] += 1
        create = creates[0]
        violations.extend(simple_checks(k, create, ops, skew))
        ops.sort(key=lambda o: o.t0)
        for i, o in enumerate(ops):
            o.idx = i
        model = KubbiModel(create, skew)
        ok, _ = wgl(ops, model)
        stats["searched"] += 1
        if ok is None:
            stats["search_budget_exceeded"] += 1
        elif not ok:
            relaxed, _ = wgl(ops, KubbiModel(create, skew, sticky_expiry=False))
            if relaxed:
                violations.append(Violation(
                    "expiry_disagreement", k,
                    "not linearizable: one answer saw the kubbi expired and a later one saw it active "
                    "(expiry judged by different clocks); each answer alone is within the skew bound",
                    excerpt(ops)))
            else:
                violations.append(Violation("non_linearizable", k,
                                            "no sequential order of create/preview/claim/delete explains these answers",
                                            excerpt(ops)))
    stats["unexpected_answers"] = len(unexpected)
    stats["unexpected_examples"] = unexpected[:5]
    # A 4xx outside the contract is an answer the model cannot place: a kubbi lost behind a 400,
    # 401 or 403 must not pass. 429 (rate limited, nothing done) is the one refusal allowed.
    violations.extend(Violation("unexpected_answer", a.get("k"),
                                f"{a['op']} answered {a.get('status')} ({a.get('error')}), outside the "
                                "contract's 404/409/410", [a])
                      for a in unexpected if a.get("status") not in ALLOWED_REFUSALS)
    return violations, stats


def run_level(stats, convergence, nemesis_failures, not_serving, unresolved, recovery_bound, missing_faults=()):
    """Violations of the run as a whole, beside the per-kubbi ones of `check`. What could not be
    checked fails the run as `not_checked`: a history past the search budget, replica digests
    that could not be compared, a fault the nemesis failed to inject or heal."""
    v = []
    if not_serving:
        v.append(Violation("recovery", None, f"nodes {not_serving} did not serve a create and a claim within "
                                             f"{recovery_bound:g}s of healing", []))
    if unresolved:
        v.append(Violation("recovery", None, f"{len(unresolved)} kubbis got no definite answer in the final sweep",
                           []))
    if not convergence.get("converged"):
        v.append(Violation("convergence", None, f"replicas did not converge: {convergence.get('problems')}", []))
    digests = convergence.get("digests") or {}
    if digests.get("mismatches"):
        v.append(Violation("convergence", None, "replica state digests differ", digests["mismatches"]))
    if not digests.get("available"):
        v.append(Violation("not_checked", None,
                           f"replica digests were not compared: {digests.get('reason', 'not asked')}", []))
    if stats.get("search_budget_exceeded"):
        v.append(Violation("not_checked", None,
                           f"{stats['search_budget_exceeded']} kubbis' histories exceeded the linearizability "
                           "search budget", []))
    if missing_faults:
        v.append(Violation("not_checked", None,
                           "fault kinds never injected: " + ", ".join(missing_faults), []))
    if nemesis_failures:
        v.append(Violation("not_checked", None,
                           f"{len(nemesis_failures)} nemesis steps failed: " + "; ".join(nemesis_failures[:5]), []))
    return v


def excerpt(ops):
    out = []
    for o in sorted(ops, key=lambda o: o.t0):
        for a in o.attempts:
            out.append(a)
    return out


def simple_checks(k, create, ops, skew):
    """Direct checks that name the invariant (the WGL search also catches most of these)."""
    v = []
    c0 = create.attempts[0]
    M, h, ttl = c0.get("max"), c0.get("h"), c0["ttl"]
    lo = create.t0 + ttl - skew
    hi = create.t1 + ttl + skew
    claims_ok = [o for o in ops if o.op == "claim" and o.outcome == "ok"]
    if M is not None and len(claims_ok) > M:
        v.append(Violation("double_claim", k, f"{len(claims_ok)} successful claims of a kubbi with max_retrievals {M}",
                           excerpt(ops)))
    counts = [o.r.get("count") for o in claims_ok if o.r.get("count") is not None]
    dup = {c for c in counts if counts.count(c) > 1}
    if dup:
        v.append(Violation("double_claim", k, f"retrieval_count {sorted(dup)} returned by more than one claim",
                           excerpt(ops)))
    for o in ops:
        if o.op == "detail" and o.outcome == "ok" and M is not None and (o.r.get("count") or 0) > M:
            v.append(Violation("double_claim", k, f"final retrieval_count {o.r.get('count')} over max_retrievals {M}",
                               excerpt(ops)))
    for o in claims_ok:
        if o.r.get("h") != h:
            v.append(Violation("wrong_bytes", k, f"claim returned bytes with sha256 {o.r.get('h')}, created {h}",
                               excerpt(ops)))
    ends = [o for o in ops if o.outcome == "ok" and ((o.op == "claim" and o.r.get("burned")) or o.op == "delete")]
    for o in claims_ok:
        for e in ends:
            if e is not o and e.t1 < o.t0:
                v.append(Violation("claim_after_terminal", k,
                                   f"claim invoked at {o.t0:.3f} succeeded after a {e.op} that ended it returned at {e.t1:.3f}",
                                   excerpt(ops)))
        if o.t0 >= hi:
            v.append(Violation("claim_after_terminal", k,
                               f"claim invoked at {o.t0:.3f} succeeded after expiry (latest deadline {hi:.3f}, skew bound {skew}s)",
                               excerpt(ops)))
    for o in ops:
        if o is create or not o.definite():
            continue
        if o.status == 404 and o.t0 > create.t1:
            v.append(Violation("lost_create", k, f"acknowledged kubbi answered 404 to {o.op} at {o.t0:.3f}",
                               excerpt(ops)))
        elif o.op in ("claim", "preview") and o.status == 410 and (o.error == "expired" or o.r.get("status") == "expired") and o.t1 < lo:
            v.append(Violation("lost_create", k,
                               f"{o.op} answered expired at {o.t1:.3f}, before the earliest deadline {lo:.3f}",
                               excerpt(ops)))
    return v
