//! Table tests of gap repair (`positions`): every rule, driven without sockets.

use super::*;

fn pos(epoch: &'static str, offset: u64) -> Option<Position> {
    Some(Position {
        offset,
        epoch: Bytes::from_static(epoch.as_bytes()),
    })
}

fn body(n: u64) -> Bytes {
    Bytes::from(format!("m{n}"))
}

fn got(out: &mut Vec<BusEvent>) -> Vec<String> {
    out.drain(..)
        .map(|e| match e {
            BusEvent::Deliver { payload, .. } => String::from_utf8(payload.to_vec()).expect("utf8"),
            other => panic!("{other:?}"),
        })
        .collect()
}

fn range(epoch: &'static str, top: u64, offs: std::ops::RangeInclusive<u64>) -> Range {
    Range {
        epoch: Some(Bytes::from_static(epoch.as_bytes())),
        top,
        entries: offs.map(|o| (o, body(o))).collect(),
    }
}

#[test]
fn a_quiet_channel_gets_its_position_from_a_read_and_repairs_a_gap() {
    let mut p = Positions::new(1 << 20, 1 << 16);
    let mut out = Vec::new();
    p.on_confirmed("c");
    let req = p.next_read().expect("position read");
    assert_eq!((req.from, req.epoch.len()), (0, 0));
    // Published after the SUBSCRIBE but before the read ran: arrives after the reply.
    p.on_range(
        &req,
        Range {
            epoch: Some(Bytes::from_static(b"E")),
            top: 7,
            entries: vec![],
        },
        &mut out,
    );
    assert!(out.is_empty(), "nothing old is delivered");
    assert_eq!(p.last("c"), Some((Bytes::from_static(b"E"), 7)));
    for o in [6, 7, 7, 8] {
        p.on_message("c", pos("E", o), body(o), &mut out);
    }
    assert_eq!(
        got(&mut out),
        ["m6", "m7", "m8"],
        "live ones up to the top, once"
    );
    // The link drops; 9 and 10 are published meanwhile; the catch-up reads them.
    p.on_confirmed("c");
    let req = p.next_read().expect("catch-up");
    assert_eq!(req.from, 9);
    p.on_range(&req, range("E", 10, 9..=10), &mut out);
    assert_eq!(got(&mut out), ["m9", "m10"]);
    // A live message before the position reply starts the position itself.
    p.forget("c");
    p.on_confirmed("c");
    let req = p.next_read().expect("position read");
    p.on_message("c", pos("E", 11), body(11), &mut out);
    p.on_range(
        &req,
        Range {
            epoch: Some(Bytes::from_static(b"E")),
            top: 11,
            entries: vec![],
        },
        &mut out,
    );
    p.on_message("c", pos("E", 12), body(12), &mut out);
    assert_eq!(got(&mut out), ["m11", "m12"]);
    // No history at all: the channel's first epoch is delivered from offset 1, even
    // what was published while the link was down.
    p.forget("c");
    p.on_confirmed("c");
    let req = p.next_read().expect("position read");
    p.on_range(&req, Range::default(), &mut out);
    p.on_confirmed("c");
    let req = p.next_read().expect("catch-up");
    p.on_range(&req, range("F", 2, 1..=2), &mut out);
    p.on_message("c", pos("F", 3), body(3), &mut out);
    assert_eq!(got(&mut out), ["m1", "m2", "m3"]);
    p.forget("c");
    p.on_confirmed("c");
    let req = p.next_read().expect("position read");
    p.on_range(&req, Range::default(), &mut out);
    p.on_message("c", pos("G", 2), body(2), &mut out);
    let req = p.next_read().expect("gap from 1");
    assert_eq!(req.from, 1);
    p.on_range(&req, range("G", 2, 1..=2), &mut out);
    assert_eq!(got(&mut out), ["m1", "m2"]);
    assert_eq!(p.stats.resets, 0, "a first epoch is no reset");
}

#[test]
fn in_order_messages_flow_and_duplicates_are_dropped() {
    let mut p = Positions::new(1 << 20, 1 << 16);
    let mut out = Vec::new();
    for o in [5, 6, 6, 7, 5] {
        p.on_message("c", pos("E", o), body(o), &mut out);
    }
    assert_eq!(
        got(&mut out),
        ["m5", "m6", "m7"],
        "starts at the first seen"
    );
    assert_eq!(p.stats.duplicates, 2);
    assert!(p.next_read().is_none());
    p.on_message("c", None, Bytes::from_static(b"plain"), &mut out);
    assert_eq!(got(&mut out), ["plain"], "no position: delivered as is");
}

#[test]
fn a_gap_is_read_and_everything_delivered_in_order() {
    let mut p = Positions::new(1 << 20, 1 << 16);
    let mut out = Vec::new();
    p.on_message("c", pos("E", 1), body(1), &mut out);
    p.on_message("c", pos("E", 4), body(4), &mut out);
    p.on_message("c", pos("E", 5), body(5), &mut out);
    assert_eq!(got(&mut out), ["m1"], "4 and 5 held");
    let req = p.next_read().expect("a read");
    assert_eq!((req.from, &req.epoch[..]), (2, &b"E"[..]));
    assert!(p.next_read().is_none(), "one read per channel");
    p.on_message("c", pos("E", 6), body(6), &mut out);
    assert!(out.is_empty());
    p.on_range(&req, range("E", 6, 2..=6), &mut out);
    assert_eq!(got(&mut out), ["m2", "m3", "m4", "m5", "m6"]);
    assert_eq!(p.stats.repaired, 2, "2 and 3; 4-6 had arrived live");
    assert_eq!(p.held_bytes(), 0);
    p.on_message("c", pos("E", 7), body(7), &mut out);
    assert_eq!(got(&mut out), ["m7"]);
}

#[test]
fn a_reconfirmed_channel_reads_to_the_top_in_parts() {
    let mut p = Positions::new(1 << 20, 1 << 16);
    let mut out = Vec::new();
    p.on_message("c", pos("E", 10), body(10), &mut out);
    got(&mut out);
    p.on_confirmed("c");
    let req = p.next_read().expect("catch-up read");
    assert_eq!(req.from, 11);
    // The next one arrives live before the reply: delivered at once.
    p.on_message("c", pos("E", 11), body(11), &mut out);
    p.on_range(&req, range("E", 20, 11..=14), &mut out);
    assert_eq!(got(&mut out), ["m11", "m12", "m13", "m14"]);
    let req = p.next_read().expect("cut short: read on");
    assert_eq!(req.from, 15);
    p.on_range(&req, range("E", 20, 15..=20), &mut out);
    assert_eq!(got(&mut out).len(), 6);
    assert!(p.next_read().is_none());
    assert_eq!(p.stats.duplicates, 0, "11 from history is skipped quietly");
}

#[test]
fn a_new_epoch_is_a_reset_delivered_from_its_first_offset() {
    let mut p = Positions::new(1 << 20, 1 << 16);
    let mut out = Vec::new();
    p.on_message("c", pos("OLD", 50), body(50), &mut out);
    got(&mut out);
    // Live: the new epoch's third message; the first two came from another
    // instance's outage buffer before this one re-subscribed.
    p.on_message("c", pos("NEW", 3), body(3), &mut out);
    assert!(out.is_empty());
    assert_eq!(p.stats.resets, 1);
    assert_eq!(p.resets[0].new, Bytes::from_static(b"NEW"));
    let req = p.next_read().expect("read the new epoch");
    assert_eq!(req.from, 1);
    p.on_range(&req, range("NEW", 3, 1..=3), &mut out);
    assert_eq!(got(&mut out), ["m1", "m2", "m3"]);
    // A catch-up read that finds another epoch resets too.
    p.on_confirmed("c");
    let req = p.next_read().expect("read");
    p.on_range(&req, range("THIRD", 2, 1..=2), &mut out);
    assert_eq!(got(&mut out), ["m1", "m2"]);
    assert_eq!(p.stats.resets, 2);
}

#[test]
fn what_history_lost_is_skipped_and_counted() {
    let mut p = Positions::new(1 << 20, 1 << 16);
    let mut out = Vec::new();
    p.on_message("c", pos("E", 1), body(1), &mut out);
    p.on_message("c", pos("E", 100), body(100), &mut out);
    let req = p.next_read().expect("read");
    // Trimmed: history starts at 90.
    p.on_range(&req, range("E", 100, 90..=100), &mut out);
    assert_eq!(got(&mut out).len(), 12);
    assert_eq!(p.stats.missed, 88);
    // No history at all: the held message is delivered, the gap counted.
    p.on_message("c", pos("E", 105), body(105), &mut out);
    let req = p.next_read().expect("read");
    p.on_range(&req, Range::default(), &mut out);
    assert_eq!(got(&mut out), ["m105"]);
    assert_eq!(p.stats.missed, 92);
}

#[test]
fn the_hold_is_bounded_and_overflow_is_read_from_history() {
    let mut p = Positions::new(3 * (3 + HELD_OVERHEAD), 1 << 16);
    let mut out = Vec::new();
    p.on_message("c", pos("E", 1), body(1), &mut out);
    for o in 3..=9 {
        p.on_message("c", pos("E", o), body(o), &mut out);
    }
    assert!(p.held_bytes() <= 3 * (3 + HELD_OVERHEAD));
    assert_eq!(p.stats.hold_overflows, 4);
    let req = p.next_read().expect("read");
    // History up to 9 (ran after all were published).
    p.on_range(&req, range("E", 9, 2..=9), &mut out);
    assert_eq!(got(&mut out).len(), 9);
    assert_eq!(p.held_bytes(), 0);
    assert!(p.next_read().is_none());
    // Overflowed, and the read ran before the rest was published: read again.
    for o in [11, 12, 13, 14, 15] {
        p.on_message("c", pos("E", o), body(o), &mut out);
    }
    let req = p.next_read().expect("read");
    p.on_range(&req, range("E", 10, 10..=10), &mut out);
    assert_eq!(got(&mut out), ["m10", "m11", "m12", "m13"]);
    let req = p.next_read().expect("14, 15 overflowed: read on");
    p.on_range(&req, range("E", 15, 14..=15), &mut out);
    assert_eq!(got(&mut out), ["m14", "m15"]);
    assert_eq!(p.stats.missed, 0);
}

#[test]
fn reads_lost_with_the_link_are_sent_again_and_stale_replies_ignored() {
    let mut p = Positions::new(1 << 20, 1 << 16);
    let mut out = Vec::new();
    p.on_message("c", pos("E", 1), body(1), &mut out);
    p.on_message("c", pos("E", 3), body(3), &mut out);
    let first = p.next_read().expect("read");
    p.on_publish_link_down();
    let again = p.next_read().expect("sent again");
    assert_ne!(first.serial, again.serial);
    p.on_range(&first, range("E", 3, 2..=3), &mut out);
    assert_eq!(got(&mut out), ["m1"], "a stale reply is ignored");
    p.on_range(&again, range("E", 3, 2..=3), &mut out);
    assert_eq!(got(&mut out), ["m2", "m3"]);
    p.forget("c");
    assert!(p.is_empty() && p.held_bytes() == 0);
    p.on_range(&again, range("E", 3, 2..=3), &mut out);
    assert!(out.is_empty());
}
