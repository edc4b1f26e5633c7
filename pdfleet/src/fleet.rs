//! A fleet on one machine: prefill, decode or unified worker processes and a router, on
//! loopback. Stopping it sends SIGTERM, so workers drain as they would in a pod.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Mode {
    /// Prefill and decode workers, KV moved between them.
    Disaggregated,
    /// Unified workers doing both (the colocated baseline).
    Colocated,
}

#[derive(Clone, Debug)]
pub struct FleetConfig {
    pub mode: Mode,
    pub prefill: usize,
    pub decode: usize,
    pub unified: usize,
    /// Router port; 0 picks a free one.
    pub port: u16,
    pub backend: String,
    pub weights: Option<PathBuf>,
    /// Extra flags for every worker (engine knobs such as `--chunk-size 64`).
    pub worker_args: Vec<String>,
    /// Extra flags for the router.
    pub router_args: Vec<String>,
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
            mode: Mode::Disaggregated,
            prefill: 1,
            decode: 1,
            unified: 2,
            port: 0,
            backend: "auto".into(),
            weights: None,
            worker_args: Vec::new(),
            router_args: Vec::new(),
            bin_dir: None,
            log_dir: None,
            gpus: 0,
        }
    }
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
    pub router: Option<Process>,
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
        let roles: Vec<&str> = match cfg.mode {
            Mode::Disaggregated => std::iter::repeat_n("prefill", cfg.prefill)
                .chain(std::iter::repeat_n("decode", cfg.decode))
                .collect(),
            Mode::Colocated => std::iter::repeat_n("unified", cfg.unified).collect(),
        };
        let mut fleet = Fleet {
            workers: Vec::new(),
            router: None,
            url: String::new(),
        };
        for (i, role) in roles.iter().enumerate() {
            let (grpc, http) = (free_port()?, free_port()?);
            let name = format!("{role}-{i}");
            let mut cmd = Command::new(&worker_bin);
            cmd.args(["serve", "--role", role, "--backend", &cfg.backend])
                .args([
                    "--grpc-addr",
                    &format!("127.0.0.1:{grpc}"),
                    "--http-addr",
                    &format!("127.0.0.1:{http}"),
                ])
                .args(["--pod", &name, "--domain", "local"])
                .args(&cfg.worker_args)
                .stdout(output(cfg, &name)?)
                .stderr(output(cfg, &name)?);
            if let Some(w) = &cfg.weights {
                cmd.arg("--weights").arg(w);
            }
            if cfg.gpus > 0 {
                // Every worker sees every GPU (a prefill worker writes into its decode worker's).
                cmd.args(["--cuda-device", &(i % cfg.gpus).to_string()]);
            }
            let child = cmd
                .spawn()
                .with_context(|| format!("starting {}", worker_bin.display()))?;
            fleet.workers.push(Process {
                name,
                child,
                addr: format!("http://127.0.0.1:{grpc}"),
                http: Some(format!("http://127.0.0.1:{http}")),
            });
        }
        let port = if cfg.port == 0 {
            free_port()?
        } else {
            cfg.port
        };
        let mut cmd = Command::new(&router_bin);
        cmd.args(["--listen", &format!("127.0.0.1:{port}"), "--pod", "router"]);
        for (w, role) in fleet.workers.iter().zip(&roles) {
            cmd.arg(format!("--{role}")).arg(&w.addr);
        }
        cmd.args(&cfg.router_args)
            .stdout(output(cfg, "router")?)
            .stderr(output(cfg, "router")?);
        let child = cmd
            .spawn()
            .with_context(|| format!("starting {}", router_bin.display()))?;
        fleet.url = format!("http://127.0.0.1:{port}");
        fleet.router = Some(Process {
            name: "router".into(),
            child,
            addr: fleet.url.clone(),
            http: None,
        });
        Ok(fleet)
    }

    /// Waits until the router answers a completion, i.e. it sees healthy workers.
    pub async fn wait_ready(&mut self, timeout: Duration) -> anyhow::Result<()> {
        let client = reqwest::Client::new();
        let deadline = Instant::now() + timeout;
        loop {
            for p in self.workers.iter_mut().chain(self.router.as_mut()) {
                if let Some(status) = p.child.try_wait()? {
                    bail!("{} exited during start-up ({status})", p.name);
                }
            }
            let probe = client
                .post(format!("{}/v1/completions", self.url))
                .json(&serde_json::json!({"prompt": [1, 2, 3], "max_tokens": 1}))
                .timeout(Duration::from_secs(5))
                .send()
                .await;
            if matches!(&probe, Ok(r) if r.status().is_success()) {
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
        if let Some(r) = &self.router {
            terminate(&r.child);
        }
        for w in &self.workers {
            terminate(&w.child);
        }
        let deadline = Instant::now() + Duration::from_secs(40);
        for p in self.workers.iter_mut().chain(self.router.as_mut()) {
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
