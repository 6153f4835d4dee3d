//! Intake under abuse: slow clients, floods of unsigned requests, more requests than the limit, and
//! configuration mistakes that would leak or lose data. The public port is reachable by anyone who
//! can reach the load balancer, and OrderCloud does not retry: intake must keep serving.

use std::io::{Read as _, Write as _};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use ordercloud_cdp_forwarder::ordercloud::signature;
use serde_json::{json, Value};

use crate::helpers::*;

const NOWHERE: &str = "http://127.0.0.1:9";

/// A signed line-item webhook of its own order (so each has its own shopper and LogID).
fn webhook(order: &str) -> Vec<u8> {
    let token = anon_token(order, "web-client", NOWHERE);
    serde_json::to_vec(&line_created(order, &token, &line_item("L1", "SKU", 1, 1.0))).unwrap()
}

/// The binary with CDP and OrderCloud unreachable (intents stay queued), plus `extra` settings.
async fn binary(dir: &std::path::Path, extra: &[(&'static str, &str)]) -> Binary {
    let mut env = store_env(dir);
    env.extend([
        ("FORWARDER__ORDERCLOUD__HASH_KEYS", KEY.to_string()),
        ("FORWARDER__ORDERCLOUD__API_URLS", NOWHERE.to_string()),
        ("FORWARDER__CDP__BASE_URL", NOWHERE.to_string()),
        ("FORWARDER__CDP__CLIENT_KEY", "ck".to_string()),
        ("FORWARDER__CDP__POS", "pos".to_string()),
    ]);
    env.extend(extra.iter().map(|(k, v)| (*k, v.to_string())));
    Binary::start(dir, &env).await
}

/// Resident memory of a process, in MiB (VmHWM: its peak).
fn peak_rss_mib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kb: u64 = status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap();
    kb / 1024
}

/// Whether the server closed `stream` (EOF or reset), waiting up to `within`.
fn closed_within(stream: &mut TcpStream, within: Duration) -> bool {
    stream.set_read_timeout(Some(within)).unwrap();
    let mut buf = [0u8; 4096];
    let deadline = Instant::now() + within;
    loop {
        match stream.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => {} // an answer (408, 413): the close follows
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock || e.kind() == std::io::ErrorKind::TimedOut => {
                return false
            }
            Err(_) => return true,
        }
        if Instant::now() > deadline {
            return false;
        }
    }
}

/// 300 clients trickling headers and bodies: signed webhooks from a normal client are answered 200
/// promptly all along, the slow connections are closed after `server.read_timeout_ms`, and the
/// service's peak memory stays under 96 MiB.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_clients_are_cut_off_and_signed_webhooks_still_flow() {
    let dir = tempfile::tempdir().unwrap();
    let service = binary(dir.path(), &[("FORWARDER__SERVER__READ_TIMEOUT_MS", "2000")]).await;
    let addr = format!("127.0.0.1:{}", service.port);
    let hash = signature::sign(KEY.as_bytes(), b"whatever");
    let slow = tokio::task::spawn_blocking(move || {
        let mut streams: Vec<TcpStream> = (0..300)
            .map(|i| {
                let mut s = TcpStream::connect(&addr).unwrap();
                if i % 2 == 0 {
                    // Headers that never end.
                    s.write_all(b"POST /webhooks/ordercloud HTTP/1.1\r\nHost: x\r\n")
                        .unwrap();
                } else {
                    // A body that never comes.
                    s.write_all(
                        format!(
                            "POST /webhooks/ordercloud HTTP/1.1\r\nHost: x\r\nX-oc-hash: {hash}\r\n\
                             Content-Type: application/json\r\nContent-Length: 1000000\r\n\r\n{{"
                        )
                        .as_bytes(),
                    )
                    .unwrap();
                }
                s
            })
            .collect();
        // A byte every 200 ms each, for up to 4 s: never enough, never quite silent.
        let started = Instant::now();
        while started.elapsed() < Duration::from_secs(4) {
            for s in &mut streams {
                let _ = s.write_all(b"x");
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        streams
            .iter_mut()
            .map(|s| closed_within(s, Duration::from_secs(3)))
            .filter(|closed| !closed)
            .count()
    });
    // Meanwhile, a shopper's webhooks, one after the other.
    let client = reqwest::Client::new();
    let mut slowest = Duration::ZERO;
    for i in 0..20 {
        let body = webhook(&format!("SLOW-{i}"));
        let started = Instant::now();
        let answer = client
            .post(service.url("/webhooks/ordercloud"))
            .header("X-oc-hash", signature::sign(KEY.as_bytes(), &body))
            .body(body)
            .timeout(Duration::from_secs(5))
            .send()
            .await
            .expect("answered");
        assert_eq!(answer.status(), 200);
        slowest = slowest.max(started.elapsed());
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
    assert!(slowest < Duration::from_secs(1), "a webhook waited {slowest:?}");
    let still_open = slow.await.unwrap();
    assert_eq!(still_open, 0, "slow connections left open after the read timeout");
    let peak = peak_rss_mib(service.child.id());
    assert!(peak < 96, "peak RSS {peak} MiB");
}

/// Past the memory intake gives bodies in flight (`server.max_inflight × server.max_body_bytes`),
/// intake answers 503 at once; nothing of those is stored, and every webhook answered 200 is.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn past_the_inflight_limit_intake_answers_503_and_stores_exactly_what_it_accepted() {
    let app = spawn_app_with(|s| {
        s.server.max_inflight = 8;
        s.server.max_body_bytes = 8192;
        s.server.read_timeout_ms = 10_000;
        s.cdp.dry_run = false;
        s.cdp.base_url = Some(NOWHERE.into());
        s.cdp.client_key = ordercloud_cdp_forwarder::config::Secret::new("ck");
        s.ordercloud.api_urls = vec![NOWHERE.into()];
    })
    .await;
    let addr = app.addr;
    // Eight signed webhooks of 8 KiB (padded with whitespace) whose last bytes take a second to
    // arrive: between them they hold all but 80 bytes of the 64 KiB bodies may hold.
    let padded = |order: &str, len: usize| {
        let mut body = webhook(order);
        body.resize(len, b' ');
        body
    };
    let holders: Vec<_> = (0..8)
        .map(|i| {
            let body = padded(&format!("HOLD-{i}"), 8192);
            std::thread::spawn(move || {
                let mut s = TcpStream::connect(addr).unwrap();
                s.write_all(
                    format!(
                        "POST /webhooks/ordercloud HTTP/1.1\r\nHost: x\r\nX-oc-hash: {}\r\n\
                         Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                        signature::sign(KEY.as_bytes(), &body),
                        body.len()
                    )
                    .as_bytes(),
                )
                .unwrap();
                let (first, rest) = body.split_at(body.len() - 10);
                s.write_all(first).unwrap();
                std::thread::sleep(Duration::from_millis(1500));
                s.write_all(rest).unwrap();
                let mut answer = String::new();
                s.read_to_string(&mut answer).unwrap();
                answer.starts_with("HTTP/1.1 200")
            })
        })
        .collect();
    // Give them time to be in flight, then more webhooks than there are slots.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut refused = Vec::new();
    for i in 0..20 {
        let order = format!("EXTRA-{i}");
        let body = padded(&order, 2048);
        let started = Instant::now();
        let answer = app.post_signed(&body, KEY).await;
        assert_eq!(answer.status(), 503, "{order}");
        assert!(started.elapsed() < Duration::from_millis(500), "answered at once");
        refused.push(format!("anon-{order}"));
    }
    let accepted =
        tokio::task::spawn_blocking(move || holders.into_iter().map(|h| h.join().unwrap()).filter(|ok| *ok).count())
            .await
            .unwrap();
    assert_eq!(accepted, 8, "the webhooks that held the slots were answered 200");
    // Every 200 is stored; no refused webhook is.
    let pending = eventually("the holders' webhooks", Duration::from_secs(10), || async {
        let pending = app.store.pending(100).await.unwrap();
        (pending.len() >= 8).then_some(pending)
    })
    .await;
    assert_eq!(pending.len(), 8);
    assert!(
        pending.iter().all(|p| p.shopper_key.starts_with("anon-HOLD-")),
        "{pending:?}"
    );
    for shopper in refused {
        assert!(!pending.iter().any(|p| p.shopper_key == shopper));
    }
    // Once the slots are free, webhooks are taken again.
    app.deliver(&serde_json::from_slice::<Value>(&webhook("AFTER")).unwrap())
        .await;
}

/// Clients that trickle their bodies, more of them than there are slots (`server.max_inflight`),
/// hold only the bytes they sent: signed webhooks arriving meanwhile are answered 200 at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_trickling_bodies_hold_no_slot_and_webhooks_still_flow() {
    let app = spawn_app_with(|s| {
        s.server.max_inflight = 8;
        s.server.read_timeout_ms = 10_000;
        s.cdp.dry_run = false;
        s.cdp.base_url = Some(NOWHERE.into());
        s.cdp.client_key = ordercloud_cdp_forwarder::config::Secret::new("ck");
        s.ordercloud.api_urls = vec![NOWHERE.into()];
    })
    .await;
    let addr = app.addr;
    let hash = signature::sign(KEY.as_bytes(), b"whatever");
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    let stop = std::sync::Arc::new(AtomicBool::new(false));
    let rounds = std::sync::Arc::new(AtomicUsize::new(0));
    let (stopping, trickled) = (stop.clone(), rounds.clone());
    let slow = std::thread::spawn(move || {
        let mut streams: Vec<TcpStream> = (0..40)
            .map(|_| {
                let mut s = TcpStream::connect(addr).unwrap();
                s.write_all(
                    format!(
                        "POST /webhooks/ordercloud HTTP/1.1\r\nHost: x\r\nX-oc-hash: {hash}\r\n\
                         Content-Type: application/json\r\nContent-Length: 100000\r\n\r\n{{"
                    )
                    .as_bytes(),
                )
                .unwrap();
                s
            })
            .collect();
        // A byte every 100 ms each: never enough, never quite silent.
        while !stopping.load(Ordering::SeqCst) {
            for s in &mut streams {
                let _ = s.write_all(b" ");
            }
            trickled.fetch_add(1, Ordering::SeqCst);
            std::thread::sleep(Duration::from_millis(100));
        }
    });
    // The trickling bodies have been arriving for a while before the webhooks are sent.
    eventually("the bodies to trickle", Duration::from_secs(5), || async {
        (rounds.load(Ordering::SeqCst) >= 3).then_some(())
    })
    .await;
    for i in 0..20 {
        let order = format!("FLOW-{i}");
        let answer = app.post_signed(&webhook(&order), KEY).await;
        assert_eq!(answer.status(), 200, "{order}");
    }
    stop.store(true, Ordering::SeqCst);
    slow.join().unwrap();
}

/// Headers larger than a webhook's ever are refused (431) and the connection closed: what a client
/// makes the service buffer before anything is verified stays small, whatever it sends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_headers_are_refused_before_they_are_buffered() {
    let app = spawn_app_with(|_| {}).await;
    let addr = app.addr;
    let answer = tokio::task::spawn_blocking(move || {
        let mut s = TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let pad = "a".repeat(100_000);
        let _ =
            s.write_all(format!("POST /webhooks/ordercloud HTTP/1.1\r\nHost: x\r\nX-Pad: {pad}\r\n\r\n").as_bytes());
        let mut answer = Vec::new();
        let _ = s.read_to_end(&mut answer);
        String::from_utf8_lossy(&answer).to_string()
    })
    .await
    .unwrap();
    assert!(answer.starts_with("HTTP/1.1 431"), "{answer}");
}

/// 10,000 unsigned requests write a handful of log lines, not 10,000.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_unsigned_requests_write_a_handful_of_log_lines() {
    let dir = tempfile::tempdir().unwrap();
    let service = binary(dir.path(), &[]).await;
    let before = std::fs::read_to_string(dir.path().join("forwarder.log"))
        .unwrap()
        .lines()
        .count();
    let client = reqwest::Client::new();
    let url = service.url("/webhooks/ordercloud");
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..16 {
        let (client, url) = (client.clone(), url.clone());
        tasks.push(tokio::spawn(async move {
            for _ in 0..625 {
                let status = client.post(&url).body("{}").send().await.unwrap().status();
                assert_eq!(status, 401);
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let seconds = started.elapsed().as_secs() + 1;
    let log = std::fs::read_to_string(dir.path().join("forwarder.log")).unwrap();
    let lines = log.lines().count() - before;
    assert!(
        lines as u64 <= seconds + 2,
        "{lines} log lines for 10,000 refused requests in {seconds} s"
    );
    assert!(log.contains("\"suppressed\""), "the lines count what they suppressed");
}

/// Hash keys from the environment forgive whitespace (a space after a comma, a key file's trailing
/// newline); a key too short to be secret is refused at start with a clear message.
#[tokio::test]
async fn hash_keys_with_spaces_verify_and_short_ones_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let keys = format!("{KEY}, {SECOND_KEY}\n");
    let service = binary(dir.path(), &[("FORWARDER__ORDERCLOUD__HASH_KEYS", &keys)]).await;
    for key in [KEY, SECOND_KEY] {
        let body = webhook(&format!("KEY-{key}"));
        let status = reqwest::Client::new()
            .post(service.url("/webhooks/ordercloud"))
            .header("X-oc-hash", signature::sign(key.as_bytes(), &body))
            .body(body)
            .send()
            .await
            .unwrap()
            .status();
        assert_eq!(status, 200, "{key}");
    }
    drop(service);

    let out = std::process::Command::new(env!("CARGO_BIN_EXE_ordercloud-cdp-forwarder"))
        .current_dir(dir.path())
        .env("FORWARDER__ORDERCLOUD__HASH_KEYS", "ten-bytes!")
        .env("FORWARDER__CDP__DRY_RUN", "true")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("ordercloud.hash_keys") && err.contains("shorter than 16"),
        "{err}"
    );
    assert!(!err.contains("ten-bytes!"), "the key itself is not printed: {err}");
}

/// The database password never prints: not with `?password=`, not in a URL that does not parse,
/// not after a mistyped scheme — in `check-config`, in start-up errors, in the logs.
#[test]
fn the_database_password_never_prints() {
    let dir = tempfile::tempdir().unwrap();
    let run = |command: &str, url: &str| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_ordercloud-cdp-forwarder"))
            .current_dir(dir.path())
            .arg(command)
            .env("FORWARDER__ORDERCLOUD__HASH_KEYS", KEY)
            .env("FORWARDER__CDP__DRY_RUN", "true")
            .env("FORWARDER__STORE__URL", url)
            .env("FORWARDER__STORE__CONNECT_TIMEOUT_MS", "500")
            .env("FORWARDER__SERVER__LISTEN", "127.0.0.1:0")
            .output()
            .unwrap();
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    };
    for url in [
        "postgres://forwarder@127.0.0.1:1/db?password=pw-in-query-77&sslmode=disable",
        "postgres://forwarder:pw-in-userinfo-77@127.0.0.1:1/db",
        "postgres:/forwarder:pw-unparseable-77@db",
        "postgress://forwarder:pw-mistyped-77@db/x",
        "not a url pw-plain-77",
    ] {
        for command in ["check-config", "serve"] {
            let out = run(command, url);
            assert!(
                !out.contains("-77"),
                "{command} with {url} printed the password:\n{out}"
            );
        }
    }
    let out = run(
        "check-config",
        "postgres://forwarder@127.0.0.1:1/db?password=pw-in-query-77&sslmode=disable",
    );
    assert!(
        out.contains("sslmode=disable"),
        "what is not secret still shows:\n{out}"
    );
}

/// With `server.admin_listen`, `/metrics` and `/admin` are served there only; the public port's
/// readiness gives a status and no error text.
#[tokio::test]
async fn the_operations_listener_takes_metrics_and_admin_off_the_public_port() {
    let app = spawn_app_with(|s| {
        s.server.admin_listen = Some("127.0.0.1:0".into());
        s.admin.token = Some(ordercloud_cdp_forwarder::config::Secret::new("an-admin-token-0001"));
    })
    .await;
    let admin = app.admin_addr.expect("an operations listener");
    for path in ["/metrics", "/admin/dead-letters", "/admin/queue"] {
        assert_eq!(app.get(path).await.status(), 404, "{path} on the public port");
    }
    let client = reqwest::Client::new();
    let metrics = client.get(format!("http://{admin}/metrics")).send().await.unwrap();
    assert_eq!(metrics.status(), 200);
    assert!(metrics.text().await.unwrap().contains("forwarder_"));
    let listed = client
        .get(format!("http://{admin}/admin/dead-letters"))
        .bearer_auth("an-admin-token-0001")
        .send()
        .await
        .unwrap();
    assert_eq!(listed.status(), 200);
    let ready: Value = app.get("/health/ready").await.json().await.unwrap();
    assert_eq!(ready, json!({"status": "ready"}));
    let report = client.get(format!("http://{admin}/health/ready")).send().await.unwrap();
    assert_eq!(report.status(), 200);
}

/// A raw look at the SQLite file after a token was erased: no trace of it, in the file or its WAL.
#[tokio::test]
async fn an_erased_token_leaves_no_trace_in_the_sqlite_file() {
    if std::env::var("TEST_STORE").as_deref() == Ok("postgres") {
        return; // a SQLite file's bytes
    }
    let world = crate::world::World::start().await;
    let mut shopper = world.registered("buyer1", "erased", crate::world::WEB_CLIENT);
    shopper.open_cart("O-ERASED");
    shopper.add("L1", "SKU", 1, 1.0).await;
    world.drained().await;
    let token = shopper.token.clone();
    let dir = world.app.dir().to_path_buf();
    let crate::world::World { app, .. } = world;
    let _dir = app.stop().await;
    let signature_part = token.rsplit('.').next().unwrap().to_string();
    let payload_part = token.split('.').nth(1).unwrap().to_string();
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        let bytes = std::fs::read(&path).unwrap_or_default();
        for part in [&token, &payload_part, &signature_part] {
            assert!(
                !bytes.windows(part.len()).any(|w| w == part.as_bytes()),
                "{} holds the erased token",
                path.display()
            );
        }
    }
}

/// A dry run (`cdp.dry_run`: events logged and counted as delivered, never sent) says so at start,
/// where an operator who left it on in production looks; a service that sends to CDP does not.
#[tokio::test]
async fn a_dry_run_says_so_at_start() {
    // The log once it says the service serves (the warning comes before).
    async fn log_once_serving(dir: &std::path::Path) -> String {
        eventually("the service to log that it serves", Duration::from_secs(10), || async {
            let log = std::fs::read_to_string(dir.join("forwarder.log")).unwrap_or_default();
            log.contains("\"serving\"").then_some(log)
        })
        .await
    }
    let warned = |log: &str| {
        log.lines()
            .any(|l| l.contains("\"WARN\"") && l.contains("cdp.dry_run is on"))
    };
    let dir = tempfile::tempdir().unwrap();
    let service = binary(dir.path(), &[("FORWARDER__CDP__DRY_RUN", "true")]).await;
    assert!(warned(&log_once_serving(dir.path()).await));
    drop(service);
    let dir = tempfile::tempdir().unwrap();
    let service = binary(dir.path(), &[("FORWARDER__CDP__DRY_RUN", "false")]).await;
    assert!(!warned(&log_once_serving(dir.path()).await));
    drop(service);
}

/// The service's listeners queue a burst of connections far past the 128 `TcpListener::bind` gives:
/// 400 clients connecting at once, none accepted yet, all complete their handshake at once. With 128,
/// the kernel dropped the handshakes past the queue and those clients waited a second for their
/// retransmission (`slow_clients_are_cut_off_and_signed_webhooks_still_flow` then saw a webhook take
/// over a second, once in about ten runs on PostgreSQL).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_connections_is_queued_for_the_accept_loop_without_a_retransmission() {
    let listener = ordercloud_cdp_forwarder::listen("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let connects = (0..400).map(|_| {
        tokio::spawn(async move {
            // Well under the kernel's first retransmission of a dropped handshake (1 s).
            tokio::time::timeout(Duration::from_millis(500), tokio::net::TcpStream::connect(addr)).await
        })
    });
    let mut waited = 0;
    let mut streams = Vec::new();
    for connect in connects.collect::<Vec<_>>() {
        match connect.await.unwrap() {
            Ok(stream) => streams.push(stream.unwrap()),
            Err(_) => waited += 1,
        }
    }
    assert_eq!(waited, 0, "{waited} of 400 connections waited for a retransmission");
    drop((streams, listener));
}
