//! The benchmark harness (issue "Benchmark harness and throughput"): the sessions load
//! generator, the references measured in the same run (the minimal pipeline floor, the
//! Durable Streams server, and s2-lite for the writer workload), the writer load generator (S2's
//! protocol), and the report types they share. Figures are reported, never
//! asserted: tests check correctness.

pub mod durable_streams;
pub mod floor;
pub mod load;
pub mod report;
pub mod s2_lite;
pub mod writer;
