//! Whose failure a gRPC error is. A prefill worker's error may be the decode worker's doing (no
//! room, unreachable, a stale cache): it says so in a typed status detail, so the router replaces
//! only the worker at fault. Nothing is read from message text.

use prost::Message;
use tonic::Status;

use crate::proto::{Failure, Party};

/// Marks `status` as the failure of the decode worker at `addr`.
pub fn of_decode(addr: &str, status: Status) -> Status {
    let detail = Failure {
        party: Party::Decode as i32,
        peer: addr.to_string(),
    };
    Status::with_details(
        status.code(),
        format!("decode worker {addr}: {}", status.message()),
        detail.encode_to_vec().into(),
    )
}

/// The party an error names; a status without our detail is the answering worker's own.
pub fn party(status: &Status) -> Party {
    Failure::decode(status.details())
        .ok()
        .and_then(|f| Party::try_from(f.party).ok())
        .filter(|p| *p != Party::Unspecified)
        .unwrap_or(Party::Responder)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_decode_workers_failures_are_told_apart_without_reading_text() {
        let e = of_decode("http://d:1", Status::resource_exhausted("no room"));
        assert_eq!(party(&e), Party::Decode);
        assert_eq!(e.code(), tonic::Code::ResourceExhausted);
        assert!(e.message().contains("no room"));
        // A message that merely looks like one is the worker's own.
        assert_eq!(
            party(&Status::internal("decode http://d:1: boom")),
            Party::Responder
        );
    }
}
