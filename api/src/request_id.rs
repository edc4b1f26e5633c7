//! Request ids: 128 random bits drawn by the router, unique across router replicas without any
//! coordination, plus an attempt number so that a retry on other workers never meets the state
//! an earlier attempt left behind.

use std::fmt;
use std::str::FromStr;

use crate::proto;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RequestId {
    pub uuid: u128,
    pub attempt: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvalidRequestId {
    #[error("the request id is missing")]
    Missing,
    #[error("the request id is not 32 hex digits, a dot and an attempt number: {0:?}")]
    Malformed(String),
}

impl RequestId {
    /// A fresh id from the operating system's random source, first attempt.
    pub fn random() -> Self {
        let mut bytes = [0u8; 16];
        getrandom::fill(&mut bytes).expect("the operating system's random source");
        // Zero is the "missing" value on the wire.
        let uuid = u128::from_le_bytes(bytes).max(1);
        RequestId { uuid, attempt: 0 }
    }

    /// The same request, tried again on other workers.
    pub fn next_attempt(self) -> Self {
        RequestId {
            attempt: self.attempt + 1,
            ..self
        }
    }

    pub fn to_proto(self) -> proto::RequestId {
        proto::RequestId {
            hi: (self.uuid >> 64) as u64,
            lo: self.uuid as u64,
            attempt: self.attempt,
        }
    }

    pub fn from_proto(id: Option<&proto::RequestId>) -> Result<Self, InvalidRequestId> {
        let id = id.ok_or(InvalidRequestId::Missing)?;
        let uuid = ((id.hi as u128) << 64) | id.lo as u128;
        if uuid == 0 {
            return Err(InvalidRequestId::Missing);
        }
        Ok(RequestId {
            uuid,
            attempt: id.attempt,
        })
    }

    /// The client-facing id (`cmpl-…`): the random part only, the same for every attempt.
    pub fn completion_id(self) -> String {
        format!("cmpl-{:032x}", self.uuid)
    }
}

impl fmt::Display for RequestId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:032x}.{}", self.uuid, self.attempt)
    }
}

impl FromStr for RequestId {
    type Err = InvalidRequestId;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || InvalidRequestId::Malformed(s.to_string());
        let (uuid, attempt) = s.split_once('.').ok_or_else(bad)?;
        if uuid.len() != 32 {
            return Err(bad());
        }
        let uuid = u128::from_str_radix(uuid, 16).map_err(|_| bad())?;
        let attempt = attempt.parse().map_err(|_| bad())?;
        if uuid == 0 {
            return Err(InvalidRequestId::Missing);
        }
        Ok(RequestId { uuid, attempt })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_distinct_and_round_trip() {
        let ids: std::collections::HashSet<RequestId> =
            (0..10_000).map(|_| RequestId::random()).collect();
        assert_eq!(ids.len(), 10_000);
        let id = RequestId::random().next_attempt();
        assert_eq!(id.attempt, 1);
        assert_eq!(RequestId::from_proto(Some(&id.to_proto())).unwrap(), id);
        assert_eq!(id.to_string().parse::<RequestId>().unwrap(), id);
        assert_eq!(id.completion_id(), id.next_attempt().completion_id());
    }

    #[test]
    fn missing_and_malformed_ids_are_refused() {
        assert_eq!(RequestId::from_proto(None), Err(InvalidRequestId::Missing));
        assert_eq!(
            RequestId::from_proto(Some(&proto::RequestId::default())),
            Err(InvalidRequestId::Missing)
        );
        assert!("cmpl-1".parse::<RequestId>().is_err());
        assert!(format!("{:032x}.x", 5u128).parse::<RequestId>().is_err());
    }
}
