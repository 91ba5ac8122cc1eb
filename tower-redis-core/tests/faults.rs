//! `HealingConnection` and `Subscription` against a real redis-server behind the fixtures' fault proxy: a half-open
//! connection is replaced within a few commands, a Redis slower than its callers gets no reconnect storm, an error
//! reply is an answer, and a silent subscription is noticed by its PING and comes back.

#![allow(clippy::unwrap_used)] // tests fail loudly on a broken fixture

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use redis::aio::{ConnectionLike, MultiplexedConnection};
use redis_fixtures::{FaultProxy, RedisServer};
use test_support::wait_for;
use tower_redis_core::subscription::Listener;
use tower_redis_core::{HealingConfig, HealingConnection, Subscription, SubscriptionConfig};

/// A command with the caller's own deadline, as every layer of the workspace sends them.
async fn ping<C: ConnectionLike>(connection: &mut C, deadline: Duration) -> bool {
    matches!(
        tokio::time::timeout(
            deadline,
            redis::cmd("PING").query_async::<String>(connection)
        )
        .await,
        Ok(Ok(_))
    )
}

async fn healing(
    proxy: &FaultProxy,
    server: &RedisServer,
) -> HealingConnection<MultiplexedConnection> {
    let client = proxy.client_for(server);
    HealingConnection::multiplexed(client, HealingConfig::default())
        .await
        .unwrap()
}

#[tokio::test]
async fn a_half_open_connection_is_replaced_after_three_commands_with_no_reply() {
    let server = RedisServer::start();
    let proxy = FaultProxy::in_front_of(&server);
    let mut connection = healing(&proxy, &server).await;
    assert!(ping(&mut connection, Duration::from_millis(500)).await);
    assert_eq!(proxy.connections(), 1);

    proxy.half_open();
    let started = Instant::now();
    let mut failed = 0;
    while !ping(&mut connection, Duration::from_millis(50)).await {
        failed += 1;
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "never recovered"
        );
    }
    assert!(
        failed >= 3,
        "the first commands hang on the half-open connection ({failed} failed)"
    );
    assert!(failed <= 6, "replaced within a few commands, not {failed}");
    let stats = connection.stats();
    assert_eq!(stats.replacements, 1);
    assert_eq!(stats.generation, 2);
    assert_eq!(proxy.connections(), 2);
    // A clone shares the new connection.
    let mut clone = connection.clone();
    assert!(ping(&mut clone, Duration::from_millis(500)).await);
}

#[tokio::test]
async fn a_plain_multiplexed_connection_stays_half_open_for_good() {
    // The failure the wrapper fixes, shown on the same fault.
    let server = RedisServer::start();
    let proxy = FaultProxy::in_front_of(&server);
    let mut plain = proxy
        .client_for(&server)
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    assert!(ping(&mut plain, Duration::from_millis(500)).await);
    proxy.half_open();
    for _ in 0..20 {
        assert!(!ping(&mut plain, Duration::from_millis(50)).await);
    }
    assert_eq!(proxy.connections(), 1);
}

#[tokio::test]
async fn a_redis_slower_than_its_callers_gets_one_new_connection_per_backoff_not_a_storm() {
    let server = RedisServer::start();
    let proxy = FaultProxy::in_front_of(&server);
    let client = proxy.client_for(&server);
    let mut connection = HealingConnection::multiplexed(
        client,
        HealingConfig::default().backoff(Duration::from_millis(500), Duration::from_secs(4)),
    )
    .await
    .unwrap();
    proxy.delay(Duration::from_millis(300));
    let started = Instant::now();
    let mut commands = 0;
    while started.elapsed() < Duration::from_secs(3) {
        // 100 ms deadlines against 300 ms replies: nothing is ever answered in time.
        assert!(!ping(&mut connection, Duration::from_millis(100)).await);
        commands += 1;
    }
    // Backoff 0.5 s (x0.75..1.25), then 1 s, then 2 s: replacements at about 0, 0.5 and 1.5 s, perhaps 3.5 s.
    let stats = connection.stats();
    assert!(commands >= 25, "{commands} commands");
    assert!(
        (2..=4).contains(&stats.replacements),
        "{} replacements for {commands} timed-out commands",
        stats.replacements
    );
    assert!(
        proxy.connections() <= 5,
        "{} connections",
        proxy.connections()
    );

    proxy.pass();
    let recovered = Instant::now();
    while !ping(&mut connection, Duration::from_millis(100)).await {
        assert!(
            recovered.elapsed() < Duration::from_secs(5),
            "never recovered"
        );
    }
}

#[tokio::test]
async fn error_replies_are_answers_and_replace_nothing() {
    let server = RedisServer::start();
    let proxy = FaultProxy::in_front_of(&server);
    let mut connection = healing(&proxy, &server).await;
    let () = redis::cmd("RPUSH")
        .arg("a-list")
        .arg("x")
        .query_async::<i64>(&mut connection)
        .await
        .map(drop)
        .unwrap();
    for _ in 0..20 {
        let wrong: redis::RedisResult<String> = redis::cmd("GET")
            .arg("a-list")
            .query_async(&mut connection)
            .await;
        assert_eq!(wrong.unwrap_err().code(), Some("WRONGTYPE"));
    }
    assert_eq!(connection.stats().replacements, 0);
    assert_eq!(connection.stats().no_reply, 0);
    assert_eq!(proxy.connections(), 1);
}

#[tokio::test]
async fn answers_in_between_reset_the_count() {
    let server = RedisServer::start();
    let proxy = FaultProxy::in_front_of(&server);
    let mut connection = healing(&proxy, &server).await;
    // Two abandoned commands, then an answer, again and again: never three in a row.
    for _ in 0..5 {
        proxy.stall();
        assert!(!ping(&mut connection, Duration::from_millis(30)).await);
        assert!(!ping(&mut connection, Duration::from_millis(30)).await);
        proxy.pass();
        assert!(ping(&mut connection, Duration::from_secs(2)).await);
    }
    let stats = connection.stats();
    assert_eq!(stats.no_reply, 10);
    assert_eq!(stats.replacements, 0);
}

#[tokio::test]
async fn while_redis_is_refusing_the_old_connection_is_kept_and_replacement_is_retried() {
    let server = RedisServer::start();
    let proxy = FaultProxy::in_front_of(&server);
    let mut connection = HealingConnection::multiplexed(
        proxy.client_for(&server),
        HealingConfig::default().backoff(Duration::from_millis(200), Duration::from_millis(400)),
    )
    .await
    .unwrap();
    proxy.refuse();
    proxy.half_open(); // existing connections hang, and...
    proxy.refuse(); // ...new ones are refused
    let started = Instant::now();
    while connection.stats().failed_replacements < 2 {
        assert!(!ping(&mut connection, Duration::from_millis(30)).await);
        assert!(started.elapsed() < Duration::from_secs(5), "no retry");
    }
    assert_eq!(connection.stats().replacements, 0);
    proxy.pass();
    while !ping(&mut connection, Duration::from_millis(100)).await {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "never recovered"
        );
    }
    assert_eq!(connection.stats().replacements, 1);
}

#[derive(Clone, Default)]
struct Recorder {
    messages: Arc<Mutex<Vec<String>>>,
    subscribed: Arc<Mutex<u32>>,
    lost: Arc<Mutex<u32>>,
}

impl Listener for Recorder {
    fn subscribed(&mut self, _client: &redis::Client) -> impl Future<Output = ()> + Send {
        *self.subscribed.lock().unwrap() += 1;
        async {}
    }

    fn message(&mut self, message: &redis::Msg) {
        let payload = message.get_payload::<String>().unwrap_or_default();
        self.messages.lock().unwrap().push(payload);
    }

    fn lost(&mut self) {
        *self.lost.lock().unwrap() += 1;
    }
}

#[tokio::test]
async fn a_half_open_subscription_is_noticed_by_its_ping_and_resubscribed() {
    let server = RedisServer::start();
    let proxy = FaultProxy::in_front_of(&server);
    let recorder = Recorder::default();
    let subscription = Subscription::spawn(
        proxy.client_for(&server),
        vec!["chan".to_owned()],
        SubscriptionConfig::default().ping(Duration::from_millis(200), Duration::from_millis(200)),
        recorder.clone(),
    )
    .unwrap();
    let mut publisher = server.multiplexed().await;
    let publish = |publisher: &mut MultiplexedConnection, text: &'static str| {
        let mut publisher = publisher.clone();
        async move {
            redis::cmd("PUBLISH")
                .arg("chan")
                .arg(text)
                .query_async::<i64>(&mut publisher)
                .await
                .unwrap()
        }
    };
    wait_for("subscribed", Duration::from_secs(5), || {
        subscription.stats().connected
    })
    .await;
    assert_eq!(publish(&mut publisher, "one").await, 1);
    wait_for("the first message", Duration::from_secs(5), || {
        recorder.messages.lock().unwrap().len() == 1
    })
    .await;

    proxy.half_open();
    // Published into the void: the server still counts the old subscriber until it notices.
    publish(&mut publisher, "lost").await;
    let started = Instant::now();
    wait_for(
        "the PING notices the silence",
        Duration::from_secs(5),
        || subscription.stats().silent == 1,
    )
    .await;
    wait_for("resubscribed", Duration::from_secs(5), || {
        *recorder.subscribed.lock().unwrap() == 2 && subscription.stats().connected
    })
    .await;
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(*recorder.lost.lock().unwrap(), 1);
    // The new subscription gets what is published from now on.
    let started = Instant::now();
    while !recorder.messages.lock().unwrap().iter().any(|m| m == "two") {
        publish(&mut publisher, "two").await;
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "no message on the new subscription"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        !recorder
            .messages
            .lock()
            .unwrap()
            .iter()
            .any(|m| m == "lost")
    );
    assert_eq!(subscription.stats().subscriptions, 2);
}

#[tokio::test]
async fn a_subscription_comes_back_after_its_connection_is_reset_and_redis_refuses_for_a_while() {
    let server = RedisServer::start();
    let proxy = FaultProxy::in_front_of(&server);
    let recorder = Recorder::default();
    let subscription = Subscription::spawn(
        proxy.client_for(&server),
        vec!["chan".to_owned()],
        SubscriptionConfig::default()
            .backoff(Duration::from_millis(50), Duration::from_millis(200)),
        recorder.clone(),
    )
    .unwrap();
    wait_for("subscribed", Duration::from_secs(5), || {
        subscription.stats().connected
    })
    .await;
    proxy.refuse();
    proxy.reset_all();
    wait_for("the loss is seen", Duration::from_secs(5), || {
        *recorder.lost.lock().unwrap() == 1
    })
    .await;
    wait_for(
        "failed attempts while refused",
        Duration::from_secs(5),
        || subscription.stats().errors >= 3,
    )
    .await;
    assert!(!subscription.stats().connected);
    proxy.pass();
    wait_for("resubscribed", Duration::from_secs(5), || {
        subscription.stats().connected && *recorder.subscribed.lock().unwrap() == 2
    })
    .await;
}

#[tokio::test]
async fn an_invalid_subscription_config_is_an_error_that_names_the_setting() {
    let server = RedisServer::start();
    let error = Subscription::spawn(
        server.client(),
        vec!["c".to_owned()],
        SubscriptionConfig::default().ping(Duration::ZERO, Duration::from_secs(1)),
        Recorder::default(),
    )
    .unwrap_err();
    assert_eq!(error.field(), "ping");
}
