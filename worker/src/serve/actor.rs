//! The engine runs on its own thread (the backend is synchronous and owns the GPU); async code
//! talks to it through commands, TGI-style. Each step's tokens are routed to the request that
//! waits for them; a request whose receiver is gone is aborted and its blocks freed.

use std::collections::HashMap;
use std::sync::mpsc as std_mpsc;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot};

use super::metrics::WorkerMetrics;
use crate::backend::SharedKvCache;
use crate::engine::{Engine, ExportedKv, FinishReason, SamplingParams};
use crate::EngineError;

/// What a request hears from the engine.
#[derive(Debug, Clone, PartialEq)]
pub enum SeqEvent {
    Token(u32),
    Finished(FinishReason),
}

pub type Events = mpsc::UnboundedSender<SeqEvent>;

#[derive(Clone, Debug, Default)]
pub struct EngineStatus {
    pub running: usize,
    pub waiting: usize,
    pub pending_transfers: usize,
    pub blocks_used: usize,
    pub blocks_total: usize,
}

impl EngineStatus {
    pub fn idle(&self) -> bool {
        self.running == 0 && self.waiting == 0 && self.pending_transfers == 0
    }
}

type Reply<T> = oneshot::Sender<Result<T, EngineError>>;

enum Command {
    Submit {
        id: u64,
        prompt: Vec<u32>,
        params: SamplingParams,
        hold: bool,
        events: Events,
        reply: Reply<()>,
    },
    Abort(u64),
    Export {
        id: u64,
        reply: Reply<ExportedKv>,
    },
    ReleaseHeld(u64),
    CopyHeldTo {
        id: u64,
        target: SharedKvCache,
        dst: Vec<u32>,
        reply: Reply<()>,
    },
    Reserve {
        id: u64,
        blocks: usize,
        reply: Reply<Vec<u32>>,
    },
    CancelImport(u64),
    CommitImport {
        id: u64,
        tokens: Vec<u32>,
        prompt_len: usize,
        params: SamplingParams,
        kv: Vec<u8>,
        reply: Reply<()>,
    },
    Attach {
        id: u64,
        events: Events,
        reply: Reply<()>,
    },
    AttachImport {
        id: u64,
        tokens: Vec<u32>,
        prompt_len: usize,
        params: SamplingParams,
        events: Events,
        reply: Reply<()>,
    },
    Status(oneshot::Sender<EngineStatus>),
}

/// Limits the actor enforces on top of the engine's.
#[derive(Clone, Debug)]
pub struct ActorLimits {
    /// Requests queued beyond this are refused (backpressure), not buffered without bound.
    pub max_waiting: usize,
    /// A pushed sequence nobody attaches to within this is dropped and its blocks freed.
    pub parked_ttl: Duration,
}

#[derive(Clone)]
pub struct EngineHandle {
    tx: std_mpsc::Sender<Command>,
}

fn gone() -> EngineError {
    EngineError::Backend("the engine thread has stopped".into())
}

impl EngineHandle {
    async fn ask<T>(&self, make: impl FnOnce(Reply<T>) -> Command) -> Result<T, EngineError> {
        let (reply, rx) = oneshot::channel();
        self.tx.send(make(reply)).map_err(|_| gone())?;
        rx.await.map_err(|_| gone())?
    }

    pub async fn submit(
        &self,
        id: u64,
        prompt: Vec<u32>,
        params: SamplingParams,
        hold: bool,
        events: Events,
    ) -> Result<(), EngineError> {
        self.ask(|reply| Command::Submit {
            id,
            prompt,
            params,
            hold,
            events,
            reply,
        })
        .await
    }

    pub fn abort(&self, id: u64) {
        let _ = self.tx.send(Command::Abort(id));
    }

    pub async fn export(&self, id: u64) -> Result<ExportedKv, EngineError> {
        self.ask(|reply| Command::Export { id, reply }).await
    }

    pub fn release_held(&self, id: u64) {
        let _ = self.tx.send(Command::ReleaseHeld(id));
    }

    /// Copies a held sequence's KV into the blocks `dst` of another worker's shared cache; asked
    /// while the sequence is still prefilling, the copy happens as soon as its prompt is done.
    pub async fn copy_held_to(
        &self,
        id: u64,
        target: SharedKvCache,
        dst: Vec<u32>,
    ) -> Result<(), EngineError> {
        self.ask(|reply| Command::CopyHeldTo {
            id,
            target,
            dst,
            reply,
        })
        .await
    }

    /// Reserves blocks for an incoming sequence and returns their ids.
    pub async fn reserve(&self, id: u64, blocks: usize) -> Result<Vec<u32>, EngineError> {
        self.ask(|reply| Command::Reserve { id, blocks, reply })
            .await
    }

    pub fn cancel_import(&self, id: u64) {
        let _ = self.tx.send(Command::CancelImport(id));
    }

    pub async fn commit_import(
        &self,
        id: u64,
        tokens: Vec<u32>,
        prompt_len: usize,
        params: SamplingParams,
        kv: Vec<u8>,
    ) -> Result<(), EngineError> {
        self.ask(|reply| Command::CommitImport {
            id,
            tokens,
            prompt_len,
            params,
            kv,
            reply,
        })
        .await
    }

    pub async fn attach(&self, id: u64, events: Events) -> Result<(), EngineError> {
        self.ask(|reply| Command::Attach { id, events, reply })
            .await
    }

    /// Commits a sequence whose KV was written into its reserved blocks device to device and
    /// attaches to it, in one engine command (one step boundary).
    pub async fn attach_import(
        &self,
        id: u64,
        tokens: Vec<u32>,
        prompt_len: usize,
        params: SamplingParams,
        events: Events,
    ) -> Result<(), EngineError> {
        self.ask(|reply| Command::AttachImport {
            id,
            tokens,
            prompt_len,
            params,
            events,
            reply,
        })
        .await
    }

    pub async fn status(&self) -> Result<EngineStatus, EngineError> {
        let (reply, rx) = oneshot::channel();
        self.tx.send(Command::Status(reply)).map_err(|_| gone())?;
        rx.await.map_err(|_| gone())
    }
}

/// Timing of one request inside the worker, for its TTFT and ITL histograms.
struct Subscriber {
    events: Events,
    last: Instant,
    first_seen: bool,
}

/// A device-to-device copy asked for while its sequence was still prefilling: it runs right after
/// the step that completes the prompt, before the next one.
struct DeferredCopy {
    target: SharedKvCache,
    dst: Vec<u32>,
    reply: Reply<()>,
}

struct Actor {
    engine: Engine,
    limits: ActorLimits,
    metrics: WorkerMetrics,
    subscribers: HashMap<u64, Subscriber>,
    parked_at: HashMap<u64, Instant>,
    deferred_copies: HashMap<u64, DeferredCopy>,
}

/// Starts the engine thread.
pub fn spawn(engine: Engine, limits: ActorLimits, metrics: WorkerMetrics) -> EngineHandle {
    let (tx, rx) = std_mpsc::channel();
    let mut actor = Actor {
        engine,
        limits,
        metrics,
        subscribers: HashMap::new(),
        parked_at: HashMap::new(),
        deferred_copies: HashMap::new(),
    };
    std::thread::Builder::new()
        .name("engine".into())
        .spawn(move || actor.run(rx))
        .expect("spawn the engine thread");
    EngineHandle { tx }
}

impl Actor {
    fn run(&mut self, rx: std_mpsc::Receiver<Command>) {
        loop {
            if self.engine.has_work() {
                loop {
                    match rx.try_recv() {
                        Ok(cmd) => self.handle(cmd),
                        Err(std_mpsc::TryRecvError::Empty) => break,
                        Err(std_mpsc::TryRecvError::Disconnected) => return,
                    }
                }
                self.step();
            } else {
                // Idle: wake for the next command, or to expire parked sequences.
                match rx.recv_timeout(Duration::from_millis(500)) {
                    Ok(cmd) => self.handle(cmd),
                    Err(std_mpsc::RecvTimeoutError::Timeout) => {}
                    Err(std_mpsc::RecvTimeoutError::Disconnected) => return,
                }
            }
            self.expire_parked();
            self.publish_gauges();
        }
    }

    fn subscribe(&mut self, id: u64, events: Events, first_seen: bool) {
        self.subscribers.insert(
            id,
            Subscriber {
                events,
                last: Instant::now(),
                first_seen,
            },
        );
    }

    fn handle(&mut self, cmd: Command) {
        match cmd {
            Command::Submit {
                id,
                prompt,
                params,
                hold,
                events,
                reply,
            } => {
                let result = if self.engine.num_waiting() >= self.limits.max_waiting {
                    Err(EngineError::NoRoom(format!(
                        "queue full: {} requests waiting",
                        self.engine.num_waiting()
                    )))
                } else if hold {
                    self.engine.add_request_held(id, prompt, params)
                } else {
                    self.engine.add_request(id, prompt, params)
                };
                if result.is_ok() {
                    self.subscribe(id, events, false);
                }
                let _ = reply.send(result);
            }
            Command::Abort(id) => {
                self.subscribers.remove(&id);
                if let Some(c) = self.deferred_copies.remove(&id) {
                    let _ = c.reply.send(Err(EngineError::InvalidRequest(format!(
                        "request {id} was aborted"
                    ))));
                }
                self.parked_at.remove(&id);
                self.engine.abort(id);
                self.engine.cancel_import(id);
            }
            Command::Export { id, reply } => {
                let _ = reply.send(self.engine.export(id));
            }
            Command::ReleaseHeld(id) => {
                self.engine.release_held(id);
            }
            Command::CopyHeldTo {
                id,
                target,
                dst,
                reply,
            } => {
                if self.engine.in_batch(id) {
                    self.deferred_copies
                        .insert(id, DeferredCopy { target, dst, reply });
                } else {
                    let _ = reply.send(self.copy_held_to(id, &target, &dst));
                }
            }
            Command::Reserve { id, blocks, reply } => {
                let _ = reply.send(self.engine.reserve_import(id, blocks));
            }
            Command::CancelImport(id) => self.engine.cancel_import(id),
            Command::CommitImport {
                id,
                tokens,
                prompt_len,
                params,
                kv,
                reply,
            } => {
                let result = self
                    .engine
                    .commit_import(id, tokens, prompt_len, params, Some(&kv));
                if result.is_ok() {
                    self.parked_at.insert(id, Instant::now());
                }
                let _ = reply.send(result);
            }
            Command::AttachImport {
                id,
                tokens,
                prompt_len,
                params,
                events,
                reply,
            } => {
                let result = self
                    .engine
                    .commit_import(id, tokens, prompt_len, params, None)
                    .and_then(|()| self.attach(id, events));
                let _ = reply.send(result);
            }
            Command::Attach { id, events, reply } => {
                let _ = reply.send(self.attach(id, events));
            }
            Command::Status(reply) => {
                let _ = reply.send(EngineStatus {
                    running: self.engine.num_running(),
                    waiting: self.engine.num_waiting(),
                    pending_transfers: self.engine.num_pending_transfers(),
                    blocks_used: self.engine.blocks_used(),
                    blocks_total: self.engine.blocks_total(),
                });
            }
        }
    }

    fn attach(&mut self, id: u64, events: Events) -> Result<(), EngineError> {
        self.engine.attach(id)?;
        self.parked_at.remove(&id);
        // The first token came from the prefill worker: what follows is inter-token.
        self.subscribe(id, events, true);
        Ok(())
    }

    fn copy_held_to(
        &mut self,
        id: u64,
        target: &SharedKvCache,
        dst: &[u32],
    ) -> Result<(), EngineError> {
        let start = Instant::now();
        self.engine.copy_held_to(id, target, dst)?;
        self.metrics
            .kv_device_copy_seconds
            .observe(start.elapsed().as_secs_f64());
        Ok(())
    }

    fn step(&mut self) {
        let prefix_before = self.engine.prefix_stats();
        let preempt_before = self.engine.preemptions();
        let out = match self.engine.step() {
            Ok(out) => out,
            Err(e) => {
                // A backend failure fails every request in flight rather than hanging them.
                tracing::error!(error = %e, "engine step failed");
                for (id, _) in self.subscribers.drain() {
                    self.engine.abort(id);
                }
                for (_, c) in self.deferred_copies.drain() {
                    let _ = c.reply.send(Err(EngineError::Backend(e.to_string())));
                }
                return;
            }
        };
        let m = &self.metrics;
        m.step_seconds.observe(out.seconds);
        m.batch_tokens
            .observe((out.prefill_tokens + out.decode_tokens) as f64);
        let prefix = self.engine.prefix_stats();
        m.prefix_queries
            .inc_by(prefix.queries - prefix_before.queries);
        m.prefix_hits.inc_by(prefix.hits - prefix_before.hits);
        m.preemptions
            .inc_by(self.engine.preemptions() - preempt_before);
        let now = Instant::now();
        let mut gone = Vec::new();
        for e in &out.tokens {
            let Some(sub) = self.subscribers.get_mut(&e.id) else {
                continue;
            };
            if sub.first_seen {
                m.itl.observe((now - sub.last).as_secs_f64());
            } else {
                m.ttft.observe((now - sub.last).as_secs_f64());
                sub.first_seen = true;
            }
            sub.last = now;
            if sub.events.send(SeqEvent::Token(e.token)).is_err() {
                gone.push(e.id);
            }
        }
        for &(id, reason) in &out.finished {
            if let Some(sub) = self.subscribers.remove(&id) {
                let _ = sub.events.send(SeqEvent::Finished(reason));
            }
            m.requests.with_label_values(&[reason.as_str()]).inc();
        }
        for id in gone {
            // Nobody listens any more: free the sequence's blocks now.
            self.subscribers.remove(&id);
            self.deferred_copies.remove(&id);
            self.engine.abort(id);
            m.requests.with_label_values(&["cancelled"]).inc();
        }
        // Copies waiting for these prompts go now, before the next step (and after the events, so
        // that the sender's transfer time includes them).
        for &(id, reason) in &out.finished {
            if let Some(c) = self.deferred_copies.remove(&id) {
                let result = if reason == FinishReason::Held {
                    self.copy_held_to(id, &c.target, &c.dst)
                } else {
                    Err(EngineError::InvalidRequest(format!(
                        "request {id} finished ({}) before its KV could move",
                        reason.as_str()
                    )))
                };
                let _ = c.reply.send(result);
            }
        }
    }

    fn expire_parked(&mut self) {
        let ttl = self.limits.parked_ttl;
        let expired: Vec<u64> = self
            .parked_at
            .iter()
            .filter(|(_, t)| t.elapsed() > ttl)
            .map(|(&id, _)| id)
            .collect();
        for id in expired {
            tracing::warn!(id, "dropping a transferred sequence nobody attached to");
            self.parked_at.remove(&id);
            self.engine.drop_parked(id);
        }
    }

    fn publish_gauges(&self) {
        let m = &self.metrics;
        m.running.set(self.engine.num_running() as i64);
        m.waiting.set(self.engine.num_waiting() as i64);
        m.blocks_used.set(self.engine.blocks_used() as i64);
        m.blocks_total.set(self.engine.blocks_total() as i64);
    }
}
