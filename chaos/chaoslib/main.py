"""chaos/run: a real kubbi cluster, a seeded workload, a seeded nemesis, and the checker."""
import argparse
import json
import os
import random
import shutil
import signal
import sys
import threading
import time
import traceback
import urllib.request
import uuid

from . import checker, deps, netns
from .cluster import Cluster, Node, http_json
from .nemesis import Nemesis
from .workload import History, Workload

CHAOS = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ALL_FAULTS = ["kill_one", "kill_leaders", "kill_minority", "pause", "partition_halves", "partition_leader",
              "partition_oneway", "clock_skew", "power_loss", "disk_full", "membership", "hot_leader",
              "overlap", "split", "move"]
# Kinds that run only when --faults names them (not part of the default mix, which CI runs with
# --require-every-fault in a fixed time).
OPT_IN_FAULTS = ["rolling_restart"]
RECOVERY_BOUND_S = 60.0


def default_bin():
    if os.environ.get("KUBBI_BIN"):
        return os.environ["KUBBI_BIN"]
    target = os.environ.get("CARGO_TARGET_DIR", os.path.expanduser("~/.cache/kubbi-target"))
    return os.path.join(target, "release", "kubbi")


def parse(argv):
    ap = argparse.ArgumentParser(prog="chaos/run", description=__doc__)
    ap.add_argument("--seed", type=int, required=True)
    ap.add_argument("--duration", type=float, required=True, help="seconds of workload under faults")
    ap.add_argument("--nodes", type=int, default=5)
    ap.add_argument("--bin", default=None, help="kubbi binary (default $KUBBI_BIN or the release build)")
    ap.add_argument("--upgrade-bin", default=None,
                    help="a second kubbi binary: each rolling_restart moves every node to the other "
                         "binary in turn (this one first), so versions mix while it rolls")
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--initial-groups", "--shards", dest="groups", type=int, default=0,
                    help="data raft groups of the new cluster (default 0: one per node, kubbi's default)")
    ap.add_argument("--faults", default=",".join(ALL_FAULTS), help="comma-separated fault kinds")
    ap.add_argument("--skew", type=int, default=10, help="clock skew injected on the faketime node, seconds")
    ap.add_argument("--quiet", default=None, help="LO,HI seconds between faults (default 2,6)")
    ap.add_argument("--hold", default=None, help="LO,HI seconds a fault is held (default 4,12)")
    ap.add_argument("--require-every-fault", action="store_true",
                    help="fail the run (not_checked) when a fault kind of --faults was never injected")
    ap.add_argument("--out", default=None, help="run directory (default chaos/.runs/seed-S-TIME)")
    ap.add_argument("--keep", action="store_true", help="keep data directories even when the run passes")
    ap.add_argument("--timeout", type=float, default=5.0, help="client request timeout, seconds")
    ap.add_argument("--hot-period", type=float, default=15.0,
                    help="seconds between hot-key phases (0: none); see chaoslib/workload.py")
    ap.add_argument("--hot-window", type=float, default=4.0, help="seconds a hot-key phase lasts")
    ap.add_argument("--recovery-bound", type=float, default=RECOVERY_BOUND_S)
    a = ap.parse_args(argv)
    a.bin = a.bin or default_bin()
    a.faults = [f for f in a.faults.split(",") if f]
    for f in a.faults:
        if f not in ALL_FAULTS + OPT_IN_FAULTS:
            ap.error(f"unknown fault {f}; known: {', '.join(ALL_FAULTS + OPT_IN_FAULTS)}")
    if a.nodes < 3:
        ap.error("--nodes must be at least 3")
    a.nemesis_timing = {}
    for name in ("quiet", "hold"):
        v = getattr(a, name)
        if v is None:
            continue
        try:
            lo, hi = (float(x) for x in v.split(","))
        except ValueError:
            ap.error(f"--{name} takes LO,HI seconds, e.g. 1,3")
        if not 0 <= lo <= hi:
            ap.error(f"--{name}: need 0 <= LO <= HI")
        a.nemesis_timing[name] = (lo, hi)
    return a


def layout(n):
    """Which nodes get lazyfs, the small disk and the faketime clock. Two lazyfs nodes on any
    cluster: on 3 nodes they are a quorum of every group, so a power loss of both keeps only what
    was fsync'd on a majority, and a missing fsync loses acknowledged writes."""
    return {1, 2}, {3}, {n}


def summarize_ops(entries):
    ops = {}
    for e in entries:
        if "op" not in e:
            continue
        d = ops.setdefault(e["op"], {})
        key = e["outcome"] if e["outcome"] != "fail" else f"fail:{e.get('status') or e.get('error')}"
        d[key] = d.get(key, 0) + 1
    return ops


def recovery(wl, cluster, bound):
    """Time until every member serves a create and a claim again after healing."""
    t0 = time.monotonic()
    rng = random.Random("recovery")
    pending = {nd.id for nd in cluster.active() if nd.proc is not None}
    while pending and time.monotonic() - t0 < bound:
        for nid in sorted(pending):
            nd = cluster.nodes[nid]
            kb = wl.create("recovery", rng, node=nd.http)
            if kb is not None:
                outcome, _, _ = wl.attempt("recovery", rng, "claim", f"{kb.k}/rc", kb.k, "POST",
                                           f"/r/{kb.token}/claim", parse=wl.parse_claim, node=nd.http)
                if outcome == "ok":
                    pending.discard(nid)
        if pending:
            time.sleep(0.5)
    return time.monotonic() - t0, sorted(pending)


def quiet_evidence(cluster):
    """Sums, over the live nodes, how often their groups went quiet and why they woke
    (`kubbi_raft_quiet_parks_total`, `kubbi_raft_quiet_wakes_total{reason}`; counters since each
    node's last start): evidence that the run exercised quiet groups (`src/raft/quiet.rs`)."""
    out = {}
    for nd in cluster.active():
        if nd.proc is None:
            continue
        try:
            with urllib.request.urlopen(f"http://{nd.http}/metrics", timeout=5) as r:
                text = r.read().decode()
        except Exception:  # noqa: BLE001
            continue
        for line in text.splitlines():
            name, _, value = line.rpartition(" ")
            if name == "kubbi_raft_quiet_parks_total":
                key = "parks"
            elif name.startswith('kubbi_raft_quiet_wakes_total{reason="'):
                key = "wakes_" + name.split('"')[1]
            else:
                continue
            out[key] = out.get(key, 0) + int(float(value))
    return out


def convergence(cluster, bound=60.0):
    """Waits until every member reports every shard led with zero replication lag, and all members
    agree on the leaders. Also asks for per-replica state digests (needs a server endpoint)."""
    t0 = time.monotonic()
    last = None
    while time.monotonic() - t0 < bound:
        views = {}
        try:
            for nd in cluster.active():
                if nd.proc is None:
                    continue
                views[nd.id] = nd.status(timeout=5)
            problems = []
            leaders = {}
            for nid, st in views.items():
                for s in st.get("shards", []):
                    if not isinstance(s.get("leader"), int):
                        problems.append(f"node {nid}: shard {s['id']} has no leader")
                    lag = s.get("replication_lag") or {}
                    if any(v for v in lag.values()):
                        problems.append(f"node {nid}: shard {s['id']} lag {lag}")
                    leaders.setdefault(str(s["id"]), set()).add((s.get("leader"), s.get("applied_index")))
            for sid, ls in leaders.items():
                if len(ls) > 1:
                    problems.append(f"shard {sid}: members disagree on (leader, applied) {sorted(map(str, ls))}")
            if not problems:
                return {"converged": True, "seconds": round(time.monotonic() - t0, 2), "digests": digests(cluster)}
            last = problems[:5]
        except Exception as e:  # noqa: BLE001
            last = [str(e)]
        time.sleep(1)
    return {"converged": False, "seconds": round(time.monotonic() - t0, 2), "problems": last,
            "digests": digests(cluster)}


def digests(cluster):
    """Per-replica state digests, compared at equal applied index. The server needs
    GET /admin/v1/digest (local replicas only, no forwarding); until it exists this says so."""
    per = {}
    for nd in cluster.active():
        if nd.proc is None:
            continue
        try:
            st, body = http_json("GET", nd.url("/admin/v1/digest"), token=cluster.admin, timeout=10)
        except Exception as e:  # noqa: BLE001
            return {"available": False, "reason": str(e)}
        if st != 200 or not isinstance(body, dict):
            return {"available": False, "reason": f"GET /admin/v1/digest answered {st}"}
        for g in body.get("groups", []):
            per.setdefault(str(g["id"]), []).append((nd.id, g.get("applied_index"), g.get("digest")))
    mismatches = []
    for gid, rows in per.items():
        by_index = {}
        for nid, idx, dg in rows:
            by_index.setdefault(idx, set()).add(dg)
        for idx, ds in by_index.items():
            if len(ds) > 1:
                mismatches.append({"group": gid, "applied_index": idx, "replicas": rows})
    return {"available": True, "groups": len(per), "mismatches": mismatches}


def fault_details(entries):
    """Evidence that the faults bit: unsynced bytes dropped, ENOSPC seen, joins completed."""
    d = {"power_loss_unsynced_bytes_dropped": 0, "power_loss_node_cuts": 0, "disk_full_enospc_logged": 0,
         "disk_full_restarts_while_full": 0, "disk_full_node_exited_while_full": 0,
         "membership_joins_completed": 0, "membership_removes_completed": 0,
         "power_loss_of_two_nodes_at_once": 0, "clock_steps_seen": 0, "clock_steps_back": 0,
         "clock_skew_leader_kills": 0, "hot_leader_hits": 0, "overlap_leader_kills_while_split": 0,
         "group_splits_answered": 0, "group_splits_with_leader_killed": 0,
         "group_splits_with_leader_isolated": 0, "group_moves_answered": 0,
         "group_moves_with_leader_killed": 0, "group_moves_with_target_isolated": 0,
         "group_splits_with_replica_power_loss": 0, "group_moves_with_target_power_loss": 0}
    last_skew = {}
    for e in entries:
        k, ph = e.get("nemesis"), e.get("phase")
        if k == "power_loss" and ph == "start":
            cut = e.get("unsynced_dropped") or {}
            for v in cut.values():
                d["power_loss_node_cuts"] += 1
                d["power_loss_unsynced_bytes_dropped"] += (v or {}).get("bytes", 0)
            if len(cut) >= 2:
                d["power_loss_of_two_nodes_at_once"] += 1
        elif k == "clock_skew" and ph in ("start", "step") and e.get("took_effect"):
            d["clock_steps_seen"] += 1
            node = (e.get("nodes") or [None])[0]
            if e.get("seconds", 0) < last_skew.get(node, 0):
                d["clock_steps_back"] += 1
            last_skew[node] = e.get("seconds", 0)
        elif k == "clock_skew" and ph == "kill_leader":
            d["clock_skew_leader_kills"] += 1
        elif k == "hot_leader" and ph == "start":
            d["hot_leader_hits"] += 1
        elif k == "overlap" and ph == "kill_leader":
            d["overlap_leader_kills_while_split"] += 1
        elif k == "disk_full" and ph == "end" and e.get("enospc_logged"):
            d["disk_full_enospc_logged"] += 1
        elif k == "disk_full" and ph == "restarted_while_full":
            d["disk_full_restarts_while_full"] += 1
            if e.get("exit") is not None:
                d["disk_full_node_exited_while_full"] += 1
        elif k == "split" and ph == "end" and e.get("status") == 200:
            d["group_splits_answered"] += 1
        elif k == "split" and ph == "kill_leader":
            d["group_splits_with_leader_killed"] += 1
        elif k == "split" and ph == "isolate_leader":
            d["group_splits_with_leader_isolated"] += 1
        elif k == "move" and ph == "end" and e.get("status") == 200:
            d["group_moves_answered"] += 1
        elif k == "move" and ph == "kill_leader":
            d["group_moves_with_leader_killed"] += 1
        elif k == "move" and ph == "isolate_target":
            d["group_moves_with_target_isolated"] += 1
        elif k == "split" and ph == "power_loss_target":
            d["group_splits_with_replica_power_loss"] += 1
        elif k == "move" and ph == "power_loss_target":
            d["group_moves_with_target_power_loss"] += 1
        elif k == "membership" and ph == "end" and e.get("completed"):
            d[f"membership_{e.get('action')}s_completed"] = d.get(f"membership_{e.get('action')}s_completed", 0) + 1
    return d


def make_api_keys(cluster, n=2, timeout=60):
    keys = []
    deadline = time.monotonic() + timeout
    while len(keys) < n and time.monotonic() < deadline:
        nd = random.choice(cluster.active())
        try:
            st, body = http_json("POST", nd.url("/admin/v1/api-keys"), {"label": f"chaos{len(keys)}"},
                                 token=cluster.admin, timeout=5)
            if st == 201:
                keys.append(body["api_key"])
                continue
        except Exception:  # noqa: BLE001
            pass
        time.sleep(0.5)
    if len(keys) < n:
        raise RuntimeError("could not create API keys")
    return keys


def exercise(a, cluster, report, skew_bound, spare=None, stop_requested=None, nemesis_timing=None):
    """The run proper, on a cluster that is not started yet: start it, API keys, workload and
    nemesis for `a.duration` seconds, heal, recovery, convergence, final sweep, then the checker.
    Fills `report` and returns the violations (run-level first). `a` is what `parse` returns;
    `nemesis_timing` (quiet=, hold=) shortens the nemesis' pauses. main() calls this inside the
    network namespaces; tests/test_planted.py calls it on a loopback cluster of fake nodes."""
    stop_requested = stop_requested or threading.Event()
    wl = nem = None
    try:
        t_start = time.monotonic()
        cluster.start()
        report["startup_s"] = round(time.monotonic() - t_start, 2)
        keys = make_api_keys(cluster)
        history = History(os.path.join(cluster.dir, "history.jsonl"), time.monotonic())
        members = [nd.http for nd in cluster.active()]
        members_lock = threading.Lock()

        def nodes_fn():
            with members_lock:
                return list(members)

        def on_membership():
            with members_lock:
                members[:] = [nd.http for nd in cluster.active()]

        wl = Workload(a.seed, nodes_fn, keys, history, clients=a.clients, timeout=a.timeout,
                      hot_period=a.hot_period, hot_window=a.hot_window)
        timing = dict(getattr(a, "nemesis_timing", None) or {})
        timing.update(nemesis_timing or {})
        nem = Nemesis(a.seed, cluster, history, a.faults, skew_s=a.skew, spare=spare, on_membership=on_membership,
                      hot=wl.hot_ids if a.hot_period > 0 else None, **timing)
        wl.start()
        nem.start(a.duration)
        while history.now() < a.duration and not stop_requested.is_set():
            time.sleep(0.5)
        print("chaos: workload time is up; healing", flush=True)
        nem.stop()
        nem.heal()
        t_heal = history.now()
        history.record({"nemesis": "heal", "phase": "all", "t": round(t_heal, 6)})
        wl.stop()
        rec_s, not_serving = recovery(wl, cluster, a.recovery_bound)
        report["recovery_s"] = round(rec_s, 2)
        report["recovery_not_serving"] = not_serving
        print(f"chaos: healed cluster serves on every node after {rec_s:.1f}s", flush=True)
        conv = convergence(cluster)
        report["convergence"] = conv
        print(f"chaos: final sweep of {len(wl.all)} acknowledged kubbis", flush=True)
        t_sweep = time.monotonic()
        unresolved = wl.sweep(per_kubbi_s=30 if not not_serving else 3)
        report["sweep_s"] = round(time.monotonic() - t_sweep, 2)
        report["sweep_unresolved"] = unresolved[:20]
        report["faults"] = dict(sorted(nem.counts.items()))
        report["faults_missing"] = [k for k in a.faults if not nem.counts.get(k)]
        report["fault_details"] = fault_details(history.entries)
        report["nemesis_problems"] = nem.failures
        report["quiet"] = quiet_evidence(cluster)
        cluster.stop()
        history.close()

        entries = history.entries
        violations, stats = checker.check(entries, skew=skew_bound)
        missing = report["faults_missing"] if getattr(a, "require_every_fault", False) else []
        extra = checker.run_level(stats, conv, nem.failures, not_serving, unresolved, a.recovery_bound,
                                  missing_faults=missing)
        violations = extra + violations
        report["ops"] = summarize_ops(entries)
        report["ops_total"] = sum(1 for e in entries if "op" in e)
        report["hot_keys"] = dict(wl.hot_stats, **checker.contention(entries))
        report["checker"] = {k: v for k, v in stats.items() if k != "unexpected_examples"}
        report["unexpected_examples"] = stats.get("unexpected_examples", [])
        report["violations_total"] = len(violations)
        report["violations"] = [v.as_dict() for v in violations[:200]]
        report["result"] = "pass" if not violations else "fail"
        return violations
    finally:
        # On an error, no client or fault keeps running behind the caller's clean-up.
        for part in (wl, nem):
            if part is not None:
                part.stop_flag.set()


def main(argv=None):
    a = parse(argv if argv is not None else sys.argv[1:])
    if not os.path.exists(a.bin):
        sys.exit(f"chaos: kubbi binary {a.bin} not found (set KUBBI_BIN or --bin)")
    deps.ensure(need_faketime="clock_skew" in a.faults, need_fuse="power_loss" in a.faults)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    run_dir = os.path.abspath(a.out or os.path.join(CHAOS, ".runs", f"seed-{a.seed}-{stamp}"))
    os.makedirs(run_dir, exist_ok=True)
    repro = (f"chaos/run --seed {a.seed} --duration {a.duration:g} --nodes {a.nodes}"
             + (f" --faults {','.join(a.faults)}" if a.faults != ALL_FAULTS else "")
             + f" --bin {a.bin}"
             + (f" --upgrade-bin {a.upgrade_bin}" if a.upgrade_bin else ""))
    print(f"chaos: seed {a.seed}, {a.duration:g}s, {a.nodes} nodes, run dir {run_dir}", flush=True)

    netns.teardown()
    netns.setup_hub()
    netns.enter_hub()
    lazy, small, skewed = layout(a.nodes)
    if not {"power_loss", "split", "move"} & set(a.faults):  # split and move cut a lazyfs replica's power
        lazy = set()
    if "disk_full" not in a.faults:
        small = set()
    if "clock_skew" not in a.faults:
        skewed = set()
    cluster = Cluster(run_dir, a.bin, a.nodes, groups=a.groups, lazy=lazy, small=small, skewed=skewed)
    cluster.upgrade_bin = a.upgrade_bin
    spare = None
    if "membership" in a.faults:
        spare = Node(cluster, a.nodes + 1)
        cluster.nodes[spare.id] = spare
        spare.removed = True  # not a member until it joins
    # The skewed node's clock spans [-skew, +skew] over a run: a kubbi it stamped while behind
    # can be judged by it while ahead, so deadlines move by up to twice the skew (plus 1 s of
    # scheduling and rounding).
    skew_bound = (2 * a.skew if skewed else 0) + 1.0
    report = {"seed": a.seed, "duration_s": a.duration, "nodes": a.nodes, "clients": a.clients,
              "initial_groups": a.groups, "bin": a.bin, "upgrade_bin": a.upgrade_bin, "faults_enabled": a.faults, "run_dir": run_dir,
              "layout": {"lazyfs": sorted(lazy), "small_disk": sorted(small), "faketime": sorted(skewed),
                         "spare": spare.id if spare else None},
              "skew_bound_s": skew_bound, "recovery_bound_s": a.recovery_bound, "reproduce": repro}
    exit_code = 0
    stop_requested = threading.Event()

    def on_signal(signum, frame):
        if stop_requested.is_set():
            raise KeyboardInterrupt(f"signal {signum}")
        stop_requested.set()  # first signal: end the workload phase early, then check as usual

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    try:
        violations = exercise(a, cluster, report, skew_bound, spare=spare, stop_requested=stop_requested)
        exit_code = 0 if not violations else 1
    except BaseException as e:  # noqa: BLE001 - includes a second Ctrl-C: clean up, keep the data
        traceback.print_exc()
        report["result"] = "error"
        report["error"] = f"{type(e).__name__}: {e}"
        exit_code = 2
        try:
            cluster.stop()
        except BaseException:  # noqa: BLE001
            pass
    finally:
        try:
            cluster.release(keep=exit_code != 0 or a.keep)
        finally:
            netns.teardown()

    with open(os.path.join(run_dir, "report.json"), "w") as f:
        json.dump(report, f, indent=1, default=str)
    print_summary(report)
    if exit_code == 0 and not a.keep:
        for nd in cluster.nodes.values():
            shutil.rmtree(nd.dir, ignore_errors=True)
            shutil.rmtree(nd.backing, ignore_errors=True)
    elif exit_code != 0:
        print(f"chaos: data dirs, logs and history kept in {run_dir}")
        print(f"chaos: reproduce with: {repro}")
        print(f"chaos: re-check the history with: chaos/check {run_dir}")
    return exit_code


def print_summary(r):
    print("\n=== chaos summary ===")
    print(f"result: {r.get('result')}  seed {r['seed']}  {r['duration_s']:g}s  {r['nodes']} nodes")
    if r.get("error"):
        print(f"error: {r['error']}")
    if "ops" in r:
        print(f"ops: {r['ops_total']} requests")
        for op, d in sorted(r["ops"].items()):
            print(f"  {op:8} " + ", ".join(f"{k} {v}" for k, v in sorted(d.items())))
    if "faults" in r:
        print("faults: " + (", ".join(f"{k} {v}" for k, v in r["faults"].items()) or "none"))
        print("fault evidence: " + ", ".join(f"{k} {v}" for k, v in r.get("fault_details", {}).items()))
        if r.get("quiet"):
            print("quiet groups (live nodes, since their last start): "
                  + ", ".join(f"{k} {v}" for k, v in r["quiet"].items()))
        if r.get("faults_missing"):
            print("fault kinds never injected: " + ", ".join(r["faults_missing"]))
    if r.get("nemesis_problems"):
        print("nemesis problems: " + "; ".join(r["nemesis_problems"][:5]))
    if "recovery_s" in r:
        print(f"recovery after healing: {r['recovery_s']}s (bound {r['recovery_bound_s']}s); "
              f"convergence: {r.get('convergence', {}).get('converged')}; "
              f"digests: {'compared' if r.get('convergence', {}).get('digests', {}).get('available') else 'unavailable'}")
    if "checker" in r:
        c = r["checker"]
        print(f"checked {c['kubbis']} acknowledged kubbis ({c['kubbis_unacknowledged']} unacknowledged creates "
              f"not judged); skew bound {r['skew_bound_s']}s; unexpected answers {c['unexpected_answers']}")
    vs = r.get("violations", [])
    print(f"violations: {r.get('violations_total', len(vs))}")
    kinds = {}
    for v in vs:
        kinds[v["kind"]] = kinds.get(v["kind"], 0) + 1
    for k, n in kinds.items():
        print(f"  {k}: {n}")
    for v in vs[:5]:
        print(f"  - {v['kind']} {v['kubbi']}: {v['message']}")
    print(f"report: {os.path.join(r['run_dir'], 'report.json')}")
