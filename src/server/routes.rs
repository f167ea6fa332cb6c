//! What each HTTP request gets: upgrades, static files, health, metrics, publish API.
//! Every refusal is answered with a status and costs nothing but that connection.

use super::Server;
use crate::conn::{Held, Phase, Reason};
use crate::http::{self, Head, Response};
use crate::hub::{valid_channel_name, ConnId};
use crate::metrics::Rejection;
use crate::protocol::plain::upgrade_channel;
use crate::ws::Kind;
use bytes::Bytes;
use log::debug;
use std::time::Instant;

/// Whether a browser `Origin` may connect: listed, `*`, or (no list) same host as `Host`.
pub fn origin_allowed(origin: Option<&str>, host: Option<&str>, allowed: &[String]) -> bool {
    let Some(origin) = origin else { return true }; // not a browser
    if allowed.is_empty() {
        let origin_host = origin.split_once("://").map(|(_, h)| h).unwrap_or("");
        return host.is_some_and(|h| h.eq_ignore_ascii_case(origin_host));
    }
    allowed
        .iter()
        .any(|a| a == "*" || a.eq_ignore_ascii_case(origin))
}

impl Server {
    /// Parses and answers every complete request in the connection's input.
    pub(super) fn process_http(&mut self, id: ConnId, now: Instant) {
        loop {
            let Some(c) = self.conns.get_mut(id.0) else {
                return;
            };
            if c.out.cost() > self.cfg.max_outbound_bytes {
                // Pipelining requests without reading the answers: same cap as WebSocket.
                debug!(
                    "conn={} peer={} slow consumer: {} response bytes queued",
                    id.0,
                    c.peer,
                    c.out.len()
                );
                return self.drop_conn(id, Reason::SlowConsumer);
            }
            match &c.phase {
                Phase::Http => match http::parse_head(&c.inbuf) {
                    Ok(None) => return,
                    Err(e) => {
                        debug!("conn={} bad request head: {e:?}", id.0);
                        let r = Response::text(e.status(), "");
                        return self.refuse(id, r, Rejection::BadRequest, now);
                    }
                    Ok(Some(head)) => {
                        c.inbuf.drain(..head.len);
                        if c.inbuf.is_empty() {
                            c.inbuf = Vec::new(); // an idle connection keeps no buffer
                        }
                        self.handle_request(id, head, now);
                    }
                },
                Phase::Body { need, .. } => {
                    let need = *need;
                    if c.inbuf.len() < need {
                        return;
                    }
                    let body: Vec<u8> = c.inbuf.drain(..need).collect();
                    let Phase::Body { head, .. } = std::mem::replace(&mut c.phase, Phase::Http)
                    else {
                        return;
                    };
                    self.handle_publish(id, &head, Bytes::from(body), now);
                }
                _ => return,
            }
        }
    }

    fn handle_request(&mut self, id: ConnId, head: Head, now: Instant) {
        let get = matches!(head.method.as_str(), "GET" | "HEAD");
        if (get || head.is_upgrade()) && head.content_length() != Ok(0) {
            // A body (or chunked framing) where none is read: refused and the
            // connection closed, so those bytes are never parsed as the next request
            // (request smuggling behind a proxy that reuses connections).
            let r = Response::text(400, "a request body is not allowed here");
            return self.refuse(id, r, Rejection::BadRequest, now);
        }
        if head.is_upgrade() {
            return self.handle_upgrade(id, head, now);
        }
        let resp = match (head.method.as_str(), head.path.as_str()) {
            (_, "/healthz") if get => Response::text(200, "ok"),
            (_, "/readyz") if get => match self.bus.ready(now) {
                Ok(()) => Response::text(200, "ready"),
                Err(why) => Response::text(503, why),
            },
            (_, "/metrics") if get => {
                let body = self.metrics.render(
                    self.conns.len(),
                    self.hub.channel_count(),
                    &self.bus.stats(now),
                );
                Response::new(200, "text/plain; version=0.0.4; charset=utf-8", body)
            }
            ("POST", p) if p.starts_with("/publish/") => return self.start_publish(id, head, now),
            (_, p) if get && (p == "/ws" || p.starts_with("/ws/")) => {
                Response::text(426, "websocket upgrade required").header("Upgrade", "websocket")
            }
            (_, p) if get => self.files.get(p),
            _ => Response::text(405, "").header("Allow", "GET, HEAD"),
        };
        self.respond(id, &head, resp, now);
    }

    /// Queues `resp`; keeps the connection for the next request or closes it.
    fn respond(&mut self, id: ConnId, head: &Head, resp: Response, now: Instant) {
        let keep = head.keep_alive() && resp.status < 400;
        self.queue(id, resp.encode(keep, head.method == "HEAD"));
        if keep {
            self.set_deadline(id, now + self.cfg.handshake_timeout);
        } else {
            self.begin_close(id, Reason::Http, None, now);
        }
    }

    /// Answers with an error status and closes.
    fn refuse(&mut self, id: ConnId, resp: Response, why: Rejection, now: Instant) {
        self.metrics.reject(why);
        if let Some(c) = self.conns.get(id.0) {
            debug!(
                "conn={} peer={} refused {}: {}",
                id.0,
                c.peer,
                resp.status,
                why.label()
            );
        }
        self.begin_close(id, Reason::Rejected, Some(resp.encode(false, false)), now);
    }

    fn handle_upgrade(&mut self, id: ConnId, head: Head, now: Instant) {
        if head.path == "/connection/websocket" {
            return self.upgrade_protocol(id, head, now);
        }
        let channel = match upgrade_channel(&head.path, &self.cfg.default_channel) {
            Ok(c) => c.to_string(),
            Err(status) => {
                let r = Response::text(status, "invalid channel (1-128 bytes of A-Za-z0-9_.:-)");
                return self.refuse(id, r, Rejection::BadChannel, now);
            }
        };
        if !origin_allowed(
            head.header("origin"),
            head.header("host"),
            &self.cfg.allowed_origins,
        ) {
            let r = Response::text(403, "origin not allowed");
            return self.refuse(id, r, Rejection::Origin, now);
        }
        if let Some(secret) = &self.cfg.jwt_secret {
            let now_unix = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs());
            match crate::jwt::authorize(head.query_param("token"), secret, &channel, now_unix) {
                Ok(()) => {}
                Err(crate::jwt::Denied::Unauthorized(why)) => {
                    return self.refuse(id, Response::text(401, why), Rejection::Unauthorized, now)
                }
                Err(crate::jwt::Denied::Forbidden) => {
                    let r = Response::text(403, "channel not allowed by token");
                    return self.refuse(id, r, Rejection::Forbidden, now);
                }
            }
        }
        let keys = head
            .headers
            .iter()
            .filter(|(n, _)| n == "sec-websocket-key");
        let response = match keys.count() {
            1 => head.upgrade_response(),
            _ => None, // several keys: which one would the 101 answer?
        };
        let Some(response) = response else {
            let r = Response::text(400, "invalid websocket handshake");
            return self.refuse(id, r, Rejection::BadRequest, now);
        };
        if let Some(i) = self.hub.join(id, &channel) {
            self.bus.interest(i);
        }
        let subscribed = self.bus.is_subscribed(&channel);
        let Some(c) = self.conns.get_mut(id.0) else {
            return;
        };
        c.phase = Phase::AwaitSub(Box::new(Held {
            response,
            channel: channel.into(),
        }));
        if subscribed {
            self.open_ws(id, now);
        }
        // Otherwise the 101 waits for Redis to confirm the SUBSCRIBE (or the handshake
        // deadline, which answers 503).
    }

    /// `/connection/websocket`: Centrifugo's protocol. Open at once (channels come
    /// with `subscribe` commands; the token with `connect`).
    fn upgrade_protocol(&mut self, id: ConnId, head: Head, now: Instant) {
        if !origin_allowed(
            head.header("origin"),
            head.header("host"),
            &self.cfg.allowed_origins,
        ) {
            let r = Response::text(403, "origin not allowed");
            return self.refuse(id, r, Rejection::Origin, now);
        }
        let keys = head
            .headers
            .iter()
            .filter(|(n, _)| n == "sec-websocket-key")
            .count();
        let Some(response) = head.upgrade_response().filter(|_| keys == 1) else {
            let r = Response::text(400, "invalid websocket handshake");
            return self.refuse(id, r, Rejection::BadRequest, now);
        };
        let Some(c) = self.conns.get_mut(id.0) else {
            return;
        };
        c.proto = crate::protocol::Proto::Centrifugo;
        c.phase = Phase::AwaitSub(Box::new(Held {
            response,
            channel: "".into(),
        }));
        self.sessions.insert(id.0, Default::default());
        self.open_ws(id, now);
    }

    fn start_publish(&mut self, id: ConnId, head: Head, now: Instant) {
        let Some(key) = self.cfg.api_key.clone() else {
            return self.respond(id, &head, Response::text(404, ""), now);
        };
        let presented = head
            .header("authorization")
            .and_then(|v| v.strip_prefix("Bearer "));
        if !presented
            .is_some_and(|p| crate::jwt::constant_time_eq(p.trim().as_bytes(), key.as_bytes()))
        {
            let r = Response::text(401, "missing or wrong API key")
                .header("WWW-Authenticate", "Bearer");
            return self.refuse(id, r, Rejection::Unauthorized, now);
        }
        let channel = head.path.trim_start_matches("/publish/");
        if !valid_channel_name(channel) {
            let r = Response::text(400, "invalid channel (1-128 bytes of A-Za-z0-9_.:-)");
            return self.refuse(id, r, Rejection::BadChannel, now);
        }
        let need = match head.content_length() {
            Ok(n) if n <= self.cfg.max_message_size => n,
            Ok(_) => {
                return self.refuse(
                    id,
                    Response::text(413, "message too large"),
                    Rejection::BadRequest,
                    now,
                )
            }
            Err(_) => {
                let r = Response::text(400, "Content-Length required (no chunked bodies)");
                return self.refuse(id, r, Rejection::BadRequest, now);
            }
        };
        let Some(c) = self.conns.get_mut(id.0) else {
            return;
        };
        c.phase = Phase::Body {
            head: Box::new(head),
            need,
        };
    }

    fn handle_publish(&mut self, id: ConnId, head: &Head, body: Bytes, now: Instant) {
        let channel = head.path.trim_start_matches("/publish/");
        let text = head
            .header("content-type")
            .is_some_and(|t| t.trim_start().to_ascii_lowercase().starts_with("text/"));
        if text && std::str::from_utf8(&body).is_err() {
            return self.refuse(
                id,
                Response::text(400, "text body is not UTF-8"),
                Rejection::BadRequest,
                now,
            );
        }
        if self.bus.is_full(body.len()) {
            let r = Response::text(503, "redis unavailable and outage buffer full");
            return self.respond(id, head, r, now);
        }
        self.metrics.messages_received += 1;
        let kind = if text { Kind::Text } else { Kind::Binary };
        self.bus.publish(channel, kind, body);
        self.respond(id, head, Response::text(202, "accepted"), now);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn origins() {
        let none: Vec<String> = vec![];
        assert!(origin_allowed(None, Some("x:1"), &none));
        assert!(origin_allowed(Some("http://x:1"), Some("X:1"), &none));
        assert!(!origin_allowed(Some("http://evil"), Some("x:1"), &none));
        assert!(!origin_allowed(Some("http://x:1"), None, &none));
        let list = vec!["https://a.example".to_string()];
        assert!(origin_allowed(Some("https://a.example"), Some("x"), &list));
        assert!(!origin_allowed(Some("https://b.example"), Some("x"), &list));
        assert!(origin_allowed(
            Some("https://b.example"),
            Some("x"),
            &["*".to_string()]
        ));
    }
}
