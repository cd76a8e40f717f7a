"""Seeded fault injection while the workload runs.

One fault at a time (`overlap`, `clock_skew` and `hot_leader` combine two): quiet for a few seconds, take the next kind (every kind once per round, in a
seeded order), inject, hold, heal. Kinds:

  kill_one         kill -9 one node, restart it on its data directory
  kill_leaders     kill -9 the node(s) leading the most shards (at most a minority), restart
  kill_minority    kill -9 a random minority of the nodes at once, restart
  pause            SIGSTOP a node (a leader half the time), then SIGCONT
  partition_halves symmetric split into a random majority and minority (nft drops both ways)
  partition_leader isolate the node leading the most shards from every other node
  partition_oneway one node stops receiving from the others but can still send to them
  clock_skew       move the wall clock of the faketime node by +-skew seconds, step it to the
                   other side (a step back of 2x skew when it started ahead), then to 0; meanwhile
                   kill -9 the leader of the most groups (not the skewed node), so leadership
                   moves under the skew. Each step is checked through `now_ms` of the node's GET /health.
  power_loss       kill -9 a lazyfs node and drop its FUSE layer's unsynced writes, restart
                   (half the time every lazyfs node at once: two on 3 nodes, a quorum, so only
                   what was fsync'd survives on a majority)
  hot_leader       during a hot-key phase of the workload (waits for one), kill -9, pause or
                   isolate the node leading the hot kubbis' group
  overlap          isolate the followers of the hot (else a random) group from each other, then
                   kill -9 its leader while they are apart: no quorum until the heal
  disk_full        fill the tmpfs data directory of the small-disk node, hold, free it
                   (the node is restarted if it is not ready 10 s after space returns)
  membership       join a spare node under traffic; the next time, drain and remove it (then
                   wipe it, so the time after it joins again as a new member)
  split            split a random data group online (POST /admin/v1/groups/{g}/split through a
                   random node) under traffic; a quarter of the time each, while the split runs:
                   kill -9 the group's leader, isolate it, or cut the power of a lazyfs replica
                   (where the new group is seeded); the split is finished by the system group's
                   leader after the heal
  move             move a random data group to a random replica set and leader (POST
                   /admin/v1/groups/{g}/move through a random node) under traffic; a quarter of
                   the time each, while the move runs: kill -9 the group's leader, isolate the new
                   leader, or cut the power of a lazyfs node among the new replicas; half the time
                   the group is then given back to the rebalancer (auto)
  rolling_restart  (opt-in: name it in --faults) a planned restart of every member in turn:
                   SIGTERM (the node hands the leadership of its groups off before it exits),
                   start it again on its data directory, wait until it is ready and every
                   group is led, then the next member; with --upgrade-bin each roll moves
                   the nodes to the other binary (a rolling upgrade, then a downgrade, ...)

Every injection and heal is an event in the history file ({"nemesis": ...}).
"""
import os
import random
import shutil
import threading
import time

from . import netns
from .cluster import http_json


class Nemesis:
    def __init__(self, seed, cluster, history, kinds, skew_s=2, quiet=(2.0, 6.0), hold=(4.0, 12.0),
                 spare=None, on_membership=None, hot=None):
        self.rng = random.Random(f"{seed}/nemesis")
        self.c = cluster
        self.h = history
        self.kinds = kinds
        self.skew_s = skew_s
        self.quiet = quiet
        self.hold = hold
        self.spare = spare  # Node not yet in the cluster
        self.on_membership = on_membership
        self.hot = hot  # () -> ids of the workload's hot kubbis (empty outside a hot phase)
        self.stop_flag = threading.Event()
        self.thread = None
        self.counts = {}
        self.failures = []  # heal/inject problems (not invariant violations)
        self.partitioned = set()
        self.ballast = None
        self.membership_phase = 0
        # nft rules exist only where a partition kind is enabled; otherwise heal() leaves the
        # network alone (a loopback cluster in the tests has no namespaces to clean).
        self.net_faults = any(k.startswith("partition") or k in ("hot_leader", "overlap", "split", "move")
                              for k in kinds)

    def event(self, kind, phase, **kw):
        e = {"nemesis": kind, "phase": phase, "t": round(self.h.now(), 6), "w": round(time.time(), 3)}
        e.update(kw)
        self.h.record(e)

    def members(self):
        return [nd for nd in self.c.active() if nd.proc is not None]

    def minority(self):
        return max(1, (len(self.members()) - 1) // 2)

    def leader_counts(self):
        try:
            leaders = self.c.leaders()
        except Exception:  # noqa: BLE001
            return {}
        counts = {}
        for s, lid in leaders.items():
            if isinstance(lid, int):
                counts[lid] = counts.get(lid, 0) + 1
        return counts

    def top_leaders(self, k):
        counts = self.leader_counts()
        ids = sorted(counts, key=lambda i: -counts[i])[:k]
        ids = [i for i in ids if i in self.c.nodes and not self.c.nodes[i].removed]
        return ids or [self.rng.choice(self.members()).id]

    def sleep(self, s):
        self.stop_flag.wait(s)

    def group_of_kubbi(self, status, kid):
        shard = int(kid.replace("-", "")[:4], 16)
        for g in status.get("shards", []):
            if any(lo <= shard < hi for lo, hi in g.get("ranges") or []):
                return g
        return None

    def wait_hot(self, timeout):
        """The ids of the workload's hot kubbis, waiting up to `timeout` s for a phase."""
        deadline = time.monotonic() + timeout
        while self.hot is not None and not self.stop_flag.is_set():
            ids = self.hot()
            if ids or time.monotonic() >= deadline:
                return ids
            self.sleep(0.2)
        return []

    def hot_group(self, timeout=0.0):
        """(group id, leader id, replica ids) of the hot kubbis' group, or None."""
        ids = self.wait_hot(timeout)
        if not ids:
            return None
        try:
            g = self.group_of_kubbi(self.c.any_status(), ids[0])
        except Exception:  # noqa: BLE001
            return None
        if g is None or not isinstance(g.get("leader"), int):
            return None
        return g["id"], g["leader"], list(g.get("replicas") or [])

    def clock_offset(self, nd):
        """Seconds the node's wall clock is ahead of ours, from `now_ms` of its GET /health (the
        Date header lags a step back: the HTTP server caches it until its clock passes the
        next second it expected)."""
        t0 = time.time()
        _, body = http_json("GET", nd.url("/health"), timeout=2)
        t1 = time.time()
        return body["now_ms"] / 1000.0 - (t0 + t1) / 2

    def skew_to(self, nd, seconds):
        """Sets the node's skew and waits until its clock shows it; False if it never does."""
        nd.set_skew(seconds)
        deadline = time.monotonic() + 6
        seen = None
        while time.monotonic() < deadline:
            try:
                seen = self.clock_offset(nd)
                if abs(seen - seconds) <= 1.0:
                    return True, round(seen, 1)
            except Exception:  # noqa: BLE001
                pass
            time.sleep(0.3)
        return False, seen

    # faults
    def do_kill(self, kind, ids):
        self.event(kind, "start", nodes=ids)
        for i in ids:
            self.c.nodes[i].kill9()
        self.sleep(self.rng.uniform(*self.hold))
        for i in ids:
            self.c.nodes[i].start()
        self.event(kind, "end", nodes=ids)

    def do_rolling_restart(self):
        ids = [nd.id for nd in self.members()]
        # With --upgrade-bin, every roll moves the nodes to the other binary: versions mix.
        target = None
        if self.c.upgrade_bin:
            self.rolls = getattr(self, "rolls", 0) + 1
            target = self.c.upgrade_bin if self.rolls % 2 == 1 else self.c.bin
        self.event("rolling_restart", "start", nodes=ids, bin=target)
        for i in ids:
            if self.stop_flag.is_set():
                break
            nd = self.c.nodes[i]
            self.event("rolling_restart", "stop", nodes=[i])
            nd.terminate(timeout=30)
            if target:
                nd.bin = target
            nd.start()
            deadline = time.monotonic() + 60
            while not nd.ready() and time.monotonic() < deadline:
                time.sleep(0.2)
            self.c.wait_led(60)
        self.event("rolling_restart", "end", nodes=ids)

    def do_pause(self):
        nd = self.c.nodes[self.top_leaders(1)[0]] if self.rng.random() < 0.5 else self.rng.choice(self.members())
        self.event("pause", "start", nodes=[nd.id])
        nd.sigstop()
        self.sleep(self.rng.uniform(*self.hold))
        nd.sigcont()
        self.event("pause", "end", nodes=[nd.id])

    def partition(self, kind, groups=None, oneway=None):
        ids = [nd.id for nd in self.members()]
        if groups:
            a, b = groups
            for i in a:
                netns.block(i, drop_in_from=b, drop_out_to=b)
            for i in b:
                netns.block(i, drop_in_from=a, drop_out_to=a)
            self.event(kind, "start", groups=[a, b])
        else:
            others = [j for j in ids if j != oneway]
            netns.block(oneway, drop_in_from=others)
            self.event(kind, "start", nodes=[oneway], drops="input from " + ",".join(map(str, others)))
        self.partitioned.update(ids)
        self.sleep(self.rng.uniform(*self.hold))
        self.heal_net()
        self.event(kind, "end")

    def heal_net(self):
        for i in list(self.partitioned):
            netns.clear(i)
        self.partitioned.clear()

    def call_in_background(self, name, url, body, timeout):
        """POSTs `body` to `url` with the admin token on a thread of its own; returns the thread and
        the dict its answer lands in ("status" and "body", or "error")."""
        answer = {}

        def drive():
            try:
                answer["status"], answer["body"] = http_json("POST", url, body, token=self.c.admin, timeout=timeout)
            except Exception as e:  # noqa: BLE001
                answer["error"] = str(e)

        t = threading.Thread(target=drive, name=name, daemon=True)
        t.start()
        return t, answer

    def isolate(self, node):
        """Cuts `node` off from every other member, both ways (undone by heal_net)."""
        ids = [nd.id for nd in self.members()]
        others = sorted(j for j in ids if j != node)
        netns.block(node, drop_in_from=others, drop_out_to=others)
        for i in others:
            netns.block(i, drop_in_from=[node], drop_out_to=[node])
        self.partitioned.update(others + [node])

    def strike(self, kind, how, node):
        """While an operation of `kind` runs: a moment in, kill -9 `node` (how "kill_leader"), cut
        its power (how "power_loss_target": a lazyfs node loses what it had not fsync'd) or
        isolate it; hold; then restart it or heal."""
        self.sleep(self.rng.uniform(0.05, 1.0))
        nd = self.c.nodes[node]
        extra = {}
        if how == "kill_leader":
            nd.kill9()
        elif how == "power_loss_target":
            nd.kill9()
            extra["unsynced_dropped"] = {node: nd.unsynced()}
            nd.drop_unsynced()
        else:
            self.isolate(node)
        self.event(kind, how, nodes=[node], **extra)
        self.sleep(self.rng.uniform(*self.hold))
        if how in ("kill_leader", "power_loss_target"):
            nd.start()
        else:
            self.heal_net()

    def lazy_among(self, ids, besides):
        """A lazyfs member among `ids` other than `besides`, or None."""
        lazy = sorted(nd.id for nd in self.members() if nd.storage == "lazyfs" and nd.id in (ids or [])
                      and nd.id != besides)
        return self.rng.choice(lazy) if lazy else None

    def do_partition_halves(self):
        ids = [nd.id for nd in self.members()]
        self.rng.shuffle(ids)
        k = self.rng.randint(1, (len(ids) - 1) // 2) if len(ids) > 2 else 1
        self.partition("partition_halves", groups=(sorted(ids[:k]), sorted(ids[k:])))

    def do_partition_leader(self):
        ids = [nd.id for nd in self.members()]
        lead = self.top_leaders(1)[0]
        self.partition("partition_leader", groups=([lead], sorted(j for j in ids if j != lead)))

    def do_partition_oneway(self):
        target = self.rng.choice([nd.id for nd in self.members()])
        self.partition("partition_oneway", oneway=target)

    def do_clock_skew(self):
        skewed = [nd for nd in self.members() if nd.skew]
        if not skewed:
            return False
        nd = skewed[0]
        s = self.skew_s if self.rng.random() < 0.5 else -self.skew_s
        steps = []
        for target in (s, -s, 0):
            ok, seen = self.skew_to(nd, target)
            steps.append({"set": target, "seen": seen, "took_effect": ok})
            if not ok and nd.alive() and not nd.stopped:
                self.failures.append(f"clock_skew: node {nd.id} set to {target:+d} s shows {seen}")
            self.event("clock_skew", "start" if target == s else "step", nodes=[nd.id], seconds=target,
                       seen=seen, took_effect=ok)
            if target == s:
                # Leadership moves while the clock is off: kill the busiest leader (not this node).
                lead = [i for i in self.top_leaders(1) if i != nd.id]
                if lead:
                    self.event("clock_skew", "kill_leader", nodes=lead)
                    self.c.nodes[lead[0]].kill9()
                    self.sleep(self.rng.uniform(*self.hold) / 2)
                    self.c.nodes[lead[0]].start()
            if target != 0:
                self.sleep(self.rng.uniform(*self.hold))
        self.event("clock_skew", "end", nodes=[nd.id], steps=steps)
        return True

    def do_hot_leader(self):
        hot = self.hot_group(timeout=30.0)
        if hot is None:
            return False
        g, lead, _ = hot
        if lead not in self.c.nodes or self.c.nodes[lead].removed:
            return False
        nd = self.c.nodes[lead]
        how = self.rng.choice(["kill", "pause", "isolate"])
        self.event("hot_leader", "start", nodes=[lead], group=g, how=how)
        if how == "kill":
            nd.kill9()
            self.sleep(self.rng.uniform(*self.hold))
            nd.start()
        elif how == "pause":
            nd.sigstop()
            self.sleep(self.rng.uniform(*self.hold))
            nd.sigcont()
        else:
            self.isolate(lead)
            self.sleep(self.rng.uniform(*self.hold))
            self.heal_net()
        self.event("hot_leader", "end", nodes=[lead], group=g, how=how)
        return True

    def do_overlap(self):
        hot = self.hot_group(timeout=0.0)
        if hot is None:
            try:
                st = self.c.any_status()
            except Exception:  # noqa: BLE001
                return False
            led = [g for g in st.get("shards", []) if isinstance(g.get("leader"), int) and g.get("id") != 0]
            if not led:
                return False
            g = self.rng.choice(led)
            hot = (g["id"], g["leader"], list(g.get("replicas") or []))
        g, lead, replicas = hot
        followers = [i for i in replicas if i != lead and i in self.c.nodes and not self.c.nodes[i].removed]
        if lead not in self.c.nodes or len(followers) < 2:
            return False
        a, b = followers[:1], followers[1:]
        for i in a:
            netns.block(i, drop_in_from=b, drop_out_to=b)
        for i in b:
            netns.block(i, drop_in_from=a, drop_out_to=a)
        self.partitioned.update(followers)
        self.event("overlap", "start", group=g, groups=[a, b], nodes=[lead], hot=self.hot is not None and bool(self.hot()))
        self.sleep(self.rng.uniform(1.0, 3.0))
        self.c.nodes[lead].kill9()
        self.event("overlap", "kill_leader", group=g, nodes=[lead])
        self.sleep(self.rng.uniform(*self.hold))
        self.heal_net()
        self.c.nodes[lead].start()
        self.event("overlap", "end", group=g, nodes=[lead])
        return True

    def do_power_loss(self):
        lazy = [nd for nd in self.members() if nd.storage == "lazyfs"]
        if not lazy:
            return False
        # Half the time every lazyfs node at once (still a minority or the fsync'd quorum).
        victims = lazy if self.rng.random() < 0.5 else [self.rng.choice(lazy)]
        ids = [nd.id for nd in victims]
        dropped = {}
        for nd in victims:
            nd.kill9()
            dropped[nd.id] = nd.unsynced()  # what the FUSE layer still held when the node died
            nd.drop_unsynced()
        self.event("power_loss", "start", nodes=ids, unsynced_dropped=dropped)
        self.sleep(self.rng.uniform(*self.hold))
        for nd in victims:
            nd.start()
        self.event("power_loss", "end", nodes=ids)
        return True

    def do_disk_full(self):
        small = [nd for nd in self.members() if nd.storage == "small"]
        if not small:
            return False
        nd = small[0]
        path = os.path.join(nd.dir, "chaos-ballast")
        self.event("disk_full", "start", nodes=[nd.id])
        try:
            with open(path, "wb") as f:
                chunk = b"\0" * (1 << 20)
                while True:
                    try:
                        f.write(chunk)
                        f.flush()
                    except OSError:
                        break
        except OSError:
            pass
        st = os.statvfs(nd.dir)
        self.event("disk_full", "full", nodes=[nd.id], free_bytes=st.f_bavail * st.f_frsize)
        log_at = os.path.getsize(nd.log) if os.path.exists(nd.log) else 0
        # RocksDB writes into preallocated WAL space, so a full disk bites when the node must
        # allocate: a flush, a new WAL, or a restart. Half the time, crash and restart it while full.
        crash = self.rng.random() < 0.5
        self.sleep(self.rng.uniform(*self.hold))
        exited = None
        if crash:
            nd.kill9()
            nd.start()
            self.sleep(self.rng.uniform(*self.hold))
            exited = nd.proc.poll()
            self.event("disk_full", "restarted_while_full", nodes=[nd.id], exit=exited)
        else:
            self.sleep(self.rng.uniform(*self.hold) * 2)
        enospc = False
        try:
            with open(nd.log, "rb") as f:
                f.seek(log_at)
                tail = f.read().lower()
                enospc = b"no space" in tail or b"enospc" in tail
        except OSError:
            pass
        try:
            os.remove(path)
        except OSError:
            pass
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and not (nd.alive() and nd.ready()):
            time.sleep(0.5)
        restarted = False
        if not (nd.alive() and nd.ready()):
            nd.kill9()
            nd.start()
            restarted = True
        self.event("disk_full", "end", nodes=[nd.id], enospc_logged=enospc, restarted=restarted)
        return True

    def do_split(self):
        st = self.c.any_status()
        groups = [g for g in st.get("shards", []) if g.get("id") != "system"
                  and any(hi - lo >= 2 for lo, hi in g.get("ranges") or [])]
        if not groups:
            return False
        g = self.rng.choice(groups)
        how = self.rng.choice(["plain", "kill_leader", "isolate_leader", "power_loss_target"])
        via = self.rng.choice([nd for nd in self.members() if nd.alive()])
        self.event("split", "start", group=g["id"], via=via.id, how=how, leader=g.get("leader"))
        t, answer = self.call_in_background("split", via.url(f"/admin/v1/groups/{g['id']}/split"), {}, 90)
        # The new group is seeded on every replica of the source: power loss hits one of those.
        lead = self.lazy_among(g.get("replicas"), via.id) if how == "power_loss_target" else g.get("leader")
        hit = None
        if how != "plain" and isinstance(lead, int) and lead in self.c.nodes and lead != via.id:
            hit = lead
            self.strike("split", how, lead)
        t.join(120)
        body = answer.get("body") if isinstance(answer.get("body"), dict) else {}
        self.event("split", "end", group=g["id"], how=how, hit=hit, status=answer.get("status"),
                   target=body.get("target"), error=answer.get("error") or body.get("message"))
        return True

    def do_move(self):
        st = self.c.any_status()
        groups = [g for g in st.get("shards", []) if g.get("id") != "system" and g.get("replicas")]
        nodes = sorted(n["id"] for n in st.get("nodes", []) if n.get("state") == "active")
        live = [nd for nd in self.members() if nd.alive()]
        if not groups or not nodes or not live:
            return False
        g = self.rng.choice(groups)
        to = sorted(self.rng.sample(nodes, min(3, len(nodes))))
        leader = self.rng.choice(to)
        how = self.rng.choice(["plain", "kill_leader", "isolate_target", "power_loss_target"])
        via = self.rng.choice(live)
        self.event("move", "start", group=g["id"], via=via.id, how=how, to=to, leader=leader,
                   was=g.get("replicas"), led_by=g.get("leader"))
        t, answer = self.call_in_background("move", via.url(f"/admin/v1/groups/{g['id']}/move"),
                                            {"replicas": to, "leader": leader}, 150)
        # Power loss hits a lazyfs node among the replicas the group moves to.
        hit = {"kill_leader": g.get("leader"), "isolate_target": leader,
               "power_loss_target": self.lazy_among(to, via.id)}.get(how)
        if how != "plain" and isinstance(hit, int) and hit in self.c.nodes and hit != via.id \
                and not self.c.nodes[hit].removed:
            self.strike("move", how, hit)
        else:
            hit = None
        t.join(170)
        body = answer.get("body") if isinstance(answer.get("body"), dict) else {}
        unpinned = None
        if self.rng.random() < 0.5:
            try:
                unpinned, _ = http_json("POST", via.url(f"/admin/v1/groups/{g['id']}/move"), {"auto": True},
                                        token=self.c.admin, timeout=30)
            except Exception as e:  # noqa: BLE001
                unpinned = str(e)
        self.event("move", "end", group=g["id"], how=how, hit=hit, status=answer.get("status"),
                   leader=body.get("leader"), error=answer.get("error") or body.get("message"),
                   unpinned=unpinned)
        return True

    def do_membership(self):
        if self.spare is None:
            return False
        sp = self.spare
        live = [nd for nd in self.members() if nd.alive() and nd is not sp]
        if self.membership_phase == 0:
            seed = self.rng.choice(live)
            sp.join = seed.internal
            self.event("membership", "start", action="join", nodes=[sp.id], via=seed.id)
            netns.add_node(sp.id)
            sp.prepare()
            sp.removed = False
            sp.start()
            ok = self.wait_membership(sp.id, present=True, timeout=120)
            if self.on_membership:
                self.on_membership()
            self.event("membership", "end", action="join", nodes=[sp.id], completed=ok)
            self.membership_phase = 1
        else:
            self.event("membership", "start", action="remove", nodes=[sp.id])
            ok = False
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline and not ok:
                nd = self.rng.choice(live)
                try:
                    st, body = http_json("DELETE", nd.url(f"/admin/v1/nodes/{sp.id}"), token=self.c.admin, timeout=10)
                    ok = st in (200, 202, 204)
                    if not ok:
                        self.event("membership", "info", status=st, body=body)
                except Exception as e:  # noqa: BLE001
                    self.event("membership", "info", error=str(e))
                if not ok:
                    time.sleep(1)
            done = ok and self.wait_membership(sp.id, present=False, timeout=120)
            if done:
                sp.removed = True
                if self.on_membership:
                    self.on_membership()
                sp.terminate()
                # A removed node may come back only as a new member with an empty directory.
                shutil.rmtree(sp.dir, ignore_errors=True)
                self.membership_phase = 0
            self.event("membership", "end", action="remove", nodes=[sp.id], completed=done)
            if not done:
                if not self.stop_flag.is_set():
                    self.failures.append(f"membership remove of node {sp.id} did not complete")
                self.spare = None
        return True

    def wait_membership(self, nid, present, timeout):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and not self.stop_flag.is_set():
            try:
                st = self.c.any_status()
                shards = st.get("shards", [])
                inside = [nid in (s.get("replicas") or []) or nid in (s.get("learners") or []) for s in shards]
                if present and any(nid in (s.get("replicas") or []) for s in shards):
                    return True
                if not present and shards and not any(inside):
                    return True
            except Exception:  # noqa: BLE001
                pass
            time.sleep(1)
        return False

    def run(self, end_t):
        if not self.kinds:  # --faults '': the workload runs without faults
            return
        bag = []
        while not self.stop_flag.is_set() and self.h.now() < end_t:
            self.sleep(self.rng.uniform(*self.quiet))
            if self.stop_flag.is_set() or self.h.now() >= end_t:
                break
            if not bag:  # every kind once per round, in a seeded order
                bag = list(self.kinds)
                self.rng.shuffle(bag)
            kind = bag.pop()
            try:
                done = self.inject(kind)
            except Exception as e:  # noqa: BLE001
                self.failures.append(f"{kind}: {e}")
                self.event(kind, "error", error=str(e))
                self.heal()
                done = True
            if done is not False:
                self.counts[kind] = self.counts.get(kind, 0) + 1

    def inject(self, kind):
        n = len(self.members())
        if kind == "kill_one":
            return self.do_kill(kind, [self.rng.choice(self.members()).id])
        if kind == "kill_leaders":
            return self.do_kill(kind, self.top_leaders(self.minority()))
        if kind == "kill_minority":
            ids = [nd.id for nd in self.members()]
            return self.do_kill(kind, sorted(self.rng.sample(ids, max(1, (n - 1) // 2))))
        if kind == "pause":
            return self.do_pause()
        if kind == "rolling_restart":
            return self.do_rolling_restart()
        if kind == "partition_halves":
            return self.do_partition_halves()
        if kind == "partition_leader":
            return self.do_partition_leader()
        if kind == "partition_oneway":
            return self.do_partition_oneway()
        if kind == "clock_skew":
            return self.do_clock_skew()
        if kind == "power_loss":
            return self.do_power_loss()
        if kind == "disk_full":
            return self.do_disk_full()
        if kind == "membership":
            return self.do_membership()
        if kind == "hot_leader":
            return self.do_hot_leader()
        if kind == "overlap":
            return self.do_overlap()
        if kind == "split":
            return self.do_split()
        if kind == "move":
            return self.do_move()
        raise ValueError(kind)

    def start(self, end_t):
        self.thread = threading.Thread(target=self.run, args=(end_t,), name="nemesis", daemon=True)
        self.thread.start()

    def stop(self):
        self.stop_flag.set()
        if self.thread:
            self.thread.join(180)

    def heal(self):
        """Undo everything: network, pauses, clocks, disk; restart nodes that are down."""
        self.heal_net()
        for nd in self.c.nodes.values():
            if nd.proc is None or nd.removed:
                continue
            if self.net_faults:
                netns.clear(nd.id)
            nd.sigcont()
            if nd.skew:
                nd.set_skew(0)
            if nd.storage == "small":
                try:
                    os.remove(os.path.join(nd.dir, "chaos-ballast"))
                except OSError:
                    pass
            if nd.storage == "lazyfs" and (nd.fuse is None or nd.fuse.poll() is not None):
                nd.kill9()
                nd.drop_unsynced()
            if not nd.alive():
                self.event("heal", "restart", nodes=[nd.id], exit=nd.proc.returncode)
                nd.start()
