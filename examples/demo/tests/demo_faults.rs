//! The demo through the faults production has (issue 14, item 7): a Redis that comes back empty, discovery that
//! knows no instance, slow-header clients, and a service that fails at start-up under the launcher. Every process
//! is real and talks over loopback to a real `redis-server` the test starts.
#![allow(clippy::unwrap_used)] // tests fail loudly on a broken fixture or a process that misbehaves

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::Command;
use std::time::{Duration, Instant};

use redis_fixtures::RedisServer;
use serde_json::json;

mod support;

use support::{binary, get, poll, prefix, request, start};

fn shared_env(redis: &RedisServer, prefix: &str) -> Vec<(&'static str, String)> {
    vec![
        ("REDIS_URL", redis.url()),
        ("REDIS_PREFIX", prefix.to_owned()),
        ("PORT", "0".to_owned()),
        ("RATE_LIMIT_WRITES", "1000/1m".to_owned()),
    ]
}

fn create_user(address: SocketAddr, name: &str) -> String {
    let body = json!({"name": name, "email": format!("{}@example.com", name.to_lowercase())});
    let reply = request(address, "POST", "/users", Some(&body), &[]);
    assert_eq!(reply.status, 201, "{reply:?}");
    reply.json()["id"].as_str().unwrap().to_owned()
}

#[test]
fn ids_drawn_after_redis_comes_back_empty_never_collide_with_existing_records() {
    let redis = RedisServer::start();
    let env = shared_env(&redis, &prefix("ids-empty"));
    let first = start("user-service", &env);
    let second = start("user-service", &env);
    let before = create_user(first.address(), "Ada");
    let also_before = create_user(second.address(), "Grace");
    assert_ne!(before, also_before);

    // Redis loses everything (a restart without persistence): the counter is gone.
    let mut admin = redis.client().get_connection().unwrap();
    let () = redis::cmd("FLUSHALL").query(&mut admin).unwrap();

    let mut after = Vec::new();
    for (index, service) in [&first, &second, &first, &second].iter().enumerate() {
        after.push(create_user(service.address(), &format!("New{index}")));
    }
    for id in &after {
        assert_ne!(id, &before, "an id drawn after the flush reuses {before}");
        assert_ne!(
            id, &also_before,
            "an id drawn after the flush reuses {also_before}"
        );
    }
    let mut distinct = after.clone();
    distinct.sort();
    distinct.dedup();
    assert_eq!(distinct.len(), after.len(), "{after:?}");

    // The records made before are untouched.
    let ada = get(first.address(), &format!("/users/{before}"));
    assert_eq!(ada.status, 200, "{ada:?}");
    assert_eq!(ada.json()["name"], "Ada");
    let grace = get(second.address(), &format!("/users/{also_before}"));
    assert_eq!(grace.status, 200, "{grace:?}");
    assert_eq!(grace.json()["name"], "Grace");
}

#[test]
fn a_gateway_that_knows_no_instance_answers_503_with_retry_after_and_keeps_its_breaker_closed() {
    let redis = RedisServer::start();
    let env = shared_env(&redis, &prefix("no-instance"));
    let gateway = start("gateway", &env);
    let address = gateway.address();
    // More calls than the breaker's minimum (10) at a failure rate of 100 %, had they counted.
    for _ in 0..30 {
        let reply = get(address, "/users/1");
        assert_eq!(reply.status, 503, "{reply:?}");
        assert_eq!(reply.header("retry-after"), "1", "{reply:?}");
        assert!(
            reply.json()["reason"]
                .as_str()
                .unwrap_or("")
                .contains("no instance"),
            "{reply:?}"
        );
    }
    let health = get(address, "/health").json();
    assert_eq!(
        health["downstream"]["user-service"]["breaker"], "closed",
        "{health}"
    );
}

/// Opens a connection and sends the start of a request's headers, never the end.
fn slow_header_client(address: SocketAddr) -> TcpStream {
    let mut stream = TcpStream::connect(address).unwrap();
    stream
        .write_all(b"GET /health HTTP/1.1\r\nhost: localhost\r\nx-slow: ")
        .unwrap();
    stream
}

#[test]
fn slow_header_clients_neither_stop_the_server_answering_nor_hold_their_connections() {
    let redis = RedisServer::start();
    let service = start("user-service", &shared_env(&redis, &prefix("slow-headers")));
    let address = service.address();
    let started = Instant::now();
    let mut slow: Vec<TcpStream> = (0..200).map(|_| slow_header_client(address)).collect();

    // Others are answered while the 200 hold their connections.
    for _ in 0..20 {
        let reply = get(address, "/health");
        assert_eq!(reply.status, 200, "{reply:?}");
    }

    // The server closes each slow connection once its header deadline (10 s) passes: a read sees the end
    // (or a reset), not a read timeout.
    for stream in &mut slow {
        stream
            .set_read_timeout(Some(Duration::from_secs(30)))
            .unwrap();
        let mut buffer = [0_u8; 512];
        loop {
            match stream.read(&mut buffer) {
                Ok(0) => break,
                // hyper may answer 408 before closing.
                Ok(_) => {}
                Err(error) => {
                    assert_ne!(
                        error.kind(),
                        std::io::ErrorKind::WouldBlock,
                        "a slow-header connection was still open after {:?}",
                        started.elapsed()
                    );
                    assert_ne!(error.kind(), std::io::ErrorKind::TimedOut);
                    break;
                }
            }
        }
    }
    assert!(
        started.elapsed() >= Duration::from_secs(9),
        "closed before the header deadline: {:?}",
        started.elapsed()
    );
    let reply = get(address, "/health");
    assert_eq!(reply.status, 200, "{reply:?}");
}

#[test]
fn the_launcher_exits_with_a_failure_when_a_service_cannot_start() {
    let redis = RedisServer::start();
    // The gateway's port is taken: the gateway exits at start-up.
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let mut command = Command::new(binary("demo"));
    for (name, _) in std::env::vars() {
        if name.starts_with("REDIS_") || name.ends_with("_PORT") || name == "PORT" {
            command.env_remove(name);
        }
    }
    let mut child = command
        .env("REDIS_URL", redis.url())
        .env("REDIS_PREFIX", prefix("launcher"))
        .env("USER_SERVICE_PORT", "0")
        .env("ORDER_SERVICE_PORT", "0")
        .env("GATEWAY_PORT", port.to_string())
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let status = poll(Duration::from_secs(30), || child.try_wait().unwrap());
    if status.is_none() {
        let _ = child.kill();
        let _ = child.wait();
    }
    let status =
        status.expect("the launcher was still running 30 s after the gateway failed to start");
    assert!(!status.success(), "{status}");
    drop(taken);
}
