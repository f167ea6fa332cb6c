//! A message's place in its channel's history: [`Epoch`] (which history) and
//! [`StreamPosition`] (the offset in it). A leaf: every backplane and, later, client
//! protocols speak in these.
//!
//! Why an epoch: offsets count 1, 2, 3… per channel, but Redis can lose a channel's
//! history (restarted without persistence, keys expired, FLUSHALL) and then counts from 1
//! again. Offset 5 of the old history and offset 5 of the new one are different
//! messages; the epoch (a short random id chosen when a history begins) tells them apart.
//! So "everything after offset 5 of epoch `k3x9`" is a question with one answer.

use bytes::Bytes;

/// Longest epoch accepted (wsfan's own are 13 characters).
pub const MAX_EPOCH: usize = 32;

/// Which history a channel's offsets count in. Never empty; only `[0-9a-z]`, at most
/// [`MAX_EPOCH`] bytes — anything else (a foreign publisher's or a tampered key's) is
/// not an epoch.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Epoch(Bytes);

impl Epoch {
    pub fn new(b: Bytes) -> Option<Epoch> {
        let ok = !b.is_empty()
            && b.len() <= MAX_EPOCH
            && b.iter()
                .all(|c| c.is_ascii_digit() || c.is_ascii_lowercase());
        ok.then_some(Epoch(b))
    }

    /// For tests and tools: panics on a string that is not an epoch.
    pub fn from_static(s: &'static str) -> Epoch {
        match Epoch::new(Bytes::from_static(s.as_bytes())) {
            Some(e) => e,
            None => panic!("not an epoch: {s:?}"),
        }
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }
}

impl std::fmt::Display for Epoch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&String::from_utf8_lossy(&self.0))
    }
}

/// A message's place: offset `offset` (1, 2, 3…) of history `epoch`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct StreamPosition {
    pub offset: u64,
    pub epoch: Epoch,
}

impl StreamPosition {
    pub fn new(epoch: Epoch, offset: u64) -> StreamPosition {
        StreamPosition { offset, epoch }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_short_lowercase_alphanumerics_are_epochs() {
        for ok in ["a", "0193ab4f0c1d2", "zzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzz"] {
            assert!(
                Epoch::new(Bytes::from_static(ok.as_bytes())).is_some(),
                "{ok}"
            );
        }
        for bad in [
            "",
            "A",
            "a:b",
            "a b",
            "deadbeef\n",
            "zzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzz",
        ] {
            assert!(
                Epoch::new(Bytes::from_static(bad.as_bytes())).is_none(),
                "{bad:?}"
            );
        }
    }
}
