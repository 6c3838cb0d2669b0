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

/// Returns `<root>/bin/<binary>`, running `cargo install --root <root> <crate> --version
/// <version> --locked` first if it is missing: the references are built on the benchmark's
/// machine into an ignored folder, never vendored.
pub fn cargo_install(
    root: &std::path::Path,
    krate: &str,
    version: &str,
    binary: &str,
) -> Result<std::path::PathBuf, String> {
    let path = root.join("bin").join(binary);
    if path.is_file() {
        return Ok(path);
    }
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let status = std::process::Command::new(cargo)
        .arg("install")
        .arg("--root")
        .arg(root)
        .args([krate, "--version", version, "--locked"])
        .status()
        .map_err(|error| format!("running cargo install {krate}: {error}"))?;
    if !status.success() {
        return Err(format!("cargo install {krate} {version} failed: {status}"));
    }
    if path.is_file() {
        Ok(path)
    } else {
        Err(format!(
            "cargo install {krate} succeeded but {} is missing",
            path.display()
        ))
    }
}
