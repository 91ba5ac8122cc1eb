//! The caching-proxy as a real process: an origin that sends `103 Early Hints` before its final response. The
//! client gets the final response, whole and without the hints' fields; the 103 is never stored, and the final
//! response is stored and answered from the cache. hyper's server has no way to send an interim response (only its
//! own `100 Continue`), so the hints are not forwarded: see the crate's README.

#![allow(clippy::unwrap_used)] // tests fail loudly on a broken fixture

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use support::*;

/// An HTTP/1.1 origin written by hand, since axum cannot send a 103: every request on every connection is
/// answered with a 103 and then a cacheable 200. Returns its address and how many requests it answered.
async fn early_hints_origin() -> (String, Arc<AtomicUsize>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    let answered = Arc::new(AtomicUsize::new(0));
    let count = answered.clone();
    tokio::spawn(async move {
        loop {
            let Ok((mut stream, _)) = listener.accept().await else {
                return;
            };
            let count = count.clone();
            tokio::spawn(async move {
                let mut buffer = Vec::new();
                let mut chunk = [0_u8; 4096];
                loop {
                    // One request head at a time (the proxy sends GETs without a body).
                    while let Some(end) = buffer.windows(4).position(|window| window == b"\r\n\r\n")
                    {
                        buffer.drain(..end + 4);
                        count.fetch_add(1, Ordering::SeqCst);
                        let answer = "HTTP/1.1 103 Early Hints\r\n\
                                      Link: </style.css>; rel=preload; as=style\r\n\r\n\
                                      HTTP/1.1 200 OK\r\n\
                                      Cache-Control: max-age=60\r\n\
                                      Content-Type: text/plain\r\n\
                                      Content-Length: 5\r\n\r\n\
                                      hello";
                        if stream.write_all(answer.as_bytes()).await.is_err() {
                            return;
                        }
                    }
                    match stream.read(&mut chunk).await {
                        Ok(0) | Err(_) => return,
                        Ok(read) => buffer.extend_from_slice(&chunk[..read]),
                    }
                }
            });
        }
    });
    (format!("http://{address}"), answered)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn early_hints_from_the_origin_are_never_stored_and_the_final_response_is() {
    let (origin, answered) = early_hints_origin().await;
    let proxy = Proxy::start(&origin, &[]).await;

    let first = get(&proxy, "/page").await;
    assert_eq!(first.status.as_u16(), 200);
    assert_eq!(first.text(), "hello");
    assert_eq!(
        first.header("link"),
        None,
        "the hints' fields are not the final response's"
    );
    assert!(
        first
            .cache_status()
            .contains("fwd-status=200; stored; ttl=60"),
        "{}",
        first.cache_status()
    );

    let second = get(&proxy, "/page").await;
    assert_eq!(second.status.as_u16(), 200);
    assert_eq!(second.text(), "hello");
    assert!(
        second.cache_status().contains("hit"),
        "{}",
        second.cache_status()
    );
    assert_eq!(second.header("link"), None);
    assert_eq!(answered.load(Ordering::SeqCst), 1);
}
