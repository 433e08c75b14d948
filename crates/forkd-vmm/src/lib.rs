//! Virtual machine monitor: boots, runs, pauses, snapshots and restores KVM guests.

pub mod acpi;
pub mod devices;
pub mod host;
pub mod memory;
pub mod snapshot;
