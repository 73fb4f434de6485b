//! The dashboard in a real terminal: the `hud` example runs in a tmux pane, shows its stages
//! and its fork children, stops on `q`, exits with status 0, gives the terminal back, and
//! leaves no process behind.
//!
//! Needs tmux: without it this test fails (it does not pass silently).
mod common;

use common::example_binary;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

const STAGES: [&str; 6] = ["orders", "parse", "price", "score", "batch", "store"];

fn tmux_present() -> bool {
    Command::new("tmux")
        .arg("-V")
        .output()
        .is_ok_and(|o| o.status.success())
}

/// A tmux server of our own (its own socket), killed on drop with everything in it.
struct Tmux {
    socket: String,
    dir: PathBuf,
    pid: Option<u32>,
}

impl Tmux {
    fn cmd(&self, args: &[&str]) -> Output {
        Command::new("tmux")
            .arg("-L")
            .arg(&self.socket)
            .args(args)
            .env_remove("TMUX")
            .output()
            .expect("run tmux")
    }

    /// The visible screen of the pane.
    fn screen(&self) -> String {
        String::from_utf8_lossy(&self.cmd(&["capture-pane", "-p", "-t", "hud"]).stdout).into_owned()
    }

    /// The pane's scrollback and screen.
    fn history(&self) -> String {
        let out = self.cmd(&["capture-pane", "-p", "-S", "-", "-t", "hud"]);
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        if let Some(pid) = self.pid {
            if Path::new(&format!("/proc/{pid}")).exists() {
                let _ = Command::new("kill")
                    .args(["-KILL", &pid.to_string()])
                    .status();
            }
        }
        let _ = self.cmd(&["kill-server"]);
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// (comm, state, ppid, session) of a process, from /proc.
fn stat(pid: u32) -> Option<(String, char, u32, u32)> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let open = s.find('(')?;
    let close = s.rfind(')')?;
    let comm = s[open + 1..close].to_string();
    let rest: Vec<&str> = s[close + 1..].split_whitespace().collect();
    let state = rest.first()?.chars().next()?;
    let ppid = rest.get(1)?.parse().ok()?;
    let session = rest.get(3)?.parse().ok()?;
    Some((comm, state, ppid, session))
}

fn all_pids() -> Vec<u32> {
    std::fs::read_dir("/proc")
        .expect("read /proc")
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .collect()
}

fn wait_for<T>(
    what: &str,
    secs: u64,
    mut f: impl FnMut() -> Option<T>,
    context: impl Fn() -> String,
) -> T {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {secs}s waiting for {what}\n{}",
            context()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn dashboard_in_tmux_quits_cleanly_on_q() {
    assert!(
        tmux_present(),
        "this test needs tmux, which was not found: install it (Debian/Ubuntu: apt-get install -y tmux)"
    );
    let bin = example_binary();
    let dir = std::env::temp_dir().join(format!("minigun-hud-tmux-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let mut tmux = Tmux {
        socket: format!("minigun-hud-test-{}", std::process::id()),
        dir: dir.clone(),
        pid: None,
    };

    // The inner shell writes its pid and then becomes the example (exec), so `pid` is the
    // example's pid; stdout goes to a file (the dashboard draws on stderr).
    let script = dir.join("run.sh");
    std::fs::write(
        &script,
        format!(
            "#!/bin/sh\n\
             dir='{dir}'\n\
             sh -c 'echo $$ > \"$1/pid\"; shift; exec \"$@\"' sh \"$dir\" \
               env MINIGUN_HUD=1 HUD_SECS=60 '{bin}' > \"$dir/stdout\"\n\
             echo \"EXIT=$?\" > \"$dir/exit.tmp\" && mv \"$dir/exit.tmp\" \"$dir/exit\"\n",
            dir = dir.display(),
            bin = bin.display()
        ),
    )
    .unwrap();
    // Keep the pane after the program ends, to read the screen it left.
    let conf = dir.join("tmux.conf");
    std::fs::write(&conf, "set -g remain-on-exit on\n").unwrap();
    let out = tmux.cmd(&[
        "-f",
        conf.to_str().unwrap(),
        "new-session",
        "-d",
        "-s",
        "hud",
        "-x",
        "120",
        "-y",
        "40",
        &format!("sh '{}'", script.display()),
    ]);
    assert!(
        out.status.success(),
        "tmux new-session failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );

    // The dashboard: every stage, the fork children panel, the run state.
    let screen = wait_for(
        "the dashboard to show every stage",
        60,
        || {
            let s = tmux.screen();
            (STAGES.iter().all(|n| s.contains(n))
                && s.contains("fork children")
                && s.contains("RUNNING"))
            .then_some(s)
        },
        || tmux.screen(),
    );
    assert!(
        screen.contains("cow_fork(4)") && screen.contains("ipc_fork(3)"),
        "{screen}"
    );

    let pid: u32 = wait_for(
        "the pid file",
        10,
        || {
            std::fs::read_to_string(dir.join("pid"))
                .ok()?
                .trim()
                .parse()
                .ok()
        },
        String::new,
    );
    tmux.pid = Some(pid);
    let (_, _, _, session) = stat(pid).expect("the example is running");
    // It has forked children, named mg:<stage>: the three ipc_fork workers of `score`
    // (mg:score#<slot>, alive for the whole run) at least.
    let (children, workers) = wait_for(
        "the three score workers among the live fork children",
        20,
        || {
            let c: Vec<(u32, String)> = all_pids()
                .into_iter()
                .filter_map(|p| {
                    let (comm, _, ppid, _) = stat(p)?;
                    (ppid == pid && comm.starts_with("mg:")).then_some((p, comm))
                })
                .collect();
            let workers: Vec<String> = c
                .iter()
                .filter(|(_, comm)| comm.starts_with("mg:score#"))
                .map(|(p, _)| p.to_string())
                .collect();
            let children: Vec<u32> = c.into_iter().map(|(p, _)| p).collect();
            (workers.len() == 3).then_some((children, workers))
        },
        || tmux.screen(),
    );
    // The dashboard shows those very processes: its fork children panel lists each worker's
    // pid.
    wait_for(
        "the fork children panel to list the score workers' pids",
        10,
        || {
            let s = tmux.screen();
            let shown: Vec<&str> = s.split_whitespace().collect();
            workers
                .iter()
                .all(|w| shown.contains(&w.as_str()))
                .then_some(())
        },
        || format!("workers {workers:?}\n{}", tmux.screen()),
    );

    let out = tmux.cmd(&["send-keys", "-t", "hud", "q"]);
    assert!(out.status.success());
    let exit = wait_for(
        "the example to exit after q",
        60,
        || std::fs::read_to_string(dir.join("exit")).ok(),
        || tmux.screen(),
    );
    assert_eq!(exit.trim(), "EXIT=0", "screen:\n{}", tmux.screen());

    // The terminal was given back: the pane is on its main screen, with the closing line
    // (read with the scrollback: the dead pane's notice may scroll it off the screen).
    wait_for(
        "the main screen with the closing line",
        10,
        || {
            let alternate = tmux.cmd(&["display-message", "-p", "-t", "hud", "#{alternate_on}"]);
            let main = String::from_utf8_lossy(&alternate.stdout).trim() == "0";
            (main && tmux.history().contains("minigun: mixed stopped after")).then_some(())
        },
        || tmux.history(),
    );
    let stdout = std::fs::read_to_string(dir.join("stdout")).unwrap();
    assert!(
        stdout.contains("pipeline \"mixed\"") && stdout.contains("stopped early"),
        "report missing from stdout:\n{stdout}"
    );

    // Nothing is left of the run: no process of its terminal session (no fork child, no
    // zombie), none of the children seen.
    let leftovers = || -> Vec<String> {
        all_pids()
            .into_iter()
            .filter_map(|p| {
                let (comm, state, ppid, sid) = stat(p)?;
                // The session leader is the pane's shell, tmux's own child (kept, dead,
                // with the pane); everything else in the session belongs to the run.
                let ours = (sid == session && p != session) || ppid == pid || children.contains(&p);
                ours.then(|| format!("pid {p} ({comm}) state {state} parent {ppid}"))
            })
            .collect()
    };
    let mut left = leftovers();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !left.is_empty() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
        left = leftovers();
    }
    assert!(
        left.is_empty(),
        "processes of the run remain after it exited:\n{}",
        left.join("\n")
    );
}
