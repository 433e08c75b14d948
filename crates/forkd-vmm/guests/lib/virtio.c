/* Polling virtio-mmio driver for test guests: see virtio.h. */
#include "virtio.h"

#define REG_MAGIC 0x00
#define REG_VERSION 0x04
#define REG_DEVICE_ID 0x08
#define REG_DEVICE_FEATURES 0x10
#define REG_DEVICE_FEATURES_SEL 0x14
#define REG_DRIVER_FEATURES 0x20
#define REG_DRIVER_FEATURES_SEL 0x24
#define REG_QUEUE_SEL 0x30
#define REG_QUEUE_NUM_MAX 0x34
#define REG_QUEUE_NUM 0x38
#define REG_QUEUE_READY 0x44
#define REG_QUEUE_NOTIFY 0x50
#define REG_INTERRUPT_STATUS 0x60
#define REG_INTERRUPT_ACK 0x64
#define REG_STATUS 0x70
#define REG_QUEUE_DESC_LOW 0x80
#define REG_QUEUE_DESC_HIGH 0x84
#define REG_QUEUE_DRIVER_LOW 0x90
#define REG_QUEUE_DRIVER_HIGH 0x94
#define REG_QUEUE_DEVICE_LOW 0xa0
#define REG_QUEUE_DEVICE_HIGH 0xa4
#define REG_CONFIG 0x100

#define STATUS_ACKNOWLEDGE 1
#define STATUS_DRIVER 2
#define STATUS_DRIVER_OK 4
#define STATUS_FEATURES_OK 8

/* Ring memory for every queue of every device a guest uses (bump-allocated, never freed). */
static uint8_t ring_pool[16 * 3 * 4096] __attribute__((aligned(4096)));
static uint64_t ring_pool_used;

static uint64_t ring_alloc(uint64_t size) {
    uint64_t at = (ring_pool_used + 4095) & ~4095UL;
    if (at + size > sizeof(ring_pool)) return 0;
    ring_pool_used = at + size;
    return (uint64_t)ring_pool + at;
}

static uint32_t rd(const struct virtio_dev *d, uint32_t off) { return mmio_read32(d->base + off); }
static void wr(const struct virtio_dev *d, uint32_t off, uint32_t v) { mmio_write32(d->base + off, v); }

int virtio_find(uint32_t device_id, struct virtio_dev *dev) {
    for (int slot = 0; slot < (int)VIRTIO_MMIO_MAX_SLOTS; slot++) {
        uint64_t base = VIRTIO_MMIO_BASE + (uint64_t)slot * VIRTIO_MMIO_SLOT_SIZE;
        if (mmio_read32(base + REG_MAGIC) != 0x74726976) continue;
        if (mmio_read32(base + REG_VERSION) != 2) continue;
        if (mmio_read32(base + REG_DEVICE_ID) != device_id) continue;
        dev->base = base;
        dev->device_id = device_id;
        dev->slot = slot;
        return 0;
    }
    return -1;
}

uint32_t virtio_status(const struct virtio_dev *dev) { return rd(dev, REG_STATUS); }

uint32_t virtio_config_read32(const struct virtio_dev *dev, uint32_t offset) {
    return rd(dev, REG_CONFIG + offset);
}

static int setup_queue(struct virtio_dev *dev, struct virtq *q, uint16_t index, uint16_t size) {
    wr(dev, REG_QUEUE_SEL, index);
    uint32_t max = rd(dev, REG_QUEUE_NUM_MAX);
    if (max == 0 || size > max || size > 256) return -1;
    uint64_t desc_bytes = 16UL * size;
    uint64_t avail_bytes = 6 + 2UL * size;
    uint64_t used_bytes = 6 + 8UL * size;
    uint64_t mem = ring_alloc(desc_bytes + avail_bytes + 4 + used_bytes);
    if (!mem) return -2;
    q->size = size;
    q->index = index;
    q->desc = (volatile struct vring_desc *)mem;
    q->avail = (volatile uint16_t *)(mem + desc_bytes);
    q->used = (volatile uint16_t *)((mem + desc_bytes + avail_bytes + 3) & ~3UL);
    q->free_head = 0;
    q->num_free = size;
    q->last_used = 0;
    q->avail_idx = 0;
    q->notify_addr = dev->base + REG_QUEUE_NOTIFY;
    for (uint16_t i = 0; i < size; i++) q->desc[i].next = (uint16_t)(i + 1);
    wr(dev, REG_QUEUE_NUM, size);
    wr(dev, REG_QUEUE_DESC_LOW, (uint32_t)(uint64_t)q->desc);
    wr(dev, REG_QUEUE_DESC_HIGH, (uint32_t)((uint64_t)q->desc >> 32));
    wr(dev, REG_QUEUE_DRIVER_LOW, (uint32_t)(uint64_t)q->avail);
    wr(dev, REG_QUEUE_DRIVER_HIGH, (uint32_t)((uint64_t)q->avail >> 32));
    wr(dev, REG_QUEUE_DEVICE_LOW, (uint32_t)(uint64_t)q->used);
    wr(dev, REG_QUEUE_DEVICE_HIGH, (uint32_t)((uint64_t)q->used >> 32));
    wr(dev, REG_QUEUE_READY, 1);
    return rd(dev, REG_QUEUE_READY) == 1 ? 0 : -3;
}

int virtio_init(struct virtio_dev *dev, uint64_t features, struct virtq *qs, int nq, uint16_t qsize) {
    uint64_t want = VIRTIO_F_VERSION_1 | features;
    wr(dev, REG_STATUS, 0);
    wr(dev, REG_STATUS, STATUS_ACKNOWLEDGE);
    wr(dev, REG_STATUS, STATUS_ACKNOWLEDGE | STATUS_DRIVER);
    wr(dev, REG_DEVICE_FEATURES_SEL, 0);
    uint64_t offered = rd(dev, REG_DEVICE_FEATURES);
    wr(dev, REG_DEVICE_FEATURES_SEL, 1);
    offered |= (uint64_t)rd(dev, REG_DEVICE_FEATURES) << 32;
    if ((offered & want) != want) return -1;
    wr(dev, REG_DRIVER_FEATURES_SEL, 0);
    wr(dev, REG_DRIVER_FEATURES, (uint32_t)want);
    wr(dev, REG_DRIVER_FEATURES_SEL, 1);
    wr(dev, REG_DRIVER_FEATURES, (uint32_t)(want >> 32));
    wr(dev, REG_STATUS, STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK);
    if (!(rd(dev, REG_STATUS) & STATUS_FEATURES_OK)) return -2;
    for (int i = 0; i < nq; i++)
        if (setup_queue(dev, &qs[i], (uint16_t)i, qsize) != 0) return -3;
    wr(dev, REG_STATUS, STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK);
    if (rd(dev, REG_STATUS) & 0x40) return -4; /* DEVICE_NEEDS_RESET */
    return 0;
}

int virtq_add(struct virtq *q, const struct vbuf *bufs, int n) {
    if (n <= 0 || n > q->num_free) return -1;
    uint16_t head = q->free_head;
    uint16_t i = head;
    for (int k = 0; k < n; k++) {
        uint16_t next = q->desc[i].next;
        q->desc[i].addr = bufs[k].addr;
        q->desc[i].len = bufs[k].len;
        q->desc[i].flags = (uint16_t)((bufs[k].writable ? VRING_DESC_F_WRITE : 0) |
                                      (k + 1 < n ? VRING_DESC_F_NEXT : 0));
        if (k + 1 < n) q->desc[i].next = next;
        else q->free_head = next;
        i = next;
    }
    q->num_free = (uint16_t)(q->num_free - n);
    q->chain_len[head] = (uint16_t)n;
    q->avail[2 + (q->avail_idx % q->size)] = head;
    barrier();
    q->avail_idx++;
    __atomic_store_n(&q->avail[1], q->avail_idx, __ATOMIC_RELEASE);
    return head;
}

void virtq_kick(struct virtq *q) {
    barrier();
    mmio_write32(q->notify_addr, q->index);
}

int virtq_poll(struct virtq *q, uint32_t *len) {
    uint16_t used_idx = __atomic_load_n(&q->used[1], __ATOMIC_ACQUIRE);
    if (used_idx == q->last_used) return -1;
    volatile struct vring_used_elem *elems = (volatile struct vring_used_elem *)(q->used + 2);
    volatile struct vring_used_elem *e = &elems[q->last_used % q->size];
    uint16_t head = (uint16_t)e->id;
    if (len) *len = e->len;
    q->last_used++;
    /* Return the chain's descriptors to the free list. */
    uint16_t n = q->chain_len[head];
    uint16_t tail = head;
    for (uint16_t k = 1; k < n; k++) tail = q->desc[tail].next;
    q->desc[tail].next = q->free_head;
    q->free_head = head;
    q->num_free = (uint16_t)(q->num_free + n);
    return head;
}

int virtq_wait(struct virtq *q, uint32_t *len, uint64_t spins) {
    for (uint64_t i = 0; i < spins; i++) {
        int head = virtq_poll(q, len);
        if (head >= 0) return head;
        cpu_relax();
    }
    return -1;
}

uint32_t virtio_ack_interrupt(struct virtio_dev *dev) {
    uint32_t status = mmio_read32(dev->base + REG_INTERRUPT_STATUS);
    mmio_write32(dev->base + REG_INTERRUPT_ACK, status);
    return status;
}

void virtio_ack_all_interrupts(struct virtio_dev *dev) { mmio_write32(dev->base + REG_INTERRUPT_ACK, 3); }
