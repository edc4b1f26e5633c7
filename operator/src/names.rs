//! The names of a pool's children. A pool's name is a DNS subdomain (dots allowed, up to 63
//! characters, which the CRD enforces because it is also a label value); a Service name must be a
//! DNS-1035 label (letters, digits and dashes, a letter first, up to 63). A pool whose name
//! already makes valid child names keeps it as their prefix (`chat-prefill`); any other gets a
//! readable prefix and a hash of its full name (`llama-3-1-5f2c9a1e-prefill`), so two pools never
//! share a child.

use pdfleet_api::rng::mix64;

/// Longest suffix a child gets (`-prefill`, `-unified`), with room to spare.
const SUFFIX_ROOM: usize = 10;
const MAX_NAME: usize = 63;

/// Whether `s` is a DNS-1035 label: what Service names must be.
pub fn is_dns1035_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= MAX_NAME
        && s.starts_with(|c: char| c.is_ascii_lowercase())
        && !s.ends_with('-')
        && s.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
}

/// A stable short hash of a name (FNV-1a, mixed): the same on every operator build.
fn short_hash(s: &str) -> String {
    let mut h = 0xcbf2_9ce4_8422_2325u64;
    for b in s.bytes() {
        h ^= b as u64;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    format!("{:08x}", mix64(h) as u32)
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Names {
    pool: String,
    base: String,
}

impl Names {
    pub fn new(pool: &str) -> Self {
        let fits = is_dns1035_label(pool) && pool.len() + SUFFIX_ROOM <= MAX_NAME;
        let base = if fits {
            pool.to_string()
        } else {
            let readable: String = pool
                .to_ascii_lowercase()
                .chars()
                .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
                .collect();
            let readable = if readable.starts_with(|c: char| c.is_ascii_lowercase()) {
                readable
            } else {
                format!("p-{readable}")
            };
            let keep = MAX_NAME - SUFFIX_ROOM - 9;
            let prefix: String = readable.chars().take(keep).collect();
            format!("{}-{}", prefix.trim_end_matches('-'), short_hash(pool))
        };
        Names {
            pool: pool.to_string(),
            base,
        }
    }

    /// A child's name: the base and what the child is for.
    pub fn child(&self, suffix: &str) -> String {
        format!("{}-{suffix}", self.base)
    }

    /// The router's Service, the pool's front door: the pool's own name when that is a valid
    /// Service name, else the base.
    pub fn front_door(&self) -> String {
        if is_dns1035_label(&self.pool) {
            self.pool.clone()
        } else {
            self.base.clone()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_names_stay_readable() {
        let n = Names::new("chat");
        assert_eq!(n.child("prefill"), "chat-prefill");
        assert_eq!(n.front_door(), "chat");
    }

    #[test]
    fn any_pool_name_gives_valid_distinct_child_names() {
        let names = [
            "llama-3.1",
            "llama-3-1",
            "7b",
            "a.b.c",
            &"x".repeat(60),
            &"y".repeat(63),
            &format!("{}.v2", "m".repeat(58)),
            "Chat",
        ];
        let mut seen = std::collections::HashSet::new();
        for pool in names {
            let n = Names::new(pool);
            for suffix in [
                "prefill", "decode", "unified", "router", "model", "topology",
            ] {
                let c = n.child(suffix);
                assert!(is_dns1035_label(&c), "{pool}: {c}");
                assert!(
                    seen.insert(c.clone()),
                    "{pool}: {c} is another pool's child too"
                );
            }
            assert!(is_dns1035_label(&n.front_door()), "{pool}");
        }
        assert_eq!(
            Names::new("llama-3.1").child("decode"),
            Names::new("llama-3.1").child("decode")
        );
        assert!(Names::new("llama-3.1")
            .child("decode")
            .starts_with("llama-3-1-"));
    }
}
