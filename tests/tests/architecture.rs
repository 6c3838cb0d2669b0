//! The Architecture Invariant lines of ARCHITECTURE.md, checked over the source tree: which
//! modules may name which adapter library, where metrics are recorded, who acknowledges
//! deliveries, that the domain and apply rules do no IO, and that handlers and apply code do not
//! know which mode (production or embedded) runs.

use std::path::{Path, PathBuf};

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_path_buf()
}

/// Every `.rs` file of the production crates, relative to the workspace root.
fn source_files() -> Vec<(String, String)> {
    let root = workspace_root();
    let mut files = Vec::new();
    // The production crates; the test harness may talk to the services directly.
    let mut pending: Vec<PathBuf> = ["api/src", "worker/src", "shared/src"]
        .iter()
        .map(|folder| root.join(folder))
        .collect();
    while let Some(folder) = pending.pop() {
        for entry in std::fs::read_dir(&folder).expect("readable source folder") {
            let path = entry.expect("entry").path();
            if path.is_dir() {
                pending.push(path);
            } else if path.extension().is_some_and(|extension| extension == "rs") {
                let relative = path
                    .strip_prefix(&root)
                    .expect("under root")
                    .to_string_lossy()
                    .into_owned();
                let text = std::fs::read_to_string(&path).expect("readable source");
                files.push((relative, text));
            }
        }
    }
    assert!(files.len() > 20, "found the sources");
    files
}

/// Files that name `needle` in code, outside the allowed path prefixes.
fn offenders(needle: &str, allowed: &[&str]) -> Vec<String> {
    source_files()
        .into_iter()
        .filter(|(path, _)| !allowed.iter().any(|prefix| path.starts_with(prefix)))
        .filter(|(_, text)| {
            text.lines()
                .map(str::trim_start)
                .filter(|line| !line.starts_with("//"))
                .any(|line| line.contains(needle))
        })
        .map(|(path, _)| path)
        .collect()
}

#[test]
fn only_the_broker_module_names_lapin() {
    assert_eq!(
        offenders("lapin", &["shared/src/broker/"]),
        Vec::<String>::new()
    );
}

#[test]
fn only_the_cache_module_names_redis() {
    assert_eq!(
        offenders("redis::", &["shared/src/cache/"]),
        Vec::<String>::new()
    );
}

#[test]
fn sea_orm_stays_in_storage() {
    assert_eq!(
        offenders("sea_orm", &["shared/src/storage/"]),
        Vec::<String>::new()
    );
}

/// The storage boundary is the compiler's: `shared/src/storage/mod.rs` holds a `compile_fail`
/// doc test that names a sea-orm entity from outside the crate, beside one that names the
/// public domain structs. Runs them (nextest does not run doc tests) and checks both ran.
#[test]
fn sea_orm_entities_cannot_be_named_outside_storage() {
    let output = std::process::Command::new(env!("CARGO"))
        .current_dir(workspace_root())
        // The workspace's feature set: the artifacts the suite was built with, nothing rebuilt.
        .args([
            "test",
            "--doc",
            "--workspace",
            "--",
            "storage",
            "--color",
            "never",
        ])
        .output()
        .expect("cargo runs");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "storage doc tests failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        stdout.contains("storage (line") && stdout.contains("compile fail ... ok"),
        "the boundary's doc tests did not run:\n{stdout}"
    );
    assert!(
        stdout
            .lines()
            .any(|line| line.starts_with("test shared/src/storage/mod.rs")
                && !line.contains("compile fail")
                && line.ends_with("... ok")),
        "the public side of the boundary did not compile:\n{stdout}"
    );
}

#[test]
fn metrics_are_recorded_only_at_the_defined_instrumentation_points() {
    assert_eq!(
        offenders(
            "metrics::",
            &[
                "api/src/signals.rs",
                "worker/src/signals.rs",
                "worker/src/ownership.rs",
                "shared/src/telemetry.rs",
            ],
        ),
        Vec::<String>::new()
    );
}

#[test]
fn only_the_outcome_module_acknowledges_deliveries() {
    // The broker adapter implements acknowledgements; the worker decides them in one place.
    for call in [".ack(", ".ack_through(", ".nack(", ".reject("] {
        assert_eq!(
            offenders(call, &["worker/src/outcome.rs", "shared/src/broker/"]),
            Vec::<String>::new(),
            "{call}"
        );
    }
}

#[test]
fn the_domain_and_the_apply_rules_do_no_io() {
    for needle in [
        "async fn", ".await", "tokio::", "sea_orm", "lapin", "redis", "std::fs", "std::net",
        "reqwest",
    ] {
        assert_eq!(
            offenders_under(needle, &["shared/src/domain/", "worker/src/apply/"]),
            Vec::<String>::new(),
            "{needle}"
        );
    }
}

#[test]
fn no_handler_and_no_apply_code_knows_which_mode_runs() {
    for needle in ["in_process", "InProcess", "embedded", "sqlite", "Sqlite"] {
        assert_eq!(
            offenders_under(needle, &["api/src/routes/", "worker/src/apply/"]),
            Vec::<String>::new(),
            "{needle}"
        );
    }
}

#[test]
fn every_task_is_spawned_on_a_tracker() {
    // The api spawns on `AppState::tasks`, the worker on its own tracker, the broker adapters on
    // the tracker their `BrokerConfig` was given: a stopping process waits for all of them.
    // Exceptions, each joined another way: the embedded server's worker (by handle), the probe
    // listeners (`telemetry::serve_probes` returns its handle, which is awaited) and the OS
    // signal listener (`shutdown.rs`, alive until the signal that stops the process).
    let exceptions = [
        "api/src/embedded.rs",
        "shared/src/telemetry.rs",
        "shared/src/shutdown.rs",
    ];
    assert_eq!(
        offenders_under("tokio::spawn", &["api/src/", "worker/src/", "shared/src/"])
            .into_iter()
            .filter(|path| !exceptions.contains(&path.as_str()))
            .collect::<Vec<_>>(),
        Vec::<String>::new()
    );
}

/// Files under `folders` that name `needle` in code.
fn offenders_under(needle: &str, folders: &[&str]) -> Vec<String> {
    offenders(needle, &[])
        .into_iter()
        .filter(|path| folders.iter().any(|folder| path.starts_with(folder)))
        .collect()
}

#[test]
fn the_offender_search_finds_what_it_looks_for() {
    // Guards the checks above against passing vacuously.
    assert!(!offenders("lapin", &[]).is_empty());
    assert!(!offenders("metrics::", &[]).is_empty());
    assert!(!offenders_under(".ack(", &["shared/src/broker/"]).is_empty());
    assert!(!offenders_under("pub fn", &["shared/src/domain/", "worker/src/apply/"]).is_empty());
    assert!(!offenders_under("Json", &["api/src/routes/"]).is_empty());
    assert!(!offenders_under("tokio::spawn", &["api/src/"]).is_empty());
}
