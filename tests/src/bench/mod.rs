//! The benchmark harness (issue "Benchmark harness and throughput"): the sessions load
//! generator, the two references measured in the same run (the minimal pipeline floor and the
//! Durable Streams server), and the report types they share. Figures are reported, never
//! asserted: tests check correctness.

pub mod durable_streams;
pub mod floor;
pub mod load;
pub mod report;
