//! The patched glommio (`third_party/glommio/SWITCHBOARD.md`) replaces the `membarrier` IPI a
//! reactor issued before every park with a pair of SeqCst fences (one on the parking reactor,
//! one in every cross-executor notify), and sets up its rings with `COOP_TASKRUN`. Both change
//! how a parked reactor learns about new work. A lost wake-up would leave a reactor asleep with
//! a message in its channel; these tests would then hang, so each is bounded by a deadline and
//! fails instead.

use std::sync::mpsc;
use std::time::{Duration, Instant};

use futures_lite::{AsyncReadExt, AsyncWriteExt};
use glommio::channels::shared_channel;
use glommio::net::{TcpListener, TcpStream};
use glommio::{LocalExecutorBuilder, Placement};

/// Round trips per test: enough that a race between a park and a notify is hit many times
/// (every round trip parks both reactors once), few enough for a debug build in seconds.
const ROUND_TRIPS: u32 = 20_000;
/// A run that takes longer than this lost a wake-up (a healthy run takes well under 10 s).
const DEADLINE: Duration = Duration::from_secs(60);

/// The answering side of the ping-pong tests: an executor that returns every ping plus one until
/// the ping side hangs up, and reports how many it answered.
fn spawn_pong(
    builder: LocalExecutorBuilder,
    ab_rx: shared_channel::SharedReceiver<u32>,
    ba_tx: shared_channel::SharedSender<u32>,
) -> glommio::ExecutorJoinHandle<u32> {
    builder
        .spawn(move || async move {
            let rx = ab_rx.connect().await;
            let tx = ba_tx.connect().await;
            let mut n = 0;
            while let Some(i) = rx.recv().await {
                tx.send(i + 1).await.expect("send pong");
                n += 1;
            }
            n
        })
        .expect("spawn pong executor")
}

/// Two executors on two threads ping-pong over a pair of bounded shared channels: every
/// message arrives while its receiver is parked or about to park.
#[test]
fn cross_executor_ping_pong_loses_no_wakeup() {
    let (ab_tx, ab_rx) = shared_channel::new_bounded::<u32>(1);
    let (ba_tx, ba_rx) = shared_channel::new_bounded::<u32>(1);
    let (done_tx, done_rx) = mpsc::channel::<u32>();

    let a = LocalExecutorBuilder::new(Placement::Unbound)
        .name("ping")
        .spawn(move || async move {
            let tx = ab_tx.connect().await;
            let rx = ba_rx.connect().await;
            for i in 0..ROUND_TRIPS {
                tx.send(i).await.expect("send ping");
                let got = rx.recv().await.expect("recv pong");
                assert_eq!(got, i + 1, "pong answers its ping");
            }
            ROUND_TRIPS
        })
        .expect("spawn ping executor");
    let b = spawn_pong(
        LocalExecutorBuilder::new(Placement::Unbound).name("pong"),
        ab_rx,
        ba_tx,
    );

    std::thread::spawn(move || {
        let pings = a.join().expect("ping executor");
        let pongs = b.join().expect("pong executor");
        assert_eq!(pings, pongs);
        done_tx.send(pongs).expect("report");
    });
    let started = Instant::now();
    match done_rx.recv_timeout(DEADLINE) {
        Ok(n) => assert_eq!(n, ROUND_TRIPS),
        Err(_) => panic!(
            "ping-pong did not finish in {DEADLINE:?} (a reactor slept through a notify); \
             started {:?} ago",
            started.elapsed()
        ),
    }
}

/// Socket completions posted by another CPU's softirq (the `COOP_TASKRUN` path): an echo
/// server on one executor, a client on another, one byte at a time so that every read parks.
#[test]
fn socket_completions_from_another_thread_wake_a_parked_reactor() {
    let (addr_tx, addr_rx) = mpsc::channel();
    let (done_tx, done_rx) = mpsc::channel::<u32>();
    let server = LocalExecutorBuilder::new(Placement::Unbound)
        .name("echo")
        .spawn(move || async move {
            let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
            addr_tx
                .send(listener.local_addr().expect("addr"))
                .expect("addr");
            let mut s = listener.accept().await.expect("accept");
            let mut b = [0u8; 1];
            let mut n = 0u32;
            while s.read_exact(&mut b).await.is_ok() {
                s.write_all(&b).await.expect("echo");
                n += 1;
            }
            n
        })
        .expect("spawn echo executor");
    let addr = addr_rx.recv_timeout(DEADLINE).expect("echo server bound");
    let client = LocalExecutorBuilder::new(Placement::Unbound)
        .name("client")
        .spawn(move || async move {
            let mut s = TcpStream::connect(addr).await.expect("connect");
            s.set_nodelay(true).expect("nodelay");
            let mut b = [0u8; 1];
            for i in 0..ROUND_TRIPS {
                s.write_all(&[i as u8]).await.expect("write");
                s.read_exact(&mut b).await.expect("read echo");
                assert_eq!(b[0], i as u8);
            }
            ROUND_TRIPS
        })
        .expect("spawn client executor");
    std::thread::spawn(move || {
        let sent = client.join().expect("client executor");
        let echoed = server.join().expect("echo executor");
        assert_eq!(sent, echoed);
        done_tx.send(echoed).expect("report");
    });
    match done_rx.recv_timeout(DEADLINE) {
        Ok(n) => assert_eq!(n, ROUND_TRIPS),
        Err(_) => panic!("echo ping-pong did not finish in {DEADLINE:?} (a completion was lost)"),
    }
}

/// Timers across parks and wake-ups. While the ping executor waits for a pong it parks with a
/// ring timeout armed for its earliest timer (an hour-long sleep that never fires, or a short
/// one that must), and the pong's notify wakes it before that timeout: the reactor then cancels
/// the timeout with `TIMEOUT_REMOVE` (patch 4 in `third_party/glommio/SWITCHBOARD.md`), as it
/// does with its throughput-preemption timeout on every turn. A cancel that hit a live timeout,
/// or a completion it could not match, would leave a short sleep unwoken (the test then fails at
/// its deadline) or panic the reactor.
#[test]
fn timers_fire_across_parks_whose_timeouts_were_cancelled() {
    let (ab_tx, ab_rx) = shared_channel::new_bounded::<u32>(1);
    let (ba_tx, ba_rx) = shared_channel::new_bounded::<u32>(1);
    let (done_tx, done_rx) = mpsc::channel::<(u32, u32)>();
    const SHORT: Duration = Duration::from_millis(1);

    let a = LocalExecutorBuilder::new(Placement::Unbound)
        .name("ping-timers")
        .spawn(move || async move {
            glommio::spawn_local(glommio::timer::sleep(Duration::from_secs(3600))).detach();
            let tx = ab_tx.connect().await;
            let rx = ba_rx.connect().await;
            let mut shorts = 0;
            for i in 0..ROUND_TRIPS {
                tx.send(i).await.expect("send ping");
                let got = rx.recv().await.expect("recv pong");
                assert_eq!(got, i + 1, "pong answers its ping");
                if i % 64 == 0 {
                    // The short sleep wins the race: the hour-long one is dropped unfired.
                    let started = Instant::now();
                    let short_won = futures_lite::future::or(
                        async {
                            glommio::timer::sleep(Duration::from_secs(3600)).await;
                            false
                        },
                        async {
                            glommio::timer::sleep(SHORT).await;
                            true
                        },
                    )
                    .await;
                    assert!(short_won, "an hour-long sleep finished first");
                    assert!(started.elapsed() >= SHORT, "a sleep woke early");
                    shorts += 1;
                }
            }
            (ROUND_TRIPS, shorts)
        })
        .expect("spawn ping executor");
    let b = spawn_pong(
        LocalExecutorBuilder::new(Placement::Unbound).name("pong-timers"),
        ab_rx,
        ba_tx,
    );

    std::thread::spawn(move || {
        let (pings, shorts) = a.join().expect("ping executor");
        let pongs = b.join().expect("pong executor");
        assert_eq!(pings, pongs);
        done_tx.send((pongs, shorts)).expect("report");
    });
    match done_rx.recv_timeout(DEADLINE) {
        Ok((n, shorts)) => {
            assert_eq!(n, ROUND_TRIPS);
            assert_eq!(shorts, ROUND_TRIPS.div_ceil(64));
        }
        Err(_) => panic!("timers did not all fire within {DEADLINE:?} (a live timeout was lost)"),
    }
}

/// Spinning reactors (`spin_before_park_us`) that share a CPU with other runnable threads, as
/// the server's do with the load generator and the io_uring fsync workers on a small box.
/// Patch 5 (`third_party/glommio/SWITCHBOARD.md`): a reactor with nothing to do yields its CPU
/// while it spins and parks once another thread ran. Here two executors pinned to one CPU
/// ping-pong with a spin far longer than the test: every hop needs the CPU the other one is
/// spinning on. Without the yield each hop waits for the scheduler to preempt the spinner (a
/// slice of ~1-3 ms: 1,000 round trips take seconds); with it a hop is a context switch.
#[test]
fn spinning_reactors_hand_over_a_shared_cpu() {
    /// Far below what preemption alone allows (2,000 hops x >= 0.75 ms = 1.5 s), far above what
    /// the yield needs (tens of microseconds a hop, measured ~0.1 s on the 2-vCPU dev box).
    const BOUND: Duration = Duration::from_millis(1000);
    const TRIPS: u32 = 1_000;
    const SPIN: Duration = Duration::from_secs(30);
    let (ab_tx, ab_rx) = shared_channel::new_bounded::<u32>(1);
    let (ba_tx, ba_rx) = shared_channel::new_bounded::<u32>(1);
    let (done_tx, done_rx) = mpsc::channel::<Duration>();

    let a = LocalExecutorBuilder::new(Placement::Fixed(0))
        .name("ping-spin")
        .spin_before_park(SPIN)
        .spawn(move || async move {
            let tx = ab_tx.connect().await;
            let rx = ba_rx.connect().await;
            // One round trip first: both executors are running and connected.
            tx.send(0).await.expect("send ping");
            rx.recv().await.expect("recv pong");
            let started = Instant::now();
            for i in 1..=TRIPS {
                tx.send(i).await.expect("send ping");
                let got = rx.recv().await.expect("recv pong");
                assert_eq!(got, i + 1, "pong answers its ping");
            }
            started.elapsed()
        })
        .expect("spawn ping executor");
    let b = spawn_pong(
        LocalExecutorBuilder::new(Placement::Fixed(0))
            .name("pong-spin")
            .spin_before_park(SPIN),
        ab_rx,
        ba_tx,
    );
    std::thread::spawn(move || {
        let took = a.join().expect("ping executor");
        let pongs = b.join().expect("pong executor");
        assert_eq!(pongs, TRIPS + 1);
        done_tx.send(took).expect("report");
    });
    match done_rx.recv_timeout(DEADLINE) {
        Ok(took) => assert!(
            took < BOUND,
            "{TRIPS} round trips between two spinning executors on one CPU took {took:?} \
             (a spinning reactor kept the CPU from a runnable thread)"
        ),
        Err(_) => panic!("spinning ping-pong did not finish in {DEADLINE:?}"),
    }
}

/// Patch 6 (`third_party/glommio/SWITCHBOARD.md`): a reactor turn keeps its latency preemption
/// timer while at least half of it is left instead of re-arming it every turn. A spinning
/// reactor that ping-pongs with another executor for three quarters of a slice makes a turn
/// per message without parking (the turns that keep the timer); a task that then runs without
/// yielding must still be preempted: not before half a slice (a kept timer had at least half of
/// it left) and not much after a whole one (the timer kept was armed at most one slice ago, so
/// it still fires). A timer kept regardless of its age failed it (a round waited 10 ms); not
/// every round catches that, since a park now and then (a yield that ran another thread)
/// cancels the timer and the next turn re-arms it.
#[test]
fn a_kept_preemption_timer_still_preempts_a_busy_task_queue() {
    const SLICE: Duration = Duration::from_millis(40);
    /// Room for a noisy shared box: the timer is an io_uring timeout posted as task work.
    const LATE: Duration = Duration::from_millis(500);
    const ROUNDS: usize = 10;
    let (ab_tx, ab_rx) = shared_channel::new_bounded::<u32>(1);
    let (ba_tx, ba_rx) = shared_channel::new_bounded::<u32>(1);
    let (done_tx, done_rx) = mpsc::channel::<Vec<Duration>>();
    // On two CPUs the spinning side never parks (a park cancels the timer, as upstream does).
    let two_cpus = std::thread::available_parallelism().map_or(1, |n| n.get()) >= 2;
    let (pa, pb) = if two_cpus {
        (Placement::Fixed(0), Placement::Fixed(1))
    } else {
        (Placement::Unbound, Placement::Unbound)
    };
    let a = LocalExecutorBuilder::new(pa)
        .name("preempt")
        .preempt_timer(SLICE)
        .spin_before_park(Duration::from_secs(5))
        .spawn(move || async move {
            let tx = ab_tx.connect().await;
            let rx = ba_rx.connect().await;
            let mut waits = Vec::new();
            let mut i = 0;
            for _ in 0..ROUNDS {
                let turns_started = Instant::now();
                while turns_started.elapsed() < SLICE * 3 / 4 {
                    tx.send(i).await.expect("send ping");
                    assert_eq!(rx.recv().await, Some(i + 1), "pong answers its ping");
                    i += 1;
                }
                let started = Instant::now();
                while !glommio::executor().need_preempt() {
                    assert!(started.elapsed() < DEADLINE, "never preempted");
                    std::hint::spin_loop();
                }
                waits.push(started.elapsed());
                glommio::executor().yield_task_queue_now().await;
            }
            waits
        })
        .expect("spawn executor");
    let b = spawn_pong(LocalExecutorBuilder::new(pb).name("pong"), ab_rx, ba_tx);
    std::thread::spawn(move || {
        let waits = a.join().expect("ping executor");
        b.join().expect("pong executor");
        done_tx.send(waits).expect("report");
    });
    let waits = done_rx.recv_timeout(DEADLINE).expect("executors finished");
    for w in &waits {
        assert!(
            *w >= SLICE / 2 - Duration::from_millis(2) && *w <= SLICE + LATE,
            "a busy task queue was preempted after {w:?} (slice {SLICE:?}; all: {waits:?})"
        );
    }
}
