//! The shared vocabulary: each concept has one type, spelled one way on the command line, in
//! labels, in metrics and on the wire.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::proto;

/// A value that is not one of a type's names.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown {what} {value:?}: expected one of {expected}")]
pub struct UnknownName {
    pub what: &'static str,
    pub value: String,
    pub expected: &'static str,
}

/// Defines `as_str`, `Display` and `FromStr` from one table of names.
macro_rules! named {
    ($ty:ident, $what:literal, { $($variant:ident => $name:literal),+ $(,)? }) => {
        impl $ty {
            pub const ALL: &'static [$ty] = &[$($ty::$variant),+];

            pub fn as_str(self) -> &'static str {
                match self { $($ty::$variant => $name),+ }
            }
        }

        impl fmt::Display for $ty {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl FromStr for $ty {
            type Err = UnknownName;
            fn from_str(s: &str) -> Result<Self, Self::Err> {
                match s {
                    $($name => Ok($ty::$variant),)+
                    _ => Err(UnknownName {
                        what: $what,
                        value: s.to_string(),
                        expected: concat!($($name, " "),+),
                    }),
                }
            }
        }
    };
}

/// What a worker does.
#[derive(
    Clone,
    Copy,
    Debug,
    PartialEq,
    Eq,
    Hash,
    PartialOrd,
    Ord,
    Serialize,
    Deserialize,
    clap::ValueEnum,
)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Runs prompts and hands their KV to a decode worker.
    Prefill,
    /// Continues handed-over sequences token by token.
    Decode,
    /// Prefill and decode on the same worker (a Colocated pool).
    Unified,
}

named!(Role, "role", { Prefill => "prefill", Decode => "decode", Unified => "unified" });

impl Role {
    pub fn to_proto(self) -> proto::Role {
        match self {
            Role::Prefill => proto::Role::Prefill,
            Role::Decode => proto::Role::Decode,
            Role::Unified => proto::Role::Unified,
        }
    }

    pub fn from_proto(r: proto::Role) -> Option<Role> {
        match r {
            proto::Role::Prefill => Some(Role::Prefill),
            proto::Role::Decode => Some(Role::Decode),
            proto::Role::Unified => Some(Role::Unified),
            proto::Role::Unspecified => None,
        }
    }
}

/// How a pool serves: prefill and decode apart, or together.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize, clap::ValueEnum,
)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub enum PoolMode {
    /// Prefill and decode workers; KV moves from one to the other.
    #[default]
    Disaggregated,
    /// Unified workers that prefill and decode alike.
    Colocated,
}

named!(PoolMode, "pool mode", { Disaggregated => "disaggregated", Colocated => "colocated" });

impl PoolMode {
    /// The worker roles a pool of this mode runs.
    pub fn roles(self) -> &'static [Role] {
        match self {
            PoolMode::Disaggregated => &[Role::Prefill, Role::Decode],
            PoolMode::Colocated => &[Role::Unified],
        }
    }
}

/// Element type of the KV cache, or of KV on the wire.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize, clap::ValueEnum,
)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "lowercase")]
pub enum KvDtype {
    #[default]
    F32,
    F16,
    Bf16,
}

named!(KvDtype, "KV dtype", { F32 => "f32", F16 => "f16", Bf16 => "bf16" });

impl KvDtype {
    /// Bytes of one element.
    pub fn bytes(self) -> usize {
        match self {
            KvDtype::F32 => 4,
            KvDtype::F16 | KvDtype::Bf16 => 2,
        }
    }

    pub fn to_proto(self) -> proto::KvDtype {
        match self {
            KvDtype::F32 => proto::KvDtype::F32,
            KvDtype::F16 => proto::KvDtype::F16,
            KvDtype::Bf16 => proto::KvDtype::Bf16,
        }
    }

    pub fn from_proto(d: proto::KvDtype) -> Option<KvDtype> {
        match d {
            proto::KvDtype::F32 => Some(KvDtype::F32),
            proto::KvDtype::F16 => Some(KvDtype::F16),
            proto::KvDtype::Bf16 => Some(KvDtype::Bf16),
            proto::KvDtype::Unspecified => None,
        }
    }
}

/// Why a sequence stopped, as clients see it (`finish_reason`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FinishReason {
    /// `max_tokens` generated, or the model's context is full.
    Length,
    /// The stop token was generated.
    Stop,
}

named!(FinishReason, "finish reason", { Length => "length", Stop => "stop" });

impl FinishReason {
    pub fn to_proto(self) -> proto::FinishReason {
        match self {
            FinishReason::Length => proto::FinishReason::Length,
            FinishReason::Stop => proto::FinishReason::Stop,
        }
    }

    /// `None` while the sequence goes on.
    pub fn from_proto(r: proto::FinishReason) -> Option<FinishReason> {
        match r {
            proto::FinishReason::Length => Some(FinishReason::Length),
            proto::FinishReason::Stop => Some(FinishReason::Stop),
            proto::FinishReason::Unspecified => None,
        }
    }
}

/// How one sequence's KV moved from a prefill to a decode worker.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum KvTransport {
    /// Read out to the host and streamed over gRPC.
    Grpc,
    /// GPU to GPU through CUDA IPC.
    Device,
}

named!(KvTransport, "KV transport", { Grpc => "grpc", Device => "device" });

impl KvTransport {
    pub fn to_proto(self) -> proto::KvTransport {
        match self {
            KvTransport::Grpc => proto::KvTransport::Grpc,
            KvTransport::Device => proto::KvTransport::Device,
        }
    }

    pub fn from_proto(t: proto::KvTransport) -> Option<KvTransport> {
        match t {
            proto::KvTransport::Grpc => Some(KvTransport::Grpc),
            proto::KvTransport::Device => Some(KvTransport::Device),
            proto::KvTransport::Unspecified => None,
        }
    }
}

/// Which transport a prefill worker uses for KV (its `--kv-transport`).
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize, clap::ValueEnum,
)]
#[serde(rename_all = "lowercase")]
pub enum KvTransportPolicy {
    /// Device to device when the decode worker's cache can be opened (same host, both CUDA),
    /// otherwise over gRPC.
    #[default]
    Auto,
    /// Device to device only; a transfer that cannot go this way fails.
    Device,
    /// Over gRPC only.
    Grpc,
}

named!(KvTransportPolicy, "KV transport policy", { Auto => "auto", Device => "device", Grpc => "grpc" });

/// Where a worker runs its model (its `--backend`).
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize, clap::ValueEnum,
)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "lowercase")]
pub enum BackendKind {
    /// CUDA when a GPU is visible, else the CPU.
    #[default]
    Auto,
    Cpu,
    /// CUDA or fail: never a silent CPU fallback.
    Cuda,
}

named!(BackendKind, "backend", { Auto => "auto", Cpu => "cpu", Cuda => "cuda" });

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_unknown_ones_say_what_is_expected() {
        for r in Role::ALL {
            assert_eq!(r.as_str().parse::<Role>().unwrap(), *r);
            assert_eq!(Role::from_proto(r.to_proto()), Some(*r));
        }
        for d in KvDtype::ALL {
            assert_eq!(d.to_string().parse::<KvDtype>().unwrap(), *d);
            assert_eq!(KvDtype::from_proto(d.to_proto()), Some(*d));
        }
        let e = "router".parse::<Role>().unwrap_err().to_string();
        assert!(
            e.contains("unknown role \"router\"") && e.contains("prefill decode unified"),
            "{e}"
        );
        assert_eq!(
            FinishReason::from_proto(proto::FinishReason::Unspecified),
            None
        );
        assert_eq!(PoolMode::Colocated.roles(), &[Role::Unified]);
    }

    #[test]
    fn serde_and_clap_spell_them_as_display_does() {
        use clap::ValueEnum;
        for r in Role::ALL {
            assert_eq!(serde_json::to_string(r).unwrap(), format!("\"{r}\""));
            assert_eq!(r.to_possible_value().unwrap().get_name(), r.as_str());
        }
        for d in KvDtype::ALL {
            assert_eq!(serde_json::to_string(d).unwrap(), format!("\"{d}\""));
            assert_eq!(d.to_possible_value().unwrap().get_name(), d.as_str());
        }
        for b in BackendKind::ALL {
            assert_eq!(b.to_possible_value().unwrap().get_name(), b.as_str());
        }
        for p in KvTransportPolicy::ALL {
            assert_eq!(p.to_possible_value().unwrap().get_name(), p.as_str());
        }
    }
}
