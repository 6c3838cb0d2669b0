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

#[cfg(test)]
mod tests {
    use super::*;

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
