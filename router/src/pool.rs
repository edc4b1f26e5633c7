//! The workers behind the router: their health and load (polled over gRPC `Status`), and the
//! choice of prefill worker (prefix-cache affinity balanced by load) and decode worker (free KV,
//! same topology domain first).

use std::collections::{BTreeMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use pdfleet_api::proto::worker_client::WorkerClient;
use pdfleet_api::proto::{StatusRequest, WorkerStatus};
use pdfleet_api::{PoolMode, Role};
use tonic::transport::Channel;

/// A worker as discovery (or the command line) names it: its gRPC address, role, the topology
/// domain it was placed in ("" when unknown) and its node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WorkerAddr {
    pub addr: String,
    pub role: Role,
    pub domain: String,
    pub node: Option<String>,
}

/// Prefix hashes a worker was recently sent, oldest dropped first.
struct RecentPrefixes {
    order: VecDeque<u64>,
    set: HashSet<u64>,
}

const RECENT_PREFIXES: usize = 8192;

impl RecentPrefixes {
    fn matched(&self, hashes: &[u64]) -> usize {
        hashes.iter().take_while(|h| self.set.contains(h)).count()
    }

    fn record(&mut self, hashes: &[u64]) {
        for &h in hashes {
            if self.set.insert(h) {
                self.order.push_back(h);
                if self.order.len() > RECENT_PREFIXES {
                    let old = self.order.pop_front().expect("non-empty");
                    self.set.remove(&old);
                }
            }
        }
    }
}

pub struct WorkerEntry {
    pub addr: String,
    pub role: Role,
    /// Where discovery placed it (its node or zone); the worker's own report wins when it has one.
    placed_domain: String,
    node: Option<String>,
    pub client: WorkerClient<Channel>,
    status: Mutex<Option<WorkerStatus>>,
    healthy: AtomicBool,
    inflight: AtomicUsize,
    recent: Mutex<RecentPrefixes>,
}

impl WorkerEntry {
    fn new(w: &WorkerAddr) -> anyhow::Result<Self> {
        let (addr, role, placed_domain) = (w.addr.as_str(), w.role, w.domain.as_str());
        let channel = Channel::from_shared(addr.to_string())?
            .connect_timeout(Duration::from_secs(2))
            .connect_lazy();
        Ok(WorkerEntry {
            addr: addr.to_string(),
            role,
            placed_domain: placed_domain.to_string(),
            node: w.node.clone(),
            client: WorkerClient::new(channel)
                .max_decoding_message_size(pdfleet_api::MAX_MESSAGE_BYTES),
            status: Mutex::new(None),
            healthy: AtomicBool::new(false),
            inflight: AtomicUsize::new(0),
            recent: Mutex::new(RecentPrefixes {
                order: VecDeque::new(),
                set: HashSet::new(),
            }),
        })
    }

    /// The domain the worker reports itself, else where discovery placed it.
    fn own_domain(&self) -> String {
        let reported = self
            .status
            .lock()
            .expect("lock")
            .as_ref()
            .map(|s| s.domain.clone())
            .unwrap_or_default();
        if reported.is_empty() {
            self.placed_domain.clone()
        } else {
            reported
        }
    }

    pub fn healthy(&self) -> bool {
        self.healthy.load(Ordering::Relaxed)
    }

    fn free_blocks(&self) -> i64 {
        let s = self.status.lock().expect("lock");
        s.as_ref()
            .map(|s| s.blocks_total as i64 - s.blocks_used as i64)
            .unwrap_or(0)
    }

    pub fn inflight(&self) -> usize {
        self.inflight.load(Ordering::Relaxed)
    }

    /// Claims one of the worker's in-flight slots until the guard drops, if one is free: the
    /// check and the increment are one atomic step, so concurrent requests never overshoot.
    fn try_start(self: &Arc<Self>, max: usize) -> Option<InflightGuard> {
        self.inflight
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < max).then_some(n + 1)
            })
            .ok()
            .map(|_| InflightGuard(self.clone()))
    }

    /// A transport failure: stop routing here until the next successful status poll.
    pub fn mark_unhealthy(&self) {
        self.healthy.store(false, Ordering::Relaxed);
    }
}

impl std::fmt::Debug for WorkerEntry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} worker {}", self.role, self.addr)
    }
}

#[derive(Debug)]
pub struct InflightGuard(Arc<WorkerEntry>);

impl Drop for InflightGuard {
    fn drop(&mut self) {
        self.0.inflight.fetch_sub(1, Ordering::AcqRel);
    }
}

#[derive(Debug, PartialEq, Eq)]
pub enum PickError {
    /// No healthy worker of the role.
    NoneHealthy(Role),
    /// All healthy workers are at their in-flight limit.
    AllBusy(Role),
}

pub struct Pool {
    workers: RwLock<Vec<Arc<WorkerEntry>>>,
    pub max_inflight_per_worker: usize,
    /// The pool's mode when configured; else read from the workers there are.
    mode: Option<PoolMode>,
    /// Node name to topology domain, from the operator's topology map.
    node_domains: RwLock<BTreeMap<String, String>>,
}

impl Pool {
    pub fn new(max_inflight_per_worker: usize, mode: Option<PoolMode>) -> Self {
        Pool {
            workers: RwLock::new(Vec::new()),
            max_inflight_per_worker,
            mode,
            node_domains: RwLock::new(BTreeMap::new()),
        }
    }

    pub fn set_node_domains(&self, map: BTreeMap<String, String>) {
        *self.node_domains.write().expect("lock") = map;
    }

    /// A worker's topology domain: its own report, else where discovery placed it, else its
    /// node's domain in the topology map ("" when unknown).
    pub fn domain_of(&self, w: &WorkerEntry) -> String {
        let own = w.own_domain();
        if !own.is_empty() {
            return own;
        }
        w.node
            .as_ref()
            .and_then(|n| self.node_domains.read().expect("lock").get(n).cloned())
            .unwrap_or_default()
    }

    /// Replaces the worker list, keeping the state of workers that stay.
    pub fn set_workers(&self, list: &[WorkerAddr]) -> anyhow::Result<()> {
        let mut workers = self.workers.write().expect("lock");
        let mut next = Vec::new();
        for w in list {
            match workers
                .iter()
                .find(|e| e.addr == w.addr && e.role == w.role && e.placed_domain == w.domain)
            {
                Some(e) => next.push(e.clone()),
                None => next.push(Arc::new(WorkerEntry::new(w)?)),
            }
        }
        *workers = next;
        Ok(())
    }

    pub fn workers(&self) -> Vec<Arc<WorkerEntry>> {
        self.workers.read().expect("lock").clone()
    }

    pub fn mode(&self) -> PoolMode {
        if let Some(m) = self.mode {
            return m;
        }
        let ws = self.workers();
        if ws.iter().any(|w| w.role == Role::Prefill) && ws.iter().any(|w| w.role == Role::Decode) {
            PoolMode::Disaggregated
        } else {
            PoolMode::Colocated
        }
    }

    /// Whether every role the pool's mode needs has a healthy worker (the router's readiness).
    pub fn serving(&self) -> bool {
        let ws = self.workers();
        self.mode()
            .roles()
            .iter()
            .all(|&r| ws.iter().any(|w| w.role == r && w.healthy()))
    }

    /// The block size the workers report (they hash prompts into blocks of this many tokens).
    pub fn block_size(&self) -> usize {
        self.workers()
            .iter()
            .find_map(|w| {
                w.status
                    .lock()
                    .expect("lock")
                    .as_ref()
                    .map(|s| s.block_size as usize)
            })
            .unwrap_or(16)
    }

    /// Polls every worker's status; one that does not answer, or is draining, takes no new work.
    pub async fn poll_once(&self) {
        let futures = self.workers().into_iter().map(|w| async move {
            let mut client = w.client.clone();
            let result =
                tokio::time::timeout(Duration::from_secs(1), client.status(StatusRequest {})).await;
            match result {
                Ok(Ok(resp)) => {
                    let s = resp.into_inner();
                    // An address reused by another role's worker is not this worker.
                    let reported = pdfleet_api::proto::Role::try_from(s.role)
                        .ok()
                        .and_then(Role::from_proto);
                    let same = reported == Some(w.role);
                    if !same {
                        tracing::warn!(addr = %w.addr, expected = %w.role, ?reported, "a worker answers with another role");
                    }
                    w.healthy.store(s.ready && same, Ordering::Relaxed);
                    *w.status.lock().expect("lock") = Some(s);
                }
                _ => w.healthy.store(false, Ordering::Relaxed),
            }
        });
        futures_util::future::join_all(futures).await;
    }

    pub async fn poll_forever(self: Arc<Self>, every: Duration) {
        loop {
            self.poll_once().await;
            tokio::time::sleep(every).await;
        }
    }

    fn candidates(
        &self,
        role: Role,
        exclude: &[String],
    ) -> Result<Vec<Arc<WorkerEntry>>, PickError> {
        let healthy: Vec<_> = self
            .workers()
            .into_iter()
            .filter(|w| w.role == role && w.healthy() && !exclude.contains(&w.addr))
            .collect();
        if healthy.is_empty() {
            return Err(PickError::NoneHealthy(role));
        }
        let free: Vec<_> = healthy
            .into_iter()
            .filter(|w| w.inflight() < self.max_inflight_per_worker)
            .collect();
        if free.is_empty() {
            return Err(PickError::AllBusy(role));
        }
        Ok(free)
    }

    /// The best candidate by `better` that still has a free slot, with the slot claimed. A
    /// worker that filled up between the choice and the claim (another request won it) is
    /// passed over; when every one did, the role is busy.
    fn claim(
        &self,
        role: Role,
        exclude: &[String],
        better: impl Fn(&Arc<WorkerEntry>, &Arc<WorkerEntry>) -> std::cmp::Ordering,
    ) -> Result<(Arc<WorkerEntry>, InflightGuard), PickError> {
        let mut passed = exclude.to_vec();
        loop {
            let best = match self.candidates(role, &passed) {
                Ok(c) => c
                    .into_iter()
                    .max_by(&better)
                    .expect("candidates are non-empty"),
                Err(PickError::NoneHealthy(_)) if passed.len() > exclude.len() => {
                    return Err(PickError::AllBusy(role))
                }
                Err(e) => return Err(e),
            };
            match best.try_start(self.max_inflight_per_worker) {
                Some(guard) => return Ok((best, guard)),
                None => passed.push(best.addr.clone()),
            }
        }
    }

    /// Prefill (or unified) worker: the one already holding most of the prompt's leading blocks,
    /// less its load; a cached block is worth a few queued requests. Its slot comes claimed.
    pub fn pick_by_prefix(
        &self,
        role: Role,
        hashes: &[u64],
        exclude: &[String],
    ) -> Result<(Arc<WorkerEntry>, InflightGuard), PickError> {
        let score = |w: &WorkerEntry| {
            4.0 * w.recent.lock().expect("lock").matched(hashes) as f64 - w.inflight() as f64
        };
        let (best, guard) = self.claim(role, exclude, |a, b| score(a).total_cmp(&score(b)))?;
        best.recent.lock().expect("lock").record(hashes);
        Ok((best, guard))
    }

    /// Decode worker: most free KV blocks, preferring the prefill worker's topology domain so the
    /// KV does not leave it.
    pub fn pick_decode(
        &self,
        domain: &str,
        exclude: &[String],
    ) -> Result<(Arc<WorkerEntry>, InflightGuard), PickError> {
        let key = |w: &Arc<WorkerEntry>| {
            (
                !domain.is_empty() && self.domain_of(w) == domain,
                w.free_blocks() - w.inflight() as i64,
            )
        };
        self.claim(Role::Decode, exclude, |a, b| key(a).cmp(&key(b)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pool(list: &[(&str, Role)]) -> Pool {
        let p = Pool::new(2, None);
        let list: Vec<_> = list
            .iter()
            .map(|(a, r)| WorkerAddr {
                addr: a.to_string(),
                role: *r,
                domain: String::new(),
                node: Some(format!("node-{a}")),
            })
            .collect();
        p.set_workers(&list).unwrap();
        p
    }

    fn set_status(p: &Pool, addr: &str, domain: &str, used: u32) {
        let w = p.workers().into_iter().find(|w| w.addr == addr).unwrap();
        w.healthy.store(true, Ordering::Relaxed);
        *w.status.lock().unwrap() = Some(WorkerStatus {
            domain: domain.into(),
            blocks_total: 100,
            blocks_used: used,
            ready: true,
            ..Default::default()
        });
    }

    #[tokio::test]
    async fn prefill_follows_the_prefix_then_the_load() {
        let p = pool(&[("http://a:1", Role::Prefill), ("http://b:1", Role::Prefill)]);
        set_status(&p, "http://a:1", "", 0);
        set_status(&p, "http://b:1", "", 0);
        let (first, _busy) = p.pick_by_prefix(Role::Prefill, &[1, 2, 3], &[]).unwrap();
        // Same prefix: the warm worker wins despite one request in flight.
        assert_eq!(
            p.pick_by_prefix(Role::Prefill, &[1, 2, 3], &[])
                .unwrap()
                .0
                .addr,
            first.addr
        );
        // A new prefix goes to the idle one.
        assert_ne!(
            p.pick_by_prefix(Role::Prefill, &[9], &[]).unwrap().0.addr,
            first.addr
        );
    }

    #[tokio::test]
    async fn decode_prefers_the_same_domain_then_free_blocks() {
        let p = pool(&[
            ("http://x:1", Role::Decode),
            ("http://y:1", Role::Decode),
            ("http://z:1", Role::Decode),
        ]);
        set_status(&p, "http://x:1", "rack-a", 90);
        set_status(&p, "http://y:1", "rack-b", 0);
        set_status(&p, "http://z:1", "rack-a", 50);
        assert_eq!(p.pick_decode("rack-a", &[]).unwrap().0.addr, "http://z:1");
        assert_eq!(p.pick_decode("rack-c", &[]).unwrap().0.addr, "http://y:1");
        assert_eq!(
            p.pick_decode("rack-a", &["http://z:1".into()])
                .unwrap()
                .0
                .addr,
            "http://x:1"
        );
    }

    #[tokio::test]
    async fn any_topology_keys_domains_come_from_the_operators_map() {
        let p = pool(&[("http://x:1", Role::Decode), ("http://y:1", Role::Decode)]);
        // The workers report no domain; the map places them by node.
        set_status(&p, "http://x:1", "", 0);
        set_status(&p, "http://y:1", "", 10);
        assert_eq!(p.pick_decode("rack-7", &[]).unwrap().0.addr, "http://x:1");
        p.set_node_domains(
            [
                ("node-http://x:1".to_string(), "rack-1".to_string()),
                ("node-http://y:1".to_string(), "rack-7".to_string()),
            ]
            .into(),
        );
        assert_eq!(p.pick_decode("rack-7", &[]).unwrap().0.addr, "http://y:1");
    }

    #[tokio::test]
    async fn busy_and_unhealthy_workers_are_told_apart() {
        let p = pool(&[("http://a:1", Role::Unified)]);
        assert_eq!(
            p.pick_by_prefix(Role::Unified, &[], &[]).unwrap_err(),
            PickError::NoneHealthy(Role::Unified)
        );
        set_status(&p, "http://a:1", "", 0);
        let _first = p.pick_by_prefix(Role::Unified, &[], &[]).unwrap();
        let _second = p.pick_by_prefix(Role::Unified, &[], &[]).unwrap();
        assert_eq!(
            p.pick_by_prefix(Role::Unified, &[], &[]).unwrap_err(),
            PickError::AllBusy(Role::Unified)
        );
    }

    #[tokio::test]
    async fn concurrent_picks_never_overshoot_the_in_flight_limit() {
        // Two slots per worker, two workers, 64 threads picking at the same instant, again and
        // again: never more than four claims held at once.
        let p = Arc::new(pool(&[
            ("http://a:1", Role::Unified),
            ("http://b:1", Role::Unified),
        ]));
        set_status(&p, "http://a:1", "", 0);
        set_status(&p, "http://b:1", "", 0);
        for _ in 0..50 {
            let start = Arc::new(std::sync::Barrier::new(64));
            let held = Arc::new(std::sync::Mutex::new(Vec::new()));
            let threads: Vec<_> = (0..64)
                .map(|_| {
                    let (p, start, held) = (p.clone(), start.clone(), held.clone());
                    std::thread::spawn(move || {
                        start.wait();
                        if let Ok(claim) = p.pick_by_prefix(Role::Unified, &[], &[]) {
                            held.lock().unwrap().push(claim);
                        }
                    })
                })
                .collect();
            for t in threads {
                t.join().unwrap();
            }
            assert_eq!(held.lock().unwrap().len(), 4);
            let inflight: usize = p.workers().iter().map(|w| w.inflight()).sum();
            assert_eq!(inflight, 4);
            held.lock().unwrap().clear();
            assert_eq!(p.workers().iter().map(|w| w.inflight()).sum::<usize>(), 0);
        }
    }
}
