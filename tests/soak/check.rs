//! What the soak checks once it has stopped: order, duplicates, completeness against
//! the witnesses, and one order per channel.

use super::actors::{Fault, MsgId, Record, Role, Sent, Window, CHANNELS, PRE_MARGIN};
use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

/// What the delivery checks counted.
pub struct Counts {
    pub delivered: usize,
    pub compared: usize,
    /// Per window: messages a witness missed inside it (allowed).
    pub exempt_missing: Vec<usize>,
}

pub fn deliveries(
    records: &[Record],
    sent: &HashMap<MsgId, Sent>,
    windows: &[Window],
    publishing_ended: Instant,
    started: Instant,
    violations: &mut Vec<String>,
) -> Counts {
    let restarts: Vec<&Window> = windows
        .iter()
        .filter(|w| matches!(w.fault, Fault::RedisRestartEmpty))
        .collect();
    let mut delivered = 0usize;
    let mut exempt_missing = vec![0usize; windows.len()];
    // Order and duplicates, for everyone.
    for r in records {
        let mut last: HashMap<u32, u64> = HashMap::new();
        for &(id @ (p, seq), at) in &r.got {
            if let Some(&prev) = last.get(&p) {
                if seq <= prev {
                    let near_restart = restarts.iter().any(|w| {
                        at + PRE_MARGIN >= w.start && at <= w.end + Duration::from_secs(2)
                    });
                    if !(seq == prev && near_restart) {
                        violations.push(format!(
                            "{:?} on instance {} channel {}: P{p}:{seq} after P{p}:{prev}",
                            r.role, r.instance, r.channel
                        ));
                    }
                }
            }
            last.insert(p, seq);
            let _ = id;
        }
        delivered += r.got.len();
    }
    // Witnesses: everything outside fault windows, exactly once.
    let mut witness_got: HashMap<(usize, u64, usize), &Record> = HashMap::new();
    for r in records.iter().filter(|r| r.role == Role::Witness) {
        witness_got.insert((r.instance, r.generation, r.channel), r);
        let have: HashSet<MsgId> = r.got.iter().map(|g| g.0).collect();
        let end_of_watch = if r.cut {
            // Its instance went away: what was sent before its last message.
            r.got.last().map_or(r.joined, |g| g.1) - Duration::from_secs(1)
        } else {
            publishing_ended
        };
        for (id, s) in sent {
            if s.channel != r.channel || s.at < r.joined || s.at > end_of_watch {
                continue;
            }
            if have.contains(id) {
                continue;
            }
            if let Some(k) = windows
                .iter()
                .position(|w| w.covers(s.at, [s.instance, r.instance]))
            {
                exempt_missing[k] += 1;
            } else {
                violations.push(format!(
                    "witness on instance {} channel {} never got P{}:{} (sent {:.2} s in via instance {})",
                    r.instance,
                    r.channel,
                    id.0,
                    id.1,
                    s.at.duration_since(started).as_secs_f64(),
                    s.instance
                ));
            }
        }
    }
    // Everyone else: what their instance's witness got while they were joined.
    let mut compared = 0usize;
    for r in records
        .iter()
        .filter(|r| r.role != Role::Witness && r.channel < CHANNELS)
    {
        let Some(wit) = witness_got.get(&(r.instance, r.generation, r.channel)) else {
            continue;
        };
        let until = r.leaving.unwrap_or(r.joined);
        let must: Vec<MsgId> = wit
            .got
            .iter()
            .filter(|(id, at)| sent[id].at >= r.joined.max(wit.joined) && *at < until)
            .map(|g| g.0)
            .collect();
        let got: Vec<MsgId> = r.got.iter().map(|g| g.0).collect();
        let got_set: HashSet<MsgId> = got.iter().copied().collect();
        let check_complete = !r.cut && !matches!(r.role, Role::Churn { with_close: false });
        if check_complete {
            if let Some(m) = must.iter().find(|id| !got_set.contains(id)) {
                violations.push(format!(
                    "{:?} on instance {} channel {} missed P{}:{} that its witness got",
                    r.role, r.instance, r.channel, m.0, m.1
                ));
            }
        }
        // One order per channel: the common messages in the witness's order.
        let wit_pos: HashMap<MsgId, usize> =
            wit.got.iter().enumerate().map(|(i, g)| (g.0, i)).collect();
        let positions: Vec<usize> = got
            .iter()
            .filter_map(|id| wit_pos.get(id).copied())
            .collect();
        if positions.windows(2).any(|p| p[0] > p[1]) {
            violations.push(format!(
                "{:?} on instance {} channel {}: another order than the witness",
                r.role, r.instance, r.channel
            ));
        }
        compared += 1;
    }
    Counts {
        delivered,
        compared,
        exempt_missing,
    }
}
