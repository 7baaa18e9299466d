//! Which snapshots a prune deletes: restic's `forget` rules (last N, one
//! per hour/day/ISO week/month/year for the newest N of each, all within a
//! duration of the newest), limited to one name prefix and never touching a
//! held snapshot or one being captured. Calendar buckets are taken in a
//! time zone (the caller's local one), so "daily" means the admin's days.
//!
//! A pure function of the snapshot list: the store gives the candidates, the
//! view deletes what the plan says.

use std::collections::BTreeMap;

use jiff::Timestamp;
use jiff::tz::TimeZone;
use serde::{Deserialize, Serialize};

/// The keep rules. A snapshot is kept if any rule keeps it.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
pub struct PrunePolicy {
    pub keep_last: u32,
    pub keep_hourly: u32,
    pub keep_daily: u32,
    pub keep_weekly: u32,
    pub keep_monthly: u32,
    #[serde(default)]
    pub keep_yearly: u32,
    /// Keep every snapshot created within this many seconds of the newest.
    #[serde(default)]
    pub keep_within_secs: u64,
    /// Only snapshots whose name starts with this are considered.
    #[serde(default)]
    pub prefix: Option<String>,
    /// IANA name of the time zone of the calendar buckets (the system's
    /// when absent or unknown).
    #[serde(default)]
    pub time_zone: Option<String>,
}

impl PrunePolicy {
    /// Whether any rule keeps anything (a prune without one would delete
    /// every snapshot it considers, and is refused).
    pub fn has_rule(&self) -> bool {
        self.keep_last
            + self.keep_hourly
            + self.keep_daily
            + self.keep_weekly
            + self.keep_monthly
            + self.keep_yearly
            > 0
            || self.keep_within_secs > 0
    }

    pub fn zone(&self) -> TimeZone {
        self.time_zone
            .as_deref()
            .and_then(|n| TimeZone::get(n).ok())
            .unwrap_or_else(TimeZone::system)
    }
}

/// A snapshot as the planner sees it.
#[derive(Clone, Debug)]
pub struct Candidate {
    pub id: u64,
    pub name: String,
    /// Seconds since the epoch.
    pub created: i64,
    pub complete: bool,
    pub pending: bool,
    pub held: bool,
}

/// The verdict on one snapshot (those outside the prefix get none).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Decision {
    pub id: u64,
    pub name: String,
    pub created: i64,
    pub keep: bool,
    /// Why it is kept (`last`, `hourly`, `daily`, `weekly`, `monthly`,
    /// `yearly`, `within`, `held`, `capturing`) or removed (`failed`,
    /// `no rule keeps it`).
    pub reasons: Vec<String>,
}

type Key = (i64, i64, i64);

fn bucket(t: i64, tz: &TimeZone, rule: &str) -> Option<Key> {
    let z = Timestamp::from_second(t)
        .ok()?
        .to_zoned_datetime(tz.clone());
    let (y, m, d, h) = (
        z.year() as i64,
        z.month() as i64,
        z.day() as i64,
        z.hour() as i64,
    );
    Some(match rule {
        "hourly" => (y * 10_000 + m * 100 + d, h, 0),
        "daily" => (y, m, d),
        "weekly" => {
            let w = z.iso_week_date();
            (w.year() as i64, w.week() as i64, 0)
        }
        "monthly" => (y, m, 0),
        _ => (y, 0, 0),
    })
}

/// Decides for every candidate whose name has the policy's prefix, newest
/// first.
pub fn plan(cands: &[Candidate], policy: &PrunePolicy) -> Vec<Decision> {
    let tz = policy.zone();
    let mut mine: Vec<&Candidate> = cands
        .iter()
        .filter(|c| {
            policy
                .prefix
                .as_deref()
                .is_none_or(|p| c.name.starts_with(p))
        })
        .collect();
    mine.sort_by_key(|c| std::cmp::Reverse((c.created, c.id)));
    let mut reasons: BTreeMap<u64, Vec<String>> = BTreeMap::new();
    // The rules count complete snapshots that are not held; held ones stay
    // whatever the rules say.
    let ruled: Vec<&&Candidate> = mine.iter().filter(|c| c.complete && !c.held).collect();
    for c in ruled.iter().take(policy.keep_last as usize) {
        reasons.entry(c.id).or_default().push("last".into());
    }
    for (n, rule) in [
        (policy.keep_hourly, "hourly"),
        (policy.keep_daily, "daily"),
        (policy.keep_weekly, "weekly"),
        (policy.keep_monthly, "monthly"),
        (policy.keep_yearly, "yearly"),
    ] {
        let mut last = None;
        let mut kept = 0;
        for c in &ruled {
            if kept >= n {
                break;
            }
            let k = bucket(c.created, &tz, rule);
            if k.is_some() && last != k {
                reasons.entry(c.id).or_default().push(rule.into());
                kept += 1;
                last = k;
            }
        }
    }
    if policy.keep_within_secs > 0
        && let Some(newest) = ruled.first().map(|c| c.created)
    {
        let since = newest.saturating_sub(policy.keep_within_secs as i64);
        for c in ruled.iter().filter(|c| c.created >= since) {
            reasons.entry(c.id).or_default().push("within".into());
        }
    }
    mine.iter()
        .map(|c| {
            let (keep, why) = if c.held {
                (true, vec!["held".to_string()])
            } else if c.pending {
                (true, vec!["capturing".to_string()])
            } else if !c.complete {
                (false, vec!["failed".to_string()])
            } else {
                match reasons.remove(&c.id) {
                    Some(r) => (true, r),
                    None => (false, vec!["no rule keeps it".to_string()]),
                }
            };
            Decision {
                id: c.id,
                name: c.name.clone(),
                created: c.created,
                keep,
                reasons: why,
            }
        })
        .collect()
}

/// The name of an automatic snapshot taken at `t` in `tz`:
/// `PREFIX` + `YYYY-MM-DD_HHMMSS` (sorts by time, no characters a shell or
/// another filesystem minds).
pub fn auto_name(prefix: &str, t: i64, tz: &TimeZone) -> String {
    match Timestamp::from_second(t) {
        Ok(ts) => format!(
            "{prefix}{}",
            ts.to_zoned_datetime(tz.clone()).strftime("%Y-%m-%d_%H%M%S")
        ),
        Err(_) => format!("{prefix}{t}"),
    }
}

/// Parses a duration like `36h`, `2d`, `1w`, `90m`, `1y2m` (restic's
/// `--keep-within` units: y, m (months, 30 days), w, d, h; and `s`).
pub fn parse_within(s: &str) -> Result<u64, String> {
    let err = || format!("{s}: expected a duration such as 36h, 7d, 2w, 6m or 1y");
    let mut total: u64 = 0;
    let mut num = String::new();
    for ch in s.chars() {
        if ch.is_ascii_digit() {
            num.push(ch);
            continue;
        }
        let n: u64 = num.parse().map_err(|_| err())?;
        num.clear();
        let unit = match ch {
            's' => 1,
            'h' => 3600,
            'd' => 86_400,
            'w' => 7 * 86_400,
            'm' => 30 * 86_400,
            'y' => 365 * 86_400,
            _ => return Err(err()),
        };
        total = n
            .checked_mul(unit)
            .and_then(|v| total.checked_add(v))
            .ok_or_else(err)?;
    }
    if !num.is_empty() || total == 0 {
        return Err(err());
    }
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(id: u64, name: &str, created: i64) -> Candidate {
        Candidate {
            id,
            name: name.into(),
            created,
            complete: true,
            pending: false,
            held: false,
        }
    }

    fn kept(d: &[Decision]) -> Vec<&str> {
        d.iter()
            .filter(|d| d.keep)
            .map(|d| d.name.as_str())
            .collect()
    }

    const H: i64 = 3600;
    // 2026-12-01 00:30 UTC.
    const T0: i64 = 1_796_085_000;

    #[test]
    fn prefix_limits_and_holds_protect() {
        let mut v = vec![
            c(1, "auto-1", T0),
            c(2, "before-upgrade", T0 + H),
            c(3, "auto-2", T0 + 2 * H),
            c(4, "auto-3", T0 + 3 * H),
        ];
        v[0].held = true;
        let p = PrunePolicy {
            keep_last: 1,
            prefix: Some("auto-".into()),
            ..Default::default()
        };
        let d = plan(&v, &p);
        // The manual snapshot is not even considered.
        assert!(d.iter().all(|d| d.name != "before-upgrade"));
        assert_eq!(kept(&d), vec!["auto-3", "auto-1"]);
        let gone: Vec<&str> = d.iter().filter(|d| !d.keep).map(|d| &*d.name).collect();
        assert_eq!(gone, vec!["auto-2"]);
        assert_eq!(
            d.iter().find(|d| d.name == "auto-1").unwrap().reasons,
            ["held"]
        );
        // Without a prefix every one is considered.
        let p = PrunePolicy {
            keep_last: 1,
            ..Default::default()
        };
        assert_eq!(kept(&plan(&v, &p)), vec!["auto-3", "auto-1"]);
    }

    /// Days are the time zone's: 23:30 and 00:30 UTC are the same day at
    /// UTC-2, different days in UTC.
    #[test]
    fn daily_buckets_follow_the_time_zone() {
        let v = vec![c(1, "a", T0 - H), c(2, "b", T0)];
        let utc = PrunePolicy {
            keep_daily: 5,
            time_zone: Some("UTC".into()),
            ..Default::default()
        };
        assert_eq!(kept(&plan(&v, &utc)).len(), 2);
        let west = PrunePolicy {
            time_zone: Some("America/Noronha".into()),
            ..utc.clone()
        };
        assert_eq!(kept(&plan(&v, &west)), vec!["b"]);
    }

    #[test]
    fn within_yearly_failed_and_capturing() {
        let day = 86_400;
        let mut v = vec![
            c(1, "y1", T0 - 400 * day),
            c(2, "y2", T0 - 100 * day),
            c(3, "recent", T0 - day),
            c(4, "now", T0),
            c(5, "failed", T0 - 2 * day),
            c(6, "capturing", T0 + 10),
        ];
        v[4].complete = false;
        v[5].complete = false;
        v[5].pending = true;
        let p = PrunePolicy {
            keep_within_secs: 2 * day as u64,
            keep_yearly: 2,
            time_zone: Some("UTC".into()),
            ..Default::default()
        };
        let d = plan(&v, &p);
        assert_eq!(kept(&d), vec!["capturing", "now", "recent", "y1"]);
        let f = d.iter().find(|d| d.name == "failed").unwrap();
        assert!(!f.keep && f.reasons == ["failed"]);
        assert!(p.has_rule());
        assert!(!PrunePolicy::default().has_rule());
    }

    #[test]
    fn auto_names_and_durations() {
        let tz = TimeZone::get("UTC").unwrap();
        assert_eq!(auto_name("auto-", T0, &tz), "auto-2026-12-01_003000");
        let paris = TimeZone::get("Europe/Paris").unwrap();
        assert_eq!(auto_name("", T0, &paris), "2026-12-01_013000");
        assert_eq!(parse_within("36h"), Ok(36 * 3600));
        assert_eq!(parse_within("1y2m"), Ok(425 * 86_400));
        assert_eq!(parse_within("2w"), Ok(14 * 86_400));
        for bad in ["", "3", "h", "5x", "99999999999999999999y"] {
            assert!(parse_within(bad).is_err(), "{bad}");
        }
    }
}
