//! A [`Broker`] on Redis Streams, for minigun's remote stages.
//!
//! [`RedisBroker`] opens one connection per [`Session`]; every operation that must be atomic
//! (a commit, a heartbeat, a dead-letter move, a split, a release, the `finished` marker) is
//! one Lua script, loaded once and re-sent when the server answers `NOSCRIPT`. Payload bytes
//! pass through Lua only where they must (the interpreter copies every byte it is given):
//! work entries are added with plain pipelined `XADD … NOMKSTREAM`, and a commit hands its
//! results to `XADD` as one argument, untouched.
//!
//! ```no_run
//! use minigun::remote::Broker;
//! use std::time::Duration;
//!
//! # fn main() -> Result<(), minigun::remote::BrokerError> {
//! // MINIGUN_REDIS_URL=rediss://mg-parent:secret@redis:6380/0
//! let broker = minigun_redis::RedisBroker::from_env()?
//!     .timeout(Duration::from_secs(2))
//!     .tls_ca(&std::fs::read("ca.crt").expect("the CA certificate"))?;
//! let mut session = broker.session()?;
//! println!("server {}", session.server_id()?);
//! # Ok(())
//! # }
//! ```
//!
//! # Keys
//!
//! With the namespace `mg` (see [`RedisBroker::namespace`]), a run of a stage lives under
//! `mg:{<pipeline>:<run>}:<stage>:…`: the hash tag keeps one run in one cluster slot, so the
//! scripts may touch all of its keys. In the names, `{`, `}`, `:` and `%` are written as `%`
//! and their hex code, so that no name can end the tag early or run into the next.
//!
//! | key | type | content |
//! |---|---|---|
//! | `…:in` | stream, group `mg` | work entries: `s` first index, `n` count, `a` attempts, `p` payload; and wake signs `k wake` (see [`Session::wake`]), which a fetch drops and never delivers |
//! | `…:out` | stream, group `parent` | `k` kind (`results`, `stats`, `finished`), `c` consumer, `p` payload |
//! | `…:dlq` | stream, `MAXLEN ~ 10000` | a dead-lettered entry's fields, `d` deliveries, `o` last owner, `id` |
//! | `…:ctl` | hash | `state`, the announcement's fields and cursor `ann`, one `fin:<consumer>` marker per finished worker |
//! | `…:workers` | hash | consumer → `<server ms> <pid> <concurrency> <host>` |
//! | `mg:{<pipeline>}:runs` | stream | announcements, read without a group |
//!
//! # Server set-up
//!
//! The server must not evict keys: [`Session::announce`] refuses a `maxmemory-policy` other
//! than `noeviction`. With ACL users, workers need
//! `~mg:* +@stream +@hash +@connection +evalsha +script|load +time -@dangerous -xgroup -xtrim -xsetid`
//! and the parent
//! `~mg:* +@stream +@hash +@connection +evalsha +script|load +time +del +expire -@dangerous +info`
//! (`TIME` gives the worker table the server's clock; it is in none of the other categories).

mod keys;
mod scripts;
mod session;
#[doc(hidden)]
pub mod testing;
mod value;

use minigun::remote::broker::BrokerResult;
use minigun::remote::{Broker, BrokerError, Session};
use std::fmt;
use std::time::Duration;

pub use keys::Keys;

/// The environment variable [`RedisBroker::from_env`] reads.
pub const URL_ENV: &str = "MINIGUN_REDIS_URL";

/// A Redis server as a [`Broker`] for remote stages.
#[derive(Clone)]
pub struct RedisBroker {
    client: redis::Client,
    namespace: String,
    timeout: Duration,
    /// The URL's scheme, host and port, without credentials, for messages.
    shown: String,
}

impl fmt::Debug for RedisBroker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisBroker")
            .field("server", &self.shown)
            .field("namespace", &self.namespace)
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

impl RedisBroker {
    /// A broker for the server at `url`: `redis://[user:password@]host[:port][/db]`, or
    /// `rediss://` for TLS (the system's root certificates, or [`RedisBroker::tls_ca`]).
    /// Nothing is connected until a session is opened.
    pub fn from_url(url: &str) -> BrokerResult<RedisBroker> {
        let client = redis::Client::open(url)
            .map_err(|e| BrokerError::Unusable(format!("invalid Redis URL: {e}")))?;
        let shown = shown(client.get_connection_info());
        Ok(RedisBroker {
            client,
            namespace: "mg".into(),
            timeout: Duration::from_secs(5),
            shown,
        })
    }

    /// A broker for the URL in `MINIGUN_REDIS_URL`.
    pub fn from_env() -> BrokerResult<RedisBroker> {
        match std::env::var(URL_ENV) {
            Ok(url) if !url.is_empty() => Self::from_url(&url),
            _ => Err(BrokerError::Unusable(format!(
                "{URL_ENV} is not set: set it to the Redis server's URL, e.g. redis://host:6379/0"
            ))),
        }
    }

    /// The key prefix (default `mg`); an ACL key pattern must cover `<prefix>:*`.
    pub fn namespace(mut self, prefix: impl Into<String>) -> Self {
        self.namespace = prefix.into();
        self
    }

    /// The connect, read and write timeout of every call (default 5 s). A blocking read waits
    /// its `block` time plus this.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout.max(Duration::from_millis(1));
        self
    }

    /// Trusts the CA certificates in `pem` (PEM) instead of the system's roots, for a
    /// `rediss://` URL (a self-signed server certificate, a private CA).
    pub fn tls_ca(self, pem: &[u8]) -> BrokerResult<Self> {
        self.tls(redis::TlsCertificates {
            client_tls: None,
            root_cert: Some(pem.to_vec()),
        })
    }

    /// Trusts the CA certificates in `ca_pem` and authenticates with a client certificate
    /// and key (PEM), for servers that require mutual TLS.
    pub fn tls_client(self, ca_pem: &[u8], cert_pem: &[u8], key_pem: &[u8]) -> BrokerResult<Self> {
        self.tls(redis::TlsCertificates {
            client_tls: Some(redis::ClientTlsConfig {
                client_cert: cert_pem.to_vec(),
                client_key: key_pem.to_vec(),
            }),
            root_cert: Some(ca_pem.to_vec()),
        })
    }

    fn tls(mut self, certs: redis::TlsCertificates) -> BrokerResult<Self> {
        install_crypto_provider();
        let info = self.client.get_connection_info().clone();
        self.client = redis::Client::build_with_tls(info, certs).map_err(|e| {
            BrokerError::Unusable(format!(
                "TLS set-up failed ({e}): use a rediss:// URL and PEM certificates"
            ))
        })?;
        Ok(self)
    }

    /// The keys of a run under this broker's namespace.
    pub fn keys(&self, run: &minigun::remote::broker::StageRun) -> Keys {
        Keys::new(&self.namespace, run)
    }
}

/// rustls picks its provider from the process default; this crate brings `ring`, which
/// builds from crates.io with a C compiler alone. rustls marks ring's provider deprecated
/// because it has no post-quantum key exchange; the classical suites it offers are the ones
/// Redis servers speak today. Another crate may have installed a provider already, which is
/// as good.
#[allow(deprecated)]
fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

fn shown(info: &redis::ConnectionInfo) -> String {
    match info.addr() {
        redis::ConnectionAddr::Tcp(host, port) => format!("redis://{host}:{port}"),
        redis::ConnectionAddr::TcpTls { host, port, .. } => format!("rediss://{host}:{port}"),
        redis::ConnectionAddr::Unix(path) => format!("redis+unix://{}", path.display()),
        _ => "redis".into(),
    }
}

impl Broker for RedisBroker {
    fn name(&self) -> &str {
        "redis"
    }

    fn session(&self) -> BrokerResult<Box<dyn Session>> {
        if matches!(
            self.client.get_connection_info().addr(),
            redis::ConnectionAddr::TcpTls { .. }
        ) {
            install_crypto_provider();
        }
        Ok(Box::new(session::RedisSession::open(self)?))
    }
}
