//! The sandbox manager: turns a snapshot into running children, each in its own process.

pub mod cgroup;
pub mod exec;
pub mod floor;
pub mod fork;
pub mod inbox;
pub mod jail;
pub mod net;
pub mod pool;
pub mod proc_mem;
pub mod process;
pub mod run;
pub mod run_dirs;
pub mod stats;
pub mod vm_child;
pub mod zygote;
