//! Which partition logs this worker reads: home partitions, takeover of a silent worker's
//! partitions, hand-back when their home worker returns.
//!
//! Each partition has a lease in the database (`Store::claim_partition_leases`), renewed every
//! third of `SESSIONS_PARTITION_LEASE_MS`. A worker always claims its *home* partitions
//! (`p % WORKER_COUNT == WORKER_INDEX`), and takes them from a worker for which they are not
//! home (that is the hand-back: the other worker's next renewal fails and it stops reading).
//! Once `SESSIONS_WORKER_STANDBY_DELAY_MS` has passed since it started, it also claims every
//! other partition, which the database grants only when the lease is free or expired: a worker
//! that went silent loses its partitions within one lease period.
//!
//! This module keeps the bookkeeping and decides; it does no IO (the consumer loop asks the
//! database and starts or stops readers). Correctness never depends on it: two workers reading
//! one partition at once only waste work, since the offsets fence lets one batch of theirs
//! commit and makes the other re-read.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use shared::config::Settings;
use shared::domain::partition::home_worker_of;

/// The partitions one worker holds (rebuilt with every reader connection).
#[derive(Debug)]
pub struct Ownership {
    worker_index: u16,
    worker_count: u16,
    partitions: u16,
    standby_delay: Duration,
    lease: Duration,
    started_at: Instant,
    held: BTreeSet<u16>,
    /// Partitions stopped at a gap in their log (held, not read).
    stalled: BTreeSet<u16>,
}

/// What changed after the database answered a claim.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct OwnershipChange {
    pub gained: Vec<u16>,
    pub lost: Vec<u16>,
}

impl Ownership {
    pub fn new(settings: &Settings, started_at: Instant) -> Self {
        Self {
            worker_index: settings.worker_index,
            worker_count: settings.worker_count,
            partitions: settings.partitions,
            standby_delay: settings.worker_standby_delay,
            lease: settings.partition_lease,
            started_at,
            held: BTreeSet::new(),
            stalled: BTreeSet::new(),
        }
    }

    pub fn worker_index(&self) -> u16 {
        self.worker_index
    }

    pub fn is_home(&self, partition: u16) -> bool {
        home_worker_of(partition, self.worker_count) == self.worker_index
    }

    /// How often leases are renewed.
    pub fn renew_every(&self) -> Duration {
        self.lease / 3
    }

    /// How long a claim lasts.
    pub fn lease(&self) -> Duration {
        self.lease
    }

    /// The partitions to claim or renew at `now`, each with whether it is home: home ones
    /// always, the others once the standby delay has passed since the worker started (the
    /// database grants those only if free or expired, or already held).
    pub fn wanted(&self, now: Instant) -> Vec<(u16, bool)> {
        let standby = now >= self.started_at + self.standby_delay;
        (0..self.partitions)
            .filter(|&partition| {
                standby || self.is_home(partition) || self.held.contains(&partition)
            })
            .map(|partition| (partition, self.is_home(partition)))
            .collect()
    }

    /// Records the partitions the database says this worker holds now.
    pub fn granted(&mut self, held: BTreeSet<u16>) -> OwnershipChange {
        let change = OwnershipChange {
            gained: held.difference(&self.held).copied().collect(),
            lost: self.held.difference(&held).copied().collect(),
        };
        for partition in &change.lost {
            self.stalled.remove(partition);
        }
        self.held = held;
        change
    }

    /// Whether this worker holds `partition`.
    pub fn holds(&self, partition: u16) -> bool {
        self.held.contains(&partition)
    }

    /// Marks `partition` as stopped at a gap in its log.
    pub fn stall(&mut self, partition: u16) {
        if self.held.contains(&partition) {
            self.stalled.insert(partition);
        }
    }

    pub fn unstall(&mut self, partition: u16) {
        self.stalled.remove(&partition);
    }

    pub fn stalled(&self) -> impl Iterator<Item = u16> + '_ {
        self.stalled.iter().copied()
    }

    /// Publishes the partition gauges of this worker.
    pub fn record_gauges(&self) {
        let reading = |home: bool| {
            self.held
                .iter()
                .filter(|&&partition| {
                    self.is_home(partition) == home && !self.stalled.contains(&partition)
                })
                .count() as f64
        };
        metrics::gauge!("sessions_worker_partitions_total").set(f64::from(self.partitions));
        metrics::gauge!("sessions_worker_partitions_active", "role" => "home").set(reading(true));
        metrics::gauge!("sessions_worker_partitions_active", "role" => "foreign")
            .set(reading(false));
        metrics::gauge!("sessions_worker_partitions_stalled").set(self.stalled.len() as f64);
    }

    /// Zeroes the gauges while no reader connection exists.
    pub fn clear_gauges() {
        for role in ["home", "foreign"] {
            metrics::gauge!("sessions_worker_partitions_active", "role" => role).set(0.0);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ownership(index: &str, count: &str, now: Instant) -> Ownership {
        let settings = Settings::from_lookup(|name| match name {
            "WORKER_INDEX" => Some(index.into()),
            "WORKER_COUNT" => Some(count.into()),
            "SESSIONS_PARTITIONS" => Some("6".into()),
            "SESSIONS_WORKER_STANDBY_DELAY_MS" => Some("1000".into()),
            "SESSIONS_PARTITION_LEASE_MS" => Some("3000".into()),
            _ => None,
        })
        .expect("settings");
        Ownership::new(&settings, now)
    }

    #[test]
    fn home_partitions_first_every_partition_after_the_standby_delay() {
        let start = Instant::now();
        let ownership = ownership("1", "3", start);
        assert_eq!(ownership.wanted(start), vec![(1, true), (4, true)]);
        let later = ownership.wanted(start + Duration::from_millis(1000));
        assert_eq!(later.len(), 6);
        assert!(later.contains(&(0, false)) && later.contains(&(4, true)));
        assert_eq!(ownership.renew_every(), Duration::from_millis(1000));
    }

    #[test]
    fn grants_report_gained_and_lost_partitions_and_held_ones_stay_wanted() {
        let start = Instant::now();
        let mut ownership = ownership("0", "2", start);
        let change = ownership.granted(BTreeSet::from([0, 2, 4, 1]));
        assert_eq!(change.gained, vec![0, 1, 2, 4]);
        assert!(change.lost.is_empty());
        // A foreign partition it holds is renewed even before the standby delay.
        assert!(ownership.wanted(start).contains(&(1, false)));
        ownership.stall(1);
        assert_eq!(ownership.stalled().collect::<Vec<_>>(), vec![1]);
        // The home worker took partition 1 back.
        let change = ownership.granted(BTreeSet::from([0, 2, 4]));
        assert_eq!(change.lost, vec![1]);
        assert!(change.gained.is_empty());
        assert_eq!(ownership.stalled().count(), 0);
        assert!(ownership.holds(2) && !ownership.holds(1));
    }

    #[test]
    fn a_single_worker_is_home_everywhere() {
        let start = Instant::now();
        let ownership = ownership("0", "1", start);
        assert_eq!(ownership.wanted(start).len(), 6);
        assert!(ownership.wanted(start).iter().all(|(_, home)| *home));
    }
}
