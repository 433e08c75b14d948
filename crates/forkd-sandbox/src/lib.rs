//! The sandbox manager: turns a snapshot into running children, each in its own process.

pub mod floor;
pub mod proc_mem;
pub mod stats;
