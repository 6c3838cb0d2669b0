//! The broker addresses of a deployment: one AMQP URL, or several (the nodes of a RabbitMQ
//! cluster), and which one to try next.
//!
//! `AMQP_URL` may list several URLs separated by commas. Every process starts at a random node
//! (so that the api instances and workers of a deployment spread their connections over the
//! cluster) and moves on to the next URL at every reconnect: a node that went away is not
//! retried first, and one that refuses connections is skipped within the same attempt. A single
//! URL behaves exactly as before.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

/// The URLs of the broker nodes and a shared cursor: clones (the api's link, a worker's
/// consumer connection, its publishing link) move through the list independently of each other
/// but each keeps its own position across reconnects.
#[derive(Clone)]
pub struct BrokerAddresses {
    urls: Arc<[String]>,
    next: Arc<AtomicUsize>,
}

impl std::fmt::Debug for BrokerAddresses {
    // Never print the URLs: they may carry passwords.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BrokerAddresses")
            .field(
                "nodes",
                &self
                    .urls
                    .iter()
                    .map(|url| redacted(url))
                    .collect::<Vec<_>>(),
            )
            .finish()
    }
}

impl BrokerAddresses {
    /// Parses a comma-separated list of `amqp://` / `amqps://` URLs (spaces around commas are
    /// ignored). The error says what is wrong without repeating the URL (it may hold a
    /// password).
    pub fn parse(list: &str) -> Result<Self, String> {
        let urls: Vec<String> = list.split(',').map(str::trim).map(str::to_owned).collect();
        for (position, url) in urls.iter().enumerate() {
            if url.is_empty() {
                return Err(format!("element {} of the list is empty", position + 1));
            }
            if !(url.starts_with("amqp://") || url.starts_with("amqps://")) {
                return Err(format!(
                    "element {} of the list must start with \"amqp://\" or \"amqps://\"",
                    position + 1
                ));
            }
        }
        let start = if urls.len() > 1 {
            rand::random_range(0..urls.len())
        } else {
            0
        };
        Ok(Self {
            urls: urls.into(),
            next: Arc::new(AtomicUsize::new(start)),
        })
    }

    /// `text` as the only node, without validation (connecting to it reports what is wrong).
    pub fn unchecked(text: &str) -> Self {
        Self {
            urls: vec![text.trim().to_owned()].into(),
            next: Arc::new(AtomicUsize::new(0)),
        }
    }

    /// How many nodes are listed.
    pub fn len(&self) -> usize {
        self.urls.len()
    }

    /// Always false: the list holds at least one URL.
    pub fn is_empty(&self) -> bool {
        self.urls.is_empty()
    }

    /// The URLs to try for one connection attempt, in order: starting at the cursor, each node
    /// once. The cursor moves one step, so the next attempt starts at the following node.
    pub fn rotation(&self) -> Vec<(usize, &str)> {
        let count = self.urls.len();
        let start = self.next.fetch_add(1, Ordering::Relaxed) % count;
        (0..count)
            .map(|offset| {
                let index = (start + offset) % count;
                (index, self.urls[index].as_str())
            })
            .collect()
    }

    /// Makes the next attempt start after node `index` (the one just connected to), so that a
    /// reconnect after losing it tries another node first.
    pub fn connected_to(&self, index: usize) {
        self.next.store(index + 1, Ordering::Relaxed);
    }

    /// `host:port` of node `index`, for logs (no user name or password).
    pub fn describe(&self, index: usize) -> String {
        self.urls
            .get(index)
            .map(|url| redacted(url))
            .unwrap_or_default()
    }
}

/// `host:port` of an AMQP URL, without credentials, path or query.
fn redacted(url: &str) -> String {
    let rest = url.split_once("://").map_or(url, |(_, rest)| rest);
    let authority = rest.split(['/', '?']).next().unwrap_or("");
    let host = authority
        .rsplit_once('@')
        .map_or(authority, |(_, host)| host);
    host.to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_single_url_is_always_first() {
        let addresses =
            BrokerAddresses::parse("amqp://guest:guest@127.0.0.1:5672/%2f").expect("valid");
        assert_eq!(addresses.len(), 1);
        for _ in 0..3 {
            let rotation = addresses.rotation();
            assert_eq!(rotation, vec![(0, "amqp://guest:guest@127.0.0.1:5672/%2f")]);
        }
    }

    #[test]
    fn a_list_rotates_and_tries_every_node_once() {
        let addresses = BrokerAddresses::parse("amqp://a:1/%2f, amqp://b:2/%2f ,amqps://c:3/%2f")
            .expect("valid");
        assert_eq!(addresses.len(), 3);
        let first = addresses.rotation();
        let mut indexes: Vec<usize> = first.iter().map(|(index, _)| *index).collect();
        let start = indexes[0];
        assert_eq!(indexes, vec![start, (start + 1) % 3, (start + 2) % 3]);
        indexes.sort_unstable();
        assert_eq!(indexes, vec![0, 1, 2]);
        // The next attempt starts one node further.
        assert_eq!(addresses.rotation()[0].0, (start + 1) % 3);
        // After connecting to node 2, a reconnect tries node 0 first.
        addresses.connected_to(2);
        assert_eq!(addresses.rotation()[0], (0, "amqp://a:1/%2f"));
    }

    #[test]
    fn the_start_node_is_random() {
        let starts: std::collections::HashSet<usize> = (0..200)
            .map(|_| {
                BrokerAddresses::parse("amqp://a/,amqp://b/,amqp://c/")
                    .expect("valid")
                    .rotation()[0]
                    .0
            })
            .collect();
        assert_eq!(starts.len(), 3, "every node is sometimes first");
    }

    #[test]
    fn bad_lists_are_refused_without_echoing_passwords() {
        let error = BrokerAddresses::parse("amqp://a/,").expect_err("empty element");
        assert!(error.contains("element 2"), "{error}");
        let error =
            BrokerAddresses::parse("amqp://u:secret@a/,http://u:secret@b/").expect_err("scheme");
        assert!(error.contains("element 2"), "{error}");
        assert!(!error.contains("secret"), "{error}");
    }

    #[test]
    fn descriptions_carry_no_credentials() {
        let addresses =
            BrokerAddresses::parse("amqp://guest:secret@127.0.0.1:5701/%2f?heartbeat=5")
                .expect("valid");
        assert_eq!(addresses.describe(0), "127.0.0.1:5701");
        assert!(!format!("{addresses:?}").contains("secret"));
    }
}
