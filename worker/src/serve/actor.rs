//! The engine runs on its own thread (the backend is synchronous and owns the GPU); async code
//! talks to it through commands, TGI-style. The thread owns the engine and the worker's
//! [`RequestTable`], so every change of a request's state happens in one place, in order.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc as std_mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use pdfleet_api::worker_args::{EngineFault, StepPad};
use pdfleet_api::RequestId;
use tokio::sync::oneshot;

use super::metrics::WorkerMetrics;
use super::table::{CopyOrder, Events, HandoffCounts, Reply, RequestTable, Writer};
use crate::engine::{Engine, ExportedKv, SamplingParams};
use crate::EngineError;

/// Consecutive failed steps after which the engine counts as broken (a transient error may
/// pass; a device that keeps failing will not).
const MAX_FAILED_STEPS: u32 = 3;

/// How often expired handoffs are looked for.
const SWEEP_EVERY: Duration = Duration::from_millis(50);

#[derive(Clone, Debug, Default)]
pub struct EngineStatus {
    pub running: usize,
    pub waiting: usize,
    pub handoffs: HandoffCounts,
    pub blocks_used: usize,
    pub blocks_total: usize,
}

impl EngineStatus {
    pub fn idle(&self) -> bool {
        self.running == 0 && self.waiting == 0 && self.handoffs.total() == 0
    }
}

/// Whether the engine thread runs and steps: false once it has died (a panic included) or kept
/// failing. The health and readiness probes read it.
#[derive(Clone, Default)]
pub struct EngineHealth(Arc<AtomicBool>);

impl EngineHealth {
    pub fn ok(&self) -> bool {
        self.0.load(Ordering::SeqCst)
    }

    fn set(&self, ok: bool) {
        self.0.store(ok, Ordering::SeqCst);
    }
}

/// Sets the health to false when the engine thread ends, however it ends.
struct DeathNotice(EngineHealth, WorkerMetrics);

impl Drop for DeathNotice {
    fn drop(&mut self) {
        self.0.set(false);
        self.1.engine_healthy.set(0);
        if std::thread::panicking() {
            tracing::error!("the engine thread panicked; the worker is no longer healthy");
        }
    }
}

enum Command {
    Submit {
        id: RequestId,
        prompt: Vec<u32>,
        params: SamplingParams,
        hold: bool,
        events: Events,
        reply: Reply<()>,
    },
    CopyWhenHeld {
        id: RequestId,
        order: CopyOrder,
        reply: Reply<()>,
    },
    Export {
        id: RequestId,
        reply: Reply<ExportedKv>,
    },
    Release(RequestId),
    Reserve {
        id: RequestId,
        blocks: usize,
        writer: Writer,
        reply: Reply<(Vec<u32>, Duration)>,
    },
    Touch(RequestId),
    Commit {
        id: RequestId,
        writer: Writer,
        tokens: Vec<u32>,
        prompt_len: usize,
        params: SamplingParams,
        kv: Option<Vec<u8>>,
        reply: Reply<(usize, Duration)>,
    },
    Attach {
        id: RequestId,
        events: Events,
        reply: Reply<()>,
    },
    Cancel {
        id: RequestId,
        writer_done: bool,
        done: Option<oneshot::Sender<bool>>,
    },
    Status(oneshot::Sender<EngineStatus>),
}

/// Limits the actor enforces on top of the engine's.
#[derive(Clone, Debug)]
pub struct ActorLimits {
    /// Requests queued beyond this are refused (backpressure), not buffered without bound.
    pub max_waiting: usize,
    /// A handoff that makes no progress for this long ends and frees its blocks.
    pub handoff_ttl: Duration,
    /// Tests only: break the engine on purpose.
    pub fault: Option<EngineFault>,
    pub pad: Option<StepPad>,
}

#[derive(Clone)]
pub struct EngineHandle {
    tx: std_mpsc::Sender<Command>,
    health: EngineHealth,
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

    pub fn health(&self) -> &EngineHealth {
        &self.health
    }

    /// Queues a request; with `hold`, its KV is kept for a decode worker after the first token.
    pub async fn submit(
        &self,
        id: RequestId,
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

    /// Copies a held request's KV into blocks `dst` of another worker's cache, once its prompt
    /// is done; refused if its lease on them would end before then.
    pub async fn copy_when_held(&self, id: RequestId, order: CopyOrder) -> Result<(), EngineError> {
        self.ask(|reply| Command::CopyWhenHeld { id, order, reply })
            .await
    }

    pub async fn export(&self, id: RequestId) -> Result<ExportedKv, EngineError> {
        self.ask(|reply| Command::Export { id, reply }).await
    }

    pub fn release(&self, id: RequestId) {
        let _ = self.tx.send(Command::Release(id));
    }

    /// Takes blocks for arriving KV; returns them and the writer's lease.
    pub async fn reserve(
        &self,
        id: RequestId,
        blocks: usize,
        writer: Writer,
    ) -> Result<(Vec<u32>, Duration), EngineError> {
        self.ask(|reply| Command::Reserve {
            id,
            blocks,
            writer,
            reply,
        })
        .await
    }

    pub fn touch(&self, id: RequestId) {
        let _ = self.tx.send(Command::Touch(id));
    }

    /// Returns the blocks the sequence's KV fills and how long it took since the reservation.
    #[allow(clippy::too_many_arguments)]
    pub async fn commit(
        &self,
        id: RequestId,
        writer: Writer,
        tokens: Vec<u32>,
        prompt_len: usize,
        params: SamplingParams,
        kv: Option<Vec<u8>>,
    ) -> Result<(usize, Duration), EngineError> {
        self.ask(|reply| Command::Commit {
            id,
            writer,
            tokens,
            prompt_len,
            params,
            kv,
            reply,
        })
        .await
    }

    pub async fn attach(&self, id: RequestId, events: Events) -> Result<(), EngineError> {
        self.ask(|reply| Command::Attach { id, events, reply })
            .await
    }

    /// Drops whatever the request holds here, without waiting.
    pub fn cancel(&self, id: RequestId, writer_done: bool) {
        let _ = self.tx.send(Command::Cancel {
            id,
            writer_done,
            done: None,
        });
    }

    /// Drops whatever the request holds here; returns once the engine has done so (after which
    /// it writes nothing more for it), with whether anything was here.
    pub async fn cancel_and_wait(&self, id: RequestId, writer_done: bool) -> bool {
        let (done, rx) = oneshot::channel();
        if self
            .tx
            .send(Command::Cancel {
                id,
                writer_done,
                done: Some(done),
            })
            .is_err()
        {
            return false;
        }
        rx.await.unwrap_or(false)
    }

    pub async fn status(&self) -> Result<EngineStatus, EngineError> {
        let (reply, rx) = oneshot::channel();
        self.tx.send(Command::Status(reply)).map_err(|_| gone())?;
        rx.await.map_err(|_| gone())
    }
}

struct Actor {
    engine: Engine,
    table: RequestTable,
    limits: ActorLimits,
    metrics: WorkerMetrics,
    health: EngineHealth,
    failed_steps: u32,
    last_sweep: Instant,
    steps: u64,
}

/// Starts the engine thread.
pub fn spawn(engine: Engine, limits: ActorLimits, metrics: WorkerMetrics) -> EngineHandle {
    let (tx, rx) = std_mpsc::channel();
    let health = EngineHealth::default();
    health.set(true);
    metrics.engine_healthy.set(1);
    let mut actor = Actor {
        table: RequestTable::new(limits.handoff_ttl, metrics.clone()),
        engine,
        limits,
        metrics: metrics.clone(),
        health: health.clone(),
        failed_steps: 0,
        last_sweep: Instant::now(),
        steps: 0,
    };
    let notice = DeathNotice(health.clone(), metrics);
    std::thread::Builder::new()
        .name("engine".into())
        .spawn(move || {
            let _notice = notice;
            actor.run(rx)
        })
        .expect("spawn the engine thread");
    EngineHandle { tx, health }
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
                // Idle: wake for the next command, or to end handoffs past their deadline.
                match rx.recv_timeout(SWEEP_EVERY) {
                    Ok(cmd) => self.handle(cmd),
                    Err(std_mpsc::RecvTimeoutError::Timeout) => {}
                    Err(std_mpsc::RecvTimeoutError::Disconnected) => return,
                }
            }
            let now = Instant::now();
            if now - self.last_sweep >= SWEEP_EVERY {
                self.table.sweep(&mut self.engine, now);
                self.last_sweep = now;
            }
            self.publish_gauges();
        }
    }

    fn handle(&mut self, cmd: Command) {
        let (engine, table, now) = (&mut self.engine, &mut self.table, Instant::now());
        match cmd {
            Command::Submit {
                id,
                prompt,
                params,
                hold,
                events,
                reply,
            } => {
                let result = if engine.num_waiting() >= self.limits.max_waiting {
                    self.metrics
                        .refusals
                        .with_label_values(&["queue_full"])
                        .inc();
                    Err(EngineError::NoRoom(format!(
                        "queue full: {} requests waiting",
                        engine.num_waiting()
                    )))
                } else {
                    table.submit(engine, id, prompt, params, hold, events, now)
                };
                let _ = reply.send(result);
            }
            Command::CopyWhenHeld { id, order, reply } => {
                table.copy_when_held(engine, id, order, reply, now);
            }
            Command::Export { id, reply } => {
                let _ = reply.send(table.export(engine, id, now));
            }
            Command::Release(id) => {
                table.release(engine, id);
            }
            Command::Reserve {
                id,
                blocks,
                writer,
                reply,
            } => {
                let result = table.reserve(engine, id, blocks, writer, now);
                if let Err(EngineError::NoRoom(_)) = result {
                    self.metrics.refusals.with_label_values(&["kv_full"]).inc();
                }
                let _ = reply.send(result);
            }
            Command::Touch(id) => table.touch(id, now),
            Command::Commit {
                id,
                writer,
                tokens,
                prompt_len,
                params,
                kv,
                reply,
            } => {
                let result = table.commit(
                    engine,
                    id,
                    writer,
                    tokens,
                    prompt_len,
                    params,
                    kv.as_deref(),
                    now,
                );
                let _ = reply.send(result);
            }
            Command::Attach { id, events, reply } => {
                let _ = reply.send(table.attach(engine, id, events, now));
            }
            Command::Cancel {
                id,
                writer_done,
                done,
            } => {
                let found = table.cancel(engine, id, writer_done);
                if let Some(done) = done {
                    let _ = done.send(found);
                }
            }
            Command::Status(reply) => {
                let _ = reply.send(EngineStatus {
                    running: engine.num_running(),
                    waiting: engine.num_waiting(),
                    handoffs: table.handoffs(),
                    blocks_used: engine.blocks_used(),
                    blocks_total: engine.blocks_total(),
                });
            }
        }
    }

    fn step(&mut self) {
        let prefix_before = self.engine.prefix_stats();
        let preempt_before = self.engine.preemptions();
        self.steps += 1;
        let result = match self.limits.fault {
            Some(EngineFault::PanicAtStep(n)) if self.steps == n => {
                panic!("injected fault: panic at step {n}")
            }
            Some(EngineFault::FailStepsFrom(n)) if self.steps >= n => Err(EngineError::Backend(
                format!("injected fault: steps fail from step {n}"),
            )),
            _ => self.engine.step(),
        };
        let mut out = match result {
            Ok(out) => out,
            Err(e) => {
                // A backend failure fails every request in the batch rather than hanging them;
                // one that keeps failing makes the worker unhealthy.
                tracing::error!(error = %e, "engine step failed");
                self.table.fail_batch(&mut self.engine, &e);
                self.failed_steps += 1;
                if self.failed_steps >= MAX_FAILED_STEPS && self.health.ok() {
                    tracing::error!(
                        steps = self.failed_steps,
                        "the engine keeps failing; the worker is no longer healthy"
                    );
                    self.health.set(false);
                    self.metrics.engine_healthy.set(0);
                }
                return;
            }
        };
        self.failed_steps = 0;
        if let (Some(pad), true) = (self.limits.pad, out.sequences > 0) {
            let least = pad.seconds(out.sequences);
            if out.seconds < least {
                std::thread::sleep(Duration::from_secs_f64(least - out.seconds));
                out.seconds = least;
            }
        }
        let m = &self.metrics;
        if out.prefill_tokens + out.decode_tokens > 0 {
            m.step_seconds.observe(out.seconds);
            m.batch_tokens
                .observe((out.prefill_tokens + out.decode_tokens) as f64);
            m.steps
                .step(out.prefill_tokens, out.decode_tokens, out.seconds);
        }
        let prefix = self.engine.prefix_stats();
        m.prefix_queries
            .inc_by(prefix.queries - prefix_before.queries);
        m.prefix_hits.inc_by(prefix.hits - prefix_before.hits);
        m.preemptions
            .inc_by(self.engine.preemptions() - preempt_before);
        self.table.apply_step(&mut self.engine, out, Instant::now());
    }

    fn publish_gauges(&self) {
        let m = &self.metrics;
        m.running.set(self.engine.num_running() as i64);
        m.waiting.set(self.engine.num_waiting() as i64);
        m.blocks_used.set(self.engine.blocks_used() as i64);
        m.queued_prompt_tokens
            .set(self.engine.queued_prompt_tokens() as i64);
        m.blocks_total.set(self.engine.blocks_total() as i64);
        m.handoff_counts(&self.table.handoffs());
    }
}
