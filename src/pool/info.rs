//! The pool's operational record: what an admin asks of a pool that runs
//! unattended, kept in the metadata (table `info`) so that it survives
//! remounts, moves with the pool and is copied to every member like the rest:
//!
//! - `integrity`: the integrity counters, cumulative over the pool's life;
//! - `scrub`: the last scrub (start, duration, result);
//! - `holds`: the ids of snapshots that prune and delete must leave alone;
//! - `capture`: the last snapshot capture's duration and speed;
//! - `event:<seq>` (16 hex digits): the event history, the newest
//!   [`EVENT_CAP`] events.
//!
//! Each value is a JSON document in the record envelope (version, CRC-32C).
//! Changes are pending in memory until the next metadata commit takes them
//! ([`PoolInfo::take_changes`]); a failed commit gives them back. A value
//! whose envelope does not check is ignored (and rewritten at its next
//! change): nothing here is needed to read the data.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::{Condvar, Mutex};
use serde::{Deserialize, Serialize, de::DeserializeOwned};

use super::IntegrityCounts;
use super::meta::{BlobChange, check_blob, encode_blob};

/// Events kept in the history (older ones are dropped from it).
pub const EVENT_CAP: usize = 2000;
/// Events of one kind recorded per minute at most; the rest are counted and
/// the count is told with the next one of that kind (a disk returning errors
/// on every block must not flood the history or the hooks).
pub const EVENT_RATE: u32 = 60;

const EVENT_PREFIX: &str = "event:";
pub const KEY_INTEGRITY: &str = "integrity";
pub const KEY_SCRUB: &str = "scrub";
pub const KEY_HOLDS: &str = "holds";
pub const KEY_CAPTURE: &str = "capture";
/// The newest snapshot sent out of the pool ([`SentRecord`]).
pub const KEY_SENT: &str = "sent";

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    Info,
    Warning,
    Error,
}

impl Severity {
    pub fn as_str(self) -> &'static str {
        match self {
            Severity::Info => "info",
            Severity::Warning => "warning",
            Severity::Error => "error",
        }
    }
}

/// One thing that happened to the pool.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    /// Increasing over the pool's life.
    pub seq: u64,
    /// Seconds since the epoch.
    pub time: i64,
    /// `mounted`, `unmounted`, `member_failed`, `member_online`,
    /// `checksum_repaired`, `unrecoverable`, `scrub_finished`,
    /// `snapshot_created`, `snapshot_deleted`, `space_low`, `device_added`,
    /// `device_removed`, `device_replaced`, `job_cancelled`.
    pub kind: String,
    pub severity: Severity,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub member: Option<String>,
    pub message: String,
}

/// The last scrub, as recorded when it ended.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ScrubRecord {
    /// Seconds since the epoch.
    pub started: i64,
    pub seconds: f64,
    /// `clean`, `repaired` (problems found and all repaired), `problems`
    /// (some remain) or `cancelled`.
    pub result: String,
    pub checksum_errors: u64,
    pub repaired: u64,
    pub unrecoverable: u64,
    pub io_errors: u64,
}

/// The newest snapshot that left the pool: a send of it completed (the
/// whole stream written; whether it was kept at the other end is the
/// receiver's to say).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct SentRecord {
    pub snapshot: String,
    /// Its creation time (seconds): newer snapshots replace older ones here.
    pub created: i64,
    pub base: Option<String>,
    /// When the send completed (seconds).
    pub at: i64,
    pub bytes: u64,
}

/// The last snapshot capture, as recorded when it completed.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct CaptureRecord {
    pub snapshot: String,
    pub seconds: f64,
    /// Bytes of changed blocks read and saved.
    pub bytes: u64,
    pub bytes_per_second: f64,
}

type Listener = Arc<dyn Fn(&Event) + Send + Sync>;

#[derive(Default)]
struct Inner {
    values: BTreeMap<String, serde_json::Value>,
    /// Keys changed since the last commit took them: `None` deletes.
    dirty: BTreeMap<String, Option<Vec<u8>>>,
    events: VecDeque<Event>,
    next_seq: u64,
    /// Per kind: (minute, recorded in it, suppressed since the last recorded).
    rate: BTreeMap<String, (i64, u32, u64)>,
    integrity_persisted: Option<IntegrityCounts>,
}

#[derive(Default)]
pub struct PoolInfo {
    inner: Mutex<Inner>,
    /// Woken at each new event (followers of the history wait on it).
    new_event: Condvar,
    listeners: Mutex<Vec<Listener>>,
}

fn event_key(seq: u64) -> String {
    format!("{EVENT_PREFIX}{seq:016x}")
}

impl PoolInfo {
    /// Loads the record from the metadata image's `info` table.
    pub fn load(&self, stored: &BTreeMap<String, Vec<u8>>) {
        let mut g = self.inner.lock();
        *g = Inner::default();
        for (k, blob) in stored {
            let Some(v) = check_blob(blob)
                .ok()
                .and_then(|p| serde_json::from_slice::<serde_json::Value>(p).ok())
            else {
                tracing::warn!(key = %k, "pool record entry damaged; ignored");
                continue;
            };
            if k.starts_with(EVENT_PREFIX) {
                if let Ok(e) = serde_json::from_value::<Event>(v) {
                    g.next_seq = g.next_seq.max(e.seq + 1);
                    g.events.push_back(e);
                }
            } else {
                g.values.insert(k.clone(), v);
            }
        }
        g.events.make_contiguous().sort_by_key(|e| e.seq);
        g.integrity_persisted = g
            .values
            .get(KEY_INTEGRITY)
            .and_then(|v| serde_json::from_value(v.clone()).ok());
    }

    pub fn get<T: DeserializeOwned>(&self, key: &str) -> Option<T> {
        let g = self.inner.lock();
        g.values
            .get(key)
            .and_then(|v| serde_json::from_value(v.clone()).ok())
    }

    /// Sets `key` (written by the next commit).
    pub fn put<T: Serialize>(&self, key: &str, value: &T) {
        let Ok(v) = serde_json::to_value(value) else {
            return;
        };
        let mut g = self.inner.lock();
        let blob = encode_blob(v.to_string().as_bytes());
        g.values.insert(key.to_string(), v);
        g.dirty.insert(key.to_string(), Some(blob));
    }

    /// The stored integrity counters (zero for a new pool).
    pub fn integrity(&self) -> IntegrityCounts {
        self.inner.lock().integrity_persisted.unwrap_or_default()
    }

    /// Records `now` as the integrity counters if they changed.
    pub fn note_integrity(&self, now: IntegrityCounts) {
        let changed = {
            let g = self.inner.lock();
            g.integrity_persisted != Some(now)
        };
        if changed {
            self.put(KEY_INTEGRITY, &now);
            self.inner.lock().integrity_persisted = Some(now);
        }
    }

    pub fn has_changes(&self) -> bool {
        !self.inner.lock().dirty.is_empty()
    }

    /// The pending changes, in key order, for the next commit.
    pub fn take_changes(&self) -> Vec<BlobChange<String>> {
        std::mem::take(&mut self.inner.lock().dirty)
            .into_iter()
            .collect()
    }

    /// Gives back the changes of a commit that failed (keys changed again
    /// since keep their newer value).
    pub fn restore_changes(&self, changes: Vec<BlobChange<String>>) {
        let mut g = self.inner.lock();
        for (k, v) in changes {
            g.dirty.entry(k).or_insert(v);
        }
    }

    /// Calls `f` with every event recorded from now on (the daemon runs the
    /// hooks and logs through this).
    pub fn subscribe(&self, f: Listener) {
        self.listeners.lock().push(f);
    }

    /// Records an event at `time` (seconds since the epoch). Returns it, or
    /// `None` when the rate limit of its kind held it back.
    pub fn emit(
        &self,
        time: i64,
        kind: &str,
        severity: Severity,
        member: Option<String>,
        message: String,
    ) -> Option<Event> {
        let ev = {
            let mut g = self.inner.lock();
            let minute = time.div_euclid(60);
            let slot = g.rate.entry(kind.to_string()).or_insert((minute, 0, 0));
            if slot.0 != minute {
                *slot = (minute, 0, slot.2);
            }
            if slot.1 >= EVENT_RATE {
                slot.2 += 1;
                return None;
            }
            slot.1 += 1;
            let suppressed = std::mem::take(&mut slot.2);
            let message = if suppressed > 0 {
                format!("{message} ({suppressed} more {kind} event(s) were not recorded)")
            } else {
                message
            };
            let ev = Event {
                seq: g.next_seq,
                time,
                kind: kind.to_string(),
                severity,
                member,
                message,
            };
            g.next_seq += 1;
            if let Ok(j) = serde_json::to_vec(&ev) {
                g.dirty.insert(event_key(ev.seq), Some(encode_blob(&j)));
            }
            g.events.push_back(ev.clone());
            while g.events.len() > EVENT_CAP {
                if let Some(old) = g.events.pop_front() {
                    g.dirty.insert(event_key(old.seq), None);
                }
            }
            ev
        };
        self.new_event.notify_all();
        let listeners: Vec<Listener> = self.listeners.lock().clone();
        for l in listeners {
            l(&ev);
        }
        Some(ev)
    }

    /// Events with `seq >= since`, oldest first.
    pub fn events_since(&self, since: u64) -> Vec<Event> {
        let g = self.inner.lock();
        g.events
            .iter()
            .filter(|e| e.seq >= since)
            .cloned()
            .collect()
    }

    /// Like [`Self::events_since`], waiting up to `timeout` for one to come.
    pub fn wait_events(&self, since: u64, timeout: Duration) -> Vec<Event> {
        let mut g = self.inner.lock();
        if g.next_seq <= since {
            self.new_event.wait_for(&mut g, timeout);
        }
        g.events
            .iter()
            .filter(|e| e.seq >= since)
            .cloned()
            .collect()
    }

    /// Snapshot ids held against prune and delete.
    pub fn holds(&self) -> BTreeSet<u64> {
        self.get::<BTreeSet<u64>>(KEY_HOLDS).unwrap_or_default()
    }

    pub fn set_hold(&self, id: u64, held: bool) {
        let mut h = self.holds();
        let changed = if held { h.insert(id) } else { h.remove(&id) };
        if changed {
            self.put(KEY_HOLDS, &h);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reload(info: &PoolInfo, stored: &mut BTreeMap<String, Vec<u8>>) -> PoolInfo {
        for (k, v) in info.take_changes() {
            match v {
                Some(b) => stored.insert(k, b),
                None => stored.remove(&k),
            };
        }
        let fresh = PoolInfo::default();
        fresh.load(stored);
        fresh
    }

    #[test]
    fn values_events_and_holds_survive_a_reload() {
        let info = PoolInfo::default();
        let mut stored = BTreeMap::new();
        info.put(
            KEY_SCRUB,
            &ScrubRecord {
                started: 100,
                seconds: 1.5,
                result: "clean".into(),
                ..Default::default()
            },
        );
        info.set_hold(7, true);
        info.emit(60, "mounted", Severity::Info, None, "m".into());
        info.emit(
            61,
            "member_failed",
            Severity::Error,
            Some("/a".into()),
            "x".into(),
        );
        let again = reload(&info, &mut stored);
        assert_eq!(again.get::<ScrubRecord>(KEY_SCRUB).unwrap().started, 100);
        assert_eq!(again.holds(), BTreeSet::from([7]));
        let ev = again.events_since(0);
        assert_eq!(ev.len(), 2);
        assert_eq!(ev[1].kind, "member_failed");
        assert_eq!(ev[1].member.as_deref(), Some("/a"));
        // Sequence numbers go on from the history.
        let e = again.emit(62, "unmounted", Severity::Info, None, "u".into());
        assert_eq!(e.unwrap().seq, 2);
    }

    #[test]
    fn history_is_capped_and_rate_limited() {
        // The numbers docs/design.md section 20.2 gives.
        assert_eq!((EVENT_CAP, EVENT_RATE), (2000, 60));
        let info = PoolInfo::default();
        let mut stored = BTreeMap::new();
        let mut t = 0;
        for i in 0..EVENT_CAP + 10 {
            // Spread over minutes so the rate limit does not apply.
            if i % EVENT_RATE as usize == 0 {
                t += 60;
            }
            assert!(
                info.emit(t, "k", Severity::Info, None, "e".into())
                    .is_some()
            );
        }
        let again = reload(&info, &mut stored);
        assert_eq!(stored.len(), EVENT_CAP);
        assert_eq!(again.events_since(0).len(), EVENT_CAP);
        assert_eq!(again.events_since(0)[0].seq, 10);
        // One minute: EVENT_RATE recorded, the rest counted and told later.
        let t = 1_000_000 * 60;
        for _ in 0..EVENT_RATE + 5 {
            again.emit(t, "burst", Severity::Warning, None, "b".into());
        }
        let n = again
            .events_since(0)
            .iter()
            .filter(|e| e.kind == "burst")
            .count();
        assert_eq!(n, EVENT_RATE as usize);
        let e = again
            .emit(t + 60, "burst", Severity::Warning, None, "b".into())
            .unwrap();
        assert!(e.message.contains("5 more burst"), "{}", e.message);
    }

    #[test]
    fn damaged_entries_are_ignored_and_failed_commits_give_changes_back() {
        let info = PoolInfo::default();
        info.note_integrity(IntegrityCounts {
            checksum_errors: 3,
            ..Default::default()
        });
        let changes = info.take_changes();
        assert_eq!(changes.len(), 1);
        info.restore_changes(changes);
        assert!(info.has_changes());
        let mut stored = BTreeMap::new();
        let again = reload(&info, &mut stored);
        assert_eq!(again.integrity().checksum_errors, 3);
        // Unchanged counters write nothing.
        again.note_integrity(again.integrity());
        assert!(!again.has_changes());
        let mut bad = stored.clone();
        if let Some(b) = bad.get_mut(KEY_INTEGRITY) {
            b[9] ^= 1;
        }
        let damaged = PoolInfo::default();
        damaged.load(&bad);
        assert_eq!(damaged.integrity().checksum_errors, 0);
    }
}
