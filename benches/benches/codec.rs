//! Codec benchmarks: encode and decode of the two hot frames, `Send` (every message a client
//! sends, decoded once by the server) and `Message` (encoded once per fan-out, decoded by every
//! receiving client), with a typical text payload (100 B) and a larger one (4 KiB).
//!
//! ```text
//!  ClientFrame::Send ──encode_client──► bytes ──decode_client──► ClientFrame::Send
//!  ServerFrame::Message ──encode_server──► bytes ──decode_server──► ServerFrame::Message
//! ```
//!
//! Throughput is one frame per iteration, so criterion reports frames per second.

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use switchboard_wire::{
    decode_client, decode_server, ChatId, ClientFrame, ClientMsgId, ContentKind, DeviceId, Encoder,
    Message, MsgId, SendReq, Seq, ServerFrame, Target, UserId,
};

const PAYLOADS: [(&str, usize); 2] = [("100B", 100), ("4KiB", 4 * 1024)];

fn payload(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i * 31) as u8).collect()
}

fn send(len: usize) -> ClientFrame {
    ClientFrame::Send(SendReq {
        client_msg_id: ClientMsgId::from_halves(0x0123_4567_89ab_cdef, 0xfedc_ba98_7654_3210),
        target: Target::Chat(ChatId(0x1234_5678)),
        payload: payload(len),
        reply_to: Seq(0),
        content_kind: ContentKind::Text,
        forwarded: false,
        media_ids: Vec::new(),
    })
}

fn message(len: usize) -> ServerFrame {
    ServerFrame::Message(Message {
        chat: ChatId(0x1234_5678),
        seq: Seq(1_000_001),
        msg_id: MsgId(9_000_000_001),
        sender_user: UserId(42),
        sender_device: DeviceId(1),
        timestamp_ms: 1_700_000_000_000,
        payload: payload(len),
        reply_to: Seq(0),
        content_kind: ContentKind::Text,
        forwarded: false,
        client_msg_id: ClientMsgId::from_halves(0x0123_4567_89ab_cdef, 0xfedc_ba98_7654_3210),
    })
}

fn codec(c: &mut Criterion) {
    let mut g = c.benchmark_group("codec");
    g.throughput(Throughput::Elements(1));
    let mut enc = Encoder::new();
    for (label, len) in PAYLOADS {
        let send = send(len);
        g.bench_with_input(BenchmarkId::new("encode_send", label), &send, |b, f| {
            b.iter(|| enc.encode_client(black_box(f)).len())
        });
        let bytes = enc.encode_client(&send).to_vec();
        g.bench_with_input(
            BenchmarkId::new("decode_send", label),
            &bytes,
            |b, bytes| b.iter(|| decode_client(black_box(bytes)).expect("valid Send")),
        );

        let message = message(len);
        g.bench_with_input(
            BenchmarkId::new("encode_message", label),
            &message,
            |b, f| b.iter(|| enc.encode_server(black_box(f)).len()),
        );
        let bytes = enc.encode_server(&message).to_vec();
        g.bench_with_input(
            BenchmarkId::new("decode_message", label),
            &bytes,
            |b, bytes| b.iter(|| decode_server(black_box(bytes)).expect("valid Message")),
        );
    }
    g.finish();
}

criterion_group!(benches, codec);
criterion_main!(benches);
