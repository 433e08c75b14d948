//! `scripts/lab.sh`, the Linux lab: its refusals of bad arguments, and — where QEMU and the L1
//! kernel can be had (`scripts/lab.sh --prepare`) — a real L1 boot that runs a command with
//! AMD-V, returns its exit status and output, ends a hung command at its timeout, names an
//! L1 kernel panic, and stops a wedged L1 to run its session again. One L1 at a time, each small (the lab's real work is in linux_e2e).

use std::path::PathBuf;
use std::process::{Command, Output};
use std::sync::{Mutex, OnceLock};

use forkd_test_support::skip;

static ONE_LAB: Mutex<()> = Mutex::new(());

fn lab_script() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../scripts/lab.sh")
}

fn lab(args: &[&str]) -> Output {
    Command::new("bash")
        .arg(lab_script())
        .args(args)
        .env("FORKD_LAB_PROBE", "passed through")
        .output()
        .expect("run scripts/lab.sh")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// True once `lab.sh --prepare` succeeded; otherwise prints the SKIP line for `test`.
fn lab_ready(test: &str) -> bool {
    static PREPARED: OnceLock<Result<(), String>> = OnceLock::new();
    let prepared = PREPARED.get_or_init(|| {
        let out = lab(&["--prepare"]);
        if out.status.success() {
            Ok(())
        } else {
            let err = text(&out.stderr);
            Err(err.lines().last().unwrap_or("no output").to_string())
        }
    });
    match prepared {
        Ok(()) => true,
        Err(why) => {
            skip(test, format!("the lab cannot start here: {why}"));
            false
        }
    }
}

#[test]
fn bad_arguments_are_refused_before_anything_starts() {
    for (args, wanted) in [
        (
            &["--cpus", "0", "--", "true"][..],
            "--cpus wants a positive number, got '0'",
        ),
        (
            &["--mem-mib", "lots", "--", "true"][..],
            "--mem-mib wants a positive number",
        ),
        (
            &["--share", "/nonexistent/forkd-lab", "--", "true"][..],
            "--share /nonexistent/forkd-lab: not a directory",
        ),
        (
            &["--frobnicate", "--", "true"][..],
            "unexpected argument '--frobnicate'",
        ),
    ] {
        let out = lab(args);
        assert_eq!(
            out.status.code(),
            Some(2),
            "{args:?}: {}",
            text(&out.stderr)
        );
        let err = text(&out.stderr);
        assert!(err.contains(wanted), "{args:?}: {err}");
        assert_eq!(err.lines().count(), 1, "{args:?}: {err}");
    }
    // No command: the usage, and still exit 2.
    let out = lab(&[]);
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out.stderr).contains("scripts/lab.sh [--mem-mib N]"));
}

#[test]
fn a_command_runs_with_amd_v_and_its_status_and_output_come_back() {
    let test = "a_command_runs_with_amd_v_and_its_status_and_output_come_back";
    let _one = ONE_LAB.lock().unwrap_or_else(|p| p.into_inner());
    if !lab_ready(test) {
        return;
    }
    // /dev/kvm is there and the CPU has svm; the environment is passed through; TMPDIR is the
    // scratch disk (ext4), not L1's RAM; the current directory is the host's (even under /tmp);
    // stdout is a pipe, not a terminal.
    let probe = r#"
        test -c /dev/kvm || { echo "no /dev/kvm" >&2; exit 90; }
        grep -qw svm /proc/cpuinfo || { echo "no svm" >&2; exit 91; }
        [ "$FORKD_LAB_PROBE" = "passed through" ] || { echo "env not passed" >&2; exit 92; }
        [ "$FORKD_IN_LAB" = 1 ] || { echo "FORKD_IN_LAB unset" >&2; exit 93; }
        [ "$(stat -f -c %T "$TMPDIR")" = ext2/ext3 ] || { echo "TMPDIR is $(stat -f -c %T "$TMPDIR")" >&2; exit 94; }
        [ ! -t 1 ] || { echo "stdout is a terminal" >&2; exit 95; }
        [ "$PWD" = "$FORKD_TEST_HOST_PWD" ] || { echo "cwd is $PWD" >&2; exit 96; }
        [ -e /dev/fd/1 ] || { echo "no /dev/fd" >&2; exit 97; }
        echo to-stdout; echo to-stderr >&2; exit 7"#;
    let host_pwd = std::env::current_dir().unwrap();
    let out = Command::new("bash")
        .arg(lab_script())
        .args([
            "--mem-mib",
            "2048",
            "--timeout",
            "600",
            "--",
            "sh",
            "-c",
            probe,
        ])
        .env("FORKD_LAB_PROBE", "passed through")
        .env("FORKD_TEST_HOST_PWD", &host_pwd)
        .output()
        .unwrap();
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(7), "{err}");
    assert_eq!(text(&out.stdout), "to-stdout\n", "{err}");
    assert!(err.contains("to-stderr\n"), "{err}");
}

#[test]
fn a_hung_command_ends_at_the_timeout_with_124() {
    let test = "a_hung_command_ends_at_the_timeout_with_124";
    let _one = ONE_LAB.lock().unwrap_or_else(|p| p.into_inner());
    if !lab_ready(test) {
        return;
    }
    let out = lab(&["--mem-mib", "1024", "--timeout", "20", "--", "sleep", "600"]);
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(124), "{err}");
    assert!(err.contains("the command timed out after 20 s"), "{err}");
}

#[test]
fn an_l1_kernel_panic_is_named_and_exits_125() {
    let test = "an_l1_kernel_panic_is_named_and_exits_125";
    let _one = ONE_LAB.lock().unwrap_or_else(|p| p.into_inner());
    if !lab_ready(test) {
        return;
    }
    let out = lab(&[
        "--mem-mib",
        "1024",
        "--timeout",
        "300",
        "--",
        "sh",
        "-c",
        "echo c > /proc/sysrq-trigger; sleep 600",
    ]);
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(125), "{err}");
    let last = err.lines().last().unwrap_or_default();
    assert!(
        last.starts_with("lab: L1 kernel panic: Kernel panic - not syncing: sysrq triggered crash"),
        "{err}"
    );
}

/// The command's first session stops L1's heartbeat (as a wedged L1 would) and hangs; the lab
/// stops QEMU and runs the session again, where the command sees the marker it left in the
/// shared directory and finishes.
#[test]
fn a_wedged_l1_is_stopped_and_the_session_runs_again() {
    let test = "a_wedged_l1_is_stopped_and_the_session_runs_again";
    let _one = ONE_LAB.lock().unwrap_or_else(|p| p.into_inner());
    if !lab_ready(test) {
        return;
    }
    let wedge_once = r#"
        if [ ! -e "$LAB_SHARE/wedged-once" ]; then
            touch "$LAB_SHARE/wedged-once"
            pkill -STOP -x sleep
            exec python3 -c 'import time; time.sleep(600)'
        fi
        echo second session; exit 7"#;
    let run = |retries: &str| {
        Command::new("bash")
            .arg(lab_script())
            .args(["--mem-mib", "1024", "--timeout", "400", "--"])
            .args(["sh", "-c", wedge_once])
            .env("FORKD_LAB_WEDGE_SECS", "20")
            .env("FORKD_LAB_WEDGE_RETRIES", retries)
            .output()
            .unwrap()
    };
    let out = run("1");
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(7), "{err}");
    assert_eq!(text(&out.stdout), "second session\n", "{err}");
    assert!(
        err.contains("lab: L1 wedged: no heartbeat for 20 s"),
        "{err}"
    );
    assert!(err.contains("running the session again (1 of 1)"), "{err}");

    // Without a retry left, the wedge is the lab's failure.
    let out = run("0");
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(125), "{err}");
    assert!(err.contains("L1 wedged 1 time(s); giving up"), "{err}");
}
