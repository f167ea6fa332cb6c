//! Picks the backplane the configuration asks for: Redis with `--redis`, in memory
//! without. The only place that names both.

use crate::backplane::memory::{history::MemHistory, LocalBus};
use crate::backplane::redis::topology::cluster::ClusterBackplane;
use crate::backplane::redis::{health::Timing, RedisLink, Settings, ShardOf};
use crate::backplane::Backplane;
use crate::config::Config;

/// The backplane of this process.
pub type Bus = Box<dyn Backplane>;

/// Redis with `--redis`, in memory without.
pub fn from_config(cfg: &Config) -> Bus {
    if let Some(seeds) = &cfg.redis_cluster {
        let mut base = settings(cfg, seeds[0].clone());
        base.shard = Some(ShardOf {
            tokens: crate::token::redis_shard(0),
            instance: crate::backplane::redis::instance_id(),
            seq: Default::default(),
        });
        return Box::new(ClusterBackplane::new(seeds.clone(), base));
    }
    match &cfg.redis {
        Some(target) => Box::new(RedisLink::new(settings(cfg, target.clone()))),
        None => Box::new(LocalBus::new(MemHistory::new(
            cfg.history_size,
            cfg.history_ttl,
            cfg.history_memory_bytes,
        ))),
    }
}

fn settings(cfg: &Config, target: crate::backplane::redis::target::Target) -> Settings {
    {
        Settings {
            target,
            prefix: cfg.channel_prefix.clone(),
            buffer_messages: cfg.redis_buffer_messages,
            buffer_bytes: cfg.redis_buffer_bytes,
            max_payload: cfg.max_message_size,
            history_size: cfg.history_size,
            history_ttl: cfg.history_ttl,
            hold_bytes: cfg.history_hold_bytes,
            history_key: cfg
                .history_key
                .as_deref()
                .and_then(|k| crate::envelope::HistoryKey::new(k.as_bytes())),
            shard: None,
            timing: Timing {
                ping_interval: cfg.redis_ping_interval,
                timeout: cfg.redis_timeout,
                backoff_max: cfg.redis_backoff_max,
            },
        }
    }
}
