//! Networking options as a user meets them: a malformed --allow or --publish is one line
//! naming the value and what is wrong with it, before anything is loaded or created.

mod common;

use common::forkd;

fn one_line_naming(args: &[&str], needles: &[&str]) {
    let home = tempfile::tempdir().unwrap();
    let out = forkd(home.path(), args);
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(1), "{args:?}: {err}");
    assert_eq!(err.trim_end().lines().count(), 1, "not one line: {err}");
    for needle in needles {
        assert!(err.contains(needle), "{needle:?} not in {err}");
    }
}

#[test]
fn malformed_allow_and_publish_values_are_named_in_one_line() {
    one_line_naming(
        &["fork", "--tag", "t", "--allow", "10.0.0.0/33"],
        &[
            "--allow \"10.0.0.0/33\"",
            "prefix length \"33\" is not 0-32",
        ],
    );
    one_line_naming(
        &["fork", "--tag", "t", "--allow", "10.0.0.1:http"],
        &["--allow \"10.0.0.1:http\"", "port \"http\" is not 1-65535"],
    );
    one_line_naming(
        &["fork", "--tag", "t", "--hold", "--publish", "8080"],
        &["--publish \"8080\"", "expected HOST_PORT:GUEST_PORT"],
    );
    one_line_naming(
        &["run", "--tag", "t", "--publish", "80:0", "--", "true"],
        &["--publish \"80:0\"", "port \"0\" is not 1-65535"],
    );
    one_line_naming(
        &[
            "snapshot",
            "--tag",
            "t",
            "--kernel",
            "builtin:net",
            "--allow",
            "example.com",
        ],
        &["--allow \"example.com\"", "is not an IPv4 address"],
    );
}
