//! Without a terminal on stderr the dashboard stays off, even when asked for: the `hud`
//! example prints progress lines and a closing line to stderr, and its report to stdout.
mod common;

use std::process::Command;

#[test]
fn progress_lines_when_stderr_is_not_a_terminal() {
    let out = Command::new(common::example_binary())
        .arg("3")
        .env("MINIGUN_HUD", "1")
        .env("MINIGUN_LOG", "error")
        .output()
        .expect("run the hud example");
    let stderr = String::from_utf8_lossy(&out.stderr);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "exit {:?}\n{stderr}", out.status);
    assert!(
        !stderr.contains('\u{1b}'),
        "no terminal control sequences without a terminal:\n{stderr:?}"
    );
    let lines: Vec<&str> = stderr.lines().collect();
    let progress: Vec<&&str> = lines
        .iter()
        .filter(|l| l.starts_with("minigun: mixed ") && l.contains(" items, "))
        .collect();
    // About one a second for three seconds.
    assert!(progress.len() >= 2, "progress lines:\n{stderr}");
    assert!(
        progress
            .iter()
            .all(|l| l.contains("/s, ") && l.contains("failure") && l.contains('%')),
        "{stderr}"
    );
    assert!(progress[0].contains("ETA "), "{stderr}");
    let last = lines.last().copied().unwrap_or_default();
    assert!(
        last.starts_with("minigun: mixed finished after ") && last.contains("900 produced"),
        "closing line: {last:?}\n{stderr}"
    );
    assert!(
        stdout.contains("pipeline \"mixed\": 900 items from sources"),
        "{stdout}"
    );
}
