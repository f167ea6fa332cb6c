//! Reserved mio tokens, in one place. They sit at the top of the range, so they never
//! meet a slab key (a connection's token is its slab key).

use mio::Token;

pub const LISTENER: Token = Token(usize::MAX - 1);
pub const SIGNALS: Token = Token(usize::MAX - 2);
/// Tokens from here down to `BACKPLANE_LAST` belong to the backplane's sockets.
pub const BACKPLANE_FIRST: Token = Token(usize::MAX - 3);
pub const BACKPLANE_LAST: Token = Token(usize::MAX - 66);
/// The Redis backplane's subscription and publish links.
pub const REDIS_SUB: Token = Token(usize::MAX - 3);
pub const REDIS_PUB: Token = Token(usize::MAX - 4);
/// The Redis backplane's link to a sentinel (`redis+sentinel://`).
pub const REDIS_SENTINEL: Token = Token(usize::MAX - 5);

/// Redis Cluster: the shards' links, two tokens per shard from `REDIS_SUB` down.
pub const MAX_REDIS_SHARDS: usize = (BACKPLANE_FIRST.0 - BACKPLANE_LAST.0).div_ceil(2);

/// The subscription and publish tokens of shard `i` (< `MAX_REDIS_SHARDS`).
pub fn redis_shard(i: usize) -> (Token, Token) {
    (
        Token(BACKPLANE_FIRST.0 - 2 * i),
        Token(BACKPLANE_FIRST.0 - 2 * i - 1),
    )
}

/// The shard a backplane token belongs to.
pub fn redis_shard_of(t: Token) -> usize {
    (BACKPLANE_FIRST.0 - t.0) / 2
}

/// Whether a readiness event belongs to the backplane.
pub fn is_backplane(t: Token) -> bool {
    (BACKPLANE_LAST.0..=BACKPLANE_FIRST.0).contains(&t.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shard_tokens_stay_in_the_backplane_range_and_map_back() {
        for i in 0..MAX_REDIS_SHARDS {
            let (a, b) = redis_shard(i);
            assert!(is_backplane(a) && is_backplane(b), "{i}");
            assert_eq!((redis_shard_of(a), redis_shard_of(b)), (i, i));
        }
        assert_eq!(MAX_REDIS_SHARDS, 32);
    }
}
