//! Quiet groups: a group with nothing to do stops ticking on every replica.
//!
//! A raft group that is awake ticks every ~20 ms on every replica, its leader sends a heartbeat
//! to each follower every interval, and each follower keeps an election timer armed. On an idle
//! cluster that is nearly all the CPU it uses, and it grows with the number of groups. Like
//! CockroachDB's quiesced ranges, TiKV's hibernating regions and Dragonboat's quiesced groups,
//! an idle group here goes quiet instead, and one liveness message per node pair stands in for
//! every quiet group's heartbeats:
//!
//! ```text
//!   leader L of g: log unchanged for `after`, applied, every replica matched
//!       ─▶ L parks g's ticker (no heartbeats) and lists g in its liveness pings
//!   follower F gets L's ping listing g at (term, last index) it has too, with L as leader
//!       ─▶ F parks g's ticker (no election timer)
//!   wakes:  L: its log moves, or it stops leading            (checked every CHECK_EVERY)
//!           F: a raft message that carries entries, a vote, a transfer or a snapshot
//!              (after it was handled, so F's leader lease is fresh), its term or log moves,
//!              L's ping no longer says L leads g (L restarted or stepped down), or no ping
//!              from L for `silence` (L's node is down, paused or cut off: F's ticker starts
//!              and, its lease long run out, it stands for election)
//!   pre-votes: a quiet follower that hears L's pings refuses them, as an awake follower that
//!              hears heartbeats does by its lease (`Quiet::hears_leader`)
//! ```
//!
//! Quiet is about liveness only: no rule of raft's safety depends on ticks, and a quiet
//! follower answers every message as an awake one does. A heartbeat without entries (a leader's
//! read-index round) does not wake a follower, so reads of a quiet group keep it quiet.
//! Replicas of a group whose (initialised) membership does not name this node park their
//! ticker too, and wake when a message adds them or the membership names them.
//!
//! A group with a replica that is down or behind never goes quiet: its leader keeps sending to
//! it. The cost of a quiet group is its failover time: a quiet group's followers notice a dead
//! leader after `silence` (default twice the longest election timeout) instead of one election
//! timeout.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use openraft::ServerState;
use openraft::async_runtime::WatchReceiver;
use serde::{Deserialize, Serialize};

use super::{NodeId, Raft, TypeConfig};
use crate::ids::GroupId;

/// How often [`Quiet::check`] should run: a leader whose quiet group gets a write resumes its
/// heartbeats within this, well inside a follower's election timeout.
pub const CHECK_EVERY: Duration = Duration::from_millis(100);

/// When groups go quiet and how fast a quiet group notices its leader is gone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QuietTiming {
    /// A leader quiets a group idle this long; zero: never.
    pub after: Duration,
    /// How often a node tells every peer which groups it leads quietly.
    pub ping_every: Duration,
    /// A follower wakes a quiet group after this long without a ping from its leader.
    pub silence: Duration,
}

impl QuietTiming {
    /// From the raft timing: pings four times per shortest election timeout, silence of twice
    /// the longest one.
    pub fn new(after: Duration, election_min: Duration, election_max: Duration) -> Self {
        Self {
            after,
            ping_every: election_min / 2,
            silence: election_max * 2,
        }
    }

    pub fn enabled(&self) -> bool {
        !self.after.is_zero()
    }
}

/// A group its sender leads quietly, at the term and last log index the sender has.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct QuietGroup {
    pub group: GroupId,
    pub term: u64,
    pub last_log_index: Option<u64>,
}

/// What a node tells each peer once per `ping_every`: the groups it leads, quiet and awake. A
/// quiet follower of a group its leader no longer lists (it restarted, stepped down) wakes.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Beat {
    /// Groups the sender leads quietly, at its term and last log index.
    pub quiet: Vec<QuietGroup>,
    /// Groups the sender leads and that are awake.
    pub awake: Vec<GroupId>,
}

/// Where a replica of a group stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Ticking; the log was last seen at `index` at `since`.
    Awake { index: Option<u64>, since: Instant },
    /// Leads the group quietly.
    Leading { term: u64, index: Option<u64> },
    /// Follows `leader`'s quiet group.
    Following {
        leader: NodeId,
        term: u64,
        index: Option<u64>,
    },
    /// Not in the group's membership.
    Outside,
}

impl State {
    fn is_quiet(&self) -> bool {
        !matches!(self, Self::Awake { .. })
    }
}

/// What a replica's raft metrics say, as far as quiet is concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct View {
    leads: bool,
    leader: Option<NodeId>,
    term: u64,
    index: Option<u64>,
    /// Applied up to its last entry, and (on a leader) every other replica matched it.
    settled: bool,
    member: bool,
}

impl View {
    fn of(me: NodeId, m: &openraft::RaftMetrics<TypeConfig>) -> Self {
        let index = m.last_log_index;
        let applied = m.last_applied.as_ref().map(|l| l.index);
        let leads = m.state == ServerState::Leader && m.current_leader == Some(me);
        let membership = m.membership_config.membership();
        let matched = |id: &NodeId| {
            m.replication
                .as_ref()
                .and_then(|r| r.get(id))
                .is_some_and(|l| l.as_ref().map(|l| l.index) == index)
        };
        let replicas_match = membership.nodes().all(|(id, _)| *id == me || matched(id));
        Self {
            leads,
            leader: m.current_leader,
            term: m.current_term,
            index,
            settled: applied == index && (!leads || replicas_match),
            // A group not yet initialised here (no membership at all) counts as one this node
            // is in: it may be about to be, and its ticker costs nothing then.
            member: membership.nodes().next().is_none() || membership.get_node(&me).is_some(),
        }
    }
}

/// Why a quiet group woke (the label of `kubbi_raft_quiet_wakes_total`); the discriminant
/// indexes [`Quiet`]'s counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Wake {
    /// Its leader's log moved (a write) or a replica fell behind.
    Activity,
    /// A follower got entries, a vote, a transfer or a snapshot.
    Message,
    /// Leadership or the term changed.
    Leadership,
    /// A follower heard nothing from its leader for `silence`.
    Silence,
    /// This node joined the group's membership.
    Member,
}

const WAKES: [Wake; 5] = [
    Wake::Activity,
    Wake::Message,
    Wake::Leadership,
    Wake::Silence,
    Wake::Member,
];

impl Wake {
    fn label(self) -> &'static str {
        match self {
            Self::Activity => "activity",
            Self::Message => "message",
            Self::Leadership => "leadership",
            Self::Silence => "silence",
            Self::Member => "member",
        }
    }
}

/// What to do to a replica's ticker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Act {
    Keep,
    Park,
    Wake(Wake),
}

/// The next state of a replica on a periodic check. `heard` is when this node last heard a
/// ping from the leader a quiet follower follows.
fn on_check(
    state: State,
    v: &View,
    now: Instant,
    after: Duration,
    silence: Duration,
    heard: Option<Instant>,
) -> (State, Act) {
    let awake = State::Awake {
        index: v.index,
        since: now,
    };
    match state {
        State::Awake { index, since } => {
            if !v.member {
                (State::Outside, Act::Park)
            } else if index != v.index {
                (awake, Act::Keep)
            } else if v.leads && v.settled && now.duration_since(since) >= after {
                let quiet = State::Leading {
                    term: v.term,
                    index: v.index,
                };
                (quiet, Act::Park)
            } else {
                (state, Act::Keep)
            }
        }
        State::Leading { term, index } => {
            if !v.leads || term != v.term {
                (awake, Act::Wake(Wake::Leadership))
            } else if index != v.index || !v.settled {
                (awake, Act::Wake(Wake::Activity))
            } else {
                (state, Act::Keep)
            }
        }
        State::Following {
            leader,
            term,
            index,
        } => {
            if term != v.term || v.leads || v.leader.is_some_and(|l| l != leader) {
                (awake, Act::Wake(Wake::Leadership))
            } else if index != v.index {
                (awake, Act::Wake(Wake::Activity))
            } else if heard.is_none_or(|t| now.duration_since(t) >= silence) {
                (awake, Act::Wake(Wake::Silence))
            } else {
                (state, Act::Keep)
            }
        }
        State::Outside if v.member => (awake, Act::Wake(Wake::Member)),
        State::Outside => (state, Act::Keep),
    }
}

/// Whether an awake follower may go quiet on `from`'s word that it leads `q` quietly: it knows
/// no other leader at that term and holds the same last entry.
fn may_follow_quietly(v: &View, from: NodeId, q: &QuietGroup) -> bool {
    v.member
        && !v.leads
        && v.leader.is_none_or(|l| l == from)
        && v.term == q.term
        && v.index == q.last_log_index
}

struct Replica {
    raft: Raft,
    state: Mutex<State>,
}

impl Replica {
    fn view(&self, me: NodeId) -> View {
        View::of(me, &self.raft.metrics().borrow_watched())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The quiet state of every group of one node.
pub struct Quiet {
    me: NodeId,
    timing: QuietTiming,
    /// Groups start while the node runs (a split's target), so the set is behind a lock.
    replicas: RwLock<BTreeMap<GroupId, Arc<Replica>>>,
    /// When each peer's last liveness ping arrived.
    heard: Mutex<HashMap<NodeId, Instant>>,
    /// When the last [`Quiet::check`] ran, and since when silence counts: a node that was
    /// itself paused (SIGSTOP, a stalled runtime) heard nothing meanwhile through no fault of
    /// its peers, so silence counts again from when it resumed.
    clock: Mutex<(Option<Instant>, Option<Instant>)>,
    wakes: [AtomicU64; WAKES.len()],
    parks: AtomicU64,
}

impl Quiet {
    pub fn new(
        me: NodeId,
        timing: QuietTiming,
        groups: impl IntoIterator<Item = (GroupId, Raft)>,
    ) -> Self {
        let q = Self {
            me,
            timing,
            replicas: RwLock::new(BTreeMap::new()),
            heard: Mutex::new(HashMap::new()),
            clock: Mutex::new((None, None)),
            wakes: Default::default(),
            parks: AtomicU64::new(0),
        };
        for (g, raft) in groups {
            q.add(g, raft);
        }
        q
    }

    /// Watches group `g` from now on (awake); a group already watched is left as it is.
    pub fn add(&self, g: GroupId, raft: Raft) {
        let state = Mutex::new(State::Awake {
            index: None,
            since: Instant::now(),
        });
        self.replicas
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .entry(g)
            .or_insert_with(|| Arc::new(Replica { raft, state }));
    }

    /// Stops watching group `g` (its replica here was collected).
    pub fn remove(&self, g: GroupId) {
        self.replicas
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&g);
    }

    fn replicas(&self) -> Vec<(GroupId, Arc<Replica>)> {
        self.replicas
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(|(g, r)| (*g, r.clone()))
            .collect()
    }

    fn replica(&self, g: GroupId) -> Option<Arc<Replica>> {
        self.replicas
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(&g)
            .cloned()
    }

    pub fn timing(&self) -> QuietTiming {
        self.timing
    }

    fn act(&self, g: GroupId, r: &Replica, act: Act) {
        match act {
            Act::Keep => {}
            Act::Park => {
                self.parks.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(group = g, "group quiet here");
                r.raft.runtime_config().tick(false);
            }
            Act::Wake(why) => {
                self.wakes[why as usize].fetch_add(1, Ordering::Relaxed);
                tracing::debug!(group = g, reason = why.label(), "quiet group woke");
                r.raft.runtime_config().tick(true);
            }
        }
    }

    /// Moves every replica on by its metrics; returns what this node's next liveness ping
    /// says: the groups it leads, quiet and awake.
    pub fn check(&self, now: Instant) -> Beat {
        let mut beat = Beat::default();
        if !self.timing.enabled() {
            return beat;
        }
        let counts_from = {
            let mut c = self.clock.lock().unwrap_or_else(|p| p.into_inner());
            if c.0
                .is_some_and(|last| now.duration_since(last) >= self.timing.silence / 2)
            {
                tracing::info!(
                    "this node was paused: quiet groups count their leaders' silence afresh"
                );
                c.1 = Some(now);
            }
            c.0 = Some(now);
            c.1
        };
        let heard = self.heard.lock().unwrap_or_else(|p| p.into_inner()).clone();
        for (g, r) in self.replicas() {
            let v = r.view(self.me);
            let mut st = r.lock();
            let from = match *st {
                State::Following { leader, .. } => heard.get(&leader).copied().max(counts_from),
                _ => None,
            };
            let (next, act) = on_check(*st, &v, now, self.timing.after, self.timing.silence, from);
            *st = next;
            drop(st);
            self.act(g, &r, act);
            match next {
                State::Leading { term, index } => beat.quiet.push(QuietGroup {
                    group: g,
                    term,
                    last_log_index: index,
                }),
                State::Awake { .. } if v.leads => beat.awake.push(g),
                _ => {}
            }
        }
        beat
    }

    /// A liveness ping from `from`: quiet followers of groups it no longer leads wake, awake
    /// followers of groups it leads quietly go quiet where they agree with it.
    pub fn on_ping(&self, from: NodeId, beat: &Beat, now: Instant) {
        if !self.timing.enabled() {
            return;
        }
        self.heard
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(from, now);
        for (g, r) in self.replicas() {
            let mut st = r.lock();
            let listed = beat.quiet.iter().find(|q| q.group == g);
            match *st {
                State::Following { leader, .. }
                    if leader == from && listed.is_none() && !beat.awake.contains(&g) =>
                {
                    *st = State::Awake {
                        index: r.view(self.me).index,
                        since: now,
                    };
                    drop(st);
                    self.act(g, &r, Act::Wake(Wake::Leadership));
                }
                State::Awake { .. } => {
                    let Some(q) = listed else { continue };
                    if !may_follow_quietly(&r.view(self.me), from, q) {
                        continue;
                    }
                    *st = State::Following {
                        leader: from,
                        term: q.term,
                        index: q.last_log_index,
                    };
                    drop(st);
                    self.act(g, &r, Act::Park);
                }
                _ => {}
            }
        }
    }

    /// After this node handled a raft message for group `g`: one that carries entries, a vote,
    /// a transfer or a snapshot (`wakes`) wakes a quiet follower, whose lease it has just
    /// renewed. A heartbeat without entries does not.
    pub fn after_message(&self, g: GroupId, wakes: bool) {
        if !wakes || !self.timing.enabled() {
            return;
        }
        let Some(r) = self.replica(g) else {
            return;
        };
        let mut st = r.lock();
        if !matches!(*st, State::Following { .. } | State::Outside) {
            return;
        }
        *st = State::Awake {
            index: r.view(self.me).index,
            since: Instant::now(),
        };
        drop(st);
        self.act(g, &r, Act::Wake(Wake::Message));
    }

    /// Whether this node follows `g` quietly and heard its leader's liveness ping within
    /// `silence`. Such a node refuses every pre-vote for `g`, as an awake follower that hears
    /// heartbeats does by its leader lease: a quiet group's leases ran out long ago, and without
    /// this a node that merely lost touch with the leader (cut off from it alone, or slow to
    /// hear) would win the pre-vote and depose a healthy leader.
    pub fn hears_leader(&self, g: GroupId, now: Instant) -> bool {
        let Some(State::Following { leader, .. }) = self.replica(g).map(|r| *r.lock()) else {
            return false;
        };
        self.heard
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&leader)
            .is_some_and(|t| now.duration_since(*t) < self.timing.silence)
    }

    /// Whether this node's replica of `g` is quiet.
    pub fn is_quiet(&self, g: GroupId) -> bool {
        self.replica(g).is_some_and(|r| r.lock().is_quiet())
    }

    /// How often a replica went quiet, and how often a quiet one woke, by reason (the label
    /// of `kubbi_raft_quiet_wakes_total`), since this node started.
    pub fn counts(&self) -> (u64, Vec<(&'static str, u64)>) {
        let wakes = WAKES
            .iter()
            .map(|w| (w.label(), self.wakes[*w as usize].load(Ordering::Relaxed)))
            .collect();
        (self.parks.load(Ordering::Relaxed), wakes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const AFTER: Duration = Duration::from_millis(1000);
    const SILENCE: Duration = Duration::from_millis(2000);

    fn leader(index: u64, settled: bool) -> View {
        View {
            leads: true,
            leader: Some(1),
            term: 3,
            index: Some(index),
            settled,
            member: true,
        }
    }

    fn follower(index: u64) -> View {
        View {
            leads: false,
            leader: Some(1),
            term: 3,
            index: Some(index),
            settled: true,
            member: true,
        }
    }

    fn step(st: State, v: &View, now: Instant, heard: Option<Instant>) -> (State, Act) {
        on_check(st, v, now, AFTER, SILENCE, heard)
    }

    #[test]
    fn a_leader_goes_quiet_only_after_its_log_stood_still_and_settled_for_the_whole_interval() {
        let t0 = Instant::now();
        let st = State::Awake {
            index: Some(7),
            since: t0,
        };
        // Not long enough.
        let (st, act) = step(st, &leader(7, true), t0 + AFTER / 2, None);
        assert_eq!(act, Act::Keep);
        // The log moved: the interval starts again.
        let (st, act) = step(
            st,
            &leader(8, true),
            t0 + AFTER - Duration::from_millis(1),
            None,
        );
        assert_eq!(act, Act::Keep);
        assert_eq!(
            st,
            State::Awake {
                index: Some(8),
                since: t0 + AFTER - Duration::from_millis(1)
            }
        );
        let (st2, act) = step(st, &leader(8, true), t0 + AFTER, None);
        assert_eq!(
            act,
            Act::Keep,
            "only {:?} since the last write",
            AFTER / 1000
        );
        // A replica behind (or the apply behind) keeps it awake however long.
        let (_, act) = step(st, &leader(8, false), t0 + AFTER * 10, None);
        assert_eq!(act, Act::Keep);
        let (st, act) = step(
            st2,
            &leader(8, true),
            t0 + AFTER * 2 - Duration::from_millis(1),
            None,
        );
        assert_eq!(act, Act::Park);
        assert_eq!(
            st,
            State::Leading {
                term: 3,
                index: Some(8)
            }
        );
    }

    #[test]
    fn a_quiet_leader_wakes_on_a_write_a_lagging_replica_or_losing_the_lead() {
        let t0 = Instant::now();
        let quiet = State::Leading {
            term: 3,
            index: Some(8),
        };
        assert_eq!(step(quiet, &leader(8, true), t0, None).1, Act::Keep);
        assert_eq!(
            step(quiet, &leader(9, false), t0, None).1,
            Act::Wake(Wake::Activity)
        );
        assert_eq!(
            step(quiet, &leader(8, false), t0, None).1,
            Act::Wake(Wake::Activity)
        );
        assert_eq!(
            step(quiet, &follower(8), t0, None).1,
            Act::Wake(Wake::Leadership)
        );
        let newer = View {
            term: 4,
            ..leader(8, true)
        };
        assert_eq!(step(quiet, &newer, t0, None).1, Act::Wake(Wake::Leadership));
    }

    #[test]
    fn a_quiet_follower_wakes_when_its_leader_falls_silent_or_anything_moves() {
        let t0 = Instant::now();
        let quiet = State::Following {
            leader: 1,
            term: 3,
            index: Some(8),
        };
        let heard = Some(t0);
        assert_eq!(
            step(quiet, &follower(8), t0 + SILENCE / 2, heard).1,
            Act::Keep
        );
        assert_eq!(
            step(quiet, &follower(8), t0 + SILENCE, heard).1,
            Act::Wake(Wake::Silence)
        );
        assert_eq!(
            step(quiet, &follower(8), t0, None).1,
            Act::Wake(Wake::Silence),
            "never heard from the leader at all"
        );
        assert_eq!(
            step(quiet, &follower(9), t0, heard).1,
            Act::Wake(Wake::Activity)
        );
        let voted = View {
            term: 4,
            leader: None,
            ..follower(8)
        };
        assert_eq!(
            step(quiet, &voted, t0, heard).1,
            Act::Wake(Wake::Leadership)
        );
        let other = View {
            leader: Some(2),
            ..follower(8)
        };
        assert_eq!(
            step(quiet, &other, t0, heard).1,
            Act::Wake(Wake::Leadership)
        );
        // An awake follower never quiets on its own: only on its leader's ping.
        let awake = State::Awake {
            index: Some(8),
            since: t0,
        };
        assert_eq!(
            step(awake, &follower(8), t0 + AFTER * 10, heard).1,
            Act::Keep
        );
    }

    #[test]
    fn a_follower_quiets_only_on_the_word_of_the_leader_it_knows_at_the_same_term_and_entry() {
        let q = QuietGroup {
            group: 0,
            term: 3,
            last_log_index: Some(8),
        };
        assert!(may_follow_quietly(&follower(8), 1, &q));
        // Just restarted: no leader known yet, same term and log.
        let restarted = View {
            leader: None,
            ..follower(8)
        };
        assert!(may_follow_quietly(&restarted, 1, &q));
        assert!(!may_follow_quietly(&follower(8), 2, &q), "another leader");
        assert!(!may_follow_quietly(&follower(7), 1, &q), "behind");
        assert!(!may_follow_quietly(&follower(9), 1, &q), "ahead: a write");
        let later = View {
            term: 4,
            ..follower(8)
        };
        assert!(!may_follow_quietly(&later, 1, &q), "another term");
        let outside = View {
            member: false,
            ..follower(8)
        };
        assert!(!may_follow_quietly(&outside, 1, &q));
        assert!(!may_follow_quietly(&leader(8, true), 1, &q));
    }

    #[test]
    fn a_replica_outside_the_membership_parks_and_wakes_when_it_is_added() {
        let t0 = Instant::now();
        let awake = State::Awake {
            index: None,
            since: t0,
        };
        let outside = View {
            member: false,
            leader: None,
            ..follower(0)
        };
        assert_eq!(step(awake, &outside, t0, None), (State::Outside, Act::Park));
        assert_eq!(step(State::Outside, &outside, t0, None).1, Act::Keep);
        assert_eq!(
            step(State::Outside, &follower(0), t0, None).1,
            Act::Wake(Wake::Member)
        );
    }
}
