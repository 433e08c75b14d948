//! Where a jailed process's threads confine themselves.
//!
//! A seccomp filter belongs to one thread (a thread inherits its creator's at creation, and
//! nothing installs one in another thread afterwards), and the VMM's threads are created at
//! different times: the vCPU threads when a pool prepares a shell, the device event loop
//! during a restore, the sandbox's control thread after it. So each thread confines itself:
//! it calls [`enter`] with its kind at the point where it starts doing guest-driven work (a
//! vCPU before its first KVM_RUN, the device loop before its first event), and the hook the
//! process registered with [`set_hook`] (the sandbox manager's jail) installs that kind's
//! filter. In a process without a hook (the CLI booting a VM, tests) `enter` does nothing.

use std::sync::OnceLock;

/// What a thread of a VMM process does; each kind has its own system-call allow-list.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ThreadKind {
    /// The process's main thread: restores, then waits for the VM to stop and tears it down.
    Main,
    /// A vCPU thread: KVM_RUN and the device models its exits reach (serial, MMIO registers).
    Vcpu,
    /// The device event loop: virtio queues and their host backends (disk, vsock, tap, rng).
    Devices,
    /// The sandbox's control thread: stop and snapshot (BRANCH, pause) requests.
    Control,
}

impl ThreadKind {
    pub const ALL: [ThreadKind; 4] = [
        ThreadKind::Main,
        ThreadKind::Vcpu,
        ThreadKind::Devices,
        ThreadKind::Control,
    ];

    /// How a report names the thread ("from the vCPU thread").
    pub fn describe(self) -> &'static str {
        match self {
            ThreadKind::Main => "main thread",
            ThreadKind::Vcpu => "vCPU thread",
            ThreadKind::Devices => "device event-loop thread",
            ThreadKind::Control => "control thread",
        }
    }

    /// A short stable name (in messages between processes).
    pub fn name(self) -> &'static str {
        match self {
            ThreadKind::Main => "main",
            ThreadKind::Vcpu => "vcpu",
            ThreadKind::Devices => "devices",
            ThreadKind::Control => "control",
        }
    }

    pub fn from_name(name: &str) -> Option<ThreadKind> {
        ThreadKind::ALL.into_iter().find(|k| k.name() == name)
    }
}

type Hook = Box<dyn Fn(ThreadKind) + Send + Sync>;

static HOOK: OnceLock<Hook> = OnceLock::new();

/// Registers the process's confinement hook (once per process; false if one was set already).
/// Set it before any thread that calls [`enter`] reaches that call.
pub fn set_hook(hook: impl Fn(ThreadKind) + Send + Sync + 'static) -> bool {
    HOOK.set(Box::new(hook)).is_ok()
}

/// The calling thread, of `kind`, is about to do guest-driven work: confine it (when the
/// process has a hook). The hook may block until the process-wide part of its jail is done.
pub fn enter(kind: ThreadKind) {
    if let Some(hook) = HOOK.get() {
        hook(kind);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_round_trip_by_name() {
        for kind in ThreadKind::ALL {
            assert_eq!(ThreadKind::from_name(kind.name()), Some(kind));
        }
        assert_eq!(ThreadKind::from_name("gpu"), None);
        assert_eq!(ThreadKind::Vcpu.describe(), "vCPU thread");
    }
}
