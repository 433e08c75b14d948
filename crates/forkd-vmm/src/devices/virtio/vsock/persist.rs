//! What survives a snapshot: only the guest CID and a pending transport reset. Connections
//! never do (their host sockets belong to the process that saved the snapshot), so a restored
//! device tells the guest with VIRTIO_VSOCK_EVENT_TRANSPORT_RESET.

use serde::{Deserialize, Serialize};

use super::Vsock;

/// Device state worth saving (connections never survive a snapshot).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VsockState {
    pub guest_cid: u64,
    pub pending_transport_reset: bool,
}

impl Vsock {
    pub fn save_state(&self) -> VsockState {
        VsockState {
            guest_cid: self.guest_cid,
            pending_transport_reset: self.pending_transport_reset,
        }
    }

    /// Applies saved device state to this (new) device: only the pending transport reset
    /// carries over. The guest CID stays the one this device was created with; a Linux guest
    /// re-reads it when it handles the transport reset.
    pub fn restore_state(&mut self, state: &VsockState) {
        if state.pending_transport_reset {
            self.pending_transport_reset = true;
            self.deliver_events();
        }
    }

    /// Queues VIRTIO_VSOCK_EVENT_TRANSPORT_RESET for the guest (delivered as soon as the event
    /// queue has a buffer) and drops every connection: after a snapshot/restore the guest's
    /// streams refer to host sockets that no longer exist.
    pub fn queue_transport_reset(&mut self) {
        self.pending_transport_reset = true;
        self.drop_all_connections();
        self.deliver_events();
    }

    pub fn transport_reset_pending(&self) -> bool {
        self.pending_transport_reset
    }
}
