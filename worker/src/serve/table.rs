//! The worker's request table: every request this worker holds anything for, keyed by its
//! [`RequestId`], in exactly one [`State`] with one owner. The engine thread owns the table; the
//! gRPC handlers ask it to move requests between states.
//!
//! ```text
//!  prefill worker (sender)                    decode worker (receiver)
//!
//!  submit ─▶ Running ──first token──▶ Held    reserve ─▶ Reserved ──commit──▶ Committed
//!     (a device copy may wait on it)   │         (renewed by chunks or        │
//!                                      │          by reserving again)        attach
//!               export / copy, release │                                      ▼
//!                                      ▼                                   Running ─▶ done
//!                                    (gone)
//!
//!  cancel: any state ─▶ gone (blocks freed), except Reserved by a peer that may still be
//!          writing ─▶ Quarantined until its lease ends (or the writer says it is done).
//!  sweep:  Held, Reserved, Committed and Quarantined end at their deadline; each step of
//!          progress (a chunk, a renewal, a copy) moves the deadline on.
//! ```
//!
//! Every block outside the engine's batch is owned by one entry ([`HeldSeq`], [`Reservation`]
//! or [`ParkedSeq`]), so freeing an entry frees exactly its blocks, once.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use pdfleet_api::{FinishReason, RequestId};
use tokio::sync::{mpsc, oneshot};

use super::metrics::WorkerMetrics;
use crate::backend::SharedKvCache;
use crate::engine::{
    Engine, ExportedKv, HeldSeq, ParkedSeq, Reservation, SamplingParams, StepOutput,
};
use crate::kv_cache::BlockId;
use crate::EngineError;

/// A device-to-device write is refused unless this much of its lease is left: the copy itself
/// takes milliseconds, so it ends well before the receiver may free the blocks.
pub const COPY_MARGIN: Duration = Duration::from_secs(1);

/// What a request hears from the engine.
#[derive(Debug, Clone, PartialEq)]
pub enum SeqEvent {
    Token(u32),
    Finished(FinishReason),
    /// The first token is out and the KV is held for a decode worker (prefill role).
    Held,
    /// The sequence left the queue for the batch: its wait is over.
    Admitted,
}

pub type Events = mpsc::UnboundedSender<SeqEvent>;
pub type Reply<T> = oneshot::Sender<Result<T, EngineError>>;

/// Who writes the KV into reserved blocks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Writer {
    /// This worker, as the chunks of a gRPC push arrive.
    Local,
    /// Another process, device to device, until its lease ends.
    Peer,
}

/// How a handoff left the table.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Sender: the KV reached the decode worker and the blocks were released.
    Sent,
    /// Receiver: the sequence joined the batch.
    Attached,
    Cancelled,
    Expired,
    /// The import did not check out (a hostile or broken sender).
    Refused,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Sent => "sent",
            Outcome::Attached => "attached",
            Outcome::Cancelled => "cancelled",
            Outcome::Expired => "expired",
            Outcome::Refused => "refused",
        }
    }
}

/// Handoffs by state, for gauges and the drain.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HandoffCounts {
    pub held: usize,
    pub reserved: usize,
    pub committed: usize,
    pub quarantined: usize,
}

impl HandoffCounts {
    pub fn total(&self) -> usize {
        self.held + self.reserved + self.committed + self.quarantined
    }
}

/// A request in the batch, and where its tokens go.
struct Subscriber {
    events: Events,
    last: Instant,
    first_seen: bool,
}

/// A device-to-device write of a held sequence's KV into another worker's reserved blocks.
#[derive(Clone, Debug)]
pub struct CopyOrder {
    pub target: SharedKvCache,
    /// The reserved blocks, in sequence order.
    pub dst: Vec<u32>,
    /// The end of the writer's lease on them, by the writer's clock.
    pub lease_until: Instant,
}

/// A device copy asked for while its prompt still runs: it runs right after the step that
/// completes the prompt.
struct PendingCopy {
    order: CopyOrder,
    reply: Reply<()>,
}

enum State {
    /// Queued or running in the engine (a prompt, a unified request, or an attached decode).
    Running {
        sub: Subscriber,
        copy: Option<PendingCopy>,
    },
    /// Prefill done; the KV waits for the decode worker.
    Held(HeldSeq),
    /// Blocks taken for KV that is arriving.
    Reserved {
        reservation: Reservation,
        writer: Writer,
    },
    /// The KV is in place; waiting for Attach.
    Committed(ParkedSeq),
    /// Cancelled while a peer may still write into the blocks: freed when its lease ends.
    Quarantined(Reservation),
}

impl State {
    fn name(&self) -> &'static str {
        match self {
            State::Running { .. } => "running",
            State::Held(_) => "held",
            State::Reserved { .. } => "reserved",
            State::Committed(_) => "committed",
            State::Quarantined(_) => "quarantined",
        }
    }
}

struct Entry {
    /// The engine's id while in the batch.
    seq: u64,
    state: State,
    /// When the entry ends unless something moves it on; none while in the batch (the stream
    /// that reads it owns it).
    deadline: Option<Instant>,
    /// When the request arrived here.
    since: Instant,
}

pub struct RequestTable {
    entries: HashMap<RequestId, Entry>,
    /// Engine id to request, for the entries in the batch.
    in_batch: HashMap<u64, RequestId>,
    next_seq: u64,
    ttl: Duration,
    metrics: WorkerMetrics,
}

fn not_found(id: RequestId, what: &str) -> EngineError {
    EngineError::NotFound(format!("request {id}: {what}"))
}

impl RequestTable {
    /// `ttl`: how long a handoff may go without progress.
    pub fn new(ttl: Duration, metrics: WorkerMetrics) -> Self {
        RequestTable {
            entries: HashMap::new(),
            in_batch: HashMap::new(),
            next_seq: 1,
            ttl,
            metrics,
        }
    }

    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    fn new_seq(&mut self) -> u64 {
        let s = self.next_seq;
        self.next_seq += 1;
        s
    }

    fn vacant(&self, id: RequestId) -> Result<(), EngineError> {
        match self.entries.get(&id) {
            None => Ok(()),
            Some(e) => Err(EngineError::Conflict(format!(
                "request {id} is already here ({})",
                e.state.name()
            ))),
        }
    }

    /// A new request for the batch; with `hold`, its KV is kept for a decode worker after the
    /// first token.
    #[allow(clippy::too_many_arguments)]
    pub fn submit(
        &mut self,
        engine: &mut Engine,
        id: RequestId,
        prompt: Vec<u32>,
        params: SamplingParams,
        hold: bool,
        events: Events,
        now: Instant,
    ) -> Result<(), EngineError> {
        self.vacant(id)?;
        let seq = self.new_seq();
        if hold {
            engine.add_request_held(seq, prompt, params)?;
        } else {
            engine.add_request(seq, prompt, params)?;
        }
        self.enter_batch(id, seq, events, false, now);
        Ok(())
    }

    fn enter_batch(
        &mut self,
        id: RequestId,
        seq: u64,
        events: Events,
        first_seen: bool,
        now: Instant,
    ) {
        self.in_batch.insert(seq, id);
        let sub = Subscriber {
            events,
            last: now,
            first_seen,
        };
        self.entries.insert(
            id,
            Entry {
                seq,
                state: State::Running { sub, copy: None },
                deadline: None,
                since: now,
            },
        );
    }

    /// Routes one engine step's results: tokens to their streams, finished requests out, held
    /// prefills into [`State::Held`] (running the device copies that waited for them). Requests
    /// whose stream is gone are aborted and their blocks freed.
    pub fn apply_step(&mut self, engine: &mut Engine, out: StepOutput, now: Instant) {
        let metrics = self.metrics.clone();
        let mut gone = Vec::new();
        for seq in &out.admitted {
            let sub = self
                .in_batch
                .get(seq)
                .and_then(|id| self.entries.get(id))
                .and_then(|entry| match &entry.state {
                    State::Running { sub, .. } => Some(sub),
                    _ => None,
                });
            if let Some(sub) = sub {
                let _ = sub.events.send(SeqEvent::Admitted);
            }
        }
        for t in &out.tokens {
            let Some(entry) = self
                .in_batch
                .get(&t.id)
                .and_then(|id| self.entries.get_mut(id))
            else {
                continue;
            };
            let State::Running { sub, .. } = &mut entry.state else {
                continue;
            };
            if sub.first_seen {
                metrics.itl.observe((now - sub.last).as_secs_f64());
            } else {
                metrics.ttft.observe((now - sub.last).as_secs_f64());
                sub.first_seen = true;
            }
            sub.last = now;
            if sub.events.send(SeqEvent::Token(t.token)).is_err() {
                gone.push(t.id);
            }
        }
        for &(seq, reason) in &out.finished {
            if let Some(id) = self.in_batch.remove(&seq) {
                if let Some(Entry {
                    state: State::Running { sub, copy },
                    ..
                }) = self.entries.remove(&id)
                {
                    let _ = sub.events.send(SeqEvent::Finished(reason));
                    if let Some(c) = copy {
                        let _ = c.reply.send(Err(EngineError::InvalidRequest(format!(
                            "request {id} finished ({reason}) before its KV could move"
                        ))));
                    }
                }
            }
            metrics.requests.with_label_values(&[reason.as_str()]).inc();
        }
        for seq in gone {
            if let Some(id) = self.in_batch.get(&seq).copied() {
                self.cancel(engine, id, true);
                metrics.requests.with_label_values(&["cancelled"]).inc();
            }
        }
        for held in out.held {
            self.hold(engine, held, now);
        }
    }

    fn hold(&mut self, engine: &mut Engine, held: HeldSeq, now: Instant) {
        let Some(id) = self.in_batch.remove(&held.id()) else {
            // Nobody waits for it (cancelled in the same step).
            engine.release(held);
            return;
        };
        let Some(entry) = self.entries.get_mut(&id) else {
            engine.release(held);
            return;
        };
        let State::Running { sub, copy } = std::mem::replace(&mut entry.state, State::Held(held))
        else {
            unreachable!("entries in the batch are running");
        };
        entry.deadline = Some(now + self.ttl);
        if sub.events.send(SeqEvent::Held).is_err() {
            self.cancel(engine, id, true);
            return;
        }
        if let Some(c) = copy {
            let result = self.run_copy(engine, id, &c.order, now);
            let _ = c.reply.send(result);
        }
    }

    /// Writes a request's held KV into blocks another worker reserved for it, device to device,
    /// now if its prompt is done, else right after the step that completes it. Refused with
    /// [`EngineError::LeaseLapsed`] when less than [`COPY_MARGIN`] of the lease is left then.
    pub fn copy_when_held(
        &mut self,
        engine: &mut Engine,
        id: RequestId,
        order: CopyOrder,
        reply: Reply<()>,
        now: Instant,
    ) {
        match self.entries.get_mut(&id).map(|e| &mut e.state) {
            Some(State::Running { copy, .. }) => match copy {
                Some(_) => {
                    let _ = reply.send(Err(EngineError::Conflict(format!(
                        "request {id} already has a copy waiting"
                    ))));
                }
                None => *copy = Some(PendingCopy { order, reply }),
            },
            Some(State::Held(_)) => {
                let result = self.run_copy(engine, id, &order, now);
                let _ = reply.send(result);
            }
            _ => {
                let _ = reply.send(Err(not_found(id, "no prompt held here")));
            }
        }
    }

    fn run_copy(
        &mut self,
        engine: &mut Engine,
        id: RequestId,
        order: &CopyOrder,
        now: Instant,
    ) -> Result<(), EngineError> {
        if now + COPY_MARGIN >= order.lease_until {
            return Err(EngineError::LeaseLapsed(format!(
                "request {id}: the lease on the decode worker's blocks ends too soon to write"
            )));
        }
        let entry = self
            .entries
            .get_mut(&id)
            .ok_or_else(|| not_found(id, "gone"))?;
        let State::Held(held) = &entry.state else {
            return Err(not_found(id, "no prompt held here"));
        };
        let start = Instant::now();
        engine.copy_held_to(held, &order.target, &order.dst)?;
        self.metrics
            .kv_device_copy_seconds
            .observe(start.elapsed().as_secs_f64());
        entry.deadline = Some(now + self.ttl);
        Ok(())
    }

    /// Reads a held request's KV out (gRPC transport).
    pub fn export(
        &mut self,
        engine: &mut Engine,
        id: RequestId,
        now: Instant,
    ) -> Result<ExportedKv, EngineError> {
        let entry = self
            .entries
            .get_mut(&id)
            .ok_or_else(|| not_found(id, "no prompt held here"))?;
        let State::Held(held) = &entry.state else {
            return Err(not_found(id, "no prompt held here"));
        };
        let kv = engine.export(held)?;
        entry.deadline = Some(now + self.ttl);
        Ok(kv)
    }

    /// The decode worker has the KV: free the held blocks (prefix cache keeps the full ones).
    /// Returns whether the request was held here.
    pub fn release(&mut self, engine: &mut Engine, id: RequestId) -> bool {
        if !matches!(
            self.entries.get(&id).map(|e| &e.state),
            Some(State::Held(_))
        ) {
            return false;
        }
        let Some(Entry {
            state: State::Held(held),
            ..
        }) = self.entries.remove(&id)
        else {
            unreachable!("checked above");
        };
        engine.release(held);
        self.metrics.handoff_ended(Outcome::Sent);
        true
    }

    /// Takes blocks for arriving KV. A peer asking again for the same request renews its lease
    /// (the blocks are then the same, or new ones if the old lease had ended). Returns the blocks
    /// and the lease.
    pub fn reserve(
        &mut self,
        engine: &mut Engine,
        id: RequestId,
        num_blocks: usize,
        writer: Writer,
        now: Instant,
    ) -> Result<(Vec<u32>, Duration), EngineError> {
        if let Some(entry) = self.entries.get_mut(&id) {
            return match &entry.state {
                State::Reserved {
                    reservation,
                    writer: Writer::Peer,
                } if writer == Writer::Peer && reservation.blocks().len() == num_blocks => {
                    entry.deadline = Some(now + self.ttl);
                    Ok((reservation.blocks().to_vec(), self.ttl))
                }
                other => Err(EngineError::Conflict(format!(
                    "request {id} is already here ({})",
                    other.name()
                ))),
            };
        }
        let reservation = engine.reserve(num_blocks)?;
        let blocks = reservation.blocks().to_vec();
        let seq = self.new_seq();
        self.entries.insert(
            id,
            Entry {
                seq,
                state: State::Reserved {
                    reservation,
                    writer,
                },
                deadline: Some(now + self.ttl),
                since: now,
            },
        );
        Ok((blocks, self.ttl))
    }

    /// Progress on a local write (a chunk arrived): the reservation lives on.
    pub fn touch(&mut self, id: RequestId, now: Instant) {
        if let Some(e) = self.entries.get_mut(&id) {
            if matches!(e.state, State::Reserved { .. }) {
                e.deadline = Some(now + self.ttl);
            }
        }
    }

    /// The reserved blocks hold the sequence's KV (`kv`: the bytes to write first, for a gRPC
    /// push): check the import and keep it for Attach. A refused import frees its blocks.
    /// Returns the blocks the KV fills and how long it took to arrive since the reservation.
    #[allow(clippy::too_many_arguments)]
    pub fn commit(
        &mut self,
        engine: &mut Engine,
        id: RequestId,
        writer: Writer,
        tokens: Vec<u32>,
        prompt_len: usize,
        params: SamplingParams,
        kv: Option<&[u8]>,
        now: Instant,
    ) -> Result<(usize, Duration), EngineError> {
        let entry = self.entries.remove(&id).ok_or_else(|| {
            not_found(
                id,
                "no reserved blocks (never reserved, cancelled or expired)",
            )
        })?;
        let reservation = match entry.state {
            State::Reserved {
                reservation,
                writer: w,
            } if w == writer => reservation,
            other => {
                let name = other.name();
                self.entries.insert(
                    id,
                    Entry {
                        state: other,
                        ..entry
                    },
                );
                return Err(EngineError::Conflict(format!(
                    "request {id} cannot be committed: it is {name}"
                )));
            }
        };
        let (blocks, since) = (reservation.blocks().len(), entry.since);
        // A refused import: the engine frees its blocks and the entry is gone.
        let parked = engine
            .commit(reservation, tokens, prompt_len, params, kv)
            .inspect_err(|_| self.metrics.handoff_ended(Outcome::Refused))?;
        self.entries.insert(
            id,
            Entry {
                seq: entry.seq,
                state: State::Committed(parked),
                deadline: Some(now + self.ttl),
                since: entry.since,
            },
        );
        Ok((blocks, now - since))
    }

    /// A committed sequence joins the batch; its tokens go to `events` (the first one came from
    /// the prefill worker, so what follows is inter-token).
    pub fn attach(
        &mut self,
        engine: &mut Engine,
        id: RequestId,
        events: Events,
        now: Instant,
    ) -> Result<(), EngineError> {
        match self.entries.get(&id).map(|e| &e.state) {
            Some(State::Committed(_)) => {}
            Some(other) => {
                return Err(EngineError::Conflict(format!(
                    "request {id} cannot be attached: it is {}",
                    other.name()
                )))
            }
            None => return Err(not_found(id, "no transferred sequence")),
        }
        let Some(Entry {
            state: State::Committed(parked),
            ..
        }) = self.entries.remove(&id)
        else {
            unreachable!("checked above");
        };
        let seq = self.new_seq();
        engine.attach(seq, parked)?;
        self.metrics.handoff_ended(Outcome::Attached);
        self.enter_batch(id, seq, events, true, now);
        Ok(())
    }

    /// Drops whatever the request holds here. Blocks a peer may still be writing into
    /// (`writer_done` unset) stay quarantined until its lease ends. Returns whether anything
    /// was here.
    pub fn cancel(&mut self, engine: &mut Engine, id: RequestId, writer_done: bool) -> bool {
        let Some(entry) = self.entries.remove(&id) else {
            return false;
        };
        match entry.state {
            State::Running { copy, .. } => {
                self.in_batch.remove(&entry.seq);
                engine.abort(entry.seq);
                if let Some(c) = copy {
                    let _ = c.reply.send(Err(not_found(id, "cancelled")));
                }
                // A request, not a handoff.
                return true;
            }
            State::Held(held) => engine.release(held),
            State::Reserved {
                reservation,
                writer: Writer::Peer,
            } if !writer_done => {
                self.entries.insert(
                    id,
                    Entry {
                        state: State::Quarantined(reservation),
                        ..entry
                    },
                );
            }
            State::Reserved { reservation, .. } => engine.cancel(reservation),
            State::Committed(parked) => engine.drop_parked(parked),
            State::Quarantined(reservation) => {
                if writer_done {
                    engine.cancel(reservation);
                } else {
                    self.entries.insert(
                        id,
                        Entry {
                            state: State::Quarantined(reservation),
                            ..entry
                        },
                    );
                    // Already counted when it was quarantined.
                    return true;
                }
            }
        }
        self.metrics.handoff_ended(Outcome::Cancelled);
        true
    }

    /// Ends every handoff past its deadline; returns how many.
    pub fn sweep(&mut self, engine: &mut Engine, now: Instant) -> usize {
        let due: Vec<RequestId> = self
            .entries
            .iter()
            .filter(|(_, e)| e.deadline.is_some_and(|d| d <= now))
            .map(|(&id, _)| id)
            .collect();
        let mut expired = 0;
        for id in due {
            let entry = self.entries.remove(&id).expect("listed above");
            let counted = match entry.state {
                State::Running { .. } => unreachable!("running entries have no deadline"),
                State::Held(held) => {
                    engine.release(held);
                    true
                }
                State::Reserved { reservation, .. } => {
                    engine.cancel(reservation);
                    true
                }
                State::Committed(parked) => {
                    engine.drop_parked(parked);
                    true
                }
                State::Quarantined(reservation) => {
                    engine.cancel(reservation);
                    false
                }
            };
            if counted {
                tracing::warn!(request = %id, "a KV handoff made no progress for {:?}: freed", self.ttl);
                self.metrics.handoff_ended(Outcome::Expired);
                expired += 1;
            }
        }
        expired
    }

    /// Fails every request in the batch (the engine could not step): their streams end, which
    /// their callers see as an error. Handoffs outside the batch stay.
    pub fn fail_batch(&mut self, engine: &mut Engine, error: &EngineError) {
        let running: Vec<RequestId> = self.in_batch.values().copied().collect();
        for id in running {
            if let Some(Entry {
                seq,
                state: State::Running { copy, .. },
                ..
            }) = self.entries.remove(&id)
            {
                self.in_batch.remove(&seq);
                engine.abort(seq);
                if let Some(c) = copy {
                    let _ = c.reply.send(Err(EngineError::Backend(error.to_string())));
                }
            }
        }
    }

    pub fn handoffs(&self) -> HandoffCounts {
        let mut c = HandoffCounts::default();
        for e in self.entries.values() {
            match e.state {
                State::Running { .. } => {}
                State::Held(_) => c.held += 1,
                State::Reserved { .. } => c.reserved += 1,
                State::Committed(_) => c.committed += 1,
                State::Quarantined(_) => c.quarantined += 1,
            }
        }
        c
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The blocks the table's entries own outside the batch, for block accounting checks.
    pub fn owned_blocks(&self) -> impl Iterator<Item = &[BlockId]> {
        self.entries.values().filter_map(|e| match &e.state {
            State::Running { .. } => None,
            State::Held(h) => Some(h.blocks()),
            State::Reserved { reservation, .. } | State::Quarantined(reservation) => {
                Some(reservation.blocks())
            }
            State::Committed(p) => Some(p.blocks()),
        })
    }

    /// The blocks `id` may have written into by a peer now: those of its reservation, whether
    /// live or quarantined (tests check every peer write against this).
    pub fn writable_by_peer(&self, id: RequestId) -> Option<&[BlockId]> {
        match &self.entries.get(&id)?.state {
            State::Reserved {
                reservation,
                writer: Writer::Peer,
            }
            | State::Quarantined(reservation) => Some(reservation.blocks()),
            _ => None,
        }
    }

    /// The latest deadline of any entry, for tests that check nothing outlives its own.
    pub fn deadlines(&self) -> impl Iterator<Item = (RequestId, Instant)> + '_ {
        self.entries
            .iter()
            .filter_map(|(&id, e)| e.deadline.map(|d| (id, d)))
    }
}
