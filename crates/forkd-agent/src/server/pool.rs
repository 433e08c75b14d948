//! An elastic pool of worker threads for requests and exec helpers.
//!
//! Why not a thread per job: on a busy machine a brand-new thread waits behind every runnable
//! task before it first runs (measured here: milliseconds per request), while waking a parked
//! thread is immediate. The pool grows without limit when every worker is busy (requests may
//! block for as long as their command runs) and keeps a few idle workers parked.

use std::collections::VecDeque;
use std::io;
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::thread;
use std::time::Duration;

use super::lock;

/// Idle workers kept parked; more than this exit when they run out of work.
const MAX_IDLE: usize = 16;
/// A parked worker exits after this long without work.
const IDLE_TIMEOUT: Duration = Duration::from_secs(60);

type Job = Box<dyn FnOnce() + Send + 'static>;

#[derive(Default)]
struct Queue {
    jobs: VecDeque<Job>,
    idle: usize,
}

#[derive(Default)]
struct Pool {
    queue: Mutex<Queue>,
    work_available: Condvar,
}

fn pool() -> &'static Arc<Pool> {
    static POOL: OnceLock<Arc<Pool>> = OnceLock::new();
    POOL.get_or_init(|| Arc::new(Pool::default()))
}

/// Runs `job` on a pooled worker thread.
pub(crate) fn spawn(job: impl FnOnce() + Send + 'static) -> io::Result<()> {
    let pool = pool();
    let mut queue = lock(&pool.queue);
    queue.jobs.push_back(Box::new(job));
    if queue.idle >= queue.jobs.len() {
        pool.work_available.notify_one();
        return Ok(());
    }
    drop(queue);
    let worker_pool = pool.clone();
    let spawned = thread::Builder::new()
        .name("agent-worker".into())
        .spawn(move || work(&worker_pool));
    if let Err(e) = spawned {
        // Take the job back out so the caller can report the failure instead of it hanging.
        lock(&pool.queue).jobs.pop_back();
        return Err(e);
    }
    Ok(())
}

fn work(pool: &Pool) {
    let mut queue = lock(&pool.queue);
    loop {
        if let Some(job) = queue.jobs.pop_front() {
            drop(queue);
            job();
            queue = lock(&pool.queue);
            continue;
        }
        if queue.idle >= MAX_IDLE {
            return;
        }
        queue.idle += 1;
        let (guard, waited) = pool
            .work_available
            .wait_timeout(queue, IDLE_TIMEOUT)
            .unwrap_or_else(|p| p.into_inner());
        queue = guard;
        queue.idle -= 1;
        if waited.timed_out() && queue.jobs.is_empty() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;

    #[test]
    fn runs_blocking_jobs_concurrently_and_reuses_workers() {
        // Eight jobs that each wait for all the others: only works if they run at once.
        let barrier = Arc::new(std::sync::Barrier::new(8));
        let (tx, rx) = mpsc::channel();
        for i in 0..8 {
            let (barrier, tx) = (barrier.clone(), tx.clone());
            spawn(move || {
                barrier.wait();
                tx.send(i).unwrap();
            })
            .unwrap();
        }
        let mut got: Vec<i32> = (0..8).map(|_| rx.recv().unwrap()).collect();
        got.sort();
        assert_eq!(got, (0..8).collect::<Vec<_>>());
        // Later jobs run on parked workers.
        for i in 0..20 {
            let tx = tx.clone();
            spawn(move || tx.send(i).unwrap()).unwrap();
            assert_eq!(rx.recv().unwrap(), i);
        }
    }
}
