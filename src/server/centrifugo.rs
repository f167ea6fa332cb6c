//! The loop's side of Centrifugo's client protocol (`/connection/websocket`): a session
//! per connection (connected, token, subscriptions being set up), commands handled,
//! history asks routed, live pushes held while a subscription is set up and merged
//! after it by offset. The codec is `protocol::centrifugo`; the backplane is reached
//! through the `Backplane` trait only.
//!
//! Subscribing in the safe order: join the channel (so live messages start arriving),
//! wait until the backplane has it subscribed, ask history from the client's position
//! (or just the top), hold live pushes meanwhile, reply with what history returned,
//! then deliver the held pushes past the last position the reply covered. A position
//! history no longer covers, or another epoch, gives `recovered: false` — never a
//! silent gap.

use super::{ConnId, Server};
use crate::backplane::{Publication, Recovery};
use crate::conn::Reason;
use crate::hub::valid_channel_name;
use crate::message::StreamPosition;
use crate::protocol::centrifugo::{self as proto, Command, ErrorCode, Line};
use crate::ws::{self, Kind};
use bytes::Bytes;
use std::collections::HashMap;
use std::time::Instant;

/// A subscription being set up: live pushes are held until history has answered.
#[derive(Debug)]
pub(super) struct SetUp {
    cmd_id: u32,
    recover: Option<StreamPosition>,
    recover_asked: bool,
    /// The history ask in flight (`None`: waiting for the backplane's subscription).
    ask: Option<u64>,
    /// Pushes that arrived meanwhile: offset (if any) and the encoded frame.
    held: Vec<(Option<u64>, Bytes)>,
    held_bytes: usize,
}

/// One Centrifugo client.
#[derive(Debug, Default)]
pub(super) struct Session {
    connected: bool,
    token: Option<String>,
    /// When the connect token expires (Unix seconds): the connection is closed then
    /// (3005, the SDK reconnects with a fresh token). Checked by the keepalive sweep.
    pub(super) expires: Option<u64>,
    setting_up: HashMap<Box<str>, SetUp>,
    /// Per channel just set up: the last offset its reply covered. The history read
    /// may have run ahead of this instance's live delivery, so live pushes up to it
    /// still arrive: they are dropped (cleared by the first push past it).
    covered: HashMap<Box<str>, u64>,
    /// History reads asked for this client's `history` commands and not yet answered
    /// (at most `MAX_HISTORY_ASKS`: while Redis is slow or away, asks would pile up).
    history_asks: u8,
}

/// `history` commands one client may have waiting for the backplane (error 106 beyond).
const MAX_HISTORY_ASKS: u8 = 8;

/// What a history ask is for.
#[derive(Debug)]
pub(super) enum Ask {
    Subscribe {
        conn: ConnId,
        serial: u64,
    },
    History {
        conn: ConnId,
        serial: u64,
        cmd_id: u32,
        stage: Stage,
    },
}

/// Where a `history` command is.
#[derive(Debug)]
pub(super) enum Stage {
    /// This answer is the reply: oldest first, or (`reverse`) newest first; only
    /// offsets below `before` (reverse from a position); at most `limit`.
    Final {
        reverse: bool,
        before: Option<u64>,
        limit: usize,
    },
    /// The channel's top first, then the window it places.
    Top {
        since: Option<StreamPosition>,
        reverse: bool,
        limit: usize,
    },
}

fn text_frame(s: String) -> Bytes {
    ws::data_frame(Kind::Text, Bytes::from(s))
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

impl Server {
    /// A text (or binary) message from a Centrifugo client: its commands, in order.
    pub(super) fn on_protocol_frame(&mut self, id: ConnId, payload: Bytes, now: Instant) {
        let lines = match proto::parse(&payload) {
            Ok(l) => l,
            Err(why) => return self.protocol_close(id, proto::CLOSE_BAD_REQUEST, why, now),
        };
        for (i, line) in lines.into_iter().enumerate() {
            if !self.conns.get(id.0).is_some_and(|c| c.is_open()) {
                return;
            }
            // Each command costs a token like a message (the frame paid for the first):
            // many commands in one frame are no way around the rate limit.
            if i > 0 && !matches!(line, Line::Pong) && !self.charge(id, now) {
                return;
            }
            match line {
                Line::Pong => {}
                Line::Refused(cmd_id, code) => self.reply(id, proto::error_reply(cmd_id, code)),
                Line::Request(r) => self.on_command(id, r.id, r.cmd, now),
            }
        }
    }

    fn reply(&mut self, id: ConnId, s: String) {
        self.queue(id, text_frame(s));
    }

    fn protocol_close(&mut self, id: ConnId, code: u16, why: &str, now: Instant) {
        self.reply(id, proto::disconnect_push(code, why));
        let reason = if code == proto::CLOSE_EXPIRED {
            Reason::Rejected
        } else {
            Reason::ProtocolError
        };
        self.begin_close(id, reason, Some(ws::close_frame(code, why)), now);
    }

    fn on_command(&mut self, id: ConnId, cmd_id: u32, cmd: Command, now: Instant) {
        let connected = self.sessions.get(&id.0).is_some_and(|s| s.connected);
        match cmd {
            Command::Connect { token } => {
                if connected {
                    return self.protocol_close(id, proto::CLOSE_BAD_REQUEST, "connect twice", now);
                }
                let mut expires = None;
                if let Some(secret) = &self.cfg.jwt_secret {
                    match crate::jwt::authenticate(token.as_deref(), secret, unix_now()) {
                        Ok(exp) => expires = exp,
                        Err(crate::jwt::Denied::Unauthorized("token expired")) => {
                            return self
                                .reply(id, proto::error_reply(cmd_id, ErrorCode::TokenExpired))
                        }
                        Err(_) => {
                            return self
                                .reply(id, proto::error_reply(cmd_id, ErrorCode::Unauthorized))
                        }
                    }
                }
                let s = self.sessions.entry(id.0).or_default();
                s.connected = true;
                s.token = token;
                s.expires = expires;
                let client = format!("{:016x}", self.next_serial ^ (id.0 as u64) << 40);
                let ping = self.cfg.ping_interval.as_secs().max(1);
                self.reply(id, proto::connect_reply(cmd_id, &client, ping));
            }
            _ if !connected => {
                self.protocol_close(id, proto::CLOSE_BAD_REQUEST, "command before connect", now)
            }
            Command::Subscribe {
                channel,
                recover,
                recover_asked,
            } => self.subscribe(id, cmd_id, channel, recover, recover_asked, now),
            Command::Unsubscribe { channel } => {
                if let Some(s) = self.sessions.get_mut(&id.0) {
                    s.done_setting_up(&channel);
                    s.covered.remove(channel.as_str());
                }
                if let Some(i) = self.hub.leave(id, &channel) {
                    self.bus.interest(i);
                }
                self.reply(id, proto::empty_reply(cmd_id, "unsubscribe"));
            }
            Command::Publish { channel, data } => {
                if let Err(code) = self.allowed(id, &channel) {
                    return self.reply(id, proto::error_reply(cmd_id, code));
                }
                if data.len() > self.cfg.max_message_size {
                    return self.reply(id, proto::error_reply(cmd_id, ErrorCode::LimitExceeded));
                }
                self.metrics.messages_received += 1;
                self.bus.publish(&channel, Kind::Text, data);
                self.reply(id, proto::empty_reply(cmd_id, "publish"));
            }
            Command::History {
                channel,
                limit,
                since,
                reverse,
            } => {
                if let Err(code) = self.allowed(id, &channel) {
                    return self.reply(id, proto::error_reply(cmd_id, code));
                }
                let waiting = self.sessions.get(&id.0).map_or(0, |s| s.history_asks);
                if waiting >= MAX_HISTORY_ASKS {
                    return self.reply(id, proto::error_reply(cmd_id, ErrorCode::LimitExceeded));
                }
                if limit < 0 || limit as usize > self.cfg.history_size.max(1) {
                    return self.reply(id, proto::error_reply(cmd_id, ErrorCode::BadRequest));
                }
                let limit = limit as usize;
                let stage = match (&since, reverse, limit) {
                    // The top only.
                    (_, _, 0) => Stage::Final {
                        reverse: false,
                        before: None,
                        limit: 0,
                    },
                    // What followed a position (a trimmed position is 112).
                    (Some(p), false, _) => {
                        let stage = Stage::Final {
                            reverse: false,
                            before: None,
                            limit,
                        };
                        let p = p.clone();
                        return self.history_window(id, cmd_id, &channel, p, stage, limit, false);
                    }
                    // From the stream's start, the newest, or before a position: the
                    // top first places the window.
                    _ => Stage::Top {
                        since: since.clone(),
                        reverse,
                        limit,
                    },
                };
                let since = match stage {
                    Stage::Final { limit: l, .. } if l > 0 => since,
                    _ => None,
                };
                self.ask_history_stage(id, cmd_id, &channel, stage, since, limit);
            }
        }
    }

    fn ask_history_stage(
        &mut self,
        id: ConnId,
        cmd_id: u32,
        channel: &str,
        stage: Stage,
        since: Option<StreamPosition>,
        limit: usize,
    ) {
        let ask = self.history_ask(id, cmd_id, stage);
        self.bus.history(ask, channel, since, limit);
    }

    /// The window of a `history` command (after a position, or once the top placed it).
    #[allow(clippy::too_many_arguments)]
    fn history_window(
        &mut self,
        id: ConnId,
        cmd_id: u32,
        channel: &str,
        after: StreamPosition,
        stage: Stage,
        limit: usize,
        skip_trimmed: bool,
    ) {
        let ask = self.history_ask(id, cmd_id, stage);
        // A reverse window may hold up to `limit` more below the first wanted offset.
        self.bus
            .history_window(ask, channel, after, limit * 2 + 1, skip_trimmed);
    }

    /// Registers a `history` command's ask (answered in `on_history`).
    fn history_ask(&mut self, id: ConnId, cmd_id: u32, stage: Stage) -> u64 {
        if let Some(s) = self.sessions.get_mut(&id.0) {
            s.history_asks += 1;
        }
        let serial = self.conns.get(id.0).map_or(0, |c| c.serial);
        let ask = self.next_ask();
        let conn = id;
        self.asks.insert(
            ask,
            Ask::History {
                conn,
                serial,
                cmd_id,
                stage,
            },
        );
        ask
    }

    fn next_ask(&mut self) -> u64 {
        self.next_ask_id += 1;
        self.next_ask_id
    }

    /// Whether this client may use `channel`: a valid name, and one its token's
    /// `channels` claim covers (if the server checks tokens).
    fn allowed(&self, id: ConnId, channel: &str) -> Result<(), ErrorCode> {
        if !valid_channel_name(channel) {
            return Err(ErrorCode::UnknownChannel);
        }
        let Some(secret) = &self.cfg.jwt_secret else {
            return Ok(());
        };
        let token = self.sessions.get(&id.0).and_then(|s| s.token.as_deref());
        match crate::jwt::authorize(token, secret, channel, unix_now()) {
            Ok(()) => Ok(()),
            Err(crate::jwt::Denied::Forbidden) => Err(ErrorCode::PermissionDenied),
            Err(_) => Err(ErrorCode::TokenExpired),
        }
    }

    fn subscribe(
        &mut self,
        id: ConnId,
        cmd_id: u32,
        channel: String,
        recover: Option<StreamPosition>,
        recover_asked: bool,
        _now: Instant,
    ) {
        if let Err(code) = self.allowed(id, &channel) {
            return self.reply(id, proto::error_reply(cmd_id, code));
        }
        let already = self.hub.channels_of(id).any(|c| c == channel);
        if already {
            return self.reply(id, proto::error_reply(cmd_id, ErrorCode::AlreadySubscribed));
        }
        if self.hub.channels_of(id).count() >= self.cfg.max_channels_per_connection {
            return self.reply(id, proto::error_reply(cmd_id, ErrorCode::LimitExceeded));
        }
        if let Some(i) = self.hub.join(id, &channel) {
            self.bus.interest(i);
        }
        let Some(s) = self.sessions.get_mut(&id.0) else {
            return;
        };
        s.setting_up.insert(
            channel.as_str().into(),
            SetUp {
                cmd_id,
                recover,
                recover_asked,
                ask: None,
                held: Vec::new(),
                held_bytes: 0,
            },
        );
        if self.bus.is_subscribed(&channel) {
            self.ask_history(id, &channel);
        }
        // Otherwise asked when the backplane confirms the channel (`on_subscribed`).
    }

    /// Asks history for a subscription being set up on `channel`.
    fn ask_history(&mut self, id: ConnId, channel: &str) {
        let serial = self.conns.get(id.0).map_or(0, |c| c.serial);
        let ask = self.next_ask();
        let Some(set) = self
            .sessions
            .get_mut(&id.0)
            .and_then(|s| s.setting_up.get_mut(channel))
        else {
            return;
        };
        if set.ask.is_some() {
            return;
        }
        set.ask = Some(ask);
        let since = set.recover.clone();
        self.asks.insert(ask, Ask::Subscribe { conn: id, serial });
        let limit = if since.is_some() {
            self.cfg.history_size
        } else {
            0
        };
        self.bus.history(ask, channel, since, limit);
    }

    /// The backplane subscribed `channel`: subscriptions waiting for it ask history.
    pub(super) fn on_subscribed_protocol(&mut self, channel: &str) {
        let waiting: Vec<ConnId> = self
            .hub
            .members(channel)
            .iter()
            .copied()
            .filter(|m| {
                self.sessions
                    .get(&m.0)
                    .and_then(|s| s.setting_up.get(channel))
                    .is_some_and(|set| set.ask.is_none())
            })
            .collect();
        for id in waiting {
            self.ask_history(id, channel);
        }
    }

    /// Closes protocol connections whose connect token has expired (3005, "expired":
    /// the SDK reconnects, with a fresh token if it has a way to get one).
    pub(super) fn close_expired(&mut self, now: Instant) {
        let unix = unix_now();
        let expired: Vec<usize> = self
            .sessions
            .iter()
            .filter(|(_, s)| s.expires.is_some_and(|e| unix >= e))
            .map(|(k, _)| *k)
            .collect();
        for k in expired {
            self.protocol_close(ConnId(k), proto::CLOSE_EXPIRED, "expired", now);
        }
    }

    /// The backplane's delivery on `channel` has a hole: its Centrifugo subscribers are
    /// unsubscribed with code 2500 (insufficient state), so the SDK subscribes again,
    /// recovers what history still holds and is told `recovered: false` if not all.
    pub(super) fn on_gap(&mut self, channel: &str) {
        let members: Vec<ConnId> = self
            .hub
            .members(channel)
            .iter()
            .copied()
            .filter(|m| {
                self.sessions
                    .get(&m.0)
                    .is_some_and(|s| !s.setting_up.contains_key(channel))
            })
            .collect();
        if members.is_empty() {
            return;
        }
        let push = text_frame(proto::unsubscribe_push(channel, 2500, "insufficient state"));
        for id in members {
            if let Some(i) = self.hub.leave(id, channel) {
                self.bus.interest(i);
            }
            self.queue(id, push.clone());
        }
    }

    /// A history answer from the backplane.
    pub(super) fn on_history(&mut self, ask: u64, channel: &str, answer: Recovery) {
        match self.asks.remove(&ask) {
            Some(Ask::Subscribe { conn, serial })
                if self.conns.get(conn.0).is_some_and(|c| c.serial == serial) =>
            {
                self.finish_subscribe(conn, channel, ask, answer);
            }
            Some(Ask::History {
                conn,
                serial,
                cmd_id,
                stage,
            }) => {
                if self.conns.get(conn.0).is_none_or(|c| c.serial != serial) {
                    return;
                }
                if let Some(s) = self.sessions.get_mut(&conn.0) {
                    s.history_asks = s.history_asks.saturating_sub(1);
                }
                match (stage, answer) {
                    (_, Recovery::Failed) => {
                        self.reply(conn, proto::error_reply(cmd_id, ErrorCode::NotAvailable))
                    }
                    (_, Recovery::Lost { .. }) => {
                        self.reply(conn, proto::error_reply(cmd_id, ErrorCode::Unrecoverable))
                    }
                    (
                        Stage::Top {
                            since,
                            reverse,
                            limit,
                        },
                        Recovery::Complete { top, .. },
                    ) => {
                        let Some(top) = top else {
                            // No history at all: nothing to list.
                            return self.reply(conn, proto::history_reply(cmd_id, &[], None));
                        };
                        let (after, before) = match (&since, reverse) {
                            (Some(s), true) if s.epoch != top.epoch => {
                                let e = proto::error_reply(cmd_id, ErrorCode::Unrecoverable);
                                return self.reply(conn, e);
                            }
                            (Some(s), true) => {
                                (s.offset.saturating_sub(limit as u64 + 1), Some(s.offset))
                            }
                            (_, true) => (top.offset.saturating_sub(limit as u64), None),
                            (_, false) => (0, None),
                        };
                        let stage = Stage::Final {
                            reverse,
                            before,
                            limit,
                        };
                        let after = StreamPosition::new(top.epoch.clone(), after);
                        self.history_window(conn, cmd_id, channel, after, stage, limit, true);
                    }
                    (
                        Stage::Final {
                            reverse,
                            before,
                            limit,
                        },
                        Recovery::Complete { publications, top },
                    ) => {
                        let mut pubs: Vec<Publication> = publications
                            .iter()
                            .filter(|p| before.is_none_or(|b| p.pos.offset < b))
                            .cloned()
                            .collect();
                        if reverse {
                            let skip = pubs.len().saturating_sub(limit);
                            pubs.drain(..skip);
                            pubs.reverse();
                        } else {
                            pubs.truncate(limit);
                        }
                        self.reply(conn, proto::history_reply(cmd_id, &pubs, top.as_ref()));
                    }
                }
            }
            Some(Ask::Subscribe { .. }) | None => {}
        }
    }

    fn finish_subscribe(&mut self, id: ConnId, channel: &str, ask: u64, answer: Recovery) {
        let Some(set) = self
            .sessions
            .get_mut(&id.0)
            .and_then(|s| s.setting_up.get(channel))
        else {
            return;
        };
        if set.ask != Some(ask) {
            return;
        }
        let Some(set) = self
            .sessions
            .get_mut(&id.0)
            .and_then(|s| s.done_setting_up(channel))
        else {
            return;
        };
        let empty: std::sync::Arc<[Publication]> = Vec::new().into();
        // (reply, the last offset it covers)
        let (reply, covered) = match (&answer, &set.recover) {
            (Recovery::Failed, _) => {
                if let Some(i) = self.hub.leave(id, channel) {
                    self.bus.interest(i);
                }
                return self.reply(id, proto::error_reply(set.cmd_id, ErrorCode::NotAvailable));
            }
            (Recovery::Complete { publications, .. }, Some(from)) => {
                let last = publications.last().map_or(from.offset, |p| p.pos.offset);
                // Askers of one read get the same publications: encoded once.
                let pubs = match &self.encoded_recovery {
                    Some((p, s)) if std::sync::Arc::ptr_eq(p, publications) => s.clone(),
                    _ => {
                        let s: std::rc::Rc<str> = proto::publications_json(publications).into();
                        self.encoded_recovery = Some((publications.clone(), s.clone()));
                        s
                    }
                };
                let r = proto::subscribe_reply_with(set.cmd_id, Some(from), &pubs, true, true);
                (r, last)
            }
            (Recovery::Complete { top, .. } | Recovery::Lost { top }, _) => {
                let r = proto::subscribe_reply(
                    set.cmd_id,
                    top.as_ref(),
                    &empty,
                    set.recover_asked,
                    false,
                );
                (r, top.as_ref().map_or(0, |t| t.offset))
            }
        };
        self.reply(id, reply);
        if let Some(s) = self.sessions.get_mut(&id.0) {
            s.covered.insert(channel.into(), covered);
        }
        for (offset, frame) in set.held {
            if offset.is_none_or(|o| o > covered) {
                self.queue(id, frame);
                self.metrics.messages_delivered += 1;
            }
        }
    }
}

/// What `Session::hold` did with a push.
pub(super) enum Hold {
    /// Not setting up that channel: deliver it.
    No,
    Held,
    /// Already in the subscribe reply (the read ran ahead of live delivery): dropped.
    Covered,
    /// Held pushes went over the output cap: the connection is a slow consumer.
    Over,
}

impl Session {
    /// Ends the set-up of `channel`; an idle session keeps no table (the map would keep
    /// its allocation: ~450 bytes per client).
    fn done_setting_up(&mut self, channel: &str) -> Option<SetUp> {
        let set = self.setting_up.remove(channel);
        if self.setting_up.is_empty() {
            self.setting_up = HashMap::new();
        }
        set
    }

    /// Holds a push for `channel` while its subscription is set up; drops one its
    /// subscribe reply already carried.
    pub(super) fn hold(
        &mut self,
        channel: &str,
        offset: Option<u64>,
        frame: &Bytes,
        max: usize,
    ) -> Hold {
        let Some(set) = self.setting_up.get_mut(channel) else {
            if let (Some(w), Some(o)) = (self.covered.get(channel), offset) {
                if o <= *w {
                    return Hold::Covered;
                }
                self.covered.remove(channel);
                if self.covered.is_empty() {
                    self.covered = HashMap::new();
                }
            }
            return Hold::No;
        };
        set.held_bytes += frame.len();
        if set.held_bytes > max {
            return Hold::Over;
        }
        set.held.push((offset, frame.clone()));
        Hold::Held
    }
}
