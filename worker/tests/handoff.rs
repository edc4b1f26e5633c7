//! The KV handoff as a state machine, driven by random interleavings of everything that can
//! happen to it: prompts, reservations and their renewals, device-to-device writes (deferred
//! until the prompt is done), commits, attaches, decode steps, cancellations by the sender, the
//! router and the client, the clock running past deadlines, and the decode worker restarting.
//! Two real engines (CPU) and their request tables; the "network" between them is the test.
//!
//! After every event: every block is owned by exactly one live state or free (block
//! accounting on both sides), nothing outlives its deadline, every peer write lands in blocks
//! its request holds on the current decode instance, and a request the sender cancelled never
//! writes again. At the end everything is freed.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use pdfleet_api::rng::SplitMix64;
use pdfleet_api::RequestId;
use pdfleet_worker::backend::{
    self, Backend, BackendKind, ForwardBatch, ForwardOutput, SharedKvCache, StaticBatch, StaticRun,
};
use pdfleet_worker::config::ModelConfig;
use pdfleet_worker::engine::{Engine, SamplingParams, SchedulerConfig};
use pdfleet_worker::serve::metrics::WorkerMetrics;
use pdfleet_worker::serve::table::{CopyOrder, RequestTable, SeqEvent, Writer};
use pdfleet_worker::weights::Weights;
use pdfleet_worker::EngineError;
use tokio::sync::{mpsc, oneshot};

const TTL: Duration = Duration::from_secs(10);
const BLOCK_SIZE: usize = 4;
const BLOCKS: usize = 48;

/// Device-to-device writes as the sender's backend made them: the target (which names the
/// decode instance and the request, see [`target`]) and the blocks written.
type WriteLog = Arc<Mutex<Vec<(String, Vec<u32>)>>>;

/// The CPU backend, with device-to-device writes recorded instead of made.
struct Recording {
    inner: Box<dyn Backend>,
    log: WriteLog,
}

impl Backend for Recording {
    fn name(&self) -> &'static str {
        "recording"
    }
    fn config(&self) -> &ModelConfig {
        self.inner.config()
    }
    fn block_size(&self) -> usize {
        self.inner.block_size()
    }
    fn num_blocks(&self) -> usize {
        self.inner.num_blocks()
    }
    fn forward(&mut self, batch: &ForwardBatch) -> Result<ForwardOutput, EngineError> {
        self.inner.forward(batch)
    }
    fn read_blocks(&mut self, blocks: &[u32]) -> Result<Vec<u8>, EngineError> {
        self.inner.read_blocks(blocks)
    }
    fn write_blocks(&mut self, blocks: &[u32], data: &[u8]) -> Result<(), EngineError> {
        self.inner.write_blocks(blocks, data)
    }
    fn run_static(&mut self, run: &StaticBatch) -> Result<StaticRun, EngineError> {
        self.inner.run_static(run)
    }
    fn copy_blocks_to(
        &mut self,
        target: &SharedKvCache,
        _src: &[u32],
        dst: &[u32],
    ) -> Result<(), EngineError> {
        self.log
            .lock()
            .unwrap()
            .push((target.device.clone(), dst.to_vec()));
        Ok(())
    }
}

fn engine(log: Option<WriteLog>) -> Engine {
    let weights = Weights::embedded_primer();
    let cpu = backend::open(BackendKind::Cpu, &weights, BLOCK_SIZE, BLOCKS).unwrap();
    let b: Box<dyn Backend> = match log {
        Some(log) => Box::new(Recording { inner: cpu, log }),
        None => cpu,
    };
    let sched = SchedulerConfig {
        max_batch_tokens: 64,
        chunk_size: 16,
        max_running: 8,
    };
    Engine::new(b, sched).unwrap()
}

fn table() -> RequestTable {
    RequestTable::new(TTL, WorkerMetrics::new("test", "test", "test"))
}

/// The decode instance and the request a copy is for, as the target cache's device name.
fn target(epoch: u64, id: RequestId) -> SharedKvCache {
    SharedKvCache {
        ipc_handle: Vec::new(),
        device: format!("{epoch}/{id}"),
        pool_bytes: 0,
        n_pools: 0,
        block_bytes: 0,
    }
}

/// The test's view of one request.
struct Req {
    id: RequestId,
    prompt: Vec<u32>,
    params: SamplingParams,
    /// The sender's caller (the prefill handler) listens here; `None` once it went away.
    events: Option<mpsc::UnboundedReceiver<SeqEvent>>,
    first_token: Option<u32>,
    held: bool,
    /// The decode instance the sender opened, and its lease there.
    epoch: u64,
    lease: Option<(Vec<u32>, Instant)>,
    copy: Option<oneshot::Receiver<Result<(), EngineError>>>,
    copied: bool,
    committed: bool,
    /// The client reading the decode stream; `None` before attach or once it left.
    stream: Option<mpsc::UnboundedReceiver<SeqEvent>>,
    sender_cancelled: bool,
    /// The decode stream ended with its finish reason.
    finished: bool,
    /// The event at which it was submitted.
    born: usize,
}

struct World {
    rng: SplitMix64,
    now: Instant,
    epoch: u64,
    sender: Engine,
    sender_table: RequestTable,
    receiver: Engine,
    receiver_table: RequestTable,
    log: WriteLog,
    reqs: Vec<Req>,
    /// Cancels from the sender on their way to the receiver: (id, writer_done).
    in_flight: Vec<(RequestId, bool)>,
    cancelled: HashSet<RequestId>,
    writes: usize,
    attached: usize,
    events: usize,
}

impl World {
    fn new(seed: u64) -> Self {
        let log = WriteLog::default();
        World {
            rng: SplitMix64::new(seed),
            now: Instant::now(),
            epoch: 1,
            sender: engine(Some(log.clone())),
            sender_table: table(),
            receiver: engine(None),
            receiver_table: table(),
            log,
            reqs: Vec::new(),
            in_flight: Vec::new(),
            cancelled: HashSet::new(),
            writes: 0,
            attached: 0,
            events: 0,
        }
    }

    fn pick(&mut self) -> Option<usize> {
        (!self.reqs.is_empty()).then(|| self.rng.below(self.reqs.len() as u64) as usize)
    }

    fn submit(&mut self) {
        let len = 1 + self.rng.below(30) as usize;
        let prompt: Vec<u32> = (0..len).map(|_| self.rng.below(100) as u32).collect();
        let params = SamplingParams {
            max_tokens: 2 + self.rng.below(6) as usize,
            ..Default::default()
        };
        let id = RequestId::random();
        let (tx, rx) = mpsc::unbounded_channel();
        let ok = self
            .sender_table
            .submit(
                &mut self.sender,
                id,
                prompt.clone(),
                params.clone(),
                true,
                tx,
                self.now,
            )
            .is_ok();
        if ok {
            self.reqs.push(Req {
                id,
                prompt,
                params,
                events: Some(rx),
                first_token: None,
                held: false,
                epoch: self.epoch,
                lease: None,
                copy: None,
                copied: false,
                committed: false,
                stream: None,
                sender_cancelled: false,
                finished: false,
                born: self.events,
            });
        }
    }

    fn step_sender(&mut self) {
        if self.sender.has_work() {
            let out = self.sender.step().unwrap();
            self.sender_table
                .apply_step(&mut self.sender, out, self.now);
        }
        for r in &mut self.reqs {
            if let Some(rx) = &mut r.events {
                while let Ok(e) = rx.try_recv() {
                    match e {
                        SeqEvent::Token(t) => r.first_token = Some(t),
                        SeqEvent::Held => r.held = true,
                        SeqEvent::Finished(_) | SeqEvent::Admitted => {}
                    }
                }
            }
            if let Some(rx) = &mut r.copy {
                if let Ok(result) = rx.try_recv() {
                    r.copied = result.is_ok();
                    r.copy = None;
                    if !r.copied {
                        // A refused copy (lease lapsed, cancelled): ask for a fresh lease.
                        r.lease = None;
                    }
                }
            }
        }
    }

    fn reserve(&mut self, i: usize) {
        let (id, blocks, epoch) = {
            let r = &self.reqs[i];
            (r.id, r.prompt.len().div_ceil(BLOCK_SIZE), r.epoch)
        };
        if self.reqs[i].sender_cancelled || self.reqs[i].copied {
            return;
        }
        // The receiver refuses another instance's reservations (the gRPC layer checks epochs):
        // the prefill fails and its handler goes away.
        if epoch != self.epoch {
            self.sender_cancel(i);
            return;
        }
        // The request was sent a while ago: the sender counts its lease from then.
        let sent_at = self.now - Duration::from_millis(self.rng.below(50));
        if let Ok((dst, lease)) =
            self.receiver_table
                .reserve(&mut self.receiver, id, blocks, Writer::Peer, self.now)
        {
            self.reqs[i].lease = Some((dst, sent_at + lease));
        }
    }

    fn request_copy(&mut self, i: usize) {
        let r = &mut self.reqs[i];
        let Some((dst, lease_until)) = r.lease.clone() else {
            return;
        };
        if r.copy.is_some() || r.copied || r.sender_cancelled {
            return;
        }
        let (tx, rx) = oneshot::channel();
        r.copy = Some(rx);
        let order = CopyOrder {
            target: target(r.epoch, r.id),
            dst,
            lease_until,
        };
        let id = r.id;
        self.sender_table
            .copy_when_held(&mut self.sender, id, order, tx, self.now);
        self.step_sender_events_only();
    }

    /// Collects replies without stepping.
    fn step_sender_events_only(&mut self) {
        for r in &mut self.reqs {
            if let Some(rx) = &mut r.copy {
                if let Ok(result) = rx.try_recv() {
                    r.copied = result.is_ok();
                    r.copy = None;
                    if !r.copied {
                        r.lease = None;
                    }
                }
            }
        }
    }

    fn commit(&mut self, i: usize) {
        let r = &self.reqs[i];
        if !r.copied || r.committed || r.epoch != self.epoch {
            return;
        }
        let Some(first) = r.first_token else { return };
        let mut tokens = r.prompt.clone();
        tokens.push(first);
        let (id, plen, params) = (r.id, r.prompt.len(), r.params.clone());
        let ok = self
            .receiver_table
            .commit(
                &mut self.receiver,
                id,
                Writer::Peer,
                tokens,
                plen,
                params,
                None,
                self.now,
            )
            .is_ok();
        if ok {
            self.reqs[i].committed = true;
            // The sender's work is done: it releases its blocks.
            self.sender_table.release(&mut self.sender, id);
        }
    }

    fn attach(&mut self, i: usize) {
        let r = &self.reqs[i];
        if !r.committed || r.stream.is_some() {
            return;
        }
        let (tx, rx) = mpsc::unbounded_channel();
        let id = r.id;
        if self
            .receiver_table
            .attach(&mut self.receiver, id, tx, self.now)
            .is_ok()
        {
            self.reqs[i].stream = Some(rx);
            self.attached += 1;
        }
    }

    fn step_receiver(&mut self) {
        if self.receiver.has_work() {
            let out = self.receiver.step().unwrap();
            self.receiver_table
                .apply_step(&mut self.receiver, out, self.now);
        }
        for r in &mut self.reqs {
            if let Some(rx) = &mut r.stream {
                while let Ok(e) = rx.try_recv() {
                    if matches!(e, SeqEvent::Finished(_)) {
                        r.finished = true;
                    }
                }
            }
        }
    }

    /// The prefill handler goes away: it cancels here first (waiting for the engine), then
    /// tells the decode worker it will not write again.
    fn sender_cancel(&mut self, i: usize) {
        let id = self.reqs[i].id;
        self.sender_table.cancel(&mut self.sender, id, true);
        self.step_sender_events_only();
        self.reqs[i].sender_cancelled = true;
        self.cancelled.insert(id);
        self.in_flight.push((id, true));
    }

    fn deliver(&mut self) {
        if self.in_flight.is_empty() {
            return;
        }
        let k = self.rng.below(self.in_flight.len() as u64) as usize;
        let (id, writer_done) = self.in_flight.swap_remove(k);
        self.receiver_table
            .cancel(&mut self.receiver, id, writer_done);
    }

    /// The router gives up on the request (its client left): it is not the writer.
    fn router_cancel(&mut self, i: usize) {
        let id = self.reqs[i].id;
        self.receiver_table.cancel(&mut self.receiver, id, false);
    }

    fn advance(&mut self, by: Duration) {
        self.now += by;
        self.sender_table.sweep(&mut self.sender, self.now);
        self.receiver_table.sweep(&mut self.receiver, self.now);
        for (id, deadline) in self
            .sender_table
            .deadlines()
            .chain(self.receiver_table.deadlines())
        {
            assert!(deadline > self.now, "{id} outlived its deadline");
        }
    }

    fn restart_receiver(&mut self) {
        self.epoch += 1;
        self.receiver = engine(None);
        self.receiver_table = table();
        for r in &mut self.reqs {
            // Streams from the old instance end with it.
            r.stream = None;
        }
    }

    fn check(&mut self, event: &str) {
        self.sender
            .check_block_accounting(self.sender_table.owned_blocks())
            .unwrap_or_else(|e| panic!("sender after {event}: {e}"));
        self.receiver
            .check_block_accounting(self.receiver_table.owned_blocks())
            .unwrap_or_else(|e| panic!("receiver after {event}: {e}"));
        for (device, dst) in self.log.lock().unwrap().drain(..) {
            self.writes += 1;
            let (epoch, id) = device.split_once('/').unwrap();
            let id: RequestId = id.parse().unwrap();
            assert!(
                !self.cancelled.contains(&id),
                "{id} wrote after its sender cancelled it ({event})"
            );
            if epoch.parse::<u64>().unwrap() != self.epoch {
                // Into a decode instance that is gone: nothing of the current one is touched.
                continue;
            }
            let owned = self.receiver_table.writable_by_peer(id);
            assert_eq!(
                owned,
                Some(&dst[..]),
                "{id} wrote blocks {dst:?} it does not hold ({event})"
            );
        }
    }

    fn run(&mut self, events: usize) {
        for _ in 0..events {
            let roll = self.rng.below(100);
            let event = match roll {
                0..=9 => {
                    if self.reqs.len() < 12 {
                        self.submit();
                    }
                    "submit"
                }
                10..=24 => {
                    self.step_sender();
                    "sender step"
                }
                25..=34 => {
                    if let Some(i) = self.pick() {
                        self.reserve(i);
                    }
                    "reserve"
                }
                35..=44 => {
                    if let Some(i) = self.pick() {
                        self.request_copy(i);
                    }
                    "copy"
                }
                45..=52 => {
                    if let Some(i) = self.pick() {
                        self.commit(i);
                    }
                    "commit"
                }
                53..=60 => {
                    if let Some(i) = self.pick() {
                        self.attach(i);
                    }
                    "attach"
                }
                61..=70 => {
                    self.step_receiver();
                    "receiver step"
                }
                71..=74 => {
                    if let Some(i) = self.pick() {
                        self.sender_cancel(i);
                    }
                    "sender cancel"
                }
                75..=77 => {
                    if let Some(i) = self.pick() {
                        self.router_cancel(i);
                    }
                    "router cancel"
                }
                78..=80 => {
                    // The client of the decode stream, or the prefill handler, goes away.
                    if let Some(i) = self.pick() {
                        if self.rng.below(2) == 0 {
                            self.reqs[i].stream = None;
                        } else {
                            self.reqs[i].events = None;
                        }
                    }
                    "caller reset"
                }
                81..=86 => {
                    self.deliver();
                    "deliver"
                }
                87..=97 => {
                    let by = Duration::from_millis(self.rng.below(TTL.as_millis() as u64 / 3));
                    self.advance(by);
                    "clock"
                }
                _ => {
                    if self.rng.below(4) == 0 {
                        self.restart_receiver();
                    }
                    "restart"
                }
            };
            self.check(event);
            self.events += 1;
            // Forget requests that are over, or old: whatever they left behind must end by
            // itself (their callers are gone).
            let now_event = self.events;
            self.reqs
                .retain(|r| !(r.sender_cancelled || r.finished || now_event - r.born > 150));
        }
        // The end: everyone leaves, the clock runs out, nothing is left anywhere.
        for i in 0..self.reqs.len() {
            self.sender_cancel(i);
            self.router_cancel(i);
            self.reqs[i].stream = None;
        }
        self.reqs.clear();
        while !self.in_flight.is_empty() {
            self.deliver();
        }
        for _ in 0..1000 {
            if !self.sender.has_work() && !self.receiver.has_work() {
                break;
            }
            self.step_sender();
            self.step_receiver();
            self.check("the end");
        }
        self.check("the end");
        self.advance(TTL * 2);
        self.check("the end");
        assert!(self.sender_table.is_empty() && self.receiver_table.is_empty());
        assert_eq!(
            (self.sender.blocks_used(), self.receiver.blocks_used()),
            (0, 0)
        );
    }
}

#[test]
fn random_interleavings_keep_every_block_owned_once_and_every_write_in_bounds() {
    let (mut writes, mut attached) = (0, 0);
    for seed in 0..300 {
        let mut w = World::new(seed);
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            w.run(400);
            (w.writes, w.attached)
        }));
        match result {
            Ok((wr, at)) => {
                writes += wr;
                attached += at;
            }
            Err(e) => {
                eprintln!("failed with seed {seed}");
                std::panic::resume_unwind(e);
            }
        }
    }
    // The runs exercised the paths they claim to.
    assert!(
        writes > 1000 && attached > 100,
        "writes {writes}, attached {attached}"
    );
}
