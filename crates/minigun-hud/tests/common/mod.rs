//! Shared by the tests that run the `hud` example.
use std::path::{Path, PathBuf};
use std::process::Command;

/// The `hud` example's binary, next to this test's (built by `cargo test` / nextest with the
/// other targets; built here if it is missing).
pub(crate) fn example_binary() -> PathBuf {
    let exe = std::env::current_exe().expect("test binary path");
    // <target>/<profile>/deps/<test>-<hash>  ->  <target>/<profile>/examples/hud
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("test binary in <profile>/deps");
    let bin = profile_dir.join("examples").join("hud");
    if !bin.exists() {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_string());
        let status = Command::new(cargo)
            .args(["build", "-p", "minigun-hud", "--example", "hud"])
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .status()
            .expect("run cargo build --example hud");
        assert!(status.success(), "building the hud example failed");
    }
    assert!(bin.exists(), "no example binary at {}", bin.display());
    bin
}
