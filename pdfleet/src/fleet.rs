//! A fleet on one machine: prefill, decode or unified worker processes and a router, on
//! loopback. Stopping it sends SIGTERM, so workers drain as they would in a pod.

use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use pdfleet_api::worker_args::{self, RouterArgs, WorkerArgs};
pub use pdfleet_api::PoolMode;
use pdfleet_api::Role;

#[derive(Clone, Debug)]
pub struct FleetConfig {
    pub mode: PoolMode,
    pub prefill: usize,
    pub decode: usize,
    pub unified: usize,
    /// Routers in front of the same workers, each on its own port.
    pub routers: usize,
    /// Every worker's configuration; the fleet sets each one's role, addresses, pod name and
    /// GPU.
    pub worker: WorkerArgs,
    /// Every router's configuration; the fleet sets its address and workers.
    pub router: RouterArgs,
    /// The first router's port; 0 picks a free one.
    pub port: u16,
    /// Where the worker and router binaries are; default: beside the running executable.
    pub bin_dir: Option<PathBuf>,
    /// Worker and router logs go here (default: discarded).
    pub log_dir: Option<PathBuf>,
    /// GPUs to spread workers over (worker i runs on GPU i mod gpus); 0: all on the first.
    pub gpus: usize,
}

impl Default for FleetConfig {
    fn default() -> Self {
        FleetConfig {
            mode: PoolMode::Disaggregated,
            prefill: 1,
            decode: 1,
            unified: 2,
            routers: 1,
            worker: WorkerArgs::new(Role::Unified),
            router: RouterArgs::new(),
            port: 0,
            bin_dir: None,
            log_dir: None,
            gpus: 0,
        }
    }
}

/// A worker configuration from worker flags (`--dim 128 --chunk-size 64 ...`), as
/// `pdfleet-worker serve` would read them; the role is set per worker later.
pub fn worker_from_flags<S: AsRef<str>>(flags: &[S]) -> anyhow::Result<WorkerArgs> {
    let argv = ["serve", "--role", Role::Unified.as_str()]
        .into_iter()
        .chain(flags.iter().map(|f| f.as_ref()));
    worker_args::parse_worker(argv).context("worker flags")
}

/// A router configuration from router flags, as `pdfleet-router` would read them.
pub fn router_from_flags<S: AsRef<str>>(flags: &[S]) -> anyhow::Result<RouterArgs> {
    worker_args::parse_router(flags.iter().map(|f| f.as_ref())).context("router flags")
}

pub struct Process {
    pub name: String,
    pub child: Child,
    /// gRPC address for workers, HTTP base URL for the router.
    pub addr: String,
    /// The worker's `/metrics` base URL.
    pub http: Option<String>,
}

pub struct Fleet {
    pub workers: Vec<Process>,
    pub routers: Vec<Process>,
    /// The first router's base URL.
    pub url: String,
}

/// A port the OS says is free now.
pub fn free_port() -> anyhow::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

fn bin_dir(cfg: &FleetConfig) -> anyhow::Result<PathBuf> {
    if let Some(d) = &cfg.bin_dir {
        return Ok(d.clone());
    }
    let exe = std::env::current_exe()?;
    let mut dir = exe
        .parent()
        .context("executable has no directory")?
        .to_path_buf();
    // Integration tests run from target/<profile>/deps.
    if dir.ends_with("deps") {
        dir.pop();
    }
    Ok(dir)
}

fn find_bin(dir: &Path, name: &str) -> anyhow::Result<PathBuf> {
    let p = dir.join(name);
    if p.exists() {
        Ok(p)
    } else {
        bail!(
            "{name} not found in {} (build the workspace: cargo build --release --workspace)",
            dir.display()
        )
    }
}

fn output(cfg: &FleetConfig, name: &str) -> anyhow::Result<Stdio> {
    Ok(match &cfg.log_dir {
        Some(d) => {
            std::fs::create_dir_all(d)?;
            Stdio::from(std::fs::File::create(d.join(format!("{name}.log")))?)
        }
        None => Stdio::null(),
    })
}

/// Sends SIGTERM: workers drain, the router stops accepting.
pub fn terminate(child: &Child) {
    // SAFETY: kill(2) on a pid we spawned and have not reaped.
    unsafe {
        libc::kill(child.id() as i32, libc::SIGTERM);
    }
}

impl Fleet {
    pub fn start(cfg: &FleetConfig) -> anyhow::Result<Fleet> {
        let dir = bin_dir(cfg)?;
        let worker_bin = find_bin(&dir, "pdfleet-worker")?;
        let router_bin = find_bin(&dir, "pdfleet-router")?;
        let roles: Vec<Role> = match cfg.mode {
            PoolMode::Disaggregated => std::iter::repeat_n(Role::Prefill, cfg.prefill)
                .chain(std::iter::repeat_n(Role::Decode, cfg.decode))
                .collect(),
            PoolMode::Colocated => std::iter::repeat_n(Role::Unified, cfg.unified).collect(),
        };
        let mut fleet = Fleet {
            workers: Vec::new(),
            routers: Vec::new(),
            url: String::new(),
        };
        let loopback = |port| SocketAddr::from(([127, 0, 0, 1], port));
        let mut router = cfg.router.clone();
        for (i, &role) in roles.iter().enumerate() {
            let name = format!("{role}-{i}");
            let mut w = cfg.worker.clone();
            w.role = role;
            w.grpc_addr = loopback(free_port()?);
            w.http_addr = loopback(free_port()?);
            w.pod = Some(name.clone());
            w.domain = Some("local".into());
            if cfg.gpus > 0 {
                // Every worker sees every GPU (a prefill worker writes into its decode worker's).
                w.cuda_device = i % cfg.gpus;
            }
            let child = Command::new(&worker_bin)
                .args(w.to_args())
                .stdout(output(cfg, &name)?)
                .stderr(output(cfg, &name)?)
                .spawn()
                .with_context(|| format!("starting {}", worker_bin.display()))?;
            let addr = format!("http://{}", w.grpc_addr);
            router.add_worker(role, addr.clone());
            fleet.workers.push(Process {
                name,
                child,
                addr,
                http: Some(format!("http://{}", w.http_addr)),
            });
        }
        for r in 0..cfg.routers.max(1) {
            let port = match (r, cfg.port) {
                (0, p) if p != 0 => p,
                _ => free_port()?,
            };
            let name = if r == 0 {
                "router".to_string()
            } else {
                format!("router-{r}")
            };
            router.listen = loopback(port);
            router.pod = Some(name.clone());
            let child = Command::new(&router_bin)
                .args(router.to_args())
                .stdout(output(cfg, &name)?)
                .stderr(output(cfg, &name)?)
                .spawn()
                .with_context(|| format!("starting {}", router_bin.display()))?;
            let url = format!("http://127.0.0.1:{port}");
            fleet.routers.push(Process {
                name,
                child,
                addr: url.clone(),
                http: None,
            });
        }
        fleet.url = fleet.routers[0].addr.clone();
        Ok(fleet)
    }

    /// Waits until every router answers a completion, i.e. it sees healthy workers.
    pub async fn wait_ready(&mut self, timeout: Duration) -> anyhow::Result<()> {
        let client = reqwest::Client::new();
        let deadline = Instant::now() + timeout;
        let mut ready = vec![false; self.routers.len()];
        loop {
            for p in self.workers.iter_mut().chain(self.routers.iter_mut()) {
                if let Some(status) = p.child.try_wait()? {
                    bail!("{} exited during start-up ({status})", p.name);
                }
            }
            for (r, ok) in self
                .routers
                .iter()
                .zip(ready.iter_mut())
                .filter(|(_, ok)| !**ok)
            {
                let probe = client
                    .post(format!("{}/v1/completions", r.addr))
                    .json(&serde_json::json!({"prompt": [1, 2, 3], "max_tokens": 1}))
                    .timeout(Duration::from_secs(5))
                    .send()
                    .await;
                *ok = matches!(&probe, Ok(resp) if resp.status().is_success());
            }
            if ready.iter().all(|&ok| ok) {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("the fleet was not ready within {timeout:?}");
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// SIGTERM to everything, then waits (bounded) for the processes to exit.
    pub fn stop(&mut self) {
        for p in self.routers.iter().chain(&self.workers) {
            terminate(&p.child);
        }
        let deadline = Instant::now() + Duration::from_secs(40);
        for p in self.workers.iter_mut().chain(self.routers.iter_mut()) {
            while Instant::now() < deadline {
                if matches!(p.child.try_wait(), Ok(Some(_))) {
                    break;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = p.child.kill();
            let _ = p.child.wait();
        }
    }
}

impl Drop for Fleet {
    fn drop(&mut self) {
        self.stop();
    }
}
