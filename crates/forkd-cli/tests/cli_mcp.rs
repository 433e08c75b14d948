//! `forkd mcp` driven by a real MCP client: the `mcp` Python package's stdio client
//! (tests/mcp/session.py) lists the tools and runs a spawn → exec → branch → fork → pause →
//! resume → kill session against a daemon with the demo guest, bad calls included.

mod common;

use std::path::PathBuf;

/// The test virtualenv scripts/test.sh prepares (with the pinned `mcp` package).
fn venv_python(test: &str) -> Option<PathBuf> {
    let venv = std::env::var_os("FORKD_TEST_VENV").map(PathBuf::from);
    let python = venv.map(|v| v.join("bin/python")).filter(|p| p.exists());
    if python.is_none() {
        println!("SKIP: {test}: FORKD_TEST_VENV names no virtualenv with the mcp package (scripts/test.sh makes one)");
    }
    python
}

#[test]
fn an_mcp_client_lists_the_tools_and_drives_sandboxes_through_forkd_mcp() {
    let test = "an_mcp_client_lists_the_tools_and_drives_sandboxes_through_forkd_mcp";
    let Some(python) = venv_python(test) else {
        return;
    };
    let Some(demo) = common::demo_daemon(test, &[]) else {
        return;
    };
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/mcp/session.py");
    let out = std::process::Command::new(python)
        .arg(script)
        .env("FORKD_BIN", env!("CARGO_BIN_EXE_forkd"))
        .env("FORKD_HOST", &demo.daemon.socket)
        .env("FORKD_HOME", demo.home.path())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    assert!(stdout.contains("mcp session: 13 tools"), "{stdout}");
}

#[test]
fn forkd_mcp_without_a_daemon_answers_each_call_with_how_to_start_one() {
    let test = "forkd_mcp_without_a_daemon_answers_each_call_with_how_to_start_one";
    let Some(python) = venv_python(test) else {
        return;
    };
    let home = tempfile::tempdir().unwrap();
    let code = r#"
import asyncio, os, sys
from mcp import ClientSession, StdioServerParameters
from mcp.client.stdio import stdio_client
async def main():
    server = StdioServerParameters(command=os.environ["FORKD_BIN"], args=["mcp"], env=dict(os.environ))
    async with stdio_client(server) as (r, w):
        async with ClientSession(r, w) as s:
            await s.initialize()
            res = await s.call_tool("list_sandboxes", {})
            print("ERROR" if res.isError else "OK", "".join(b.text for b in res.content))
asyncio.run(main())
"#;
    let out = std::process::Command::new(python)
        .args(["-c", code])
        .env("FORKD_BIN", env!("CARGO_BIN_EXE_forkd"))
        .env("FORKD_HOST", home.path().join("nobody.sock"))
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.starts_with("ERROR no forkd daemon answers at unix:"),
        "{stdout}"
    );
    assert!(stdout.contains("forkd serve"), "{stdout}");
}
