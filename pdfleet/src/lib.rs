//! The `pdfleet` CLI's library: a local fleet of real worker and router processes, and the load
//! generator. Integration tests use both.

pub mod experiment;
pub mod fleet;
pub mod load;
pub mod simulate;
pub mod trace;
