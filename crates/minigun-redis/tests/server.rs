//! The Redis broker against a real server: credentials, ACL users, TLS, the eviction check,
//! script reloads, restarts, pauses and lost replies.

use minigun::remote::broker::{Announcement, Commit, NewEntry, OutKind, StageRun, WorkerInfo};
use minigun::remote::{Broker, BrokerError, Session};
use minigun_redis::testing::{Fsync, RedisServer, ServerOptions};
use minigun_redis::RedisBroker;
use std::time::{Duration, Instant};

const IDLE: Duration = Duration::from_millis(100);

fn stage_run(name: &str) -> StageRun {
    StageRun {
        pipeline: "redis-tests".into(),
        run: name.into(),
        stage: "stage".into(),
    }
}

fn announcement(r: &StageRun) -> Announcement {
    Announcement {
        stage_run: r.clone(),
        fingerprint: "f".into(),
        fingerprint_text: "f".into(),
        claim_idle: IDLE,
        max_deliveries: 3,
    }
}

fn entry(first: u64, payload: Vec<u8>) -> NewEntry {
    NewEntry {
        first,
        count: 1,
        attempts: 0,
        payload,
    }
}

fn session(b: &RedisBroker) -> Box<dyn Session> {
    b.session().expect("session")
}

/// A session, and a run of `name` it announced.
fn announced(b: &RedisBroker, name: &str) -> (Box<dyn Session>, StageRun) {
    let mut s = session(b);
    let r = stage_run(name);
    s.announce(&announcement(&r)).expect("announce");
    (s, r)
}

/// Calls `f` until it answers something other than `Unavailable`, at most `tries` times:
/// the first call after a server restart finds its connection closed.
fn after_reconnect<T>(
    tries: u32,
    mut f: impl FnMut() -> Result<T, BrokerError>,
) -> Result<T, BrokerError> {
    let mut last = f();
    for _ in 1..tries {
        match last {
            Err(BrokerError::Unavailable(_)) => last = f(),
            _ => break,
        }
    }
    last
}

#[test]
fn a_wrong_password_is_an_auth_error_that_says_so() {
    let Some(server) = RedisServer::start_or_skip() else {
        return;
    };
    let url = format!("redis://default:wrong@127.0.0.1:{}/0", server.port());
    match server.broker_for(&url).session() {
        Err(BrokerError::Auth(msg)) => {
            assert!(
                msg.contains("WRONGPASS") || msg.contains("invalid username-password"),
                "the server's words are in the message: {msg}"
            );
        }
        other => panic!(
            "expected an Auth error, got {:?}",
            other.map(|_| "a session")
        ),
    }
    let url = format!("redis://127.0.0.1:{}/0", server.port());
    let mut s = session(&server.broker_for(&url));
    match s.control(&stage_run("noauth")) {
        Err(BrokerError::Auth(msg)) => assert!(msg.contains("NOAUTH"), "{msg}"),
        other => panic!("expected NOAUTH as an Auth error, got {other:?}"),
    }
}

const WORKER_RULES: &str = "on >worker-pass ~mg:* +@stream +@hash +@connection +evalsha \
                            +script|load +time -@dangerous -xgroup -xtrim -xsetid";
const PARENT_RULES: &str = "on >parent-pass ~mg:* +@stream +@hash +@connection +evalsha \
                            +script|load +time +del +expire -@dangerous +info";

#[test]
fn acl_users_with_the_documented_rules_run_their_calls_and_nothing_else() {
    let Some(server) = RedisServer::start_with_or_skip(ServerOptions {
        users: vec![
            ("mg-worker".into(), WORKER_RULES.into()),
            ("mg-parent".into(), PARENT_RULES.into()),
            (
                "mg-timeless".into(),
                WORKER_RULES
                    .replace("worker-pass", "timeless-pass")
                    .replace(" +time", ""),
            ),
        ],
        ..ServerOptions::default()
    }) else {
        return;
    };
    let parent_b = server.broker_for(&server.url_for("mg-parent", "parent-pass"));
    let worker_b = server.broker_for(&server.url_for("mg-worker", "worker-pass"));
    let mut p = session(&parent_b);
    let mut w = session(&worker_b);
    let r = stage_run("acl");

    // The parent's side.
    assert!(!p.server_id().expect("server_id").is_empty());
    p.announce(&announcement(&r)).expect("announce");
    p.send(
        &r,
        &[
            entry(0, b"a".to_vec()),
            entry(1, b"b".to_vec()),
            entry(2, b"c".to_vec()),
        ],
    )
    .expect("send");

    // Every worker-side call.
    let ann = w
        .announcements("redis-tests", None, Duration::from_millis(100))
        .expect("announcements");
    assert_eq!(ann.len(), 1);
    assert_eq!(ann[0].1.stage_run, r);
    assert_eq!(
        w.control(&r).expect("control"),
        Some(minigun::remote::broker::Control::Running)
    );
    let me = WorkerInfo {
        consumer: "w1".into(),
        host: "host one".into(),
        pid: 42,
        concurrency: 2,
        since_heartbeat: Duration::ZERO,
    };
    w.register(&r, &me).expect("register");
    let got = w
        .fetch(&r, "w1", 3, Duration::from_millis(100), false)
        .expect("fetch");
    assert_eq!(got.len(), 3);
    assert_eq!(
        w.fetch(&r, "w1", 10, Duration::ZERO, true)
            .expect("fetch own")
            .len(),
        3
    );
    assert_eq!(
        w.heartbeat(&r, "w1", &[got[0].id.clone()])
            .expect("heartbeat"),
        vec![got[0].id.clone()]
    );
    assert_eq!(
        w.commit(&r, "w1", &got[0].id, b"r0").expect("commit"),
        Commit::Committed
    );
    assert!(w
        .split(&r, "w1", &got[1].id, &[entry(1, b"b".to_vec())])
        .expect("split"));
    w.release(&r, "w1", &[(got[2].id.clone(), 1)], IDLE)
        .expect("release");
    let idle = w.pending_idle(&r, IDLE, 10).expect("pending_idle");
    assert_eq!(idle.len(), 1);
    let taken = w
        .claim(&r, "w2", IDLE, &[got[2].id.clone()])
        .expect("claim");
    assert_eq!(taken.len(), 1);
    std::thread::sleep(IDLE + Duration::from_millis(20));
    assert!(w
        .dead_letter(&r, &got[2].id, IDLE, b"dead")
        .expect("dead_letter"));
    p.wake(&r, 1).expect("wake");
    let after_wake = w
        .fetch(&r, "w1", 10, Duration::from_millis(100), false)
        .expect("a fetch drops a wake");
    assert!(
        after_wake
            .iter()
            .all(|d| d.entry == entry(1, b"b".to_vec())),
        "only the split's part is work: {after_wake:?}"
    );
    w.stats(&r, "w1", b"stats").expect("stats");
    w.finished(&r, "w1", b"fin").expect("finished");
    w.unregister(&r, "w1").expect("unregister");

    // What the worker may not do.
    let mut raw = redis::Client::open(server.url_for("mg-worker", "worker-pass"))
        .expect("client")
        .get_connection()
        .expect("connect");
    let flush = redis::cmd("FLUSHALL")
        .query::<()>(&mut raw)
        .expect_err("FLUSHALL refused");
    assert_eq!(flush.code(), Some("NOPERM"), "{flush}");
    let destroy = redis::cmd("XGROUP")
        .arg("DESTROY")
        .arg(parent_b.keys(&r).work)
        .arg("mg")
        .query::<i64>(&mut raw)
        .expect_err("XGROUP DESTROY refused");
    assert_eq!(destroy.code(), Some("NOPERM"), "{destroy}");
    match w.server_id() {
        Err(BrokerError::Auth(msg)) => assert!(msg.contains("no permissions"), "{msg}"),
        other => panic!("a worker may not read INFO: {other:?}"),
    }
    match w.cleanup(&r, None) {
        Err(BrokerError::Auth(_)) => {}
        other => panic!("a worker may not delete a run: {other:?}"),
    }

    // TIME is in none of the categories granted: without +time a worker cannot register.
    let timeless = server.broker_for(&server.url_for("mg-timeless", "timeless-pass"));
    match session(&timeless).register(&r, &me) {
        Err(BrokerError::Auth(msg)) => assert!(msg.contains("can't run"), "{msg}"),
        other => panic!("TIME needs +time: {other:?}"),
    }

    // The parent reads what the worker published, and cleans up.
    let out = p
        .read_out(&r, 10, Duration::from_millis(100), false)
        .expect("read_out");
    let kinds: Vec<OutKind> = out.iter().map(|o| o.kind).collect();
    assert_eq!(
        kinds,
        vec![
            OutKind::Results,
            OutKind::Results,
            OutKind::Stats,
            OutKind::Finished
        ]
    );
    let ids: Vec<String> = out.iter().map(|o| o.id.clone()).collect();
    p.ack_out(&r, &ids).expect("ack_out");
    assert_eq!(p.workers(&r).expect("workers"), vec![]);
    p.cleanup(&r, None).expect("cleanup");
    assert_eq!(p.control(&r).expect("control"), None);
}

#[test]
fn tls_with_a_self_signed_ca_works_and_is_refused_without_it() {
    let Some(server) = RedisServer::start_with_or_skip(ServerOptions {
        tls: true,
        ..ServerOptions::default()
    }) else {
        return;
    };
    assert!(server.url().starts_with("rediss://"));
    let b = server.broker();
    let mut s = session(&b);
    assert!(!s.server_id().expect("server_id over TLS").is_empty());
    let r = stage_run("tls");
    s.announce(&announcement(&r)).expect("announce");
    s.send(&r, &[entry(0, vec![0, 1, 2])]).expect("send");
    let got = s
        .fetch(&r, "a", 1, Duration::from_millis(200), false)
        .expect("fetch");
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].entry.payload, vec![0, 1, 2]);

    let untrusted = RedisBroker::from_url(&server.url())
        .expect("broker")
        .timeout(Duration::from_secs(2));
    match untrusted.session() {
        Err(BrokerError::Unusable(msg) | BrokerError::Unavailable(msg)) => {
            assert!(msg.contains("certificate") || msg.contains("TLS"), "{msg}")
        }
        other => panic!(
            "a server certificate from an unknown CA must be refused, got {:?}",
            other.map(|_| "a session")
        ),
    }
}

#[test]
fn an_evicting_memory_policy_is_refused_with_the_fix() {
    let Some(server) = RedisServer::start_or_skip() else {
        return;
    };
    let mut admin = server.admin();
    redis::cmd("CONFIG")
        .arg("SET")
        .arg("maxmemory-policy")
        .arg("allkeys-lru")
        .query::<()>(&mut admin)
        .expect("CONFIG SET");
    let mut s = session(&server.broker());
    let r = stage_run("evicting");
    match s.announce(&announcement(&r)) {
        Err(BrokerError::Unusable(msg)) => {
            assert!(msg.contains("allkeys-lru"), "names the policy: {msg}");
            assert!(msg.contains("noeviction"), "says the fix: {msg}");
        }
        other => panic!("expected Unusable, got {other:?}"),
    }
    assert_eq!(s.control(&r).expect("control"), None, "nothing was created");
    redis::cmd("CONFIG")
        .arg("SET")
        .arg("maxmemory-policy")
        .arg("noeviction")
        .query::<()>(&mut admin)
        .expect("CONFIG SET");
    s.announce(&announcement(&r))
        .expect("announce under noeviction");
}

#[test]
fn a_script_flush_between_two_commits_reloads_the_script() {
    let Some(server) = RedisServer::start_or_skip() else {
        return;
    };
    let (mut s, r) = announced(&server.broker(), "script-flush");
    s.send(&r, &[entry(0, b"a".to_vec()), entry(1, b"b".to_vec())])
        .expect("send");
    let got = s
        .fetch(&r, "a", 2, Duration::from_millis(200), false)
        .expect("fetch");
    assert_eq!(
        s.commit(&r, "a", &got[0].id, b"r0").expect("commit"),
        Commit::Committed
    );
    let mut admin = server.admin();
    redis::cmd("SCRIPT")
        .arg("FLUSH")
        .query::<()>(&mut admin)
        .expect("SCRIPT FLUSH");
    let cached: Vec<bool> = redis::cmd("SCRIPT")
        .arg("EXISTS")
        .arg(redis::Script::new("return 1").get_hash())
        .query(&mut admin)
        .expect("SCRIPT EXISTS");
    assert_eq!(cached, vec![false]);
    assert_eq!(
        s.commit(&r, "a", &got[1].id, b"r1")
            .expect("commit after flush"),
        Commit::Committed
    );
    let out = s
        .read_out(&r, 10, Duration::from_millis(200), false)
        .expect("read_out");
    let payloads: Vec<&[u8]> = out.iter().map(|o| o.payload.as_slice()).collect();
    assert_eq!(payloads, vec![&b"r0"[..], &b"r1"[..]]);
}

#[test]
fn binary_payloads_pass_every_path_unchanged() {
    let Some(server) = RedisServer::start_or_skip() else {
        return;
    };
    let mut s = session(&server.broker());
    let r = stage_run("binary");
    let bytes: Vec<u8> = (0..=255u8).chain([0xff, 0xfe, 0, 0xc3]).collect();
    s.announce(&announcement(&r)).expect("announce");
    s.send(&r, &[entry(7, bytes.clone()), entry(8, bytes.clone())])
        .expect("send");
    let got = s
        .fetch(&r, "a", 2, Duration::from_millis(200), false)
        .expect("fetch");
    assert_eq!(got[0].entry, entry(7, bytes.clone()));
    assert_eq!(
        s.commit(&r, "a", &got[0].id, &bytes).expect("commit"),
        Commit::Committed
    );
    std::thread::sleep(IDLE + Duration::from_millis(20));
    let idle = s.pending_idle(&r, IDLE, 10).expect("pending_idle");
    assert_eq!(idle[0].entry, Some(entry(8, bytes.clone())));
    assert!(s
        .dead_letter(&r, &got[1].id, IDLE, &bytes)
        .expect("dead_letter"));
    let out = s
        .read_out(&r, 10, Duration::from_millis(200), false)
        .expect("read_out");
    assert_eq!(out.len(), 2);
    assert!(out.iter().all(|o| o.payload == bytes));
    // The dead letter keeps the entry's fields, its deliveries and its last owner.
    let mut admin = server.admin();
    let dlq: redis::streams::StreamRangeReply = redis::cmd("XRANGE")
        .arg(server.broker().keys(&r).dlq)
        .arg("-")
        .arg("+")
        .query(&mut admin)
        .expect("XRANGE dlq");
    assert_eq!(dlq.ids.len(), 1);
    let d = &dlq.ids[0];
    let field = |k: &str| match d.map.get(k) {
        Some(redis::Value::BulkString(b)) => b.clone(),
        other => panic!("field {k}: {other:?}"),
    };
    assert_eq!(field("p"), bytes);
    assert_eq!(field("s"), b"8");
    assert_eq!(field("d"), b"1");
    assert_eq!(field("o"), b"a");
}

#[test]
fn server_id_changes_across_a_restart_and_aof_keeps_the_run() {
    let Some(mut server) = RedisServer::start_with_or_skip(ServerOptions {
        aof: Some(Fsync::Always),
        ..ServerOptions::default()
    }) else {
        return;
    };
    let b = server.broker();
    let mut s = session(&b);
    let before = s.server_id().expect("server_id");
    let r = stage_run("aof");
    s.announce(&announcement(&r)).expect("announce");
    s.send(&r, &[entry(0, b"a".to_vec())]).expect("send");
    server.restart();
    let after = after_reconnect(3, || s.server_id()).expect("server_id after restart");
    assert_ne!(before, after, "a restarted server has a new run_id");
    assert_eq!(
        s.outstanding(&r).expect("outstanding"),
        vec![(0, 1)],
        "the AOF kept the work"
    );
    assert_eq!(
        s.fetch(&r, "a", 1, Duration::from_millis(200), false)
            .expect("fetch")
            .len(),
        1
    );
}

#[test]
fn a_restart_without_persistence_answers_no_run_promptly() {
    let Some(mut server) = RedisServer::start_or_skip() else {
        return;
    };
    let b = server.broker();
    let mut parent = session(&b);
    let mut worker = session(&b);
    let r = stage_run("lost");
    parent.announce(&announcement(&r)).expect("announce");
    parent.send(&r, &[entry(0, b"a".to_vec())]).expect("send");
    let got = worker
        .fetch(&r, "w", 1, Duration::from_millis(200), false)
        .expect("fetch");
    server.restart();
    let started = Instant::now();
    let fetch = after_reconnect(3, || {
        worker.fetch(&r, "w", 1, Duration::from_millis(200), false)
    });
    assert_eq!(fetch.expect_err("the run is gone"), BrokerError::NoRun);
    assert_eq!(
        worker.commit(&r, "w", &got[0].id, b"x"),
        Err(BrokerError::NoRun)
    );
    assert_eq!(
        worker.heartbeat(&r, "w", &[got[0].id.clone()]),
        Err(BrokerError::NoRun)
    );
    assert_eq!(
        worker.fetch(&r, "w", 1, Duration::ZERO, true),
        Err(BrokerError::NoRun)
    );
    assert_eq!(worker.stats(&r, "w", b"s"), Err(BrokerError::NoRun));
    assert_eq!(worker.control(&r), Ok(None));
    let send = after_reconnect(3, || parent.send(&r, &[entry(1, b"b".to_vec())]));
    assert_eq!(
        send,
        Err(BrokerError::NoRun),
        "a send does not recreate a stream without its group"
    );
    assert!(started.elapsed() < Duration::from_secs(5), "no call hung");
    // The parent recreates the run; the work is found again from id 0.
    parent.announce(&announcement(&r)).expect("announce again");
    parent
        .send(&r, &[entry(0, b"a".to_vec())])
        .expect("send again");
    let again = worker
        .fetch(&r, "w", 1, Duration::from_millis(200), false)
        .expect("fetch");
    assert_eq!(again.len(), 1);
}

#[test]
fn a_lost_fetch_reply_is_found_again_in_the_own_pending_list() {
    let Some(server) = RedisServer::start_or_skip() else {
        return;
    };
    let (mut parent, r) = announced(&server.broker(), "lost-reply");
    parent.send(&r, &[entry(0, b"a".to_vec())]).expect("send");
    let short = server
        .broker_for(&server.url())
        .timeout(Duration::from_millis(300));
    let mut w = session(&short);
    // The server is stopped while the fetch is on its way: the client gives up, and the
    // server delivers the entry once it runs again, to a reader that is gone.
    server.pause();
    let started = Instant::now();
    let lost = w.fetch(&r, "w", 1, Duration::ZERO, false);
    let waited = started.elapsed();
    server.resume();
    assert!(matches!(lost, Err(BrokerError::Unavailable(_))), "{lost:?}");
    assert!(
        waited < Duration::from_secs(2),
        "the timeout held: {waited:?}"
    );
    let deadline = Instant::now() + Duration::from_secs(5);
    let own = loop {
        let own = w
            .fetch(&r, "w", 10, Duration::ZERO, true)
            .expect("fetch own");
        if !own.is_empty() || Instant::now() > deadline {
            break own;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(
        own.len(),
        1,
        "the delivered entry is in the consumer's pending list"
    );
    assert_eq!((own[0].entry.first, own[0].deliveries), (0, 1));
    let fresh = w
        .fetch(&r, "w", 10, Duration::from_millis(50), false)
        .expect("fetch");
    assert!(fresh.is_empty(), "it is never delivered as new again");
    assert_eq!(
        w.commit(&r, "w", &own[0].id, b"r").expect("commit"),
        Commit::Committed
    );
}

#[test]
fn a_release_keeps_the_server_s_delivery_count_and_a_namespace_prefixes_every_key() {
    let Some(server) = RedisServer::start_or_skip() else {
        return;
    };
    let b = server.broker().namespace("tenant");
    let (mut s, r) = announced(&b, "namespace");
    s.send(&r, &[entry(0, b"a".to_vec())]).expect("send");
    let d = s
        .fetch(&r, "a", 1, Duration::from_millis(200), false)
        .expect("fetch")
        .remove(0);
    std::thread::sleep(IDLE + Duration::from_millis(20));
    let taken = s
        .claim(&r, "b", IDLE, std::slice::from_ref(&d.id))
        .expect("claim");
    assert_eq!(taken[0].deliveries, 2);
    // A stale count from the caller does not lower the server's.
    s.release(&r, "b", &[(d.id.clone(), 1)], IDLE)
        .expect("release");
    let again = s
        .claim(&r, "c", IDLE, std::slice::from_ref(&d.id))
        .expect("claim");
    assert_eq!(again[0].deliveries, 2, "the release counted no delivery");

    let mut admin = server.admin();
    let mut keys: Vec<String> = redis::cmd("KEYS").arg("*").query(&mut admin).expect("KEYS");
    keys.sort();
    assert_eq!(
        keys,
        vec![
            "tenant:{redis-tests:namespace}:stage:ctl",
            "tenant:{redis-tests:namespace}:stage:in",
            "tenant:{redis-tests:namespace}:stage:out",
            "tenant:{redis-tests}:runs",
        ]
    );
    s.cleanup(&r, None).expect("cleanup");
    let left: Vec<String> = redis::cmd("KEYS")
        .arg("tenant:{redis-tests:*")
        .query(&mut admin)
        .expect("KEYS");
    assert!(left.is_empty(), "cleanup removes the run's keys: {left:?}");
    let runs: u64 = redis::cmd("XLEN")
        .arg("tenant:{redis-tests}:runs")
        .query(&mut admin)
        .expect("XLEN");
    assert_eq!(runs, 0, "and its announcement");
}

#[test]
fn a_blocking_read_longer_than_the_timeout_waits_its_block_time() {
    let Some(server) = RedisServer::start_or_skip() else {
        return;
    };
    let short = server
        .broker_for(&server.url())
        .timeout(Duration::from_millis(200));
    let (mut s, r) = announced(&short, "block");
    let started = Instant::now();
    let got = s
        .fetch(&r, "w", 1, Duration::from_millis(500), false)
        .expect("a block past the timeout is no timeout");
    let waited = started.elapsed();
    assert!(got.is_empty());
    assert!(
        waited >= Duration::from_millis(450),
        "it blocked: {waited:?}"
    );
    let out = s
        .read_out(&r, 10, Duration::from_millis(400), false)
        .expect("read_out blocks as long");
    assert!(out.is_empty());
    let ann = s
        .announcements("redis-tests", Some("0-0"), Duration::from_millis(400))
        .expect("announcements after a cursor");
    assert_eq!(ann.len(), 1, "the run's own announcement is after 0-0");
}

#[test]
fn a_wake_ends_a_blocked_fetch_and_kept_keys_hold_no_wake() {
    let Some(server) = RedisServer::start_or_skip() else {
        return;
    };
    let b = server.broker();
    let (mut p, r) = announced(&b, "wake");
    let block = Duration::from_secs(20);
    let (fetched, waited) = std::thread::scope(|s| {
        let waiting = s.spawn(|| {
            let mut w = session(&b);
            let t0 = Instant::now();
            let got = w.fetch(&r, "w", 10, block, false).expect("fetch");
            (got, t0.elapsed())
        });
        // Wake until the blocked fetch has taken one (it may not be blocked yet at first).
        while !waiting.is_finished() {
            p.wake(&r, 1).expect("wake");
            std::thread::sleep(Duration::from_millis(100));
        }
        waiting.join().expect("fetcher")
    });
    assert!(fetched.is_empty(), "a wake is no work: {fetched:?}");
    assert!(
        waited < block,
        "the wake ended the fetch ({waited:?} of {block:?})"
    );
    // Wakes no one read are removed when the run's keys are kept.
    p.wake(&r, 3).expect("wake");
    p.cleanup(&r, Some(Duration::from_secs(60)))
        .expect("cleanup");
    let len: u64 = redis::cmd("XLEN")
        .arg(b.keys(&r).work)
        .query(&mut server.admin())
        .expect("XLEN");
    assert_eq!(len, 0, "the kept work stream holds no wake");
}
