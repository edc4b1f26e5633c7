//! A real local fleet (worker and router processes on loopback) against the engine's own
//! greedy tokens, and its failure modes: bad requests, overload, a decode worker killed
//! mid-stream, and a SIGTERM drain that loses no request. Needs the workspace's binaries
//! (`cargo test --release --workspace` builds them).

mod common;

use std::time::Duration;

use common::*;
use pdfleet::fleet::{terminate, Fleet};
use pdfleet_api::metrics::{router, sum, sum_in_text, worker};
use pdfleet_api::{BackendKind, KvTransport, PoolMode as Mode};
use pdfleet_worker::backend;
use pdfleet_worker::weights::Weights;
use serde_json::{json, Value};

#[tokio::test(flavor = "multi_thread")]
async fn completions_equal_the_engine_in_both_modes_streamed_or_not() {
    let ps = prompts();
    let want = expected(&ps, 20);
    for mode in [Mode::Disaggregated, Mode::Colocated] {
        let fleet = start(mode, &[], &[]).await;
        for (p, w) in ps.iter().zip(&want) {
            let (status, body) = complete(&fleet.url, json!({"prompt": p, "max_tokens": 20})).await;
            assert_eq!(status, 200, "{body}");
            assert_eq!(&tokens_of(&body), w, "{mode:?} non-streamed");
            assert_eq!(body["choices"][0]["finish_reason"], "length");
            let (tokens, end) = stream(
                &fleet.url,
                json!({"prompt": p, "max_tokens": 20, "stream": true}),
            )
            .await;
            assert_eq!(&tokens, w, "{mode:?} streamed");
            assert_eq!(end, StreamEnd::Finished("length".into()));
        }
        // A text prompt goes through the toy tokenizer and comes back as text.
        let (status, body) = complete(
            &fleet.url,
            json!({"prompt": "Hello, fleet", "max_tokens": 4}),
        )
        .await;
        assert_eq!(
            (status, body["choices"][0]["text"].as_str().unwrap().len()),
            (200, 4)
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_requests_get_a_400_naming_the_field_and_overload_a_429() {
    let fleet = start(
        Mode::Disaggregated,
        &[],
        &["--max-inflight-per-worker", "1"],
    )
    .await;
    let client = reqwest::Client::new();
    let r = client
        .post(format!("{}/v1/completions", fleet.url))
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let v: Value = r.json().await.unwrap();
    assert!(v["error"]["message"]
        .as_str()
        .unwrap()
        .contains("not valid JSON"));
    for (body, param) in [
        (json!({"prompt": ""}), "prompt"),
        (json!({"prompt": [1, 2, 100]}), "prompt"),
        (json!({"prompt": [1], "max_tokens": 0}), "max_tokens"),
        (json!({"prompt": [1], "max_tokens": 5000}), "max_tokens"),
        (json!({"prompt": [1], "temperature": "hot"}), "temperature"),
        (json!({"prompt": [1], "stop": ["."]}), "stop"),
        (json!({"prompt": [1], "logprobs": 5}), "logprobs"),
    ] {
        let (status, v) = complete(&fleet.url, body.clone()).await;
        assert_eq!(
            (status, v["error"]["param"].as_str()),
            (400, Some(param)),
            "{body}"
        );
    }
    // A body over the limit is refused as a whole, in the same error shape.
    let huge = format!(r#"{{"prompt": "{}"}}"#, "a".repeat(2 << 20));
    let r = client
        .post(format!("{}/v1/completions", fleet.url))
        .body(huge)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 413);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"]["param"], "body", "{v}");
    // One request in flight per worker: concurrent long ones overflow into 429 with Retry-After,
    // and every request is either served in full or refused, never lost.
    let long: Vec<u32> = (0..200).map(|i| i % 100).collect();
    let sends: Vec<_> = (0..8)
        .map(|_| {
            let (client, url, long) = (client.clone(), fleet.url.clone(), long.clone());
            tokio::spawn(async move {
                let r = client
                    .post(format!("{url}/v1/completions"))
                    .json(&json!({"prompt": long, "max_tokens": 100}))
                    .send()
                    .await
                    .unwrap();
                let retry_after = r
                    .headers()
                    .get("retry-after")
                    .map(|v| v.to_str().unwrap().to_string());
                let status = r.status().as_u16();
                let body: Value = r.json().await.unwrap();
                (status, retry_after, body)
            })
        })
        .collect();
    let mut served = 0;
    let mut refused = 0;
    for s in sends {
        let (status, retry_after, body) = s.await.unwrap();
        match status {
            200 => {
                assert_eq!(tokens_of(&body).len(), 100);
                served += 1;
            }
            429 => {
                assert_eq!(retry_after.as_deref(), Some("1"));
                assert!(body["error"]["message"]
                    .as_str()
                    .unwrap()
                    .contains("in-flight limit"));
                refused += 1;
            }
            other => panic!("unexpected status {other}: {body}"),
        }
    }
    assert!(
        served >= 1 && refused >= 1,
        "served {served}, refused {refused}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_decode_worker_killed_mid_stream_ends_the_stream_with_an_error() {
    let mut fleet = start(Mode::Disaggregated, &BIG, &[]).await;
    let url = fleet.url.clone();
    let prompt: Vec<u32> = (0..600).map(|i| (i * 13 % 100) as u32).collect();
    let reader = tokio::spawn(async move {
        tokio::time::timeout(
            Duration::from_secs(60),
            stream(
                &url,
                json!({"prompt": prompt, "max_tokens": 1400, "stream": true}),
            ),
        )
        .await
    });
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let decode = fleet
        .workers
        .iter_mut()
        .find(|w| w.name.starts_with("decode"))
        .unwrap();
    decode.child.kill().unwrap();
    let (tokens, end) = reader
        .await
        .unwrap()
        .expect("the stream ended instead of hanging");
    assert!(
        !tokens.is_empty() && tokens.len() < 1400,
        "got {} tokens",
        tokens.len()
    );
    assert!(
        matches!(end, StreamEnd::Error(ref m) if m.contains("lost")),
        "{end:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_drains_the_decode_worker_without_losing_a_request() {
    let mut fleet = start(Mode::Disaggregated, &BIG, &[]).await;
    let ps = prompts();
    let want = expected_with(&big_weights(), &ps, 150);
    let mut started = Vec::new();
    let readers: Vec<_> = ps
        .iter()
        .map(|p| {
            let (url, p) = (fleet.url.clone(), p.clone());
            let (tx, rx) = tokio::sync::oneshot::channel();
            started.push(rx);
            tokio::spawn(async move {
                let out = stream_notify(
                    &url,
                    json!({"prompt": p, "max_tokens": 150, "stream": true}),
                    Some(tx),
                )
                .await;
                (out, std::time::Instant::now())
            })
        })
        .collect();
    // Every request is past its handoff (first token out, KV on the decode worker) when the
    // decode worker is told to stop.
    for rx in started {
        rx.await.unwrap();
    }
    let decode = fleet
        .workers
        .iter_mut()
        .find(|w| w.name.starts_with("decode"))
        .unwrap();
    terminate(&decode.child);
    let sigterm_at = std::time::Instant::now();
    let mut finished_after = 0;
    for (r, w) in readers.into_iter().zip(&want) {
        let ((tokens, end), done_at) = r.await.unwrap();
        assert_eq!(end, StreamEnd::Finished("length".into()));
        assert_eq!(&tokens, w);
        finished_after += usize::from(done_at > sigterm_at);
    }
    // The drain had work to finish: requests were still streaming when SIGTERM arrived.
    assert!(
        finished_after > 0,
        "every request finished before SIGTERM; the test proved nothing"
    );
    let status = tokio::task::spawn_blocking(move || {
        let decode = fleet
            .workers
            .iter_mut()
            .find(|w| w.name.starts_with("decode"))
            .unwrap();
        decode.child.wait().unwrap()
    })
    .await
    .unwrap();
    assert!(
        status.success(),
        "the drained worker exits cleanly: {status}"
    );
}

/// The prefill worker's KV bytes sent, by transport, from its `/metrics`.
async fn kv_bytes_sent(fleet: &Fleet, transport: KvTransport) -> f64 {
    let prefill = fleet
        .workers
        .iter()
        .find(|w| w.name.starts_with("prefill"))
        .unwrap();
    let text = reqwest::get(format!("{}/metrics", prefill.http.as_ref().unwrap()))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    sum_in_text(
        &text,
        worker::KV_TRANSFER_BYTES,
        &["direction=\"send\"", &format!("transport=\"{transport}\"")],
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn kv_falls_back_to_grpc_when_the_decode_cache_cannot_be_shared() {
    // CPU workers: the decode worker has no device cache to offer, so `auto` goes over gRPC.
    let ps = prompts();
    let want = expected(&ps, 8);
    let fleet = start(Mode::Disaggregated, &["--kv-transport", "auto"], &[]).await;
    for (p, w) in ps.iter().zip(&want) {
        let (status, body) = complete(&fleet.url, json!({"prompt": p, "max_tokens": 8})).await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(&tokens_of(&body), w);
    }
    assert!(kv_bytes_sent(&fleet, KvTransport::Grpc).await > 0.0);
    assert_eq!(kv_bytes_sent(&fleet, KvTransport::Device).await, 0.0);
}

#[tokio::test(flavor = "multi_thread")]
async fn on_a_gpu_kv_moves_device_to_device_and_tokens_stay_the_engines() {
    if !backend::cuda::device_available() {
        eprintln!("skipped: no CUDA device");
        return;
    }
    // Long prompts too, so that sequences span many blocks.
    let mut ps = prompts();
    ps.push((0..700).map(|j| (j * 13 % 100) as u32).collect());
    let want = expected(&ps, 20);
    // Two GPUs: prefill on one, decode on the other, KV over the peer link.
    let gpus = backend::cuda::device_count().min(2);
    eprintln!("workers over {gpus} GPU(s)");
    let mut cfg = config(
        Mode::Disaggregated,
        &["--kv-transport", "device", "--num-blocks", "1024"],
        &[],
    );
    cfg.worker.backend = BackendKind::Cuda;
    cfg.gpus = gpus;
    let mut fleet = Fleet::start(&cfg).unwrap();
    fleet.wait_ready(Duration::from_secs(120)).await.unwrap();
    for (p, w) in ps.iter().zip(&want) {
        let (status, body) = complete(&fleet.url, json!({"prompt": p, "max_tokens": 20})).await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(&tokens_of(&body), w, "prompt of {}", p.len());
    }
    let device = kv_bytes_sent(&fleet, KvTransport::Device).await;
    let blocks: usize = ps.iter().map(|p| p.len().div_ceil(16)).sum();
    // Per block: every layer's K and V, 16 tokens of kv_dim f32 values.
    let c = Weights::embedded_primer().config;
    assert_eq!(
        device as usize,
        blocks * 2 * c.n_layers * 16 * c.kv_dim() * 4
    );
    assert_eq!(kv_bytes_sent(&fleet, KvTransport::Grpc).await, 0.0);
    fleet.stop();
}

async fn scrape(base: &str) -> String {
    reqwest::get(format!("{base}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}

/// The router's and the first prefill and decode workers' metrics, as text.
async fn scrape_fleet(fleet: &Fleet) -> [String; 3] {
    let worker = |prefix: &str| {
        let w = fleet
            .workers
            .iter()
            .find(|w| w.name.starts_with(prefix))
            .unwrap();
        w.http.clone().unwrap()
    };
    [
        scrape(&fleet.url).await,
        scrape(&worker("prefill")).await,
        scrape(&worker("decode")).await,
    ]
}

#[tokio::test(flavor = "multi_thread")]
async fn the_planners_signals_add_up_to_the_requests_served() {
    let ps = prompts();
    let max_tokens = 7;
    let fleet = start(Mode::Disaggregated, &[], &[]).await;
    let before = scrape_fleet(&fleet).await;
    for p in &ps {
        let (status, body) =
            complete(&fleet.url, json!({"prompt": p, "max_tokens": max_tokens})).await;
        assert_eq!(status, 200, "{body}");
    }
    let after = scrape_fleet(&fleet).await;
    // What one process's series grew by over the requests.
    let grew = |who: usize, name: &str, labels: &[&str]| {
        sum_in_text(&after[who], name, labels) - sum_in_text(&before[who], name, labels)
    };
    let (router_, prefill, decode) = (0, 1, 2);
    let n = ps.len() as f64;
    let prompt_tokens: usize = ps.iter().map(Vec::len).sum();
    assert_eq!(grew(router_, router::ARRIVALS, &[]), n);
    assert_eq!(
        grew(router_, router::PROMPT_TOKENS, &[]),
        prompt_tokens as f64
    );
    let tokens = n * max_tokens as f64;
    assert_eq!(grew(router_, router::REQUESTED_TOKENS, &[]), tokens);
    assert_eq!(grew(router_, router::GENERATED_TOKENS, &[]), tokens);
    // Every request's time to first token is split into four parts that add up to it.
    let parts: f64 = ["queue", "prefill", "transfer", "admission"]
        .iter()
        .map(|part| {
            let label = format!("part=\"{part}\"");
            let count = grew(router_, &format!("{}_count", router::TTFT_PART), &[&label]);
            assert_eq!(count, n, "{part}");
            grew(router_, &sum(router::TTFT_PART), &[&label])
        })
        .sum();
    let ttft = grew(router_, &sum(router::TTFT), &[]);
    assert!(
        parts <= ttft + 1e-6 && parts > 0.5 * ttft,
        "parts {parts} s of {ttft} s"
    );
    // Prefill computed the prompts (less what the prefix cache had) in measured busy time.
    let computed = grew(prefill, worker::PREFILL_TOKENS, &[]);
    assert!(
        computed > 0.0 && computed <= prompt_tokens as f64,
        "{computed}"
    );
    assert!(grew(prefill, worker::PREFILL_BUSY_SECONDS, &[]) > 0.0);
    assert_eq!(
        sum_in_text(&after[prefill], worker::QUEUED_PROMPT_TOKENS, &[]),
        0.0
    );
    // Decode made every token after the first, in steps without prompt tokens.
    let batch = grew(decode, worker::DECODE_STEP_BATCH, &[]);
    assert_eq!(batch, n * (max_tokens - 1) as f64);
    let steps = grew(decode, worker::DECODE_STEPS, &[]);
    let squared = grew(decode, worker::DECODE_STEP_BATCH_SQUARED, &[]);
    assert!(steps > 0.0 && squared >= batch * batch / steps - 1e-9);
    assert!(grew(decode, worker::DECODE_STEP_SECONDS, &[]) > 0.0);
    assert_eq!(grew(decode, worker::PREFILL_TOKENS, &[]), 0.0);
}

/// A client that never finishes its request headers is cut off after the header timeout, one
/// that never finishes its body gets a 408 in the API's error shape, and connections past the
/// cap wait in the backlog without stopping a real request once the idle ones time out.
#[tokio::test(flavor = "multi_thread")]
async fn slow_and_idle_clients_are_cut_off_and_the_router_keeps_serving() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpStream;
    let fleet = start(
        Mode::Colocated,
        &[],
        &[
            "--header-timeout-s",
            "1",
            "--body-timeout-s",
            "1",
            "--max-connections",
            "16",
        ],
    )
    .await;
    let addr = fleet.url.trim_start_matches("http://").to_string();
    // Reads until the router closes the connection; what it sent, and how long that took.
    async fn until_closed(s: &mut TcpStream) -> (String, Duration) {
        let start = std::time::Instant::now();
        let mut got = Vec::new();
        tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut got))
            .await
            .expect("the router closes a stalled connection")
            .ok();
        (String::from_utf8_lossy(&got).into_owned(), start.elapsed())
    }

    let mut slowloris = TcpStream::connect(&addr).await.unwrap();
    slowloris
        .write_all(b"POST /v1/completions HTTP/1.1\r\nhost: x\r\n")
        .await
        .unwrap();
    let (_, took) = until_closed(&mut slowloris).await;
    assert!(
        took < Duration::from_secs(5),
        "headers cut off after {took:?}"
    );

    let mut slow_body = TcpStream::connect(&addr).await.unwrap();
    slow_body
        .write_all(b"POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: 100\r\n\r\n{\"prompt\"")
        .await
        .unwrap();
    let (reply, _) = until_closed(&mut slow_body).await;
    assert!(reply.starts_with("HTTP/1.1 408"), "{reply}");
    assert!(reply.contains(r#""param":"body""#), "{reply}");

    // Twice the cap of connections that send nothing: the cap's worth are cut off by the header
    // timeout, the rest then get their turn and are cut off too; a real request is served.
    let mut idle = Vec::new();
    for _ in 0..32 {
        idle.push(TcpStream::connect(&addr).await.unwrap());
    }
    let start = std::time::Instant::now();
    let (status, body) = complete(&fleet.url, json!({"prompt": [1, 2, 3], "max_tokens": 4})).await;
    assert_eq!(status, 200, "{body}");
    assert!(
        start.elapsed() < Duration::from_secs(8),
        "served after {:?}",
        start.elapsed()
    );
    drop(idle);
}
