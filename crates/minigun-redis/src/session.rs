//! One connection to the server: the [`Session`] calls.

use crate::keys::{runs_key, Keys};
use crate::scripts;
use crate::value::{self, Entry};
use crate::RedisBroker;
use minigun::remote::broker::BrokerResult;
use minigun::remote::broker::{
    Announcement, Commit, Control, Delivery, EntryId, NewEntry, OutEntry, OutKind, Pending,
    StageRun, WorkerInfo,
};
use minigun::remote::{BrokerError, Session};
use redis::{Connection, ErrorKind, RedisError, Value};
use std::time::Duration;

/// Dead letters kept per run (approximately: `MAXLEN ~`).
const DLQ_MAXLEN: u32 = 10_000;
/// Announcements kept per pipeline (approximately); a run's own is removed by its cleanup.
const RUNS_MAXLEN: u32 = 10_000;

pub(crate) struct RedisSession {
    client: redis::Client,
    conn: Option<Connection>,
    namespace: String,
    timeout: Duration,
    shown: String,
}

/// Maps a client or server error to the contract's kinds.
fn map_err(e: &RedisError, shown: &str) -> BrokerError {
    let code = e.code().unwrap_or("");
    let words = e.to_string();
    match code {
        "NOAUTH" | "WRONGPASS" | "NOPERM" => {
            return BrokerError::Auth(format!("{shown} answered: {words}"))
        }
        // UNBLOCKED: the stream was deleted under a blocked read.
        "NOGROUP" | "NORUN" | "UNBLOCKED" => return BrokerError::NoRun,
        "LOADING" | "BUSY" | "TRYAGAIN" | "CLUSTERDOWN" | "MASTERDOWN" | "READONLY" => {
            return BrokerError::Unavailable(format!("{shown}: {words}"))
        }
        _ => {}
    }
    // A command refused inside a script comes back as ERR with these words.
    let refused_in_script = words.contains("can't run this command");
    if refused_in_script
        || words.contains("NOPERM")
        || words.contains("NOAUTH")
        || words.contains("WRONGPASS")
    {
        return BrokerError::Auth(format!("{shown} answered: {words}"));
    }
    if words.contains("NOGROUP") {
        return BrokerError::NoRun;
    }
    match e.kind() {
        ErrorKind::AuthenticationFailed => {
            BrokerError::Auth(format!("{shown} refused the credentials: {words}"))
        }
        ErrorKind::Io if words.contains("certificate") => BrokerError::Unusable(format!(
            "{shown}: TLS handshake failed ({words}); trust the server's CA with tls_ca()"
        )),
        ErrorKind::Io | ErrorKind::Parse => BrokerError::Unavailable(format!("{shown}: {words}")),
        ErrorKind::InvalidClientConfig => BrokerError::Unusable(format!("{shown}: {words}")),
        _ if e.is_timeout() || e.is_connection_dropped() || e.is_connection_refusal() => {
            BrokerError::Unavailable(format!("{shown}: {words}"))
        }
        _ => BrokerError::Other(format!("{shown}: {words}")),
    }
}

/// Whether the connection can be used after this error: a server's error reply leaves it in
/// step, anything else (a timeout above all: the reply may still come) does not.
fn keeps_connection(e: &RedisError) -> bool {
    matches!(e.kind(), ErrorKind::Server(_) | ErrorKind::Extension)
        || e.kind() == ErrorKind::AuthenticationFailed
}

fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// A block time for the server: whole ms, at least 1 (0 would block forever).
fn block_ms(d: Duration) -> u64 {
    ms(d + Duration::from_micros(999)).max(1)
}

fn control_name(c: Control) -> &'static str {
    match c {
        Control::Running => "running",
        Control::Finishing => "finishing",
        Control::Aborted => "aborted",
    }
}

fn control_of(s: &str) -> BrokerResult<Control> {
    match s {
        "running" => Ok(Control::Running),
        "finishing" => Ok(Control::Finishing),
        "aborted" => Ok(Control::Aborted),
        other => Err(BrokerError::Other(format!(
            "unknown control state {other:?}"
        ))),
    }
}

/// Whole seconds for EXPIRE, rounded up, at least 1.
fn expire_secs(d: Duration) -> u64 {
    (d.as_secs() + u64::from(d.subsec_nanos() > 0)).max(1)
}

/// A work entry from its fields. A field missing or not a number reads as 0 (an entry
/// written by someone else): the executor then fails its payload's decoding and
/// dead-letters it, instead of a worker stalling on an entry it cannot even list.
fn new_entry(fields: &[(Vec<u8>, Vec<u8>)]) -> NewEntry {
    let num = |n| value::field_number(fields, n).unwrap_or(0);
    NewEntry {
        first: num("s"),
        count: u32::try_from(num("n")).unwrap_or(u32::MAX),
        attempts: u32::try_from(num("a")).unwrap_or(u32::MAX),
        payload: value::field(fields, "p").unwrap_or_default().to_vec(),
    }
}

/// An out entry from its fields; an unknown kind reads as results, whose payload the parent
/// then fails to decode.
fn out_entry((id, fields): Entry) -> Option<OutEntry> {
    let fields = fields?;
    let kind = match value::field(&fields, "k") {
        Some(b"stats") => OutKind::Stats,
        Some(b"finished") => OutKind::Finished,
        _ => OutKind::Results,
    };
    Some(OutEntry {
        id,
        kind,
        consumer: value::field_text(&fields, "c").unwrap_or_default(),
        payload: value::field(&fields, "p").unwrap_or_default().to_vec(),
    })
}

/// Whether a work entry is a wake sign (see [`Session::wake`]), not work.
fn is_wake(fields: &[(Vec<u8>, Vec<u8>)]) -> bool {
    value::field(fields, "k") == Some(&b"wake"[..])
}

/// `(id, deliveries, fields)` triples, as the claim and own scripts answer; and the ids of
/// wake signs among them, which are not work.
fn deliveries(v: Value) -> BrokerResult<(Vec<Delivery>, Vec<EntryId>)> {
    let mut out = Vec::new();
    let mut wakes = Vec::new();
    for t in value::items(v) {
        let mut it = value::items(t).into_iter();
        let (Some(id), Some(count), Some(fields)) = (it.next(), it.next(), it.next()) else {
            return Err(BrokerError::Other("unexpected delivery reply".into()));
        };
        let id = value::text(&id).unwrap_or_default();
        let deliveries = value::number(&count).unwrap_or(1);
        let fields = value::pairs(fields).unwrap_or_default();
        if is_wake(&fields) {
            wakes.push(id);
            continue;
        }
        out.push(Delivery {
            id,
            entry: new_entry(&fields),
            deliveries: u32::try_from(deliveries).unwrap_or(u32::MAX),
        });
    }
    Ok((out, wakes))
}

/// Entries as the split script's arguments.
fn encode_entries(inv: &mut redis::ScriptInvocation<'_>, entries: &[NewEntry]) {
    for e in entries {
        inv.arg(e.first)
            .arg(e.count)
            .arg(e.attempts)
            .arg(&e.payload[..]);
    }
}

fn announcement_fields(a: &Announcement) -> Vec<(&'static str, Vec<u8>)> {
    let r = &a.stage_run;
    vec![
        ("pl", r.pipeline.clone().into_bytes()),
        ("run", r.run.clone().into_bytes()),
        ("st", r.stage.clone().into_bytes()),
        ("fp", a.fingerprint.clone().into_bytes()),
        ("ft", a.fingerprint_text.clone().into_bytes()),
        ("ci", ms(a.claim_idle).to_string().into_bytes()),
        ("md", a.max_deliveries.to_string().into_bytes()),
    ]
}

fn announcement_of(fields: &[(Vec<u8>, Vec<u8>)]) -> Option<Announcement> {
    let t = |n| value::field_text(fields, n);
    Some(Announcement {
        stage_run: StageRun {
            pipeline: t("pl")?,
            run: t("run")?,
            stage: t("st")?,
        },
        fingerprint: t("fp")?,
        fingerprint_text: t("ft").unwrap_or_default(),
        claim_idle: Duration::from_millis(value::field_number(fields, "ci")?),
        max_deliveries: u32::try_from(value::field_number(fields, "md")?).ok()?,
    })
}

impl RedisSession {
    pub(crate) fn open(b: &RedisBroker) -> BrokerResult<Self> {
        let mut s = RedisSession {
            client: b.client.clone(),
            conn: None,
            namespace: b.namespace.clone(),
            timeout: b.timeout,
            shown: b.shown.clone(),
        };
        s.conn()?;
        Ok(s)
    }

    fn keys(&self, run: &StageRun) -> Keys {
        Keys::new(&self.namespace, run)
    }

    /// The connection, made again if the last call lost it.
    fn conn(&mut self) -> BrokerResult<&mut Connection> {
        if self.conn.is_none() {
            let c = self
                .client
                .get_connection_with_timeout(self.timeout)
                .map_err(|e| match self.refusal() {
                    Some(words) if e.kind() == ErrorKind::AuthenticationFailed => {
                        BrokerError::Auth(format!(
                            "{} refused the credentials: {words}",
                            self.shown
                        ))
                    }
                    _ => map_err(&e, &self.shown),
                })?;
            let t = Some(self.timeout);
            c.set_read_timeout(t)
                .and_then(|()| c.set_write_timeout(t))
                .map_err(|e| map_err(&e, &self.shown))?;
            self.conn = Some(c);
        }
        Ok(self.conn.as_mut().expect("just connected"))
    }

    /// The server's own words for refused credentials (the client reports only that they
    /// were): the same AUTH sent again on a connection of its own.
    fn refusal(&self) -> Option<String> {
        let info = self.client.get_connection_info();
        let settings = info.redis_settings();
        let password = settings.password()?;
        let bare = info
            .clone()
            .set_redis_settings(redis::RedisConnectionInfo::default());
        let mut c = redis::Client::open(bare)
            .ok()?
            .get_connection_with_timeout(self.timeout)
            .ok()?;
        let mut auth = redis::cmd("AUTH");
        if let Some(user) = settings.username() {
            auth.arg(user);
        }
        match auth.arg(password).query::<()>(&mut c) {
            Err(e) => Some(e.to_string()),
            Ok(()) => None,
        }
    }

    /// Runs one call on the connection; drops the connection when the error leaves it out of
    /// step.
    fn call<T>(
        &mut self,
        f: impl FnOnce(&mut Connection) -> redis::RedisResult<T>,
    ) -> BrokerResult<T> {
        let r = f(self.conn()?);
        r.map_err(|e| {
            if !keeps_connection(&e) {
                self.conn = None;
            }
            map_err(&e, &self.shown)
        })
    }

    /// A call that may wait `block` on the server: the read timeout covers the wait.
    fn blocking<T>(
        &mut self,
        block: Duration,
        f: impl FnOnce(&mut Connection) -> redis::RedisResult<T>,
    ) -> BrokerResult<T> {
        if block.is_zero() {
            return self.call(f);
        }
        let timeout = self.timeout;
        self.call(|c| {
            c.set_read_timeout(Some(timeout + block))?;
            let r = f(c);
            // A failed reset leaves the longer timeout: harmless, and the next error resets.
            let _ = c.set_read_timeout(Some(timeout));
            r
        })
    }

    fn script<T: redis::FromRedisValue>(
        &mut self,
        inv: &redis::ScriptInvocation<'_>,
    ) -> BrokerResult<T> {
        self.call(|c| inv.invoke(c))
    }

    /// Reads up to `count` entries of `key` after `from`, waiting up to `block` for one:
    /// through a consumer group as `(group, consumer)` (XREADGROUP), or without (XREAD).
    fn read(
        &mut self,
        group: Option<(&str, &str)>,
        key: &str,
        from: &str,
        count: usize,
        block: Duration,
    ) -> BrokerResult<Vec<Entry>> {
        let v: Value = self.blocking(block, |c| {
            let mut cmd = match group {
                Some((group, consumer)) => {
                    let mut cmd = redis::cmd("XREADGROUP");
                    cmd.arg("GROUP").arg(group).arg(consumer);
                    cmd
                }
                None => redis::cmd("XREAD"),
            };
            cmd.arg("COUNT").arg(count);
            if !block.is_zero() {
                cmd.arg("BLOCK").arg(block_ms(block));
            }
            cmd.arg("STREAMS").arg(key).arg(from);
            cmd.query(c)
        })?;
        value::read_reply(v)
    }

    /// Acknowledges and deletes wake signs a fetch or a claim came across (a failure leaves
    /// them for the next one: they are never delivered as work).
    fn drop_wakes(&mut self, k: &Keys, ids: &[EntryId]) {
        if ids.is_empty() {
            return;
        }
        let _ = self.call(|c| {
            redis::pipe()
                .cmd("XACK")
                .arg(&k.work)
                .arg("mg")
                .arg(ids)
                .ignore()
                .cmd("XDEL")
                .arg(&k.work)
                .arg(ids)
                .ignore()
                .query::<()>(c)
        });
    }

    /// The eviction policy, from INFO memory or, where INFO is refused, CONFIG GET.
    fn eviction_policy(&mut self) -> BrokerResult<String> {
        let info: BrokerResult<String> =
            self.call(|c| redis::cmd("INFO").arg("memory").query::<String>(c));
        match info {
            Ok(info) => value::info_field(&info, "maxmemory_policy")
                .ok_or_else(|| BrokerError::Other("INFO memory has no maxmemory_policy".into())),
            Err(BrokerError::Auth(info_err)) => {
                let got: BrokerResult<Vec<String>> = self.call(|c| {
                    redis::cmd("CONFIG")
                        .arg("GET")
                        .arg("maxmemory-policy")
                        .query(c)
                });
                match got {
                    Ok(v) if v.len() >= 2 => Ok(v[1].clone()),
                    Ok(_) => Err(BrokerError::Other("CONFIG GET gave no policy".into())),
                    Err(BrokerError::Auth(_)) => Err(BrokerError::Auth(format!(
                        "cannot check the server's maxmemory-policy ({info_err}): the parent's \
                         user needs +info (ACL SETUSER <user> +info)"
                    ))),
                    Err(e) => Err(e),
                }
            }
            Err(e) => Err(e),
        }
    }

    fn live(
        &mut self,
        ann: Vec<(String, Announcement)>,
    ) -> BrokerResult<Vec<(String, Announcement)>> {
        if ann.is_empty() {
            return Ok(ann);
        }
        let ns = self.namespace.clone();
        let states: Vec<Option<String>> = self.call(|c| {
            let mut p = redis::pipe();
            for (_, a) in &ann {
                p.hget(Keys::new(&ns, &a.stage_run).ctl, "state");
            }
            p.query(c)
        })?;
        Ok(ann
            .into_iter()
            .zip(states)
            .filter(|(_, s)| s.as_deref() == Some("running"))
            .map(|(a, _)| a)
            .collect())
    }
}

fn announcements_of(entries: Vec<Entry>, pipeline: &str) -> Vec<(String, Announcement)> {
    entries
        .into_iter()
        .filter_map(|(id, f)| Some((id, announcement_of(&f?)?)))
        .filter(|(_, a)| a.stage_run.pipeline == pipeline)
        .collect()
}

impl Session for RedisSession {
    fn server_id(&mut self) -> BrokerResult<String> {
        let info: String = self.call(|c| redis::cmd("INFO").arg("server").query(c))?;
        value::info_field(&info, "run_id")
            .ok_or_else(|| BrokerError::Other("INFO server has no run_id".into()))
    }

    fn announce(&mut self, a: &Announcement) -> BrokerResult<()> {
        let policy = self.eviction_policy()?;
        if policy != "noeviction" {
            return Err(BrokerError::Unusable(format!(
                "the Redis server's maxmemory-policy is {policy}: under memory pressure it may \
                 evict a run's streams and lose its items; set `maxmemory-policy noeviction` \
                 (CONFIG SET maxmemory-policy noeviction, and in redis.conf), or use a server \
                 of its own for remote stages"
            )));
        }
        let k = self.keys(&a.stage_run);
        let fields = announcement_fields(a);
        let mut inv = scripts::announce().prepare_invoke();
        inv.key(&k.work).key(&k.out).key(&k.ctl);
        for (name, v) in &fields {
            inv.arg(*name).arg(&v[..]);
        }
        let recorded: Option<String> = self.script(&inv)?;
        if let Some(cursor) = recorded.filter(|c| value::is_entry_id(c)) {
            let there: Value = self.call(|c| {
                redis::cmd("XRANGE")
                    .arg(&k.runs)
                    .arg(&cursor)
                    .arg(&cursor)
                    .query(c)
            })?;
            if !value::range_reply(there)?.is_empty() {
                return Ok(());
            }
        }
        let cursor: String = self.call(|c| {
            let mut cmd = redis::cmd("XADD");
            cmd.arg(&k.runs)
                .arg("MAXLEN")
                .arg("~")
                .arg(RUNS_MAXLEN)
                .arg("*");
            for (name, v) in &fields {
                cmd.arg(*name).arg(&v[..]);
            }
            cmd.query(c)
        })?;
        self.call(|c| {
            redis::cmd("HSET")
                .arg(&k.ctl)
                .arg("ann")
                .arg(&cursor)
                .query::<()>(c)
        })
    }

    fn send(&mut self, run: &StageRun, entries: &[NewEntry]) -> BrokerResult<Vec<EntryId>> {
        if entries.is_empty() {
            return Ok(Vec::new());
        }
        // Plain pipelined XADDs, not a script (see `scripts`): NOMKSTREAM never recreates a
        // lost stream without its group, and answers nil instead. A call that fails part way
        // may have added some entries: the executor sends them again, and deduplicates.
        let k = self.keys(run);
        let ids: Vec<Option<String>> = self.call(|c| {
            let mut p = redis::pipe();
            for e in entries {
                p.cmd("XADD")
                    .arg(&k.work)
                    .arg("NOMKSTREAM")
                    .arg("*")
                    .arg("s")
                    .arg(e.first)
                    .arg("n")
                    .arg(e.count)
                    .arg("a")
                    .arg(e.attempts)
                    .arg("p")
                    .arg(&e.payload[..]);
            }
            p.query(c)
        })?;
        ids.into_iter()
            .map(|id| id.ok_or(BrokerError::NoRun))
            .collect()
    }

    fn read_out(
        &mut self,
        run: &StageRun,
        max: usize,
        block: Duration,
        own: bool,
    ) -> BrokerResult<Vec<OutEntry>> {
        if max == 0 {
            return Ok(Vec::new());
        }
        let k = self.keys(run);
        let block = if own { Duration::ZERO } else { block };
        let from = if own { "0" } else { ">" };
        Ok(self
            .read(Some(("parent", "parent")), &k.out, from, max, block)?
            .into_iter()
            .filter_map(out_entry)
            .collect())
    }

    fn ack_out(&mut self, run: &StageRun, ids: &[EntryId]) -> BrokerResult<()> {
        let ids: Vec<&EntryId> = ids.iter().filter(|i| value::is_entry_id(i)).collect();
        if ids.is_empty() {
            return Ok(());
        }
        let k = self.keys(run);
        let mut inv = scripts::ack_out().prepare_invoke();
        inv.key(&k.out).arg(&ids);
        self.script::<i64>(&inv).map(drop)
    }

    fn set_control(&mut self, run: &StageRun, c: Control) -> BrokerResult<()> {
        let k = self.keys(run);
        let mut inv = scripts::set_control().prepare_invoke();
        inv.key(&k.ctl).arg(control_name(c));
        self.script::<i64>(&inv).map(drop)
    }

    fn workers(&mut self, run: &StageRun) -> BrokerResult<Vec<WorkerInfo>> {
        let k = self.keys(run);
        let mut inv = scripts::workers().prepare_invoke();
        inv.key(&k.ctl).key(&k.workers);
        let v: Value = self.script(&inv)?;
        let mut it = value::items(v).into_iter();
        let now = it.next().as_ref().and_then(value::number).unwrap_or(0);
        let table = it.next().and_then(value::pairs).unwrap_or_default();
        let mut all: Vec<WorkerInfo> = table
            .into_iter()
            .filter_map(|(consumer, v)| {
                let v = String::from_utf8_lossy(&v).into_owned();
                let mut parts = v.splitn(4, ' ');
                let at: u64 = parts.next()?.parse().ok()?;
                let pid = parts.next()?.parse().ok()?;
                let concurrency = parts.next()?.parse().ok()?;
                Some(WorkerInfo {
                    consumer: String::from_utf8_lossy(&consumer).into_owned(),
                    host: parts.next().unwrap_or_default().to_string(),
                    pid,
                    concurrency,
                    since_heartbeat: Duration::from_millis(now.saturating_sub(at)),
                })
            })
            .collect();
        all.sort_by(|a, b| a.consumer.cmp(&b.consumer));
        Ok(all)
    }

    fn outstanding(&mut self, run: &StageRun) -> BrokerResult<Vec<(u64, u32)>> {
        let k = self.keys(run);
        let mut inv = scripts::outstanding().prepare_invoke();
        inv.key(&k.work).key(&k.ctl);
        let v: Vec<u64> = self.script(&inv)?;
        Ok(v.chunks(2)
            .filter_map(|p| match p {
                [s, n] => Some((*s, u32::try_from(*n).unwrap_or(u32::MAX))),
                _ => None,
            })
            .collect())
    }

    fn depth(&mut self, run: &StageRun) -> BrokerResult<(u64, u64)> {
        let k = self.keys(run);
        let mut inv = scripts::depth().prepare_invoke();
        inv.key(&k.work);
        let (len, pending): (u64, u64) = self.script(&inv)?;
        Ok((len, pending))
    }

    fn wake(&mut self, run: &StageRun, workers: usize) -> BrokerResult<()> {
        if workers == 0 {
            return Ok(());
        }
        // One entry per XADD: the server hands each to the next blocked reader, so every
        // waiting worker gets one; the fetch drops it (`is_wake`).
        let k = self.keys(run);
        self.call(|c| {
            let mut p = redis::pipe();
            for _ in 0..workers {
                p.cmd("XADD")
                    .arg(&k.work)
                    .arg("NOMKSTREAM")
                    .arg("*")
                    .arg("k")
                    .arg("wake")
                    .ignore();
            }
            p.query::<()>(c)
        })
    }

    fn cleanup(&mut self, run: &StageRun, keep: Option<Duration>) -> BrokerResult<()> {
        let k = self.keys(run);
        let cursor: Option<String> =
            self.call(|c| redis::cmd("HGET").arg(&k.ctl).arg("ann").query(c))?;
        if keep.is_some() {
            // Wake signs no worker read are the newest entries: kept keys hold only work.
            let newest: Value = self.call(|c| {
                redis::cmd("XREVRANGE")
                    .arg(&k.work)
                    .arg("+")
                    .arg("-")
                    .arg("COUNT")
                    .arg(256)
                    .query(c)
            })?;
            let wakes: Vec<EntryId> = value::range_reply(newest)?
                .into_iter()
                .filter(|(_, f)| f.as_deref().is_some_and(is_wake))
                .map(|(id, _)| id)
                .collect();
            if !wakes.is_empty() {
                self.call(|c| redis::cmd("XDEL").arg(&k.work).arg(&wakes).query::<()>(c))?;
            }
        }
        self.call(|c| {
            let mut p = redis::pipe();
            for key in k.run_keys() {
                match keep {
                    None => p.cmd("DEL").arg(key).ignore(),
                    Some(d) => p.cmd("EXPIRE").arg(key).arg(expire_secs(d)).ignore(),
                };
            }
            p.query::<()>(c)
        })?;
        if let Some(cursor) = cursor.filter(|c| value::is_entry_id(c)) {
            self.call(|c| redis::cmd("XDEL").arg(&k.runs).arg(&cursor).query::<()>(c))?;
        }
        Ok(())
    }

    fn announcements(
        &mut self,
        pipeline: &str,
        after: Option<&str>,
        block: Duration,
    ) -> BrokerResult<Vec<(String, Announcement)>> {
        let key = runs_key(&self.namespace, pipeline);
        if let Some(after) = after {
            let got = self.read(None, &key, after, 1000, block)?;
            return Ok(announcements_of(got, pipeline));
        }
        let all: Value =
            self.call(|c| redis::cmd("XRANGE").arg(&key).arg("-").arg("+").query(c))?;
        let all = value::range_reply(all)?;
        let last = all
            .last()
            .map_or_else(|| "0-0".to_string(), |(id, _)| id.clone());
        let live = self.live(announcements_of(all, pipeline))?;
        if !live.is_empty() || block.is_zero() {
            return Ok(live);
        }
        let next = announcements_of(self.read(None, &key, &last, 1000, block)?, pipeline);
        self.live(next)
    }

    fn control(&mut self, run: &StageRun) -> BrokerResult<Option<Control>> {
        let k = self.keys(run);
        let state: Option<String> =
            self.call(|c| redis::cmd("HGET").arg(&k.ctl).arg("state").query(c))?;
        state.as_deref().map(control_of).transpose()
    }

    fn register(&mut self, run: &StageRun, w: &WorkerInfo) -> BrokerResult<()> {
        let k = self.keys(run);
        let mut inv = scripts::register().prepare_invoke();
        inv.key(&k.ctl)
            .key(&k.workers)
            .arg(&w.consumer)
            .arg(w.pid)
            .arg(w.concurrency)
            .arg(&w.host);
        self.script::<i64>(&inv).map(drop)
    }

    fn unregister(&mut self, run: &StageRun, consumer: &str) -> BrokerResult<()> {
        let k = self.keys(run);
        self.call(|c| {
            redis::cmd("HDEL")
                .arg(&k.workers)
                .arg(consumer)
                .query::<()>(c)
        })
    }

    fn fetch(
        &mut self,
        run: &StageRun,
        consumer: &str,
        count: usize,
        block: Duration,
        own: bool,
    ) -> BrokerResult<Vec<Delivery>> {
        if count == 0 {
            return Ok(Vec::new());
        }
        let k = self.keys(run);
        if own {
            let mut inv = scripts::own().prepare_invoke();
            inv.key(&k.work).arg(consumer).arg(count);
            let v: Value = self.script(&inv)?;
            let (got, wakes) = deliveries(v)?;
            self.drop_wakes(&k, &wakes);
            return Ok(got);
        }
        let mut wakes = Vec::new();
        let got = self
            .read(Some(("mg", consumer)), &k.work, ">", count, block)?
            .into_iter()
            .filter_map(|(id, fields)| {
                let fields = fields?;
                if is_wake(&fields) {
                    wakes.push(id);
                    return None;
                }
                Some(Delivery {
                    id,
                    entry: new_entry(&fields),
                    deliveries: 1,
                })
            })
            .collect();
        self.drop_wakes(&k, &wakes);
        Ok(got)
    }

    fn commit_many(
        &mut self,
        run: &StageRun,
        consumer: &str,
        done: &[(&EntryId, &[u8])],
    ) -> BrokerResult<Vec<Commit>> {
        let mut out = vec![Commit::LeaseLost; done.len()];
        // The entries to commit, ascending by id (the script's range), with their place.
        let mut asked: Vec<((u64, u64), usize)> = done
            .iter()
            .enumerate()
            .filter_map(|(i, (id, _))| Some((value::entry_id_parts(id)?, i)))
            .collect();
        asked.sort_unstable();
        let k = self.keys(run);
        // All or nothing per call: if the consumer lost some, the script does nothing and
        // says which; the rest are committed by the next call (ownership only shrinks, so
        // this ends).
        while !asked.is_empty() {
            let results: Vec<u8> = asked
                .iter()
                .flat_map(|&(_, i)| done[i].1)
                .copied()
                .collect();
            let mut inv = scripts::commit().prepare_invoke();
            inv.key(&k.work).key(&k.out).arg(consumer).arg(results);
            for &(_, i) in &asked {
                inv.arg(done[i].0);
            }
            let held: Vec<i64> = self.script(&inv)?;
            if held.len() != asked.len() {
                return Err(BrokerError::Other("unexpected commit reply".into()));
            }
            if held.iter().all(|&h| h == 1) {
                for &(_, i) in &asked {
                    out[i] = Commit::Committed;
                }
                break;
            }
            asked = asked
                .into_iter()
                .zip(held)
                .filter_map(|(a, h)| (h == 1).then_some(a))
                .collect();
        }
        Ok(out)
    }

    fn heartbeat(
        &mut self,
        run: &StageRun,
        consumer: &str,
        ids: &[EntryId],
    ) -> BrokerResult<Vec<EntryId>> {
        let ids: Vec<&EntryId> = ids.iter().filter(|i| value::is_entry_id(i)).collect();
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let k = self.keys(run);
        let mut inv = scripts::heartbeat().prepare_invoke();
        inv.key(&k.work).arg(consumer).arg(&ids);
        self.script(&inv)
    }

    fn pending_idle(
        &mut self,
        run: &StageRun,
        min_idle: Duration,
        count: usize,
    ) -> BrokerResult<Vec<Pending>> {
        if count == 0 {
            return Ok(Vec::new());
        }
        let k = self.keys(run);
        let mut inv = scripts::pending_idle().prepare_invoke();
        inv.key(&k.work).arg(ms(min_idle)).arg(count);
        let v: Value = self.script(&inv)?;
        let mut wakes = Vec::new();
        let got = value::items(v)
            .into_iter()
            .filter_map(|p| {
                let mut p = value::items(p).into_iter();
                let id = value::text(&p.next()?)?;
                let owner = value::text(&p.next()?)?;
                let idle = Duration::from_millis(value::number(&p.next()?)?);
                let deliveries = u32::try_from(value::number(&p.next()?)?).ok()?;
                let fields = p.next().and_then(value::pairs);
                if fields.as_deref().is_some_and(is_wake) {
                    // Its worker was lost before it dropped it: it is no work to reclaim.
                    wakes.push(id);
                    return None;
                }
                Some(Pending {
                    id,
                    owner,
                    idle,
                    deliveries,
                    entry: fields.map(|f| new_entry(&f)),
                })
            })
            .collect();
        self.drop_wakes(&k, &wakes);
        Ok(got)
    }

    fn claim(
        &mut self,
        run: &StageRun,
        consumer: &str,
        min_idle: Duration,
        ids: &[EntryId],
    ) -> BrokerResult<Vec<Delivery>> {
        let ids: Vec<&EntryId> = ids.iter().filter(|i| value::is_entry_id(i)).collect();
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let k = self.keys(run);
        let mut inv = scripts::claim().prepare_invoke();
        inv.key(&k.work).arg(consumer).arg(ms(min_idle)).arg(&ids);
        let v: Value = self.script(&inv)?;
        let (got, wakes) = deliveries(v)?;
        self.drop_wakes(&k, &wakes);
        Ok(got)
    }

    fn dead_letter(
        &mut self,
        run: &StageRun,
        id: &EntryId,
        min_idle: Duration,
        results: &[u8],
    ) -> BrokerResult<bool> {
        if !value::is_entry_id(id) {
            return Ok(false);
        }
        let k = self.keys(run);
        let mut inv = scripts::dead_letter().prepare_invoke();
        inv.key(&k.work)
            .key(&k.out)
            .key(&k.dlq)
            .arg(id)
            .arg(ms(min_idle))
            .arg(results)
            .arg(DLQ_MAXLEN);
        let done: i64 = self.script(&inv)?;
        Ok(done == 1)
    }

    fn split(
        &mut self,
        run: &StageRun,
        consumer: &str,
        id: &EntryId,
        parts: &[NewEntry],
    ) -> BrokerResult<bool> {
        if !value::is_entry_id(id) {
            return Ok(false);
        }
        let k = self.keys(run);
        let mut inv = scripts::split().prepare_invoke();
        inv.key(&k.work).arg(consumer).arg(id);
        encode_entries(&mut inv, parts);
        let done: i64 = self.script(&inv)?;
        Ok(done == 1)
    }

    fn release(
        &mut self,
        run: &StageRun,
        consumer: &str,
        ids: &[(EntryId, u32)],
        claim_idle: Duration,
    ) -> BrokerResult<()> {
        // The server knows each entry's delivery count; the caller's copy is not needed.
        let ids: Vec<&EntryId> = ids
            .iter()
            .map(|(i, _)| i)
            .filter(|i| value::is_entry_id(i))
            .collect();
        if ids.is_empty() {
            return Ok(());
        }
        let k = self.keys(run);
        let mut inv = scripts::release().prepare_invoke();
        inv.key(&k.work).arg(consumer).arg(ms(claim_idle)).arg(&ids);
        self.script::<i64>(&inv).map(drop)
    }

    fn finished(&mut self, run: &StageRun, consumer: &str, outputs: &[u8]) -> BrokerResult<()> {
        let k = self.keys(run);
        let mut inv = scripts::finished().prepare_invoke();
        inv.key(&k.out).key(&k.ctl).arg(consumer).arg(outputs);
        self.script::<i64>(&inv).map(drop)
    }

    fn stats(&mut self, run: &StageRun, consumer: &str, payload: &[u8]) -> BrokerResult<()> {
        let k = self.keys(run);
        let mut inv = scripts::stats().prepare_invoke();
        inv.key(&k.out).key(&k.ctl).arg(consumer).arg(payload);
        self.script::<i64>(&inv).map(drop)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The names the scripts write for each kind.
    fn kind_name(k: OutKind) -> &'static str {
        match k {
            OutKind::Results => "results",
            OutKind::Stats => "stats",
            OutKind::Finished => "finished",
        }
    }

    #[test]
    fn out_kinds_read_back_as_written() {
        for kind in [OutKind::Results, OutKind::Stats, OutKind::Finished] {
            let fields = vec![
                (b"k".to_vec(), kind_name(kind).as_bytes().to_vec()),
                (b"c".to_vec(), b"w".to_vec()),
                (b"p".to_vec(), vec![0, 0xff]),
            ];
            let e = out_entry(("1-0".into(), Some(fields))).expect("entry");
            assert_eq!((e.kind, e.consumer.as_str()), (kind, "w"));
            assert_eq!(e.payload, vec![0, 0xff]);
        }
    }

    #[test]
    fn block_times_round_up_and_never_reach_zero() {
        assert_eq!(block_ms(Duration::from_micros(1)), 1);
        assert_eq!(block_ms(Duration::from_micros(1500)), 2);
        assert_eq!(block_ms(Duration::from_millis(500)), 500);
    }
}
