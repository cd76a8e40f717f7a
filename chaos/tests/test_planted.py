"""The whole suite against planted bugs: each must fail the run and be named in the verdict.

Each test is one end-to-end run of the driver's own run phase (`chaoslib.main.exercise`: start the
cluster, API keys, seeded workload, seeded nemesis, heal, recovery, convergence and digests, final
sweep, `checker.check` and `checker.run_level`) against a 3-node cluster of `fakekubbi.py` with one
planted bug, plus one run without a bug that must pass, with process faults, so the tests fail in
both directions. chaos/run itself needs root for its network namespaces, nft, tmpfs and FUSE
mounts; here the nodes are plain processes on 127.0.0.1-3 (same port on each address, as in the
namespaces), so the tests run unprivileged and beside a real chaos run. The nemesis injects what
works on that cluster, kill -9 and SIGSTOP (partitions, clock skew, power loss, disk full and
membership need the namespaces, mounts or the real binary): in the clean run, and for `lose`,
whose lost writes show only after the leader restarts. Fixed seeds for the workload, the nemesis
and the fake's bug dice; thread timing still varies, so each bug fires many times a run.

    python3 -m unittest discover -s chaos/tests
"""
import contextlib
import io
import os
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import unittest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from chaoslib import main as driver  # noqa: E402
from chaoslib.cluster import Cluster, Node  # noqa: E402

FAKE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fakekubbi.py")
NODES = 3
PROCESS_FAULTS = ["kill_one", "kill_leaders", "kill_minority", "pause"]
NEMESIS_TIMING = {"quiet": (0.5, 1.0), "hold": (0.5, 1.5)}
# Kinds a bug may cause besides the one it is named by: the WGL search catches most bugs a second
# time, and a lost claim or delete looks like a double claim or a claim after the end. Any other
# kind (a run-level one, server_error, unexpected_answer) would be the harness misbehaving.
ALSO = {
    "double-claim": {"claim_after_terminal", "non_linearizable"},
    "lose": {"double_claim", "claim_after_terminal", "idempotency", "non_linearizable"},
    "bytes": {"non_linearizable"},
    "corrupt-500": set(),
    "stale-preview": set(),
    "claim-after-expiry": {"non_linearizable", "expiry_disagreement"},
}


def free_port():
    """A port outside the ephemeral range (so a client socket cannot hold it when a killed node
    restarts) that is free on every node address."""
    rng = random.Random()
    for _ in range(200):
        port = rng.randrange(20000, 30000, 2)
        try:
            for i in range(1, NODES + 1):
                for p in (port, port + 1):
                    with socket.socket() as s:
                        s.bind((f"127.0.0.{i}", p))
            return port
        except OSError:
            continue
    raise RuntimeError("no free port pair on 127.0.0.1-3")


class LoopbackNode(Node):
    """A node as a plain process on 127.0.0.<id>: no namespace, no nsenter."""

    def __init__(self, cluster, i, port, env):
        super().__init__(cluster, i)
        self.ip = f"127.0.0.{i}"
        self.http = f"{self.ip}:{port}"
        self.internal = f"{self.ip}:{port + 1}"
        self.extra_env = env

    def env(self):
        return {**super().env(), **self.extra_env}

    def start(self):
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(self.cmd(), stdout=subprocess.DEVNULL, stderr=log, env=self.env(),
                                         start_new_session=True)
        self.stopped = False


class LoopbackCluster(Cluster):
    def __init__(self, run_dir, env):
        super().__init__(run_dir, FAKE, NODES)
        port = free_port()
        self.nodes = {i: LoopbackNode(self, i, port, env) for i in range(1, NODES + 1)}
        self.bootstrap = ",".join(f"{nd.id}={nd.internal}@{nd.zone}" for nd in self.nodes.values())

    def start(self, timeout=30):
        self.write_secrets()
        for nd in self.active():
            nd.prepare()
            nd.start()
        self.wait_led(timeout)


def run(bug, seed, faults=(), duration=5.0, extra=()):
    """One run of the suite; returns (report, violation kinds, captured output). The run
    directory (history.jsonl, node logs) is report["run_dir"]; the caller removes it."""
    run_dir = tempfile.mkdtemp(prefix=f"kchaos-planted-{bug or 'clean'}-")
    a = driver.parse(["--seed", str(seed), "--duration", str(duration), "--nodes", str(NODES), "--bin", FAKE,
                      "--clients", "8", "--timeout", "3", "--recovery-bound", "20", "--faults", ",".join(faults),
                      *extra])
    env = {"FAKEKUBBI_BUG": bug or "", "FAKEKUBBI_SEED": str(seed)}
    cluster = LoopbackCluster(run_dir, env)
    report = {"seed": seed, "bug": bug, "run_dir": run_dir}
    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out):
            violations = driver.exercise(a, cluster, report, skew_bound=1.0, nemesis_timing=NEMESIS_TIMING)
    except BaseException:
        shutil.rmtree(run_dir, ignore_errors=True)
        raise
    finally:
        cluster.stop()
    return report, sorted({v.kind for v in violations}), out.getvalue()


def describe(report, out):
    vs = report.get("violations", [])
    lines = [f"result {report.get('result')}, {report.get('ops_total')} requests {report.get('ops')}, "
             f"faults {report.get('faults')}, checker {report.get('checker')}"]
    lines += [f"  {v['kind']} {v['kubbi']}: {v['message']}" for v in vs[:8]]
    lines.append(f"history and node logs kept in {report['run_dir']} (chaos/check --skew 1 DIR re-checks it)")
    return "\n".join(lines) + "\n" + out


class PlantedBugsFailTheRun(unittest.TestCase):
    def assert_flagged(self, bug, kind, seed, faults=(), duration=5.0):
        report, kinds, out = run(bug, seed, faults, duration)
        why = describe(report, out)
        self.assertEqual(report.get("result"), "fail", why)
        self.assertIn(kind, kinds, why)
        self.assertLessEqual(set(kinds), {kind} | ALSO[bug], why)
        shutil.rmtree(report["run_dir"])  # kept when an assertion fails

    def test_double_claim(self):
        self.assert_flagged("double-claim", "double_claim", seed=11)

    def test_lost_create(self):
        # Lost writes only show once the leader restarts and replays its log: the nemesis kills it.
        self.assert_flagged("lose", "lost_create", seed=12, faults=["kill_leaders"])

    def test_wrong_bytes(self):
        self.assert_flagged("bytes", "wrong_bytes", seed=13)

    def test_corrupt_ciphertext_answered_500(self):
        self.assert_flagged("corrupt-500", "server_error", seed=14)

    def test_stale_preview(self):
        self.assert_flagged("stale-preview", "non_linearizable", seed=15)

    def test_claim_after_expiry(self):
        # Only kubbis with a short ttl get claimed past their deadline plus the skew bound; a
        # 10-second run gives some 20 such claims, a 5-second one only 1 or 2.
        self.assert_flagged("claim-after-expiry", "claim_after_terminal", seed=16, duration=10.0)


class CorrectServerPasses(unittest.TestCase):
    def test_hot_keys_race_claims_and_a_correct_server_passes(self):
        report, kinds, out = run(None, seed=22, duration=6.0, extra=["--hot-period", "1", "--hot-window", "1.5"])
        why = describe(report, out) + f"\nhot keys: {report.get('hot_keys')}"
        self.assertEqual((report.get("result"), kinds), ("pass", []), why)
        hot = report["hot_keys"]
        self.assertGreaterEqual(hot["phases"], 2, why)
        # Claims of one kubbi racing each other, by the dozen (a few per run without phases).
        self.assertGreater(hot["claims"], 50, why)
        self.assertGreater(hot["claims_overlapping"], 50, why)
        shutil.rmtree(report["run_dir"])  # kept when an assertion fails

    def test_clean_run_under_process_faults_passes(self):
        # Seed 21's nemesis kills the leader first, then pauses a node (leader or follower).
        report, kinds, out = run(None, seed=21, faults=PROCESS_FAULTS, duration=6.0)
        why = describe(report, out)
        self.assertEqual((report.get("result"), kinds), ("pass", []), why)
        # Not a vacuous pass: the run did work, the faults bit, the sweep and digests were checked.
        ops = report["ops"]
        self.assertGreater(ops.get("create", {}).get("ok", 0), 50, why)
        self.assertGreater(ops.get("claim", {}).get("ok", 0), 20, why)
        self.assertGreater(ops.get("preview", {}).get("ok", 0), 20, why)
        self.assertGreater(ops.get("detail", {}).get("ok", 0), 50, why)
        self.assertGreaterEqual(report["faults"].get("kill_leaders", 0), 1, why)
        self.assertGreaterEqual(report["faults"].get("pause", 0), 1, why)
        self.assertGreater(report["checker"]["kubbis"], 50, why)
        self.assertTrue(report["convergence"]["digests"]["available"], why)
        shutil.rmtree(report["run_dir"])  # kept when an assertion fails


if __name__ == "__main__":
    unittest.main()
