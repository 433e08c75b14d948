//! Per-process memory as the kernel accounts it (`/proc/PID/smaps_rollup`).
//!
//! USS (pages only this process maps) is what a child really costs; PSS splits shared pages
//! (memory.bin's page cache, the zygote's pages) between the processes sharing them.

use serde::Serialize;

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct ProcMem {
    pub rss_kib: u64,
    pub pss_kib: u64,
    /// Private_Clean + Private_Dirty + Private_Hugetlb.
    pub uss_kib: u64,
}

/// Reads `/proc/<pid>/smaps_rollup`.
pub fn read(pid: u32) -> std::io::Result<ProcMem> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup"))?;
    Ok(parse(&text))
}

fn parse(text: &str) -> ProcMem {
    let mut m = ProcMem::default();
    for line in text.lines() {
        let mut parts = line.split_whitespace();
        let (Some(key), Some(value)) = (parts.next(), parts.next()) else {
            continue;
        };
        let Ok(kib) = value.parse::<u64>() else {
            continue;
        };
        match key {
            "Rss:" => m.rss_kib = kib,
            "Pss:" => m.pss_kib = kib,
            "Private_Clean:" | "Private_Dirty:" | "Private_Hugetlb:" => m.uss_kib += kib,
            _ => {}
        }
    }
    m
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_rollup() {
        let text = "55d0-7ffd ---p 00000000 00:00 0  [rollup]\nRss:  1000 kB\nPss:  400 kB\n\
                    Pss_Anon: 10 kB\nShared_Clean: 600 kB\nPrivate_Clean: 100 kB\nPrivate_Dirty: 300 kB\n\
                    Private_Hugetlb: 0 kB\n";
        assert_eq!(
            parse(text),
            ProcMem {
                rss_kib: 1000,
                pss_kib: 400,
                uss_kib: 400
            }
        );
    }

    #[test]
    fn reads_a_process_and_sees_its_private_writes() {
        // Measured in a forked child: in the test process, sibling tests that fork turn this
        // process's pages shared (copy-on-write) for a while, which moves its USS.
        let pid = crate::process::fork_child(&[], || {
            let before = read(std::process::id()).unwrap();
            let mut block = vec![0u8; 16 << 20];
            for b in block.iter_mut().step_by(4096) {
                *b = 1;
            }
            let after = read(std::process::id()).unwrap();
            std::hint::black_box(&block);
            i32::from(after.uss_kib < before.uss_kib + 15 * 1024 || after.pss_kib < after.uss_kib)
        })
        .unwrap();
        assert_eq!(
            crate::process::wait(pid).unwrap(),
            crate::process::ExitStatus::Code(0)
        );
    }
}
