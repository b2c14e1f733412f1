//! Request/response over the mesh for the HTTP API: a handler on the core that accepted the
//! connection asks the core owning the state (an account's shard) and waits for the answer.
//!
//! ```text
//!  core A: call(dest, req) ─► CoreMsg::Api{from: CallRef(A, id)} ─mesh─► core B: Core::handle
//!          waits on slot id ◄─ CoreMsg::ApiReply{id, reply} ◄─mesh─ (now, or after the commit)
//! ```
//!
//! The owner never waits on the caller (its answer is a plain mesh send from an effect or a
//! spawned task), so calls add no wait cycle. A call that gets no answer within
//! [`CALL_TIMEOUT`] is answered 503 and its slot freed; a late answer is dropped.

use crate::api_http::Reply;
use crate::core::Core;
use crate::msg::{ApiReq, CoreMsg};
use crate::notify::Notify;
use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::rc::Rc;
use std::time::Duration;

/// Calls waiting on one core; more get 503 (each slot is a few hundred bytes).
pub const CALLS_PENDING_MAX: usize = 10_000;
/// How long a handler waits for the owning core (which may be waiting for an fsync).
pub const CALL_TIMEOUT: Duration = Duration::from_secs(10);

/// Where an answer goes: the calling core and its slot.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CallRef {
    pub core: usize,
    pub id: u64,
}

#[derive(Default)]
struct Slot {
    reply: RefCell<Option<Reply>>,
    ready: Notify,
}

#[derive(Default)]
pub struct Calls {
    next: Cell<u64>,
    slots: RefCell<HashMap<u64, Rc<Slot>>>,
}

impl Calls {
    /// An answer arrived (from any core).
    pub fn complete(&self, id: u64, reply: Reply) {
        if let Some(slot) = self.slots.borrow_mut().remove(&id) {
            *slot.reply.borrow_mut() = Some(reply);
            slot.ready.notify();
        }
    }
}

fn unavailable(message: &str) -> Reply {
    Reply::error(503, "unavailable", message).with_header("retry-after", "1".into())
}

/// Sends `req` to core `dest` and waits for its reply.
pub async fn call(core: &Rc<Core>, dest: usize, req: ApiReq) -> Reply {
    let calls = &core.api.calls;
    if calls.slots.borrow().len() >= CALLS_PENDING_MAX {
        return unavailable("too many requests in flight on this core");
    }
    let id = calls.next.get();
    calls.next.set(id + 1);
    let slot = Rc::new(Slot::default());
    calls.slots.borrow_mut().insert(id, slot.clone());
    let from = CallRef { core: core.id, id };
    core.route(dest, CoreMsg::Api { from, req }).await;
    let wait = async {
        loop {
            if let Some(r) = slot.reply.borrow_mut().take() {
                return Some(r);
            }
            slot.ready.notified().await;
        }
    };
    let timeout = async {
        glommio::timer::sleep(CALL_TIMEOUT).await;
        None
    };
    match futures_lite::future::or(wait, timeout).await {
        Some(r) => r,
        None => {
            calls.slots.borrow_mut().remove(&id);
            unavailable("the owning core did not answer in time")
        }
    }
}
