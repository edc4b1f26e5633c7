//! The KV handoff between real processes: a client that leaves at any point frees everything
//! it held on every worker within a second; two routers in front of the same workers never mix
//! two requests up; a hostile KV import is refused and the worker keeps serving.

mod common;

use std::time::{Duration, Instant};

use common::*;
use pdfleet::fleet::Fleet;
use pdfleet::load::{parse_event, SseParser, StreamEvent};
use pdfleet_api::proto::worker_client::WorkerClient;
use pdfleet_api::proto::{kv_chunk, KvChunk, KvData, KvHeader, SamplingParams};
use pdfleet_api::{BackendKind, KvDtype, PoolMode as Mode, RequestId};
use pdfleet_worker::backend;
use serde_json::json;

/// Where a client leaves.
#[derive(Clone, Copy, Debug)]
enum Leave {
    /// A streamed request whose prompt runs on the prefill worker (no header sent yet).
    DuringPrefill,
    /// A plain (not streamed) request decoding on the decode worker: the client never saw a
    /// header.
    BeforeHeaders,
    AfterFirstToken,
    /// Twenty tokens in.
    MidStream,
}

/// Polls until the worker named `role`-… runs a sequence.
async fn until_running(fleet: &Fleet, role: &str) {
    let w = fleet
        .workers
        .iter()
        .find(|w| w.name.starts_with(role))
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while holding(w.http.as_deref().unwrap()).await.running < 1.0 {
        assert!(
            Instant::now() < deadline,
            "the {role} worker never ran the request"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Sends a request and goes away at `leave`; returns when it left and the tokens it had.
async fn leave_at(fleet: &Fleet, prompt: &[u32], leave: Leave) -> (Instant, usize) {
    let client = reqwest::Client::new();
    let stream = !matches!(leave, Leave::BeforeHeaders);
    let body = json!({"prompt": prompt, "max_tokens": 1040, "stream": stream});
    let send = client
        .post(format!("{}/v1/completions", fleet.url))
        .json(&body)
        .send();
    match leave {
        Leave::DuringPrefill | Leave::BeforeHeaders => {
            let call = tokio::spawn(send);
            let role = if matches!(leave, Leave::DuringPrefill) {
                "prefill"
            } else {
                "decode"
            };
            until_running(fleet, role).await;
            assert!(
                !call.is_finished(),
                "{leave:?}: the response came before the client left"
            );
            call.abort();
            let _ = call.await;
            (Instant::now(), 0)
        }
        Leave::AfterFirstToken | Leave::MidStream => {
            let want = if matches!(leave, Leave::AfterFirstToken) {
                1
            } else {
                20
            };
            let mut r = send.await.unwrap();
            let (mut parser, mut events, mut n) = (SseParser::new(), Vec::new(), 0);
            while n < want {
                let chunk = r.chunk().await.unwrap().expect("the stream went on");
                parser.push(&chunk, &mut events);
                for e in events.drain(..) {
                    if let StreamEvent::Tokens { token_ids, .. } = parse_event(&e) {
                        n += token_ids.len();
                    }
                }
            }
            drop(r);
            (Instant::now(), n)
        }
    }
}

async fn clients_that_leave_free_everything(fleet: &Fleet) {
    // Long enough that the prompt takes a few engine steps and the answer many more.
    let prompt: Vec<u32> = (0..1000).map(|i| (i * 7 % 100) as u32).collect();
    for leave in [
        Leave::DuringPrefill,
        Leave::BeforeHeaders,
        Leave::AfterFirstToken,
        Leave::MidStream,
    ] {
        let (left_at, tokens) = leave_at(fleet, &prompt, leave).await;
        let waited = until_nothing_held(fleet, Duration::from_secs(5))
            .await
            .unwrap_or_else(|held| panic!("{leave:?}: still held after 5 s: {held:?}"));
        let since_left = left_at.elapsed().min(waited + Duration::from_millis(50));
        eprintln!("{leave:?} ({tokens} tokens in): all freed {since_left:?} after the client left");
        assert!(
            since_left <= Duration::from_secs(1),
            "{leave:?}: freed only {since_left:?} after the client left"
        );
    }
    // The fleet still serves.
    let (status, body) = complete(&fleet.url, json!({"prompt": [1, 2, 3], "max_tokens": 4})).await;
    assert_eq!(status, 200, "{body}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_client_that_leaves_at_any_point_frees_every_block_within_a_second() {
    // A cancel takes effect at the next step boundary: chunked prefill keeps steps short.
    let flags = [&BIG[..], &["--chunk-size", "128"]].concat();
    let fleet = start(Mode::Disaggregated, &flags, &[]).await;
    clients_that_leave_free_everything(&fleet).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn on_a_gpu_a_client_that_leaves_frees_device_transfers_too() {
    if !backend::cuda::device_available() {
        eprintln!("skipped: no CUDA device");
        return;
    }
    let flags = [&BIG[..], &["--chunk-size", "128"]].concat();
    let mut cfg = config(Mode::Disaggregated, &flags, &[]);
    cfg.worker.backend = BackendKind::Cuda;
    cfg.worker.kv_transport = pdfleet_api::KvTransportPolicy::Device;
    cfg.gpus = backend::cuda::device_count().min(2);
    let mut fleet = Fleet::start(&cfg).unwrap();
    fleet.wait_ready(Duration::from_secs(120)).await.unwrap();
    clients_that_leave_free_everything(&fleet).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn two_routers_never_give_one_client_anothers_tokens() {
    let mut cfg = config(Mode::Disaggregated, &[], &[]);
    cfg.routers = 2;
    let mut fleet = Fleet::start(&cfg).unwrap();
    fleet.wait_ready(Duration::from_secs(60)).await.unwrap();
    let prompts: Vec<Vec<u32>> = (0..32u64)
        .map(|i| {
            (0..(5 + i * 11))
                .map(|j| ((i * 17 + j * 3) % 100) as u32)
                .collect()
        })
        .collect();
    let want = expected(&prompts, 24);
    let urls: Vec<String> = fleet.routers.iter().map(|r| r.addr.clone()).collect();
    let calls: Vec<_> = prompts
        .iter()
        .enumerate()
        .map(|(i, p)| {
            let url = urls[i % urls.len()].clone();
            let body = json!({"prompt": p, "max_tokens": 24, "stream": i % 4 == 0});
            tokio::spawn(async move {
                if body["stream"] == true {
                    stream(&url, body).await.0
                } else {
                    let (status, v) = complete(&url, body).await;
                    assert_eq!(status, 200, "{v}");
                    tokens_of(&v)
                }
            })
        })
        .collect();
    for (i, (call, w)) in calls.into_iter().zip(&want).enumerate() {
        assert_eq!(&call.await.unwrap(), w, "request {i}");
    }
    fleet.stop();
}

/// A KV push as a prefill worker would send it, with its header's fields as given.
fn push(tokens: Vec<u32>, prompt_len: u32, max_tokens: u32, num_blocks: u32) -> Vec<KvChunk> {
    // The primer model: one layer, kv_dim 32, f32; block size 16.
    let total = num_blocks as usize * 16 * 32 * 2 * 4;
    let data = vec![0u8; total];
    let header = KvHeader {
        id: Some(RequestId::random().to_proto()),
        tokens,
        prompt_len,
        params: Some(SamplingParams {
            max_tokens,
            ..Default::default()
        }),
        num_blocks,
        block_size: 16,
        n_layers: 1,
        kv_dim: 32,
        wire_dtype: KvDtype::F32.to_proto() as i32,
        total_bytes: total as u64,
    };
    let mut msgs = vec![KvChunk {
        part: Some(kv_chunk::Part::Header(header)),
    }];
    msgs.push(KvChunk {
        part: Some(kv_chunk::Part::Data(KvData {
            index: 0,
            crc32: crc32(&data),
            data,
        })),
    });
    msgs
}

/// CRC-32 (IEEE), as the wire format asks.
fn crc32(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in data {
        crc ^= b as u32;
        for _ in 0..8 {
            crc = if crc & 1 == 1 {
                (crc >> 1) ^ 0xEDB8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

#[tokio::test(flavor = "multi_thread")]
async fn a_hostile_kv_import_is_refused_and_the_worker_keeps_serving() {
    let fleet = start(Mode::Disaggregated, &[], &[]).await;
    let decode = fleet
        .workers
        .iter()
        .find(|w| w.name.starts_with("decode"))
        .unwrap();
    let mut client = WorkerClient::connect(decode.addr.clone()).await.unwrap();
    let prompt: Vec<u32> = (0..20).collect();
    let with_first = |t: u32| [&prompt[..], &[t]].concat();
    for (why, msgs) in [
        (
            "a first token outside the vocabulary",
            push(with_first(100), 20, 8, 2),
        ),
        (
            "a first token far outside it",
            push(with_first(u32::MAX), 20, 8, 2),
        ),
        (
            "longer than the model's context",
            push(vec![1; 2047], 2046, 8, 128),
        ),
        (
            "a prompt length past the tokens",
            push(with_first(5), 40, 8, 2),
        ),
        (
            "blocks that do not fit the tokens",
            push(with_first(5), 20, 8, 3),
        ),
    ] {
        let e = client.push_kv(tokio_stream::iter(msgs)).await.unwrap_err();
        assert_eq!(e.code(), tonic::Code::InvalidArgument, "{why}: {e:?}");
    }
    let healthz = reqwest::get(format!("{}/healthz", decode.http.as_deref().unwrap()))
        .await
        .unwrap();
    assert_eq!(healthz.status(), 200, "the worker stays healthy");
    until_nothing_held(&fleet, Duration::from_secs(1))
        .await
        .expect("refused imports hold nothing");
    let ps = prompts();
    let want = expected(&ps, 12);
    for (p, w) in ps.iter().zip(&want) {
        let (status, body) = complete(&fleet.url, json!({"prompt": p, "max_tokens": 12})).await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(&tokens_of(&body), w);
    }
}
