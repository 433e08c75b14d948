//! The device event loop: one thread, one epoll, waiting on every virtio queue's notify EventFd
//! and on each device's host-side fd, and calling the device model when one fires.

use std::os::unix::io::{AsRawFd, RawFd};
use std::sync::{Arc, Mutex};

use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::mmio::lock;
use super::VirtioDevice;

/// What the loop needs from one device (from [`super::MmioTransport::event_source`]).
pub struct VirtioEventSource {
    pub device: Arc<Mutex<dyn VirtioDevice>>,
    /// Clones of the transport's per-queue notify EventFds.
    pub queue_evts: Vec<EventFd>,
    /// The device's host-side pollable fd, if any.
    pub host_fd: Option<RawFd>,
}

#[derive(Debug, thiserror::Error)]
pub enum EventLoopError {
    #[error("device event loop")]
    Io(#[from] std::io::Error),
    #[error("device event loop: too many devices ({0}) or queues")]
    TooMany(usize),
}

const STOP_TOKEN: u64 = u64::MAX;
/// The device thread's name.
pub const DEVICES_THREAD: &str = "forkd-devices";
/// Token slot meaning "the device's host fd" rather than a queue index.
const HOST_SLOT: u64 = 0xffff;

/// The running device thread; dropping it stops and joins the thread.
pub struct DeviceEventLoop {
    stop: EventFd,
    thread: Option<crate::thread_jail::Worker>,
    /// Held by the thread while it works on a batch of events; holding it elsewhere keeps
    /// every device from touching guest memory (snapshots).
    gate: Arc<Mutex<()>>,
}

impl DeviceEventLoop {
    /// Starts the thread serving `sources`.
    pub fn spawn(sources: Vec<VirtioEventSource>) -> Result<DeviceEventLoop, EventLoopError> {
        let epoll = Epoll::new()?;
        let stop = EventFd::new(EFD_NONBLOCK)?;
        epoll.ctl(
            ControlOperation::Add,
            stop.as_raw_fd(),
            EpollEvent::new(EventSet::IN, STOP_TOKEN),
        )?;
        for (dev_index, source) in sources.iter().enumerate() {
            if dev_index >= 1 << 16 || source.queue_evts.len() >= HOST_SLOT as usize {
                return Err(EventLoopError::TooMany(sources.len()));
            }
            for (queue_index, evt) in source.queue_evts.iter().enumerate() {
                epoll.ctl(
                    ControlOperation::Add,
                    evt.as_raw_fd(),
                    EpollEvent::new(EventSet::IN, token(dev_index, queue_index as u64)),
                )?;
            }
            if let Some(fd) = source.host_fd {
                epoll.ctl(
                    ControlOperation::Add,
                    fd,
                    EpollEvent::new(EventSet::IN, token(dev_index, HOST_SLOT)),
                )?;
            }
        }
        let stop_clone = stop.try_clone()?;
        let gate = Arc::new(Mutex::new(()));
        let thread_gate = gate.clone();
        // A pool child reserved this thread ahead of time, confined (see thread_jail).
        let thread = crate::thread_jail::spawn(
            crate::thread_jail::ThreadKind::Devices,
            DEVICES_THREAD,
            move || run(epoll, stop_clone, sources, thread_gate),
        )?;
        Ok(DeviceEventLoop {
            stop,
            thread: Some(thread),
            gate,
        })
    }

    /// Blocks device processing until the guard is dropped (the thread finishes the batch it
    /// is on first). With the vCPUs paused too, nothing writes guest memory or device state.
    pub fn quiesce(&self) -> std::sync::MutexGuard<'_, ()> {
        self.gate.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Stops the thread and waits for it.
    pub fn stop(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        let _ = self.stop.write(1);
        if let Some(thread) = self.thread.take() {
            thread.join();
        }
    }
}

impl Drop for DeviceEventLoop {
    fn drop(&mut self) {
        self.shutdown();
    }
}

fn token(dev_index: usize, slot: u64) -> u64 {
    ((dev_index as u64) << 16) | slot
}

fn run(epoll: Epoll, stop: EventFd, sources: Vec<VirtioEventSource>, gate: Arc<Mutex<()>>) {
    let mut events = vec![EpollEvent::default(); 64];
    // Before the first event: every one of them is guest-driven.
    crate::thread_jail::enter(crate::thread_jail::ThreadKind::Devices);
    loop {
        let n = match epoll.wait(-1, &mut events) {
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => {
                tracing::error!("device event loop: epoll_wait failed, stopping: {e}");
                return;
            }
        };
        let _working = gate.lock().unwrap_or_else(|e| e.into_inner());
        for event in &events[..n] {
            let data = event.data();
            if data == STOP_TOKEN {
                let _ = stop.read();
                return;
            }
            let dev_index = (data >> 16) as usize;
            let slot = data & 0xffff;
            let Some(source) = sources.get(dev_index) else {
                continue;
            };
            if slot == HOST_SLOT {
                lock(&source.device).process_host_events();
            } else if let Some(evt) = source.queue_evts.get(slot as usize) {
                // Consume the notification before processing so a kick that arrives while
                // we work is not lost.
                let _ = evt.read();
                let mut dev = lock(&source.device);
                if dev.is_activated() {
                    dev.process_queue(slot as usize);
                }
            }
        }
    }
}
