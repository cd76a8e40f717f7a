//! Views of one group's state: a point-in-time [`ReadView`] for queries, and a [`GroupTxn`] that
//! collects the writes of one apply into a single `WriteBatch`.

use std::collections::BTreeMap;

use rocksdb::{DB, Direction, IteratorMode, ReadOptions, SnapshotWithThreadMode, WriteBatch};

use super::{Storage, group_key};
use crate::ids::GroupId;
use crate::state::{Ownership, Rows, StateRead, StateStore, StoreError, Table, keys};

fn io(e: rocksdb::Error) -> StoreError {
    StoreError::Io(e.to_string())
}

/// Reads `[from, to)` of one table (group-prefixed) through `iter`, skipping keys `skip` rejects,
/// until `limit` entries are collected.
fn scan_db<'a>(
    iter: impl Iterator<Item = Result<(Box<[u8]>, Box<[u8]>), rocksdb::Error>> + 'a,
    end: &[u8],
    limit: usize,
    mut skip: impl FnMut(&[u8]) -> bool,
) -> Result<Rows, StoreError> {
    let mut out = Vec::new();
    if limit == 0 {
        return Ok(out);
    }
    for item in iter {
        let (k, v) = item.map_err(io)?;
        if &k[..] >= end {
            break;
        }
        let key = k[2..].to_vec();
        if skip(&key) {
            continue;
        }
        out.push((key, v.into_vec()));
        if out.len() >= limit {
            break;
        }
    }
    Ok(out)
}

/// A consistent, read-only view of one group at the moment it was made.
pub struct ReadView<'a> {
    storage: &'a Storage,
    group: GroupId,
    snap: SnapshotWithThreadMode<'a, DB>,
}

impl<'a> ReadView<'a> {
    pub(super) fn new(storage: &'a Storage, group: GroupId) -> Self {
        Self {
            storage,
            group,
            snap: storage.db().snapshot(),
        }
    }
}

impl StateRead for ReadView<'_> {
    fn group(&self) -> GroupId {
        self.group
    }

    fn get(&self, table: Table, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        self.snap
            .get_cf(self.storage.table_cf(table), group_key(self.group, key))
            .map_err(io)
    }

    fn scan(&self, table: Table, from: &[u8], to: &[u8], limit: usize) -> Result<Rows, StoreError> {
        let start = group_key(self.group, from);
        let end = group_key(self.group, to);
        let mut ro = ReadOptions::default();
        ro.set_iterate_upper_bound(end.clone());
        let iter = self.snap.iterator_cf_opt(
            self.storage.table_cf(table),
            ro,
            IteratorMode::From(&start, Direction::Forward),
        );
        scan_db(iter, &end, limit, |_| false)
    }
}

/// The writes of one apply over one group, visible to its own reads, committed as one batch.
pub struct GroupTxn<'a> {
    storage: &'a Storage,
    group: GroupId,
    overlay: BTreeMap<(Table, Vec<u8>), Option<Vec<u8>>>,
    /// The group's ownership record as stored before this transaction, when the caller knows
    /// it (every command asks for it; the state machine keeps it in memory).
    ownership: Option<Option<Ownership>>,
}

impl<'a> GroupTxn<'a> {
    pub fn new(storage: &'a Storage, group: GroupId) -> Self {
        Self {
            storage,
            group,
            overlay: BTreeMap::new(),
            ownership: None,
        }
    }

    /// This transaction, answering [`StateRead::ownership`] from `stored` (the record as it is
    /// in the database) until the transaction writes one.
    pub fn with_ownership(mut self, stored: Option<Ownership>) -> Self {
        self.ownership = Some(stored);
        self
    }

    /// Moves the collected writes into `batch`.
    pub fn write_into(self, batch: &mut WriteBatch) {
        for ((table, key), value) in self.overlay {
            let cf = self.storage.table_cf(table);
            let k = group_key(self.group, &key);
            match value {
                Some(v) => batch.put_cf(cf, k, v),
                None => batch.delete_cf(cf, k),
            }
        }
    }

    pub fn is_empty(&self) -> bool {
        self.overlay.is_empty()
    }
}

impl StateRead for GroupTxn<'_> {
    fn group(&self) -> GroupId {
        self.group
    }

    fn ownership(&self) -> Result<Option<Ownership>, StoreError> {
        let written = self
            .overlay
            .contains_key(&(Table::State, keys::ownership()));
        match &self.ownership {
            Some(stored) if !written => Ok(stored.clone()),
            _ => crate::state::read_ownership(self),
        }
    }

    fn get(&self, table: Table, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        if let Some(v) = self.overlay.get(&(table, key.to_vec())) {
            return Ok(v.clone());
        }
        self.storage
            .db()
            .get_cf(self.storage.table_cf(table), group_key(self.group, key))
            .map_err(io)
    }

    fn scan(&self, table: Table, from: &[u8], to: &[u8], limit: usize) -> Result<Rows, StoreError> {
        let start = group_key(self.group, from);
        let end = group_key(self.group, to);
        let mut ro = ReadOptions::default();
        ro.set_iterate_upper_bound(end.clone());
        let iter = self.storage.db().iterator_cf_opt(
            self.storage.table_cf(table),
            ro,
            IteratorMode::From(&start, Direction::Forward),
        );
        // Keys this transaction wrote or deleted are decided by the overlay, not the database.
        let overlay: Vec<(&Vec<u8>, &Option<Vec<u8>>)> = self
            .overlay
            .range((table, from.to_vec())..(table, to.to_vec()))
            .map(|((_, k), v)| (k, v))
            .collect();
        let mut merged: BTreeMap<Vec<u8>, Vec<u8>> = scan_db(iter, &end, limit, |k| {
            self.overlay.contains_key(&(table, k.to_vec()))
        })?
        .into_iter()
        .collect();
        for (k, v) in overlay {
            if let Some(v) = v {
                merged.insert(k.clone(), v.clone());
            }
        }
        Ok(merged.into_iter().take(limit).collect())
    }
}

impl StateStore for GroupTxn<'_> {
    fn put(&mut self, table: Table, key: Vec<u8>, value: Vec<u8>) {
        self.overlay.insert((table, key), Some(value));
    }

    fn delete(&mut self, table: Table, key: Vec<u8>) {
        self.overlay.insert((table, key), None);
    }
}
