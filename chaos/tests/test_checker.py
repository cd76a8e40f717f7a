"""The checker flags each kind of bug in hand-built histories, and passes correct ones.

    python3 -m unittest discover -s chaos/tests
"""
import functools
import os
import sys
import unittest
from unittest import mock

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from chaoslib import checker  # noqa: E402
from chaoslib.checker import KubbiModel, Op, check, run_level  # noqa: E402

H = "a" * 64
OTHER = "b" * 64


class B:
    """History builder: one kubbi per builder unless k is given."""

    def __init__(self):
        self.h = []
        self.n = 0

    def add(self, op, t0, t1, outcome="ok", status=200, error=None, r=None, k="k1", lop=None, **kw):
        self.n += 1
        a = {"op": op, "lop": lop or f"op{self.n}", "k": k, "t0": t0, "t1": t1, "outcome": outcome,
             "status": status, "error": error, "r": r or {}}
        a.update(kw)
        self.h.append(a)
        return self

    def create(self, t0=0.0, t1=0.1, ttl=3600, mx=1, h=H, k="k1", outcome="ok"):
        return self.add("create", t0, t1, outcome=outcome, status=201 if outcome == "ok" else None,
                        r={"id": f"id-{k}"}, k=k, ttl=ttl, max=mx, h=h)

    def claim(self, t0, t1, count, burned=False, h=H, k="k1", lop=None):
        return self.add("claim", t0, t1, r={"h": h, "count": count, "burned": burned}, k=k, lop=lop)

    def claim_fail(self, t0, t1, status=410, error="gone", st="burned", k="k1"):
        return self.add("claim", t0, t1, outcome="fail", status=status, error=error, r={"status": st}, k=k)

    def claim_info(self, t0, t1, k="k1", lop=None):
        return self.add("claim", t0, t1, outcome="info", status=None, error="timeout", k=k, lop=lop)

    def preview(self, t0, t1, count, k="k1"):
        return self.add("preview", t0, t1, r={"status": "active", "count": count}, k=k)

    def preview_fail(self, t0, t1, status=410, error="gone", st="burned", k="k1"):
        return self.add("preview", t0, t1, outcome="fail", status=status, error=error, r={"status": st}, k=k)

    def delete(self, t0, t1, outcome="ok", status=200, k="k1"):
        return self.add("delete", t0, t1, outcome=outcome, status=status, k=k)

    def detail(self, t0, t1, status, count, k="k1"):
        return self.add("detail", t0, t1, r={"status": status, "count": count}, k=k)


def kinds(h, skew=1.0):
    v, _ = check(h, skew=skew)
    return sorted({x.kind for x in v}), v


class CorrectHistoriesPass(unittest.TestCase):
    def test_concurrent_claims_within_limit(self):
        b = B().create(mx=2)
        b.claim(1.0, 2.0, 2, burned=True).claim(1.1, 1.5, 1)  # overlapping: count 1 then 2
        b.claim_fail(2.5, 2.6).preview_fail(3, 3.1)
        self.assertEqual(kinds(b.h)[0], [])

    def test_indeterminate_claim_may_take_effect_later(self):
        b = B().create(mx=2)
        b.claim_info(1.0, 1.2)  # timed out; took effect later
        b.preview(1.5, 1.6, 0)
        b.preview(3.0, 3.1, 1)
        b.claim(4.0, 4.1, 2, burned=True)
        self.assertEqual(kinds(b.h)[0], [])

    def test_idempotent_retry_counts_once(self):
        b = B().create(mx=2)
        b.claim_info(1.0, 2.0, lop="c1")
        b.claim(2.1, 2.2, 1, lop="c1")
        b.claim(3.0, 3.1, 2, burned=True)
        self.assertEqual(kinds(b.h)[0], [])

    def test_expiry_and_delete(self):
        b = B().create(ttl=2, mx=None)
        b.claim(0.5, 0.6, 1).claim(1.0, 1.1, 2)
        b.claim_fail(5.0, 5.1, error="expired", st="expired").delete(5.2, 5.3, outcome="fail", status=409)
        b.create(k="k2", mx=None).delete(1, 1.1, k="k2").claim_fail(1.2, 1.3, st="deleted", k="k2")
        self.assertEqual(kinds(b.h)[0], [])

    def test_unacknowledged_create_is_not_judged(self):
        b = B().create(outcome="info")
        self.assertEqual(kinds(b.h)[0], [])

    def test_producer_detail_may_lag_the_deadline(self):
        # The producer's view says active until the expiry sweep; consumer reads may not.
        b = B().create(ttl=2, mx=None).claim(0.5, 0.6, 1).detail(10.0, 10.1, "active", 1)
        self.assertEqual(kinds(b.h)[0], [])


class BugsAreFlagged(unittest.TestCase):
    def test_double_claim(self):
        b = B().create(mx=1)
        b.claim(1.0, 1.1, 1, burned=True).claim(2.0, 2.1, 1, burned=True)
        k, _ = kinds(b.h)
        self.assertIn("double_claim", k)
        self.assertIn("non_linearizable", k)

    def test_double_claim_with_overlap_only(self):
        # Two concurrent claims of a max-1 kubbi both succeed: no order allows that.
        b = B().create(mx=1)
        b.claim(1.0, 2.0, 1, burned=True).claim(1.0, 2.0, 1, burned=True)
        self.assertIn("double_claim", kinds(b.h)[0])

    # Each double_claim rule alone: the other two do not fire on these histories.
    def test_more_successful_claims_than_max_retrievals(self):
        b = B().create(mx=1)
        b.claim(1.0, 2.0, 1, burned=True).claim(1.0, 2.0, 2, burned=True)  # distinct counts, overlapping
        self.assertEqual(kinds(b.h)[0], ["double_claim", "non_linearizable"])

    def test_a_retrieval_count_returned_twice(self):
        b = B().create(mx=None)  # no limit to exceed
        b.claim(1.0, 2.0, 1).claim(1.0, 2.0, 1)
        self.assertEqual(kinds(b.h)[0], ["double_claim", "non_linearizable"])

    def test_final_retrieval_count_over_max_retrievals(self):
        b = B().create(mx=2)
        b.claim(1.0, 1.1, 1).claim(2.0, 2.1, 2, burned=True)
        b.detail(3.0, 3.1, "burned", 3)  # the sweep's producer read: a third retrieval was counted
        self.assertEqual(kinds(b.h)[0], ["double_claim", "non_linearizable"])

    def test_lost_create(self):
        b = B().create(mx=3)
        b.claim(1.0, 1.1, 1)
        b.add("preview", 2.0, 2.1, outcome="fail", status=404, error="not_found")
        k, v = kinds(b.h)
        self.assertIn("lost_create", k)
        lost = [x for x in v if x.kind == "lost_create"][0]
        self.assertTrue(any(a["op"] == "create" for a in lost.excerpt), "excerpt shows the create")

    def test_lost_create_seen_as_early_expiry(self):
        b = B().create(ttl=3600, mx=None)
        b.claim_fail(10.0, 10.1, error="expired", st="expired")
        self.assertEqual(kinds(b.h)[0], ["lost_create", "non_linearizable"])

    def test_producer_detail_expired_before_the_deadline(self):
        # Only the model sees this one (lost_create's early-expiry rule looks at consumer answers).
        b = B().create(ttl=3600, mx=None).detail(10.0, 10.1, "expired", 0)
        self.assertEqual(kinds(b.h)[0], ["non_linearizable"])

    def test_wrong_bytes(self):
        b = B().create(mx=2)
        b.claim(1.0, 1.1, 1, h=OTHER)
        k, _ = kinds(b.h)
        self.assertEqual(k, ["non_linearizable", "wrong_bytes"])  # the model checks the bytes too

    def test_claim_after_expiry(self):
        b = B().create(ttl=2, mx=None)
        b.claim(0.5, 0.6, 1)
        b.claim(10.0, 10.1, 2)  # well past 0.1 + 2 + skew
        k, _ = kinds(b.h, skew=1.0)
        self.assertIn("claim_after_terminal", k)
        self.assertIn("non_linearizable", k)

    def test_claim_within_skew_bound_is_allowed(self):
        b = B().create(ttl=2, mx=None)
        b.claim(2.5, 2.6, 1)  # past ttl but inside the stated skew bound
        self.assertEqual(kinds(b.h, skew=1.0)[0], [])

    def test_claim_after_burn_and_delete(self):
        b = B().create(mx=1).claim(1.0, 1.1, 1, burned=True).claim(2.0, 2.1, 2)
        self.assertIn("claim_after_terminal", kinds(b.h)[0])
        b = B().create(mx=None).delete(1.0, 1.1).claim(2.0, 2.1, 1)
        self.assertIn("claim_after_terminal", kinds(b.h)[0])

    def test_non_linearizable_preview(self):
        # A preview invoked after a claim returned (count 1) still sees count 0: a stale read.
        b = B().create(mx=3)
        b.claim(1.0, 1.1, 1)
        b.preview(2.0, 2.1, 0)
        k, v = kinds(b.h)
        self.assertEqual(k, ["non_linearizable"])
        self.assertEqual(len(v[0].excerpt), 3)

    def test_preview_active_after_burn(self):
        b = B().create(mx=1).claim(1.0, 1.1, 1, burned=True).preview(2.0, 2.1, 0)
        self.assertEqual(kinds(b.h)[0], ["non_linearizable"])
        # The count alone would fit: it is the burned state that rules the answer out.
        b = B().create(mx=1).claim(1.0, 1.1, 1, burned=True).preview(2.0, 2.1, 1)
        self.assertEqual(kinds(b.h)[0], ["non_linearizable"])

    def test_preview_active_after_expiry(self):
        b = B().create(ttl=2, mx=None).preview(10.0, 10.1, 0)
        self.assertEqual(kinds(b.h, skew=1.0)[0], ["non_linearizable"])

    # Rules of the model that no direct check repeats: each history breaks exactly one.
    def test_claim_count_skips_a_retrieval(self):
        b = B().create(mx=None).claim(1.0, 1.1, 1).claim(2.0, 2.1, 3)
        self.assertEqual(kinds(b.h)[0], ["non_linearizable"])

    def test_burned_flag_only_on_the_last_retrieval(self):
        b = B().create(mx=2).claim(1.0, 1.1, 1, burned=True)  # burned one retrieval early
        self.assertEqual(kinds(b.h)[0], ["non_linearizable"])
        b = B().create(mx=1).claim(1.0, 1.1, 1, burned=False)  # the last retrieval did not burn
        self.assertEqual(kinds(b.h)[0], ["non_linearizable"])

    def test_claim_refused_as_burned_while_active(self):
        b = B().create(mx=2).claim_fail(1.0, 1.1, status=410, error="gone", st="burned")
        self.assertEqual(kinds(b.h)[0], ["non_linearizable"])

    def test_claim_refused_gone_without_status_while_active(self):
        b = B().create(mx=2).claim_fail(1.0, 1.1, status=410, error="gone", st=None)
        self.assertEqual(kinds(b.h)[0], ["non_linearizable"])

    def test_delete_succeeds_after_burn(self):
        b = B().create(mx=1).claim(1.0, 1.1, 1, burned=True).delete(2.0, 2.1)
        self.assertEqual(kinds(b.h)[0], ["non_linearizable"])

    def test_delete_refused_409_while_active(self):
        b = B().create(mx=2).delete(1.0, 1.1, outcome="fail", status=409)
        self.assertEqual(kinds(b.h)[0], ["non_linearizable"])

    def test_producer_detail_with_a_stale_count(self):
        b = B().create(mx=None).claim(1.0, 1.1, 1).detail(2.0, 2.1, "active", 0)
        self.assertEqual(kinds(b.h)[0], ["non_linearizable"])

    def test_producer_detail_with_a_wrong_status(self):
        b = B().create(mx=None).detail(1.0, 1.1, "burned", 0)
        self.assertEqual(kinds(b.h)[0], ["non_linearizable"])

    def test_model_refuses_a_claim_past_max_retrievals(self):
        # Defence in depth: with max_retrievals >= 1 (the API's minimum) an active state at the
        # limit is unreachable through the other rules, so this rule is tested on the model.
        create = Op(0, "create", "c", "k1", 0.0, 0.1, "ok", 201, None, {},
                    attempts=[{"ttl": 3600, "max": 1, "h": H}])
        claim = Op(1, "claim", "c2", "k1", 1.0, 1.1, "ok", 200, None, {"h": H, "count": 2, "burned": False})
        self.assertEqual(KubbiModel(create, skew=1.0).step(("A", 1), claim), [])

    def test_expired_then_claimed_is_flagged(self):
        # Seen for real (seed 2): a preview answers expired, a later claim succeeds; both times
        # are inside the skew bound, but a kubbi cannot expire and come back.
        b = B().create(t0=19.67, t1=19.97, ttl=3, mx=None)
        b.claim(19.98, 20.29, 1)
        b.preview_fail(20.71, 20.97, error="expired", st="expired")
        b.claim(22.09, 22.48, 2)
        self.assertEqual(kinds(b.h, skew=3.0)[0], ["expiry_disagreement"])

    def test_idempotency_violation(self):
        b = B().create(mx=2)
        b.claim(1.0, 1.1, 1, lop="c1")
        b.add("claim", 1.2, 1.3, outcome="fail", status=410, error="gone", r={"status": "burned"}, lop="c1")
        self.assertIn("idempotency", kinds(b.h)[0])

    def test_a_500_is_a_violation_not_an_indeterminate_answer(self):
        # Wrong or swapped ciphertext fails authenticated decryption and is answered 500; as
        # "maybe applied" it would pass, so every 5xx but 503 is flagged, on writes and reads.
        for op, st in (("claim", 500), ("preview", 500), ("create", 502)):
            b = B().create(mx=2)
            b.add(op, 1.0, 1.1, outcome="info", status=st, error="internal_error")
            self.assertEqual(kinds(b.h)[0], ["server_error"], (op, st))

    def test_a_503_stays_indeterminate(self):
        b = B().create(mx=2)
        b.add("claim", 1.0, 1.1, outcome="info", status=503, error="unavailable")
        b.claim(2.0, 2.1, 2, burned=True)
        self.assertEqual(kinds(b.h)[0], [])

    def test_a_lost_kubbi_answered_400_401_or_403_is_flagged(self):
        for st in (400, 401, 403):
            b = B().create(mx=1)
            b.claim_fail(1.0, 1.1, status=st, error="bad_request", st=None)
            self.assertEqual(kinds(b.h)[0], ["unexpected_answer"], st)

    def test_a_rate_limited_request_is_no_violation(self):
        b = B().create(mx=1)
        b.claim_fail(1.0, 1.1, status=429, error="rate_limited", st=None)
        b.claim(2.0, 2.1, 1, burned=True)
        self.assertEqual(kinds(b.h)[0], [])


class SearchBudget(unittest.TestCase):
    def test_a_history_past_the_search_budget_is_counted_and_fails_the_run(self):
        # Ten overlapping timed-out claims and a preview no subset explains: the search must try
        # every subset, more than a budget of 100 states allows. Not a pass, and not a verdict.
        b = B().create(mx=None)
        for i in range(10):
            b.claim_info(1.0, 1.5)
        b.preview(5.0, 5.1, 11)
        with mock.patch.object(checker, "wgl", functools.partial(checker.wgl, budget=100)):
            v, stats = check(b.h, skew=1.0)
        self.assertEqual((v, stats["search_budget_exceeded"]), ([], 1))
        args = dict(RunLevel.CLEAN, stats=stats)
        self.assertEqual([x.kind for x in run_level(**args)], ["not_checked"])


class RunLevel(unittest.TestCase):
    """What could not be checked fails the run, as do recovery and convergence problems."""

    CLEAN = dict(stats={"search_budget_exceeded": 0},
                 convergence={"converged": True, "digests": {"available": True, "mismatches": []}},
                 nemesis_failures=[], not_serving=[], unresolved=[], recovery_bound=60.0)

    def kinds(self, **change):
        args = dict(self.CLEAN, **change)
        return [v.kind for v in run_level(**args)]

    def test_a_clean_run_passes(self):
        self.assertEqual(self.kinds(), [])

    def test_each_gap_or_problem_fails_the_run(self):
        cases = {
            "budget": (dict(stats={"search_budget_exceeded": 2}), ["not_checked"]),
            "no digests": (dict(convergence={"converged": True, "digests": {"available": False,
                                                                           "reason": "timeout"}}),
                           ["not_checked"]),
            "nemesis": (dict(nemesis_failures=["partition: heal failed"]), ["not_checked"]),
            "fault never injected": (dict(missing_faults=["overlap"]), ["not_checked"]),
            "sweep": (dict(unresolved=["k7"]), ["recovery"]),
            "serving": (dict(not_serving=[2]), ["recovery"]),
            "digests differ": (dict(convergence={"converged": True, "digests": {
                "available": True, "mismatches": [{"group": "1"}]}}), ["convergence"]),
            "not converged": (dict(convergence={"converged": False, "problems": "leaders",
                                                "digests": {"available": True, "mismatches": []}}),
                              ["convergence"]),
        }
        for what, (change, expected) in cases.items():
            self.assertEqual(self.kinds(**change), expected, what)


if __name__ == "__main__":
    unittest.main()


class Contention(unittest.TestCase):
    def test_counts_claims_that_overlap_another_claim_of_the_same_kubbi(self):
        def claim(k, t0, t1):
            return {"op": "claim", "k": k, "t0": t0, "t1": t1}
        hist = [
            claim("a", 0.0, 1.0), claim("a", 0.5, 0.6),  # nested: both overlap
            claim("a", 2.0, 3.0), claim("a", 3.0, 4.0),  # touching ends do not overlap
            claim("b", 0.2, 0.9),  # another kubbi at the same time: no overlap
            {"op": "preview", "k": "a", "t0": 2.5, "t1": 2.6},  # not a claim
            claim("c", 0.0, 5.0), claim("c", 1.0, 2.0), claim("c", 4.0, 6.0),  # chained by the first
        ]
        self.assertEqual(checker.contention(hist), {"claims": 8, "claims_overlapping": 5})
