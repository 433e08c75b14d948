//! `forkd mcp`: a Model Context Protocol server on stdio, so that an agent (Claude Desktop,
//! an IDE, any MCP client) drives sandboxes through the daemon. Every tool is one or two calls
//! of the daemon's API; nothing is done here that the API does not do.

use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use base64::Engine;
use clap::Args;
use rmcp::handler::server::wrapper::Parameters;
use rmcp::model::{CallToolResult, ContentBlock, Implementation, ServerCapabilities, ServerConfig};
use rmcp::{schemars, tool, tool_handler, tool_router, ErrorData, ServerHandler, ServiceExt};
use serde::Deserialize;
use serde_json::{json, Value};

use super::sandbox::event_bytes;
use crate::daemon_client::{query_value, DaemonClient, Host};

#[derive(Args)]
pub struct McpArgs {}

/// Serves MCP on stdin/stdout until the client closes it.
pub fn run(_args: McpArgs) -> Result<ExitCode> {
    let host = Host::from_env()?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the MCP server's runtime")?;
    runtime.block_on(async {
        let server = ForkdMcp::new(host)
            .serve(rmcp::transport::stdio())
            .await
            .context("starting the MCP session on stdio")?;
        server.waiting().await.context("the MCP session")?;
        Ok::<_, anyhow::Error>(())
    })?;
    Ok(ExitCode::SUCCESS)
}

/// The MCP server: the daemon's address (the tools are its methods below).
#[derive(Clone)]
pub struct ForkdMcp {
    host: Host,
}

#[derive(Debug, Deserialize, schemars::JsonSchema)]
pub struct SpawnParams {
    /// The snapshot (tag) to fork, e.g. "python" (see list_snapshots).
    pub tag: String,
    /// How many sandboxes (default 1).
    #[serde(default)]
    pub count: Option<u32>,
    /// Seconds until each is killed (default: until kill).
    #[serde(default)]
    pub timeout_secs: Option<u64>,
    /// Environment variables for every command run in them.
    #[serde(default)]
    pub envs: Option<serde_json::Map<String, Value>>,
    /// Labels to find them by later.
    #[serde(default)]
    pub metadata: Option<serde_json::Map<String, Value>>,
}

#[derive(Debug, Deserialize, schemars::JsonSchema)]
pub struct ListParams {
    /// Only sandboxes of this snapshot.
    #[serde(default)]
    pub tag: Option<String>,
}

#[derive(Debug, Deserialize, schemars::JsonSchema)]
pub struct SandboxParams {
    /// The sandbox's id (from spawn or list_sandboxes).
    pub id: String,
}

#[derive(Debug, Deserialize, schemars::JsonSchema)]
pub struct ExecParams {
    /// The sandbox's id.
    pub id: String,
    /// A shell command line, run with `sh -c`.
    pub command: String,
    /// Absolute working directory.
    #[serde(default)]
    pub cwd: Option<String>,
    /// Extra environment variables.
    #[serde(default)]
    pub envs: Option<serde_json::Map<String, Value>>,
    /// Text for the command's standard input.
    #[serde(default)]
    pub stdin: Option<String>,
    /// Kill the command after this many seconds.
    #[serde(default)]
    pub timeout_secs: Option<u64>,
}

#[derive(Debug, Deserialize, schemars::JsonSchema)]
pub struct EvalParams {
    /// The sandbox's id.
    pub id: String,
    /// Python code for the sandbox's warm interpreter; the last expression's value is returned.
    pub code: String,
}

#[derive(Debug, Deserialize, schemars::JsonSchema)]
pub struct ReadFileParams {
    /// The sandbox's id.
    pub id: String,
    /// Absolute path in the sandbox.
    pub path: String,
}

#[derive(Debug, Deserialize, schemars::JsonSchema)]
pub struct WriteFileParams {
    /// The sandbox's id.
    pub id: String,
    /// Absolute path in the sandbox (parent directories are made).
    pub path: String,
    /// The file's new content, as text.
    pub content: String,
}

#[derive(Debug, Deserialize, schemars::JsonSchema)]
pub struct BranchParams {
    /// The running sandbox to snapshot.
    pub id: String,
    /// The new snapshot's tag (default: generated).
    #[serde(default)]
    pub tag: Option<String>,
    /// Only what changed since the sandbox's snapshot (default true).
    #[serde(default)]
    pub diff: Option<bool>,
}

#[derive(Debug, Deserialize, schemars::JsonSchema)]
pub struct ForkParams {
    /// The running sandbox to fork from its current state.
    pub id: String,
    /// How many new sandboxes.
    pub count: u32,
}

#[derive(Debug, Deserialize, schemars::JsonSchema)]
pub struct PullParams {
    /// `namespace/name[@version]` from the hub, or a pack's URL.
    pub reference: String,
    /// Install under this tag (default: the package's name).
    #[serde(default)]
    pub tag: Option<String>,
}

/// How long a pull may take before the tool gives up waiting (the pull goes on).
const PULL_PATIENCE: Duration = Duration::from_secs(600);

#[tool_router]
impl ForkdMcp {
    pub fn new(host: Host) -> ForkdMcp {
        ForkdMcp { host }
    }

    #[tool(
        description = "Start sandboxes (microVMs forked from a warm snapshot, in milliseconds). Returns their ids."
    )]
    async fn spawn(
        &self,
        Parameters(p): Parameters<SpawnParams>,
    ) -> Result<CallToolResult, ErrorData> {
        let body = json!({
            "tag": p.tag,
            "count": p.count.unwrap_or(1),
            "timeout_secs": p.timeout_secs,
            "env": p.envs.unwrap_or_default(),
            "metadata": p.metadata.unwrap_or_default(),
        });
        self.call(move |c| c.json("POST", "/v1/sandboxes", Some(body)))
            .await
    }

    #[tool(description = "List running and paused sandboxes.")]
    async fn list_sandboxes(
        &self,
        Parameters(p): Parameters<ListParams>,
    ) -> Result<CallToolResult, ErrorData> {
        let path = match p.tag {
            Some(tag) => format!("/v1/sandboxes?tag={}", query_value(&tag)),
            None => "/v1/sandboxes".to_string(),
        };
        self.call(move |c| c.json("GET", &path, None)).await
    }

    #[tool(
        description = "Run a shell command in a sandbox; returns its stdout, stderr and exit code."
    )]
    async fn exec(
        &self,
        Parameters(p): Parameters<ExecParams>,
    ) -> Result<CallToolResult, ErrorData> {
        self.call(move |c| exec_collected(c, p)).await
    }

    #[tool(
        description = "Evaluate Python in the sandbox's warm interpreter (state persists between calls)."
    )]
    async fn eval(
        &self,
        Parameters(p): Parameters<EvalParams>,
    ) -> Result<CallToolResult, ErrorData> {
        let path = format!("/v1/sandboxes/{}/eval", p.id);
        let body = json!({ "code": p.code });
        self.call(move |c| c.json("POST", &path, Some(body))).await
    }

    #[tool(
        description = "Read a file from a sandbox (text; binary content comes back base64-encoded)."
    )]
    async fn read_file(
        &self,
        Parameters(p): Parameters<ReadFileParams>,
    ) -> Result<CallToolResult, ErrorData> {
        self.call(move |c| read_file(c, &p.id, &p.path)).await
    }

    #[tool(description = "Write a text file in a sandbox.")]
    async fn write_file(
        &self,
        Parameters(p): Parameters<WriteFileParams>,
    ) -> Result<CallToolResult, ErrorData> {
        self.call(move |c| write_file(c, &p.id, &p.path, p.content.into_bytes()))
            .await
    }

    #[tool(
        description = "BRANCH a running sandbox into a new snapshot tag (it runs on); new sandboxes can be spawned from the tag at once."
    )]
    async fn branch(
        &self,
        Parameters(p): Parameters<BranchParams>,
    ) -> Result<CallToolResult, ErrorData> {
        let path = format!("/v1/sandboxes/{}/branch", p.id);
        let body = json!({ "tag": p.tag, "diff": p.diff.unwrap_or(true) });
        self.call(move |c| c.json("POST", &path, Some(body))).await
    }

    #[tool(
        description = "Fork a running sandbox: branch it, then spawn `count` sandboxes that continue from its current state."
    )]
    async fn fork(
        &self,
        Parameters(p): Parameters<ForkParams>,
    ) -> Result<CallToolResult, ErrorData> {
        self.call(move |c| {
            let branch = c.json(
                "POST",
                &format!("/v1/sandboxes/{}/branch", p.id),
                Some(json!({})),
            )?;
            let tag = branch["tag"].as_str().unwrap_or_default().to_string();
            let made = c.json(
                "POST",
                "/v1/sandboxes",
                Some(json!({"tag": tag, "count": p.count})),
            )?;
            Ok(json!({"branch": branch, "sandboxes": made["sandboxes"]}))
        })
        .await
    }

    #[tool(description = "Pause a sandbox to disk; it keeps its id and can be resumed later.")]
    async fn pause(
        &self,
        Parameters(p): Parameters<SandboxParams>,
    ) -> Result<CallToolResult, ErrorData> {
        let path = format!("/v1/sandboxes/{}/pause", p.id);
        self.call(move |c| c.json("POST", &path, None)).await
    }

    #[tool(description = "Resume a paused sandbox where it left off.")]
    async fn resume(
        &self,
        Parameters(p): Parameters<SandboxParams>,
    ) -> Result<CallToolResult, ErrorData> {
        let path = format!("/v1/sandboxes/{}/resume", p.id);
        self.call(move |c| c.json("POST", &path, None)).await
    }

    #[tool(description = "Kill a sandbox and remove its files.")]
    async fn kill(
        &self,
        Parameters(p): Parameters<SandboxParams>,
    ) -> Result<CallToolResult, ErrorData> {
        let path = format!("/v1/sandboxes/{}", p.id);
        self.call(move |c| c.json("DELETE", &path, None)).await
    }

    #[tool(description = "List the snapshots sandboxes can be spawned from.")]
    async fn list_snapshots(&self) -> Result<CallToolResult, ErrorData> {
        self.call(|c| c.json("GET", "/v1/snapshots", None)).await
    }

    #[tool(
        description = "Download and install a warm snapshot from a hub; waits until it is installed."
    )]
    async fn pull_snapshot(
        &self,
        Parameters(p): Parameters<PullParams>,
    ) -> Result<CallToolResult, ErrorData> {
        self.call(move |c| pull(c, &p.reference, p.tag.as_deref()))
            .await
    }
}

#[tool_handler]
impl ServerHandler for ForkdMcp {
    fn get_info(&self) -> ServerConfig {
        ServerConfig::new(ServerCapabilities::builder().enable_tools().build())
            .with_server_info(Implementation::new("forkd", env!("CARGO_PKG_VERSION")))
            .with_instructions(
                "forkd sandboxes: microVMs forked from warm snapshots in milliseconds. \
                 list_snapshots, then spawn from a tag; exec/eval/read_file/write_file in a \
                 sandbox; branch or fork one to try several things from the same state; kill \
                 what you no longer need."
                    .to_string(),
            )
    }
}

impl ForkdMcp {
    /// Runs `work` against the daemon off the async workers; its JSON is the tool's result,
    /// its error the tool's one-line error (a failed tool call, which the model sees).
    async fn call(
        &self,
        work: impl FnOnce(&DaemonClient) -> Result<Value> + Send + 'static,
    ) -> Result<CallToolResult, ErrorData> {
        let host = self.host.clone();
        let outcome = tokio::task::spawn_blocking(move || {
            let client = DaemonClient::new(host)?;
            work(&client)
        })
        .await
        .map_err(|e| ErrorData::internal_error(e.to_string(), None))?;
        Ok(match outcome {
            Ok(value) => CallToolResult::success(vec![ContentBlock::text(
                serde_json::to_string_pretty(&value).unwrap_or_default(),
            )]),
            Err(e) => CallToolResult::error(vec![ContentBlock::text(format!("{e:#}"))]),
        })
    }
}

/// An exec with its output collected: stdout, stderr, and how it ended.
fn exec_collected(client: &DaemonClient, p: ExecParams) -> Result<Value> {
    let body = json!({
        "cmd": p.command,
        "cwd": p.cwd,
        "env": p.envs.unwrap_or_default(),
        "stdin": p.stdin,
        "timeout_secs": p.timeout_secs,
    });
    let response = client.send("POST", &format!("/v1/sandboxes/{}/exec", p.id), Some(body))?;
    let bytes = response.error_for_status()?.collect()?;
    let (mut stdout, mut stderr) = (Vec::new(), Vec::new());
    for line in bytes.split(|&b| b == b'\n').filter(|l| !l.is_empty()) {
        let event: Value = serde_json::from_slice(line).context("the daemon's exec stream")?;
        match event["type"].as_str() {
            Some("stdout") => stdout.extend(event_bytes(&event)),
            Some("stderr") => stderr.extend(event_bytes(&event)),
            Some("exit") => {
                return Ok(json!({
                    "stdout": String::from_utf8_lossy(&stdout),
                    "stderr": String::from_utf8_lossy(&stderr),
                    "exit_code": event["exit_code"],
                    "signal": event["signal"],
                    "timed_out": event["timed_out"],
                }))
            }
            Some("error") => bail!("{}", event["message"].as_str().unwrap_or("exec failed")),
            _ => {}
        }
    }
    bail!("the daemon's exec stream ended without the command's exit")
}

fn read_file(client: &DaemonClient, id: &str, path: &str) -> Result<Value> {
    let url = format!("/v1/sandboxes/{id}/files?path={}", query_value(path));
    let response = client.send("GET", &url, None)?;
    let bytes = response.error_for_status()?.collect()?;
    Ok(match String::from_utf8(bytes) {
        Ok(text) => json!({ "path": path, "content": text }),
        Err(e) => json!({
            "path": path,
            "content_base64": base64::engine::general_purpose::STANDARD.encode(e.into_bytes()),
        }),
    })
}

fn write_file(client: &DaemonClient, id: &str, path: &str, content: Vec<u8>) -> Result<Value> {
    let url = format!(
        "/v1/sandboxes/{id}/files?path={}&create_dirs=true",
        query_value(path)
    );
    let length = content.len() as u64;
    let response = client.send_stream(
        "PUT",
        &url,
        Box::new(std::io::Cursor::new(content)),
        Some(length),
    )?;
    let bytes = response.error_for_status()?.collect()?;
    Ok(serde_json::from_slice(&bytes).unwrap_or_default())
}

/// Starts a pull job and waits for it to end.
fn pull(client: &DaemonClient, reference: &str, tag: Option<&str>) -> Result<Value> {
    let job = client.json(
        "POST",
        "/v1/snapshots",
        Some(json!({ "reference": reference, "tag": tag })),
    )?;
    let id = job["id"].as_str().unwrap_or_default().to_string();
    let deadline = Instant::now() + PULL_PATIENCE;
    loop {
        let job = client.json("GET", &format!("/v1/jobs/{id}"), None)?;
        match job["state"].as_str() {
            Some("succeeded") => return Ok(job),
            Some("failed") => bail!(
                "pull of {reference}: {}",
                job["error"]["message"].as_str().unwrap_or("failed")
            ),
            _ if Instant::now() >= deadline => {
                bail!("pull of {reference} is still running (job {id}); ask again later")
            }
            _ => std::thread::sleep(Duration::from_millis(500)),
        }
    }
}
