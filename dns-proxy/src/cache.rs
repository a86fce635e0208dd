//! The learned-name cache: name → address → expiry, sans-IO apart from its
//! snapshot file. The clock is always passed in.
//!
//! - An entry's expiry is `now + max(ttl, ttl_floor) + refresh_slack`; a
//!   new answer never shortens it (an address allowed until T stays allowed
//!   until T). An answer that would end no later than the entry already
//!   does is a confirmation: nothing is reported to program. The slack is
//!   headroom, so a busy name (the same answer every few milliseconds) is
//!   re-programmed at most once per `refresh_slack` instead of on every
//!   answer, and its kernel element never expires before the latest
//!   answer's TTL ends (it may outlive it by at most the slack).
//! - Caps: at most `per_name_cap` addresses per name and `global_cap`
//!   (name, address) entries in all; beyond them the least recently seen
//!   entry is evicted (seen = inserted or confirmed by an answer).
//! - [`FqdnCache::expire`] removes and returns what expired;
//!   [`FqdnCache::next_expiry`] says when to call it next.
//! - Persistence: [`FqdnCache::save`] writes `fqdn-cache.json` in the state
//!   directory crash-safely (temp file, fsync, rename, fsync of the
//!   directory); [`FqdnCache::load`] restores unexpired entries with their
//!   remaining TTL (never more than they had when saved, should the clock
//!   have gone back). A file that does not parse is renamed aside
//!   (`fqdn-cache.json.corrupt-<unix seconds>`) and reported, never silently
//!   overwritten.
//! - Times are wall-clock (they must survive a restart); a clock step moves
//!   every expiry with it.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fs;
use std::io::{self, Write};
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use meshward_policy::Fqdn;
use serde::{Deserialize, Serialize};

use crate::learn::Learned;

/// File name of the snapshot inside the state directory.
pub const CACHE_FILE: &str = "fqdn-cache.json";
const FORMAT_VERSION: u32 = 1;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CacheConfig {
    /// Shortest lifetime given to an entry (0: honour the TTL).
    pub ttl_floor: Duration,
    /// Most addresses kept per name (Cilium's default: 1000).
    pub per_name_cap: usize,
    /// Most (name, address) entries in all.
    pub global_cap: usize,
    /// Headroom added to every expiry (0: exactly the TTL). Answers within
    /// it confirm an entry without re-programming it.
    pub refresh_slack: Duration,
}

impl Default for CacheConfig {
    fn default() -> Self {
        CacheConfig {
            ttl_floor: Duration::ZERO,
            per_name_cap: 1000,
            global_cap: 200_000,
            refresh_slack: Duration::ZERO,
        }
    }
}

/// One (name, address) and when it expires.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CacheEntry {
    pub name: Fqdn,
    pub ip: IpAddr,
    pub expires: SystemTime,
}

/// What an insert changed, for whoever mirrors the cache into the kernel.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CacheUpdate {
    /// New entries and entries whose expiry moved later. Entries an answer
    /// merely confirmed are not listed: nothing to program for them.
    pub upserted: Vec<CacheEntry>,
    /// Entries removed to respect a cap.
    pub evicted: Vec<(Fqdn, IpAddr)>,
}

impl CacheUpdate {
    pub fn is_empty(&self) -> bool {
        self.upserted.is_empty() && self.evicted.is_empty()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        source: io::Error,
    },
    #[error("encoding the FQDN cache: {0}")]
    Encode(serde_json::Error),
}

/// What [`FqdnCache::load`] found.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LoadReport {
    pub restored: usize,
    /// Entries in the file that had expired by now.
    pub expired: usize,
    /// Entries dropped on load to respect the caps.
    pub evicted: usize,
    /// The file did not parse: where it was moved and why.
    pub corrupt: Option<(PathBuf, String)>,
}

#[derive(Serialize, Deserialize)]
struct Snapshot {
    version: u32,
    saved_at_unix_ms: u64,
    /// Least recently seen first.
    entries: Vec<SnapshotEntry>,
}

#[derive(Serialize, Deserialize)]
struct SnapshotEntry {
    name: String,
    ip: IpAddr,
    expires_unix_ms: u64,
}

fn to_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

fn from_ms(ms: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_millis(ms)
}

#[derive(Debug)]
struct Slot {
    name: Fqdn,
    ip: IpAddr,
    expires_ms: u64,
}

#[derive(Debug, Default)]
struct NameEntry {
    /// Address → its sequence number (key in `FqdnCache::slots`).
    ips: HashMap<IpAddr, u64>,
    /// This name's sequence numbers, oldest first.
    order: BTreeSet<u64>,
}

/// See the module documentation.
#[derive(Debug)]
pub struct FqdnCache {
    config: CacheConfig,
    names: HashMap<Fqdn, NameEntry>,
    /// Every entry by sequence number: iteration order is age order.
    slots: BTreeMap<u64, Slot>,
    by_expiry: BTreeSet<(u64, u64)>,
    next_seq: u64,
}

impl FqdnCache {
    pub fn new(config: CacheConfig) -> Self {
        FqdnCache {
            config,
            names: HashMap::new(),
            slots: BTreeMap::new(),
            by_expiry: BTreeSet::new(),
            next_seq: 0,
        }
    }

    pub fn config(&self) -> &CacheConfig {
        &self.config
    }

    /// Number of (name, address) entries.
    pub fn len(&self) -> usize {
        self.slots.len()
    }

    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }

    /// Records every address of an answer under every name it was
    /// attributed to.
    pub fn insert(&mut self, learned: &Learned, now: SystemTime) -> CacheUpdate {
        let mut update = CacheUpdate::default();
        for name in &learned.names {
            for &(ip, ttl) in &learned.ips {
                self.insert_one(
                    name,
                    ip,
                    Duration::from_secs(u64::from(ttl)),
                    now,
                    &mut update,
                );
            }
        }
        update
    }

    /// Records one address of a name with a TTL.
    pub fn insert_one(
        &mut self,
        name: &Fqdn,
        ip: IpAddr,
        ttl: Duration,
        now: SystemTime,
        update: &mut CacheUpdate,
    ) {
        let life = ttl.max(self.config.ttl_floor);
        let expires_ms =
            to_ms(now).saturating_add(u64::try_from(life.as_millis()).unwrap_or(u64::MAX));
        let slack_ms = u64::try_from(self.config.refresh_slack.as_millis()).unwrap_or(u64::MAX);
        self.put(name, ip, expires_ms, slack_ms, update);
    }

    /// Records `ip` for `name` until at least `expires_ms`; when that needs
    /// a later expiry than the entry has, it gets `expires_ms + slack_ms`.
    fn put(
        &mut self,
        name: &Fqdn,
        ip: IpAddr,
        expires_ms: u64,
        slack_ms: u64,
        update: &mut CacheUpdate,
    ) {
        if self.config.per_name_cap == 0 || self.config.global_cap == 0 {
            return;
        }
        let seq = self.next_seq;
        self.next_seq += 1;
        let entry = self.names.entry(name.clone()).or_default();
        let mut expires = expires_ms.saturating_add(slack_ms);
        let mut changed = true;
        if let Some(old_seq) = entry.ips.insert(ip, seq) {
            entry.order.remove(&old_seq);
            if let Some(old) = self.slots.remove(&old_seq) {
                self.by_expiry.remove(&(old.expires_ms, old_seq));
                if expires_ms <= old.expires_ms {
                    // confirmed: what the kernel has lasts long enough
                    changed = false;
                    expires = old.expires_ms;
                }
            }
        }
        entry.order.insert(seq);
        self.slots.insert(
            seq,
            Slot {
                name: name.clone(),
                ip,
                expires_ms: expires,
            },
        );
        self.by_expiry.insert((expires, seq));
        if changed {
            update.upserted.push(CacheEntry {
                name: name.clone(),
                ip,
                expires: from_ms(expires),
            });
        }
        // Caps: the oldest entry of this name, then the oldest of all.
        while self
            .names
            .get(name)
            .is_some_and(|e| e.ips.len() > self.config.per_name_cap)
        {
            let Some(&oldest) = self.names.get(name).and_then(|e| e.order.first()) else {
                break;
            };
            self.evict(oldest, update);
        }
        while self.slots.len() > self.config.global_cap {
            let Some((&oldest, _)) = self.slots.first_key_value() else {
                break;
            };
            self.evict(oldest, update);
        }
    }

    /// Removes the entry with sequence number `seq`; returns it.
    fn remove_seq(&mut self, seq: u64) -> Option<Slot> {
        let slot = self.slots.remove(&seq)?;
        self.by_expiry.remove(&(slot.expires_ms, seq));
        if let Some(entry) = self.names.get_mut(&slot.name) {
            entry.ips.remove(&slot.ip);
            entry.order.remove(&seq);
            if entry.ips.is_empty() {
                self.names.remove(&slot.name);
            }
        }
        Some(slot)
    }

    fn evict(&mut self, seq: u64, update: &mut CacheUpdate) {
        if let Some(slot) = self.remove_seq(seq) {
            // An entry upserted and evicted in one call is only evicted.
            update
                .upserted
                .retain(|e| !(e.name == slot.name && e.ip == slot.ip));
            update.evicted.push((slot.name, slot.ip));
        }
    }

    /// Removes and returns every entry that expired at or before `now`.
    pub fn expire(&mut self, now: SystemTime) -> Vec<(Fqdn, IpAddr)> {
        let now_ms = to_ms(now);
        let mut out = Vec::new();
        while let Some(&(expires, seq)) = self.by_expiry.first() {
            if expires > now_ms {
                break;
            }
            match self.remove_seq(seq) {
                Some(slot) => out.push((slot.name, slot.ip)),
                None => {
                    self.by_expiry.remove(&(expires, seq));
                }
            }
        }
        out
    }

    /// When the next entry expires.
    pub fn next_expiry(&self) -> Option<SystemTime> {
        self.by_expiry.first().map(|&(ms, _)| from_ms(ms))
    }

    /// The unexpired addresses of a name with their expiry.
    pub fn lookup(&self, name: &Fqdn, now: SystemTime) -> Vec<(IpAddr, SystemTime)> {
        let now_ms = to_ms(now);
        let Some(entry) = self.names.get(name) else {
            return Vec::new();
        };
        entry
            .order
            .iter()
            .filter_map(|seq| self.slots.get(seq))
            .filter(|s| s.expires_ms > now_ms)
            .map(|s| (s.ip, from_ms(s.expires_ms)))
            .collect()
    }

    /// Every entry, least recently seen first (expired ones included until
    /// [`FqdnCache::expire`] runs).
    pub fn entries(&self) -> impl Iterator<Item = CacheEntry> + '_ {
        self.slots.values().map(|s| CacheEntry {
            name: s.name.clone(),
            ip: s.ip,
            expires: from_ms(s.expires_ms),
        })
    }

    /// Writes the snapshot to `dir/fqdn-cache.json` crash-safely.
    pub fn save(&self, dir: &Path, now: SystemTime) -> Result<(), CacheError> {
        let snapshot = Snapshot {
            version: FORMAT_VERSION,
            saved_at_unix_ms: to_ms(now),
            entries: self
                .slots
                .values()
                .map(|s| SnapshotEntry {
                    name: s.name.as_str().to_owned(),
                    ip: s.ip,
                    expires_unix_ms: s.expires_ms,
                })
                .collect(),
        };
        let bytes = serde_json::to_vec(&snapshot).map_err(CacheError::Encode)?;
        write_atomically(dir, CACHE_FILE, &bytes)
    }

    /// Loads `dir/fqdn-cache.json` (none: an empty cache). A file that does
    /// not parse is moved aside and reported in [`LoadReport::corrupt`].
    pub fn load(
        dir: &Path,
        config: CacheConfig,
        now: SystemTime,
    ) -> Result<(FqdnCache, LoadReport), CacheError> {
        let path = dir.join(CACHE_FILE);
        let mut cache = FqdnCache::new(config);
        let mut report = LoadReport::default();
        let bytes = match fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok((cache, report)),
            Err(source) => {
                return Err(CacheError::Io {
                    what: "reading",
                    path,
                    source,
                })
            }
        };
        let snapshot = match parse_snapshot(&bytes) {
            Ok(s) => s,
            Err(why) => {
                let aside = dir.join(format!("{CACHE_FILE}.corrupt-{}", to_ms(now) / 1000));
                fs::rename(&path, &aside).map_err(|source| CacheError::Io {
                    what: "moving aside the corrupt",
                    path: path.clone(),
                    source,
                })?;
                report.corrupt = Some((aside, why));
                return Ok((cache, report));
            }
        };
        let now_ms = to_ms(now);
        let mut update = CacheUpdate::default();
        for (name, e) in snapshot.entries {
            if e.expires_unix_ms <= now_ms {
                report.expired += 1;
                continue;
            }
            // Never more life than the entry had when it was saved.
            let had = e.expires_unix_ms.saturating_sub(snapshot.saved_at_unix_ms);
            let expires = e.expires_unix_ms.min(now_ms.saturating_add(had));
            cache.put(&name, e.ip, expires, 0, &mut update);
        }
        report.evicted = update.evicted.len();
        report.restored = cache.len();
        Ok((cache, report))
    }
}

fn parse_snapshot(bytes: &[u8]) -> Result<CheckedSnapshot, String> {
    let s: Snapshot = serde_json::from_slice(bytes).map_err(|e| e.to_string())?;
    if s.version != FORMAT_VERSION {
        return Err(format!(
            "format version {} (this build reads {FORMAT_VERSION})",
            s.version
        ));
    }
    let mut entries = Vec::with_capacity(s.entries.len());
    for (i, e) in s.entries.into_iter().enumerate() {
        let name = Fqdn::parse(&e.name).map_err(|err| format!("entries[{i}].name: {err}"))?;
        entries.push((name, e));
    }
    Ok(CheckedSnapshot {
        saved_at_unix_ms: s.saved_at_unix_ms,
        entries,
    })
}

/// A snapshot with its names checked.
struct CheckedSnapshot {
    saved_at_unix_ms: u64,
    entries: Vec<(Fqdn, SnapshotEntry)>,
}

/// temp file + fsync + rename + fsync of the directory: after a crash the
/// file is either the old or the new one, never a mix.
fn write_atomically(dir: &Path, name: &str, bytes: &[u8]) -> Result<(), CacheError> {
    let io_err = |what, path: &Path| {
        let path = path.to_owned();
        move |source| CacheError::Io { what, path, source }
    };
    fs::create_dir_all(dir).map_err(io_err("creating", dir))?;
    let tmp = dir.join(format!("{name}.tmp"));
    let target = dir.join(name);
    {
        let mut f = fs::File::create(&tmp).map_err(io_err("creating", &tmp))?;
        f.write_all(bytes).map_err(io_err("writing", &tmp))?;
        f.sync_all().map_err(io_err("syncing", &tmp))?;
    }
    fs::rename(&tmp, &target).map_err(io_err("renaming into place", &target))?;
    fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err("syncing directory", dir))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(secs: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(1_700_000_000 + secs)
    }

    fn n(s: &str) -> Fqdn {
        Fqdn::parse(s).unwrap()
    }

    fn ip(last: u8) -> IpAddr {
        IpAddr::from([198, 18, 100, last])
    }

    fn learned(names: &[&str], ips: &[(u8, u32)]) -> Learned {
        Learned {
            client: IpAddr::from([198, 19, 1, 2]),
            qname: n(names[0]),
            names: names.iter().map(|s| n(s)).collect(),
            ips: ips.iter().map(|&(i, ttl)| (ip(i), ttl)).collect(),
        }
    }

    fn ips_of(c: &FqdnCache, name: &str, now: SystemTime) -> Vec<IpAddr> {
        let mut v: Vec<IpAddr> = c
            .lookup(&n(name), now)
            .into_iter()
            .map(|(ip, _)| ip)
            .collect();
        v.sort();
        v
    }

    #[test]
    fn ttl_is_honoured_and_attributed_to_every_name() {
        let mut c = FqdnCache::new(CacheConfig::default());
        let u = c.insert(
            &learned(&["www.test", "edge.test"], &[(1, 30), (2, 60)]),
            t(0),
        );
        assert_eq!(u.upserted.len(), 4);
        assert!(u.evicted.is_empty());
        assert_eq!(c.len(), 4);
        assert_eq!(ips_of(&c, "www.test", t(29)), vec![ip(1), ip(2)]);
        assert_eq!(ips_of(&c, "edge.test", t(29)), vec![ip(1), ip(2)]);
        assert_eq!(ips_of(&c, "www.test", t(30)), vec![ip(2)]);
        assert_eq!(c.next_expiry(), Some(t(30)));
        assert!(c.expire(t(29)).is_empty());
        let mut gone = c.expire(t(30));
        gone.sort();
        assert_eq!(gone, vec![(n("edge.test"), ip(1)), (n("www.test"), ip(1))]);
        assert_eq!(c.len(), 2);
        assert_eq!(c.expire(t(61)).len(), 2);
        assert!(c.is_empty());
        assert_eq!(c.next_expiry(), None);
        assert!(c.lookup(&n("www.test"), t(0)).is_empty());
    }

    #[test]
    fn expiry_never_shortens_and_confirmations_are_not_reported() {
        let mut c = FqdnCache::new(CacheConfig::default());
        c.insert(&learned(&["a.test"], &[(1, 100)]), t(0));
        let u = c.insert(&learned(&["a.test"], &[(1, 10)]), t(5));
        assert!(u.is_empty(), "{u:?}");
        assert_eq!(c.lookup(&n("a.test"), t(99)), vec![(ip(1), t(100))]);
        let u = c.insert(&learned(&["a.test"], &[(1, 200)]), t(5));
        assert_eq!(
            u.upserted,
            vec![CacheEntry {
                name: n("a.test"),
                ip: ip(1),
                expires: t(205)
            }]
        );
        assert_eq!(c.len(), 1);
    }

    #[test]
    fn refresh_slack_is_headroom_and_spares_reprogramming() {
        let mut c = FqdnCache::new(CacheConfig {
            refresh_slack: Duration::from_secs(2),
            ..CacheConfig::default()
        });
        let ms = |ms: u64| UNIX_EPOCH + Duration::from_millis(ms);
        let u = c.insert(&learned(&["a.test"], &[(1, 100)]), ms(0));
        assert_eq!(u.upserted[0].expires, ms(102_000), "TTL plus the slack");
        // The same answer again and again within the slack: nothing to
        // program, the expiry stays where the kernel has it.
        for at in [1, 500, 1_999, 2_000] {
            let u = c.insert(&learned(&["a.test"], &[(1, 100)]), ms(at));
            assert!(u.is_empty(), "at {at} ms: {u:?}");
            assert_eq!(c.lookup(&n("a.test"), ms(at)), vec![(ip(1), ms(102_000))]);
        }
        // Past it: programmed again, with new headroom; never earlier than
        // the latest answer's TTL.
        let u = c.insert(&learned(&["a.test"], &[(1, 100)]), ms(2_001));
        assert_eq!(u.upserted.len(), 1);
        assert_eq!(u.upserted[0].expires, ms(104_001));
        // A longer TTL moves it at once.
        let u = c.insert(&learned(&["a.test"], &[(1, 300)]), ms(2_002));
        assert_eq!(u.upserted[0].expires, ms(304_002));
        // Without a slack every later expiry is reported (the old behaviour).
        let mut c = FqdnCache::new(CacheConfig::default());
        c.insert(&learned(&["a.test"], &[(1, 100)]), ms(0));
        assert_eq!(
            c.insert(&learned(&["a.test"], &[(1, 100)]), ms(1))
                .upserted
                .len(),
            1
        );
    }

    #[test]
    fn ttl_floor() {
        let mut c = FqdnCache::new(CacheConfig {
            ttl_floor: Duration::from_secs(60),
            ..CacheConfig::default()
        });
        c.insert(&learned(&["a.test"], &[(1, 0), (2, 600)]), t(0));
        assert_eq!(
            c.lookup(&n("a.test"), t(0)),
            vec![(ip(1), t(60)), (ip(2), t(600))]
        );
        // Without a floor a TTL of 0 expires at once.
        let mut c = FqdnCache::new(CacheConfig::default());
        c.insert(&learned(&["a.test"], &[(1, 0)]), t(0));
        assert_eq!(c.expire(t(0)), vec![(n("a.test"), ip(1))]);
    }

    #[test]
    fn per_name_cap_evicts_least_recently_seen() {
        let mut c = FqdnCache::new(CacheConfig {
            per_name_cap: 3,
            ..CacheConfig::default()
        });
        c.insert(&learned(&["a.test"], &[(1, 60), (2, 60), (3, 60)]), t(0));
        // 1 is seen again: 2 is now the oldest.
        c.insert(&learned(&["a.test"], &[(1, 60)]), t(1));
        let u = c.insert(&learned(&["a.test"], &[(4, 60)]), t(2));
        assert_eq!(u.evicted, vec![(n("a.test"), ip(2))]);
        assert_eq!(u.upserted.len(), 1);
        assert_eq!(ips_of(&c, "a.test", t(3)), vec![ip(1), ip(3), ip(4)]);
        // Other names are not affected by this name's cap.
        c.insert(&learned(&["b.test"], &[(9, 60)]), t(3));
        assert_eq!(c.len(), 4);
    }

    #[test]
    fn global_cap_evicts_the_oldest_entry_of_all() {
        let mut c = FqdnCache::new(CacheConfig {
            global_cap: 3,
            ..CacheConfig::default()
        });
        c.insert(&learned(&["a.test"], &[(1, 60)]), t(0));
        c.insert(&learned(&["b.test"], &[(2, 60)]), t(1));
        c.insert(&learned(&["c.test"], &[(3, 60)]), t(2));
        let u = c.insert(&learned(&["d.test"], &[(4, 60), (5, 60)]), t(3));
        assert_eq!(u.evicted, vec![(n("a.test"), ip(1)), (n("b.test"), ip(2))]);
        assert_eq!(c.len(), 3);
        assert!(c.lookup(&n("a.test"), t(3)).is_empty());
        // An entry inserted and evicted by the same call is only evicted.
        let mut c = FqdnCache::new(CacheConfig {
            global_cap: 1,
            ..CacheConfig::default()
        });
        let u = c.insert(&learned(&["a.test"], &[(1, 60), (2, 60)]), t(0));
        assert_eq!(u.evicted, vec![(n("a.test"), ip(1))]);
        assert_eq!(
            u.upserted.iter().map(|e| e.ip).collect::<Vec<_>>(),
            vec![ip(2)]
        );
    }

    #[test]
    fn snapshot_round_trip_keeps_remaining_ttl_and_order() {
        let dir = tempfile::tempdir().unwrap();
        let mut c = FqdnCache::new(CacheConfig::default());
        c.insert(&learned(&["a.test"], &[(1, 100)]), t(0));
        c.insert(&learned(&["b.test"], &[(2, 10)]), t(0));
        c.insert(&learned(&["a.test"], &[(3, 50)]), t(0));
        c.save(dir.path(), t(5)).unwrap();
        assert!(!dir.path().join(format!("{CACHE_FILE}.tmp")).exists());

        let (r, report) = FqdnCache::load(dir.path(), CacheConfig::default(), t(20)).unwrap();
        assert_eq!(
            report,
            LoadReport {
                restored: 2,
                expired: 1,
                evicted: 0,
                corrupt: None
            }
        );
        assert_eq!(
            r.lookup(&n("a.test"), t(20)),
            vec![(ip(1), t(100)), (ip(3), t(50))]
        );
        assert!(r.lookup(&n("b.test"), t(20)).is_empty());
        // Age order survives: with a cap of 2 per name, 1 (oldest) goes first.
        let mut r = r;
        let mut cfg = *r.config();
        cfg.per_name_cap = 2;
        r.config = cfg;
        let u = r.insert(&learned(&["a.test"], &[(4, 60)]), t(21));
        assert_eq!(u.evicted, vec![(n("a.test"), ip(1))]);
    }

    #[test]
    fn clock_going_back_never_extends_lifetimes() {
        let dir = tempfile::tempdir().unwrap();
        let mut c = FqdnCache::new(CacheConfig::default());
        c.insert(&learned(&["a.test"], &[(1, 100)]), t(1000));
        c.save(dir.path(), t(1000)).unwrap();
        // Restarted with the clock 500 s behind: still 100 s, not 600 s.
        let (r, _) = FqdnCache::load(dir.path(), CacheConfig::default(), t(500)).unwrap();
        assert_eq!(r.lookup(&n("a.test"), t(500)), vec![(ip(1), t(600))]);
    }

    #[test]
    fn missing_file_is_an_empty_cache() {
        let dir = tempfile::tempdir().unwrap();
        let (c, report) =
            FqdnCache::load(&dir.path().join("none"), CacheConfig::default(), t(0)).unwrap();
        assert!(c.is_empty());
        assert_eq!(report, LoadReport::default());
    }

    #[test]
    fn corrupt_files_are_moved_aside_and_reported() {
        for (content, why) in [
            (&b"{\"version\":1,\"saved_at_unix_ms\":0,\"entr"[..], "EOF"),
            (b"{\"version\":9,\"saved_at_unix_ms\":0,\"entries\":[]}", "format version 9"),
            (
                b"{\"version\":1,\"saved_at_unix_ms\":0,\"entries\":[{\"name\":\"a b\",\"ip\":\"198.18.0.1\",\"expires_unix_ms\":1}]}",
                "entries[0].name",
            ),
        ] {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join(CACHE_FILE);
            fs::write(&path, content).unwrap();
            let (c, report) = FqdnCache::load(dir.path(), CacheConfig::default(), t(7)).unwrap();
            assert!(c.is_empty());
            let (aside, error) = report.corrupt.expect("reported");
            assert!(error.contains(why), "{error}");
            assert!(!path.exists());
            assert_eq!(fs::read(&aside).unwrap(), content);
            assert!(aside.file_name().unwrap().to_str().unwrap().starts_with("fqdn-cache.json.corrupt-"));
            // The next save does not touch the moved file.
            c.save(dir.path(), t(8)).unwrap();
            assert_eq!(fs::read(&aside).unwrap(), content);
        }
    }

    #[test]
    fn unreadable_state_dir_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        // A directory where the file should be: reading fails (EISDIR).
        fs::create_dir(dir.path().join(CACHE_FILE)).unwrap();
        let err = FqdnCache::load(dir.path(), CacheConfig::default(), t(0)).unwrap_err();
        assert!(err.to_string().contains("fqdn-cache.json"), "{err}");
    }
}
