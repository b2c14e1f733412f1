//! Helpers shared by the storage integration tests.

use std::future::Future;

/// Runs `f` on a fresh executor, then gives the reactor a few cycles so files the future dropped
/// without `close()` are really closed (glommio closes them on its next I/O cycle). The next
/// `open` of the same shard needs that: its segments are `flock`ed while open.
pub fn run<T>(f: impl Future<Output = T>) -> T {
    glommio::LocalExecutorBuilder::default()
        .make()
        .expect("executor")
        .run(async {
            let out = f.await;
            for _ in 0..3 {
                glommio::timer::sleep(std::time::Duration::from_millis(1)).await;
            }
            out
        })
}
