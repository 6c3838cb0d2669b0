//! Which partition queue a session's commands go to.
//!
//! The hash is FNV-1a 64 over the session's internal id bytes: fixed forever, independent of the
//! Rust version (never `DefaultHasher`), because the api and every worker must agree on it across
//! deploys.

use uuid::Uuid;

/// FNV-1a 64-bit hash.
pub fn fnv1a_64(bytes: &[u8]) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in bytes {
        hash ^= u64::from(*byte);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    hash
}

/// The partition of a session, in `0..partition_count`.
pub fn partition_of(session_id: Uuid, partition_count: u16) -> u16 {
    let count = u64::from(partition_count.max(1));
    u16::try_from(fnv1a_64(session_id.as_bytes()) % count).unwrap_or(0)
}

/// The worker whose home `partition` is, among `worker_count` workers (home
/// partitions are `p % WORKER_COUNT == WORKER_INDEX`). Assignment is about balance only: any
/// worker may consume any partition, order and deduplication never depend on who does.
pub fn home_worker_of(partition: u16, worker_count: u16) -> u16 {
    partition % worker_count.max(1)
}

/// The apply lane of a worker that applies `partition`'s messages, among its `lanes`. A worker
/// applies one batch per lane at a time, so two of its transactions never hold messages of one
/// partition (and never wait on each other's rows). Home partitions are every `worker_count`-th
/// one, so they are counted in that step before being dealt out: a worker's home partitions
/// spread evenly over its lanes whatever the two counts.
pub fn apply_lane_of(partition: u16, worker_count: u16, lanes: usize) -> usize {
    usize::from(partition / worker_count.max(1)) % lanes.max(1)
}

/// Why a process must not start with the partition logs it would use (`expected`, one per
/// configured partition), given every log the deployment's database has recorded a position for
/// (`recorded`); `None` when they are the same logs, or when none is recorded yet (a new
/// deployment).
///
/// The partition count maps every session to its log, so it is fixed per deployment: starting
/// with another count would send a session's new commands to another log while its older ones
/// may wait unapplied in the old one (reordered, or never read at all).
pub fn partition_count_mismatch(expected: &[String], recorded: &[String]) -> Option<String> {
    // This deployment's partition logs: the names that differ from the first expected one only
    // in the partition number.
    let stem = expected
        .first()?
        .trim_end_matches(|c: char| c.is_ascii_digit());
    let mut in_use: Vec<&String> = recorded
        .iter()
        .filter(|name| {
            name.strip_prefix(stem).is_some_and(|number| {
                !number.is_empty() && number.chars().all(|c| c.is_ascii_digit())
            })
        })
        .collect();
    in_use.sort();
    let expected_sorted: Vec<&String> = {
        let mut sorted: Vec<&String> = expected.iter().collect();
        sorted.sort();
        sorted
    };
    if in_use.is_empty() || in_use == expected_sorted {
        return None;
    }
    Some(format!(
        "SESSIONS_PARTITIONS is {}, but this deployment's database records {} partition \
         logs ({} … {}); the partition count is fixed per deployment because it maps every \
         session to its log. Set SESSIONS_PARTITIONS={} (deployments created before the default \
         became 8 use 64), or change the count as README \"Changing the partition count\" says",
        expected.len(),
        in_use.len(),
        in_use.first().map(|name| name.as_str()).unwrap_or_default(),
        in_use.last().map(|name| name.as_str()).unwrap_or_default(),
        in_use.len(),
    ))
}

#[cfg(test)]
mod tests {
    fn logs(count: u16) -> Vec<String> {
        (0..count)
            .map(|p| format!("sessions.log.p{p:03}"))
            .collect()
    }

    #[test]
    fn a_deployment_starts_only_with_the_partition_count_it_was_created_with() {
        use super::partition_count_mismatch;
        // A new deployment, or the same count: fine. Other deployments' logs do not count.
        assert_eq!(partition_count_mismatch(&logs(8), &[]), None);
        assert_eq!(partition_count_mismatch(&logs(8), &logs(8)), None);
        let mut with_others = logs(8);
        with_others.push("other.log.p009".into());
        with_others.push("sessions.log.pending".into());
        assert_eq!(partition_count_mismatch(&logs(8), &with_others), None);
        // Fewer or more than recorded: refused, naming the variable and the recorded count.
        let fewer = partition_count_mismatch(&logs(8), &logs(64)).expect("refused");
        assert!(fewer.contains("SESSIONS_PARTITIONS=64"), "{fewer}");
        assert!(fewer.contains("sessions.log.p063"), "{fewer}");
        let more = partition_count_mismatch(&logs(16), &logs(8)).expect("refused");
        assert!(more.contains("SESSIONS_PARTITIONS=8"), "{more}");
    }

    use super::*;

    #[test]
    fn a_workers_home_partitions_spread_evenly_over_its_lanes() {
        for (partitions, workers, lanes) in [(8, 1, 2), (8, 2, 2), (8, 3, 2), (64, 4, 3), (8, 1, 1)]
        {
            for worker in 0..workers {
                let mut per_lane = vec![0_usize; lanes];
                for partition in (0..partitions).filter(|&p| home_worker_of(p, workers) == worker) {
                    per_lane[apply_lane_of(partition, workers, lanes)] += 1;
                }
                let (fewest, most) = (per_lane.iter().min(), per_lane.iter().max());
                assert!(
                    most.zip(fewest)
                        .is_some_and(|(most, fewest)| most - fewest <= 1),
                    "{partitions} partitions, worker {worker} of {workers}, {lanes} lanes: {per_lane:?}"
                );
            }
        }
        // No lanes configured still means one.
        assert_eq!(apply_lane_of(5, 2, 0), 0);
    }

    #[test]
    fn fnv1a_matches_reference_vectors() {
        assert_eq!(fnv1a_64(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a_64(b"a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(fnv1a_64(b"foobar"), 0x8594_4171_f739_67e8);
    }

    #[test]
    fn partition_is_stable_and_in_range() {
        let id = Uuid::from_u128(0x0123_4567_89ab_cdef_0123_4567_89ab_cdef);
        let first = partition_of(id, 64);
        assert!(first < 64);
        assert_eq!(first, partition_of(id, 64));
        assert_eq!(partition_of(id, 1), 0);
    }

    #[test]
    fn home_partitions_spread_evenly_and_cover_everything() {
        let mut per_worker = [0u16; 3];
        for partition in 0..64 {
            per_worker[usize::from(home_worker_of(partition, 3))] += 1;
        }
        assert_eq!(per_worker, [22, 21, 21]);
        assert!((0..64).all(|partition| home_worker_of(partition, 1) == 0));
        assert_eq!(
            home_worker_of(5, 0),
            0,
            "a zero count is treated as one worker"
        );
    }
}
