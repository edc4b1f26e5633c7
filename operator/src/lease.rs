//! Leader election through a coordination.k8s.io Lease: one operator replica reconciles; the
//! others wait. The leader renews; if it cannot, it exits so that another takes over cleanly.

use std::time::{Duration, Instant};

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use kube::api::{Patch, PatchParams, PostParams};
use kube::{Api, Client};

const LEASE_SECONDS: i32 = 15;

pub struct LeaderElection {
    api: Api<Lease>,
    name: String,
    identity: String,
}

fn now() -> MicroTime {
    MicroTime(chrono::Utc::now())
}

impl LeaderElection {
    pub fn new(client: Client, namespace: &str, name: &str, identity: &str) -> Self {
        LeaderElection {
            api: Api::namespaced(client, namespace),
            name: name.into(),
            identity: identity.into(),
        }
    }

    /// Takes the lease if it is free, ours, or expired. Returns whether we hold it.
    async fn try_acquire(&self) -> Result<bool, kube::Error> {
        let Some(lease) = self.api.get_opt(&self.name).await? else {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(self.name.clone()),
                    ..Default::default()
                },
                spec: Some(LeaseSpec {
                    holder_identity: Some(self.identity.clone()),
                    lease_duration_seconds: Some(LEASE_SECONDS),
                    acquire_time: Some(now()),
                    renew_time: Some(now()),
                    ..Default::default()
                }),
            };
            return match self.api.create(&PostParams::default(), &lease).await {
                Ok(_) => Ok(true),
                Err(kube::Error::Api(e)) if e.code == 409 => Ok(false),
                Err(e) => Err(e),
            };
        };
        let spec = lease.spec.clone().unwrap_or_default();
        let ours = spec.holder_identity.as_deref() == Some(&self.identity);
        let expired = spec.renew_time.as_ref().is_none_or(|t| {
            let age = chrono::Utc::now() - t.0;
            age.num_seconds() > spec.lease_duration_seconds.unwrap_or(LEASE_SECONDS) as i64
        });
        if !ours && !expired {
            return Ok(false);
        }
        // Replace with the resourceVersion we read: a concurrent taker makes this fail.
        let mut next = lease;
        let s = next.spec.get_or_insert_with(Default::default);
        if !ours {
            s.acquire_time = Some(now());
            s.lease_transitions = Some(s.lease_transitions.unwrap_or(0) + 1);
        }
        s.holder_identity = Some(self.identity.clone());
        s.lease_duration_seconds = Some(LEASE_SECONDS);
        s.renew_time = Some(now());
        match self
            .api
            .replace(&self.name, &PostParams::default(), &next)
            .await
        {
            Ok(_) => Ok(true),
            Err(kube::Error::Api(e)) if e.code == 409 => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Waits until this replica leads.
    pub async fn acquire(&self) -> Result<(), kube::Error> {
        loop {
            if self.try_acquire().await? {
                tracing::info!(lease = %self.name, identity = %self.identity, "leading");
                return Ok(());
            }
            tokio::time::sleep(Duration::from_secs(2)).await;
        }
    }

    /// Renews until leadership is lost: another replica took the lease, or it could not be
    /// renewed (the API server down) for so long that the lease is about to end. A failed
    /// renewal is retried meanwhile, so a short outage does not cost the lead.
    pub async fn hold(&self) {
        let lease = Duration::from_secs(LEASE_SECONDS as u64);
        // Give up this long before the lease ends, so that no other replica leads while this
        // one still acts.
        let margin = Duration::from_secs(3);
        let mut renewed = Instant::now();
        loop {
            tokio::time::sleep(lease / 3).await;
            loop {
                match self.try_acquire().await {
                    Ok(true) => {
                        renewed = Instant::now();
                        break;
                    }
                    Ok(false) => return tracing::error!("lost the lease to another replica"),
                    Err(e) if renewed.elapsed() + margin < lease => {
                        tracing::warn!(error = %e, "could not renew the lease; retrying");
                        tokio::time::sleep(Duration::from_secs(1)).await;
                    }
                    Err(e) => {
                        return tracing::error!(error = %e, "could not renew the lease before it ends")
                    }
                }
            }
        }
    }

    /// Gives the lease up on a clean shutdown, so a successor need not wait for it to expire.
    pub async fn release(&self) {
        let patch = serde_json::json!({"spec": {"holderIdentity": null, "renewTime": null}});
        let _ = self
            .api
            .patch(&self.name, &PatchParams::default(), &Patch::Merge(&patch))
            .await;
    }
}
