//! The group fan-out hot path on the chat's owner core: encode the `Message` frame once, then
//! plan one delivery per destination core (the online devices of every member, grouped by core).
//! Reported per message, with the number of deliveries it produces as the throughput element, so
//! criterion prints deliveries/s.

use criterion::{black_box, criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use switchboard::core::{fanout_targets, Directory};
use switchboard::msg::ConnRef;
use switchboard_wire::{
    ChatId, ClientMsgId, ContentKind, DeviceId, Encoder, Message, MsgId, Seq, ServerFrame, UserId,
};

/// A directory with `members` users online, `devices` devices each, spread over `cores` cores.
fn directory(members: u64, devices: u32, cores: usize) -> (Directory, Vec<UserId>) {
    let mut dir = Directory::default();
    let mut conn = 0u64;
    let users: Vec<UserId> = (1..=members).map(UserId).collect();
    for u in &users {
        for d in 1..=devices {
            conn += 1;
            dir.online(
                *u,
                DeviceId(d),
                ConnRef {
                    core: (conn as usize) % cores,
                    conn,
                },
                conn,
            );
        }
    }
    (dir, users)
}

fn fanout(c: &mut Criterion) {
    let mut g = c.benchmark_group("fanout");
    let msg = Message {
        chat: ChatId(1 << 63 | 42),
        seq: Seq(1000),
        msg_id: MsgId(77),
        sender_user: UserId(1),
        sender_device: DeviceId(1),
        timestamp_ms: 1_700_000_000_000,
        payload: vec![0x5a; 200],
        reply_to: Seq(0),
        content_kind: ContentKind::Text,
        client_msg_id: ClientMsgId::from_halves(1, 2),
        forwarded: false,
    };
    for members in [100u64, 1024] {
        let (dir, users) = directory(members, 1, 4);
        let skip = Some(ConnRef { core: 1, conn: 1 });
        let deliveries: usize = fanout_targets(&dir, &users, skip)
            .iter()
            .map(|(_, v)| v.len())
            .sum();
        g.throughput(Throughput::Elements(deliveries as u64));
        let mut enc = Encoder::new();
        g.bench_with_input(
            BenchmarkId::new("encode_once_and_plan", members),
            &users,
            |b, users| {
                b.iter(|| {
                    let frame: std::sync::Arc<[u8]> =
                        std::sync::Arc::from(enc.encode_server(&ServerFrame::Message(msg.clone())));
                    let plan = fanout_targets(&dir, black_box(users), skip);
                    black_box((frame, plan))
                })
            },
        );
    }
    g.finish();
}

criterion_group!(benches, fanout);
criterion_main!(benches);
