//! The initramfs: a newc cpio archive (compressed with gzip or zstd) holding busybox-static,
//! the modules the guest needs before it can see its root disk, and a small `/init`.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use crate::error::{Error, IoContext, Result};

/// Compression the kernel must be able to unpack (CONFIG_RD_GZIP / CONFIG_RD_ZSTD).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Compression {
    Gzip,
    Zstd,
}

impl Compression {
    /// The best format a kernel config (`boot/config-*` contents) says the kernel can unpack.
    pub fn for_kernel_config(config: &str) -> Option<Self> {
        let enabled = |opt: &str| config.lines().any(|l| l.trim() == format!("{opt}=y"));
        if enabled("CONFIG_RD_ZSTD") {
            Some(Compression::Zstd)
        } else if enabled("CONFIG_RD_GZIP") {
            Some(Compression::Gzip)
        } else {
            None
        }
    }
}

/// One thing to put in the archive.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Entry {
    Dir {
        path: String,
    },
    /// A regular file copied from the host.
    File {
        path: String,
        source: PathBuf,
        mode: u32,
    },
    /// A regular file with the given contents.
    Data {
        path: String,
        data: Vec<u8>,
        mode: u32,
    },
    Symlink {
        path: String,
        target: String,
    },
    /// A character device node (e.g. /dev/console, which the kernel opens before /init).
    CharDev {
        path: String,
        major: u32,
        minor: u32,
        mode: u32,
    },
}

const S_IFDIR: u32 = 0o040000;
const S_IFREG: u32 = 0o100000;
const S_IFLNK: u32 = 0o120000;
const S_IFCHR: u32 = 0o020000;

/// Writes `entries` as a compressed newc archive to `out`. Timestamps are zero and owners root,
/// so the same inputs give the same bytes.
pub fn write_archive(entries: &[Entry], compression: Compression, out: &Path) -> Result<()> {
    let file = std::fs::File::create(out).at(out)?;
    let sink: Box<dyn Write> = match compression {
        Compression::Gzip => Box::new(flate2::write::GzEncoder::new(
            file,
            flate2::Compression::default(),
        )),
        Compression::Zstd => Box::new(zstd::Encoder::new(file, 3).at(out)?.auto_finish()),
    };
    let mut sink = std::io::BufWriter::new(sink);
    for (index, entry) in entries.iter().enumerate() {
        write_entry(&mut sink, entry, index as u32 + 1)?;
    }
    let mut sink = cpio::newc::trailer(sink).at(out)?;
    sink.flush().at(out)?;
    // Dropping the encoder writes its final frame.
    drop(
        sink.into_inner()
            .map_err(|e| Error::io(out, e.into_error()))?,
    );
    Ok(())
}

fn write_entry<W: Write>(w: &mut W, entry: &Entry, ino: u32) -> Result<()> {
    let header = |path: &str, mode: u32| {
        cpio::newc::Builder::new(path)
            .ino(ino)
            .mode(mode)
            .uid(0)
            .gid(0)
            .nlink(1)
            .mtime(0)
    };
    let (builder, data): (_, Vec<u8>) = match entry {
        Entry::Dir { path } => (header(path, S_IFDIR | 0o755).nlink(2), Vec::new()),
        Entry::File { path, source, mode } => {
            let mut data = Vec::new();
            std::fs::File::open(source)
                .and_then(|mut f| f.read_to_end(&mut data))
                .at(source)?;
            (header(path, S_IFREG | mode), data)
        }
        Entry::Data { path, data, mode } => (header(path, S_IFREG | mode), data.clone()),
        Entry::Symlink { path, target } => {
            (header(path, S_IFLNK | 0o777), target.as_bytes().to_vec())
        }
        Entry::CharDev {
            path,
            major,
            minor,
            mode,
        } => (
            header(path, S_IFCHR | mode)
                .rdev_major(*major)
                .rdev_minor(*minor),
            Vec::new(),
        ),
    };
    let size = u32::try_from(data.len())
        .map_err(|_| Error::Other(format!("{}: too large for a cpio entry", entry_path(entry))))?;
    let mut writer = builder.write(&mut *w, size);
    writer.write_all(&data).at(entry_path(entry))?;
    writer.finish().at(entry_path(entry))?;
    Ok(())
}

fn entry_path(entry: &Entry) -> &str {
    match entry {
        Entry::Dir { path }
        | Entry::File { path, .. }
        | Entry::Data { path, .. }
        | Entry::Symlink { path, .. }
        | Entry::CharDev { path, .. } => path,
    }
}

/// Adds a `Dir` entry for every missing parent of `path` (archives list parents first).
pub fn with_parents(entries: &mut Vec<Entry>, path: &str) {
    let mut prefix = String::new();
    let parts: Vec<&str> = path.split('/').collect();
    for part in &parts[..parts.len().saturating_sub(1)] {
        if !prefix.is_empty() {
            prefix.push('/');
        }
        prefix.push_str(part);
        let exists = entries
            .iter()
            .any(|e| matches!(e, Entry::Dir { path } if *path == prefix));
        if !exists {
            entries.push(Entry::Dir {
                path: prefix.clone(),
            });
        }
    }
}

/// The `/init` script: mount the pseudo filesystems, insmod `modules` (paths relative to
/// `/lib/modules/<release>`, dependencies first), wait for the root disk, mount it and
/// switch_root to its init.
///
/// Kernel command line knobs (read from /proc/cmdline): `root=` (default /dev/vda),
/// `rootfstype=` (default ext4), `ro`/`rw` (default rw), `forkd.init=` (default /sbin/init,
/// else /usr/bin/forkd-agent), `ip=<client>::<gateway>:<netmask>::<device>:off` (the kernel's
/// static form; the kernel cannot apply it itself because virtio_net is a module, so /init
/// does once the module is loaded — the interface is up in the snapshot and in every child),
/// `forkd.dns=<addr>[,<addr>]` (written to the root's /etc/resolv.conf).
pub fn init_script(release: &str, modules: &[String]) -> String {
    let module_list = modules.join(" ");
    format!(
        r#"#!/bin/sh
# forkd initramfs /init, generated by forkd kernel fetch.
export PATH=/bin:/sbin
/bin/busybox --install -s /bin
mkdir -p /proc /sys /dev /newroot
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev

# A hardware-reduced ACPI VM has no power-off register, so give up through a reset (the
# kernel's reboot=k path), which the VMM sees as the VM stopping.
fail() {{
    echo "forkd-init: $*" >&2
    echo "forkd-init: cannot continue, resetting the VM" >&2
    sleep 1
    reboot -f
}}

for m in {module_list}; do
    insmod "/lib/modules/{release}/$m" || fail "insmod $m failed"
done

root=/dev/vda
rootfstype=ext4
mode=rw
init=
ipconf=
dns=
for arg in $(cat /proc/cmdline); do
    case "$arg" in
        root=*) root="${{arg#root=}}" ;;
        rootfstype=*) rootfstype="${{arg#rootfstype=}}" ;;
        ro|rw) mode="$arg" ;;
        forkd.init=*) init="${{arg#forkd.init=}}" ;;
        ip=*) ipconf="${{arg#ip=}}" ;;
        forkd.dns=*) dns="${{arg#forkd.dns=}}" ;;
    esac
done

# Bits set in a dotted netmask (255.255.255.0 -> 24).
mask_bits() {{
    bits=0
    for o in $(echo "$1" | tr . ' '); do
        case "$o" in
            255) bits=$((bits + 8)) ;; 254) bits=$((bits + 7)) ;; 252) bits=$((bits + 6)) ;;
            248) bits=$((bits + 5)) ;; 240) bits=$((bits + 4)) ;; 224) bits=$((bits + 3)) ;;
            192) bits=$((bits + 2)) ;; 128) bits=$((bits + 1)) ;;
        esac
    done
    echo "$bits"
}}

# Static network configuration from ip=<client>::<gateway>:<netmask>::<device>:off.
configure_net() {{
    client=$(echo "$1" | cut -d: -f1)
    gateway=$(echo "$1" | cut -d: -f3)
    netmask=$(echo "$1" | cut -d: -f4)
    dev=$(echo "$1" | cut -d: -f6)
    [ -n "$dev" ] || dev=eth0
    tries=0
    while [ ! -e "/sys/class/net/$dev" ] && [ $tries -lt 100 ]; do
        sleep 0.05
        tries=$((tries + 1))
    done
    [ -e "/sys/class/net/$dev" ] || {{ echo "forkd-init: no network interface $dev" >&2; return; }}
    ip link set lo up
    ip addr add "$client/$(mask_bits "${{netmask:-255.255.255.0}}")" dev "$dev"
    ip link set "$dev" up
    [ -n "$gateway" ] && ip route add default via "$gateway"
}}
[ -n "$ipconf" ] && configure_net "$ipconf"

# The disk appears once virtio_blk has probed its device; give it up to 5 seconds.
tries=0
while [ ! -b "$root" ] && [ $tries -lt 100 ]; do
    sleep 0.05
    tries=$((tries + 1))
done
[ -b "$root" ] || fail "root device $root did not appear"
mount -t "$rootfstype" -o "$mode" "$root" /newroot || fail "cannot mount $root ($rootfstype) on /newroot"

if [ -z "$init" ]; then
    if [ -x /newroot/sbin/init ]; then
        init=/sbin/init
    elif [ -x /newroot/usr/bin/forkd-agent ]; then
        init=/usr/bin/forkd-agent
    else
        fail "$root has neither /sbin/init nor /usr/bin/forkd-agent"
    fi
fi
[ -x "/newroot$init" ] || fail "$init is not an executable on $root"

if [ -n "$dns" ] && [ -d /newroot/etc ]; then
    rm -f /newroot/etc/resolv.conf
    for d in $(echo "$dns" | tr , ' '); do echo "nameserver $d"; done > /newroot/etc/resolv.conf
fi

mount --move /dev /newroot/dev 2>/dev/null || umount /dev
umount /proc /sys
exec switch_root /newroot "$init"
"#
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compression_follows_the_kernel_config() {
        assert_eq!(
            Compression::for_kernel_config("CONFIG_RD_GZIP=y\nCONFIG_RD_ZSTD=y\n"),
            Some(Compression::Zstd)
        );
        assert_eq!(
            Compression::for_kernel_config("CONFIG_RD_GZIP=y\n# CONFIG_RD_ZSTD is not set\n"),
            Some(Compression::Gzip)
        );
        assert_eq!(Compression::for_kernel_config("CONFIG_RD_XZ=y\n"), None);
    }

    #[test]
    fn parents_are_added_once_in_order() {
        let mut entries = Vec::new();
        with_parents(&mut entries, "lib/modules/6.1/kernel/a.ko");
        with_parents(&mut entries, "lib/modules/6.1/kernel/b.ko");
        let dirs: Vec<_> = entries.iter().map(|e| entry_path(e).to_string()).collect();
        assert_eq!(
            dirs,
            [
                "lib",
                "lib/modules",
                "lib/modules/6.1",
                "lib/modules/6.1/kernel"
            ]
        );
    }

    /// Reads an archive back with the cpio crate's reader: names, modes and contents.
    fn read_back(path: &Path, compression: Compression) -> Vec<(String, u32, Vec<u8>)> {
        let file = std::fs::File::open(path).unwrap();
        let mut input: Box<dyn Read> = match compression {
            Compression::Gzip => Box::new(flate2::read::GzDecoder::new(file)),
            Compression::Zstd => Box::new(zstd::Decoder::new(file).unwrap()),
        };
        let mut out = Vec::new();
        loop {
            let mut reader = cpio::NewcReader::new(input).unwrap();
            if reader.entry().is_trailer() {
                break;
            }
            let name = reader.entry().name().to_string();
            let mode = reader.entry().mode();
            let mut data = Vec::new();
            reader.read_to_end(&mut data).unwrap();
            out.push((name, mode, data));
            input = reader.finish().unwrap();
        }
        out
    }

    #[test]
    fn archives_round_trip_in_both_formats() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("src");
        std::fs::write(&src, b"file body").unwrap();
        let entries = vec![
            Entry::Dir { path: "bin".into() },
            Entry::File {
                path: "bin/busybox".into(),
                source: src.clone(),
                mode: 0o755,
            },
            Entry::Symlink {
                path: "bin/sh".into(),
                target: "busybox".into(),
            },
            Entry::CharDev {
                path: "console".into(),
                major: 5,
                minor: 1,
                mode: 0o600,
            },
            Entry::Data {
                path: "init".into(),
                data: b"#!/bin/sh\n".to_vec(),
                mode: 0o755,
            },
        ];
        for compression in [Compression::Gzip, Compression::Zstd] {
            let out = dir.path().join(format!("{compression:?}.img"));
            write_archive(&entries, compression, &out).unwrap();
            let got = read_back(&out, compression);
            assert_eq!(got.len(), 5);
            assert_eq!(
                got[1],
                ("bin/busybox".into(), S_IFREG | 0o755, b"file body".to_vec())
            );
            assert_eq!(
                got[2],
                ("bin/sh".into(), S_IFLNK | 0o777, b"busybox".to_vec())
            );
            assert_eq!(got[3].1, S_IFCHR | 0o600);
            assert_eq!(got[4].2, b"#!/bin/sh\n");
        }
    }

    #[test]
    fn the_init_script_is_valid_shell_and_loads_modules_in_order() {
        let script = init_script("6.1.0-x", &["kernel/a.ko".into(), "kernel/b.ko".into()]);
        assert!(script.contains("for m in kernel/a.ko kernel/b.ko; do"));
        assert!(script.contains("insmod \"/lib/modules/6.1.0-x/$m\""));
        assert!(script.contains("exec switch_root /newroot \"$init\""));
        let Ok(sh) = std::process::Command::new("sh")
            .arg("-n")
            .arg("-c")
            .arg(&script)
            .output()
        else {
            let _ = writeln!(
                std::io::stderr(),
                "SKIP: no sh on this host to syntax-check /init"
            );
            return;
        };
        assert!(
            sh.status.success(),
            "{}",
            String::from_utf8_lossy(&sh.stderr)
        );
    }

    #[test]
    fn the_init_script_reads_a_static_network_and_resolvers_from_the_command_line() {
        let script = init_script("6.1.0-x", &[]);
        assert!(script.contains("ip=*) ipconf=\"${arg#ip=}\""));
        assert!(script.contains("forkd.dns=*) dns=\"${arg#forkd.dns=}\""));
        // The netmask helper, run on its own: dotted masks become prefix lengths.
        let start = script.find("mask_bits() {").unwrap();
        let end = start + script[start..].find("\n}\n").unwrap() + 3;
        let probe = format!(
            "{}\nmask_bits 255.255.255.0; mask_bits 255.255.252.0; mask_bits 255.255.255.255",
            &script[start..end]
        );
        let Ok(out) = std::process::Command::new("sh")
            .arg("-c")
            .arg(&probe)
            .output()
        else {
            let _ = writeln!(
                std::io::stderr(),
                "SKIP: no sh on this host to run mask_bits"
            );
            return;
        };
        assert_eq!(String::from_utf8_lossy(&out.stdout), "24\n22\n32\n");
    }
}
