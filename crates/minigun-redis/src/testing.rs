//! A `redis-server` of a test's own: started on 127.0.0.1 on a free port with a temporary
//! directory and a random password, killed by its pid when dropped. Fault tests stop, kill,
//! pause, resume and restart it on the same port and directory.
//!
//! Without a `redis-server` on the `PATH`, [`RedisServer::start_or_skip`] prints a skip line
//! and returns `None`, unless `CI=true`: then a missing server is a failure, so that a green
//! CI run cannot hide a missing install step.

use crate::RedisBroker;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use std::io::Read;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

/// How the append-only file is synced, when a test asks for one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fsync {
    /// `appendfsync always`: every write is on disk before its reply.
    Always,
    /// `appendfsync everysec`.
    EverySec,
}

/// What a test server runs with.
#[derive(Debug, Clone, Default)]
pub struct ServerOptions {
    /// `--appendonly yes` with this fsync; `None`: no persistence at all.
    pub aof: Option<Fsync>,
    /// Serve TLS only (`--tls-port`), with a CA and a server certificate made by `openssl`.
    pub tls: bool,
    /// ACL users, each a name and its rules as `ACL SETUSER` takes them (e.g.
    /// `on >secret ~mg:* +@stream`), set after every start.
    pub users: Vec<(String, String)>,
    /// More `redis-server` arguments.
    pub args: Vec<String>,
}

/// A running test server (see the module docs).
#[derive(Debug)]
pub struct RedisServer {
    child: Option<Child>,
    port: u16,
    dir: PathBuf,
    password: String,
    options: ServerOptions,
    ca_pem: Option<Vec<u8>>,
}

/// Whether this is a CI run (`CI=true`).
fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v.eq_ignore_ascii_case("true"))
}

/// Whether `program` runs here: asked for its version (`openssl` takes `version`, not
/// `--version`, which OpenSSL 3 refuses).
fn runs(program: &str) -> bool {
    let ask = if program == "openssl" {
        "version"
    } else {
        "--version"
    };
    Command::new(program)
        .arg(ask)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Random hex from the kernel, for passwords and directory names.
pub fn random_hex(bytes: usize) -> String {
    let mut buf = vec![0u8; bytes];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut buf))
        .expect("read /dev/urandom");
    buf.iter().map(|b| format!("{b:02x}")).collect()
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port on 127.0.0.1")
}

fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .stdin(Stdio::null())
        .output()
        .expect("run openssl");
    assert!(
        out.status.success(),
        "openssl {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A self-signed CA and a server certificate it signs, for 127.0.0.1 and localhost.
fn make_certs(dir: &Path) -> Vec<u8> {
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
    ];
    let mut ca = vec!["req", "-x509", "-days", "2", "-subj", "/CN=minigun test CA"];
    ca.extend(ec);
    ca.extend(["-keyout", "ca.key", "-out", "ca.crt"]);
    openssl(dir, &ca);
    let mut csr = vec!["req", "-new", "-subj", "/CN=localhost"];
    csr.extend(ec);
    csr.extend(["-keyout", "server.key", "-out", "server.csr"]);
    openssl(dir, &csr);
    std::fs::write(
        dir.join("server.ext"),
        "subjectAltName=DNS:localhost,IP:127.0.0.1\nbasicConstraints=CA:FALSE\n\
         keyUsage=digitalSignature\nextendedKeyUsage=serverAuth\n",
    )
    .expect("write server.ext");
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca.crt",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-days",
            "2",
            "-extfile",
            "server.ext",
            "-out",
            "server.crt",
        ],
    );
    std::fs::read(dir.join("ca.crt")).expect("read ca.crt")
}

impl RedisServer {
    /// Whether `redis-server` (and, for TLS, `openssl`) can be run here.
    pub fn available(options: &ServerOptions) -> bool {
        runs("redis-server") && (!options.tls || runs("openssl"))
    }

    /// Starts a server with default options, or prints a skip line and returns `None` when
    /// there is no `redis-server` (a panic under `CI=true`).
    pub fn start_or_skip() -> Option<RedisServer> {
        Self::start_with_or_skip(ServerOptions::default())
    }

    /// [`RedisServer::start_or_skip`] with options.
    pub fn start_with_or_skip(options: ServerOptions) -> Option<RedisServer> {
        if Self::available(&options) {
            return Some(Self::start_with(options));
        }
        let what = if options.tls {
            "redis-server and openssl"
        } else {
            "redis-server"
        };
        assert!(
            !in_ci(),
            "{what} not found on PATH, and CI=true: install it (apt-get install -y redis-server openssl); \
             CI must not skip the Redis tests"
        );
        println!("skipped: {what} not found on PATH (install it to run the Redis tests)");
        None
    }

    /// Starts a server; panics if it cannot.
    pub fn start_with(options: ServerOptions) -> RedisServer {
        static SEQ: AtomicU32 = AtomicU32::new(0);
        let dir = std::env::temp_dir().join(format!(
            "minigun-redis-{}-{}-{}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed),
            random_hex(4)
        ));
        std::fs::create_dir_all(&dir).expect("create the server's directory");
        let ca_pem = options.tls.then(|| make_certs(&dir));
        let mut server = RedisServer {
            child: None,
            port: 0,
            dir,
            password: random_hex(16),
            options,
            ca_pem,
        };
        // A port free a moment ago may be taken by the time the server binds it.
        let mut last = String::new();
        for _ in 0..5 {
            server.port = free_port();
            match server.spawn() {
                Ok(()) => return server,
                Err(e) => last = e,
            }
        }
        panic!("redis-server did not start: {last}");
    }

    fn args(&self) -> Vec<String> {
        let d = self.dir.display().to_string();
        let mut a: Vec<String> = vec!["--bind".into(), "127.0.0.1".into()];
        if self.options.tls {
            for (k, v) in [
                ("--port", "0".to_string()),
                ("--tls-port", self.port.to_string()),
                ("--tls-cert-file", format!("{d}/server.crt")),
                ("--tls-key-file", format!("{d}/server.key")),
                ("--tls-ca-cert-file", format!("{d}/ca.crt")),
                ("--tls-auth-clients", "no".into()),
            ] {
                a.extend([k.to_string(), v]);
            }
        } else {
            a.extend(["--port".into(), self.port.to_string()]);
        }
        a.extend(["--dir".into(), d.clone(), "--save".into(), String::new()]);
        match self.options.aof {
            None => a.extend(["--appendonly".into(), "no".into()]),
            Some(f) => a.extend([
                "--appendonly".into(),
                "yes".into(),
                "--appendfsync".into(),
                match f {
                    Fsync::Always => "always".into(),
                    Fsync::EverySec => "everysec".into(),
                },
            ]),
        }
        a.extend([
            "--requirepass".into(),
            self.password.clone(),
            "--logfile".into(),
            format!("{d}/redis.log"),
            "--daemonize".into(),
            "no".into(),
        ]);
        a.extend(self.options.args.iter().cloned());
        a
    }

    fn log_tail(&self) -> String {
        let log = std::fs::read_to_string(self.dir.join("redis.log")).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(15)..].join("\n")
    }

    /// Starts the process and waits until it answers PING (10 s at most).
    fn spawn(&mut self) -> Result<(), String> {
        let child = Command::new("redis-server")
            .args(self.args())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("cannot run redis-server: {e}"))?;
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                self.child = None;
                return Err(format!("exited with {status}:\n{}", self.log_tail()));
            }
            if let Ok(mut c) = self
                .client()
                .get_connection_with_timeout(Duration::from_secs(1))
            {
                if redis::cmd("PING").query::<String>(&mut c).is_ok() {
                    self.add_users(&mut c);
                    return Ok(());
                }
            }
            if Instant::now() > deadline {
                self.kill();
                return Err(format!("no PONG within 10 s:\n{}", self.log_tail()));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn add_users(&self, c: &mut redis::Connection) {
        for (name, rules) in &self.options.users {
            let mut cmd = redis::cmd("ACL");
            cmd.arg("SETUSER").arg(name).arg("reset");
            for r in rules.split_whitespace() {
                cmd.arg(r);
            }
            cmd.query::<()>(c)
                .unwrap_or_else(|e| panic!("ACL SETUSER {name} {rules}: {e}"));
        }
    }

    /// The server's URL with the default user's password.
    pub fn url(&self) -> String {
        self.url_for("default", &self.password)
    }

    /// The server's URL for an ACL user.
    pub fn url_for(&self, user: &str, password: &str) -> String {
        let scheme = if self.options.tls { "rediss" } else { "redis" };
        format!("{scheme}://{user}:{password}@127.0.0.1:{}/0", self.port)
    }

    /// The default user's password.
    pub fn password(&self) -> &str {
        &self.password
    }

    /// The port it listens on (TLS only with [`ServerOptions::tls`]).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Its working directory (RDB and AOF files, the log, certificates).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The CA certificate (PEM) that signed the server's, with TLS.
    pub fn ca_pem(&self) -> Option<&[u8]> {
        self.ca_pem.as_deref()
    }

    /// The process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// A client of the default user (trusting the test CA with TLS).
    pub fn client(&self) -> redis::Client {
        let client = redis::Client::open(self.url()).expect("the server's URL");
        match &self.ca_pem {
            None => client,
            Some(ca) => {
                crate::install_crypto_provider();
                redis::Client::build_with_tls(
                    client.get_connection_info().clone(),
                    redis::TlsCertificates {
                        client_tls: None,
                        root_cert: Some(ca.clone()),
                    },
                )
                .expect("a TLS client")
            }
        }
    }

    /// A connection of the default user, for set-up and inspection.
    pub fn admin(&self) -> redis::Connection {
        self.client()
            .get_connection_with_timeout(Duration::from_secs(5))
            .expect("connect to the test server")
    }

    /// A broker for `url` on this server (trusting the test CA with TLS), with 2 s timeouts.
    pub fn broker_for(&self, url: &str) -> RedisBroker {
        let b = RedisBroker::from_url(url)
            .expect("a broker")
            .timeout(Duration::from_secs(2));
        match &self.ca_pem {
            None => b,
            Some(ca) => b.tls_ca(ca).expect("TLS broker"),
        }
    }

    /// A broker of the default user.
    pub fn broker(&self) -> RedisBroker {
        self.broker_for(&self.url())
    }

    fn signal(&self, sig: Signal) {
        if let Some(pid) = self.pid() {
            let pid = Pid::from_raw(i32::try_from(pid).expect("a pid fits in i32"));
            // It may have exited already: nothing to signal then.
            let _ = kill(pid, sig);
        }
    }

    fn reap(&mut self) {
        if let Some(mut c) = self.child.take() {
            // Waits for the process by its pid, so the port and files are free after.
            let _ = c.wait();
        }
    }

    /// SIGTERM, and waits for the exit (a clean shutdown; no save with `--save ''`).
    pub fn stop(&mut self) {
        self.resume();
        self.signal(Signal::SIGTERM);
        self.reap();
    }

    /// SIGKILL, and waits for the exit (a crash: nothing is flushed).
    pub fn kill(&mut self) {
        self.signal(Signal::SIGKILL);
        self.reap();
    }

    /// SIGSTOP: the server stops answering, its connections stay open.
    pub fn pause(&self) {
        self.signal(Signal::SIGSTOP);
    }

    /// SIGCONT after [`RedisServer::pause`].
    pub fn resume(&self) {
        self.signal(Signal::SIGCONT);
    }

    /// Kills the server if it runs and starts it again on the same port, directory and
    /// password (what it keeps depends on [`ServerOptions::aof`]).
    pub fn restart(&mut self) {
        self.kill();
        let mut last = String::new();
        for _ in 0..20 {
            match self.spawn() {
                Ok(()) => return,
                Err(e) => last = e,
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!("redis-server did not restart on port {}: {last}", self.port);
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
