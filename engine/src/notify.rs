//! A single-threaded "something changed" signal for tasks on one reactor. Waiting tasks register
//! their waker; `notify` wakes them all. Waiters re-check their condition after waking.

use std::cell::{Cell, RefCell};
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, Waker};

#[derive(Default)]
pub struct Notify {
    generation: Cell<u64>,
    /// The first waiter inline (a connection task is the only waiter of its `Notify`, and one
    /// exists per connection), further ones in `more`.
    first: RefCell<Option<Waker>>,
    more: RefCell<Vec<Waker>>,
}

impl Notify {
    pub fn new() -> Self {
        Self::default()
    }

    /// Wakes every task waiting in `notified()`.
    pub fn notify(&self) {
        self.generation.set(self.generation.get().wrapping_add(1));
        let first = self.first.borrow_mut().take();
        let more = std::mem::take(&mut *self.more.borrow_mut());
        for w in first.into_iter().chain(more) {
            w.wake();
        }
    }

    /// Completes at the next `notify()` after this call.
    pub fn notified(&self) -> Notified<'_> {
        Notified {
            notify: self,
            generation: self.generation.get(),
        }
    }
}

pub struct Notified<'a> {
    notify: &'a Notify,
    generation: u64,
}

impl Future for Notified<'_> {
    type Output = ();
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        if self.notify.generation.get() != self.generation {
            return Poll::Ready(());
        }
        let mut first = self.notify.first.borrow_mut();
        match &*first {
            None => *first = Some(cx.waker().clone()),
            Some(w) if w.will_wake(cx.waker()) => {}
            Some(_) => {
                let mut more = self.notify.more.borrow_mut();
                if !more.iter().any(|w| w.will_wake(cx.waker())) {
                    more.push(cx.waker().clone());
                }
            }
        }
        Poll::Pending
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    use std::task::Wake;

    struct Count(AtomicUsize);
    impl Wake for Count {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::Relaxed);
        }
    }

    #[test]
    fn every_waiter_is_woken_once_and_later_waits_need_a_new_notify() {
        let n = Notify::new();
        let counts: Vec<Arc<Count>> = (0..3)
            .map(|_| Arc::new(Count(AtomicUsize::new(0))))
            .collect();
        let wakers: Vec<Waker> = counts.iter().map(|c| Waker::from(c.clone())).collect();
        let mut futs: Vec<_> = (0..3).map(|_| Box::pin(n.notified())).collect();
        for (f, w) in futs.iter_mut().zip(&wakers) {
            // Polled twice: registered once.
            for _ in 0..2 {
                assert!(f.as_mut().poll(&mut Context::from_waker(w)).is_pending());
            }
        }
        n.notify();
        for (f, (c, w)) in futs.iter_mut().zip(counts.iter().zip(&wakers)) {
            assert_eq!(c.0.load(Ordering::Relaxed), 1);
            assert!(f.as_mut().poll(&mut Context::from_waker(w)).is_ready());
        }
        n.notify(); // nobody waits: nothing to wake
        let mut later = Box::pin(n.notified());
        assert!(later
            .as_mut()
            .poll(&mut Context::from_waker(&wakers[0]))
            .is_pending());
        assert_eq!(counts[0].0.load(Ordering::Relaxed), 1);
    }
}
