//! Blocking and presence over real sockets.

mod util;

use std::time::{Duration, Instant};
use switchboard_client::{Client, ClientError};
use switchboard_wire::{ErrorCode, Presence, ServerFrame, Target, UserId, Visibility};
use util::{Server, T};

fn server_error(r: Result<impl std::fmt::Debug, ClientError>) -> ErrorCode {
    match r {
        Err(ClientError::Server(e)) => e.code,
        other => panic!("expected a server error, got {other:?}"),
    }
}

/// The next Presence frame about `user` matching `pred`, within a few seconds.
fn presence_until(c: &mut Client, user: u64, pred: impl Fn(&Presence) -> bool) -> Presence {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        assert!(Instant::now() < deadline, "no matching presence for {user}");
        if let Some(ServerFrame::Presence(p)) = c.recv(Duration::from_millis(100)).unwrap() {
            if p.user == UserId(user) && pred(&p) {
                return p;
            }
        }
    }
}

#[test]
fn blocking_refuses_messages_and_typing_both_ways_until_unblocked() {
    let mut server = Server::start(2);
    let mut a = server.connect(1, 1);
    let mut b = server.connect(2, 1);
    let chat = a
        .send_and_wait_ack(Target::Peer(UserId(2)), b"hi", T)
        .unwrap()
        .chat;
    a.block(UserId(2), true, T).unwrap();
    assert_eq!(
        server_error(b.send_and_wait_ack(Target::Peer(UserId(1)), b"hey", T)),
        ErrorCode::Blocked
    );
    assert_eq!(
        server_error(a.send_and_wait_ack(Target::Peer(UserId(2)), b"hey", T)),
        ErrorCode::Blocked
    );
    b.typing(chat, true).unwrap();
    let until = Instant::now() + Duration::from_millis(300);
    while Instant::now() < until {
        if let Some(ServerFrame::TypingNotice { .. }) = a.recv(Duration::from_millis(50)).unwrap() {
            panic!("typing across a block");
        }
    }
    // The block is durable.
    drop((a, b));
    server.restart();
    let mut a = server.connect(1, 1);
    let mut b = server.connect(2, 1);
    assert_eq!(
        server_error(b.send_and_wait_ack(Target::Chat(chat), b"still?", T)),
        ErrorCode::Blocked
    );
    a.block(UserId(2), false, T).unwrap();
    b.send_and_wait_ack(Target::Chat(chat), b"thanks", T)
        .unwrap();
    // Blocking someone you never talked to works too; yourself does not.
    a.block(UserId(77), true, T).unwrap();
    assert_eq!(
        server_error(a.block(UserId(1), true, T)),
        ErrorCode::InvalidArgument
    );
}

#[test]
fn presence_online_last_seen_durable_and_coalesced() {
    let mut server = Server::start(3);
    let mut a = server.connect(10, 1);
    a.subscribe_presence(&[UserId(11)], T).unwrap();
    let p = presence_until(&mut a, 11, |_| true);
    assert!(!p.online && p.last_seen_ms == 0 && !p.hidden, "{p:?}");
    let b = server.connect(11, 1);
    presence_until(&mut a, 11, |p| p.online);
    let before = switchboard::core::unix_ms();
    drop(b);
    let p = presence_until(&mut a, 11, |p| !p.online);
    assert!(p.last_seen_ms >= before.saturating_sub(1000), "{p:?}");
    let seen = p.last_seen_ms;
    // Several quick reconnects are folded into few updates (at most ~1/s).
    let mut updates = 0;
    for _ in 0..5 {
        let c = server.connect(11, 1);
        drop(c);
    }
    let until = Instant::now() + Duration::from_millis(1500);
    while Instant::now() < until {
        if let Some(ServerFrame::Presence(_)) = a.recv(Duration::from_millis(50)).unwrap() {
            updates += 1;
        }
    }
    assert!(
        (1..=3).contains(&updates),
        "{updates} updates for 10 changes"
    );
    // Last seen survives a restart.
    server.restart();
    let mut a = server.connect(10, 1);
    a.subscribe_presence(&[UserId(11)], T).unwrap();
    let p = presence_until(&mut a, 11, |_| true);
    assert!(!p.online && p.last_seen_ms >= seen, "{p:?}");
}

#[test]
fn privacy_contacts_nobody_and_blocks_hide_presence() {
    let server = Server::start(2);
    let mut owner = server.connect(20, 1);
    let mut contact = server.connect(21, 1);
    let mut stranger = server.connect(22, 1);
    contact
        .send_and_wait_ack(Target::Peer(UserId(20)), b"we are contacts", T)
        .unwrap();
    owner
        .set_privacy(Visibility::Contacts, Visibility::Contacts, T)
        .unwrap();
    contact.subscribe_presence(&[UserId(20)], T).unwrap();
    stranger.subscribe_presence(&[UserId(20)], T).unwrap();
    let seen_by_contact = presence_until(&mut contact, 20, |_| true);
    assert!(
        seen_by_contact.online && !seen_by_contact.hidden,
        "{seen_by_contact:?}"
    );
    let seen_by_stranger = presence_until(&mut stranger, 20, |_| true);
    assert!(
        !seen_by_stranger.online && seen_by_stranger.hidden,
        "{seen_by_stranger:?}"
    );
    // Nobody: even contacts see nothing (pushed to current subscribers).
    owner
        .set_privacy(Visibility::Nobody, Visibility::Nobody, T)
        .unwrap();
    presence_until(&mut contact, 20, |p| p.hidden && !p.online);
    // A block hides presence even with "everyone".
    owner
        .set_privacy(Visibility::Everyone, Visibility::Everyone, T)
        .unwrap();
    owner.block(UserId(22), true, T).unwrap();
    stranger.subscribe_presence(&[], T).unwrap();
    stranger.subscribe_presence(&[UserId(20)], T).unwrap();
    presence_until(&mut stranger, 20, |p| p.hidden);
    // Too many subscriptions in one request is refused by the protocol.
    let many: Vec<UserId> =
        (1000..1000 + switchboard_wire::limits::PRESENCE_SUBSCRIPTIONS_MAX as u64 + 1)
            .map(UserId)
            .collect();
    stranger
        .send(&switchboard_wire::ClientFrame::Subscribe {
            request_id: 99,
            users: many,
        })
        .unwrap();
    loop {
        match stranger.recv(T).unwrap().expect("an error frame") {
            ServerFrame::Error(e) => {
                assert_eq!(e.code, ErrorCode::TooManySubscriptions);
                break;
            }
            _ => continue,
        }
    }
}
