//! virtio-rng (entropy device): every device-writable buffer is filled from the host's
//! getrandom.

use std::sync::Arc;

use virtio_queue::Queue;

use super::queue::{add_used, needs_notification, pop_chain};
use super::{Interrupt, VirtioDevice, VirtioError, TYPE_RNG, VIRTIO_F_VERSION_1};
use crate::devices::virtio::Active;
use crate::memory::GuestMemory;

const QUEUE_SIZES: [u16; 1] = [256];
pub(crate) const QUEUE_COUNT: usize = QUEUE_SIZES.len();
/// Upper bound on bytes served per request, so one chain cannot make the VMM allocate
/// arbitrarily much.
pub const MAX_REQUEST_BYTES: u64 = 64 * 1024;

#[derive(Default)]
pub struct Rng {
    active: Option<Active>,
}

impl Rng {
    pub fn new() -> Rng {
        Rng::default()
    }
}

impl VirtioDevice for Rng {
    fn device_type(&self) -> u32 {
        TYPE_RNG
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &QUEUE_SIZES
    }

    fn avail_features(&self) -> u64 {
        VIRTIO_F_VERSION_1
    }

    fn read_config(&self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn activate(
        &mut self,
        mem: GuestMemory,
        queues: Vec<Queue>,
        interrupt: Arc<Interrupt>,
    ) -> Result<(), VirtioError> {
        self.active = Some(Active::new(mem, queues, interrupt, QUEUE_COUNT)?);
        Ok(())
    }

    fn reset(&mut self) {
        self.active = None;
    }

    fn is_activated(&self) -> bool {
        self.active.is_some()
    }

    fn process_queue(&mut self, index: usize) {
        let Some(active) = self.active.as_mut() else {
            return;
        };
        if index != 0 {
            return;
        }
        let queue = &mut active.queues[0];
        let mut used_any = false;
        loop {
            let chain = match pop_chain(queue, &active.mem) {
                Ok(Some(chain)) => chain,
                Ok(None) => break,
                Err(e) => {
                    tracing::warn!("virtio-rng: {e}; device needs reset");
                    active.interrupt.mark_needs_reset();
                    break;
                }
            };
            let mut written = 0u32;
            if chain.is_well_formed() && chain.readable.is_empty() {
                let len = chain.writable.len().min(MAX_REQUEST_BYTES) as usize;
                let mut bytes = vec![0u8; len];
                match getrandom::fill(&mut bytes) {
                    Ok(()) => {
                        if chain.writable.write_at(&active.mem, 0, &bytes).is_ok() {
                            written = len as u32;
                        }
                    }
                    Err(e) => tracing::error!("virtio-rng: getrandom failed: {e}"),
                }
            } else {
                tracing::warn!("virtio-rng: malformed request chain {}", chain.head);
            }
            used_any |= add_used(queue, &active.mem, chain.head, written);
        }
        if used_any && needs_notification(queue, &active.mem) {
            active.interrupt.signal_used_queue();
        }
    }

    fn queues(&self) -> &[Queue] {
        self.active.as_ref().map_or(&[], |a| &a.queues)
    }
}
