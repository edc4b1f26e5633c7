//! Sending the planned requests on time, reading their streams and timing every token.

use std::io::Write;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use futures_util::StreamExt;

use super::report::percentile_of_unsorted;
use super::{
    parse_event, plan_requests, LoadConfig, LoadReport, Outcome, PlannedRequest, RequestRecord,
    SseParser, StreamEvent,
};

/// Shared live counters for the progress line.
#[derive(Default)]
struct Live {
    sent: AtomicUsize,
    done: AtomicUsize,
    ok: AtomicUsize,
    http: AtomicUsize,
    errors: AtomicUsize,
    ttfts: Mutex<Vec<f64>>,
}

impl Live {
    fn line(&self, total: usize, label: &str) -> String {
        let p50 = {
            let mut v = self.ttfts.lock().unwrap().clone();
            percentile_of_unsorted(&mut v, 50.0)
        };
        let p50 = p50.map_or("-".to_string(), |t| format!("{:.1} ms", t * 1e3));
        let label = if label.is_empty() {
            String::new()
        } else {
            format!("[{label}] ")
        };
        format!(
            "{label}sent {}/{total}  done {}  ok {}  http-err {}  err {}  p50 TTFT {p50}",
            self.sent.load(Ordering::Relaxed),
            self.done.load(Ordering::Relaxed),
            self.ok.load(Ordering::Relaxed),
            self.http.load(Ordering::Relaxed),
            self.errors.load(Ordering::Relaxed),
        )
    }
}

fn print_progress(line: &str) {
    let mut e = std::io::stderr().lock();
    // Pad so a shorter line fully overwrites a longer one.
    let _ = write!(e, "\r{line:<100}");
    let _ = e.flush();
}

/// Runs the load described by `cfg` against `cfg.url` and returns every request's
/// record. Fails only on a bad configuration; request failures are recorded.
pub async fn run_load(cfg: &LoadConfig) -> anyhow::Result<LoadReport> {
    cfg.validate()?;
    let plan = plan_requests(cfg);
    let client = reqwest::Client::builder()
        .tcp_nodelay(true)
        .connect_timeout(Duration::from_secs_f64(cfg.timeout_s.min(10.0)))
        .build()
        .context("building the HTTP client")?;
    let endpoint: Arc<str> = cfg.endpoint().into();
    let model: Arc<str> = cfg.model.as_str().into();
    let timeout = Duration::from_secs_f64(cfg.timeout_s);
    let live = Arc::new(Live::default());
    let total = plan.len();

    let start = tokio::time::Instant::now();
    let progress_task = cfg.progress.then(|| {
        let live = live.clone();
        let label = cfg.label.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(500));
            loop {
                tick.tick().await;
                print_progress(&live.line(total, &label));
            }
        })
    });

    let mut handles = Vec::with_capacity(total);
    let mut meta = Vec::with_capacity(total);
    for req in plan {
        tokio::time::sleep_until(start + Duration::from_secs_f64(req.at_s)).await;
        meta.push((req.id, req.prompt.len(), req.max_tokens));
        let sent_at_s = start.elapsed().as_secs_f64();
        live.sent.fetch_add(1, Ordering::Relaxed);
        let (client, endpoint, model, live) = (
            client.clone(),
            endpoint.clone(),
            model.clone(),
            live.clone(),
        );
        handles.push(tokio::spawn(async move {
            let rec = one_request(&client, &endpoint, &model, req, sent_at_s, timeout).await;
            live.done.fetch_add(1, Ordering::Relaxed);
            match rec.outcome {
                Outcome::Ok => {
                    live.ok.fetch_add(1, Ordering::Relaxed);
                    if let Some(t) = rec.ttft_s {
                        live.ttfts.lock().unwrap().push(t);
                    }
                }
                Outcome::HttpStatus(_) => {
                    live.http.fetch_add(1, Ordering::Relaxed);
                }
                Outcome::Error(_) => {
                    live.errors.fetch_add(1, Ordering::Relaxed);
                }
            }
            rec
        }));
    }

    let mut records = Vec::with_capacity(total);
    for (h, (id, prompt_tokens, max_tokens)) in handles.into_iter().zip(meta) {
        records.push(match h.await {
            Ok(r) => r,
            Err(e) => RequestRecord {
                id,
                sent_at_s: 0.0,
                prompt_tokens,
                max_tokens,
                outcome: Outcome::Error(format!("request task failed: {e}")),
                ttft_s: None,
                itl_s: Vec::new(),
                e2e_s: None,
                tokens: 0,
            },
        });
    }
    let wall_s = start.elapsed().as_secs_f64();
    if let Some(t) = progress_task {
        t.abort();
        print_progress(&live.line(total, &cfg.label));
        eprintln!();
    }
    Ok(LoadReport {
        records,
        wall_s,
        label: cfg.label.clone(),
        offered_rate: match &cfg.schedule {
            Some(s) => s.len() as f64 / s.last().map_or(1.0, |r| r.at_s.max(1e-9)),
            None => cfg.rate,
        },
        slo_ttft_ms: cfg.slo_ttft_ms,
        slo_itl_ms: cfg.slo_itl_ms,
    })
}

/// What a request has seen so far (kept across a timeout).
#[derive(Default)]
struct StreamState {
    ttft_s: Option<f64>,
    last_token: Option<Instant>,
    itl_s: Vec<f64>,
    tokens: usize,
    finish_reason: Option<String>,
}

impl StreamState {
    fn on_tokens(&mut self, n: usize, now: Instant, sent: Instant) {
        if n == 0 {
            return;
        }
        match self.last_token {
            None => self.ttft_s = Some((now - sent).as_secs_f64()),
            Some(prev) => {
                let gap = (now - prev).as_secs_f64() / n as f64;
                self.itl_s.extend(std::iter::repeat_n(gap, n));
            }
        }
        self.last_token = Some(now);
        self.tokens += n;
    }
}

/// Joins an error with its sources (`reqwest` puts the useful part in the source).
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(c) = src {
        s.push_str(": ");
        s.push_str(&c.to_string());
        src = c.source();
    }
    s
}

async fn stream_request(
    client: &reqwest::Client,
    endpoint: &str,
    body: &serde_json::Value,
    sent: Instant,
    st: &mut StreamState,
) -> Outcome {
    let resp = match client.post(endpoint).json(body).send().await {
        Ok(r) => r,
        Err(e) => return Outcome::Error(error_chain(&e)),
    };
    let status = resp.status();
    if !status.is_success() {
        return Outcome::HttpStatus(status.as_u16());
    }
    let mut stream = resp.bytes_stream();
    let mut parser = SseParser::new();
    let mut events = Vec::new();
    let mut ended = false;
    loop {
        let next = stream.next().await;
        let now = Instant::now();
        match next {
            Some(Ok(chunk)) => parser.push(&chunk, &mut events),
            Some(Err(e)) => return Outcome::Error(format!("reading stream: {}", error_chain(&e))),
            None => {
                parser.finish(&mut events);
                ended = true;
            }
        }
        for data in events.drain(..) {
            match parse_event(&data) {
                StreamEvent::Done => return Outcome::Ok,
                StreamEvent::Error(m) => return Outcome::Error(m),
                StreamEvent::Tokens {
                    n, finish_reason, ..
                } => {
                    st.on_tokens(n, now, sent);
                    if finish_reason.is_some() {
                        st.finish_reason = finish_reason;
                    }
                }
            }
        }
        if ended {
            return if st.finish_reason.is_some() {
                Outcome::Ok
            } else {
                Outcome::Error("stream ended before [DONE]".into())
            };
        }
    }
}

async fn one_request(
    client: &reqwest::Client,
    endpoint: &str,
    model: &str,
    req: PlannedRequest,
    sent_at_s: f64,
    timeout: Duration,
) -> RequestRecord {
    let body = serde_json::json!({
        "model": model,
        "prompt": req.prompt,
        "max_tokens": req.max_tokens,
        "temperature": 0.0,
        "stream": true,
    });
    let sent = Instant::now();
    let mut st = StreamState::default();
    let outcome = match tokio::time::timeout(
        timeout,
        stream_request(client, endpoint, &body, sent, &mut st),
    )
    .await
    {
        Ok(o) => o,
        Err(_) => Outcome::Error(format!("timeout after {} s", timeout.as_secs_f64())),
    };
    let e2e_s = outcome.is_ok().then(|| sent.elapsed().as_secs_f64());
    RequestRecord {
        id: req.id,
        sent_at_s,
        prompt_tokens: req.prompt.len(),
        max_tokens: req.max_tokens,
        outcome,
        ttft_s: st.ttft_s,
        itl_s: st.itl_s,
        e2e_s,
        tokens: st.tokens,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::load::LenDist;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, TcpStream};

    /// A tiny HTTP/1.1 server standing in for the router. By the prompt's first token
    /// id `f`: f < 25 → 429; 25 <= f < 30 → two tokens then an error event;
    /// 30 <= f < 33 → headers then silence (client timeout); else `max_tokens` tokens,
    /// the first after 20 ms, then one per 5 ms, the last event carrying two tokens,
    /// with writes split mid-event.
    async fn fake_router() -> String {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            loop {
                let (sock, _) = listener.accept().await.unwrap();
                tokio::spawn(serve(sock));
            }
        });
        format!("http://{addr}/")
    }

    async fn serve(mut sock: TcpStream) {
        let mut buf = Vec::new();
        let mut tmp = [0u8; 4096];
        let head_end = loop {
            let n = sock.read(&mut tmp).await.unwrap();
            if n == 0 {
                return;
            }
            buf.extend_from_slice(&tmp[..n]);
            if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
        };
        let head = String::from_utf8_lossy(&buf[..head_end]).to_lowercase();
        assert!(head.starts_with("post /v1/completions "), "{head}");
        let len: usize = head
            .lines()
            .find_map(|l| l.strip_prefix("content-length:"))
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        while buf.len() < head_end + len {
            let n = sock.read(&mut tmp).await.unwrap();
            buf.extend_from_slice(&tmp[..n]);
        }
        let req: serde_json::Value = serde_json::from_slice(&buf[head_end..]).unwrap();
        assert_eq!(req["model"], "toy");
        assert_eq!(req["stream"], true);
        let first = req["prompt"][0].as_u64().unwrap();
        let max_tokens = req["max_tokens"].as_u64().unwrap() as usize;

        if first < 25 {
            let body = r#"{"error":{"message":"busy","type":"rate_limited"}}"#;
            let resp = format!(
                "HTTP/1.1 429 Too Many Requests\r\nRetry-After: 1\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = sock.write_all(resp.as_bytes()).await;
            return;
        }
        let head = "HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\nConnection: close\r\n\r\n";
        if sock.write_all(head.as_bytes()).await.is_err() {
            return;
        }
        let ev = |ids: &[usize], finish: Option<&str>| {
            let v = serde_json::json!({"id": "cmpl-x", "object": "text_completion", "created": 0, "model": "toy",
                "choices": [{"index": 0, "text": "t", "token_ids": ids, "finish_reason": finish}]});
            format!("data: {v}\n\n")
        };
        tokio::time::sleep(Duration::from_millis(20)).await;
        if (30..33).contains(&first) {
            tokio::time::sleep(Duration::from_secs(30)).await;
            return;
        }
        let mut out: Vec<String> = Vec::new();
        if (25..30).contains(&first) {
            out.push(ev(&[1], None));
            out.push(ev(&[2], None));
            out.push(
                "data: {\"error\":{\"message\":\"decode worker lost\",\"type\":\"upstream_error\"}}\n\n"
                    .into(),
            );
        } else {
            let mut i = 0;
            while i < max_tokens {
                let k = if max_tokens - i == 2 { 2 } else { 1 };
                let ids: Vec<usize> = (i..i + k).collect();
                i += k;
                out.push(ev(&ids, (i == max_tokens).then_some("length")));
            }
            out.push("data: [DONE]\n\n".into());
        }
        for (j, e) in out.iter().enumerate() {
            if j > 0 {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            let (a, b) = e.as_bytes().split_at(e.len() / 2);
            if sock.write_all(a).await.is_err() || sock.flush().await.is_err() {
                return;
            }
            tokio::task::yield_now().await;
            if sock.write_all(b).await.is_err() {
                return;
            }
        }
        let _ = sock.shutdown().await;
    }

    #[tokio::test]
    async fn end_to_end_against_a_fake_router() {
        let url = fake_router().await;
        let cfg = LoadConfig {
            url,
            rate: 400.0,
            num_requests: 40,
            prompt_len: "lognormal:16,0.5,64".parse().unwrap(),
            output_len: LenDist::Fixed(5),
            seed: 12,
            slo_ttft_ms: 10_000.0,
            slo_itl_ms: 10_000.0,
            timeout_s: 0.7,
            label: "test".into(),
            ..LoadConfig::default()
        };
        let plan = plan_requests(&cfg);
        let class = |f: u32| match f {
            0..25 => "429",
            25..30 => "err",
            30..33 => "hang",
            _ => "ok",
        };
        let want = |c: &str| plan.iter().filter(|r| class(r.prompt[0]) == c).count();
        let (want_ok, want_429, want_err, want_hang) =
            (want("ok"), want("429"), want("err"), want("hang"));
        assert!(want_ok > 10 && want_429 > 0 && want_err > 0 && want_hang > 0);

        let report = run_load(&cfg).await.unwrap();
        assert_eq!(report.records.len(), 40);
        let (ok, http, errors) = report.outcome_counts();
        assert_eq!(ok, want_ok);
        assert_eq!(http.get(&429).copied().unwrap_or(0), want_429);
        assert_eq!(http.len(), 1);
        assert_eq!(errors, want_err + want_hang);
        assert_eq!(report.summary().timeouts, want_hang);
        assert!(
            report.wall_s >= 0.7 && report.wall_s < 2.5,
            "{}",
            report.wall_s
        );

        for (r, p) in report.records.iter().zip(&plan) {
            assert_eq!(
                (r.id, r.prompt_tokens, r.max_tokens),
                (p.id, p.prompt.len(), 5)
            );
            match class(p.prompt[0]) {
                "ok" => {
                    assert_eq!(r.outcome, Outcome::Ok);
                    assert_eq!(r.tokens, 5);
                    assert!(r.ttft_s.unwrap() >= 0.019, "{r:?}");
                    // Events of 1, 1, 1, 2 tokens: the first is TTFT, then 1 + 1 + 2 gaps.
                    assert_eq!(r.itl_s.len(), 4);
                    assert!(r.itl_s.iter().all(|&g| g >= 0.0), "{r:?}");
                    // The server sleeps 20 ms, then 5 ms before each of 4 more events.
                    assert!(r.e2e_s.unwrap() >= 0.039, "{r:?}");
                }
                "429" => assert_eq!(r.outcome, Outcome::HttpStatus(429)),
                "err" => {
                    assert_eq!(
                        r.outcome,
                        Outcome::Error("upstream_error: decode worker lost".into())
                    );
                    assert_eq!(r.tokens, 2);
                    assert!(r.ttft_s.is_some() && r.e2e_s.is_none());
                }
                _ => assert!(
                    matches!(&r.outcome, Outcome::Error(m) if m.starts_with("timeout")),
                    "{r:?}"
                ),
            }
        }
        let ttft = report.ttft_percentiles().unwrap();
        assert_eq!(ttft.n, want_ok);
        assert!(ttft.p50 >= 0.019 && ttft.p50 < 0.4);
        let itl = report.itl_percentiles().unwrap();
        assert_eq!(itl.n, want_ok * 4);
        // Gaps are 5 ms (2.5 ms for the two-token event) unless the machine stalls.
        assert!(itl.p50 > 0.001, "{itl:?}");
        assert!(report.output_throughput() > 0.0);
        assert_eq!(report.good_count(), want_ok);

        let table = report.summary_table();
        assert!(
            table.contains("TTFT") && table.contains("http 429"),
            "{table}"
        );

        let path =
            std::env::temp_dir().join(format!("pdfleet-load-test-{}.csv", std::process::id()));
        report.write_csv(&path).unwrap();
        let csv = std::fs::read_to_string(&path).unwrap();
        let _ = std::fs::remove_file(&path);
        let lines: Vec<&str> = csv.lines().collect();
        assert_eq!(lines.len(), 41);
        assert!(lines[0].starts_with("id,sent_at_s,prompt_tokens,max_tokens,outcome,ttft_ms"));
        assert!(lines.iter().all(|l| l.split(',').count() == 10), "{csv}");
        assert_eq!(lines.iter().filter(|l| l.contains(",ok,")).count(), want_ok);
        assert_eq!(
            lines.iter().filter(|l| l.contains(",http_429,")).count(),
            want_429
        );
    }

    #[tokio::test]
    async fn connection_refused_is_recorded_not_fatal() {
        // Bind then drop to get a port nobody listens on.
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let cfg = LoadConfig {
            url: format!("http://127.0.0.1:{port}"),
            rate: f64::INFINITY,
            num_requests: 3,
            timeout_s: 1.0,
            ..LoadConfig::default()
        };
        let report = run_load(&cfg).await.unwrap();
        assert_eq!(report.ok_count(), 0);
        assert!(report
            .records
            .iter()
            .all(|r| matches!(r.outcome, Outcome::Error(_))));
        assert!(report.ttft_percentiles().is_none());
        assert!(report.summary_table().contains("3 errors"));
        assert!(run_load(&LoadConfig { rate: 0.0, ..cfg }).await.is_err());
    }
}
