//! The kernel's floor under every figure the load generator reports on one box: what one small
//! TCP segment over loopback costs, with no Switchboard code involved.
//!
//! A message with the full receipt flow is five segments on the wire (`Send`, `SendAck`,
//! `Message`, `Delivered`, `Receipt`), and with the load generator on the same machine the kernel
//! pays for both ends of each. These benches give the cost of one 100-byte segment:
//! - `send_recv_same_thread`: `send` on one end, `recv` on the other, one thread: the TCP
//!   transmit + loopback receive path and two syscalls, with no wake-up (the cheapest case);
//! - `ping_pong_two_threads`: a 100-byte round trip between two threads, each blocked in `recv`
//!   until its peer's segment arrives: two segments and two wake-ups of a sleeping thread, as in
//!   a server whose reactors park between messages.
//!
//! `cargo bench -p switchboard-benches --bench loopback`

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::time::Duration;

const SEGMENT_BYTES: usize = 100;

fn pair() -> (TcpStream, TcpStream) {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind loopback");
    let a = TcpStream::connect(listener.local_addr().expect("addr")).expect("connect");
    let (b, _) = listener.accept().expect("accept");
    a.set_nodelay(true).expect("nodelay");
    b.set_nodelay(true).expect("nodelay");
    (a, b)
}

fn read_exact(s: &mut TcpStream, buf: &mut [u8]) {
    s.read_exact(buf).expect("loopback read");
}

fn bench_loopback(c: &mut Criterion) {
    let mut g = c.benchmark_group("loopback_tcp_100B");
    g.throughput(Throughput::Elements(1));
    g.measurement_time(Duration::from_secs(5));

    let (mut a, mut b) = pair();
    let out = [7u8; SEGMENT_BYTES];
    let mut inb = [0u8; SEGMENT_BYTES];
    g.bench_function("send_recv_same_thread", |bench| {
        bench.iter(|| {
            a.write_all(&out).expect("loopback write");
            read_exact(&mut b, &mut inb);
            assert_eq!(inb[0], 7);
        })
    });

    let (mut a, mut b) = pair();
    let echo = std::thread::spawn(move || {
        let mut buf = [0u8; SEGMENT_BYTES];
        loop {
            if b.read_exact(&mut buf).is_err() {
                return;
            }
            if b.write_all(&buf).is_err() {
                return;
            }
        }
    });
    g.bench_function("ping_pong_two_threads", |bench| {
        bench.iter(|| {
            a.write_all(&out).expect("loopback write");
            read_exact(&mut a, &mut inb);
            assert_eq!(inb[0], 7);
        })
    });
    g.finish();
    drop(a);
    echo.join().expect("echo thread");
}

criterion_group!(benches, bench_loopback);
criterion_main!(benches);
