/*
 * blkbench: block throughput benchmark guest. Reads the whole virtio-blk disk PASSES times in
 * 256 KiB requests and publishes progress at GUEST_STATUS_ADDR for the host to time:
 *   +0 u64 magic "BLKBENCH", +8 u64 phase (1 = reading, 2 = done, 3 = failed), +16 u64 bytes.
 */
#include "lib/virtio.h"

#define MAGIC 0x48434e45424b4c42UL /* "BLKBENCH" */
#define PASSES 4
#define CHUNK (256 * 1024)

struct blk_header {
    uint32_t type;
    uint32_t reserved;
    uint64_t sector;
};

struct status {
    volatile uint64_t magic, phase, bytes;
};

static struct virtio_dev dev;
static struct virtq queue;
static struct blk_header header;
static volatile uint8_t status_byte;
static uint8_t data[CHUNK] __attribute__((aligned(4096)));

static int read_chunk(uint64_t sector, uint32_t len) {
    struct vbuf bufs[3] = {
        {(uint64_t)&header, sizeof(header), 0},
        {(uint64_t)data, len, 1},
        {(uint64_t)&status_byte, 1, 1},
    };
    header.type = 0;
    header.sector = sector;
    status_byte = 0xff;
    if (virtq_add(&queue, bufs, 3) < 0) return -1;
    virtq_kick(&queue);
    if (virtq_wait(&queue, 0, 1000000000UL) < 0) return -1;
    return status_byte;
}

int main(void *boot_params) {
    (void)boot_params;
    struct status *st = (struct status *)GUEST_STATUS_ADDR;
    st->phase = 0;
    st->bytes = 0;
    st->magic = MAGIC;
    if (virtio_find(VIRTIO_ID_BLOCK, &dev) != 0 || virtio_init(&dev, 0, &queue, 1, 16) != 0) {
        st->phase = 3;
        return 10;
    }
    uint64_t sectors = virtio_config_read32(&dev, 0) | ((uint64_t)virtio_config_read32(&dev, 4) << 32);
    st->phase = 1;
    for (int pass = 0; pass < PASSES; pass++) {
        for (uint64_t s = 0; s < sectors; s += CHUNK / 512) {
            uint64_t left = (sectors - s) * 512;
            uint32_t len = left < CHUNK ? (uint32_t)left : CHUNK;
            if (read_chunk(s, len) != 0) {
                st->phase = 3;
                return 11;
            }
            st->bytes += len;
        }
    }
    st->phase = 2;
    return 0;
}
