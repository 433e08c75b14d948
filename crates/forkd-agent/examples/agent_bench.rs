//! Agent latency and throughput on this host, each against a baseline measured in the same run:
//!
//! - `ping` round trip vs a bare Unix-socket echo round trip (protocol + dispatch overhead);
//! - `exec true` through the agent vs spawning `true` directly (agent overhead per command);
//! - `eval 1+1` vs `ping` (cost of the interpreter hop), when python3 is present;
//! - 64 MiB of `cat` output through the agent vs `cat` into a local pipe.
//!
//! Run: `cargo run -p forkd-agent --example agent_bench [ROUNDS]` (default 200).

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::process::{Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use forkd_agent::client::{AgentClient, ExecBuilder};
use forkd_agent::server::{Agent, AgentConfig, EvalConfig};

fn stats(name: &str, mut samples: Vec<Duration>) -> Duration {
    samples.sort();
    let median = samples[samples.len() / 2];
    let p99 = samples[(samples.len() * 99 / 100).min(samples.len() - 1)];
    println!(
        "{name:<28} n={:<5} median {:>9.1} µs   p99 {:>9.1} µs",
        samples.len(),
        median.as_secs_f64() * 1e6,
        p99.as_secs_f64() * 1e6
    );
    median
}

fn ratio(what: &str, value: Duration, baseline: Duration) {
    println!(
        "  ratio {what}: {:.2}x",
        value.as_secs_f64() / baseline.as_secs_f64()
    );
}

fn time_n(rounds: usize, mut f: impl FnMut()) -> Vec<Duration> {
    (0..rounds)
        .map(|_| {
            let start = Instant::now();
            f();
            start.elapsed()
        })
        .collect()
}

fn main() {
    let rounds: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(200);
    let dir = tempfile::tempdir().expect("temp dir");
    let python = Command::new("python3")
        .arg("-c")
        .arg("pass")
        .status()
        .is_ok_and(|s| s.success());
    let agent = Agent::new(AgentConfig {
        eval: python.then(|| EvalConfig {
            interpreter: vec!["python3".into()],
            warmup: None,
            warmup_timeout: None,
        }),
        set_clock: false,
        resolv_conf: None,
    });
    let socket = dir.path().join("agent.sock");
    let listener = UnixListener::bind(&socket).expect("bind agent socket");
    thread::spawn(move || agent.serve_unix(listener));
    let mut client = AgentClient::new(UnixStream::connect(&socket).expect("connect"));

    // Baseline: a bare echo server on a Unix socket, same message size as a ping frame.
    let echo_path = dir.path().join("echo.sock");
    let echo = UnixListener::bind(&echo_path).expect("bind echo socket");
    thread::spawn(move || {
        let (mut s, _) = echo.accept().expect("accept");
        let mut buf = [0u8; 48];
        while s.read_exact(&mut buf).is_ok() && s.write_all(&buf).is_ok() {}
    });
    let mut echo_client = UnixStream::connect(&echo_path).expect("connect echo");
    let mut buf = [0u8; 48];
    let echo_median = stats(
        "unix echo (baseline)",
        time_n(rounds, || {
            echo_client.write_all(&buf).unwrap();
            echo_client.read_exact(&mut buf).unwrap();
        }),
    );
    let ping_median = stats(
        "agent ping",
        time_n(rounds, || drop(client.ping().unwrap())),
    );
    ratio("ping / echo", ping_median, echo_median);

    let stat_median = stats(
        "agent file_stat /",
        time_n(rounds, || drop(client.stat("/").unwrap())),
    );
    ratio(
        "file_stat (worker thread) / ping (inline)",
        stat_median,
        ping_median,
    );

    let spawn_rounds = (rounds / 4).max(10);
    let direct = stats(
        "spawn true (baseline)",
        time_n(spawn_rounds, || {
            Command::new("true")
                .stdout(Stdio::piped())
                .output()
                .unwrap();
        }),
    );
    let request = ExecBuilder::new(["true"]).build();
    let exec_median = stats(
        "agent exec true",
        time_n(spawn_rounds, || drop(client.exec(&request, b"").unwrap())),
    );
    ratio("exec / spawn", exec_median, direct);

    if python {
        client.eval("1", None).unwrap();
        let eval_median = stats(
            "agent eval 1+1",
            time_n(rounds, || drop(client.eval("1+1", None).unwrap())),
        );
        ratio("eval / file_stat", eval_median, stat_median);
    } else {
        println!("eval: skipped, python3 is not installed");
    }

    let big = dir.path().join("big");
    std::fs::write(&big, vec![0x5au8; 64 << 20]).unwrap();
    let through = |f: &mut dyn FnMut()| {
        let runs = time_n(5, f);
        stats("", runs)
    };
    print!("cat 64 MiB local pipe:");
    let local = through(&mut || {
        let out = Command::new("cat").arg(&big).output().unwrap();
        assert_eq!(out.stdout.len(), 64 << 20);
    });
    print!("cat 64 MiB via agent: ");
    let request = ExecBuilder::new(["cat", big.to_str().unwrap()]).build();
    let via_agent = through(&mut || {
        let out = client.exec(&request, b"").unwrap();
        assert_eq!(out.stdout.len(), 64 << 20);
    });
    println!(
        "  throughput: local {:.0} MiB/s, agent {:.0} MiB/s; ratio agent/local time {:.2}x",
        64.0 / local.as_secs_f64(),
        64.0 / via_agent.as_secs_f64(),
        via_agent.as_secs_f64() / local.as_secs_f64()
    );
}
