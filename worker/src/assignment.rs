//! Which partitions this worker subscribes, and when it hands one back (DESIGN §2).
//!
//! Single active consumer gives failover but not balance: the first subscriber of a queue
//! becomes its active consumer. So each worker subscribes its *home* partitions
//! (`p % WORKER_COUNT == WORKER_INDEX`) at once and every other partition as standby after
//! `SESSIONS_WORKER_STANDBY_DELAY_MS`; when a worker dies, the broker makes a standby active.
//! A worker that has been active on another worker's home partition for
//! `SESSIONS_WORKER_HAND_BACK_AFTER_MS` while that worker is present hands it back by closing
//! the channel between batches, and re-subscribes it as standby after the standby delay.
//!
//! This module only keeps the bookkeeping and decides; it does no IO (the consumer loop asks the
//! broker and acts). Correctness never depends on it: any worker may apply any partition.

use std::collections::{BTreeSet, HashMap};
use std::time::{Duration, Instant};

use shared::config::Settings;
use shared::domain::partition::home_worker_of;

/// The partition roles of one consumer connection (rebuilt with every connection).
#[derive(Debug)]
pub struct PartitionAssignment {
    worker_index: u16,
    worker_count: u16,
    partitions: u16,
    standby_delay: Duration,
    hand_back_after: Duration,
    connected_at: Instant,
    subscribed: BTreeSet<u16>,
    /// Partitions that delivered a message since they were subscribed. Under single active
    /// consumer a consumer stays active until its channel closes, so these are partitions this
    /// worker is active on (an idle partition shows nowhere).
    active_since: HashMap<u16, Instant>,
    handed_back_at: HashMap<u16, Instant>,
}

impl PartitionAssignment {
    pub fn new(settings: &Settings, connected_at: Instant) -> Self {
        Self {
            worker_index: settings.worker_index,
            worker_count: settings.worker_count,
            partitions: settings.partitions,
            standby_delay: settings.worker_standby_delay,
            hand_back_after: settings.worker_hand_back_after,
            connected_at,
            subscribed: BTreeSet::new(),
            active_since: HashMap::new(),
            handed_back_at: HashMap::new(),
        }
    }

    pub fn worker_index(&self) -> u16 {
        self.worker_index
    }

    /// Whether other workers share the partitions (presence and hand-backs matter).
    pub fn is_shared(&self) -> bool {
        self.worker_count > 1
    }

    pub fn is_home(&self, partition: u16) -> bool {
        home_worker_of(partition, self.worker_count) == self.worker_index
    }

    /// The worker whose home `partition` is.
    pub fn home_of(&self, partition: u16) -> u16 {
        home_worker_of(partition, self.worker_count)
    }

    /// Partitions to subscribe right after connecting.
    pub fn home_partitions(&self) -> Vec<u16> {
        (0..self.partitions)
            .filter(|&partition| self.is_home(partition))
            .collect()
    }

    /// Standby partitions whose subscription is due at `now`: none before the standby delay
    /// has passed since connecting, nor within the standby delay of handing one back.
    pub fn due_standby_subscriptions(&self, now: Instant) -> Vec<u16> {
        if now < self.connected_at + self.standby_delay {
            return Vec::new();
        }
        (0..self.partitions)
            .filter(|partition| !self.subscribed.contains(partition))
            .filter(|partition| {
                self.handed_back_at
                    .get(partition)
                    .is_none_or(|&at| now >= at + self.standby_delay)
            })
            .collect()
    }

    pub fn subscribed(&mut self, partition: u16) {
        self.subscribed.insert(partition);
    }

    /// A current delivery of `partition` arrived: this worker is its active consumer.
    pub fn delivered(&mut self, partition: u16, now: Instant) {
        self.active_since.entry(partition).or_insert(now);
    }

    /// Other workers' home partitions this worker has been active on for the hand-back time.
    /// Hand one back only while its home worker is present.
    pub fn hand_back_candidates(&self, now: Instant) -> Vec<u16> {
        let mut candidates: Vec<u16> = self
            .active_since
            .iter()
            .filter(|(partition, since)| {
                !self.is_home(**partition) && now >= **since + self.hand_back_after
            })
            .map(|(partition, _)| *partition)
            .collect();
        candidates.sort_unstable();
        candidates
    }

    pub fn handed_back(&mut self, partition: u16, now: Instant) {
        self.subscribed.remove(&partition);
        self.active_since.remove(&partition);
        self.handed_back_at.insert(partition, now);
    }

    /// Sets the partition gauges of this worker.
    pub fn record_gauges(&self) {
        let home_subscribed = self
            .subscribed
            .iter()
            .filter(|&&partition| self.is_home(partition))
            .count();
        let home_active = self
            .active_since
            .keys()
            .filter(|&&partition| self.is_home(partition))
            .count();
        metrics::gauge!("sessions_worker_partitions_total").set(f64::from(self.partitions));
        metrics::gauge!("sessions_worker_partitions_subscribed", "role" => "home")
            .set(home_subscribed as f64);
        metrics::gauge!("sessions_worker_partitions_subscribed", "role" => "standby")
            .set((self.subscribed.len() - home_subscribed) as f64);
        metrics::gauge!("sessions_worker_partitions_active", "role" => "home")
            .set(home_active as f64);
        metrics::gauge!("sessions_worker_partitions_active", "role" => "foreign")
            .set((self.active_since.len() - home_active) as f64);
    }

    /// Clears the gauges when the connection is gone.
    pub fn clear_gauges() {
        for role in ["home", "standby"] {
            metrics::gauge!("sessions_worker_partitions_subscribed", "role" => role).set(0.0);
        }
        for role in ["home", "foreign"] {
            metrics::gauge!("sessions_worker_partitions_active", "role" => role).set(0.0);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn assignment(index: &str, count: &str, now: Instant) -> PartitionAssignment {
        let settings = Settings::from_lookup(|name| match name {
            "WORKER_INDEX" => Some(index.to_owned()),
            "WORKER_COUNT" => Some(count.to_owned()),
            "SESSIONS_PARTITIONS" => Some("6".to_owned()),
            "SESSIONS_WORKER_STANDBY_DELAY_MS" => Some("1000".to_owned()),
            "SESSIONS_WORKER_HAND_BACK_AFTER_MS" => Some("3000".to_owned()),
            _ => None,
        })
        .expect("settings");
        PartitionAssignment::new(&settings, now)
    }

    #[test]
    fn home_first_standby_after_the_delay() {
        let start = Instant::now();
        let mut roles = assignment("1", "3", start);
        assert_eq!(roles.home_partitions(), vec![1, 4]);
        for partition in roles.home_partitions() {
            roles.subscribed(partition);
        }
        assert!(roles.due_standby_subscriptions(start).is_empty());
        assert_eq!(
            roles.due_standby_subscriptions(start + Duration::from_millis(1000)),
            vec![0, 2, 3, 5]
        );
    }

    #[test]
    fn only_foreign_partitions_active_long_enough_are_handed_back_then_resubscribed_later() {
        let start = Instant::now();
        let mut roles = assignment("0", "2", start);
        for partition in 0..6 {
            roles.subscribed(partition);
        }
        roles.delivered(0, start); // home
        roles.delivered(1, start); // foreign
        roles.delivered(3, start + Duration::from_secs(2)); // foreign, later
        assert!(roles.hand_back_candidates(start).is_empty());
        assert_eq!(
            roles.hand_back_candidates(start + Duration::from_secs(3)),
            vec![1]
        );
        assert_eq!(
            roles.hand_back_candidates(start + Duration::from_secs(5)),
            vec![1, 3]
        );
        let handed_at = start + Duration::from_secs(5);
        roles.handed_back(1, handed_at);
        assert_eq!(roles.hand_back_candidates(handed_at), vec![3]);
        assert!(roles.due_standby_subscriptions(handed_at).is_empty());
        assert_eq!(
            roles.due_standby_subscriptions(handed_at + Duration::from_secs(1)),
            vec![1]
        );
        // Activity is counted again only after a new delivery.
        roles.subscribed(1);
        assert!(
            !roles
                .hand_back_candidates(handed_at + Duration::from_secs(9))
                .contains(&1)
        );
    }

    #[test]
    fn a_single_worker_owns_everything_and_never_hands_back() {
        let start = Instant::now();
        let mut roles = assignment("0", "1", start);
        assert_eq!(roles.home_partitions(), (0..6).collect::<Vec<_>>());
        assert!(!roles.is_shared());
        for partition in 0..6 {
            roles.subscribed(partition);
            roles.delivered(partition, start);
        }
        assert!(
            roles
                .hand_back_candidates(start + Duration::from_secs(60))
                .is_empty()
        );
        assert!(
            roles
                .due_standby_subscriptions(start + Duration::from_secs(60))
                .is_empty()
        );
    }
}
