//! What the load generator reads from the operating system: file-descriptor limits, its own RSS,
//! the kernel's socket accounting (`/proc/net/sockstat`, `/proc/meminfo`), the machine's CPU
//! time (`/proc/stat`) and the clock.

use std::io;
use std::sync::OnceLock;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

static EPOCH: OnceLock<Instant> = OnceLock::new();

/// Nanoseconds since a process-wide `Instant` anchor, shared by every thread: a sender stamps it
/// into a payload and the recipient thread subtracts it from its own reading.
pub fn now_ns() -> u64 {
    let epoch = *EPOCH.get_or_init(Instant::now);
    // u64 nanoseconds last 584 years.
    epoch.elapsed().as_nanos() as u64
}

/// Wall-clock nanoseconds since the Unix epoch: the clock of the kernel's receive timestamps.
pub fn unix_now_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

/// Asks the kernel to stamp each segment `fd` receives (`SO_TIMESTAMPNS`, wall clock), so a
/// read can tell how long its newest bytes had waited (`recv_stamped`).
pub fn enable_rx_timestamps(fd: std::os::fd::RawFd) -> io::Result<()> {
    let one: libc::c_int = 1;
    // SAFETY: `fd` is an open socket; the option value is a c_int that outlives the call, and
    // its size is passed.
    let rc = unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_TIMESTAMPNS,
            (&one as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// `recvmsg` into `buf`: the bytes read and, when the socket has `enable_rx_timestamps` on, the
/// wall-clock arrival (ns since the Unix epoch) of the newest segment this read took (for TCP
/// the kernel reports the last segment consumed). `unix_now_ns() −` it is then how long the
/// read came after its newest bytes arrived: a lower bound on how late the bytes were read.
pub fn recv_stamped(fd: std::os::fd::RawFd, buf: &mut [u8]) -> io::Result<(usize, Option<u64>)> {
    // Room for one SCM_TIMESTAMPNS (a 16-byte header and a 16-byte timespec), 8-aligned.
    let mut control = [0u64; 8];
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    // SAFETY: an all-zero msghdr is a valid empty one; the fields set below point at `iov` and
    // `control`, which outlive the call.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = std::mem::size_of_val(&control) as _;
    // SAFETY: `fd` is an open socket; `msg` describes writable buffers of the stated sizes.
    let n = unsafe { libc::recvmsg(fd, &mut msg, 0) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut stamp = None;
    // SAFETY: `msg` was filled by recvmsg; CMSG_FIRSTHDR / CMSG_NXTHDR stay within
    // `msg_controllen` bytes of `control`, and a header's data is read only when its level,
    // type and length say it holds a timespec (read unaligned: no alignment is promised).
    unsafe {
        let mut c = libc::CMSG_FIRSTHDR(&msg);
        while !c.is_null() {
            let h = &*c;
            if h.cmsg_level == libc::SOL_SOCKET
                && h.cmsg_type == libc::SCM_TIMESTAMPNS
                && h.cmsg_len as usize
                    >= libc::CMSG_LEN(std::mem::size_of::<libc::timespec>() as u32) as usize
            {
                let ts: libc::timespec =
                    std::ptr::read_unaligned(libc::CMSG_DATA(c).cast::<libc::timespec>());
                if ts.tv_sec > 0 {
                    stamp = Some(ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64);
                }
            }
            c = libc::CMSG_NXTHDR(&msg, c);
        }
    }
    Ok((n as usize, stamp))
}

pub fn unix_now_s() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

pub fn page_bytes() -> u64 {
    // SAFETY: sysconf has no preconditions; it only reads a system constant.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    u64::try_from(page).unwrap_or(4096)
}

/// Raises the soft `RLIMIT_NOFILE` to the hard limit and returns the new soft limit.
pub fn raise_fd_limit() -> io::Result<u64> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `lim` is a valid, writable rlimit.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return Err(io::Error::last_os_error());
    }
    if lim.rlim_cur < lim.rlim_max {
        lim.rlim_cur = lim.rlim_max;
        // SAFETY: `lim` is a valid rlimit with cur <= max.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) } != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(lim.rlim_cur)
}

/// Descriptors this process has open now.
pub fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").map_or(0, |d| d.count())
}

/// This process's resident set size (0 if unavailable).
pub fn self_rss_bytes() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    statm
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse::<u64>().ok())
        .map_or(0, |pages| pages * page_bytes())
}

/// The local port range for outgoing connections: one connection to one server address needs
/// one port from it.
pub fn ephemeral_ports() -> Option<(u32, u32)> {
    let s = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range").ok()?;
    let mut it = s.split_whitespace().map(|v| v.parse::<u32>().ok());
    Some((it.next()??, it.next()??))
}

/// Machine-wide kernel socket accounting. On loopback both ends of every connection are on this
/// machine, so one connection shows up as two TCP sockets here.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KernelView {
    /// `sockets: used`.
    pub sockets_used: u64,
    /// `TCP: inuse`: TCP sockets not in TIME_WAIT (listeners included).
    pub tcp_inuse: u64,
    /// `TCP: tw`.
    pub tcp_time_wait: u64,
    /// `TCP: mem`: pages charged to TCP socket buffers (queued data, not the socket structs).
    pub tcp_mem_pages: u64,
    /// `Slab` from /proc/meminfo: all kernel slab caches, where socket, inode, file and epoll
    /// structs live. Machine-wide and noisy, but with thousands of sockets the delta is clear.
    pub slab_bytes: u64,
}

impl KernelView {
    pub fn read() -> KernelView {
        let sockstat = std::fs::read_to_string("/proc/net/sockstat").unwrap_or_default();
        let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
        KernelView::parse(&sockstat, &meminfo)
    }

    fn parse(sockstat: &str, meminfo: &str) -> KernelView {
        let mut v = KernelView::default();
        for line in sockstat.lines() {
            let mut words = line.split_whitespace();
            let section = words.next().unwrap_or("");
            let words: Vec<&str> = words.collect();
            let field = |name: &str| -> u64 {
                words
                    .windows(2)
                    .find(|w| w[0] == name)
                    .and_then(|w| w[1].parse().ok())
                    .unwrap_or(0)
            };
            match section {
                "sockets:" => v.sockets_used = field("used"),
                "TCP:" => {
                    v.tcp_inuse = field("inuse");
                    v.tcp_time_wait = field("tw");
                    v.tcp_mem_pages = field("mem");
                }
                _ => {}
            }
        }
        for line in meminfo.lines() {
            if let Some(rest) = line.strip_prefix("Slab:") {
                let kb: u64 = rest
                    .split_whitespace()
                    .next()
                    .and_then(|s| s.parse().ok())
                    .unwrap_or(0);
                v.slab_bytes = kb * 1024;
            }
        }
        v
    }
}

/// The machine's CPU time so far, from the aggregate `cpu` line of `/proc/stat`: busy ticks
/// (user, nice, system, irq, softirq, steal; guest time is inside user), the irq + softirq part
/// of them (with IRQ time accounting, interrupt work such as loopback packet processing is
/// counted here and not in any process's CPU time), all ticks (busy plus idle and iowait), and
/// the number of CPUs (`cpuN` lines).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MachineTicks {
    pub busy: u64,
    pub irq: u64,
    pub total: u64,
    pub cpus: usize,
}

/// Parses `/proc/stat` (see [`MachineTicks`]); `None` without a well-formed `cpu` line.
pub fn parse_proc_stat(text: &str) -> Option<MachineTicks> {
    let line = text.lines().find(|l| l.starts_with("cpu "))?;
    let f: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .map(str::parse)
        .collect::<Result<_, _>>()
        .ok()?;
    // user nice system idle iowait irq softirq steal [guest guest_nice]
    if f.len() < 8 {
        return None;
    }
    let busy = f[0] + f[1] + f[2] + f[5] + f[6] + f[7];
    let cpus = text
        .lines()
        .filter(|l| l.starts_with("cpu") && l.as_bytes().get(3).is_some_and(u8::is_ascii_digit))
        .count();
    Some(MachineTicks {
        busy,
        irq: f[5] + f[6],
        total: busy + f[3] + f[4],
        cpus,
    })
}

/// [`parse_proc_stat`] of this machine now.
pub fn machine_ticks() -> Option<MachineTicks> {
    parse_proc_stat(&std::fs::read_to_string("/proc/stat").ok()?)
}

/// Clock ticks per second of `/proc` CPU times.
pub fn clock_ticks_per_s() -> f64 {
    // SAFETY: sysconf has no preconditions; it only reads a system constant.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if hz > 0 {
        hz as f64
    } else {
        100.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stamped_read_reports_when_its_newest_bytes_arrived() {
        use std::io::Write;
        use std::os::fd::AsRawFd;
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let mut tx =
            std::net::TcpStream::connect(listener.local_addr().expect("addr")).expect("connect");
        let (rx, _) = listener.accept().expect("accept");
        let mut buf = [0u8; 64];
        // Without the option: bytes, no stamp.
        tx.write_all(b"one").expect("write");
        std::thread::sleep(std::time::Duration::from_millis(20));
        let (n, stamp) = recv_stamped(rx.as_raw_fd(), &mut buf).expect("recv");
        assert_eq!((&buf[..n], stamp), (&b"one"[..], None));
        enable_rx_timestamps(rx.as_raw_fd()).expect("SO_TIMESTAMPNS");
        // The kernel turns stamping on for every socket a moment after the first asks (a
        // deferred static key), so the first segments may come unstamped: retry a little.
        let (before, after, at) = (0..100)
            .find_map(|_| {
                let before = unix_now_ns();
                tx.write_all(b"two").expect("write");
                std::thread::sleep(std::time::Duration::from_millis(30));
                let (n, stamp) = recv_stamped(rx.as_raw_fd(), &mut buf).expect("recv");
                let after = unix_now_ns();
                assert_eq!(&buf[..n], b"two");
                stamp.map(|at| (before, after, at))
            })
            .expect("a receive timestamp within 100 tries");
        assert!(before <= at && at <= after, "{before} <= {at} <= {after}");
        // The read came at least the 30 ms sleep after the bytes arrived.
        assert!(after - at >= 30_000_000, "waited {} ns", after - at);
    }

    #[test]
    fn parses_sockstat_and_meminfo() {
        let sockstat =
            "sockets: used 21\nTCP: inuse 3 orphan 0 tw 7 alloc 4 mem 214\nUDP: inuse 0 mem 0\n";
        let meminfo =
            "MemTotal:       24684104 kB\nSlab:             123456 kB\nSReclaimable:      1 kB\n";
        assert_eq!(
            KernelView::parse(sockstat, meminfo),
            KernelView {
                sockets_used: 21,
                tcp_inuse: 3,
                tcp_time_wait: 7,
                tcp_mem_pages: 214,
                slab_bytes: 123_456 * 1024,
            }
        );
        assert_eq!(KernelView::parse("", ""), KernelView::default());
    }

    #[test]
    fn parses_proc_stat() {
        let stat = "cpu  100 5 50 1000 20 3 7 2 40 0\ncpu0 50 2 25 500 10 1 3 1 20 0\n\
                    cpu1 50 3 25 500 10 2 4 1 20 0\nintr 12345 0 1\nctxt 99\ncpufreq 1\n";
        assert_eq!(
            parse_proc_stat(stat),
            Some(MachineTicks {
                busy: 100 + 5 + 50 + 3 + 7 + 2,
                irq: 3 + 7,
                total: 100 + 5 + 50 + 3 + 7 + 2 + 1000 + 20,
                cpus: 2,
            })
        );
        assert_eq!(
            parse_proc_stat("cpu0 1 2 3 4 5 6 7 8\n"),
            None,
            "no aggregate line"
        );
        assert_eq!(parse_proc_stat("cpu  1 2 3\n"), None, "too few fields");
        assert_eq!(parse_proc_stat("cpu  1 x 3 4 5 6 7 8\n"), None);
        let here = machine_ticks().expect("/proc/stat on Linux");
        assert!(here.cpus >= 1 && here.total >= here.busy);
    }

    #[test]
    fn clock_moves_forward() {
        let a = now_ns();
        let b = now_ns();
        assert!(b >= a);
    }
}
