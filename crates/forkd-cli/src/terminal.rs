//! How commands run in children meet this terminal: `--env` parsing, their output forwarded to
//! ours, and how their end is worded and turned into our exit status.

use std::io::{self, Write};

use forkd_sandbox::exec::{CommandEnd, ExecResult, Stream};

/// Exit status `forkd run` reports for a command killed by its timeout (as timeout(1) does).
pub const TIMEOUT_EXIT_CODE: i32 = 124;

/// Parses a `KEY=VALUE` environment assignment (the error names the input).
pub fn parse_env_assignment(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() && !k.contains('\0') && !v.contains('\0') => {
            Ok((k.to_string(), v.to_string()))
        }
        _ => Err(format!("{s:?} is not KEY=VALUE with a non-empty KEY")),
    }
}

/// How a finished command ended, as a process exit code: its own, 128 + signal when a signal
/// killed it, [`TIMEOUT_EXIT_CODE`] when its timeout did.
pub fn exit_code_of(result: &ExecResult) -> i32 {
    match CommandEnd::of(result, None) {
        CommandEnd::Exited(code) => code,
        CommandEnd::Signalled(sig) => 128 + sig,
        CommandEnd::TimedOut { .. } => TIMEOUT_EXIT_CODE,
        CommandEnd::Unknown => 1,
    }
}

/// Writes chunks to this process's stdout / stderr as they arrive. Once a write fails (e.g.
/// stdout is a pipe whose reader went away) that stream is dropped silently, so the command
/// still runs to its end and its exit code is still reported.
#[derive(Debug, Default)]
pub struct OutputForwarder {
    stdout_broken: bool,
    stderr_broken: bool,
}

impl OutputForwarder {
    pub fn forward(&mut self, stream: Stream, data: &[u8]) -> io::Result<()> {
        let broken = match stream {
            Stream::Stderr => &mut self.stderr_broken,
            _ => &mut self.stdout_broken,
        };
        if *broken {
            return Ok(());
        }
        let written = match stream {
            Stream::Stderr => write_flush(&mut io::stderr(), data),
            _ => write_flush(&mut io::stdout(), data),
        };
        *broken = written.is_err();
        Ok(())
    }
}

fn write_flush(w: &mut impl Write, data: &[u8]) -> io::Result<()> {
    w.write_all(data)?;
    w.flush()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn env_assignments_need_a_key() {
        assert_eq!(
            parse_env_assignment("A=b=c").unwrap(),
            ("A".into(), "b=c".into())
        );
        assert_eq!(parse_env_assignment("A=").unwrap(), ("A".into(), "".into()));
        for bad in ["A", "=x", ""] {
            let err = parse_env_assignment(bad).unwrap_err();
            assert!(err.contains(&format!("{bad:?}")), "{err}");
        }
    }

    #[test]
    fn exit_codes_follow_the_shell_conventions() {
        let r = |exit_code, signal, timed_out| ExecResult {
            exit_code,
            signal,
            timed_out,
            ..Default::default()
        };
        assert_eq!(exit_code_of(&r(Some(0), None, false)), 0);
        assert_eq!(exit_code_of(&r(Some(42), None, false)), 42);
        assert_eq!(exit_code_of(&r(None, Some(15), false)), 143);
        assert_eq!(exit_code_of(&r(None, Some(9), true)), TIMEOUT_EXIT_CODE);
    }
}
