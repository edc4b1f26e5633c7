//! The SLO planner: each role of a pool sized from its measured demand and capacity, latency as
//! the correction, and the rules by which a recommendation becomes replicas. Pure functions of
//! what it is shown: the operator feeds it Prometheus, `pdfleet simulate` feeds it a simulated
//! fleet, and both run this code.
//!
//! Also here, to be compared with it on the same traces: the rule pdfleet used before
//! ([`policy::Current`]), an HPA on queue depth ([`policy::Hpa`]) and a load planner that moves
//! one replica at a time on thresholds, as Dynamo's does ([`policy::Load`]).

pub mod model;
pub mod planner;
pub mod policy;
pub mod signals;

pub use planner::{Planner, PlannerConfig};
pub use policy::Policy;
pub use signals::{Demand, RoleSignals, Signals, StepSums, TtftParts};
