//! The engine: sequences, the iteration-level scheduler (continuous batching with chunked
//! prefill, prefix reuse and preemption by recompute) and the step loop over a backend.

use std::collections::VecDeque;
use std::time::Instant;

use pdfleet_api::prefix::{block_hash, prefix_hashes};
pub use pdfleet_api::FinishReason;

use crate::backend::{Backend, ForwardBatch, Sample, SharedKvCache};
use crate::kv_cache::{BlockId, BlockManager, PrefixStats};
use crate::EngineError;

#[derive(Clone, Debug)]
pub struct SchedulerConfig {
    /// Tokens one step may compute, decodes and prefill chunks together.
    pub max_batch_tokens: usize,
    /// Most prompt tokens of one sequence computed in one step (chunked prefill).
    pub chunk_size: usize,
    /// Most sequences in the running batch.
    pub max_running: usize,
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        SchedulerConfig {
            max_batch_tokens: 2048,
            chunk_size: 512,
            max_running: 256,
        }
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct SamplingParams {
    pub max_tokens: usize,
    /// 0 is greedy.
    pub temperature: f32,
    pub seed: u64,
    pub stop_token: Option<u32>,
}

impl Default for SamplingParams {
    fn default() -> Self {
        SamplingParams {
            max_tokens: 16,
            temperature: 0.0,
            seed: 0,
            stop_token: None,
        }
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct TokenEvent {
    pub id: u64,
    pub token: u32,
    /// Index of this token among the sequence's generated tokens.
    pub index: usize,
    pub logits: Option<Vec<f32>>,
}

#[derive(Debug, Default)]
pub struct StepOutput {
    pub tokens: Vec<TokenEvent>,
    pub finished: Vec<(u64, FinishReason)>,
    /// Sequences submitted with `hold` whose first token is out: their KV now waits, owned by
    /// the caller, for a decode worker.
    pub held: Vec<HeldSeq>,
    pub prefill_tokens: usize,
    pub decode_tokens: usize,
    pub preempted: usize,
    pub seconds: f64,
    /// Sequences that left the queue for the batch this step (their wait ends here).
    pub admitted: Vec<u64>,
    /// Sequences computed in this step, decoding or part of a prompt.
    pub sequences: usize,
}

#[derive(Debug)]
struct Sequence {
    id: u64,
    tokens: Vec<u32>,
    prompt_len: usize,
    /// Leading tokens whose K/V are in the cache.
    computed: usize,
    blocks: Vec<BlockId>,
    /// Chained hashes of the full blocks registered in the prefix cache so far.
    hashes: Vec<u64>,
    params: SamplingParams,
    /// Prefill role: keep the blocks after the first token, for export.
    hold: bool,
}

impl Sequence {
    fn generated(&self) -> usize {
        self.tokens.len() - self.prompt_len
    }
}

/// A prefilled sequence whose KV waits for a decode worker (prefill role). It owns its blocks:
/// only [`Engine::release`] frees them, so whoever holds one is accountable for them.
#[derive(Debug)]
#[must_use = "a held sequence owns KV blocks: release it"]
pub struct HeldSeq(Sequence);

impl HeldSeq {
    pub fn id(&self) -> u64 {
        self.0.id
    }

    pub fn num_blocks(&self) -> usize {
        self.0.blocks.len()
    }

    /// The prompt followed by the first generated token.
    pub fn tokens(&self) -> &[u32] {
        &self.0.tokens
    }

    pub fn prompt_len(&self) -> usize {
        self.0.prompt_len
    }

    pub fn blocks(&self) -> &[BlockId] {
        &self.0.blocks
    }
}

/// Blocks taken for KV that is arriving (decode role), in sequence order. Owned like
/// [`HeldSeq`]: [`Engine::commit`] or [`Engine::cancel`] gives them back.
#[derive(Debug)]
#[must_use = "a reservation owns KV blocks: commit or cancel it"]
pub struct Reservation(Vec<BlockId>);

impl Reservation {
    pub fn blocks(&self) -> &[BlockId] {
        &self.0
    }
}

/// An imported sequence whose KV is in place, waiting for [`Engine::attach`] (decode role).
#[derive(Debug)]
#[must_use = "a parked sequence owns KV blocks: attach or drop it"]
pub struct ParkedSeq(Sequence);

impl ParkedSeq {
    pub fn blocks(&self) -> &[BlockId] {
        &self.0.blocks
    }
}

/// A held sequence's KV, read out for a decode worker.
pub struct ExportedKv {
    /// Prompt followed by the first generated token.
    pub tokens: Vec<u32>,
    pub prompt_len: usize,
    pub num_blocks: usize,
    /// [`Backend::read_blocks`] layout.
    pub data: Vec<u8>,
}

pub struct Engine {
    backend: Box<dyn Backend>,
    blocks: BlockManager,
    sched: SchedulerConfig,
    waiting: VecDeque<Sequence>,
    running: Vec<Sequence>,
    capture_logits: bool,
    preemptions: u64,
}

fn blocks_for(tokens: usize, block_size: usize) -> usize {
    tokens.div_ceil(block_size)
}

impl Engine {
    pub fn new(backend: Box<dyn Backend>, sched: SchedulerConfig) -> Result<Self, EngineError> {
        if sched.max_batch_tokens < sched.max_running.max(1) || sched.chunk_size == 0 {
            return Err(EngineError::InvalidConfig(
                "max_batch_tokens must be at least max_running, and chunk_size positive".into(),
            ));
        }
        let blocks = BlockManager::new(backend.num_blocks(), backend.block_size());
        Ok(Engine {
            backend,
            blocks,
            sched,
            waiting: VecDeque::new(),
            running: Vec::new(),
            capture_logits: false,
            preemptions: 0,
        })
    }

    /// Return every sampled token's logits with it (golden-vector checks).
    pub fn set_capture_logits(&mut self, on: bool) {
        self.capture_logits = on;
    }

    pub fn backend(&self) -> &dyn Backend {
        self.backend.as_ref()
    }

    pub fn num_waiting(&self) -> usize {
        self.waiting.len()
    }

    /// Prompt tokens still to compute: the whole of every queued sequence's, and the rest of
    /// those part-way through a chunked prefill.
    pub fn queued_prompt_tokens(&self) -> usize {
        let queued: usize = self
            .waiting
            .iter()
            .map(|s| s.tokens.len() - s.computed)
            .sum();
        let started: usize = self
            .running
            .iter()
            .map(|s| s.prompt_len.saturating_sub(s.computed))
            .sum();
        queued + started
    }

    pub fn num_running(&self) -> usize {
        self.running.len()
    }

    pub fn has_work(&self) -> bool {
        !self.waiting.is_empty() || !self.running.is_empty()
    }

    pub fn blocks_used(&self) -> usize {
        self.blocks.num_used()
    }

    pub fn blocks_total(&self) -> usize {
        self.blocks.num_blocks()
    }

    pub fn prefix_stats(&self) -> PrefixStats {
        self.blocks.stats
    }

    pub fn preemptions(&self) -> u64 {
        self.preemptions
    }

    /// Checks a request against the model and the cache, so that a request that could never run
    /// is refused at once with a reason instead of waiting forever.
    pub fn validate(&self, prompt: &[u32], params: &SamplingParams) -> Result<(), EngineError> {
        let c = self.backend.config();
        let bad = |m: String| Err(EngineError::InvalidRequest(m));
        if prompt.is_empty() {
            return bad("prompt is empty".into());
        }
        if let Some(t) = prompt.iter().find(|&&t| t as usize >= c.vocab_size) {
            return bad(format!(
                "token id {t} is outside the vocabulary (0..{})",
                c.vocab_size
            ));
        }
        if params.max_tokens == 0 {
            return bad("max_tokens must be at least 1".into());
        }
        if prompt.len() + params.max_tokens > c.max_seq_len {
            return bad(format!(
                "prompt ({} tokens) plus max_tokens ({}) exceeds the model's context of {}",
                prompt.len(),
                params.max_tokens,
                c.max_seq_len
            ));
        }
        let need = blocks_for(prompt.len() + params.max_tokens, self.blocks.block_size());
        if need > self.blocks.num_blocks() {
            return bad(format!(
                "the request needs {need} KV blocks but the cache has {}",
                self.blocks.num_blocks()
            ));
        }
        if !(params.temperature >= 0.0 && params.temperature.is_finite()) {
            return bad("temperature must be a finite number >= 0".into());
        }
        Ok(())
    }

    pub fn add_request(
        &mut self,
        id: u64,
        prompt: Vec<u32>,
        params: SamplingParams,
    ) -> Result<(), EngineError> {
        self.submit(id, prompt, params, false)
    }

    /// Like [`Engine::add_request`], but after the first token the sequence keeps its blocks for
    /// the caller instead of decoding on: it leaves the batch in [`StepOutput::held`].
    pub fn add_request_held(
        &mut self,
        id: u64,
        prompt: Vec<u32>,
        params: SamplingParams,
    ) -> Result<(), EngineError> {
        self.submit(id, prompt, params, true)
    }

    /// Whether the request is still queued or running (it may yet finish, or be held).
    pub fn in_batch(&self, id: u64) -> bool {
        self.waiting.iter().chain(&self.running).any(|s| s.id == id)
    }

    fn submit(
        &mut self,
        id: u64,
        prompt: Vec<u32>,
        params: SamplingParams,
        hold: bool,
    ) -> Result<(), EngineError> {
        self.validate(&prompt, &params)?;
        if self.in_batch(id) {
            return Err(EngineError::InvalidRequest(format!(
                "request id {id} is already in use"
            )));
        }
        self.waiting.push_back(Sequence {
            id,
            prompt_len: prompt.len(),
            tokens: prompt,
            computed: 0,
            blocks: Vec::new(),
            hashes: Vec::new(),
            params,
            hold,
        });
        Ok(())
    }

    /// Reads a held sequence's KV out (prefill role).
    pub fn export(&mut self, held: &HeldSeq) -> Result<ExportedKv, EngineError> {
        let seq = &held.0;
        Ok(ExportedKv {
            tokens: seq.tokens.clone(),
            prompt_len: seq.prompt_len,
            num_blocks: seq.blocks.len(),
            data: self.backend.read_blocks(&seq.blocks)?,
        })
    }

    /// Copies a held sequence's KV straight into another worker's cache, into the blocks that
    /// worker reserved for it (`dst`, in sequence order).
    pub fn copy_held_to(
        &mut self,
        held: &HeldSeq,
        target: &SharedKvCache,
        dst: &[u32],
    ) -> Result<(), EngineError> {
        if held.0.blocks.len() != dst.len() {
            return Err(EngineError::InvalidRequest(format!(
                "{} blocks reserved for a sequence of {}",
                dst.len(),
                held.0.blocks.len()
            )));
        }
        self.backend.copy_blocks_to(target, &held.0.blocks, dst)
    }

    /// Frees a held sequence; its full blocks stay in the prefix cache.
    pub fn release(&mut self, held: HeldSeq) {
        self.blocks.release_all(&held.0.blocks);
    }

    /// Takes blocks for a sequence whose KV is about to arrive (decode role). Refuses at once when
    /// there is no room, so the sender can try another worker.
    pub fn reserve(&mut self, num_blocks: usize) -> Result<Reservation, EngineError> {
        if num_blocks == 0 {
            return Err(EngineError::InvalidRequest(
                "a reservation needs at least one block".into(),
            ));
        }
        // Keep room for the running sequences' next tokens, or imports would force preemptions.
        let headroom = self.running.len().div_ceil(self.blocks.block_size());
        if num_blocks + headroom > self.blocks.num_available() {
            return Err(EngineError::NoRoom(format!(
                "no room for {num_blocks} KV blocks: {} of {} available",
                self.blocks.num_available(),
                self.blocks.num_blocks()
            )));
        }
        Ok(Reservation(
            (0..num_blocks)
                .map(|_| self.blocks.allocate().expect("availability checked"))
                .collect(),
        ))
    }

    /// Frees the blocks of an import that will not complete.
    pub fn cancel(&mut self, reservation: Reservation) {
        self.blocks.release_all(&reservation.0);
    }

    /// Checks an imported sequence against the model and its blocks: every token in the
    /// vocabulary, the whole sequence (and what is left to generate) inside the context, one
    /// block per `block_size` computed tokens. A sender is not trusted with the engine's
    /// invariants.
    pub fn validate_import(
        &self,
        tokens: &[u32],
        prompt_len: usize,
        params: &SamplingParams,
        num_blocks: usize,
    ) -> Result<(), EngineError> {
        let bad = |m: String| Err(EngineError::InvalidRequest(m));
        if prompt_len == 0 || prompt_len >= tokens.len() {
            return bad(format!(
                "an import is its prompt and the first token: {} tokens with a prompt of {prompt_len}",
                tokens.len()
            ));
        }
        self.validate(&tokens[..prompt_len], params)?;
        let vocab = self.backend.config().vocab_size;
        if let Some(t) = tokens[prompt_len..].iter().find(|&&t| t as usize >= vocab) {
            return bad(format!(
                "generated token {t} is outside the vocabulary (0..{vocab})"
            ));
        }
        let generated = tokens.len() - prompt_len;
        if generated > params.max_tokens {
            return bad(format!(
                "{generated} tokens generated already, more than max_tokens ({})",
                params.max_tokens
            ));
        }
        let computed = tokens.len() - 1;
        let need = blocks_for(computed, self.blocks.block_size());
        if need != num_blocks {
            return bad(format!(
                "{computed} tokens of KV fill {need} blocks, not the {num_blocks} reserved"
            ));
        }
        Ok(())
    }

    /// Makes reserved blocks a sequence: writes the arrived KV into them (`None`: the sender
    /// already wrote them, device to device) after [`Engine::validate_import`]. On any error
    /// the blocks are freed. `tokens` is the prompt plus the first generated token.
    pub fn commit(
        &mut self,
        reservation: Reservation,
        tokens: Vec<u32>,
        prompt_len: usize,
        params: SamplingParams,
        kv: Option<&[u8]>,
    ) -> Result<ParkedSeq, EngineError> {
        let blocks = reservation.0;
        let checked = self
            .validate_import(&tokens, prompt_len, &params, blocks.len())
            .and_then(|()| match kv {
                Some(kv) => self.backend.write_blocks(&blocks, kv),
                None => Ok(()),
            });
        if let Err(e) = checked {
            self.blocks.release_all(&blocks);
            return Err(e);
        }
        let computed = tokens.len() - 1;
        let hashes = prefix_hashes(&tokens[..computed], self.blocks.block_size());
        for (&b, &h) in blocks.iter().zip(&hashes) {
            self.blocks.register_full(b, h);
        }
        Ok(ParkedSeq(Sequence {
            id: 0,
            tokens,
            prompt_len,
            computed,
            blocks,
            hashes,
            params,
            hold: false,
        }))
    }

    /// Moves a parked sequence into the running batch under `id`; it decodes from the next step.
    pub fn attach(&mut self, id: u64, parked: ParkedSeq) -> Result<(), EngineError> {
        if self.in_batch(id) {
            self.drop_parked(parked);
            return Err(EngineError::InvalidRequest(format!(
                "request id {id} is already in use"
            )));
        }
        let mut seq = parked.0;
        seq.id = id;
        self.running.push(seq);
        Ok(())
    }

    /// Frees a parked sequence nobody attached to.
    pub fn drop_parked(&mut self, parked: ParkedSeq) {
        self.blocks.release_all(&parked.0.blocks);
    }

    /// Drops a queued or running request, freeing its blocks. Returns whether it was found.
    pub fn abort(&mut self, id: u64) -> bool {
        if let Some(i) = self.waiting.iter().position(|s| s.id == id) {
            self.waiting.remove(i);
            return true;
        }
        if let Some(i) = self.running.iter().position(|s| s.id == id) {
            let seq = self.running.remove(i);
            self.blocks.release_all(&seq.blocks);
            return true;
        }
        false
    }

    /// Frees a running sequence's blocks and puts it back at the head of the queue; it will be
    /// recomputed from its tokens (prompt and generated so far) when room returns.
    fn preempt(&mut self, index: usize) {
        let mut seq = self.running.remove(index);
        self.blocks.release_all(&seq.blocks);
        seq.blocks.clear();
        seq.hashes.clear();
        seq.computed = 0;
        self.waiting.push_front(seq);
        self.preemptions += 1;
    }

    /// Picks this step's work: `(running index, tokens to compute)`.
    fn schedule(&mut self) -> (Vec<(usize, usize)>, usize, Vec<u64>) {
        let bs = self.blocks.block_size();
        let mut budget = self.sched.max_batch_tokens;
        let mut plan = Vec::new();
        let mut preempted = 0;
        let mut admitted = Vec::new();
        let mut i = 0;
        // Running sequences first, oldest first: decodes and unfinished prefills.
        while i < self.running.len() {
            let seq = &self.running[i];
            let remaining = seq.tokens.len() - seq.computed;
            let n = remaining.min(self.sched.chunk_size).min(budget);
            if n == 0 {
                i += 1;
                continue;
            }
            let need = blocks_for(seq.computed + n, bs).saturating_sub(seq.blocks.len());
            // Out of blocks: preempt the newest sequence, possibly this one.
            while self.blocks.num_available() < need && self.running.len() > i + 1 {
                self.preempt(self.running.len() - 1);
                preempted += 1;
            }
            if self.blocks.num_available() < need {
                self.preempt(i);
                preempted += 1;
                continue;
            }
            let seq = &mut self.running[i];
            for _ in 0..need {
                seq.blocks
                    .push(self.blocks.allocate().expect("availability checked"));
            }
            plan.push((i, n));
            budget -= n;
            i += 1;
        }
        // Then admit waiting ones, unless this step had to preempt (they would thrash).
        while preempted == 0 && budget > 0 && self.running.len() < self.sched.max_running {
            let Some(seq) = self.waiting.front() else {
                break;
            };
            // Keep at least the last token to compute: its logits give the next token.
            let hashes = prefix_hashes(&seq.tokens[..seq.tokens.len() - 1], bs);
            let cached = self.blocks.acquire_prefix(&hashes);
            let computed = cached.len() * bs;
            let n = (seq.tokens.len() - computed)
                .min(self.sched.chunk_size)
                .min(budget);
            let need = blocks_for(computed + n, bs) - cached.len();
            if self.blocks.num_available() < need {
                self.blocks.release_all(&cached);
                break;
            }
            let mut seq = self.waiting.pop_front().expect("front exists");
            self.blocks.record_lookup(seq.tokens.len(), computed);
            seq.hashes = hashes[..cached.len()].to_vec();
            seq.blocks = cached;
            seq.computed = computed;
            for _ in 0..need {
                seq.blocks
                    .push(self.blocks.allocate().expect("availability checked"));
            }
            admitted.push(seq.id);
            self.running.push(seq);
            plan.push((self.running.len() - 1, n));
            budget -= n;
        }
        (plan, preempted, admitted)
    }

    /// Runs one iteration: schedules, computes, samples, and retires finished sequences.
    pub fn step(&mut self) -> Result<StepOutput, EngineError> {
        let start = Instant::now();
        let (plan, preempted, admitted) = self.schedule();
        let mut out = StepOutput {
            preempted,
            admitted,
            sequences: plan.len(),
            ..Default::default()
        };
        if plan.is_empty() {
            return Ok(out);
        }
        let bs = self.blocks.block_size() as u32;
        let max_blocks = plan
            .iter()
            .map(|&(i, _)| self.running[i].blocks.len())
            .max()
            .unwrap_or(1);
        let mut batch = ForwardBatch {
            max_blocks,
            want_logits: self.capture_logits,
            ..Default::default()
        };
        for (k, &(i, n)) in plan.iter().enumerate() {
            let seq = &self.running[i];
            for pos in seq.computed..seq.computed + n {
                batch.tokens.push(seq.tokens[pos]);
                batch.positions.push(pos as u32);
                batch
                    .slots
                    .push(seq.blocks[pos / bs as usize] * bs + pos as u32 % bs);
                batch.token_seq.push(k as u32);
            }
            batch.block_tables.extend(&seq.blocks);
            batch.block_tables.resize((k + 1) * max_blocks, 0);
            if seq.computed + n == seq.tokens.len() {
                batch.samples.push(Sample {
                    token_index: batch.tokens.len() as u32 - 1,
                    temperature: seq.params.temperature,
                    seed: seq.params.seed,
                    position: seq.tokens.len() as u32,
                });
            }
            if n == 1 && seq.computed >= seq.prompt_len {
                out.decode_tokens += 1;
            } else {
                out.prefill_tokens += n;
            }
        }
        let result = self.backend.forward(&batch)?;
        let vocab = self.backend.config().vocab_size;
        let mut sampled = result.tokens.into_iter().enumerate();
        let mut held_ids = Vec::new();
        for &(i, n) in &plan {
            let seq = &mut self.running[i];
            seq.computed += n;
            while seq.hashes.len() < seq.computed / bs as usize {
                let b = seq.hashes.len();
                let parent = seq.hashes.last().copied().unwrap_or(0);
                let h = block_hash(parent, &seq.tokens[b * bs as usize..(b + 1) * bs as usize]);
                self.blocks.register_full(seq.blocks[b], h);
                seq.hashes.push(h);
            }
            if seq.computed < seq.tokens.len() {
                continue;
            }
            let (k, token) = sampled.next().expect("one sample per completed sequence");
            seq.tokens.push(token);
            let logits = result
                .logits
                .as_ref()
                .map(|l| l[k * vocab..(k + 1) * vocab].to_vec());
            out.tokens.push(TokenEvent {
                id: seq.id,
                token,
                index: seq.generated() - 1,
                logits,
            });
            if seq.params.stop_token == Some(token) {
                out.finished.push((seq.id, FinishReason::Stop));
            } else if seq.generated() >= seq.params.max_tokens {
                out.finished.push((seq.id, FinishReason::Length));
            } else if seq.hold {
                held_ids.push(seq.id);
            }
        }
        // Finished sequences leave now and free their blocks for the next step; held ones leave
        // with theirs.
        if !out.finished.is_empty() || !held_ids.is_empty() {
            let (running, leaving): (Vec<_>, Vec<_>) = std::mem::take(&mut self.running)
                .into_iter()
                .partition(|s| {
                    !held_ids.contains(&s.id) && !out.finished.iter().any(|(id, _)| *id == s.id)
                });
            self.running = running;
            for seq in leaving {
                if held_ids.contains(&seq.id) {
                    out.held.push(HeldSeq(seq));
                } else {
                    self.blocks.release_all(&seq.blocks);
                }
            }
        }
        out.seconds = start.elapsed().as_secs_f64();
        Ok(out)
    }

    /// Every block's reference count equals the number of owners holding it: the engine's
    /// sequences and `outside` (the blocks of held, reserved and parked sequences, which their
    /// owners hold). Tests call it after every event.
    pub fn check_block_accounting<'a>(
        &'a self,
        outside: impl IntoIterator<Item = &'a [BlockId]>,
    ) -> Result<(), String> {
        let mut refs = vec![0u32; self.blocks.num_blocks()];
        let inside = self
            .running
            .iter()
            .chain(&self.waiting)
            .flat_map(|s| &s.blocks);
        for &b in inside.chain(outside.into_iter().flatten()) {
            if b as usize >= refs.len() {
                return Err(format!("block {b} is outside the cache"));
            }
            refs[b as usize] += 1;
        }
        for (b, &r) in refs.iter().enumerate() {
            if self.blocks.ref_count(b as BlockId) != r {
                return Err(format!(
                    "block {b}: ref count {} but held {r} times",
                    self.blocks.ref_count(b as BlockId)
                ));
            }
        }
        Ok(())
    }
}

/// Runs requests to completion and returns each one's generated tokens, in request order.
pub fn generate_all(
    engine: &mut Engine,
    requests: Vec<(Vec<u32>, SamplingParams)>,
) -> Result<Vec<Vec<u32>>, EngineError> {
    let n = requests.len();
    for (i, (prompt, params)) in requests.into_iter().enumerate() {
        engine.add_request(i as u64, prompt, params)?;
    }
    let mut out = vec![Vec::new(); n];
    while engine.has_work() {
        for e in engine.step()?.tokens {
            out[e.id as usize].push(e.token);
        }
    }
    Ok(out)
}
