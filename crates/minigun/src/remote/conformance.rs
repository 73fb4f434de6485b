//! The conformance suite every [`Broker`] must pass: the ownership rule and the stream
//! semantics the remote executor relies on (see [`broker`](super::broker)). It runs against
//! the in-memory broker in this crate's tests and against each real backend in its own crate.
//!
//! `age` must make at least the given time pass for the broker's idle clock (sleep for a real
//! server; [`MemoryBroker::advance`](super::MemoryBroker::advance) in memory). Each check
//! uses its own run, so a failed check names itself and leaves the others valid.

use super::broker::*;
use std::time::Duration;

/// Idle time used by the lease checks.
const IDLE: Duration = Duration::from_millis(200);

fn run(name: &str) -> StageRun {
    StageRun {
        pipeline: "conformance".into(),
        run: format!("{name}-{}-{}", std::process::id(), nanos()),
        stage: "stage".into(),
    }
}

fn nanos() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos())
}

fn announce(s: &mut dyn Session, r: &StageRun) {
    let a = Announcement {
        stage_run: r.clone(),
        fingerprint: "f".into(),
        fingerprint_text: "f".into(),
        claim_idle: IDLE,
        max_deliveries: 3,
    };
    s.announce(&a).expect("announce");
}

fn entry(first: u64, count: u32) -> NewEntry {
    NewEntry {
        first,
        count,
        attempts: 0,
        payload: format!("items {first}+{count}").into_bytes(),
    }
}

fn fetch1(s: &mut dyn Session, r: &StageRun, consumer: &str) -> Delivery {
    let got = s
        .fetch(r, consumer, 1, Duration::from_millis(500), false)
        .expect("fetch");
    assert_eq!(got.len(), 1, "{consumer} should get one entry");
    got.into_iter().next().expect("one")
}

fn out(s: &mut dyn Session, r: &StageRun) -> Vec<OutEntry> {
    let got = s
        .read_out(r, 100, Duration::from_millis(200), false)
        .expect("read_out");
    let ids: Vec<EntryId> = got.iter().map(|e| e.id.clone()).collect();
    s.ack_out(r, &ids).expect("ack_out");
    got
}

/// Runs every check; panics with the name of the first that fails.
pub fn run_all(broker: &dyn Broker, age: &dyn Fn(Duration)) {
    round_trip(broker);
    commit_needs_the_lease(broker, age);
    commit_many_publishes_only_owned_entries(broker, age);
    commit_many_of_hundreds_of_entries(broker);
    heartbeat_keeps_the_lease(broker, age);
    release_counts_no_delivery(broker);
    dead_letter_rechecks_idle(broker, age);
    split_replaces_an_owned_entry(broker, age);
    own_entries_are_found_again(broker);
    control_workers_and_cleanup(broker);
    announcements_by_cursor(broker);
    wake_delivers_no_work(broker, age);
}

fn session(b: &dyn Broker) -> Box<dyn Session> {
    b.session().expect("session")
}

/// Entries go out in order, are delivered once, and a commit publishes and removes.
pub fn round_trip(b: &dyn Broker) {
    let mut s = session(b);
    let r = run("round_trip");
    announce(&mut *s, &r);
    let ids = s.send(&r, &[entry(0, 2), entry(2, 1)]).expect("send");
    assert_eq!(ids.len(), 2);
    assert_eq!(
        s.outstanding(&r).expect("outstanding"),
        vec![(0, 2), (2, 1)]
    );
    let got = s
        .fetch(&r, "a", 10, Duration::from_millis(500), false)
        .expect("fetch");
    assert_eq!(got.len(), 2, "both entries delivered");
    assert_eq!(got[0].entry, entry(0, 2));
    assert_eq!((got[0].deliveries, got[1].deliveries), (1, 1));
    let again = s
        .fetch(&r, "b", 10, Duration::from_millis(50), false)
        .expect("fetch");
    assert!(again.is_empty(), "an entry is delivered to one consumer");
    assert_eq!(
        s.commit(&r, "a", &got[0].id, b"r0").expect("commit"),
        Commit::Committed
    );
    let o = out(&mut *s, &r);
    assert_eq!(o.len(), 1);
    assert_eq!((o[0].kind, o[0].consumer.as_str()), (OutKind::Results, "a"));
    assert_eq!(o[0].payload, b"r0");
    assert_eq!(s.outstanding(&r).expect("outstanding"), vec![(2, 1)]);
    assert!(out(&mut *s, &r).is_empty(), "acknowledged entries are gone");
    s.cleanup(&r, None).expect("cleanup");
}

/// A commit of several entries publishes the results of those the consumer still holds,
/// and only those, and removes exactly them.
pub fn commit_many_publishes_only_owned_entries(b: &dyn Broker, age: &dyn Fn(Duration)) {
    let mut s = session(b);
    let r = run("commit_many_publishes_only_owned_entries");
    announce(&mut *s, &r);
    s.send(&r, &[entry(0, 1), entry(1, 1), entry(2, 1)])
        .expect("send");
    let got = s
        .fetch(&r, "a", 10, Duration::from_millis(500), false)
        .expect("fetch");
    assert_eq!(got.len(), 3);
    age(IDLE + Duration::from_millis(50));
    let taken = s
        .claim(&r, "b", IDLE, std::slice::from_ref(&got[1].id))
        .expect("claim");
    assert_eq!(taken.len(), 1, "the middle entry is taken over");
    let done: Vec<(&EntryId, &[u8])> = vec![
        (&got[0].id, b"r0"),
        (&got[1].id, b"r1"),
        (&got[2].id, b"r2"),
    ];
    assert_eq!(
        s.commit_many(&r, "a", &done).expect("commit_many"),
        vec![Commit::Committed, Commit::LeaseLost, Commit::Committed]
    );
    let published: Vec<u8> = out(&mut *s, &r)
        .into_iter()
        .inspect(|o| assert_eq!((o.kind, o.consumer.as_str()), (OutKind::Results, "a")))
        .flat_map(|o| o.payload)
        .collect();
    assert_eq!(
        published, b"r0r2",
        "only the held entries' results, in order"
    );
    assert_eq!(
        s.outstanding(&r).expect("outstanding"),
        vec![(1, 1)],
        "the entry taken over stays"
    );
    assert_eq!(
        s.commit_many(&r, "a", &[]).expect("an empty commit"),
        Vec::<Commit>::new()
    );
    s.cleanup(&r, None).expect("cleanup");
}

/// A commit of more entries than a broker may look up at once (300, given out of order,
/// among entries another consumer holds) commits each of them and publishes all results.
pub fn commit_many_of_hundreds_of_entries(b: &dyn Broker) {
    let mut s = session(b);
    let r = run("commit_many_of_hundreds_of_entries");
    announce(&mut *s, &r);
    let sent: Vec<NewEntry> = (0..600).map(|i| entry(i, 1)).collect();
    for chunk in sent.chunks(100) {
        s.send(&r, chunk).expect("send");
    }
    // Consumers a and b take turns, so a's entries are interleaved with b's.
    let (mut a, mut b_held) = (Vec::new(), Vec::new());
    while a.len() + b_held.len() < 600 {
        let got = s
            .fetch(&r, "a", 10, Duration::from_millis(500), false)
            .expect("fetch a");
        a.extend(got);
        let got = s
            .fetch(&r, "b", 10, Duration::from_millis(500), false)
            .expect("fetch b");
        b_held.extend(got);
    }
    assert_eq!((a.len(), b_held.len()), (300, 300));
    let mut done: Vec<(&EntryId, &[u8])> = a.iter().map(|d| (&d.id, &b"x"[..])).collect();
    done.reverse();
    let commits = s.commit_many(&r, "a", &done).expect("commit_many");
    assert_eq!(commits, vec![Commit::Committed; 300]);
    let published: usize = out(&mut *s, &r).iter().map(|o| o.payload.len()).sum();
    assert_eq!(published, 300, "every result published");
    assert_eq!(
        s.outstanding(&r).expect("outstanding").len(),
        300,
        "b's entries stay"
    );
    s.cleanup(&r, None).expect("cleanup");
}

/// Only the holder commits; a reclaimed entry's old holder publishes nothing.
pub fn commit_needs_the_lease(b: &dyn Broker, age: &dyn Fn(Duration)) {
    let mut s = session(b);
    let r = run("commit_needs_the_lease");
    announce(&mut *s, &r);
    s.send(&r, &[entry(0, 1)]).expect("send");
    let d = fetch1(&mut *s, &r, "a");
    assert_eq!(
        s.commit(&r, "b", &d.id, b"x").expect("commit"),
        Commit::LeaseLost
    );
    let early = s
        .claim(&r, "b", IDLE, std::slice::from_ref(&d.id))
        .expect("claim");
    assert!(
        early.is_empty(),
        "an entry held less than min_idle is not claimed"
    );
    age(IDLE + Duration::from_millis(50));
    let idle = s.pending_idle(&r, IDLE, 10).expect("pending_idle");
    assert_eq!(idle.len(), 1);
    assert_eq!((idle[0].owner.as_str(), idle[0].deliveries), ("a", 1));
    assert_eq!(
        idle[0].entry,
        Some(entry(0, 1)),
        "a pending entry comes with its content"
    );
    let taken = s
        .claim(&r, "b", IDLE, std::slice::from_ref(&d.id))
        .expect("claim");
    assert_eq!(taken.len(), 1, "an idle entry is claimed");
    assert_eq!(taken[0].deliveries, 2, "a claim counts a delivery");
    assert_eq!(
        s.commit(&r, "a", &d.id, b"late").expect("commit"),
        Commit::LeaseLost
    );
    assert!(
        s.heartbeat(&r, "a", std::slice::from_ref(&d.id))
            .expect("heartbeat")
            .is_empty(),
        "a heartbeat keeps only entries the consumer holds"
    );
    assert!(
        out(&mut *s, &r).is_empty(),
        "the late commit published nothing"
    );
    assert_eq!(
        s.commit(&r, "b", &d.id, b"b").expect("commit"),
        Commit::Committed
    );
    let o = out(&mut *s, &r);
    assert_eq!(o.len(), 1);
    assert_eq!(o[0].payload, b"b");
    s.cleanup(&r, None).expect("cleanup");
}

/// A heartbeat resets the idle time of the entries the consumer holds.
pub fn heartbeat_keeps_the_lease(b: &dyn Broker, age: &dyn Fn(Duration)) {
    let mut s = session(b);
    let r = run("heartbeat_keeps_the_lease");
    announce(&mut *s, &r);
    s.send(&r, &[entry(0, 1)]).expect("send");
    let d = fetch1(&mut *s, &r, "a");
    age(IDLE + Duration::from_millis(50));
    let kept = s
        .heartbeat(&r, "a", std::slice::from_ref(&d.id))
        .expect("heartbeat");
    assert_eq!(kept, vec![d.id.clone()]);
    assert!(
        s.pending_idle(&r, IDLE, 10)
            .expect("pending_idle")
            .is_empty(),
        "a kept entry is not idle"
    );
    assert!(s
        .claim(&r, "b", IDLE, std::slice::from_ref(&d.id))
        .expect("claim")
        .is_empty());
    s.cleanup(&r, None).expect("cleanup");
}

/// A released entry is claimable at once and its delivery count is unchanged after.
pub fn release_counts_no_delivery(b: &dyn Broker) {
    let mut s = session(b);
    let r = run("release_counts_no_delivery");
    announce(&mut *s, &r);
    s.send(&r, &[entry(0, 1)]).expect("send");
    let d = fetch1(&mut *s, &r, "a");
    s.release(&r, "a", &[(d.id.clone(), d.deliveries)], IDLE)
        .expect("release");
    let idle = s.pending_idle(&r, IDLE, 10).expect("pending_idle");
    assert_eq!(idle.len(), 1, "a released entry is idle at once");
    let taken = s
        .claim(&r, "b", IDLE, std::slice::from_ref(&d.id))
        .expect("claim");
    assert_eq!(taken.len(), 1);
    assert_eq!(taken[0].deliveries, 1, "a release counts no delivery");
    s.cleanup(&r, None).expect("cleanup");
}

/// The dead-letter move happens only for an entry still idle, and publishes its failures.
pub fn dead_letter_rechecks_idle(b: &dyn Broker, age: &dyn Fn(Duration)) {
    let mut s = session(b);
    let r = run("dead_letter_rechecks_idle");
    announce(&mut *s, &r);
    s.send(&r, &[entry(0, 1)]).expect("send");
    let d = fetch1(&mut *s, &r, "a");
    assert!(
        !s.dead_letter(&r, &d.id, IDLE, b"dead")
            .expect("dead_letter"),
        "a live entry is not dead-lettered"
    );
    age(IDLE + Duration::from_millis(50));
    assert!(s
        .dead_letter(&r, &d.id, IDLE, b"dead")
        .expect("dead_letter"));
    assert!(s.outstanding(&r).expect("outstanding").is_empty());
    let o = out(&mut *s, &r);
    assert_eq!(o.len(), 1);
    assert_eq!(o[0].payload, b"dead");
    assert_eq!(
        s.commit(&r, "a", &d.id, b"late").expect("commit"),
        Commit::LeaseLost
    );
    s.cleanup(&r, None).expect("cleanup");
}

/// A split replaces an entry its consumer holds with new, undelivered entries.
pub fn split_replaces_an_owned_entry(b: &dyn Broker, age: &dyn Fn(Duration)) {
    let mut s = session(b);
    let r = run("split_replaces_an_owned_entry");
    announce(&mut *s, &r);
    s.send(&r, &[entry(0, 2)]).expect("send");
    let d = fetch1(&mut *s, &r, "a");
    age(IDLE + Duration::from_millis(50));
    let taken = s
        .claim(&r, "b", IDLE, std::slice::from_ref(&d.id))
        .expect("claim");
    assert_eq!(taken.len(), 1);
    let parts = [
        NewEntry {
            attempts: 2,
            ..entry(0, 1)
        },
        NewEntry {
            attempts: 2,
            ..entry(1, 1)
        },
    ];
    assert!(
        !s.split(&r, "a", &d.id, &parts).expect("split"),
        "only the holder splits"
    );
    assert!(s.split(&r, "b", &d.id, &parts).expect("split"));
    assert_eq!(
        s.outstanding(&r).expect("outstanding"),
        vec![(0, 1), (1, 1)]
    );
    let got = s
        .fetch(&r, "c", 10, Duration::from_millis(500), false)
        .expect("fetch");
    assert_eq!(got.len(), 2);
    assert_eq!(got[0].entry, parts[0]);
    assert_eq!(got[0].deliveries, 1);
    s.cleanup(&r, None).expect("cleanup");
}

/// Entries a consumer holds are found again with `own` (a lost reply).
pub fn own_entries_are_found_again(b: &dyn Broker) {
    let mut s = session(b);
    let r = run("own_entries_are_found_again");
    announce(&mut *s, &r);
    s.send(&r, &[entry(0, 1), entry(1, 1)]).expect("send");
    let d = fetch1(&mut *s, &r, "a");
    let own = s
        .fetch(&r, "a", 10, Duration::ZERO, true)
        .expect("fetch own");
    assert_eq!(own.len(), 1, "only the entry it holds");
    assert_eq!(own[0].id, d.id);
    let other = s
        .fetch(&r, "b", 10, Duration::ZERO, true)
        .expect("fetch own");
    assert!(other.is_empty());
    s.stats(&r, "a", b"s").expect("stats");
    let first = s
        .read_out(&r, 10, Duration::from_millis(200), false)
        .expect("read_out");
    assert_eq!(first.len(), 1);
    let again = s
        .read_out(&r, 10, Duration::ZERO, true)
        .expect("read_out own");
    assert_eq!(again, first, "unacknowledged out entries are found again");
    s.cleanup(&r, None).expect("cleanup");
}

/// Control state, the worker table, the finished marker, and cleanup.
pub fn control_workers_and_cleanup(b: &dyn Broker) {
    let mut s = session(b);
    let r = run("control_workers_and_cleanup");
    announce(&mut *s, &r);
    assert_eq!(s.control(&r).expect("control"), Some(Control::Running));
    s.set_control(&r, Control::Finishing).expect("set_control");
    assert_eq!(s.control(&r).expect("control"), Some(Control::Finishing));
    let w = WorkerInfo {
        consumer: "a".into(),
        host: "h".into(),
        pid: 7,
        concurrency: 4,
        since_heartbeat: Duration::ZERO,
    };
    s.register(&r, &w).expect("register");
    let ws = s.workers(&r).expect("workers");
    assert_eq!(ws.len(), 1);
    assert_eq!(
        (ws[0].consumer.as_str(), ws[0].pid, ws[0].concurrency),
        ("a", 7, 4)
    );
    s.finished(&r, "a", b"flush").expect("finished");
    s.finished(&r, "a", b"flush").expect("finished again");
    let o = out(&mut *s, &r);
    assert_eq!(o.len(), 1, "finished publishes once");
    assert_eq!(
        (o[0].kind, o[0].payload.as_slice()),
        (OutKind::Finished, &b"flush"[..])
    );
    s.unregister(&r, "a").expect("unregister");
    assert!(s.workers(&r).expect("workers").is_empty());
    s.cleanup(&r, None).expect("cleanup");
    assert_eq!(
        s.control(&r).expect("control"),
        None,
        "cleanup removes the run"
    );
}

/// Announcements: live runs without a cursor, every later one after a cursor.
pub fn announcements_by_cursor(b: &dyn Broker) {
    let mut s = session(b);
    let pipeline = format!("ann-{}-{}", std::process::id(), nanos());
    let mk = |i: u32| StageRun {
        pipeline: pipeline.clone(),
        run: format!("r{i}"),
        stage: "stage".into(),
    };
    let (r1, r2) = (mk(1), mk(2));
    announce(&mut *s, &r1);
    let live = s
        .announcements(&pipeline, None, Duration::from_millis(200))
        .expect("announcements");
    assert_eq!(live.len(), 1);
    assert_eq!(live[0].1.stage_run, r1);
    let cursor = live[0].0.clone();
    let none = s
        .announcements(&pipeline, Some(&cursor), Duration::from_millis(50))
        .expect("announcements");
    assert!(none.is_empty());
    announce(&mut *s, &r2);
    let next = s
        .announcements(&pipeline, Some(&cursor), Duration::from_millis(500))
        .expect("announcements");
    assert_eq!(next.len(), 1);
    assert_eq!(next[0].1.stage_run, r2);
    s.set_control(&r1, Control::Aborted).expect("set_control");
    let live = s
        .announcements(&pipeline, None, Duration::from_millis(200))
        .expect("announcements");
    assert_eq!(live.len(), 1, "an aborted run is not live");
    assert_eq!(live[0].1.stage_run, r2);
    s.cleanup(&r1, None).expect("cleanup");
    s.cleanup(&r2, None).expect("cleanup");
}

/// A wake ends no lease and is never work: a fetch, a fetch of one's own entries, an idle
/// listing or a claim after it delivers only real entries, and the stream holds only those.
pub fn wake_delivers_no_work(b: &dyn Broker, age: &dyn Fn(Duration)) {
    let mut parent = session(b);
    let mut w = session(b);
    let r = run("wake");
    announce(&mut *parent, &r);
    parent.wake(&r, 2).expect("wake");
    parent.send(&r, &[entry(0, 1)]).expect("send");
    parent.wake(&r, 1).expect("wake");
    let mut got = Vec::new();
    for _ in 0..4 {
        got.extend(
            w.fetch(&r, "a", 10, Duration::from_millis(50), false)
                .expect("fetch"),
        );
    }
    assert_eq!(got.len(), 1, "only the entry is delivered: {got:?}");
    assert_eq!(got[0].entry, entry(0, 1));
    assert!(
        w.fetch(&r, "a", 10, Duration::ZERO, true)
            .expect("own")
            .len()
            == 1
    );
    age(IDLE + Duration::from_millis(50));
    let idle = w.pending_idle(&r, IDLE, 10).expect("pending_idle");
    assert_eq!(idle.len(), 1, "only the entry is pending: {idle:?}");
    assert_eq!(
        w.commit(&r, "a", &got[0].id, b"r").expect("commit"),
        Commit::Committed
    );
    assert_eq!(parent.depth(&r).expect("depth"), (0, 0), "nothing is left");
}
