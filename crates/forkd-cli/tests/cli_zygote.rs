//! `forkd __zygote`, the per-snapshot process the daemon starts sandboxes through: a real
//! zygote process with demo-guest sandboxes, driven over its socket as the daemon does.

mod common;

use std::path::Path;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use common::{forkd_command, snapshot_demo};
use forkd_sandbox::fork::ask_counter;
use forkd_sandbox::zygote::{
    SandboxInfo, ZygoteClient, ZygoteClientError, ZygoteReply, ZygoteRequest,
};
use forkd_test_support::kvm_available;

const T: Duration = Duration::from_secs(30);

struct Zygote(Child);

impl Drop for Zygote {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn spawn(client: &mut ZygoteClient, ids: &[&str]) -> Vec<SandboxInfo> {
    let ids = ids.iter().map(|s| s.to_string()).collect();
    match client
        .call(&ZygoteRequest::Spawn {
            ids,
            cgroups: Default::default(),
            records: Default::default(),
            nets: Default::default(),
        })
        .unwrap()
    {
        ZygoteReply::Spawned { started, failed } => {
            assert!(failed.is_empty(), "{failed:?}");
            started
        }
        other => panic!("{other:?}"),
    }
}

fn list(client: &mut ZygoteClient) -> Vec<String> {
    match client.call(&ZygoteRequest::List).unwrap() {
        ZygoteReply::List { sandboxes, .. } => sandboxes.into_iter().map(|s| s.id).collect(),
        other => panic!("{other:?}"),
    }
}

fn answers(sandbox: &SandboxInfo) -> bool {
    ask_counter(&sandbox.vsock_uds, &sandbox.id, Instant::now() + T).is_ok()
}

fn alive(pid: i32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

#[test]
fn a_zygote_starts_lists_and_stops_sandboxes_and_outlives_its_client() {
    if !kvm_available("a_zygote_starts_lists_and_stops_sandboxes_and_outlives_its_client") {
        return;
    }
    let home = tempfile::tempdir().unwrap();
    let h = home.path();
    snapshot_demo(h, "demo");
    let socket = h.join("zygote.sock");
    let run = h.join("sandboxes");
    let zygote = Zygote(
        forkd_command(h)
            .args(["__zygote", "--tag", "demo", "--warm", "2", "--socket"])
            .arg(&socket)
            .arg("--run-dir")
            .arg(&run)
            .stdout(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let mut client = ZygoteClient::connect(&socket, T).unwrap();

    // Three sandboxes from two warm shells: the zygote prepares the third on demand.
    let started = spawn(&mut client, &["a", "b", "c"]);
    assert_eq!(started.len(), 3);
    for s in &started {
        assert!(
            answers(s),
            "sandbox {} answers on its own vsock socket",
            s.id
        );
        assert!(s.restore_ms > 0.0 && alive(s.pid));
        assert!(s.vsock_uds.starts_with(run.join(&s.id)));
    }
    let pids: std::collections::HashSet<i32> = started.iter().map(|s| s.pid).collect();
    assert_eq!(pids.len(), 3, "each sandbox is its own process");

    // Ids are the caller's: a duplicate or one that is not a plain name is refused.
    for bad in [vec!["a"], vec!["d", "d"], vec!["../x"]] {
        let ids = bad.iter().map(|s| s.to_string()).collect();
        match client.call(&ZygoteRequest::Spawn {
            ids,
            cgroups: Default::default(),
            records: Default::default(),
            nets: Default::default(),
        }) {
            Err(ZygoteClientError::Refused(message)) => assert!(!message.is_empty()),
            other => panic!("{bad:?}: {other:?}"),
        }
    }

    // Stopping one leaves the others; its process and files are gone.
    let b = started.iter().find(|s| s.id == "b").unwrap();
    match client
        .call(&ZygoteRequest::Stop { id: "b".into() })
        .unwrap()
    {
        ZygoteReply::Stopped { outcome, clean, .. } => {
            assert!(clean, "{outcome}");
            assert_eq!(outcome, "stopped on request");
        }
        other => panic!("{other:?}"),
    }
    assert!(!alive(b.pid) && !run.join("b").exists());
    assert!(matches!(
        client.call(&ZygoteRequest::Stop { id: "b".into() }),
        Err(ZygoteClientError::Refused(_))
    ));

    // The client goes away (a daemon restarting); the sandboxes do not.
    drop(client);
    let mut client = ZygoteClient::connect(&socket, T).unwrap();
    assert_eq!(list(&mut client), ["a", "c"]);
    assert!(started.iter().filter(|s| s.id != "b").all(answers));

    // Shutdown stops every sandbox, removes their files and the socket, and exits.
    assert_eq!(
        client.call(&ZygoteRequest::Shutdown).unwrap(),
        ZygoteReply::ShuttingDown
    );
    let mut zygote = zygote;
    let deadline = Instant::now() + T;
    while zygote.0.try_wait().unwrap().is_none() {
        assert!(Instant::now() < deadline, "the zygote did not exit");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(
        started.iter().all(|s| !alive(s.pid)),
        "no sandbox outlives the shutdown"
    );
    assert!(!socket.exists());
    assert_eq!(
        std::fs::read_dir(&run).unwrap().count(),
        0,
        "no sandbox files left"
    );
}
