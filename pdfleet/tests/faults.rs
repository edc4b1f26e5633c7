//! A worker whose engine breaks: its requests end with an error instead of hanging, and its
//! liveness and readiness probes say so, so that Kubernetes restarts it and the router stops
//! sending it work.

mod common;

use std::time::{Duration, Instant};

use common::*;
use pdfleet::fleet::Fleet;
use pdfleet_api::worker_args::EngineFault;
use pdfleet_api::PoolMode as Mode;
use serde_json::json;

async fn probe(http: &str, path: &str) -> u16 {
    reqwest::get(format!("{http}{path}"))
        .await
        .map(|r| r.status().as_u16())
        .unwrap_or(0)
}

async fn until_unhealthy(http: &str, within: Duration) -> Duration {
    let start = Instant::now();
    loop {
        if probe(http, "/healthz").await == 503 && probe(http, "/readyz").await == 503 {
            return start.elapsed();
        }
        assert!(
            start.elapsed() < within,
            "the worker still says it is healthy"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn broken_fleet(fault: EngineFault) -> Fleet {
    let mut cfg = config(Mode::Colocated, &[], &["--max-retries", "0"]);
    cfg.unified = 1;
    cfg.worker.inject_fault = Some(fault);
    let mut fleet = Fleet::start(&cfg).unwrap();
    // The readiness probe is one request of one step.
    fleet.wait_ready(Duration::from_secs(60)).await.unwrap();
    fleet
}

#[tokio::test(flavor = "multi_thread")]
async fn an_engine_that_panics_fails_its_requests_and_its_probes() {
    let fleet = broken_fleet(EngineFault::PanicAtStep(4)).await;
    let http = fleet.workers[0].http.clone().unwrap();
    assert_eq!(probe(&http, "/healthz").await, 200);
    let call = complete(&fleet.url, json!({"prompt": [1, 2, 3], "max_tokens": 10}));
    let (status, body) = tokio::time::timeout(Duration::from_secs(10), call)
        .await
        .expect("the request ended instead of hanging");
    assert_eq!(status, 502, "{body}");
    let took = until_unhealthy(&http, Duration::from_secs(2)).await;
    eprintln!("unhealthy {took:?} after the request failed");
    // The router stops sending it work.
    tokio::time::sleep(Duration::from_millis(700)).await;
    let (status, body) = complete(&fleet.url, json!({"prompt": [1], "max_tokens": 2})).await;
    assert_eq!(status, 503, "{body}");
}

#[tokio::test(flavor = "multi_thread")]
async fn an_engine_whose_steps_keep_failing_fails_its_requests_and_its_probes() {
    let fleet = broken_fleet(EngineFault::FailStepsFrom(2)).await;
    let http = fleet.workers[0].http.clone().unwrap();
    for i in 0..3 {
        let call = complete(&fleet.url, json!({"prompt": [1, 2, 3], "max_tokens": 10}));
        let (status, body) = tokio::time::timeout(Duration::from_secs(10), call)
            .await
            .expect("the request ended instead of hanging");
        assert!(status >= 500, "request {i}: {status} {body}");
        if i < 2 {
            assert_eq!(
                probe(&http, "/healthz").await,
                200,
                "one failed step is not death"
            );
        }
    }
    until_unhealthy(&http, Duration::from_secs(2)).await;
}
