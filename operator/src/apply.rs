//! Making the cluster hold a pool's children and nothing else: server-side apply of every
//! desired child (one field manager), then deletion of the pool's children that are no longer
//! desired (a role its mode no longer runs, a router scaled to 0). RoleScales are the exception:
//! created once, then scaled by others, so only their status is ours to write.

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, Service, ServiceAccount};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::api::rbac::v1::RoleBinding;
use k8s_openapi::NamespaceResourceScope;
use kube::api::{DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::{Api, Client, Resource, ResourceExt};
use pdfleet_api::Role;
use pdfleet_crds::{InferencePool, RoleScale, RoleScaleStatus};
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::build::{pool_selector, Children, Part};
use crate::error::Error;

pub const FIELD_MANAGER: &str = "pdfleet-operator";

trait Child:
    Resource<Scope = NamespaceResourceScope, DynamicType = ()>
    + Clone
    + DeserializeOwned
    + Serialize
    + std::fmt::Debug
{
}

impl<K> Child for K where
    K: Resource<Scope = NamespaceResourceScope, DynamicType = ()>
        + Clone
        + DeserializeOwned
        + Serialize
        + std::fmt::Debug
{
}

async fn apply_all<K: Child>(client: &Client, ns: &str, objs: &[K]) -> Result<Vec<K>, Error> {
    let api: Api<K> = Api::namespaced(client.clone(), ns);
    let mut applied = Vec::new();
    for obj in objs {
        let name = obj.name_any();
        let params = PatchParams::apply(FIELD_MANAGER).force();
        let out = api
            .patch(&name, &params, &Patch::Apply(obj))
            .await
            .map_err(|source| Error::Apply {
                kind: K::kind(&()).into_owned(),
                name,
                source: Box::new(source),
            })?;
        applied.push(out);
    }
    Ok(applied)
}

/// Applies every desired child; returns the Deployments as the API server now has them.
pub async fn apply(
    client: &Client,
    pool: &InferencePool,
    c: &Children,
) -> Result<Vec<Deployment>, Error> {
    let ns = pool.namespace().expect("pools are namespaced");
    apply_all(client, &ns, &c.config_maps).await?;
    apply_all(client, &ns, &c.service_accounts).await?;
    apply_all(client, &ns, &c.role_bindings).await?;
    apply_all(client, &ns, &c.services).await?;
    let deployments = apply_all(client, &ns, &c.deployments).await?;
    apply_all(client, &ns, &c.pdbs).await?;
    create_absent(client, &ns, &c.role_scales).await?;
    Ok(deployments)
}

/// Creates the RoleScales not there yet; those there keep the replicas someone else set.
async fn create_absent(client: &Client, ns: &str, scales: &[RoleScale]) -> Result<(), Error> {
    let api: Api<RoleScale> = Api::namespaced(client.clone(), ns);
    for rs in scales {
        if api.get_opt(&rs.name_any()).await?.is_some() {
            continue;
        }
        match api.create(&PostParams::default(), rs).await {
            Ok(_) => {}
            Err(kube::Error::Api(e)) if e.code == 409 => {}
            Err(source) => {
                return Err(Error::Apply {
                    kind: "RoleScale".into(),
                    name: rs.name_any(),
                    source: Box::new(source),
                })
            }
        }
    }
    Ok(())
}

/// The replicas each worker role's RoleScale asks for (External autoscaling).
pub async fn scaled_replicas(
    client: &Client,
    pool: &InferencePool,
) -> Result<BTreeMap<Role, i32>, Error> {
    let ns = pool.namespace().expect("pools are namespaced");
    let api: Api<RoleScale> = Api::namespaced(client.clone(), &ns);
    let uid = pool.uid();
    Ok(api
        .list(&ListParams::default().labels(&pool_selector(pool)))
        .await?
        .items
        .into_iter()
        .filter(|rs| {
            rs.owner_references()
                .iter()
                .any(|o| Some(&o.uid) == uid.as_ref())
        })
        .map(|rs| (rs.spec.role, rs.spec.replicas))
        .collect())
}

/// Reports each RoleScale's ready replicas, its pods' selector and the planner's
/// recommendation, for an HPA or KEDA (and people) to read.
pub async fn report_scales(
    client: &Client,
    pool: &InferencePool,
    ready: &BTreeMap<Role, i32>,
    recommended: &BTreeMap<Role, i32>,
) -> Result<(), Error> {
    let ns = pool.namespace().expect("pools are namespaced");
    let api: Api<RoleScale> = Api::namespaced(client.clone(), &ns);
    for (&role, &replicas) in ready {
        let selector = crate::build::selector(pool, Part::Worker(role))
            .into_iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join(",");
        let status = RoleScaleStatus {
            replicas,
            selector,
            recommended: recommended.get(&role).copied(),
        };
        let patch = serde_json::json!({"apiVersion": "pdfleet.dev/v1alpha1", "kind": "RoleScale", "status": status});
        let name = crate::build::child_name(pool, Part::Worker(role));
        api.patch_status(
            &name,
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(&patch),
        )
        .await?;
    }
    Ok(())
}

/// Deletes this pool's children of kind `K` that are not in `keep`; returns their names.
async fn prune_kind<K: Child>(
    client: &Client,
    pool: &InferencePool,
    keep: &[K],
) -> Result<Vec<String>, Error> {
    let ns = pool.namespace().expect("pools are namespaced");
    let api: Api<K> = Api::namespaced(client.clone(), &ns);
    let wanted: BTreeSet<String> = keep.iter().map(|k| k.name_any()).collect();
    let uid = pool.uid();
    let mut deleted = Vec::new();
    for obj in api
        .list(&ListParams::default().labels(&pool_selector(pool)))
        .await?
    {
        let ours = obj
            .owner_references()
            .iter()
            .any(|o| o.controller == Some(true) && Some(&o.uid) == uid.as_ref());
        if !ours || wanted.contains(&obj.name_any()) {
            continue;
        }
        let name = obj.name_any();
        match api.delete(&name, &DeleteParams::background()).await {
            Ok(_) => deleted.push(format!("{}/{name}", K::kind(&()))),
            Err(kube::Error::Api(e)) if e.code == 404 => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(deleted)
}

/// Deletes the pool's children that it no longer wants; returns `Kind/name` of each.
pub async fn prune(
    client: &Client,
    pool: &InferencePool,
    c: &Children,
) -> Result<Vec<String>, Error> {
    let mut deleted = prune_kind::<Deployment>(client, pool, &c.deployments).await?;
    deleted.extend(prune_kind::<PodDisruptionBudget>(client, pool, &c.pdbs).await?);
    deleted.extend(prune_kind::<Service>(client, pool, &c.services).await?);
    deleted.extend(prune_kind::<RoleBinding>(client, pool, &c.role_bindings).await?);
    deleted.extend(prune_kind::<ServiceAccount>(client, pool, &c.service_accounts).await?);
    deleted.extend(prune_kind::<ConfigMap>(client, pool, &c.config_maps).await?);
    deleted.extend(prune_kind::<RoleScale>(client, pool, &c.role_scales).await?);
    Ok(deleted)
}
