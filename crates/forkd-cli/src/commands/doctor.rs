//! `forkd doctor`: one line per check of what forkd needs from this host.

use std::ffi::CString;
use std::fs::OpenOptions;
use std::path::Path;
use std::process::ExitCode;

use anyhow::Result;
use clap::Args;
use forkd_store::{sparse, Store};
use forkd_vmm::host::{self, KvmFlavour};
use kvm_ioctls::Kvm;
use serde::Serialize;

use crate::output::{human_bytes, print_json};

#[derive(Args)]
pub struct DoctorArgs {
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "UPPERCASE")]
enum Status {
    Pass,
    Warn,
    Fail,
}

#[derive(Serialize)]
struct Check {
    name: String,
    status: Status,
    detail: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    hint: String,
}

fn check(name: &str, status: Status, detail: impl Into<String>, hint: impl Into<String>) -> Check {
    Check {
        name: name.to_string(),
        status,
        detail: detail.into(),
        hint: hint.into(),
    }
}

/// Below this much free space a snapshot of a warmed runtime may not fit.
const LOW_SPACE_BYTES: u64 = 4 << 30;

pub fn run(args: DoctorArgs) -> Result<ExitCode> {
    let mut checks = vec![check_os()];
    checks.extend(check_kvm());
    checks.extend(check_data_dir(&Store::default_root()));
    checks.push(check_userfaultfd());
    checks.push(check_cgroup());
    checks.extend(check_jail());
    checks.push(check_tun());
    checks.push(check_guest_kernel());
    let ok = checks.iter().all(|c| c.status != Status::Fail);
    if args.json {
        print_json(&serde_json::json!({ "ok": ok, "checks": checks }))?;
    } else {
        for c in &checks {
            let status = format!("{:?}", c.status).to_uppercase();
            let hint = if c.hint.is_empty() {
                String::new()
            } else {
                format!(" (hint: {})", c.hint)
            };
            println!("{status:<4}  {:<22} {}{hint}", c.name, c.detail);
        }
    }
    Ok(if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

fn check_os() -> Check {
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    if cfg!(target_os = "linux") && !release.is_empty() {
        check("os", Status::Pass, format!("Linux {}", release.trim()), "")
    } else {
        check(
            "os",
            Status::Fail,
            "not Linux",
            "forkd needs Linux with KVM",
        )
    }
}

/// Forking needs only /dev/kvm; root is needed for nothing else a plain fork does.
const KVM_ACCESS_HINT: &str = "add this user to the kvm group (sudo usermod -aG kvm $USER, then \
log in again) to fork without root; or run forkd with sudo, which keeps using your own data \
directory";

/// Why this process may open /dev/kvm: as root (perhaps under sudo), or through its groups.
fn kvm_access_via() -> String {
    if let Some(o) = forkd_store::owner::sudo_invoker() {
        return format!(
            "as root under sudo (data stays in uid {}'s directory and is handed back to them)",
            o.uid
        );
    }
    // SAFETY: geteuid(2) takes no arguments and cannot fail.
    if unsafe { libc::geteuid() } == 0 {
        return "as root".into();
    }
    "as this user (the kvm group or the device's mode allow it; no root needed to fork)".into()
}

fn check_kvm() -> Vec<Check> {
    let mut checks = Vec::new();
    if let Err(e) = OpenOptions::new()
        .read(true)
        .write(true)
        .open(host::KVM_DEVICE)
    {
        let hint = if e.kind() == std::io::ErrorKind::PermissionDenied {
            KVM_ACCESS_HINT
        } else {
            "load kvm_intel/kvm_amd (or kvm_pvm)"
        };
        checks.push(check(
            "kvm-device",
            Status::Fail,
            format!("{} does not open read-write: {e}", host::KVM_DEVICE),
            hint,
        ));
        return checks;
    }
    checks.push(check(
        "kvm-device",
        Status::Pass,
        format!("{} opens read-write {}", host::KVM_DEVICE, kvm_access_via()),
        "",
    ));
    let kvm = match Kvm::new() {
        Ok(k) => k,
        Err(e) => {
            checks.push(check(
                "kvm-api",
                Status::Fail,
                format!("opening KVM failed: {e}"),
                "",
            ));
            return checks;
        }
    };
    let api = kvm.get_api_version();
    checks.push(if api == 12 {
        check("kvm-api", Status::Pass, "KVM API version 12", "")
    } else {
        check(
            "kvm-api",
            Status::Fail,
            format!("KVM API version {api}, forkd needs 12"),
            "",
        )
    });
    let flavour = KvmFlavour::detect();
    checks.push(check_flavour(flavour));
    if flavour == KvmFlavour::Pvm {
        checks.push(check_lab(find_lab().as_deref()));
    }
    for (name, cap) in host::REQUIRED_CAPS {
        let present = kvm.check_extension(*cap);
        checks.push(if present {
            check(
                &format!("kvm-cap {name}"),
                Status::Pass,
                "supported (KVM_CHECK_EXTENSION)",
                "",
            )
        } else {
            check(
                &format!("kvm-cap {name}"),
                Status::Fail,
                "missing (KVM_CHECK_EXTENSION)",
                "a newer host kernel is needed",
            )
        });
    }
    checks.push(match host::probe_dirty_log(&kvm) {
        Ok(()) => check(
            "kvm dirty-log",
            Status::Pass,
            "dirty page logging works (KVM_GET_DIRTY_LOG)",
            "",
        ),
        Err(e) => check(
            "kvm dirty-log",
            Status::Fail,
            forkd_store::error_chain(&e),
            "diff snapshots need dirty page logging",
        ),
    });
    checks
}

fn check_flavour(flavour: KvmFlavour) -> Check {
    match flavour {
        KvmFlavour::Vmx | KvmFlavour::Svm => check(
            "kvm-flavour",
            Status::Pass,
            format!("{}: Linux guests boot", flavour.describe()),
            "",
        ),
        KvmFlavour::Pvm => check(
            "kvm-flavour",
            Status::Warn,
            format!("{}: {}", flavour.describe(), host::PVM_EXPLANATION),
            "run Linux guests in the Linux lab (next line), on a host with VT-x/AMD-V, or pass a \
             PVM-enabled kernel with --kernel",
        ),
        KvmFlavour::Unknown => check(
            "kvm-flavour",
            Status::Warn,
            flavour.describe(),
            "if guests fail with KVM internal errors, this KVM is emulating them",
        ),
    }
}

/// The Linux lab's script, relative to a forkd checkout.
const LAB_SCRIPT: &str = "scripts/lab.sh";

/// What the lab is, for the `linux-lab` line.
const LAB_DESCRIPTION: &str = "Linux guests run in the lab here: `scripts/lab.sh -- CMD` runs \
CMD inside a QEMU-TCG VM with emulated AMD-V whose /dev/kvm boots stock Linux guests";

/// The lab script of the first forkd checkout at or above the current directory or this
/// binary (a build inside the checkout), if any.
fn find_lab() -> Option<std::path::PathBuf> {
    let starts = [std::env::current_dir(), std::env::current_exe()];
    starts
        .iter()
        .flatten()
        .flat_map(|start| start.ancestors())
        .map(|dir| dir.join(LAB_SCRIPT))
        .find(|script| script.is_file())
}

/// On a PVM host: how Linux guests run here anyway (`lab`: the script found, if any).
fn check_lab(lab: Option<&Path>) -> Check {
    match lab {
        Some(script) => check(
            "linux-lab",
            Status::Pass,
            format!("{LAB_DESCRIPTION} ({})", script.display()),
            "",
        ),
        None => check(
            "linux-lab",
            Status::Warn,
            LAB_DESCRIPTION,
            format!("run it from a forkd checkout (no {LAB_SCRIPT} at or above this directory)"),
        ),
    }
}

fn check_data_dir(root: &Path) -> Vec<Check> {
    let where_ = root.display().to_string();
    if let Err(e) = std::fs::create_dir_all(root) {
        return vec![check(
            "data-dir",
            Status::Fail,
            format!("{where_}: cannot create: {e}"),
            "set FORKD_HOME to a writable directory",
        )];
    }
    let probe = root.join(format!(".doctor-probe.{}", std::process::id()));
    let writable = std::fs::write(&probe, b"probe").and_then(|_| std::fs::remove_file(&probe));
    let mut checks = vec![match writable {
        Ok(()) => check(
            "data-dir",
            Status::Pass,
            format!("{where_} is writable"),
            "",
        ),
        Err(e) => {
            return vec![check(
                "data-dir",
                Status::Fail,
                format!("{where_}: not writable: {e}"),
                "set FORKD_HOME to a writable directory",
            )]
        }
    }];
    checks.push(match free_space(root) {
        Ok(free) if free < LOW_SPACE_BYTES => check(
            "data-dir free space",
            Status::Warn,
            format!("{} free", human_bytes(free)),
            "snapshots of warmed runtimes take GiBs; free some space or move FORKD_HOME",
        ),
        Ok(free) => check(
            "data-dir free space",
            Status::Pass,
            format!("{} free", human_bytes(free)),
            "",
        ),
        Err(e) => check(
            "data-dir free space",
            Status::Warn,
            format!("statvfs failed: {e}"),
            "",
        ),
    });
    checks.push(match sparse::supports_sparse(root) {
        Ok(true) => check(
            "sparse files",
            Status::Pass,
            "holes are kept (memory images stay small on disk)",
            "",
        ),
        Ok(false) => check(
            "sparse files",
            Status::Warn,
            "this filesystem allocates holes: every snapshot costs its full memory size on disk",
            "put FORKD_HOME on ext4, XFS or btrfs",
        ),
        Err(e) => check(
            "sparse files",
            Status::Warn,
            format!("probe failed: {e}"),
            "",
        ),
    });
    checks.push(match sparse::supports_reflink(root) {
        Ok(true) => check(
            "reflink",
            Status::Pass,
            "supported: disk copies are instant clones",
            "",
        ),
        Ok(false) => check(
            "reflink",
            Status::Warn,
            "not supported here: disk copies fall back to sparse copies of the data extents",
            "XFS or btrfs make image copies instant",
        ),
        Err(e) => check("reflink", Status::Warn, format!("probe failed: {e}"), ""),
    });
    checks
}

fn free_space(path: &Path) -> std::io::Result<u64> {
    let c = CString::new(path.as_os_str().as_encoded_bytes()).map_err(std::io::Error::other)?;
    // SAFETY: statvfs is a C struct of integers, for which all-zero bytes are a valid value.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: statvfs(3) reads the NUL-terminated path (`c`, a live CString) and writes one
    // struct statvfs through the second pointer, an exclusive borrow of the local `st`.
    if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(st.f_bavail * st.f_frsize)
}

fn check_userfaultfd() -> Check {
    const UFFD_USER_MODE_ONLY: libc::c_int = 1;
    // SAFETY: userfaultfd(2) takes only a flags integer and touches no memory of ours.
    let fd = unsafe { libc::syscall(libc::SYS_userfaultfd, libc::O_CLOEXEC | UFFD_USER_MODE_ONLY) };
    if fd >= 0 {
        // SAFETY: `fd` is the descriptor the syscall just returned; nothing else owns or uses
        // it, so closing it here cannot close anyone else's file.
        unsafe { libc::close(fd as i32) };
        return check("userfaultfd", Status::Pass, "available (syscall)", "");
    }
    let syscall_err = std::io::Error::last_os_error();
    if OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/userfaultfd")
        .is_ok()
    {
        return check(
            "userfaultfd",
            Status::Pass,
            "available (/dev/userfaultfd)",
            "",
        );
    }
    check(
        "userfaultfd",
        Status::Warn,
        format!("unavailable ({syscall_err})"),
        "working-set prefetch on restore is off; set vm.unprivileged_userfaultfd=1 or run as root",
    )
}

fn check_cgroup() -> Check {
    if Path::new("/sys/fs/cgroup/cgroup.controllers").exists() {
        check("cgroup", Status::Pass, "cgroup v2 (unified hierarchy)", "")
    } else if Path::new("/sys/fs/cgroup/unified/cgroup.controllers").exists() {
        check(
            "cgroup",
            Status::Warn,
            "hybrid cgroup v1/v2: per-child resource limits need the v2 hierarchy, and KVM_CREATE_VM can be slow under v1",
            "boot with systemd.unified_cgroup_hierarchy=1",
        )
    } else {
        check(
            "cgroup",
            Status::Warn,
            "cgroup v2 not mounted",
            "mount cgroup2 on /sys/fs/cgroup",
        )
    }
}

/// The layers of each child's jail this host supports (each probed in a throwaway process).
fn check_jail() -> Vec<Check> {
    let support = forkd_sandbox::jail::probe_support(&Default::default());
    let layer = |name: &str, result: Result<String, String>, hint: &str| match result {
        Ok(detail) => check(name, Status::Pass, detail, ""),
        Err(why) => check(name, Status::Warn, format!("unavailable: {why}"), hint),
    };
    vec![
        layer(
            "jail seccomp",
            support
                .seccomp
                .map(|()| "per-thread system-call allow-lists load".into()),
            "a kernel with CONFIG_SECCOMP_FILTER",
        ),
        layer(
            "jail no-new-privs",
            support
                .no_new_privs
                .map(|()| "children cannot gain privileges; capabilities dropped".into()),
            "",
        ),
        layer(
            "jail user",
            support
                .drop_user
                .map(|(uid, gid)| format!("children started as root run as uid {uid}, gid {gid} (those that may BRANCH too: forkd adopts their snapshots into the store)")),
            "run forkd as root for children to switch to an unprivileged user",
        ),
        layer(
            "jail mount-namespace",
            support
                .mount_namespace
                .map(|()| "children see only their snapshot, run directory and /dev/kvm".into()),
            "run forkd as root (CAP_SYS_ADMIN) for a private mount view",
        ),
        layer(
            "jail cgroup",
            forkd_sandbox::cgroup::support().map(|parent| {
                format!(
                    "every child (forkd fork, run, the daemon's sandboxes) gets a cgroup v2 leaf under {}",
                    parent.display()
                )
            }),
            "children run without a cgroup leaf each: a writable (delegated) cgroup v2 hierarchy with the memory, cpu and pids controllers gives them one",
        ),
    ]
}

fn check_tun() -> Check {
    match OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/net/tun")
    {
        Ok(_) => check(
            "tun",
            Status::Pass,
            "/dev/net/tun opens read-write (guest networking)",
            "",
        ),
        Err(e) => check(
            "tun",
            Status::Warn,
            format!("/dev/net/tun: {e}"),
            "guest networking (virtio-net) needs the tun module: modprobe tun",
        ),
    }
}

fn check_guest_kernel() -> Check {
    let root = forkd_image::cache::cache_root();
    match forkd_image::kernel::status(&root) {
        Ok(status) => match status.current() {
            Some(k) => check("guest kernel", Status::Pass, format!("{} (initramfs {})", k.vmlinuz.display(), k.initramfs.display()), ""),
            None => check(
                "guest kernel",
                Status::Warn,
                format!("no guest kernel in {}", status.cache_dir.display()),
                "`forkd kernel fetch` gets Debian's cloud kernel and builds its initramfs (Linux guests also need VT-x/AMD-V)",
            ),
        },
        Err(e) => check("guest kernel", Status::Warn, format!("cannot read the kernel cache: {e}"), ""),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn on_pvm_the_flavour_line_points_at_the_lab_and_the_lab_line_says_what_it_is() {
        let flavour = check_flavour(KvmFlavour::Pvm);
        assert_eq!(flavour.status, Status::Warn);
        assert!(flavour.detail.contains("stock Linux kernel cannot boot"));
        assert!(
            flavour.hint.contains("Linux lab (next line)"),
            "{}",
            flavour.hint
        );

        let found = check_lab(Some(Path::new("/src/forkd/scripts/lab.sh")));
        assert_eq!(
            (found.name.as_str(), found.status),
            ("linux-lab", Status::Pass)
        );
        for needle in [
            "`scripts/lab.sh -- CMD` runs CMD inside a QEMU-TCG VM with emulated AMD-V",
            "whose /dev/kvm boots stock Linux guests",
            "(/src/forkd/scripts/lab.sh)",
        ] {
            assert!(found.detail.contains(needle), "{}", found.detail);
        }
        let missing = check_lab(None);
        assert_eq!(missing.status, Status::Warn);
        assert!(missing.detail.contains("scripts/lab.sh -- CMD"));
        assert!(missing.hint.contains("forkd checkout"), "{}", missing.hint);
    }

    #[test]
    fn hardware_hosts_boot_linux_directly() {
        let line = check_flavour(KvmFlavour::Svm);
        assert_eq!(line.status, Status::Pass);
        assert!(line.detail.contains("Linux guests boot"));
    }
}
