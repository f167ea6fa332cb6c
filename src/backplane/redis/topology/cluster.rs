//! Redis Cluster as one backplane: a shard link (a `RedisLink` in sharded mode: its
//! own subscription and publish links, `SSUBSCRIBE` and the script's `SPUBLISH`) per
//! primary that serves a slot this instance needs, at most `MAX_REDIS_SHARDS`; a
//! channel goes where its slot is (its history keys `{C}:m`, `{C}:s` and its shard
//! channel `C` share a slot when `C` has no braces: channel names and the prefix
//! may not contain `{` or `}` here).
//!
//! The topology comes from `CLUSTER SHARDS` (`CLUSTER SLOTS` before Redis 7), asked on
//! any shard link's publish link that is up (at first, a link to a seed node, tried in
//! turn): at start, every `REFRESH_EVERY`, and at once when a shard link reports
//! trouble (a `MOVED`, a link failure, a shard channel Redis dropped). When a slot's
//! primary changes, a shard link whose node serves nothing any more is pointed at the
//! node that took its slots (a failover: everything it holds goes on there), and a
//! channel whose slot now lives on another shard link is handed over with its position
//! and its unacknowledged publishes (slot migration). Either way the channel reads its
//! gap from history on the new node.

use super::super::target::{Addr, Target};
use super::super::{RedisLink, Settings, ShardOf};
use super::{self as topology, Topology};
use crate::backplane::{Backplane, BusEvent, BusStats, HistoryStats, Recovery};
use crate::hub::Interest;
use crate::message::StreamPosition;
use crate::token::{redis_shard, redis_shard_of, MAX_REDIS_SHARDS};
use crate::ws::Kind;
use bytes::Bytes;
use log::{info, warn};
use mio::event::Event;
use mio::Registry;
use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

/// The topology is asked again this often even without trouble.
pub const REFRESH_EVERY: Duration = Duration::from_secs(5);
/// After trouble, the topology is asked at most this often.
const TROUBLE_REFRESH: Duration = Duration::from_millis(200);
/// With no link able to ask (or no answer yet), the next candidate node (seeds, then
/// every node the last topology named) is tried this often.
const SEED_PATIENCE: Duration = Duration::from_secs(1);

pub struct ClusterBackplane {
    seeds: Vec<Target>,
    next_seed: usize,
    /// Settings every shard link starts from (its target and tokens set per shard).
    base: Settings,
    /// Shard links by token slot; the one at `seed` (if any) asks seeds.
    shards: Vec<Option<RedisLink>>,
    seed: Option<usize>,
    seed_since: Instant,
    topology: Option<Topology>,
    /// The topology is wanted again (trouble, or time).
    refresh_due: Instant,
    /// `CLUSTER SLOTS` instead of `CLUSTER SHARDS` (an older Redis refused SHARDS).
    use_slots: bool,
    /// Channels local members want, and the shard link holding each (`None`: no
    /// topology yet).
    wanted: HashMap<String, Option<usize>>,
    /// Publishes waiting for a topology (bounded like a shard's buffer).
    early: VecDeque<(String, Kind, Bytes)>,
    early_dropped: u64,
    events: Vec<BusEvent>,
    last_error_log: Option<Instant>,
    last_error: String,
}

impl ClusterBackplane {
    pub fn new(seeds: Vec<Target>, base: Settings) -> ClusterBackplane {
        let now = Instant::now();
        let mut c = ClusterBackplane {
            seeds,
            next_seed: 0,
            base,
            shards: (0..MAX_REDIS_SHARDS).map(|_| None).collect(),
            seed: None,
            seed_since: now,
            topology: None,
            refresh_due: now,
            use_slots: false,
            wanted: HashMap::new(),
            early: VecDeque::new(),
            early_dropped: 0,
            events: Vec::new(),
            last_error_log: None,
            last_error: String::new(),
        };
        c.open_seed(None, now);
        c
    }

    fn instance(&self) -> &ShardOf {
        self.base
            .shard
            .as_ref()
            .expect("cluster settings carry ShardOf")
    }

    /// A shard link to `target` in a free token slot.
    fn open(&mut self, target: Target) -> Option<usize> {
        let i = self.shards.iter().position(Option::is_none)?;
        let mut s = self.base.clone();
        s.target = target;
        s.shard = Some(ShardOf {
            tokens: redis_shard(i),
            ..self.instance().clone()
        });
        self.shards[i] = Some(RedisLink::new(s));
        Some(i)
    }

    /// Where to ask for the topology: the seeds, then every node the last topology
    /// named (a seed may be the primary that died).
    fn candidates(&self) -> Vec<Addr> {
        let mut v: Vec<Addr> = self.seeds.iter().map(|t| t.addr.clone()).collect();
        for (h, p) in self.topology.iter().flat_map(|t| t.nodes.iter()) {
            let a = Addr::Tcp(h.clone(), *p);
            if !v.iter().any(|x| same(x, &a)) {
                v.push(a);
            }
        }
        v
    }

    /// A link to the next candidate that has no link yet, to ask it for the topology
    /// (the previous asking link is closed if it holds no channel).
    fn open_seed(&mut self, registry: Option<&Registry>, now: Instant) {
        self.seed_since = now;
        if let (Some(i), Some(r)) = (self.seed, registry) {
            if self.shards[i]
                .as_ref()
                .is_some_and(|l| l.wanted().is_empty())
            {
                if let Some(mut l) = self.shards[i].take() {
                    l.close(r);
                }
                self.seed = None;
            }
        }
        let cands = self.candidates();
        for k in 0..cands.len() {
            let addr = cands[(self.next_seed + k) % cands.len()].clone();
            if self.shard_at(&addr).is_some() {
                continue;
            }
            self.next_seed += k + 1;
            let Some(mut t) = self.seeds.first().cloned() else {
                return;
            };
            t.addr = addr;
            self.seed = self.open(t);
            return;
        }
    }

    fn log_error(&mut self, why: String) {
        let now = Instant::now();
        if why != self.last_error
            || self
                .last_error_log
                .is_none_or(|t| now.saturating_duration_since(t) > Duration::from_secs(30))
        {
            warn!("redis cluster: {why}");
            self.last_error = why;
            self.last_error_log = Some(now);
        }
    }

    fn redis_name(&self, channel: &str) -> String {
        format!("{}{}", self.base.prefix, channel)
    }

    /// The node serving `channel`'s slot now.
    fn owner(&self, channel: &str) -> Option<Addr> {
        let t = self.topology.as_ref()?;
        let s = t.owner(topology::slot(self.redis_name(channel).as_bytes()))?;
        Some(Addr::Tcp(s.host.clone(), s.port))
    }

    fn shard_at(&self, addr: &Addr) -> Option<usize> {
        self.shards
            .iter()
            .position(|s| s.as_ref().is_some_and(|l| same(l.addr(), addr)))
    }

    /// The shard link for `addr`, opened if there is none (and a slot is free).
    fn shard_for(&mut self, addr: &Addr) -> Option<usize> {
        if let Some(i) = self.shard_at(addr) {
            return Some(i);
        }
        let mut t = self.seeds.first()?.clone();
        t.addr = addr.clone();
        let i = self.open(t);
        if i.is_none() {
            self.log_error(format!(
                "more than {MAX_REDIS_SHARDS} primaries serve slots this instance needs: channels there wait"
            ));
        }
        i
    }

    /// Where `channel` goes now: its shard link, opened if needed.
    fn route(&mut self, channel: &str) -> Option<usize> {
        let addr = self.owner(channel)?;
        self.shard_for(&addr)
    }

    /// A new topology: shard links whose node serves nothing follow their slots, and
    /// channels whose slot moved to another link are handed over.
    fn apply(&mut self, t: Topology, registry: &Registry, now: Instant) {
        let changed = self.topology.as_ref() != Some(&t);
        if changed {
            info!(
                "redis cluster: {} primaries serve the slots: {}",
                t.shards.len(),
                t.shards
                    .iter()
                    .map(|s| format!("{}:{}", s.host, s.port))
                    .collect::<Vec<_>>()
                    .join(", ")
            );
        }
        self.topology = Some(t);
        let primaries: Vec<Addr> = self
            .topology
            .iter()
            .flat_map(|t| t.shards.iter())
            .map(|s| Addr::Tcp(s.host.clone(), s.port))
            .collect();
        // Failover: a link whose node is no longer a primary follows its channels' new
        // primary, unless a link to that node exists (then its channels move below).
        for i in 0..self.shards.len() {
            let Some(link) = self.shards[i].as_ref() else {
                continue;
            };
            if primaries.iter().any(|p| same(p, link.addr())) {
                continue;
            }
            let to = link.wanted().first().and_then(|ch| self.owner(ch));
            match to {
                Some(to) if self.shard_at(&to).is_none() => {
                    warn!(
                        "redis cluster: {} serves no slot now; its channels follow their slots to {}",
                        show(self.shards[i].as_ref().map(|l| l.addr())),
                        show(Some(&to))
                    );
                    if let Some(l) = self.shards[i].as_mut() {
                        l.retarget(registry, to, now);
                    }
                }
                _ => {
                    if self.shards[i]
                        .as_ref()
                        .is_some_and(|l| l.wanted().is_empty())
                    {
                        if let Some(mut l) = self.shards[i].take() {
                            l.close(registry);
                        }
                        if self.seed == Some(i) {
                            self.seed = None;
                        }
                    }
                }
            }
        }
        // One link to a primary always, to ask for the topology on.
        if self.seed.is_none() {
            if let Some(first) = primaries.first().cloned() {
                self.seed = self.shard_for(&first);
                self.seed_since = now;
            }
        }
        // Slot migration: channels whose slot another link serves now move there.
        let channels: Vec<String> = self.wanted.keys().cloned().collect();
        for ch in channels {
            let Some(to) = self.route(&ch) else {
                continue;
            };
            let from = self.wanted.get(&ch).copied().flatten();
            if from == Some(to) {
                continue;
            }
            let h = match from.and_then(|f| self.shards[f].as_mut()) {
                Some(l) => l.hand_over(&ch),
                None => None,
            };
            if let Some(l) = self.shards[to].as_mut() {
                match h {
                    Some(h) => l.take_over(h),
                    None => l.interest(Interest::Subscribe(ch.as_str().into())),
                }
            }
            self.wanted.insert(ch, Some(to));
        }
        for (ch, kind, payload) in std::mem::take(&mut self.early) {
            self.publish(&ch, kind, payload);
        }
    }

    fn links(&self) -> impl Iterator<Item = &RedisLink> {
        self.shards.iter().flatten()
    }

    fn links_mut(&mut self) -> impl Iterator<Item = &mut RedisLink> {
        self.shards.iter_mut().flatten()
    }
}

fn same(a: &Addr, b: &Addr) -> bool {
    match (a, b) {
        (Addr::Tcp(h1, p1), Addr::Tcp(h2, p2)) => h1 == h2 && p1 == p2,
        (Addr::Unix(a), Addr::Unix(b)) => a == b,
        _ => false,
    }
}

fn show(a: Option<&Addr>) -> String {
    match a {
        Some(Addr::Tcp(h, p)) => format!("{h}:{p}"),
        Some(Addr::Unix(p)) => p.display().to_string(),
        None => "?".into(),
    }
}

/// Sums the shard links' counters (`up`: every link in use ready, set by the caller).
fn add(a: &mut BusStats, b: &BusStats) {
    a.reconnects += b.reconnects;
    a.buffered_messages += b.buffered_messages;
    a.buffered_bytes += b.buffered_bytes;
    a.dropped += b.dropped;
    a.oversize += b.oversize;
    a.published += b.published;
    a.publish_abandoned += b.publish_abandoned;
    a.connect_failures += b.connect_failures;
    for (x, y) in a.publish_refused.iter_mut().zip(b.publish_refused) {
        *x += y;
    }
    a.held_bytes += b.held_bytes;
    a.history_bytes += b.history_bytes;
    let (h, g) = (&mut a.history, &b.history);
    let HistoryStats {
        resets,
        repaired,
        missed,
        duplicates,
        reads,
        hold_overflows,
        oversize,
        unconfirmed,
        read_refused,
        conflicts,
        corrupt_dedupe,
        corrupt_meta,
        forged,
        forks,
        fork_lost,
    } = *g;
    h.resets += resets;
    h.repaired += repaired;
    h.missed += missed;
    h.duplicates += duplicates;
    h.reads += reads;
    h.hold_overflows += hold_overflows;
    h.oversize += oversize;
    h.unconfirmed += unconfirmed;
    h.read_refused += read_refused;
    h.conflicts += conflicts;
    h.corrupt_dedupe += corrupt_dedupe;
    h.corrupt_meta += corrupt_meta;
    h.forged += forged;
    h.forks += forks;
    h.fork_lost += fork_lost;
}

impl Backplane for ClusterBackplane {
    fn describe(&self) -> String {
        let seeds: Vec<String> = self.seeds.iter().map(Target::display).collect();
        format!("redis cluster (seeds {})", seeds.join(", "))
    }

    fn interest(&mut self, i: Interest) {
        match i {
            Interest::Subscribe(ch) => {
                let at = self.route(&ch);
                if let Some(l) = at.and_then(|i| self.shards[i].as_mut()) {
                    l.interest(Interest::Subscribe(ch.clone()));
                }
                self.wanted.insert(ch.to_string(), at);
            }
            Interest::Unsubscribe(ch) => {
                let at = self.wanted.remove(&*ch).flatten();
                if let Some(l) = at.and_then(|i| self.shards[i].as_mut()) {
                    l.interest(Interest::Unsubscribe(ch));
                }
            }
        }
    }

    fn is_subscribed(&self, channel: &str) -> bool {
        self.wanted
            .get(channel)
            .copied()
            .flatten()
            .and_then(|i| self.shards[i].as_ref())
            .is_some_and(|l| l.is_subscribed(channel))
    }

    fn publish(&mut self, channel: &str, kind: Kind, payload: Bytes) {
        // A channel with local members is routed already (kept current by `apply`).
        let at = self.wanted.get(channel).copied().flatten();
        match at.or_else(|| self.route(channel)) {
            Some(i) => {
                if let Some(l) = self.shards[i].as_mut() {
                    l.publish(channel, kind, payload);
                }
            }
            None => {
                if self.early.len() >= self.base.buffer_messages {
                    self.early.pop_front();
                    self.early_dropped += 1;
                }
                self.early.push_back((channel.to_string(), kind, payload));
            }
        }
    }

    fn is_full(&self, bytes: usize) -> bool {
        self.early.len() >= self.base.buffer_messages || self.links().any(|l| l.is_full(bytes))
    }

    fn history(&mut self, id: u64, channel: &str, since: Option<StreamPosition>, limit: usize) {
        match self.route(channel).and_then(|i| self.shards[i].as_mut()) {
            Some(l) => l.history(id, channel, since, limit),
            None => self.events.push(BusEvent::History {
                id,
                channel: channel.to_string(),
                answer: Recovery::Failed,
            }),
        }
    }

    fn history_window(
        &mut self,
        id: u64,
        channel: &str,
        after: StreamPosition,
        limit: usize,
        skip_trimmed: bool,
    ) {
        match self.route(channel).and_then(|i| self.shards[i].as_mut()) {
            Some(l) => l.history_window(id, channel, after, limit, skip_trimmed),
            None => self.events.push(BusEvent::History {
                id,
                channel: channel.to_string(),
                answer: Recovery::Failed,
            }),
        }
    }

    fn intake_room(&self) -> Option<usize> {
        self.links().filter_map(|l| l.intake_room()).min()
    }

    fn backlogged(&self) -> bool {
        self.links().any(|l| l.backlogged())
    }

    fn drain(&mut self, out: &mut Vec<BusEvent>) {
        out.append(&mut self.events);
        for l in self.links_mut() {
            l.drain(out);
        }
    }

    fn ready(&self, now: Instant) -> Result<(), &'static str> {
        if self.topology.is_none() {
            return Err("redis cluster topology not known yet");
        }
        if self.wanted.values().any(Option::is_none) {
            return Err("redis cluster: a wanted channel's slot has no primary");
        }
        for l in self.links() {
            if l.holds_channels() {
                l.ready(now)?;
            }
        }
        Ok(())
    }

    fn on_event(&mut self, registry: &Registry, ev: &Event, now: Instant) {
        let i = redis_shard_of(ev.token());
        if let Some(l) = self.shards.get_mut(i).and_then(Option::as_mut) {
            l.on_event(registry, ev, now);
        }
    }

    fn resume_reads(&mut self, registry: &Registry, now: Instant) {
        for l in self.links_mut() {
            l.resume_reads(registry, now);
        }
    }

    fn has_more_to_read(&self) -> bool {
        self.links().any(|l| l.has_more_to_read())
    }

    fn tick(&mut self, registry: &Registry, now: Instant) {
        for l in self.links_mut() {
            l.tick(registry, now);
        }
        let mut trouble = false;
        for l in self.links_mut() {
            trouble |= l.take_trouble();
        }
        // A link holding channels is down: its node may have died and another taken
        // its slots; ask until the topology says so (its own failures come only as
        // often as its backoff allows).
        if trouble
            || self
                .links()
                .any(|l| l.holds_channels() && !l.publish_link_up())
        {
            self.refresh_due = self.refresh_due.min(now + TROUBLE_REFRESH);
        }
        // Answers first.
        let mut answers = Vec::new();
        for l in self.links_mut() {
            if let Some(a) = l.take_topology() {
                answers.push(a);
            }
        }
        for (slots, a) in answers {
            match a {
                Ok(t) => {
                    self.refresh_due = now + REFRESH_EVERY;
                    self.apply(t, registry, now);
                }
                Err(e) if !slots && e.contains("nknown") => {
                    self.use_slots = true;
                    self.refresh_due = now;
                }
                Err(e) => {
                    self.log_error(format!("asking for the topology failed: {e}"));
                    self.refresh_due = now + TROUBLE_REFRESH.max(Duration::from_secs(1));
                }
            }
        }
        if now >= self.refresh_due {
            let slots = self.use_slots;
            if self.links_mut().any(|l| l.ask_topology(slots)) {
                self.refresh_due = now + REFRESH_EVERY;
            }
        }
        // No link can ask, or none has answered with a topology yet (a seed that is
        // not in cluster mode, or down): the next seed, now and then.
        let can_ask = self.links().any(|l| l.publish_link_up());
        if (!can_ask || self.topology.is_none())
            && now.saturating_duration_since(self.seed_since) >= SEED_PATIENCE
        {
            self.open_seed(Some(registry), now);
            if self.topology.is_none() {
                self.log_error(
                    "no seed node answers with a topology yet (retrying the next seed)".into(),
                );
            }
        }
    }

    fn next_deadline(&self) -> Option<Instant> {
        self.links()
            .filter_map(|l| l.next_deadline())
            .chain([self.refresh_due, self.seed_since + SEED_PATIENCE])
            .min()
    }

    fn pending(&self) -> usize {
        self.early.len() + self.links().map(|l| l.pending()).sum::<usize>()
    }

    fn stats(&self, now: Instant) -> BusStats {
        let mut s = BusStats {
            up: self.ready(now).is_ok(),
            dropped: self.early_dropped,
            ..BusStats::default()
        };
        for l in self.links() {
            add(&mut s, &l.stats(now));
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backplane::redis::health::Timing;

    /// Before any topology is known, publishes wait in a queue bounded like a shard's
    /// buffer (`--redis-buffer-messages`): the oldest are dropped and counted, and
    /// `/readyz` says why it is not ready.
    #[test]
    fn publishes_before_a_topology_are_bounded_and_counted() {
        let seed = Target::parse("redis://127.0.0.1:1").expect("url");
        let base = Settings {
            target: seed.clone(),
            prefix: String::new(),
            buffer_messages: 10,
            buffer_bytes: 1000,
            max_payload: 65536,
            history_size: 10,
            history_ttl: Duration::from_secs(60),
            hold_bytes: 1 << 20,
            history_key: None,
            shard: Some(ShardOf {
                tokens: redis_shard(0),
                instance: "i".into(),
                seq: Default::default(),
            }),
            timing: Timing {
                ping_interval: Duration::from_secs(3),
                timeout: Duration::from_secs(5),
                backoff_max: Duration::from_secs(5),
            },
        };
        let mut c = ClusterBackplane::new(vec![seed], base);
        for i in 0..25 {
            c.publish("ch", Kind::Text, Bytes::from(format!("m{i}")));
        }
        let now = Instant::now();
        assert_eq!(c.pending(), 10);
        assert_eq!(c.stats(now).dropped, 15);
        assert!(c.is_full(1));
        assert_eq!(c.ready(now), Err("redis cluster topology not known yet"));
        assert_eq!(
            c.early.front().map(|(_, _, p)| p.clone()),
            Some(Bytes::from("m15")),
            "the oldest went first"
        );
    }
}
