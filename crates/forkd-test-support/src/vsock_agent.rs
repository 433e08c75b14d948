//! The real forkd-agent served behind a hybrid-vsock emulator, so host-side code that talks to
//! a child's agent (through the child's `<run_dir>/child-N.vsock` socket) can be tested on a
//! host where no Linux guest can boot.
//!
//! The emulator plays the VMM's part of Firecracker's hybrid vsock: it listens on a Unix
//! socket, reads `CONNECT <port>\n`, and for the agent's port answers `OK <host port>\n` and
//! hands the stream to [`Agent::serve_connection`]. For any other port it closes the stream,
//! as the VMM does when the guest answers a connection request with RST.

use std::io::{self, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

use forkd_agent::server::{Agent, AgentConfig};

/// First host port handed out in `OK` replies (the VMM's range starts high, too).
const FIRST_HOST_PORT: u32 = 1 << 30;

/// A running emulator; dropping it stops accepting and removes the socket.
pub struct HybridVsockAgent {
    uds: PathBuf,
    agent: Agent,
    stop: Arc<AtomicBool>,
    accept_thread: Option<JoinHandle<()>>,
}

impl HybridVsockAgent {
    /// Serves a fresh agent (eval off, clock never set: this is the host's clock) on `uds`
    /// for guest port `port`.
    pub fn start(uds: &Path, port: u32) -> io::Result<HybridVsockAgent> {
        Self::start_with(
            uds,
            port,
            AgentConfig {
                eval: None,
                set_clock: false,
                resolv_conf: None,
            },
        )
    }

    pub fn start_with(uds: &Path, port: u32, config: AgentConfig) -> io::Result<HybridVsockAgent> {
        let listener = UnixListener::bind(uds)?;
        let agent = Agent::new(config);
        let stop = Arc::new(AtomicBool::new(false));
        let accept_thread = {
            let agent = agent.clone();
            let stop = stop.clone();
            std::thread::Builder::new()
                .name("vsock-emulator".into())
                .spawn(move || accept_loop(&listener, &agent, port, &stop))?
        };
        Ok(HybridVsockAgent {
            uds: uds.to_path_buf(),
            agent,
            stop,
            accept_thread: Some(accept_thread),
        })
    }

    /// The agent itself (e.g. to read its fork counter without a connection).
    pub fn agent(&self) -> &Agent {
        &self.agent
    }

    pub fn uds(&self) -> &Path {
        &self.uds
    }
}

impl Drop for HybridVsockAgent {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wake the blocking accept so the thread sees the flag.
        let _ = UnixStream::connect(&self.uds);
        if let Some(t) = self.accept_thread.take() {
            let _ = t.join();
        }
        let _ = std::fs::remove_file(&self.uds);
    }
}

fn accept_loop(listener: &UnixListener, agent: &Agent, port: u32, stop: &AtomicBool) {
    let next_port = Arc::new(AtomicU32::new(FIRST_HOST_PORT));
    for conn in listener.incoming() {
        if stop.load(Ordering::SeqCst) {
            return;
        }
        let Ok(stream) = conn else { continue };
        let agent = agent.clone();
        let next_port = next_port.clone();
        std::thread::spawn(move || {
            if let Ok(stream) = handshake(stream, port, &next_port) {
                agent.serve_connection(stream);
            }
        });
    }
}

/// Reads `CONNECT <port>\n` byte by byte (what follows belongs to the agent) and answers it.
fn handshake(mut stream: UnixStream, port: u32, next_port: &AtomicU32) -> io::Result<UnixStream> {
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    while line.len() < 32 {
        if stream.read(&mut byte)? == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        if byte[0] == b'\n' {
            break;
        }
        line.push(byte[0]);
    }
    let wanted = String::from_utf8_lossy(&line)
        .strip_prefix("CONNECT ")
        .and_then(|p| p.trim().parse::<u32>().ok());
    if wanted != Some(port) {
        // Nothing listens on that guest port: the VMM closes the host side.
        return Err(io::ErrorKind::ConnectionRefused.into());
    }
    let host_port = next_port.fetch_add(1, Ordering::SeqCst);
    stream.write_all(format!("OK {host_port}\n").as_bytes())?;
    Ok(stream)
}
