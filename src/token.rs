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

/// Whether a readiness event belongs to the backplane.
pub fn is_backplane(t: Token) -> bool {
    (BACKPLANE_LAST.0..=BACKPLANE_FIRST.0).contains(&t.0)
}
