/*
 * A small polling virtio-mmio (version 2) driver library for forkd's test guests: device
 * discovery over the VMM's virtio-mmio slots, the status/feature handshake, split virtqueues
 * with a descriptor free list, submit / kick / poll. No interrupts, no SSE; memory is identity
 * mapped so guest-virtual addresses are the physical addresses the device sees.
 */
#ifndef FORKD_VIRTIO_H
#define FORKD_VIRTIO_H

#include "forkd_guest.h"

#define VIRTIO_ID_NET 1
#define VIRTIO_ID_BLOCK 2
#define VIRTIO_ID_RNG 4
#define VIRTIO_ID_VSOCK 19

#define VIRTIO_F_VERSION_1 (1ULL << 32)

#define VRING_DESC_F_NEXT 1
#define VRING_DESC_F_WRITE 2

struct vring_desc {
    uint64_t addr;
    uint32_t len;
    uint16_t flags;
    uint16_t next;
};

struct vring_used_elem {
    uint32_t id;
    uint32_t len;
};

struct virtq {
    uint16_t size;
    uint16_t index;
    volatile struct vring_desc *desc;
    volatile uint16_t *avail; /* flags, idx, ring[size], used_event */
    volatile uint16_t *used;  /* flags, idx, then elems */
    uint16_t free_head;
    uint16_t num_free;
    uint16_t last_used;
    uint16_t avail_idx;
    uint64_t notify_addr;
    uint16_t chain_len[256];
};

struct virtio_dev {
    uint64_t base;
    uint32_t device_id;
    int slot;
};

struct vbuf {
    uint64_t addr;
    uint32_t len;
    int writable;
};

/* Finds the first device of `device_id` in the virtio-mmio slots; 0 on success. */
int virtio_find(uint32_t device_id, struct virtio_dev *dev);
/*
 * Resets the device, negotiates VERSION_1 | `features` (must be offered), sets up `nq` queues of
 * `qsize` entries (power of two, <= 256), and sets DRIVER_OK. 0 on success, else a negative step
 * number (printed by the caller).
 */
int virtio_init(struct virtio_dev *dev, uint64_t features, struct virtq *qs, int nq, uint16_t qsize);
uint32_t virtio_status(const struct virtio_dev *dev);
uint32_t virtio_config_read32(const struct virtio_dev *dev, uint32_t offset);

/* Adds a chain of `n` buffers and publishes it (no kick); returns its head, or -1 when full. */
int virtq_add(struct virtq *q, const struct vbuf *bufs, int n);
/* Tells the device there is work (a write to the notify register; an ioeventfd in the VMM). */
void virtq_kick(struct virtq *q);
/* Takes the next used chain: returns its head (and its written length in *len), or -1 if none. */
int virtq_poll(struct virtq *q, uint32_t *len);
/* Spins until a chain is used; returns its head, or -1 after `spins` polls. */
int virtq_wait(struct virtq *q, uint32_t *len, uint64_t spins);

/* Reads the interrupt-status register and acknowledges what it reported; returns it (bit 0:
 * used buffers, bit 1: configuration change). */
uint32_t virtio_ack_interrupt(struct virtio_dev *dev);
/* Acknowledges both interrupt causes without reading the status first (for a driver that polls
 * every queue after the interrupt anyway). */
void virtio_ack_all_interrupts(struct virtio_dev *dev);

#endif
