//! `forkd image build` end to end: recipes become ext4 images that debugfs (an independent
//! reader) can read the agent and init out of. The busybox image builds in seconds and always
//! runs; the Debian (python-numpy) image takes minutes of debootstrap, so it runs when
//! FORKD_TEST_DEBIAN=1 or when its image is already cached.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;

use forkd_image::cache::cache_root;
use forkd_image::recipe::{self, LoadedRecipe};
use forkd_image::rootfs::{self, BuildOptions};

fn skip(why: &str) {
    let _ = writeln!(std::io::stderr(), "SKIP: {why}");
}

fn repo_recipe(name: &str) -> LoadedRecipe {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("../../recipes/{name}.toml"));
    recipe::load(&path).unwrap()
}

/// A static x86-64 executable to stand in for the agent: Debian's busybox-static. (The agent's
/// own crate builds and tests the real one; here only its bytes matter.)
fn stand_in_agent() -> Option<PathBuf> {
    ["/bin/busybox", "/usr/bin/busybox"]
        .iter()
        .map(PathBuf::from)
        .find(|p| rootfs::check_static_executable(p).is_ok())
}

fn missing_prerequisite() -> Option<String> {
    for tool in ["mkfs.ext4", "debugfs", "e2fsck"] {
        if forkd_image::debian::require_tool(tool, "e2fsprogs", "test").is_err() {
            return Some(format!("{tool} not installed (Debian e2fsprogs)"));
        }
    }
    let apt = Command::new("apt-cache")
        .args(["show", "--no-all-versions", "busybox-static"])
        .output();
    if !apt.is_ok_and(|o| o.status.success() && !o.stdout.is_empty()) {
        return Some("apt does not know busybox-static".into());
    }
    if stand_in_agent().is_none() {
        return Some(
            "no static busybox on this host to stand in for the agent (install busybox-static)"
                .into(),
        );
    }
    None
}

fn debugfs(image: &Path, request: &str) -> String {
    let out = Command::new("debugfs")
        .arg("-R")
        .arg(request)
        .arg(image)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "debugfs {request}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn debugfs_dump(image: &Path, file: &str, to: &Path) -> Vec<u8> {
    debugfs(image, &format!("dump {file} {}", to.display()));
    std::fs::read(to).unwrap()
}

fn assert_fsck_clean(image: &Path) {
    let out = Command::new("e2fsck")
        .arg("-fn")
        .arg(image)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "e2fsck: {}",
        String::from_utf8_lossy(&out.stdout)
    );
}

fn entries(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .map(|d| {
            d.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

#[test]
fn minimal_image_holds_the_agent_and_an_init_that_starts_it() {
    if let Some(why) = missing_prerequisite() {
        skip(&format!("minimal image build: {why}"));
        return;
    }
    let cache = tempfile::tempdir().unwrap();
    let out_dir = tempfile::tempdir().unwrap();
    let agent = stand_in_agent().unwrap();
    let loaded = repo_recipe("minimal");
    let opts = BuildOptions {
        cache_root: cache.path().to_path_buf(),
        agent: agent.clone(),
        output: Some(out_dir.path().join("minimal.ext4")),
    };
    let built = rootfs::build(&loaded, &opts).unwrap();
    assert!(!built.already_present);
    let image = &built.image;
    assert_fsck_clean(image);

    let init = debugfs(image, "cat /sbin/init");
    assert!(init.starts_with("#!/bin/sh\n"), "{init}");
    assert!(init.contains("/usr/bin/forkd-agent '--no-eval'"), "{init}");
    let stat = debugfs(image, "stat /usr/bin/forkd-agent");
    assert!(stat.contains("Mode:  0755"), "{stat}");
    assert!(
        stat.contains(&format!(
            "Size: {}",
            std::fs::metadata(&agent).unwrap().len()
        )),
        "{stat}"
    );
    let dumped = debugfs_dump(image, "/usr/bin/forkd-agent", &out_dir.path().join("agent"));
    assert_eq!(dumped, std::fs::read(&agent).unwrap());
    // busybox applets are symlinks to the one binary; /bin/sh runs the init script.
    // Every command the init script uses is there.
    for applet in [
        "/bin/sh",
        "/bin/mount",
        "/bin/mkdir",
        "/bin/hostname",
        "/bin/sleep",
    ] {
        let stat = debugfs(image, &format!("stat {applet}"));
        assert!(
            stat.contains("Fast link dest: \"/bin/busybox\""),
            "{applet}: {stat}"
        );
    }
    assert!(debugfs(image, "stat /sbin/init").contains("Mode:  0755"));
    let meta = debugfs(image, "cat /etc/forkd/image.json");
    assert!(meta.contains("\"recipe\": \"minimal\""), "{meta}");

    // -o wrote a byte-identical copy.
    let copy = built.output.clone().unwrap();
    assert_eq!(std::fs::read(&copy).unwrap(), std::fs::read(image).unwrap());

    // Building again reuses the cache entry; no staging directory is left behind.
    let again = rootfs::build(&loaded, &opts).unwrap();
    assert!(again.already_present);
    assert_eq!(again.image, built.image);
    assert_eq!(
        entries(&cache.path().join("images")),
        std::slice::from_ref(&built.info.recipe_hash)
    );
}

#[test]
fn recipe_files_land_in_the_image_with_their_modes() {
    if let Some(why) = missing_prerequisite() {
        skip(&format!("recipe files check: {why}"));
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("files")).unwrap();
    std::fs::write(dir.path().join("files/motd"), b"hello from a recipe\n").unwrap();
    std::fs::write(dir.path().join("files/tool.sh"), b"#!/bin/sh\necho hi\n").unwrap();
    let recipe_path = dir.path().join("with-files.toml");
    std::fs::write(
        &recipe_path,
        r#"
name = "with-files"
base = "busybox"
size_mib = 48
[[files]]
src = "files/motd"
dest = "/etc/motd"
[[files]]
src = "files/tool.sh"
dest = "/opt/tools/tool.sh"
mode = 0o750
"#,
    )
    .unwrap();
    let loaded = recipe::load(&recipe_path).unwrap();
    let cache = tempfile::tempdir().unwrap();
    let built = rootfs::build(
        &loaded,
        &BuildOptions {
            cache_root: cache.path().to_path_buf(),
            agent: stand_in_agent().unwrap(),
            output: None,
        },
    )
    .unwrap();
    assert_eq!(built.info.size_bytes, 48 << 20);
    assert_eq!(
        debugfs(&built.image, "cat /etc/motd"),
        "hello from a recipe\n"
    );
    assert!(debugfs(&built.image, "stat /etc/motd").contains("Mode:  0644"));
    assert!(debugfs(&built.image, "stat /opt/tools/tool.sh").contains("Mode:  0750"));

    // Changing a copied file's contents changes the cache key: a new image, not the old one.
    std::fs::write(dir.path().join("files/motd"), b"changed\n").unwrap();
    let rebuilt = rootfs::build(
        &loaded,
        &BuildOptions {
            cache_root: cache.path().to_path_buf(),
            agent: stand_in_agent().unwrap(),
            output: None,
        },
    )
    .unwrap();
    assert!(!rebuilt.already_present);
    assert_ne!(rebuilt.info.recipe_hash, built.info.recipe_hash);
    assert_eq!(debugfs(&rebuilt.image, "cat /etc/motd"), "changed\n");

    // Both builds are listed; the latest for the recipe is the most recently published one.
    // (Backdate the first entry so the order does not depend on timestamp granularity.)
    let epoch = std::fs::FileTimes::new()
        .set_accessed(std::time::UNIX_EPOCH)
        .set_modified(std::time::UNIX_EPOCH);
    std::fs::File::open(built.image.parent().unwrap())
        .and_then(|dir| dir.set_times(epoch))
        .unwrap();
    let listed = rootfs::list(cache.path()).unwrap();
    assert_eq!(listed.len(), 2);
    let latest = rootfs::latest_for_recipe(cache.path(), "with-files")
        .unwrap()
        .unwrap();
    assert_eq!(latest.image, rebuilt.image);
    assert!(rootfs::latest_for_recipe(cache.path(), "other")
        .unwrap()
        .is_none());
}

#[test]
fn bad_build_inputs_fail_cleanly_without_leftovers() {
    if let Some(why) = missing_prerequisite() {
        skip(&format!("image build input checks: {why}"));
        return;
    }
    let cache = tempfile::tempdir().unwrap();
    let loaded = repo_recipe("minimal");
    let opts = |agent: PathBuf, output: Option<PathBuf>| BuildOptions {
        cache_root: cache.path().to_path_buf(),
        agent,
        output,
    };
    // A dynamically linked agent would not run in a busybox image.
    let err = rootfs::build(&loaded, &opts("/bin/sh".into(), None))
        .unwrap_err()
        .to_string();
    assert!(err.contains("dynamically linked"), "{err}");
    let err = rootfs::build(&loaded, &opts("/no/such/agent".into(), None))
        .unwrap_err()
        .to_string();
    assert!(err.contains("/no/such/agent"), "{err}");
    // An output directory that does not exist.
    let agent = stand_in_agent().unwrap();
    let err = rootfs::build(&loaded, &opts(agent, Some("/no/such/dir/x.ext4".into())))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("directory /no/such/dir does not exist"),
        "{err}"
    );
    // An explicit size too small for the content: mkfs fails, nothing is published.
    let mut small = loaded.clone();
    small.recipe.size_mib = Some(16);
    let tiny_agent = cache.path().join("big-agent");
    let mut bytes = std::fs::read(stand_in_agent().unwrap()).unwrap();
    bytes.resize(24 << 20, 0xa5); // still a valid static ELF, now 24 MiB (not zeros: mkfs skips those)
    std::fs::write(&tiny_agent, &bytes).unwrap();
    let err = rootfs::build(&small, &opts(tiny_agent, None))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("image build for recipe minimal") && err.contains("size_mib = 16"),
        "{err}"
    );
    let leftovers: Vec<String> = entries(&cache.path().join("images"));
    assert!(leftovers.is_empty(), "left behind: {leftovers:?}");
}

#[test]
fn python_numpy_image_has_python_numpy_and_the_warm_agent() {
    let Some(agent) = stand_in_agent() else {
        skip("python-numpy image: no static busybox to stand in for the agent");
        return;
    };
    let loaded = repo_recipe("python-numpy");
    let cache = cache_root();
    let hash = rootfs::recipe_hash(&loaded, &forkd_image_sha256(&agent), None).unwrap();
    let cached = rootfs::images_dir(&cache)
        .join(&hash)
        .join("image.json")
        .is_file();
    if !cached && std::env::var_os("FORKD_TEST_DEBIAN").is_none() {
        skip("python-numpy image: debootstrap takes minutes; set FORKD_TEST_DEBIAN=1 to build it (then it is cached)");
        return;
    }
    // SAFETY: geteuid(2) takes no arguments, cannot fail and touches no memory of ours.
    if !cached && unsafe { libc::geteuid() } != 0 {
        skip("python-numpy image: debootstrap needs root");
        return;
    }
    let opts = BuildOptions {
        cache_root: cache,
        agent: agent.clone(),
        output: None,
    };
    let built = rootfs::build(&loaded, &opts).unwrap();
    let image = &built.image;
    assert_fsck_clean(image);
    let init = debugfs(image, "cat /sbin/init");
    assert!(
        init.contains("'--eval-interpreter' 'python3' '--eval-warmup' 'import numpy'"),
        "{init}"
    );
    assert!(debugfs(image, "stat /usr/bin/forkd-agent").contains("Mode:  0755"));
    assert!(debugfs(
        image,
        "stat /usr/lib/python3/dist-packages/numpy/__init__.py"
    )
    .contains("Type: regular"));
    assert!(debugfs(image, "stat /usr/bin/python3").contains("Type: symlink"));
}

fn forkd_image_sha256(path: &Path) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(std::fs::read(path).unwrap()))
}

/// The python-numpy image with the real agent, run the way its /sbin/init runs it, in a chroot
/// of the image's files on this host: the warm interpreter evaluates numpy code without
/// importing it. Needs root (chroot), the cached image, and a static forkd-agent
/// (FORKD_AGENT_BIN, else built by crates/forkd-agent/build-static.sh, as `forkd image build`
/// does).
#[test]
fn python_numpy_image_evaluates_numpy_in_the_warm_interpreter_with_the_real_agent() {
    // SAFETY: geteuid(2) takes no arguments, cannot fail and touches no memory of ours.
    if unsafe { libc::geteuid() } != 0 {
        skip("python-numpy eval check: chroot needs root");
        return;
    }
    // The image built with the stand-in agent (see the test above); the real agent is swapped in.
    let Some(stand_in) = stand_in_agent() else {
        skip("python-numpy eval check: no static busybox (the image is keyed by it)");
        return;
    };
    let loaded = repo_recipe("python-numpy");
    let hash = rootfs::recipe_hash(&loaded, &forkd_image_sha256(&stand_in), None).unwrap();
    let image = rootfs::images_dir(&cache_root())
        .join(&hash)
        .join("rootfs.ext4");
    if !image.is_file() {
        skip("python-numpy eval check: image not cached (run with FORKD_TEST_DEBIAN=1 once)");
        return;
    }
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
    let real_agent = match forkd_image::agent::resolve_agent(None, &[repo]) {
        Ok(agent) => agent,
        Err(e) => {
            skip(&format!(
                "python-numpy eval check: no static forkd-agent: {e}"
            ));
            return;
        }
    };
    rootfs::check_static_executable(&real_agent).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root");
    std::fs::create_dir(&root).unwrap();
    debugfs(&image, &format!("rdump / {}", root.display()));
    // debugfs does not recreate device nodes; the guest's init mounts devtmpfs there instead.
    for (name, minor) in [("null", 3), ("zero", 5), ("random", 8), ("urandom", 9)] {
        let path = std::ffi::CString::new(root.join("dev").join(name).to_str().unwrap()).unwrap();
        // SAFETY: mknod(2) only reads the NUL-terminated path during the call, and it comes
        // from `path`, a CString that outlives it; the other arguments are integers.
        let rc = unsafe {
            libc::mknod(
                path.as_ptr(),
                libc::S_IFCHR | 0o666,
                libc::makedev(1, minor),
            )
        };
        assert_eq!(rc, 0, "mknod /dev/{name}");
    }
    std::fs::copy(&real_agent, root.join("usr/bin/forkd-agent")).unwrap();

    // The agent command line exactly as the image's init has it, plus host-mode flags.
    let init = std::fs::read_to_string(root.join("sbin/init")).unwrap();
    let agent_line = init
        .lines()
        .map(str::trim)
        .find(|l| l.starts_with("/usr/bin/forkd-agent"))
        .unwrap()
        .to_string();
    let mut agent = Command::new("chroot")
        .arg(&root)
        .args(["/bin/sh", "-c"])
        .arg(format!(
            "exec {agent_line} --unix /tmp/agent.sock --no-ready-vsock --skip-clock-set"
        ))
        .env_clear()
        .env(
            "PATH",
            "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        )
        .env("HOME", "/root")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let socket = root.join("tmp/agent.sock");
    let result = agent_client::eval_when_ready(&socket, "numpy.zeros(5).tolist()");
    let _ = agent.kill();
    let _ = agent.wait();
    let reply = result.unwrap();
    assert_eq!(reply["type"], "result", "{reply}");
    assert_eq!(
        reply["result"]["value"], "[0.0, 0.0, 0.0, 0.0, 0.0]",
        "{reply}"
    );
    assert!(reply["result"]["error"].is_null(), "{reply}");
}

/// Just enough of the agent's framed protocol ("FKA1", u32 BE header and payload lengths, JSON
/// header) to ping and eval.
mod agent_client {
    use std::io::{Read, Write};
    use std::os::unix::net::UnixStream;
    use std::path::Path;

    fn send(s: &mut UnixStream, header: serde_json::Value) -> std::io::Result<()> {
        let h = header.to_string().into_bytes();
        let mut frame = b"FKA1".to_vec();
        frame.extend_from_slice(&(h.len() as u32).to_be_bytes());
        frame.extend_from_slice(&0u32.to_be_bytes());
        frame.extend_from_slice(&h);
        s.write_all(&frame)
    }

    fn recv(s: &mut UnixStream) -> std::io::Result<serde_json::Value> {
        let mut prefix = [0u8; 12];
        s.read_exact(&mut prefix)?;
        let hl = u32::from_be_bytes(prefix[4..8].try_into().unwrap()) as usize;
        let pl = u32::from_be_bytes(prefix[8..12].try_into().unwrap()) as usize;
        let mut body = vec![0u8; hl + pl];
        s.read_exact(&mut body)?;
        Ok(serde_json::from_slice(&body[..hl]).unwrap())
    }

    /// Waits (bounded by attempts, not time) for the socket and the warm interpreter, then evals.
    pub fn eval_when_ready(socket: &Path, code: &str) -> Result<serde_json::Value, String> {
        for _attempt in 0..600 {
            std::thread::sleep(std::time::Duration::from_millis(100));
            let Ok(mut s) = UnixStream::connect(socket) else {
                continue;
            };
            send(&mut s, serde_json::json!({"v": 1, "id": 1, "op": "ping"}))
                .map_err(|e| e.to_string())?;
            let ping = recv(&mut s).map_err(|e| e.to_string())?;
            let eval = &ping["result"]["eval"];
            if !eval["error"].is_null() {
                return Err(format!("eval interpreter failed: {ping}"));
            }
            if eval["ready"] != true {
                continue;
            }
            send(&mut s, serde_json::json!({"v": 1, "id": 2, "op": "eval", "code": code, "timeout_ms": 60000}))
                .map_err(|e| e.to_string())?;
            return recv(&mut s).map_err(|e| e.to_string());
        }
        Err(format!(
            "the agent never became ready on {}",
            socket.display()
        ))
    }
}

/// Every recipe's image holds what the recipe promises: its `[snapshot] provides` files, its
/// apt packages installed, its pip packages present. Built with the real agent, so the images
/// are the ones `scripts/hub-build.sh` and the lab boot (cached by the same key). Debian images
/// take minutes each: built when FORKD_TEST_DEBIAN=1, else checked only where cached.
#[test]
fn every_recipe_image_holds_what_it_provides() {
    // SAFETY: geteuid(2) takes no arguments, cannot fail and touches no memory of ours.
    let root = unsafe { libc::geteuid() } == 0;
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
    let agent = match forkd_image::agent::resolve_agent(None, &[repo]) {
        Ok(agent) => agent,
        Err(e) => return skip(&format!("recipe images: no static forkd-agent: {e}")),
    };
    let build_all = std::env::var_os("FORKD_TEST_DEBIAN").is_some() && root;
    let mut checked = Vec::new();
    let mut skipped = Vec::new();
    for loaded in all_repo_recipes() {
        let name = loaded.recipe.name.clone();
        if loaded.recipe.base != recipe::Base::Debian {
            continue;
        }
        let hash = rootfs::recipe_hash(&loaded, &forkd_image_sha256(&agent), None).unwrap();
        let cached = rootfs::images_dir(&cache_root())
            .join(&hash)
            .join("image.json")
            .is_file();
        if !cached && !build_all {
            skipped.push(name);
            continue;
        }
        let opts = BuildOptions {
            cache_root: cache_root(),
            agent: agent.clone(),
            output: None,
        };
        let built = rootfs::build(&loaded, &opts).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_promises(&loaded, &built.image);
        checked.push(name);
    }
    if !skipped.is_empty() {
        skip(&format!(
            "recipe images not built (debootstrap takes minutes each; FORKD_TEST_DEBIAN=1 as root builds them): {}",
            skipped.join(", ")
        ));
    }
    eprintln!("recipe images checked: {}", checked.join(", "));
}

fn all_repo_recipes() -> Vec<LoadedRecipe> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../recipes");
    let mut paths: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "toml"))
        .collect();
    paths.sort();
    paths.iter().map(|p| recipe::load(p).unwrap()).collect()
}

fn assert_promises(loaded: &LoadedRecipe, image: &Path) {
    let r = &loaded.recipe;
    let provides = r
        .snapshot
        .as_ref()
        .map(|s| s.provides.clone())
        .unwrap_or_default();
    for path in &provides {
        let stat = debugfs(image, &format!("stat {path}"));
        assert!(
            stat.contains("Type: "),
            "{}: {path} missing: {stat}",
            r.name
        );
    }
    let status = debugfs(image, "cat /var/lib/dpkg/status");
    let installed: std::collections::HashSet<&str> = status
        .split("\n\n")
        .filter(|para| para.contains("\nStatus: install ok installed"))
        .filter_map(|para| para.lines().find_map(|l| l.strip_prefix("Package: ")))
        .collect();
    for package in &r.packages {
        assert!(
            installed.contains(package.as_str()),
            "{}: apt package {package} not installed",
            r.name
        );
    }
    if !r.pip.is_empty() {
        let listing =
            debugfs(image, "ls -l /usr/local/lib/python3.11/dist-packages").to_lowercase();
        for requirement in &r.pip {
            let name: String = requirement
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '-' || *c == '_' || *c == '.')
                .collect::<String>()
                .to_lowercase()
                .replace('-', "_");
            assert!(
                listing.contains(&format!("{name}-")) && listing.contains(".dist-info"),
                "{}: pip package {requirement} not installed",
                r.name
            );
        }
    }
}
