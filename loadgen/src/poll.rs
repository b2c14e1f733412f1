//! A minimal edge-triggered epoll wrapper: the only readiness API the worker's event loop needs.
//! `epoll_pwait2` takes a nanosecond timeout, so scheduled sends are not rounded to milliseconds.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::time::Duration;

/// Events taken from the kernel per wait.
pub const EVENTS_PER_WAIT_MAX: usize = 1024;

pub struct Epoll {
    fd: OwnedFd,
    events: Vec<libc::epoll_event>,
}

/// One ready descriptor.
#[derive(Clone, Copy, Debug)]
pub struct Ready {
    pub token: u64,
    pub readable: bool,
    pub writable: bool,
    /// Error or hang-up: a read will tell which.
    pub error: bool,
    /// The peer shut down its side (`EPOLLRDHUP`): read until end of stream, even after a
    /// short read.
    pub peer_closed: bool,
}

impl Epoll {
    pub fn new() -> io::Result<Epoll> {
        // SAFETY: plain syscall; the result is checked before use.
        let fd = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Epoll {
            // SAFETY: `fd` is a fresh descriptor owned by nobody else.
            fd: unsafe { OwnedFd::from_raw_fd(fd) },
            events: vec![libc::epoll_event { events: 0, u64: 0 }; EVENTS_PER_WAIT_MAX],
        })
    }

    /// Watches `fd` for input, output and hang-up, edge-triggered: each readiness change is
    /// reported once, so the owner must read / write until `WouldBlock`.
    pub fn add(&self, fd: RawFd, token: u64) -> io::Result<()> {
        let mut ev = libc::epoll_event {
            events: (libc::EPOLLIN | libc::EPOLLOUT | libc::EPOLLRDHUP | libc::EPOLLET) as u32,
            u64: token,
        };
        // SAFETY: both descriptors are open; `ev` is valid for the call.
        let rc = unsafe { libc::epoll_ctl(self.fd.as_raw_fd(), libc::EPOLL_CTL_ADD, fd, &mut ev) };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Waits up to `timeout` and appends what is ready to `out` (cleared first).
    pub fn wait(&mut self, timeout: Duration, out: &mut Vec<Ready>) -> io::Result<()> {
        out.clear();
        let ts = libc::timespec {
            tv_sec: timeout.as_secs().min(3600) as libc::time_t,
            tv_nsec: libc::c_long::from(timeout.subsec_nanos() as i32),
        };
        // SAFETY: `events` has EVENTS_PER_WAIT_MAX writable entries; `ts` lives for the call;
        // a null sigmask means "do not change the mask".
        let n = unsafe {
            libc::epoll_pwait2(
                self.fd.as_raw_fd(),
                self.events.as_mut_ptr(),
                EVENTS_PER_WAIT_MAX as libc::c_int,
                &ts,
                std::ptr::null(),
            )
        };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                return Ok(());
            }
            return Err(e);
        }
        for ev in &self.events[..n as usize] {
            let bits = ev.events;
            out.push(Ready {
                token: ev.u64,
                readable: bits & (libc::EPOLLIN | libc::EPOLLRDHUP) as u32 != 0,
                writable: bits & libc::EPOLLOUT as u32 != 0,
                error: bits & (libc::EPOLLERR | libc::EPOLLHUP) as u32 != 0,
                peer_closed: bits & libc::EPOLLRDHUP as u32 != 0,
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::os::unix::net::UnixStream;

    #[test]
    fn reports_readable_once_per_edge() {
        let mut ep = Epoll::new().expect("epoll");
        let (mut a, b) = UnixStream::pair().expect("pair");
        b.set_nonblocking(true).expect("nonblocking");
        ep.add(b.as_raw_fd(), 7).expect("add");
        let mut ready = Vec::new();
        ep.wait(Duration::from_millis(50), &mut ready)
            .expect("wait");
        // A fresh socket is writable.
        assert!(ready
            .iter()
            .any(|r| r.token == 7 && r.writable && !r.readable));
        ep.wait(Duration::from_millis(1), &mut ready).expect("wait");
        assert!(ready.is_empty(), "edge-triggered: no new edge");
        a.write_all(b"x").expect("write");
        ep.wait(Duration::from_millis(50), &mut ready)
            .expect("wait");
        assert!(ready.iter().any(|r| r.token == 7 && r.readable));
    }
}
