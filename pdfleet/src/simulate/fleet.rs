//! The simulated fleet, as a discrete-event model: the router sends each prompt to the prefill
//! worker with the least queued work (refusing when every queue is full), a prefill worker
//! computes prompts back to back at its measured tokens/s, the KV moves (latency plus bytes over
//! bandwidth), the router admits the sequence on the decode worker with the most free KV
//! (waiting when none has room: that wait is in TTFT), and decode workers step their batches
//! (continuous batching; a step takes `fixed + per_sequence * batch + per_kv_token * KV`).
//! Pods start after a delay and drain before they go; Prometheus scrapes every interval; a
//! policy runs on its own tick and sets each role's replicas.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, VecDeque};

use pdfleet_api::profile::ServingProfile;
use pdfleet_planner::policy::{Policy, Targets};

use super::metrics::{Exported, Scrapes};
use crate::trace::TraceRequest;

#[derive(Clone, Debug)]
pub struct SimConfig {
    pub profile: ServingProfile,
    pub ttft_s: f64,
    pub itl_s: f64,
    pub quantile: f64,
    /// From a replica asked for to its being ready.
    pub start_delay_s: f64,
    pub scrape_s: f64,
    pub rate_window_s: f64,
    pub quantile_window_s: f64,
    /// Requests a prefill worker queues before the router gets a refusal.
    pub max_waiting: usize,
    pub transfer_latency_s: f64,
    pub transfer_bytes_per_s: f64,
    pub initial: (u32, u32),
    /// Stop after this (the trace's end plus time to drain).
    pub end_s: f64,
    /// Replicas are paid for until this (the last arrival): what the fleet holds while the
    /// last requests drain is not the policy's choice.
    pub paid_until_s: f64,
}

/// How one request went.
#[derive(Clone, Copy, Debug, Default)]
pub struct Outcome {
    pub arrival_s: f64,
    pub refused: bool,
    pub ttft_s: Option<f64>,
    /// Mean gap between its tokens after the first.
    pub mean_itl_s: Option<f64>,
    pub done: bool,
}

/// The fleet every scrape, for the timeline.
#[derive(Clone, Copy, Debug, Default)]
pub struct Sample {
    pub t: f64,
    pub arrivals_per_s: f64,
    pub ttft_q_s: Option<f64>,
    pub itl_q_s: Option<f64>,
    pub prefill: (u32, u32),
    pub decode: (u32, u32),
}

#[derive(Clone, Debug, Default)]
pub struct Run {
    pub outcomes: Vec<Outcome>,
    pub timeline: Vec<Sample>,
    /// Seconds each role paid for replicas (starting, ready or draining).
    pub replica_seconds: (f64, f64),
    /// (time, prefill target, decode target) at every change.
    pub changes: Vec<(f64, u32, u32)>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Ev {
    Arrival(usize),
    PrefillDone(usize),
    TransferDone(usize),
    DecodeStep(usize),
    Ready(bool, usize),
    Scrape,
    Tick,
}

#[derive(Default)]
struct Prefill {
    ready: bool,
    draining: bool,
    gone: bool,
    queue: VecDeque<usize>,
    current: Option<usize>,
    queued_tokens: f64,
}

#[derive(Default)]
struct Decode {
    ready: bool,
    draining: bool,
    gone: bool,
    running: Vec<usize>,
    joining: Vec<usize>,
    stepping: bool,
    kv_used: f64,
    step_started: f64,
}

#[derive(Clone, Copy, Default)]
struct Req {
    r: TraceRequest,
    prefill_start: f64,
    prefill_done: f64,
    transfer_done: f64,
    first_token: Option<f64>,
    last_token: f64,
    generated: u32,
    itl_sum: f64,
    refused: bool,
    done: bool,
}

struct Sim<'a> {
    cfg: &'a SimConfig,
    now: f64,
    seq: u64,
    events: BinaryHeap<Reverse<(u64, u64, Ev)>>,
    reqs: Vec<Req>,
    prefill: Vec<Prefill>,
    decode: Vec<Decode>,
    waiting_admission: VecDeque<usize>,
    ex: Exported,
    scrapes: Scrapes,
    run: Run,
    targets: (u32, u32),
    last_account: f64,
}

/// Event times in microseconds, so the heap orders exactly.
fn at(t: f64) -> u64 {
    (t * 1e6).round().max(0.0) as u64
}

impl<'a> Sim<'a> {
    fn push(&mut self, t: f64, ev: Ev) {
        self.seq += 1;
        self.events.push(Reverse((at(t), self.seq, ev)));
    }

    fn existing(&self) -> (usize, usize) {
        (
            self.prefill.iter().filter(|p| !p.gone).count(),
            self.decode.iter().filter(|d| !d.gone).count(),
        )
    }

    fn account(&mut self) {
        let (p, d) = self.existing();
        let now = self.now.min(self.cfg.paid_until_s);
        let dt = (now - self.last_account).max(0.0);
        self.last_account = now;
        self.run.replica_seconds.0 += dt * p as f64;
        self.run.replica_seconds.1 += dt * d as f64;
    }

    fn counts(&self) -> ((u32, u32), (u32, u32)) {
        let p_active = self
            .prefill
            .iter()
            .filter(|p| !p.gone && !p.draining)
            .count() as u32;
        let p_ready = self
            .prefill
            .iter()
            .filter(|p| p.ready && !p.gone && !p.draining)
            .count() as u32;
        let d_active = self
            .decode
            .iter()
            .filter(|d| !d.gone && !d.draining)
            .count() as u32;
        let d_ready = self
            .decode
            .iter()
            .filter(|d| d.ready && !d.gone && !d.draining)
            .count() as u32;
        ((p_active, p_ready), (d_active, d_ready))
    }

    fn start_prefill(&mut self, i: usize) {
        let p = &mut self.prefill[i];
        if p.current.is_some() {
            return;
        }
        let Some(r) = p.queue.pop_front() else {
            if p.draining {
                p.gone = true;
            }
            return;
        };
        p.current = Some(r);
        let service = self.reqs[r].r.prompt as f64 / self.cfg.profile.prefill_tokens_per_s;
        self.reqs[r].prefill_start = self.now;
        self.ex.prefill_busy_s += service;
        self.push(self.now + service, Ev::PrefillDone(i));
    }

    fn arrival(&mut self, r: usize) {
        let req = self.reqs[r].r;
        self.ex.arrivals += 1.0;
        self.ex.prompt_tokens += req.prompt as f64;
        self.ex.requested_tokens += req.output as f64;
        let choice = self
            .prefill
            .iter()
            .enumerate()
            .filter(|(_, p)| {
                p.ready && !p.draining && !p.gone && p.queue.len() < self.cfg.max_waiting
            })
            .min_by(|a, b| a.1.queued_tokens.total_cmp(&b.1.queued_tokens))
            .map(|(i, _)| i);
        let Some(i) = choice else {
            self.reqs[r].refused = true;
            self.ex.prefill_refusals += 1.0;
            return;
        };
        self.prefill[i].queue.push_back(r);
        self.prefill[i].queued_tokens += req.prompt as f64;
        self.ex.backlog_tokens += req.prompt as f64;
        self.start_prefill(i);
    }

    fn prefill_done(&mut self, i: usize) {
        let r = self.prefill[i].current.take().expect("a prompt ran");
        let prompt = self.reqs[r].r.prompt as f64;
        self.prefill[i].queued_tokens -= prompt;
        self.ex.backlog_tokens -= prompt;
        self.ex.prefill_tokens_done += prompt;
        let q = &mut self.reqs[r];
        q.prefill_done = self.now;
        self.ex.queue.observe(q.prefill_start - q.r.at_s);
        self.ex.prefill.observe(self.now - q.prefill_start);
        let bytes = prompt * self.cfg.profile.kv_bytes_per_token;
        let transfer = self.cfg.transfer_latency_s + bytes / self.cfg.transfer_bytes_per_s;
        self.push(self.now + transfer, Ev::TransferDone(r));
        self.start_prefill(i);
    }

    /// KV room a sequence needs to be admitted: its prompt now and, as the worker keeps room
    /// for sequences' growth, half its output on average.
    fn kv_need(&self, r: usize) -> f64 {
        let q = &self.reqs[r].r;
        q.prompt as f64 + q.output as f64 / 2.0
    }

    /// Admits the sequences whose KV arrived on the decode worker with the most room; as the
    /// real router does after its retries, refuses one that finds no room anywhere (429).
    fn admit(&mut self) {
        while let Some(&r) = self.waiting_admission.front() {
            let need = self.kv_need(r);
            let kv = self.cfg.profile.kv_tokens;
            let choice = self
                .decode
                .iter()
                .enumerate()
                .filter(|(_, d)| d.ready && !d.draining && !d.gone && d.kv_used + need <= kv)
                .min_by(|a, b| a.1.kv_used.total_cmp(&b.1.kv_used))
                .map(|(i, _)| i);
            self.waiting_admission.pop_front();
            let Some(i) = choice else {
                self.reqs[r].refused = true;
                self.ex.decode_refusals += 1.0;
                continue;
            };
            // It holds its prompt's KV now, and a token more each step.
            let held = self.reqs[r].r.prompt as f64;
            let d = &mut self.decode[i];
            d.kv_used += held;
            d.joining.push(r);
            self.ex.kv_used_tokens += held;
            let q = &mut self.reqs[r];
            q.first_token = Some(self.now);
            q.last_token = self.now;
            self.ex.admission.observe(self.now - q.transfer_done);
            self.ex.ttft.observe(self.now - q.r.at_s);
            self.ex.running += 1.0;
            if q.r.output <= 1 {
                q.done = true;
                let d = &mut self.decode[i];
                d.joining.retain(|&x| x != r);
                d.kv_used -= held;
                self.ex.kv_used_tokens -= held;
                self.ex.running -= 1.0;
                continue;
            }
            if !self.decode[i].stepping {
                self.start_step(i);
            }
        }
    }

    fn transfer_done(&mut self, r: usize) {
        let q = &mut self.reqs[r];
        q.transfer_done = self.now;
        self.ex.transfer.observe(self.now - q.prefill_done);
        self.waiting_admission.push_back(r);
        self.admit();
    }

    fn start_step(&mut self, i: usize) {
        let d = &mut self.decode[i];
        d.running.append(&mut d.joining);
        if d.running.is_empty() {
            d.stepping = false;
            if d.draining {
                d.gone = true;
            }
            return;
        }
        let kv: f64 = d
            .running
            .iter()
            .map(|&r| {
                let q = &self.reqs[r];
                (q.r.prompt + q.generated + 1) as f64
            })
            .sum();
        let step = self.cfg.profile.step_s(d.running.len(), kv);
        d.stepping = true;
        d.step_started = self.now;
        let batch = d.running.len() as f64;
        self.ex.steps += 1.0;
        self.ex.step_s_sum += step;
        self.ex.batch_sum += batch;
        self.ex.batch_sq_sum += batch * batch;
        self.ex.batch_step_s_sum += batch * step;
        self.push(self.now + step, Ev::DecodeStep(i));
    }

    fn decode_step(&mut self, i: usize) {
        let running = std::mem::take(&mut self.decode[i].running);
        let mut keep = Vec::with_capacity(running.len());
        for r in running {
            let q = &mut self.reqs[r];
            let gap = self.now - q.last_token;
            self.ex.itl.observe(gap);
            q.itl_sum += gap;
            q.generated += 1;
            q.last_token = self.now;
            self.decode[i].kv_used += 1.0;
            self.ex.kv_used_tokens += 1.0;
            // The first token came with the prefill: `output - 1` come from decode steps.
            if q.generated + 1 >= q.r.output {
                q.done = true;
                let held = (q.r.prompt + q.generated) as f64;
                self.decode[i].kv_used -= held;
                self.ex.kv_used_tokens -= held;
                self.ex.running -= 1.0;
            } else {
                keep.push(r);
            }
        }
        self.decode[i].running = keep;
        self.start_step(i);
        // Freed KV may admit waiting sequences.
        self.admit();
    }

    fn set_targets(&mut self, t: Targets) {
        let decode = t.decode.unwrap_or(self.targets.1);
        if (t.prefill, decode) == self.targets {
            return;
        }
        self.targets = (t.prefill, decode);
        self.run.changes.push((self.now, t.prefill, decode));
        self.resize_prefill(t.prefill as usize);
        self.resize_decode(decode as usize);
    }

    fn resize_prefill(&mut self, n: usize) {
        let active: Vec<usize> = (0..self.prefill.len())
            .filter(|&i| !self.prefill[i].gone && !self.prefill[i].draining)
            .collect();
        if n > active.len() {
            for _ in active.len()..n {
                self.prefill.push(Prefill::default());
                let i = self.prefill.len() - 1;
                self.push(self.now + self.cfg.start_delay_s, Ev::Ready(true, i));
            }
        } else {
            // Starting pods go first, then the least loaded.
            let mut order = active;
            order.sort_by(|&a, &b| {
                let (pa, pb) = (&self.prefill[a], &self.prefill[b]);
                (pa.ready, pa.queued_tokens)
                    .partial_cmp(&(pb.ready, pb.queued_tokens))
                    .unwrap()
            });
            for &i in order.iter().take(order.len() - n) {
                let p = &mut self.prefill[i];
                p.draining = true;
                if !p.ready || (p.current.is_none() && p.queue.is_empty()) {
                    p.gone = true;
                }
            }
        }
    }

    fn resize_decode(&mut self, n: usize) {
        let active: Vec<usize> = (0..self.decode.len())
            .filter(|&i| !self.decode[i].gone && !self.decode[i].draining)
            .collect();
        if n > active.len() {
            for _ in active.len()..n {
                self.decode.push(Decode::default());
                let i = self.decode.len() - 1;
                self.push(self.now + self.cfg.start_delay_s, Ev::Ready(false, i));
            }
        } else {
            let mut order = active;
            order.sort_by(|&a, &b| {
                let (da, db) = (&self.decode[a], &self.decode[b]);
                (da.ready, da.kv_used)
                    .partial_cmp(&(db.ready, db.kv_used))
                    .unwrap()
            });
            for &i in order.iter().take(order.len() - n) {
                let d = &mut self.decode[i];
                d.draining = true;
                if !d.ready || (d.running.is_empty() && d.joining.is_empty()) {
                    d.gone = true;
                }
            }
        }
    }

    fn ready(&mut self, prefill: bool, i: usize) {
        if prefill {
            let p = &mut self.prefill[i];
            if !p.gone {
                p.ready = true;
            }
        } else {
            let d = &mut self.decode[i];
            if !d.gone {
                d.ready = true;
            }
            self.admit();
        }
    }

    fn scrape(&mut self) {
        let ((pa, pr), (da, dr)) = self.counts();
        self.ex.t = self.now;
        self.ex.prefill_replicas = (pa, pr);
        self.ex.decode_replicas = (da, dr);
        self.scrapes.scrape(self.ex.clone());
        let s = self.scrapes.signals(self.now, pa, da);
        self.run.timeline.push(Sample {
            t: self.now,
            arrivals_per_s: s.demand.map(|d| d.requests_per_s).unwrap_or(0.0),
            ttft_q_s: s.ttft_s,
            itl_q_s: s.itl_s,
            prefill: (pa, pr),
            decode: (da, dr),
        });
    }
}

/// Runs `trace` through a fleet driven by `policy`.
pub fn simulate(cfg: &SimConfig, trace: &[TraceRequest], policy: &mut dyn Policy) -> Run {
    let mut sim = Sim {
        cfg,
        now: 0.0,
        seq: 0,
        events: BinaryHeap::new(),
        reqs: trace
            .iter()
            .map(|&r| Req {
                r,
                ..Default::default()
            })
            .collect(),
        prefill: Vec::new(),
        decode: Vec::new(),
        waiting_admission: VecDeque::new(),
        ex: Exported::default(),
        scrapes: Scrapes::new(
            cfg.rate_window_s,
            cfg.quantile_window_s,
            cfg.quantile,
            cfg.profile.kv_tokens,
        ),
        run: Run::default(),
        targets: (0, 0),
        last_account: 0.0,
    };
    // The initial replicas are ready from the start.
    sim.targets = cfg.initial;
    for _ in 0..cfg.initial.0 {
        sim.prefill.push(Prefill {
            ready: true,
            ..Default::default()
        });
    }
    for _ in 0..cfg.initial.1 {
        sim.decode.push(Decode {
            ready: true,
            ..Default::default()
        });
    }
    sim.run.changes.push((0.0, cfg.initial.0, cfg.initial.1));
    for (i, r) in trace.iter().enumerate() {
        sim.push(r.at_s, Ev::Arrival(i));
    }
    sim.push(cfg.scrape_s, Ev::Scrape);
    sim.push(policy.tick_s(), Ev::Tick);
    while let Some(Reverse((t, _, ev))) = sim.events.pop() {
        let t = t as f64 / 1e6;
        if t > cfg.end_s {
            break;
        }
        sim.now = t;
        sim.account();
        match ev {
            Ev::Arrival(r) => sim.arrival(r),
            Ev::PrefillDone(i) => sim.prefill_done(i),
            Ev::TransferDone(r) => sim.transfer_done(r),
            Ev::DecodeStep(i) => sim.decode_step(i),
            Ev::Ready(p, i) => sim.ready(p, i),
            Ev::Scrape => {
                sim.scrape();
                sim.push(t + cfg.scrape_s, Ev::Scrape);
            }
            Ev::Tick => {
                let (pa, da) = (sim.targets.0, sim.targets.1);
                let mut s = sim.scrapes.signals(t, pa, da);
                let ((_, pr), (_, dr)) = sim.counts();
                s.prefill.ready = pr;
                if let Some(d) = s.decode.as_mut() {
                    d.ready = dr;
                }
                let targets = policy.decide(&s);
                sim.set_targets(targets);
                sim.push(t + policy.tick_s(), Ev::Tick);
            }
        }
    }
    sim.now = cfg.end_s;
    sim.account();
    sim.run.outcomes = sim
        .reqs
        .iter()
        .map(|q| Outcome {
            arrival_s: q.r.at_s,
            refused: q.refused,
            ttft_s: q.first_token.map(|f| f - q.r.at_s),
            mean_itl_s: (q.generated > 0).then(|| q.itl_sum / q.generated as f64),
            done: q.done,
        })
        .collect();
    sim.run
}
