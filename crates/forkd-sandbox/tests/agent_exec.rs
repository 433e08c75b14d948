//! The host side of driving forkd-agent in children, against the real agent served behind a
//! hybrid-vsock emulator (no Linux guest can boot on this PVM host): `restored` first, exec
//! streaming, exit codes, timeouts, unreachable or foreign peers, warm-ups, and `forkd fork
//! --exec`'s collection over a real process pool whose children each run an agent.

use std::io::{Read, Write};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use forkd_agent::protocol::Stream;
use forkd_sandbox::exec::{
    self, connect_restored_agent, exec_captured, exec_streaming, run_warmups, AgentError,
    CommandEnd, ExecSpec, Warmup, AGENT_PORT,
};
use forkd_test_support::vsock_agent::HybridVsockAgent;

const LONG: Duration = Duration::from_secs(30);

fn deadline(d: Duration) -> Instant {
    Instant::now() + d
}

fn sh(script: &str) -> ExecSpec {
    ExecSpec::shell(script, LONG)
}

fn uds_in(dir: &tempfile::TempDir) -> PathBuf {
    dir.path().join("child-0.vsock")
}

#[test]
fn restored_is_the_first_request_and_bumps_the_fork_counter() {
    let dir = tempfile::tempdir().unwrap();
    let uds = uds_in(&dir);
    let emulator = HybridVsockAgent::start(&uds, AGENT_PORT).unwrap();
    assert_eq!(emulator.agent().ping().fork_count, 0);

    let mut agent = connect_restored_agent(&uds, deadline(LONG)).unwrap();
    assert_eq!(agent.restored.fork_count, 1);
    assert_eq!(agent.restored.entropy_bytes, exec::ENTROPY_BYTES as u64);
    // The first thing this connection can see is the bumped counter.
    assert_eq!(agent.client.ping().unwrap().fork_count, 1);
    assert_eq!(emulator.agent().ping().fork_count, 1);

    // Every restore is announced once more.
    let again = connect_restored_agent(&uds, deadline(LONG)).unwrap();
    assert_eq!(again.restored.fork_count, 2);
}

#[test]
fn connecting_waits_for_an_agent_that_is_not_up_yet() {
    let dir = tempfile::tempdir().unwrap();
    let uds = uds_in(&dir);
    let later = uds.clone();
    let starter = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(300));
        HybridVsockAgent::start(&later, AGENT_PORT).unwrap()
    });
    let agent = connect_restored_agent(&uds, deadline(LONG)).unwrap();
    assert_eq!(agent.restored.fork_count, 1);
    drop(starter.join().unwrap());
}

#[test]
fn an_unreachable_agent_is_one_clear_error_after_the_deadline() {
    let dir = tempfile::tempdir().unwrap();
    let uds = uds_in(&dir);
    let err = connect_restored_agent(&uds, deadline(Duration::from_millis(200))).unwrap_err();
    assert!(matches!(err, AgentError::Unreachable { .. }), "{err}");
    let text = err.to_string();
    assert!(text.contains("no forkd-agent reachable"), "{text}");
    assert!(text.contains(&uds.display().to_string()), "{text}");
    assert!(text.contains("vsock port 1024"), "{text}");
    assert_eq!(text.lines().count(), 1, "{text}");

    // Something listens, but not on the agent's port: the VMM closes such connections.
    let _other = HybridVsockAgent::start(&uds, 4000).unwrap();
    let err = connect_restored_agent(&uds, deadline(Duration::from_millis(200))).unwrap_err();
    assert!(matches!(err, AgentError::Unreachable { .. }), "{err}");
    assert!(err.to_string().contains("nothing listens"), "{err}");
}

/// A peer that completes the hybrid-vsock handshake and then behaves as `reply` says.
fn fake_guest(uds: &Path, reply: Option<&'static [u8]>) -> Arc<AtomicBool> {
    let listener = UnixListener::bind(uds).unwrap();
    let done = Arc::new(AtomicBool::new(false));
    let flag = done.clone();
    std::thread::spawn(move || {
        let mut kept = Vec::new();
        for conn in listener.incoming() {
            if flag.load(Ordering::SeqCst) {
                return;
            }
            let Ok(mut conn) = conn else { continue };
            let mut byte = [0u8; 1];
            while conn.read(&mut byte).unwrap_or(0) == 1 && byte[0] != b'\n' {}
            let _ = conn.write_all(b"OK 1073741824\n");
            if let Some(reply) = reply {
                let _ = conn.write_all(reply);
            }
            kept.push(conn); // silent peers keep the connection open
        }
    });
    done
}

#[test]
fn a_guest_that_is_not_the_agent_is_named_as_such() {
    let dir = tempfile::tempdir().unwrap();
    let uds = uds_in(&dir);
    // What the demo guest answers on port 1024 to anything it does not understand.
    let _guest = fake_guest(&uds, Some(b"ERROR unknown request\n"));
    let err = connect_restored_agent(&uds, deadline(LONG)).unwrap_err();
    assert!(matches!(err, AgentError::NotAnAgent { .. }), "{err}");
    assert!(
        err.to_string()
            .contains("does not speak the forkd-agent protocol"),
        "{err}"
    );
}

#[test]
fn a_silent_guest_times_out_with_a_hint() {
    let dir = tempfile::tempdir().unwrap();
    let uds = uds_in(&dir);
    let _guest = fake_guest(&uds, None);
    let err = connect_restored_agent(&uds, deadline(Duration::from_millis(300))).unwrap_err();
    assert!(matches!(err, AgentError::Unreachable { .. }), "{err}");
    assert!(err.to_string().contains("nothing answered"), "{err}");
}

#[test]
fn exec_streams_output_as_it_is_produced_and_reports_the_exit_code() {
    let dir = tempfile::tempdir().unwrap();
    let uds = uds_in(&dir);
    let _emulator = HybridVsockAgent::start(&uds, AGENT_PORT).unwrap();
    let mut agent = connect_restored_agent(&uds, deadline(LONG)).unwrap();
    // The command only finishes once the host has seen its first line: without streaming it
    // would hang until its timeout.
    let flag = dir.path().join("seen-first");
    let script = format!(
        "echo first; echo warn >&2; while [ ! -e {f} ]; do sleep 0.01; done; echo second; exit 3",
        f = flag.display()
    );
    let mut chunks: Vec<(Stream, String)> = Vec::new();
    let result = exec_streaming(&mut agent, &sh(&script), |stream, data| {
        let text = String::from_utf8_lossy(data).into_owned();
        if stream == Stream::Stdout && text.contains("first") {
            std::fs::write(&flag, b"")?;
        }
        chunks.push((stream, text));
        Ok(())
    })
    .unwrap();
    assert!(!result.timed_out);
    assert_eq!(CommandEnd::of(&result, None), CommandEnd::Exited(3));
    let stdout: String = chunks
        .iter()
        .filter(|(s, _)| *s == Stream::Stdout)
        .map(|(_, t)| t.as_str())
        .collect();
    let stderr: String = chunks
        .iter()
        .filter(|(s, _)| *s == Stream::Stderr)
        .map(|(_, t)| t.as_str())
        .collect();
    assert_eq!(stdout, "first\nsecond\n");
    assert_eq!(stderr, "warn\n");

    // The connection stays usable for the next command.
    let ok = exec_captured(&mut agent, &sh("echo again"), 1024).unwrap();
    assert!(ok.succeeded());
    assert_eq!(ok.stdout, "again\n");
}

#[test]
fn exit_codes_signals_env_and_cwd() {
    let dir = tempfile::tempdir().unwrap();
    let uds = uds_in(&dir);
    let _emulator = HybridVsockAgent::start(&uds, AGENT_PORT).unwrap();
    let mut agent = connect_restored_agent(&uds, deadline(LONG)).unwrap();

    let killed = exec_captured(&mut agent, &sh("kill -9 $$"), 1024).unwrap();
    assert_eq!(killed.signal, Some(9));
    assert_eq!(killed.end(), CommandEnd::Signalled(9));
    assert!(!killed.succeeded());

    let spec = ExecSpec {
        env: vec![("FORKD_GREETING".into(), "hello there".into())],
        cwd: Some(dir.path().display().to_string()),
        ..sh("echo \"$FORKD_GREETING\"; pwd")
    };
    let out = exec_captured(&mut agent, &spec, 4096).unwrap();
    assert!(out.succeeded(), "{out:?}");
    assert_eq!(
        out.stdout,
        format!("hello there\n{}\n", dir.path().display())
    );

    // A relative working directory is refused before anything reaches the agent.
    let relative = ExecSpec {
        cwd: Some("tmp".into()),
        ..sh("true")
    };
    let err = exec_captured(&mut agent, &relative, 16).unwrap_err();
    assert!(matches!(err, AgentError::InvalidSpec { .. }), "{err}");
    assert!(
        forkd_store::error_chain(&err).contains("\"tmp\" is not an absolute path"),
        "{err}"
    );
}

#[test]
fn a_command_past_its_timeout_is_killed_and_reported() {
    let dir = tempfile::tempdir().unwrap();
    let uds = uds_in(&dir);
    let _emulator = HybridVsockAgent::start(&uds, AGENT_PORT).unwrap();
    let mut agent = connect_restored_agent(&uds, deadline(LONG)).unwrap();
    let spec = ExecSpec {
        timeout: Some(Duration::from_millis(200)),
        ..sh("echo started; sleep 30")
    };
    let out = exec_captured(&mut agent, &spec, 1024).unwrap();
    assert!(out.timed_out);
    assert_eq!(out.stdout, "started\n");
    let end = CommandEnd::of(&out.result(), spec.timeout);
    assert!(end.to_string().contains("timed out after 0.2 s"), "{end}");
}

#[test]
fn captured_output_keeps_the_start_and_counts_the_rest() {
    let dir = tempfile::tempdir().unwrap();
    let uds = uds_in(&dir);
    let _emulator = HybridVsockAgent::start(&uds, AGENT_PORT).unwrap();
    let mut agent = connect_restored_agent(&uds, deadline(LONG)).unwrap();
    let out = exec_captured(
        &mut agent,
        &sh("head -c 300000 /dev/zero | tr '\\0' a; echo oops >&2"),
        1000,
    )
    .unwrap();
    assert!(out.succeeded());
    assert_eq!(out.stdout, "a".repeat(1000));
    assert_eq!(out.stdout_bytes, 300_000);
    assert_eq!(out.stderr, "oops\n");
}

#[test]
fn warmups_run_in_order_and_the_first_failure_is_the_error() {
    let dir = tempfile::tempdir().unwrap();
    let uds = uds_in(&dir);
    let emulator = HybridVsockAgent::start(&uds, AGENT_PORT).unwrap();
    let marker = dir.path().join("warm");
    let steps = [
        Warmup::Shell(format!("echo one > {}", marker.display())),
        Warmup::Shell(format!("echo two >> {}", marker.display())),
    ];
    run_warmups(&uds, &steps, LONG).unwrap();
    assert_eq!(std::fs::read_to_string(&marker).unwrap(), "one\ntwo\n");
    // A booted guest is not restored: warm-ups never bump the fork counter.
    assert_eq!(emulator.agent().ping().fork_count, 0);

    let err = run_warmups(
        &uds,
        &[
            Warmup::Shell("echo nearly >&2; exit 3".into()),
            Warmup::Shell(format!("echo never > {}", marker.display())),
        ],
        LONG,
    )
    .unwrap_err();
    let err = forkd_store::error_chain(&err);
    assert!(
        err.contains("warm-up command \"echo nearly >&2; exit 3\" failed: exit code 3"),
        "{err}"
    );
    assert!(err.contains("nearly"), "{err}");
    assert_eq!(std::fs::read_to_string(&marker).unwrap(), "one\ntwo\n");

    let err = run_warmups(
        &uds,
        &[Warmup::Shell("sleep 30".into())],
        Duration::from_millis(300),
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("timed out after 0.3 s"), "{err}");

    // This agent has no interpreter: eval warm-ups fail with the agent's reason.
    let err = run_warmups(&uds, &[Warmup::Eval("import numpy".into())], LONG).unwrap_err();
    let err = forkd_store::error_chain(&err);
    assert!(err.contains("warm-up eval \"import numpy\""), "{err}");
    assert!(err.contains("eval_unavailable"), "{err}");
}

#[test]
fn warmups_against_no_agent_fail_after_their_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let uds = uds_in(&dir);
    let err = run_warmups(
        &uds,
        &[Warmup::Shell("true".into())],
        Duration::from_millis(200),
    )
    .unwrap_err();
    let err = forkd_store::error_chain(&err);
    assert!(
        err.starts_with("warm-up: no forkd-agent reachable"),
        "{err}"
    );
    assert!(run_warmups(&uds, &[], Duration::from_millis(1)).is_ok());
}
