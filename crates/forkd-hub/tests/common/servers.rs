//! Loopback servers for tests: a real nginx, and a byte-counting TCP proxy that can cut a
//! connection part way through.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

pub fn nginx_binary() -> Option<PathBuf> {
    ["/usr/sbin/nginx", "/usr/bin/nginx"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn wait_for_port(addr: SocketAddr) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if TcpStream::connect(addr).is_ok() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    panic!("nothing listening on {addr}");
}

/// nginx serving `root` on a loopback port (plus WebDAV PUT under /dav/), killed on drop.
/// It runs as one process (`master_process off`) so killing it leaves no orphaned workers.
pub struct Nginx {
    child: Child,
    pub addr: SocketAddr,
    _dir: tempfile::TempDir,
}

impl Nginx {
    /// None (after printing why) when nginx is not installed.
    pub fn start(root: &Path) -> Option<Nginx> {
        let Some(bin) = nginx_binary() else {
            eprintln!("skipped: nginx is not installed (apt-get install nginx)");
            return None;
        };
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().display();
        let port = free_port();
        // SAFETY: geteuid(2) takes no arguments, cannot fail and touches no memory of ours.
        let user = if unsafe { libc::geteuid() } == 0 {
            "user root;"
        } else {
            ""
        };
        let conf = format!(
            "{user}
daemon off;
master_process off;
pid {d}/nginx.pid;
error_log {d}/error.log;
events {{ worker_connections 64; }}
http {{
  access_log {d}/access.log;
  client_body_temp_path {d}/body;
  proxy_temp_path {d}/proxy;
  fastcgi_temp_path {d}/fastcgi;
  uwsgi_temp_path {d}/uwsgi;
  scgi_temp_path {d}/scgi;
  default_type application/octet-stream;
  sendfile on;
  server {{
    listen 127.0.0.1:{port};
    root {root};
    location /unavailable/ {{
      return 503;
    }}
    location /dav/ {{
      dav_methods PUT;
      create_full_put_path on;
      client_max_body_size 0;
    }}
  }}
}}
",
            root = root.display()
        );
        let conf_path = dir.path().join("nginx.conf");
        std::fs::write(&conf_path, conf).unwrap();
        let child = Command::new(bin)
            .arg("-e")
            .arg(dir.path().join("error.log"))
            .arg("-p")
            .arg(dir.path())
            .arg("-c")
            .arg(&conf_path)
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        wait_for_port(addr);
        Some(Nginx {
            child,
            addr,
            _dir: dir,
        })
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}/{}", self.addr, path.trim_start_matches('/'))
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Forwards loopback connections to `upstream`, counting the bytes sent back to clients.
/// With `cut_after`, the first connection is closed after that many response bytes.
/// With a gate, every connection stalls after `hold_after` response bytes until the gate opens.
pub struct Proxy {
    pub addr: SocketAddr,
    pub served: Arc<AtomicU64>,
    pub connections: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    gate: Arc<Gate>,
}

/// Holds relays back until opened.
#[derive(Default)]
pub struct Gate {
    open: std::sync::Mutex<bool>,
    opened: std::sync::Condvar,
}

impl Gate {
    fn wait(&self) {
        let mut open = self.open.lock().unwrap();
        while !*open {
            open = self.opened.wait(open).unwrap();
        }
    }

    fn open(&self) {
        *self.open.lock().unwrap() = true;
        self.opened.notify_all();
    }
}

impl Proxy {
    pub fn start(upstream: SocketAddr, cut_after: Option<u64>) -> Proxy {
        Proxy::start_with(upstream, cut_after, None)
    }

    /// A proxy whose responses stall after `hold_after` bytes until [`Proxy::open_gate`].
    pub fn gated(upstream: SocketAddr, hold_after: u64) -> Proxy {
        Proxy::start_with(upstream, None, Some(hold_after))
    }

    pub fn open_gate(&self) {
        self.gate.open();
    }

    fn start_with(upstream: SocketAddr, cut_after: Option<u64>, hold: Option<u64>) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let served = Arc::new(AtomicU64::new(0));
        let connections = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let gate = Arc::new(Gate::default());
        if hold.is_none() {
            gate.open();
        }
        let (s, c, st, g) = (
            served.clone(),
            connections.clone(),
            stop.clone(),
            gate.clone(),
        );
        std::thread::spawn(move || {
            for client in listener.incoming() {
                if st.load(Ordering::Relaxed) {
                    break;
                }
                let Ok(client) = client else { continue };
                let n = c.fetch_add(1, Ordering::Relaxed);
                let cut = if n == 0 { cut_after } else { None };
                let (s, g) = (s.clone(), g.clone());
                let held = hold.map(|at| (at, g));
                std::thread::spawn(move || relay(client, upstream, cut, held, s));
            }
        });
        Proxy {
            addr,
            served,
            connections,
            stop,
            gate,
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}/{}", self.addr, path.trim_start_matches('/'))
    }

    pub fn served(&self) -> u64 {
        self.served.load(Ordering::Relaxed)
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.gate.open();
        self.stop.store(true, Ordering::Relaxed);
        let _ = TcpStream::connect(self.addr);
    }
}

fn relay(
    client: TcpStream,
    upstream: SocketAddr,
    cut: Option<u64>,
    hold: Option<(u64, Arc<Gate>)>,
    served: Arc<AtomicU64>,
) {
    let Ok(server) = TcpStream::connect(upstream) else {
        return;
    };
    let (mut c_read, mut s_write) = (client.try_clone().unwrap(), server.try_clone().unwrap());
    std::thread::spawn(move || {
        let mut buf = [0u8; 16384];
        while let Ok(n) = c_read.read(&mut buf) {
            if n == 0 || s_write.write_all(&buf[..n]).is_err() {
                break;
            }
        }
        let _ = s_write.shutdown(Shutdown::Write);
    });
    let (mut s_read, mut c_write) = (server, client);
    let mut buf = [0u8; 16384];
    let mut sent = 0u64;
    loop {
        let n = match s_read.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        let n = match cut {
            Some(limit) => (n as u64).min(limit - sent) as usize,
            None => n,
        };
        if let Some((at, gate)) = &hold {
            if sent >= *at {
                gate.wait();
            }
        }
        if c_write.write_all(&buf[..n]).is_err() {
            break;
        }
        sent += n as u64;
        served.fetch_add(n as u64, Ordering::Relaxed);
        if cut.is_some_and(|limit| sent >= limit) {
            break;
        }
    }
    let _ = c_write.shutdown(Shutdown::Both);
    let _ = s_read.shutdown(Shutdown::Both);
}
