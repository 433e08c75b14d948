//! The system-call allow-lists, one per kind of thread, compiled to BPF in each pool child
//! before it prepares its shell, stacked on a process-wide base list loaded at the same time
//! (see [`Programs::enter`]), so a child's threads only load ready programs.
//!
//! The lists were found by tracing the fork, pool, branch and agent tests (`strace -f`) and
//! keeping what each thread calls after its restore. Anything else is refused with
//! SECCOMP_RET_TRAP: the kernel sends SIGSYS to the thread, and [`super::report`]'s handler
//! tells the parent which call and which thread, then ends the process.
//!
//! Argument filters where the argument is the danger: `ioctl` only with KVM's requests, by
//! number on vCPU threads and by type (0xAE) on the control thread, only FIONBIO on the
//! device loop, none on the main thread; `socket` only AF_UNIX; `mmap` and `mprotect`
//! never with PROT_EXEC (no new executable memory); `fcntl` only on descriptor flags; only
//! the control thread starts threads: `clone` only with CLONE_THREAD, `clone3` (whose flags
//! a filter cannot see) answered ENOSYS so the C library falls back to `clone`;
//! `tgkill`/`kill` only to this process.

use std::collections::BTreeMap;

use forkd_vmm::thread_jail::ThreadKind;
use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};

/// Why the filters could not be built.
#[derive(Debug, thiserror::Error)]
#[error("building the seccomp filter of the {}", kind.describe())]
pub struct FilterError {
    kind: ThreadKind,
    #[source]
    source: seccompiler::BackendError,
}

/// The compiled programs of every thread kind; plain data, inherited by forked children.
#[derive(Debug, Clone)]
pub struct Programs {
    /// Makes `clone3` fail with ENOSYS (its flags are behind a pointer, out of a filter's
    /// reach); loaded process-wide, under every kind's allow-list.
    no_clone3: BpfProgram,
    /// The process-wide base: what the pool child may call at all, from right after its
    /// fork (shell, restore, lock-down, every kind of thread after it). See [`Programs::enter`].
    base: BpfProgram,
    by_kind: BTreeMap<ThreadKind, BpfProgram>,
}

impl Programs {
    /// Compiles every kind's allow-list. `pid` is the process the filters will confine (for
    /// the signal calls' argument filters): the child's own pid.
    pub fn compile(pid: libc::pid_t) -> Result<Programs, FilterError> {
        let no_clone3 = compile(
            ThreadKind::Main,
            BTreeMap::from([(libc::SYS_clone3, vec![])]),
            SeccompAction::Allow,
            SeccompAction::Errno(libc::ENOSYS as u32),
        )?;
        let mismatch = if audit_only() {
            SeccompAction::Log
        } else {
            SeccompAction::Trap
        };
        let base = compile(
            ThreadKind::Main,
            base_rules().map_err(|source| FilterError {
                kind: ThreadKind::Main,
                source,
            })?,
            mismatch.clone(),
            SeccompAction::Allow,
        )?;
        let mut by_kind = BTreeMap::new();
        for kind in ThreadKind::ALL {
            let rules = rules(kind, pid).map_err(|source| FilterError { kind, source })?;
            let program = compile(kind, rules, mismatch.clone(), SeccompAction::Allow)?;
            by_kind.insert(kind, program);
        }
        Ok(Programs {
            no_clone3,
            base,
            by_kind,
        })
    }

    /// Loads the process-wide programs into the calling thread, which must be the process's
    /// only one (every thread made later inherits them): clone3's ENOSYS and the base list.
    ///
    /// Besides refusing from the start what no thread of a child ever calls (execve, ptrace,
    /// mount, ...), the base is what makes each kind's program cheap to load on the fork
    /// path. The kernel prepares every filter it loads by running it over every system-call
    /// number (its cache of calls always allowed), which costs the program's length times the
    /// numbers still allowed by the filters already loaded: about 0.5 µs per instruction with
    /// no filter underneath, a quarter of that over the base.
    pub fn enter(&self) -> Result<(), seccompiler::Error> {
        seccompiler::apply_filter(&self.no_clone3)?;
        seccompiler::apply_filter(&self.base)
    }

    /// Confines the calling thread to `kind`'s list, stacked on the base (no_new_privs is
    /// set for it first).
    pub fn apply(&self, kind: ThreadKind) -> Result<(), seccompiler::Error> {
        seccompiler::apply_filter(&self.by_kind[&kind])
    }

    /// How many instructions `kind`'s program has (for `forkd doctor` and tests).
    pub fn len(&self, kind: ThreadKind) -> usize {
        self.by_kind[&kind].len()
    }
}

/// `FORKD_JAIL_SECCOMP=log`: refused calls are allowed and logged by the kernel's audit
/// instead (for finding what a new device model calls: run it under `strace -f` too).
fn audit_only() -> bool {
    std::env::var("FORKD_JAIL_SECCOMP").is_ok_and(|v| v == "log")
}

fn compile(
    kind: ThreadKind,
    rules: BTreeMap<i64, Vec<SeccompRule>>,
    mismatch: SeccompAction,
    matched: SeccompAction,
) -> Result<BpfProgram, FilterError> {
    let filter = SeccompFilter::new(rules, mismatch, matched, TargetArch::x86_64)
        .map_err(|source| FilterError { kind, source })?;
    BpfProgram::try_from(filter).map_err(|source| FilterError { kind, source })
}

type Rules = BTreeMap<i64, Vec<SeccompRule>>;

/// Every thread: memory, locks, time, signals' return, its own end.
const COMMON: &[i64] = &[
    libc::SYS_read,
    libc::SYS_write,
    libc::SYS_writev,
    libc::SYS_close,
    libc::SYS_futex,
    libc::SYS_munmap,
    libc::SYS_madvise,
    libc::SYS_brk,
    libc::SYS_mremap,
    libc::SYS_sched_yield,
    libc::SYS_sched_getaffinity,
    libc::SYS_clock_gettime,
    libc::SYS_clock_nanosleep,
    libc::SYS_nanosleep,
    libc::SYS_gettid,
    libc::SYS_getpid,
    libc::SYS_rt_sigreturn,
    libc::SYS_rt_sigprocmask,
    libc::SYS_sigaltstack,
    libc::SYS_restart_syscall,
    libc::SYS_exit,
    libc::SYS_exit_group,
    libc::SYS_getrandom,
    libc::SYS_rseq,
    libc::SYS_set_robust_list,
    // Dropping a socket file (the vsock listener's at teardown).
    libc::SYS_unlink,
];

/// The device event loop: queues, disk, vsock (Unix sockets), tap, rng.
const DEVICES: &[i64] = &[
    libc::SYS_epoll_wait,
    libc::SYS_epoll_ctl,
    libc::SYS_pread64,
    libc::SYS_pwrite64,
    libc::SYS_preadv,
    libc::SYS_pwritev,
    libc::SYS_readv,
    libc::SYS_lseek,
    libc::SYS_fsync,
    libc::SYS_fdatasync,
    // The overlay's block map is rewritten on a guest FLUSH: a temporary file, then rename.
    libc::SYS_openat,
    libc::SYS_rename,
    libc::SYS_renameat,
    libc::SYS_renameat2,
    libc::SYS_unlink,
    libc::SYS_unlinkat,
    libc::SYS_statx,
    libc::SYS_newfstatat,
    libc::SYS_fstat,
    libc::SYS_accept4,
    libc::SYS_connect,
    libc::SYS_sendto,
    libc::SYS_recvfrom,
    libc::SYS_shutdown,
    // vsock's retransmit timer.
    libc::SYS_timerfd_settime,
    libc::SYS_timerfd_gettime,
];

/// A vCPU: KVM_RUN and its exits (serial output to its log, irqfd/ioeventfd writes), the
/// pause kick, and the state reads a snapshot runs on it.
const VCPU: &[i64] = &[
    libc::SYS_pwrite64,
    libc::SYS_getpriority,
    libc::SYS_setpriority,
    // A guest that powers off stops the machine from its vCPU thread, which takes the
    // devices out of the event loop (seen in the lab: `poweroff -f` in a Linux child).
    libc::SYS_epoll_ctl,
    // ... and shuts the vsock device's connections down (seen next in the lab).
    libc::SYS_shutdown,
];

/// The control thread: stop, and BRANCH / pause to disk (pausing the vCPUs, reading KVM
/// state and the dirty log, writing and publishing a snapshot in the store, hashing on
/// threads of its own).
const CONTROL: &[i64] = &[
    libc::SYS_openat,
    libc::SYS_mkdir,
    libc::SYS_mkdirat,
    libc::SYS_rename,
    libc::SYS_renameat,
    libc::SYS_renameat2,
    libc::SYS_unlink,
    libc::SYS_unlinkat,
    libc::SYS_rmdir,
    libc::SYS_statx,
    libc::SYS_newfstatat,
    libc::SYS_fstat,
    libc::SYS_lseek,
    libc::SYS_getdents64,
    libc::SYS_pread64,
    libc::SYS_pwrite64,
    libc::SYS_preadv,
    libc::SYS_pwritev,
    libc::SYS_readv,
    libc::SYS_fsync,
    libc::SYS_fdatasync,
    libc::SYS_fallocate,
    libc::SYS_ftruncate,
    // A BRANCH copies the child's disk extent by extent where it cannot reflink it.
    libc::SYS_copy_file_range,
    // Requests from the parent and their replies.
    libc::SYS_recvfrom,
    libc::SYS_sendto,
];

/// The main thread after its restore: wait for the VM, tear it down, report.
const MAIN: &[i64] = &[
    // A disk's overlay map is saved when the device is dropped at teardown.
    libc::SYS_openat,
    libc::SYS_rename,
    libc::SYS_renameat,
    libc::SYS_renameat2,
    libc::SYS_fdatasync,
    libc::SYS_statx,
    libc::SYS_newfstatat,
    // The last report to the parent.
    libc::SYS_sendto,
];

/// What a pool child calls before its threads confine themselves, besides the kinds' lists:
/// preparing its shell (KVM, memory, threads), its restore (files, sockets, the tap, its
/// network namespace), the lock-down (credentials, capabilities) and loading the filters.
const BEFORE_CONFINED: &[i64] = &[
    libc::SYS_ioctl,
    libc::SYS_mmap,
    libc::SYS_mprotect,
    libc::SYS_fcntl,
    libc::SYS_tgkill,
    libc::SYS_kill,
    libc::SYS_socket,
    libc::SYS_socketpair,
    libc::SYS_bind,
    libc::SYS_listen,
    libc::SYS_getsockname,
    libc::SYS_getsockopt,
    libc::SYS_setsockopt,
    libc::SYS_sendmsg,
    libc::SYS_recvmsg,
    libc::SYS_eventfd2,
    libc::SYS_epoll_create1,
    libc::SYS_epoll_pwait,
    libc::SYS_timerfd_create,
    libc::SYS_poll,
    libc::SYS_ppoll,
    libc::SYS_pipe2,
    libc::SYS_dup,
    libc::SYS_dup3,
    libc::SYS_setns,
    libc::SYS_prctl,
    libc::SYS_seccomp,
    libc::SYS_capget,
    libc::SYS_capset,
    libc::SYS_setgroups,
    libc::SYS_setresuid,
    libc::SYS_setresgid,
    libc::SYS_getuid,
    libc::SYS_geteuid,
    libc::SYS_getgid,
    libc::SYS_getegid,
    libc::SYS_getppid,
    libc::SYS_rt_sigaction,
    libc::SYS_arch_prctl,
    libc::SYS_sched_setaffinity,
    libc::SYS_gettimeofday,
    libc::SYS_fchmod,
    libc::SYS_fchown,
    libc::SYS_readlink,
    libc::SYS_readlinkat,
    libc::SYS_getcwd,
    libc::SYS_uname,
    libc::SYS_sysinfo,
    libc::SYS_memfd_create,
];

/// The process-wide base: every kind's list and [`BEFORE_CONFINED`], each call whatever its
/// arguments (the kinds' programs, stacked on it, filter those) except `clone`, which only
/// ever starts a thread.
fn base_rules() -> Result<Rules, seccompiler::BackendError> {
    let mut rules: Rules = BTreeMap::new();
    for nr in COMMON
        .iter()
        .chain(MAIN)
        .chain(VCPU)
        .chain(DEVICES)
        .chain(CONTROL)
        .chain(BEFORE_CONFINED)
    {
        rules.insert(*nr, vec![]);
    }
    rules.insert(libc::SYS_clone, vec![clone_thread()?]);
    // Listed so the stacked no_clone3 program's ENOSYS wins over this list's trap.
    rules.insert(libc::SYS_clone3, vec![]);
    Ok(rules)
}

fn clone_thread() -> Result<SeccompRule, seccompiler::BackendError> {
    SeccompRule::new(vec![SeccompCondition::new(
        0,
        SeccompCmpArgLen::Qword,
        SeccompCmpOp::MaskedEq(libc::CLONE_THREAD as u64),
        libc::CLONE_THREAD as u64,
    )?])
}

fn rules(kind: ThreadKind, pid: libc::pid_t) -> Result<Rules, seccompiler::BackendError> {
    let mut rules: Rules = BTreeMap::new();
    let extra = match kind {
        ThreadKind::Main => MAIN,
        ThreadKind::Vcpu => VCPU,
        ThreadKind::Devices => DEVICES,
        ThreadKind::Control => CONTROL,
    };
    for nr in COMMON.iter().chain(extra) {
        rules.insert(*nr, vec![]);
    }
    rules.insert(libc::SYS_mmap, vec![no_exec(2)?]);
    rules.insert(libc::SYS_mprotect, vec![no_exec(2)?]);
    // pthread_kill (a vCPU's pause kick), raise (an abort): signals to this process only.
    rules.insert(libc::SYS_tgkill, vec![arg_eq(0, pid as u64)?]);
    rules.insert(libc::SYS_kill, vec![arg_eq(0, pid as u64)?]);
    // No rt_sigaction: no thread may replace the SIGSYS reporter (a refused call would then
    // still not run, but go unreported).
    if kind == ThreadKind::Vcpu {
        // KVM_RUN, the pause's kvmclock notice, and the state reads of a snapshot: by number.
        rules.insert(
            libc::SYS_ioctl,
            VCPU_IOCTLS
                .iter()
                .map(|&request| arg_eq(1, request))
                .collect::<Result<_, _>>()?,
        );
    }
    if kind == ThreadKind::Control {
        // Only KVM's requests (type byte 0xAE): a snapshot's dirty log, clock, irqchip and
        // PIT state, capability checks; and FICLONE, with which a BRANCH reflinks the child's
        // disk into the snapshot (between two files it already holds open).
        rules.insert(libc::SYS_ioctl, vec![kvm_ioctl()?, arg_eq(1, FICLONE)?]);
    }
    // Descriptor flags only (std checks an fd is open before closing it in debug builds,
    // sockets are made non-blocking); never F_DUPFD or locks.
    rules.insert(
        libc::SYS_fcntl,
        [libc::F_GETFD, libc::F_SETFD, libc::F_GETFL, libc::F_SETFL]
            .into_iter()
            .map(|cmd| arg_eq(1, cmd as u64))
            .collect::<Result<_, _>>()?,
    );
    if kind == ThreadKind::Devices {
        // An accepted vsock connection made non-blocking; nothing else.
        rules.insert(libc::SYS_ioctl, vec![arg_eq(1, libc::FIONBIO)?]);
        rules.insert(
            libc::SYS_socket,
            vec![SeccompRule::new(vec![SeccompCondition::new(
                0,
                SeccompCmpArgLen::Dword,
                SeccompCmpOp::Eq,
                libc::AF_UNIX as u64,
            )?])?],
        );
    }
    if kind == ThreadKind::Control {
        // Its hashing threads; never a new process.
        rules.insert(libc::SYS_clone, vec![clone_thread()?]);
    }
    if kind == ThreadKind::Control {
        // Listed so the stacked no_clone3 program's ENOSYS wins over this list's trap.
        rules.insert(libc::SYS_clone3, vec![]);
    }
    Ok(rules)
}

// The ioctl request numbers (linux/ioctl.h): direction, argument size, type, number.
const KVMIO: u64 = 0xae;
/// `_IOW(0x94, 9, int)`: clone a whole file's extents into another (reflink).
const FICLONE: u64 = 0x4004_9409;
const fn io(nr: u64) -> u64 {
    (KVMIO << 8) | nr
}
const fn ior(nr: u64, size: usize) -> u64 {
    (2 << 30) | ((size as u64) << 16) | (KVMIO << 8) | nr
}
const fn iowr(nr: u64, size: usize) -> u64 {
    (3 << 30) | ((size as u64) << 16) | (KVMIO << 8) | nr
}

/// What a vCPU thread asks of KVM after its restore.
const VCPU_IOCTLS: &[u64] = {
    use kvm_bindings::*;
    use std::mem::size_of;
    &[
        io(0x80),                                // KVM_RUN
        io(0xa3),                                // KVM_GET_TSC_KHZ
        io(0xad),                                // KVM_KVMCLOCK_CTRL
        ior(0x81, size_of::<kvm_regs>()),        // KVM_GET_REGS
        ior(0x83, size_of::<kvm_sregs>()),       // KVM_GET_SREGS
        iowr(0x88, size_of::<kvm_msrs>()),       // KVM_GET_MSRS
        ior(0x8e, size_of::<kvm_lapic_state>()), // KVM_GET_LAPIC
        iowr(0x91, size_of::<kvm_cpuid2>()),     // KVM_GET_CPUID2
        ior(0x98, size_of::<kvm_mp_state>()),    // KVM_GET_MP_STATE
        ior(0x9f, size_of::<kvm_vcpu_events>()), // KVM_GET_VCPU_EVENTS
        ior(0xa1, size_of::<kvm_debugregs>()),   // KVM_GET_DEBUGREGS
        ior(0xa4, size_of::<kvm_xsave>()),       // KVM_GET_XSAVE
        ior(0xa6, size_of::<kvm_xcrs>()),        // KVM_GET_XCRS
        ior(0xcf, size_of::<kvm_xsave>()),       // KVM_GET_XSAVE2
    ]
};

fn arg_eq(index: u8, value: u64) -> Result<SeccompRule, seccompiler::BackendError> {
    SeccompRule::new(vec![SeccompCondition::new(
        index,
        SeccompCmpArgLen::Dword,
        SeccompCmpOp::Eq,
        value,
    )?])
}

/// `prot` (argument `index`) without PROT_EXEC.
fn no_exec(index: u8) -> Result<SeccompRule, seccompiler::BackendError> {
    SeccompRule::new(vec![SeccompCondition::new(
        index,
        SeccompCmpArgLen::Dword,
        SeccompCmpOp::MaskedEq(libc::PROT_EXEC as u64),
        0,
    )?])
}

/// An ioctl request of type KVMIO (bits 8..16 of the request number).
fn kvm_ioctl() -> Result<SeccompRule, seccompiler::BackendError> {
    SeccompRule::new(vec![SeccompCondition::new(
        1,
        SeccompCmpArgLen::Dword,
        SeccompCmpOp::MaskedEq(0xff00),
        0xae00,
    )?])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vcpu_ioctl_numbers_are_the_kernels() {
        // From strace -X raw of a vCPU thread.
        assert_eq!(VCPU_IOCTLS[0], 0xae80);
        assert_eq!(VCPU_IOCTLS[3], 0x8090_ae81);
        assert_eq!(VCPU_IOCTLS[4], 0x8138_ae83);
        assert_eq!(VCPU_IOCTLS[5], 0xc008_ae88);
    }

    #[test]
    fn every_kind_compiles_and_none_allows_exec_or_ptrace() {
        let programs = Programs::compile(1234).unwrap();
        for kind in ThreadKind::ALL {
            assert!(programs.len(kind) > 10, "{kind:?}");
            let rules = rules(kind, 1234).unwrap();
            for nr in [
                libc::SYS_execve,
                libc::SYS_execveat,
                libc::SYS_ptrace,
                libc::SYS_open,
                libc::SYS_fork,
                libc::SYS_vfork,
                libc::SYS_setuid,
                libc::SYS_mount,
                libc::SYS_process_vm_writev,
            ] {
                assert!(!rules.contains_key(&nr), "{kind:?} allows {nr}");
            }
        }
    }
}
