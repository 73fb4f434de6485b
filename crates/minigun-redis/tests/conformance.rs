//! The broker contract's conformance suite, against a real server.

use minigun::remote::conformance;
use minigun_redis::testing::RedisServer;

#[test]
fn the_redis_broker_passes_the_conformance_suite() {
    let Some(server) = RedisServer::start_or_skip() else {
        return;
    };
    let broker = server.broker();
    conformance::run_all(&broker, &|d| std::thread::sleep(d));
}
