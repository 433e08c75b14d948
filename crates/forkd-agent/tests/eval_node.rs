//! `eval` in JavaScript: the real `forkd-agent` binary on a Unix socket with Node as its eval
//! interpreter (`--eval-interpreter node`), driven through the client library. Each test prints
//! one `SKIP:` line and passes when the host has no `node` (FORKD_TEST_NODE names another).

use std::io::{self, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime};

use forkd_agent::client::{wait_ready_line, AgentClient, ClientError};
use forkd_agent::protocol::{
    ErrorCode, EvalContextAction, EvalError, EvalRequest, EvalResult, Stream,
};
use serde_json::json;
use tempfile::TempDir;

/// Generous: only reached when something hangs, turning a hang into a failure.
const IO_TIMEOUT: Duration = Duration::from_secs(120);

fn node() -> String {
    std::env::var("FORKD_TEST_NODE").unwrap_or_else(|_| "node".into())
}

fn node_available() -> bool {
    Command::new(node())
        .args(["-e", "0"])
        .status()
        .is_ok_and(|s| s.success())
}

/// Prints one "SKIP: ..." line past the test harness's output capture and leaves the test.
macro_rules! require_node {
    () => {
        if !node_available() {
            // The harness names each test's thread after the test.
            let test = std::thread::current()
                .name()
                .unwrap_or(module_path!())
                .to_string();
            let _ = writeln!(io::stderr(), "SKIP: {test}: {} is not installed", node());
            return;
        }
    };
}

struct Agent {
    child: Child,
    _dir: TempDir,
    socket: std::path::PathBuf,
}

impl Agent {
    /// The agent with Node as its interpreter, warmed with `warmup` lines (joined like a recipe's).
    fn start(warmup: &[&str]) -> Agent {
        Agent::start_with(&[], warmup)
    }

    fn start_with(args: &[&str], warmup: &[&str]) -> Agent {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("agent.sock");
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_forkd-agent"));
        cmd.arg("--unix")
            .arg(&socket)
            .args(["--eval-interpreter", &node()])
            .args(args);
        if !warmup.is_empty() {
            cmd.args(["--eval-warmup", &warmup.join("\n")]);
        }
        let mut child = cmd
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let mut stdout = BufReader::new(child.stdout.take().unwrap());
        wait_ready_line(&mut stdout).expect("agent printed READY");
        Agent {
            child,
            _dir: dir,
            socket,
        }
    }

    fn client(&self) -> AgentClient<UnixStream> {
        let stream = UnixStream::connect(&self.socket).unwrap();
        stream.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
        AgentClient::new(stream)
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn eval(client: &mut AgentClient<UnixStream>, code: &str) -> EvalResult {
    client.eval(code, None).unwrap()
}

fn value(client: &mut AgentClient<UnixStream>, code: &str) -> String {
    let r = eval(client, code);
    assert!(r.error.is_none(), "{code:?} raised {:?}", r.error);
    r.value.unwrap_or_else(|| panic!("{code:?} has no value"))
}

fn error(client: &mut AgentClient<UnixStream>, code: &str) -> EvalError {
    eval(client, code)
        .error
        .unwrap_or_else(|| panic!("{code:?} raised nothing"))
}

/// The process is gone or a zombie (dead, waiting to be reaped by whoever adopted it).
fn gone(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(stat) => stat
            .rsplit_once(')')
            .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z')),
    }
}

fn request(code: &str) -> EvalRequest {
    EvalRequest {
        code: code.into(),
        ..Default::default()
    }
}

#[test]
fn js_values_state_and_top_level_await() {
    require_node!();
    let agent = Agent::start(&[]);
    let mut client = agent.client();
    let ping = client.ping().unwrap();
    assert_eq!(ping.eval.language, "javascript");
    assert!(
        ping.eval.ready && ping.eval.error.is_none(),
        "{:?}",
        ping.eval
    );

    // The value of the last expression, as util.inspect shows it.
    assert_eq!(value(&mut client, "1 + 2"), "3");
    assert_eq!(value(&mut client, "'a' + 'b'"), "'ab'");
    // Declarations persist into later evals, const included.
    let r = eval(
        &mut client,
        "const x = 40; let y = 2; function add(a, b) { return a + b }",
    );
    assert_eq!(
        (r.value, r.error),
        (None, None),
        "a declaration shows nothing"
    );
    assert_eq!(value(&mut client, "add(x, y)"), "42");
    // Top-level await, and what it declares persists too.
    let r = eval(
        &mut client,
        "const late = await new Promise((resolve) => setTimeout(() => resolve(x + 1), 50));\nlate * 2",
    );
    assert_eq!(r.value.as_deref(), Some("82"));
    assert_eq!(value(&mut client, "late"), "41");
    // A promise that is the value is shown, not awaited.
    assert!(value(&mut client, "Promise.resolve(1)").starts_with("Promise"));
    assert_eq!(eval(&mut client, "undefined").value, None);
    assert_eq!(value(&mut client, "null"), "null");

    // Plain data also comes as application/json; other objects as text only.
    let r = eval(&mut client, "({ a: [1, 2], b: 'text' })");
    let main = &r.results[0];
    assert!(main.is_main);
    assert_eq!(main.data["text/plain"], "{ a: [ 1, 2 ], b: 'text' }");
    assert_eq!(
        main.data["application/json"],
        json!({"a": [1, 2], "b": "text"})
    );
    let r = eval(&mut client, "new Map([[1, 'one']])");
    assert_eq!(r.value.as_deref(), Some("Map(1) { 1 => 'one' }"));
    assert!(!r.results[0].data.contains_key("application/json"));
    // display() adds results, as in the Python interpreter.
    let r = eval(
        &mut client,
        "display([1]); display({ 'text/html': '<b>x</b>' }, { raw: true })",
    );
    assert_eq!(r.results.len(), 2);
    assert_eq!(r.results[1].data["text/html"], "<b>x</b>");
    // Node's modules are there: require, and the built-ins by name.
    assert_eq!(
        value(&mut client, "require('path').join('a', 'b')"),
        "'a/b'"
    );
    assert_eq!(value(&mut client, "typeof fs.readFileSync"), "'function'");
    assert_eq!(r.execution_count, 12);
}

#[test]
fn js_exceptions_and_syntax_errors_are_reported_like_pythons() {
    require_node!();
    let agent = Agent::start(&[]);
    let mut client = agent.client();
    let e = error(
        &mut client,
        "function inner(d) {\n  if (!d) throw new RangeError('d is ' + d);\n}\ninner(0)",
    );
    assert_eq!(
        (e.type_name.as_str(), e.message.as_str()),
        ("RangeError", "d is 0")
    );
    assert!(
        e.traceback.starts_with("RangeError: d is 0\n"),
        "{}",
        e.traceback
    );
    assert!(
        e.traceback.contains("at inner (<eval-1>:2:"),
        "{}",
        e.traceback
    );
    assert!(
        !e.traceback.contains("node:inspector") && !e.traceback.contains("[eval]"),
        "the driver's frames are left out: {}",
        e.traceback
    );
    // After an await, the rejection is the error.
    let e = error(&mut client, "await Promise.reject(new TypeError('later'))");
    assert_eq!(
        (e.type_name.as_str(), e.message.as_str()),
        ("TypeError", "later")
    );
    // A thrown non-error.
    let e = error(&mut client, "throw { code: 7 }");
    assert_eq!(e.type_name, "Uncaught");
    assert_eq!(e.message, "{ code: 7 }");

    let e = error(&mut client, "const ok = 1;\nfunction broken( {");
    assert_eq!(e.type_name, "SyntaxError");
    assert!(!e.message.is_empty());
    assert!(
        e.traceback.ends_with("at <eval-4>:2:19"),
        "where it is: {}",
        e.traceback
    );
    assert_eq!(
        eval(&mut client, "typeof ok").value.as_deref(),
        Some("'undefined'"),
        "nothing of a script that did not parse ran"
    );
    // Errors thrown later, outside any eval, do not end the interpreter.
    eval(
        &mut client,
        "setTimeout(() => { throw new Error('stray') }, 0); globalThis.alive = 1",
    );
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(value(&mut client, "alive"), "1");
}

#[test]
fn js_console_output_is_captured_or_streamed_in_order() {
    require_node!();
    let agent = Agent::start(&[]);
    let mut client = agent.client();
    let r = eval(
        &mut client,
        "console.log('one', { a: 1 }); console.error('two'); process.stdout.write('three\\n'); 4",
    );
    assert_eq!(r.stdout, "one { a: 1 }\nthree\n");
    assert_eq!(r.stderr, "two\n");
    assert_eq!(r.value.as_deref(), Some("4"));
    // A child process with inherited stdio writes to the agent's log, not into the protocol.
    let r = eval(
        &mut client,
        "require('child_process').execSync('echo noise; echo more >&2', { stdio: 'inherit' }); 5",
    );
    assert_eq!(r.value.as_deref(), Some("5"));

    let streamed = EvalRequest {
        stream: true,
        ..request(
            "console.log('first');\nprocess.stdout.write('part');\n\
             await new Promise((resolve) => setTimeout(resolve, 600));\n\
             console.error(' second');\nconsole.log('third');\n6",
        )
    };
    let start = Instant::now();
    let mut chunks = Vec::new();
    let result = client
        .eval_streaming(&streamed, |stream, data| {
            chunks.push((
                start.elapsed(),
                stream,
                String::from_utf8(data.to_vec()).unwrap(),
            ));
            Ok(())
        })
        .unwrap();
    let done = start.elapsed();
    let seen: Vec<(Stream, &str)> = chunks.iter().map(|(_, s, t)| (*s, t.as_str())).collect();
    assert_eq!(
        seen,
        [
            (Stream::Stdout, ""),
            (Stream::Stdout, "first\n"),
            (Stream::Stdout, "part"),
            (Stream::Stderr, " second\n"),
            (Stream::Stdout, "third\n"),
        ]
    );
    // "first" and the partial line came while the code still waited.
    assert!(
        chunks[1].0 + Duration::from_millis(400) < done,
        "{chunks:?} / {done:?}"
    );
    assert!(
        chunks[2].0 + Duration::from_millis(300) < done,
        "{chunks:?} / {done:?}"
    );
    assert_eq!(result.value.as_deref(), Some("6"));
    assert_eq!((result.stdout.as_str(), result.stderr.as_str()), ("", ""));
}

#[test]
fn js_contexts_are_isolated_with_their_own_cwd_count_and_env_per_run() {
    require_node!();
    let agent = Agent::start(&[]);
    let mut client = agent.client();
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("sub")).unwrap();
    let home = dir.path().to_str().unwrap().to_string();
    let made = client
        .eval_context(EvalContextAction::Create, None, Some(&home))
        .unwrap();
    let ctx = made.contexts[0].clone();
    assert_eq!(
        (ctx.language.as_str(), ctx.cwd.as_str()),
        ("javascript", home.as_str())
    );
    let in_ctx = |code: &str| EvalRequest {
        context: Some(ctx.id.clone()),
        ..request(code)
    };
    let mut run = |req: &EvalRequest| client.eval_streaming(req, |_, _| Ok(())).unwrap();

    let default_cwd = run(&request(
        "const who = 'default'; globalThis.g = 1; process.cwd()",
    ))
    .value
    .unwrap();
    let r = run(&in_ctx("typeof who + ' ' + typeof g"));
    assert_eq!(
        r.value.as_deref(),
        Some("'undefined undefined'"),
        "globals apart"
    );
    let r = run(&in_ctx(
        "const who = 'ctx'; process.chdir('sub'); process.cwd()",
    ));
    assert_eq!(r.value, Some(format!("'{home}/sub'")));
    assert_eq!(r.execution_count, 2, "counted per context");
    let r = run(&request("[who, process.cwd()]"));
    assert_eq!(r.value, Some(format!("[ 'default', {default_cwd} ]")));
    assert_eq!(r.execution_count, 2);
    let r = run(&in_ctx("[who, process.cwd()]"));
    assert_eq!(r.value, Some(format!("[ 'ctx', '{home}/sub' ]")));

    // Environment variables hold for one eval.
    let with_env = EvalRequest {
        env: [("FORKD_T_VAR".to_string(), "set".to_string())].into(),
        ..request("process.env.FORKD_T_VAR")
    };
    assert_eq!(run(&with_env).value.as_deref(), Some("'set'"));
    assert_eq!(
        run(&request("typeof process.env.FORKD_T_VAR"))
            .value
            .as_deref(),
        Some("'undefined'")
    );

    // Restart: a fresh context in its first directory; the default one too.
    let restarted = client
        .eval_context(EvalContextAction::Restart, Some(&ctx.id), None)
        .unwrap();
    assert_eq!(
        (
            restarted.contexts[0].cwd.as_str(),
            restarted.contexts[0].execution_count
        ),
        (home.as_str(), 0)
    );
    let mut run = |req: &EvalRequest| client.eval_streaming(req, |_, _| Ok(())).unwrap();
    assert_eq!(
        run(&in_ctx("typeof who")).value.as_deref(),
        Some("'undefined'")
    );
    let listed = client
        .eval_context(EvalContextAction::List, None, None)
        .unwrap();
    let ids: Vec<&str> = listed.contexts.iter().map(|c| c.id.as_str()).collect();
    assert_eq!(ids, ["default", ctx.id.as_str()]);
    client
        .eval_context(EvalContextAction::Remove, Some(&ctx.id), None)
        .unwrap();
    match client.eval_streaming(&in_ctx("1"), |_, _| Ok(())) {
        Err(ClientError::Agent { code, message }) => {
            assert_eq!(code, ErrorCode::NotFound);
            assert!(message.contains(&ctx.id), "{message}");
        }
        other => panic!("expected not_found, got {other:?}"),
    }
}

/// The playwright pack's warm-up has this shape: require, then top-level await, then globals.
const WARMUP: &[&str] = &[
    "const { setTimeout: sleep } = require('timers/promises');",
    "globalThis.browser = await sleep(20, { pages: ['about:blank'] });",
    "const warmedAt = 'warm-up';",
];

#[test]
fn js_warmup_globals_and_declarations_are_visible_to_later_evals() {
    require_node!();
    let agent = Agent::start(WARMUP);
    let mut client = agent.client();
    let status = client.ping().unwrap().eval;
    assert!(status.ready && status.error.is_none(), "{status:?}");
    let r = eval(&mut client, "browser.pages[0]");
    assert_eq!(r.value.as_deref(), Some("'about:blank'"));
    assert_eq!(r.execution_count, 1, "the warm-up is not counted");
    assert_eq!(value(&mut client, "warmedAt"), "'warm-up'");
    assert_eq!(value(&mut client, "typeof sleep"), "'function'");
}

#[test]
fn js_warmup_failure_is_reported_and_eval_still_works() {
    require_node!();
    let agent = Agent::start(&["require('forkd-no-such-module')"]);
    let mut client = agent.client();
    let status = client.ping().unwrap().eval;
    assert!(status.ready);
    let why = status.error.expect("the warm-up error is reported");
    assert!(why.contains("forkd-no-such-module"), "{why}");
    assert_eq!(value(&mut client, "6 * 7"), "42");
}

#[test]
fn js_infinite_loop_hits_the_timeout_and_a_fresh_warm_interpreter_follows() {
    require_node!();
    let agent = Agent::start(WARMUP);
    let mut client = agent.client();
    eval(&mut client, "globalThis.kept = 1");
    // A process started detached (as Playwright starts a browser) leaves the interpreter's
    // process group; the kill on timeout finds it all the same.
    let escaped = value(
        &mut client,
        "require('child_process').spawn('sleep', ['300'], { detached: true, stdio: 'ignore' }).pid",
    );
    let escaped: i32 = escaped.parse().unwrap();
    let r = client.eval("while (true) {}", Some(300)).unwrap();
    assert!(r.timed_out);
    let start = Instant::now();
    while !gone(escaped) {
        assert!(
            start.elapsed() < IO_TIMEOUT,
            "the detached process {escaped} outlived the interpreter"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let r = client.eval("for (;;) { await null }", Some(300)).unwrap();
    assert!(r.timed_out, "a loop that awaits times out as well");
    assert_eq!(
        value(&mut client, "typeof kept"),
        "'undefined'",
        "state was lost with the old interpreter"
    );
    assert_eq!(
        value(&mut client, "browser.pages.length"),
        "1",
        "the new interpreter was warmed again"
    );
    match client.eval("process.exit(3)", None) {
        Err(ClientError::Agent { code, message }) => {
            assert_eq!(code, ErrorCode::InterpreterDied);
            assert!(message.contains("state is lost"), "{message}");
        }
        other => panic!("expected interpreter_died, got {other:?}"),
    }
    assert_eq!(value(&mut client, "2 + 2"), "4");
    assert!(client.ping().unwrap().eval.ready);
}

#[test]
fn js_restored_reseeds_math_random() {
    require_node!();
    let agent = Agent::start_with(&["--skip-clock-set"], &[]);
    let mut client = agent.client();
    eval(&mut client, "globalThis.before = Math.random");
    assert_eq!(value(&mut client, "Math.random === before"), "true");
    client.restored(&[9; 32], SystemTime::now()).unwrap();
    // Every child restored from one snapshot would otherwise draw the same numbers.
    assert_eq!(value(&mut client, "Math.random === before"), "false");
    let r = value(
        &mut client,
        "const draws = Array.from({ length: 1000 }, () => Math.random());\n\
         [draws.every((d) => d >= 0 && d < 1), new Set(draws).size]",
    );
    assert_eq!(r, "[ true, 1000 ]");
}
