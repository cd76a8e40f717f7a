//! The raft logs of every group on a node, in append-only segment files beside RocksDB.
//!
//! A raft entry is written once, where it is durable, and read back from memory (the log
//! store's tail cache) or, if older, with one `pread`. In RocksDB the same entry was also
//! inserted into a memtable, flushed into an SST and compacted, only to be deleted by the next
//! purge; and its fsync made the state machine's writes durable as well, which the raft log
//! makes unnecessary (a replica replays whatever its state lost).
//!
//! ```text
//!   segments/0000000000000001.seg  0000000000000002.seg  …  (the last one is appended to)
//!   record: crc32(4) ‖ len(4) ‖ kind(1) ‖ group(2) ‖ index(8) ‖ data(len - 11)
//!   kind:   1 entry (data: the encoded entry) · 2 truncate from index · 3 clear the group
//!           4 copy of an entry (copy-forward; data as 1) · 5 end of a group's copies
//! ```
//!
//! - **Recovery** replays every segment in order into an index per group (where each entry
//!   is: segment, offset, length). A record that ends early or fails its checksum at the end of
//!   the last segment is a write the crash cut short: the file is cut there. Anywhere else it is
//!   corruption, and the node refuses to start.
//! - **Rules of replay**: an entry at index `i` drops the group's entries from `i` on (raft
//!   overwrites a conflicting suffix), a truncate record drops them from its index, a clear
//!   record drops the group's whole log. A purge writes no record: the purge point is kept in
//!   RocksDB (`raft_meta`), synced before the entries are forgotten, and the log store applies it
//!   when it opens.
//! - **Space**: a new segment starts once the active one holds [`SEGMENT_BYTES`]. The oldest
//!   segments are deleted, in order, once every entry in them is purged or cleared; deleting
//!   only a prefix keeps every record that is left meaningful on the next replay. A group with
//!   little left in the log (a quiet one, which rarely snapshots and purges) does not hold an
//!   old segment: its entries are copied to the active segment first.
//! - **Copies count whole or not at all**: a group's copies are one write, closed by an end
//!   record, and replay takes them only with it. A copy replaces the group's entries from its
//!   index on (as an entry does), so a crash that kept only the first copies would otherwise drop
//!   the originals after them, which were durable.
//! - **Durability**: [`SegmentLog::sync`] fsyncs the active segment. A full segment is fsynced
//!   before the next is created, and the directory after, so one fsync covers every write made
//!   before it.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use crate::ids::GroupId;

/// A new segment starts once the active one holds this many bytes.
pub const SEGMENT_BYTES: u64 = 64 << 20;

const HEADER: usize = 4 + 4 + 1 + 2 + 8;
/// The part of the header the length counts (kind, group, index).
const BODY_HEADER: usize = 1 + 2 + 8;
/// A segment kept only by groups with at most this many bytes of entries left each has those
/// entries copied forward and goes (see `Inner::collect`).
const REWRITE_MAX_BYTES: u64 = 1 << 20;

/// The largest record accepted when reading (an entry holds at most a 64 MiB body).
const MAX_RECORD: usize = 128 << 20;

const ENTRY: u8 = 1;
const TRUNCATE: u8 = 2;
const CLEAR: u8 = 3;
const COPY: u8 = 4;
const COPIES_END: u8 = 5;

#[derive(Clone, Copy, Debug)]
struct Loc {
    seq: u64,
    /// Offset of the entry's data in its segment.
    off: u64,
    len: u32,
}

/// One group's log: `locs[i]` is where entry `first + i` is.
#[derive(Default)]
struct GroupLog {
    generation: u64,
    first: u64,
    locs: VecDeque<Loc>,
}

impl GroupLog {
    fn next(&self) -> u64 {
        self.first + self.locs.len() as u64
    }

    fn truncate_from(&mut self, index: u64) {
        let keep = index.saturating_sub(self.first);
        self.locs
            .truncate(usize::try_from(keep).unwrap_or(usize::MAX));
    }

    fn push(&mut self, index: u64, loc: Loc) {
        if self.locs.is_empty() || index < self.first || index > self.next() {
            self.locs.clear();
            self.first = index;
        } else {
            self.truncate_from(index);
        }
        self.locs.push_back(loc);
    }

    fn purge_to(&mut self, index: u64) {
        while self.first <= index && self.locs.pop_front().is_some() {
            self.first += 1;
        }
        if self.first <= index {
            self.first = index + 1;
        }
    }
}

struct Segment {
    file: Arc<File>,
    /// The groups with entries written here, each with its generation then.
    groups: HashMap<GroupId, u64>,
}

struct Inner {
    dir: PathBuf,
    segment_bytes: u64,
    /// See [`REWRITE_MAX_BYTES`].
    rewrite_max: u64,
    segments: BTreeMap<u64, Segment>,
    active_seq: u64,
    active_len: u64,
    groups: HashMap<GroupId, GroupLog>,
    next_generation: u64,
}

/// Every group's raft log on this node.
pub struct SegmentLog {
    inner: Mutex<Inner>,
}

impl std::fmt::Debug for SegmentLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SegmentLog").finish_non_exhaustive()
    }
}

fn corrupt(what: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what)
}

fn segment_path(dir: &Path, seq: u64) -> PathBuf {
    dir.join(format!("{seq:016x}.seg"))
}

fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

fn record(kind: u8, group: GroupId, index: u64, data: &[u8], out: &mut Vec<u8>) {
    let len = u32::try_from(BODY_HEADER + data.len()).unwrap_or(u32::MAX);
    let start = out.len();
    out.extend_from_slice(&[0; 4]);
    out.extend_from_slice(&len.to_le_bytes());
    out.push(kind);
    out.extend_from_slice(&group.to_be_bytes());
    out.extend_from_slice(&index.to_be_bytes());
    out.extend_from_slice(data);
    let crc = crc32fast::hash(&out[start + 4..]);
    out[start..start + 4].copy_from_slice(&crc.to_le_bytes());
}

impl SegmentLog {
    /// Opens the segments under `dir` (creating it), replays them, and cuts a torn record off
    /// the end of the last one.
    ///
    /// # Errors
    /// When a file cannot be read or written, or a segment other than the last is corrupt.
    pub fn open(dir: &Path) -> io::Result<Self> {
        Self::open_sized(dir, SEGMENT_BYTES, REWRITE_MAX_BYTES)
    }

    fn open_sized(dir: &Path, segment_bytes: u64, rewrite_max: u64) -> io::Result<Self> {
        if !dir.exists() {
            std::fs::create_dir_all(dir)?;
            if let Some(parent) = dir.parent() {
                sync_dir(parent)?;
            }
        }
        let mut seqs = Vec::new();
        for e in std::fs::read_dir(dir)? {
            let name = e?.file_name();
            let name = name.to_string_lossy();
            if let Some(hex) = name.strip_suffix(".seg")
                && let Ok(seq) = u64::from_str_radix(hex, 16)
            {
                seqs.push(seq);
            }
        }
        seqs.sort_unstable();
        let mut inner = Inner {
            dir: dir.to_path_buf(),
            segment_bytes,
            rewrite_max,
            segments: BTreeMap::new(),
            active_seq: 0,
            active_len: 0,
            groups: HashMap::new(),
            next_generation: 1,
        };
        for (i, &seq) in seqs.iter().enumerate() {
            let last = i + 1 == seqs.len();
            let path = segment_path(dir, seq);
            let file = OpenOptions::new().read(true).append(true).open(&path)?;
            let bytes = std::fs::read(&path)?;
            let (valid, groups) = inner.replay(seq, &bytes);
            if valid < bytes.len() {
                if !last {
                    return Err(corrupt(format!(
                        "raft log segment {} is corrupt at byte {valid}",
                        path.display()
                    )));
                }
                tracing::warn!(
                    segment = %path.display(),
                    at = valid,
                    dropped = bytes.len() - valid,
                    "cutting a torn write off the raft log"
                );
                file.set_len(valid as u64)?;
                file.sync_all()?;
            }
            inner.active_seq = seq;
            inner.active_len = valid as u64;
            inner.segments.insert(
                seq,
                Segment {
                    file: Arc::new(file),
                    groups,
                },
            );
        }
        if inner.segments.is_empty() {
            inner.start_segment(1)?;
        }
        Ok(Self {
            inner: Mutex::new(inner),
        })
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Appends `entries` (index, encoded entry) of `group`, in order, in one write. They are
    /// readable when this returns and durable after the next [`SegmentLog::sync`].
    ///
    /// # Errors
    /// When the write fails.
    pub fn append<'a>(
        &self,
        group: GroupId,
        entries: impl IntoIterator<Item = (u64, &'a [u8])>,
    ) -> io::Result<()> {
        let mut inner = self.lock();
        if inner.active_len >= inner.segment_bytes {
            let next = inner.active_seq + 1;
            inner.start_segment(next)?;
        }
        inner.append(group, entries, false)
    }

    /// Copies every entry still in the log into a new segment and deletes all the others, so
    /// that no file keeps a purged entry (`Storage::compact_fully`).
    ///
    /// # Errors
    /// When a file cannot be read, written, synced or deleted.
    pub fn rewrite(&self) -> io::Result<()> {
        let mut inner = self.lock();
        let next = inner.active_seq + 1;
        inner.start_segment(next)?;
        let mut groups: Vec<GroupId> = inner.groups.keys().copied().collect();
        groups.sort_unstable();
        for group in groups {
            inner.rewrite_group(group)?;
        }
        inner.sync_active()?;
        let old: Vec<u64> = inner.segments.range(..next).map(|(seq, _)| *seq).collect();
        for seq in old {
            std::fs::remove_file(segment_path(&inner.dir, seq))?;
            inner.segments.remove(&seq);
        }
        sync_dir(&inner.dir)
    }

    /// Drops `group`'s entries from `index` on (durable after the next sync).
    ///
    /// # Errors
    /// When the write fails.
    pub fn truncate(&self, group: GroupId, index: u64) -> io::Result<()> {
        let mut inner = self.lock();
        let mut buf = Vec::new();
        record(TRUNCATE, group, index, &[], &mut buf);
        inner.write(&buf)?;
        if let Some(log) = inner.groups.get_mut(&group) {
            log.truncate_from(index);
        }
        Ok(())
    }

    /// Drops `group`'s whole log (durable after the next sync).
    ///
    /// # Errors
    /// When the write fails.
    pub fn clear(&self, group: GroupId) -> io::Result<()> {
        let mut inner = self.lock();
        let mut buf = Vec::new();
        record(CLEAR, group, 0, &[], &mut buf);
        inner.write(&buf)?;
        inner.groups.remove(&group);
        inner.collect();
        Ok(())
    }

    /// Forgets `group`'s entries up to and including `index` (whose purge point the caller has
    /// made durable), and deletes the oldest segments that hold nothing else.
    pub fn purge(&self, group: GroupId, index: u64) {
        let mut inner = self.lock();
        let generation = inner.generation_of(group);
        let log = inner.groups.entry(group).or_insert_with(|| GroupLog {
            generation,
            ..GroupLog::default()
        });
        log.purge_to(index);
        inner.collect();
    }

    /// Those of `group`'s entries `start..end` that the log holds, with their indexes, in order.
    ///
    /// # Errors
    /// When one cannot be read.
    pub fn read(&self, group: GroupId, start: u64, end: u64) -> io::Result<Vec<(u64, Vec<u8>)>> {
        let inner = self.lock();
        let Some(log) = inner.groups.get(&group) else {
            return Ok(Vec::new());
        };
        let (start, end) = (start.max(log.first), end.min(log.next()));
        let mut out = Vec::new();
        for index in start..end {
            let at = usize::try_from(index - log.first).unwrap_or(usize::MAX);
            if let Some(loc) = log.locs.get(at) {
                out.push((index, inner.read_at(*loc)?));
            }
        }
        Ok(out)
    }

    /// The first and last index of `group`'s entries, if it has any.
    pub fn bounds(&self, group: GroupId) -> Option<(u64, u64)> {
        let inner = self.lock();
        let log = inner.groups.get(&group)?;
        (!log.locs.is_empty()).then(|| (log.first, log.next() - 1))
    }

    /// Makes every write made before this call durable.
    ///
    /// # Errors
    /// When the fsync fails.
    pub fn sync(&self) -> io::Result<()> {
        let file = {
            let inner = self.lock();
            inner
                .segments
                .get(&inner.active_seq)
                .map(|s| s.file.clone())
        };
        match file {
            Some(f) => f.sync_data(),
            None => Ok(()),
        }
    }

    /// How many segment files there are (for tests and metrics).
    pub fn segment_count(&self) -> usize {
        self.lock().segments.len()
    }
}

impl Inner {
    /// Applies the records of segment `seq` to the index; returns how many bytes of it are
    /// whole records, and the newest entry of each group in it.
    fn replay(&mut self, seq: u64, bytes: &[u8]) -> (usize, HashMap<GroupId, u64>) {
        let mut groups = HashMap::new();
        // The copies read since the last end record (taken only when it follows).
        let mut copies: Vec<(GroupId, u64, Loc)> = Vec::new();
        let mut at = 0;
        while bytes.len() - at >= HEADER {
            let word =
                |i: usize| u32::from_le_bytes([bytes[i], bytes[i + 1], bytes[i + 2], bytes[i + 3]]);
            let (crc, len) = (word(at), word(at + 4) as usize);
            if !(BODY_HEADER..=MAX_RECORD).contains(&len) || bytes.len() - at - 8 < len {
                break;
            }
            let body = &bytes[at + 8..at + 8 + len];
            if crc32fast::hash(&bytes[at + 4..at + 8 + len]) != crc {
                break;
            }
            let kind = body[0];
            let group = GroupId::from_be_bytes([body[1], body[2]]);
            let mut index = [0u8; 8];
            index.copy_from_slice(&body[3..11]);
            let index = u64::from_be_bytes(index);
            let loc = Loc {
                seq,
                off: (at + HEADER) as u64,
                len: u32::try_from(len - BODY_HEADER).unwrap_or(u32::MAX),
            };
            if !matches!(kind, COPY | COPIES_END) {
                // Copies not closed by their end record were cut short: none of them counts.
                copies.clear();
            }
            // An entry (or a copy) at `index` replaces the group's entries from there on.
            let mut place = |inner: &mut Self, group: GroupId, index: u64, loc: Loc| {
                let generation = inner.generation_of(group);
                inner.groups.entry(group).or_default().push(index, loc);
                groups.insert(group, generation);
            };
            match kind {
                ENTRY => place(self, group, index, loc),
                COPY => copies.push((group, index, loc)),
                COPIES_END => {
                    for (group, index, loc) in copies.drain(..) {
                        place(self, group, index, loc);
                    }
                }
                TRUNCATE => {
                    if let Some(log) = self.groups.get_mut(&group) {
                        log.truncate_from(index);
                    }
                }
                CLEAR => {
                    self.groups.remove(&group);
                }
                _ => break,
            }
            at += 8 + len;
        }
        (at, groups)
    }

    /// Writes `entries` of `group` in one write: as entries, or as copies of entries the log
    /// already holds, closed by their end record (`copies`).
    fn append<'a>(
        &mut self,
        group: GroupId,
        entries: impl IntoIterator<Item = (u64, &'a [u8])>,
        copies: bool,
    ) -> io::Result<()> {
        let seq = self.active_seq;
        let base = self.active_len;
        let mut buf = Vec::new();
        let mut locs = Vec::new();
        let kind = if copies { COPY } else { ENTRY };
        for (index, data) in entries {
            record(kind, group, index, data, &mut buf);
            let len = u32::try_from(data.len()).map_err(|_| corrupt("entry too large".into()))?;
            let off = base + (buf.len() - data.len()) as u64;
            locs.push((index, Loc { seq, off, len }));
        }
        if locs.is_empty() {
            return Ok(());
        }
        if copies {
            record(COPIES_END, group, 0, &[], &mut buf);
        }
        self.write(&buf)?;
        let generation = self.generation_of(group);
        let log = self.groups.entry(group).or_default();
        for (index, loc) in locs {
            log.push(index, loc);
        }
        if let Some(s) = self.segments.get_mut(&seq) {
            s.groups.insert(group, generation);
        }
        Ok(())
    }

    fn read_at(&self, loc: Loc) -> io::Result<Vec<u8>> {
        let file = &self
            .segments
            .get(&loc.seq)
            .ok_or_else(|| corrupt(format!("raft log segment {} is gone", loc.seq)))?
            .file;
        let mut data = vec![0; loc.len as usize];
        file.read_exact_at(&mut data, loc.off)?;
        Ok(data)
    }

    /// The generation of `group`'s log, starting a new one if it has none.
    fn generation_of(&mut self, group: GroupId) -> u64 {
        if let Some(log) = self.groups.get(&group) {
            return log.generation;
        }
        let generation = self.next_generation;
        self.next_generation += 1;
        self.groups.insert(
            group,
            GroupLog {
                generation,
                ..GroupLog::default()
            },
        );
        generation
    }

    /// Makes the full active segment durable and starts segment `seq`.
    fn start_segment(&mut self, seq: u64) -> io::Result<()> {
        self.sync_active()?;
        let path = segment_path(&self.dir, seq);
        let file = OpenOptions::new()
            .read(true)
            .append(true)
            .create_new(true)
            .open(&path)?;
        sync_dir(&self.dir)?;
        self.segments.insert(
            seq,
            Segment {
                file: Arc::new(file),
                groups: HashMap::new(),
            },
        );
        self.active_seq = seq;
        self.active_len = 0;
        Ok(())
    }

    fn write(&mut self, buf: &[u8]) -> io::Result<()> {
        let seg = self
            .segments
            .get(&self.active_seq)
            .ok_or_else(|| corrupt("no active raft log segment".into()))?;
        if let Err(e) = (&*seg.file).write_all(buf) {
            // Whatever part of it reached the file goes, so that the next record follows the
            // last whole one (a torn record is only allowed at the very end).
            if let Err(cut) = seg.file.set_len(self.active_len) {
                tracing::error!(error = %cut, "cannot cut a failed write off the raft log");
            }
            return Err(e);
        }
        self.active_len += buf.len() as u64;
        Ok(())
    }

    /// Copies every entry `group` still has to the end of the active segment, in one write
    /// closed by its end record: the group's entries then all live there, and replay keeps them
    /// in place of the originals (a copy at an index replaces the group's entries from there on).
    /// Not durable until the next sync: the caller syncs before deleting any original.
    fn rewrite_group(&mut self, group: GroupId) -> io::Result<()> {
        let Some(log) = self.groups.get(&group) else {
            return Ok(());
        };
        let first = log.first;
        let mut entries = Vec::with_capacity(log.locs.len());
        for (i, loc) in log.locs.iter().enumerate() {
            entries.push((first + i as u64, self.read_at(*loc)?));
        }
        self.append(group, entries.iter().map(|(i, d)| (*i, d.as_slice())), true)
    }

    /// Whether segment `seq` holds an entry of `group` (of `generation`) not yet purged. A
    /// group's entries run from older segments to newer ones, so its first entry's segment is
    /// its oldest.
    fn holds(&self, group: GroupId, generation: u64, seq: u64) -> bool {
        self.groups.get(&group).is_some_and(|log| {
            log.generation == generation && log.locs.front().is_some_and(|l| l.seq <= seq)
        })
    }

    /// Deletes the oldest segments whose every entry is purged or cleared. A segment kept only
    /// by groups with little left in the log (a quiet group that has not snapshotted for a long
    /// time, such as the system group) does not wait for them: their entries are copied forward
    /// first ([`REWRITE_MAX_BYTES`]), made durable, and the segment goes.
    fn collect(&mut self) {
        while let Some((&seq, seg)) = self.segments.first_key_value() {
            if seq == self.active_seq {
                return;
            }
            let holding: Vec<GroupId> = seg
                .groups
                .iter()
                .filter(|&(&g, &generation)| self.holds(g, generation, seq))
                .map(|(&g, _)| g)
                .collect();
            if !holding.is_empty() {
                let live = |g: &GroupId| {
                    self.groups
                        .get(g)
                        .map_or(0, |l| l.locs.iter().map(|l| u64::from(l.len)).sum::<u64>())
                };
                if holding.iter().any(|g| live(g) > self.rewrite_max) {
                    return;
                }
                let moved = holding
                    .iter()
                    .try_for_each(|&g| self.rewrite_group(g))
                    .and_then(|()| self.sync_active());
                if let Err(e) = moved {
                    tracing::warn!(segment = seq, error = %e, "cannot copy raft log entries forward");
                    return;
                }
            }
            if let Err(e) = std::fs::remove_file(segment_path(&self.dir, seq)) {
                tracing::warn!(segment = seq, error = %e, "cannot delete a purged raft log segment");
                return;
            }
            self.segments.remove(&seq);
        }
    }

    fn sync_active(&self) -> io::Result<()> {
        match self.segments.get(&self.active_seq) {
            Some(s) => s.file.sync_data(),
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(group: GroupId, index: u64) -> Vec<u8> {
        format!("group {group} entry {index}").into_bytes()
    }

    fn append(log: &SegmentLog, group: GroupId, indexes: std::ops::Range<u64>) {
        let entries: Vec<(u64, Vec<u8>)> = indexes.map(|i| (i, data(group, i))).collect();
        log.append(group, entries.iter().map(|(i, d)| (*i, d.as_slice())))
            .expect("append");
    }

    fn read(log: &SegmentLog, group: GroupId, start: u64, end: u64) -> Vec<Vec<u8>> {
        let got = log.read(group, start, end).expect("read");
        assert!(got.windows(2).all(|w| w[1].0 == w[0].0 + 1), "in order");
        got.into_iter().map(|(_, d)| d).collect()
    }

    fn want(group: GroupId, indexes: std::ops::Range<u64>) -> Vec<Vec<u8>> {
        indexes.map(|i| data(group, i)).collect()
    }

    #[test]
    fn entries_of_several_groups_are_read_back_after_a_reopen() {
        let dir = tempfile::tempdir().expect("dir");
        {
            let log = SegmentLog::open(dir.path()).expect("open");
            append(&log, 1, 1..4);
            append(&log, 2, 10..12);
            append(&log, 1, 4..6);
            log.sync().expect("sync");
            assert_eq!(read(&log, 1, 2, 6), want(1, 2..6));
            // Only what is there: entry 0 and 6 never were.
            assert_eq!(read(&log, 1, 0, 3), want(1, 1..3));
            assert_eq!(read(&log, 1, 5, 7), want(1, 5..6));
            assert_eq!(read(&log, 9, 0, 3), Vec::<Vec<u8>>::new());
        }
        let log = SegmentLog::open(dir.path()).expect("reopen");
        assert_eq!(log.bounds(1), Some((1, 5)));
        assert_eq!(log.bounds(2), Some((10, 11)));
        assert_eq!(log.bounds(3), None);
        assert_eq!(read(&log, 1, 1, 6), want(1, 1..6));
        assert_eq!(read(&log, 2, 10, 12), want(2, 10..12));
    }

    #[test]
    fn overwrites_truncations_and_clears_replay_as_they_happened() {
        let dir = tempfile::tempdir().expect("dir");
        {
            let log = SegmentLog::open(dir.path()).expect("open");
            append(&log, 1, 1..8);
            // A new leader overwrites 5.. with entries of its own.
            log.append(1, [(5, &b"new 5"[..]), (6, &b"new 6"[..])])
                .expect("overwrite");
            append(&log, 2, 1..4);
            log.truncate(2, 2).expect("truncate");
            append(&log, 3, 1..4);
            log.clear(3).expect("clear");
            append(&log, 3, 7..9);
            log.sync().expect("sync");
        }
        let log = SegmentLog::open(dir.path()).expect("reopen");
        assert_eq!(log.bounds(1), Some((1, 6)));
        assert_eq!(
            read(&log, 1, 5, 7),
            vec![b"new 5".to_vec(), b"new 6".to_vec()]
        );
        assert_eq!(log.bounds(2), Some((1, 1)));
        assert_eq!(log.bounds(3), Some((7, 8)));
    }

    #[test]
    fn a_torn_last_record_is_cut_off_and_corruption_before_it_is_refused() {
        let dir = tempfile::tempdir().expect("dir");
        {
            let log = SegmentLog::open(dir.path()).expect("open");
            append(&log, 1, 1..4);
            log.sync().expect("sync");
        }
        let path = segment_path(dir.path(), 1);
        let whole = std::fs::read(&path).expect("read");
        // A crash in the middle of writing entry 3.
        std::fs::write(&path, &whole[..whole.len() - 5]).expect("tear");
        {
            let log = SegmentLog::open(dir.path()).expect("a torn tail is not corruption");
            assert_eq!(log.bounds(1), Some((1, 2)));
            // The next entry follows the last whole record.
            append(&log, 1, 3..5);
            log.sync().expect("sync");
        }
        let log = SegmentLog::open(dir.path()).expect("reopen");
        assert_eq!(read(&log, 1, 1, 5), want(1, 1..5));
        drop(log);

        // A flipped bit in entry 2, followed by a later segment: corruption, refused.
        let mut bytes = std::fs::read(&path).expect("read");
        let at = HEADER + data(1, 1).len() + HEADER + 2;
        bytes[at] ^= 1;
        std::fs::write(&path, &bytes).expect("flip");
        std::fs::write(segment_path(dir.path(), 2), b"").expect("a later segment");
        let err = SegmentLog::open(dir.path()).expect_err("refused");
        assert_eq!(err.kind(), io::ErrorKind::InvalidData, "{err}");
    }

    #[test]
    fn purged_segments_are_deleted_oldest_first_and_only_when_every_group_is_done() {
        let dir = tempfile::tempdir().expect("dir");
        let segment = 1 << 20;
        // No copying forward here: every segment waits for its groups' purges.
        let log = SegmentLog::open_sized(dir.path(), segment, 0).expect("open");
        let big = vec![7u8; segment as usize / 2];
        // Segment 1: group 1's entries 1-2; segment 2: group 1's 3-4 and group 2's 1;
        // segment 3: group 1's 5 (active).
        log.append(1, [(1, &big[..])]).expect("1");
        log.append(1, [(2, &big[..])]).expect("2");
        log.append(1, [(3, &big[..])]).expect("3");
        append(&log, 2, 1..2);
        log.append(1, [(4, &big[..])]).expect("4");
        log.append(1, [(5, &big[..])]).expect("5");
        assert_eq!(log.segment_count(), 3);
        log.purge(1, 1);
        assert_eq!(log.segment_count(), 3, "entry 2 is still in segment 1");
        log.purge(1, 4);
        assert_eq!(
            log.segment_count(),
            2,
            "segment 2 still holds group 2's entry"
        );
        log.purge(2, 1);
        assert_eq!(log.segment_count(), 1, "the active segment stays");
        assert_eq!(read(&log, 1, 5, 6), vec![big.clone()]);
        assert_eq!(read(&log, 1, 4, 5), Vec::<Vec<u8>>::new(), "purged");
        drop(log);
        let log = SegmentLog::open_sized(dir.path(), segment, 0).expect("reopen");
        assert_eq!(log.bounds(1), Some((5, 5)));
        assert_eq!(log.bounds(2), None);
        // A cleared group's segments go too, whatever its entries' indexes.
        append(&log, 9, 100..101);
        log.append(1, [(6, &big[..])]).expect("6");
        log.append(1, [(7, &big[..])]).expect("7");
        log.clear(9).expect("clear");
        log.purge(1, 6);
        assert_eq!(log.segment_count(), 1);
        assert_eq!(log.bounds(9), None);
    }

    /// A quiet group (the system group, say) with a few entries in the oldest segment does not
    /// keep it: they are copied forward when the busy groups' purges free the rest, and read
    /// back, also after a reopen, in place of the originals.
    #[test]
    fn a_quiet_groups_few_entries_are_copied_forward_and_do_not_keep_a_segment() {
        let dir = tempfile::tempdir().expect("dir");
        let segment = 1 << 20;
        let log = SegmentLog::open_sized(dir.path(), segment, 64 << 10).expect("open");
        let big = vec![3u8; segment as usize / 2];
        append(&log, 0, 1..4);
        for i in 1..=6 {
            log.append(1, [(i, &big[..])]).expect("busy group");
        }
        // Segments: 1 (group 0's 1-3, group 1's 1-2), 2 (1's 3-4), 3 (1's 5-6), 4 (0's 4).
        append(&log, 0, 4..5);
        assert_eq!(log.segment_count(), 4);
        log.purge(1, 4);
        assert_eq!(
            log.segment_count(),
            2,
            "1 and 2 went; 3 keeps the busy group's entries not purged"
        );
        assert_eq!(read(&log, 0, 1, 5), want(0, 1..5));
        drop(log);
        let log = SegmentLog::open_sized(dir.path(), segment, 64 << 10).expect("reopen");
        assert_eq!(log.bounds(0), Some((1, 4)));
        assert_eq!(read(&log, 0, 1, 5), want(0, 1..5));
        assert_eq!(read(&log, 1, 5, 7), vec![big.clone(), big]);
    }

    /// A crash that keeps only the first copies of a copy-forward (the write was cut short)
    /// loses nothing: replay ignores copies without their end record, and the originals stay.
    #[test]
    fn copies_cut_short_by_a_crash_do_not_replace_the_originals() {
        let dir = tempfile::tempdir().expect("dir");
        let record_len = (HEADER + data(1, 1).len()) as u64;
        {
            let log = SegmentLog::open(dir.path()).expect("open");
            append(&log, 1, 1..5);
            log.lock().rewrite_group(1).expect("copy forward");
            log.sync().expect("sync");
            assert_eq!(read(&log, 1, 1, 5), want(1, 1..5));
        }
        let path = segment_path(dir.path(), 1);
        let whole = std::fs::read(&path).expect("read");
        assert_eq!(
            whole.len() as u64,
            8 * record_len + HEADER as u64,
            "4 entries, 4 copies, the end"
        );
        // Whole, the copies count: an entry appended after them follows them.
        {
            let log = SegmentLog::open(dir.path()).expect("reopen whole");
            assert_eq!(log.bounds(1), Some((1, 4)));
            assert_eq!(read(&log, 1, 1, 5), want(1, 1..5));
        }
        // Two copies made it to the disk, and nothing after them.
        std::fs::write(&path, &whole[..(6 * record_len) as usize]).expect("cut");
        {
            let log = SegmentLog::open(dir.path()).expect("reopen cut");
            assert_eq!(
                log.bounds(1),
                Some((1, 4)),
                "the originals after the copies stay"
            );
            assert_eq!(read(&log, 1, 1, 5), want(1, 1..5));
            // The stray copies stay in the file; what is appended next does not revive them.
            append(&log, 1, 5..6);
            log.sync().expect("sync");
        }
        let log = SegmentLog::open(dir.path()).expect("reopen after an append");
        assert_eq!(log.bounds(1), Some((1, 5)));
        assert_eq!(read(&log, 1, 1, 6), want(1, 1..6));
    }

    #[test]
    fn a_rewrite_leaves_no_purged_entry_in_any_file() {
        let dir = tempfile::tempdir().expect("dir");
        let log = SegmentLog::open(dir.path()).expect("open");
        append(&log, 4, 1..4);
        append(&log, 5, 1..3);
        log.purge(4, 2);
        log.rewrite().expect("rewrite");
        assert_eq!(log.segment_count(), 1);
        assert_eq!(read(&log, 4, 3, 4), want(4, 3..4));
        assert_eq!(read(&log, 5, 1, 3), want(5, 1..3));
        let in_files = |needle: &[u8]| {
            std::fs::read_dir(dir.path()).expect("dir").any(|e| {
                let bytes = std::fs::read(e.expect("entry").path()).expect("read");
                bytes.windows(needle.len()).any(|w| w == needle)
            })
        };
        assert!(in_files(&data(4, 3)), "the scan can find an entry");
        assert!(!in_files(&data(4, 1)) && !in_files(&data(4, 2)));
        drop(log);
        let log = SegmentLog::open(dir.path()).expect("reopen");
        assert_eq!(log.bounds(4), Some((3, 3)));
        assert_eq!(log.bounds(5), Some((1, 2)));
    }
}
