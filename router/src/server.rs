//! `POST /v1/completions`: validates, picks workers, runs the request (prefill then decode, or
//! unified), and answers as JSON or server-sent events.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::extract::State;
use axum::response::sse::{Event, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use futures_util::StreamExt;
use pdfleet_api::failure;
use pdfleet_api::prefix::prefix_hashes;
use pdfleet_api::proto::worker_client::WorkerClient;
use pdfleet_api::proto::{
    self, AttachRequest, CancelKvRequest, GenerateRequest, Party, PrefillRequest, SamplingParams,
    TokenBatch,
};
use pdfleet_api::{FinishReason, PoolMode, RequestId, Role};
use serde_json::json;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tonic::transport::Channel;
use tonic::{Code, Status};

use crate::api::{self, ApiError, CompletionRequest, ModelLimits};
use crate::metrics::{RouterMetrics, TtftSplit, Verdict};
use crate::pool::{PickError, Pool};
use crate::tokenizer;

pub struct App {
    pub pool: Arc<Pool>,
    pub limits: ModelLimits,
    pub metrics: RouterMetrics,
    /// Other workers to try after one fails before any token.
    pub max_retries: usize,
    /// How long a client may take to send its request body.
    pub body_timeout: Duration,
}

/// What the generation task tells the response.
enum GenEvent {
    Token(u32),
    Finish(FinishReason),
    /// Before any token: the request failed as a whole (HTTP error).
    Refused(ApiError),
    /// After tokens went out: the stream ends with an error event.
    Broken(String),
}

/// The generation task of one request, aborted when the response that reads it is dropped (the
/// client went away): its in-flight calls to the workers are dropped with it, which the workers
/// see and free what the request held.
struct Generation(JoinHandle<()>);

impl Drop for Generation {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Until disarmed, tells the decode worker to drop what it holds for the request when dropped:
/// from before the prefill worker starts moving KV there until the Attach stream (whose own
/// end cancels) is open. Covers a client that leaves between the prefill and the attach.
struct DecodeClaim {
    client: WorkerClient<Channel>,
    id: RequestId,
    armed: bool,
}

impl Drop for DecodeClaim {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        let (mut client, id) = (self.client.clone(), self.id);
        tokio::spawn(async move {
            // Not the writer: blocks a prefill worker may still be writing stay quarantined there
            // until its own cancel or its lease ends.
            let _ = client
                .cancel_kv(CancelKvRequest {
                    id: Some(id.to_proto()),
                    writer_done: false,
                })
                .await;
        });
    }
}

fn pick_error(e: PickError) -> ApiError {
    match e {
        PickError::NoneHealthy(role) => ApiError::unavailable(format!("no healthy {role} worker")),
        PickError::AllBusy(role) => ApiError::overloaded(format!(
            "every {role} worker is at its in-flight limit; retry later"
        )),
    }
}

/// Why a request ends with no worker left to try: after workers refused it, their last word
/// (a full decode worker is overload, 429, not "no healthy worker"); otherwise the pick's reason.
fn no_worker_left(pick: PickError, last_refusal: Option<&Status>) -> ApiError {
    match last_refusal {
        Some(status) => refusal(status),
        None => pick_error(pick),
    }
}

/// A worker's refusal before any token, as the client should see it.
fn refusal(status: &Status) -> ApiError {
    match status.code() {
        Code::InvalidArgument => ApiError::invalid("prompt", status.message().to_string()),
        Code::ResourceExhausted => ApiError::overloaded(status.message().to_string()),
        _ => ApiError::upstream(format!("worker failed: {}", status.message())),
    }
}

/// Whether another worker of the same role may do better. A decode worker that has nothing for
/// the request (NotFound) or already something (AlreadyExists), or restarted (Aborted), is a
/// reason to pair with another decode worker, not to fail.
fn retryable(status: &Status) -> bool {
    matches!(
        status.code(),
        Code::Unavailable
            | Code::ResourceExhausted
            | Code::Unknown
            | Code::Internal
            | Code::Cancelled
            | Code::FailedPrecondition
            | Code::DeadlineExceeded
            | Code::Aborted
    ) || (failure::party(status) == Party::Decode
        && matches!(status.code(), Code::NotFound | Code::AlreadyExists))
}

fn sampling(req: &CompletionRequest) -> SamplingParams {
    SamplingParams {
        max_tokens: req.max_tokens as u32,
        temperature: req.temperature,
        seed: req.seed,
        stop_token: None,
    }
}

fn finish_of(batch: &TokenBatch) -> Option<FinishReason> {
    proto::FinishReason::try_from(batch.finish_reason)
        .ok()
        .and_then(FinishReason::from_proto)
}

async fn forward_tokens(mut stream: tonic::Streaming<TokenBatch>, tx: &mpsc::Sender<GenEvent>) {
    loop {
        match stream.message().await {
            Ok(Some(batch)) => {
                for &t in &batch.tokens {
                    if tx.send(GenEvent::Token(t)).await.is_err() {
                        return; // client gone: dropping the stream cancels the work upstream
                    }
                }
                if let Some(reason) = finish_of(&batch) {
                    let _ = tx.send(GenEvent::Finish(reason)).await;
                    return;
                }
            }
            Ok(None) => {
                let _ = tx
                    .send(GenEvent::Broken(
                        "the worker closed the stream before the last token".into(),
                    ))
                    .await;
                return;
            }
            Err(status) => {
                let _ = tx
                    .send(GenEvent::Broken(format!(
                        "worker lost mid-stream: {}",
                        status.message()
                    )))
                    .await;
                return;
            }
        }
    }
}

async fn run_unified(
    app: Arc<App>,
    req: CompletionRequest,
    mut id: RequestId,
    tx: mpsc::Sender<GenEvent>,
) {
    let hashes = prefix_hashes(&req.prompt, app.pool.block_size());
    let mut tried = Vec::new();
    let mut last_refusal = None;
    loop {
        let (worker, _inflight) = match app.pool.pick_by_prefix(Role::Unified, &hashes, &tried) {
            Ok(claimed) => claimed,
            Err(e) => {
                let refused = no_worker_left(e, last_refusal.as_ref());
                let _ = tx.send(GenEvent::Refused(refused)).await;
                return;
            }
        };
        let call = GenerateRequest {
            id: Some(id.to_proto()),
            prompt: req.prompt.clone(),
            params: Some(sampling(&req)),
        };
        match worker.client.clone().generate(call).await {
            Ok(resp) => return forward_tokens(resp.into_inner(), &tx).await,
            Err(status) if retryable(&status) && tried.len() < app.max_retries => {
                if status.code() == Code::Unavailable {
                    worker.mark_unhealthy();
                }
                app.metrics
                    .retries
                    .with_label_values(&[Role::Unified.as_str()])
                    .inc();
                tried.push(worker.addr.clone());
                last_refusal = Some(status);
                id = id.next_attempt();
            }
            Err(status) => {
                let _ = tx.send(GenEvent::Refused(refusal(&status))).await;
                return;
            }
        }
    }
}

async fn run_disaggregated(
    app: Arc<App>,
    req: CompletionRequest,
    mut id: RequestId,
    tx: mpsc::Sender<GenEvent>,
    start: Instant,
) {
    let hashes = prefix_hashes(&req.prompt, app.pool.block_size());
    let mut tried_prefill = Vec::new();
    let mut tried_decode = Vec::new();
    let mut last_refusal = None;
    let (decode, mut claim, _decode_inflight, first) = loop {
        let (prefill, _p) = match app
            .pool
            .pick_by_prefix(Role::Prefill, &hashes, &tried_prefill)
        {
            Ok(claimed) => claimed,
            Err(e) => {
                let refused = no_worker_left(e, last_refusal.as_ref());
                let _ = tx.send(GenEvent::Refused(refused)).await;
                return;
            }
        };
        let (decode, d) = match app
            .pool
            .pick_decode(&app.pool.domain_of(&prefill), &tried_decode)
        {
            Ok(claimed) => claimed,
            Err(e) => {
                let refused = no_worker_left(e, last_refusal.as_ref());
                let _ = tx.send(GenEvent::Refused(refused)).await;
                return;
            }
        };
        let claim = DecodeClaim {
            client: decode.client.clone(),
            id,
            armed: true,
        };
        let call = PrefillRequest {
            id: Some(id.to_proto()),
            prompt: req.prompt.clone(),
            params: Some(sampling(&req)),
            decode_addr: decode.addr.clone(),
        };
        match prefill.client.clone().prefill(call).await {
            Ok(resp) => break (decode, claim, d, resp.into_inner()),
            Err(status)
                if retryable(&status)
                    && tried_prefill.len() + tried_decode.len() < app.max_retries =>
            {
                // The prefill worker marks the errors that are the decode worker's (no room,
                // unreachable, restarted): then only the decode worker is replaced.
                if failure::party(&status) == Party::Decode {
                    app.metrics
                        .retries
                        .with_label_values(&[Role::Decode.as_str()])
                        .inc();
                    tried_decode.push(decode.addr.clone());
                } else {
                    if status.code() == Code::Unavailable {
                        prefill.mark_unhealthy();
                    }
                    app.metrics
                        .retries
                        .with_label_values(&[Role::Prefill.as_str()])
                        .inc();
                    tried_prefill.push(prefill.addr.clone());
                }
                last_refusal = Some(status);
                id = id.next_attempt();
            }
            Err(status) => {
                let _ = tx.send(GenEvent::Refused(refusal(&status))).await;
                return;
            }
        }
    };
    if first.transfer_seconds > 0.0 {
        app.metrics
            .kv_transfer_seconds
            .observe(first.transfer_seconds);
    }
    // The worker timed its queue, its prefill and the move; the rest of the wait was for a
    // decode worker with room (retries included) and the network.
    let worker_s = first.prefill_seconds + first.transfer_seconds;
    app.metrics.ttft_split(&TtftSplit {
        queue: first.queue_seconds,
        prefill: first.prefill_seconds - first.queue_seconds,
        transfer: first.transfer_seconds,
        admission: start.elapsed().as_secs_f64() - worker_s,
    });
    if tx.send(GenEvent::Token(first.first_token)).await.is_err() {
        return;
    }
    let finished = proto::FinishReason::try_from(first.finish_reason)
        .ok()
        .and_then(FinishReason::from_proto);
    if let Some(reason) = finished {
        let _ = tx.send(GenEvent::Finish(reason)).await;
        return;
    }
    match decode
        .client
        .clone()
        .attach(AttachRequest {
            id: Some(id.to_proto()),
        })
        .await
    {
        Ok(resp) => {
            // The stream owns the sequence now: dropping it cancels on the decode worker.
            claim.armed = false;
            forward_tokens(resp.into_inner(), &tx).await
        }
        Err(status) => {
            let _ = tx
                .send(GenEvent::Broken(format!(
                    "decode worker failed: {}",
                    status.message()
                )))
                .await;
        }
    }
}

fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Records latencies as tokens go out to the client, and judges the request against the SLO.
struct Timing {
    start: Instant,
    first: Option<Instant>,
    last: Option<Instant>,
    tokens: u32,
    metrics: RouterMetrics,
}

impl Timing {
    fn new(start: Instant, metrics: RouterMetrics) -> Self {
        Timing {
            start,
            first: None,
            last: None,
            tokens: 0,
            metrics,
        }
    }

    fn token(&mut self) {
        let now = Instant::now();
        match self.last {
            None => {
                self.metrics.ttft.observe((now - self.start).as_secs_f64());
                self.first = Some(now);
            }
            Some(prev) => self.metrics.itl.observe((now - prev).as_secs_f64()),
        }
        self.metrics.generated_tokens.inc();
        self.tokens += 1;
        self.last = Some(now);
    }

    fn finish(&self, outcome: &str) {
        self.metrics.requests.with_label_values(&[outcome]).inc();
        if outcome == "ok" {
            self.metrics.e2e.observe(self.start.elapsed().as_secs_f64());
        }
        let Some(slo) = self.metrics.slo() else {
            return;
        };
        let verdict = match (outcome, self.first) {
            ("ok", Some(first)) => {
                let ttft = (first - self.start).as_secs_f64();
                let mean_itl = (self.tokens > 1).then(|| {
                    let last = self.last.unwrap_or(first);
                    (last - first).as_secs_f64() / (self.tokens - 1) as f64
                });
                slo.judge(ttft, mean_itl)
            }
            // Served with no token (max_tokens reached at once): judged on time alone.
            ("ok", None) => slo.judge(self.start.elapsed().as_secs_f64(), None),
            // The client asked for something the pool cannot serve: not the pool's miss.
            ("refused", _) => return,
            _ => Verdict::MISSED,
        };
        self.metrics.judged(verdict);
    }
}

struct InflightMetric(RouterMetrics);

impl Drop for InflightMetric {
    fn drop(&mut self) {
        self.0.inflight.dec();
    }
}

pub async fn completions(State(app): State<Arc<App>>, body: axum::body::Body) -> Response {
    let start = Instant::now();
    let body = match api::read_body(body, app.body_timeout).await {
        Ok(b) => b,
        Err(e) => {
            app.metrics.requests.with_label_values(&["invalid"]).inc();
            return e.into_response();
        }
    };
    let req = match api::parse(&body, &app.limits) {
        Ok(r) => r,
        Err(e) => {
            app.metrics.requests.with_label_values(&["invalid"]).inc();
            return e.into_response();
        }
    };
    app.metrics.arrivals.inc();
    app.metrics.prompt_tokens.inc_by(req.prompt.len() as u64);
    app.metrics.requested_tokens.inc_by(req.max_tokens as u64);
    app.metrics.inflight.inc();
    let inflight = InflightMetric(app.metrics.clone());
    let id = RequestId::random();
    let request_id = id.completion_id();
    let (tx, mut rx) = mpsc::channel(64);
    // Whoever reads the response owns the generation: this handler, then the SSE stream.
    let generation = {
        let app = app.clone();
        let req = req.clone();
        Generation(match app.pool.mode() {
            PoolMode::Disaggregated => tokio::spawn(run_disaggregated(app, req, id, tx, start)),
            PoolMode::Colocated => tokio::spawn(run_unified(app, req, id, tx)),
        })
    };
    let mut timing = Timing::new(start, app.metrics.clone());
    // Up to the first token a failure is an HTTP error; after it, an error event in the stream.
    let first = match rx.recv().await {
        Some(GenEvent::Refused(e)) => {
            timing.finish(if e.status.as_u16() == 429 {
                "overloaded"
            } else {
                "refused"
            });
            return e.into_response();
        }
        Some(ev) => ev,
        None => {
            timing.finish("error");
            return ApiError::upstream("generation ended without a result").into_response();
        }
    };
    let created = now_unix();
    let model = app.limits.name.clone();
    if !req.stream {
        let mut tokens = Vec::new();
        let mut finish = None;
        let mut ev = Some(first);
        while let Some(e) = ev {
            match e {
                GenEvent::Token(t) => {
                    timing.token();
                    tokens.push(t);
                }
                GenEvent::Finish(r) => {
                    finish = Some(r);
                    break;
                }
                GenEvent::Refused(e) => return e.into_response(),
                GenEvent::Broken(m) => {
                    timing.finish("broken");
                    return ApiError::upstream(m).into_response();
                }
            }
            ev = rx.recv().await;
        }
        let Some(finish) = finish else {
            timing.finish("broken");
            return ApiError::upstream("generation ended without a finish reason").into_response();
        };
        timing.finish("ok");
        drop((inflight, generation));
        return Json(json!({
            "id": request_id, "object": "text_completion", "created": created, "model": model,
            "choices": [{"index": 0, "text": tokenizer::decode(&tokens), "token_ids": tokens, "finish_reason": finish}],
            "usage": {"prompt_tokens": req.prompt.len(), "completion_tokens": tokens.len(), "total_tokens": req.prompt.len() + tokens.len()}
        }))
        .into_response();
    }
    let chunk = move |tokens: Vec<u32>, finish: Option<FinishReason>| {
        json!({"id": request_id, "object": "text_completion", "created": created, "model": model,
               "choices": [{"index": 0, "text": tokenizer::decode(&tokens), "token_ids": tokens, "finish_reason": finish}]})
    };
    let events = async_stream(first, rx, generation, timing, inflight, chunk);
    Sse::new(events).into_response()
}

/// The SSE body: one event per token, the finish event, then `[DONE]`; an error event if the
/// stream breaks.
fn async_stream(
    first: GenEvent,
    rx: mpsc::Receiver<GenEvent>,
    generation: Generation,
    timing: Timing,
    inflight: InflightMetric,
    chunk: impl Fn(Vec<u32>, Option<FinishReason>) -> serde_json::Value + Send + 'static,
) -> impl futures_util::Stream<Item = Result<Event, Infallible>> + Send {
    struct St<F> {
        pending: Option<GenEvent>,
        rx: mpsc::Receiver<GenEvent>,
        _generation: Generation,
        timing: Timing,
        done: bool,
        /// The finish event went out; `[DONE]` follows.
        finished: bool,
        _inflight: InflightMetric,
        chunk: F,
    }
    let st = St {
        pending: Some(first),
        rx,
        _generation: generation,
        timing,
        done: false,
        finished: false,
        _inflight: inflight,
        chunk,
    };
    futures_util::stream::unfold(st, |mut st| async move {
        if st.done {
            return None;
        }
        if st.finished {
            st.done = true;
            return Some((Ok(Event::default().data("[DONE]")), st));
        }
        let ev = match st.pending.take() {
            Some(e) => Some(e),
            None => st.rx.recv().await,
        };
        let event = match ev {
            Some(GenEvent::Token(t)) => {
                st.timing.token();
                Event::default().data((st.chunk)(vec![t], None).to_string())
            }
            Some(GenEvent::Finish(r)) => {
                st.timing.finish("ok");
                st.finished = true;
                Event::default().data((st.chunk)(vec![], Some(r)).to_string())
            }
            Some(GenEvent::Refused(e)) => {
                st.timing.finish("broken");
                st.done = true;
                Event::default().data(e.body().to_string())
            }
            Some(GenEvent::Broken(m)) => {
                st.timing.finish("broken");
                st.done = true;
                Event::default().data(json!({"error": {"message": m, "type": "server_error", "param": null, "code": null}}).to_string())
            }
            None => {
                st.timing.finish("broken");
                st.done = true;
                Event::default().data(json!({"error": {"message": "generation ended without a finish reason", "type": "server_error"}}).to_string())
            }
        };
        Some((Ok(event), st))
    })
    .boxed()
}

pub async fn models(State(app): State<Arc<App>>) -> Json<serde_json::Value> {
    Json(
        json!({"object": "list", "data": [{"id": app.limits.name, "object": "model", "created": 0, "owned_by": "pdfleet",
        "max_model_len": app.limits.max_seq_len}]}),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_decode_worker_is_overload_not_an_outage() {
        let full = Status::resource_exhausted("decode http://d:1: no room for 70 KV blocks");
        let e = no_worker_left(PickError::NoneHealthy(Role::Decode), Some(&full));
        assert_eq!(e.status.as_u16(), 429);
        assert!(
            e.message.contains("no room for 70 KV blocks"),
            "{}",
            e.message
        );
        assert_eq!(e.retry_after_s, Some(1));
        // Nothing was tried: the pick's own reason.
        let e = no_worker_left(PickError::NoneHealthy(Role::Decode), None);
        assert_eq!(e.status.as_u16(), 503);
    }
}
