/*
 * blk_misuse: a guest that misprograms virtio-blk on purpose and checks the device answers with
 * DEVICE_NEEDS_RESET or an error status (the VMM must neither panic nor touch memory outside
 * the guest's RAM):
 *   1. a queue whose descriptor table lies outside RAM -> DEVICE_NEEDS_RESET at DRIVER_OK;
 *   2. after a reset and a proper setup: a data buffer outside RAM -> IOERR;
 *   3. a 20 MiB request (more than the device's 16 MiB limit) -> IOERR;
 *   4. a chain whose status byte is outside RAM -> returned with length 0;
 *   5. the device still serves a normal read afterwards.
 * Exit code 0 when every expectation held.
 */
#include "lib/virtio.h"

#define REG(off) (dev.base + (off))

struct blk_header {
    uint32_t type;
    uint32_t reserved;
    uint64_t sector;
};

static struct virtio_dev dev;
static struct virtq queue;
static struct blk_header header;
static volatile uint8_t status;
static uint8_t data[512] __attribute__((aligned(512)));

/* Outside the 64 MiB of RAM the test gives the guest, and not in any MMIO window. */
#define NOT_RAM 0x80000000UL

static int submit(struct vbuf *bufs, int n, uint32_t *len) {
    status = 0xee;
    if (virtq_add(&queue, bufs, n) < 0) return -1;
    virtq_kick(&queue);
    return virtq_wait(&queue, len, 100000000UL);
}

static int fail(int code, const char *what) {
    serial_printf("blk_misuse: FAILED %s\n", what);
    return code;
}

int main(void *boot_params) {
    (void)boot_params;
    if (virtio_find(VIRTIO_ID_BLOCK, &dev) != 0) return fail(10, "no virtio-blk device");

    /* 1. Descriptor table outside RAM. */
    mmio_write32(REG(0x70), 0);
    mmio_write32(REG(0x70), 1 | 2);
    mmio_write32(REG(0x24), 1);
    mmio_write32(REG(0x20), 1); /* VERSION_1 */
    mmio_write32(REG(0x70), 1 | 2 | 8);
    mmio_write32(REG(0x30), 0);
    mmio_write32(REG(0x38), 16);
    mmio_write32(REG(0x80), (uint32_t)NOT_RAM);
    mmio_write32(REG(0x84), 0);
    mmio_write32(REG(0x44), 1);
    mmio_write32(REG(0x70), 1 | 2 | 8 | 4);
    uint32_t st = mmio_read32(REG(0x70));
    if (!(st & 0x40)) return fail(11, "bad ring address did not set DEVICE_NEEDS_RESET");
    serial_printf("blk_misuse: bad ring -> status %x\n", st);

    /* Reset and set up properly. */
    if (virtio_init(&dev, 0, &queue, 1, 16) != 0) return fail(12, "init after reset");
    header.reserved = 0;

    /* 2. Data buffer outside RAM. */
    header.type = 0;
    header.sector = 0;
    struct vbuf outside[3] = {{(uint64_t)&header, 16, 0}, {NOT_RAM, 512, 1}, {(uint64_t)&status, 1, 1}};
    if (submit(outside, 3, 0) < 0 || status != 1) return fail(13, "buffer outside RAM not IOERR");

    /* 3. Oversized request: 20 MiB of (in-RAM) data. */
    header.type = 1;
    struct vbuf big[3] = {{(uint64_t)&header, 16, 0}, {0x1000000UL, 20U << 20, 0}, {(uint64_t)&status, 1, 1}};
    if (submit(big, 3, 0) < 0 || status != 1) return fail(14, "oversized request not IOERR");

    /* 4. Status byte outside RAM: the chain comes back with nothing written. */
    header.type = 0;
    uint32_t len = 99;
    struct vbuf nostatus[3] = {{(uint64_t)&header, 16, 0}, {(uint64_t)data, 512, 1}, {NOT_RAM, 1, 1}};
    if (submit(nostatus, 3, &len) < 0 || len != 0) return fail(15, "chain with status outside RAM");

    /* 5. Still healthy. */
    struct vbuf ok[3] = {{(uint64_t)&header, 16, 0}, {(uint64_t)data, 512, 1}, {(uint64_t)&status, 1, 1}};
    if (submit(ok, 3, &len) < 0 || status != 0 || len != 513) return fail(16, "normal read after misuse");
    if (mmio_read32(REG(0x70)) & 0x40) return fail(17, "device needs reset after recoverable errors");
    serial_puts("blk_misuse: all checks passed\n");
    return 0;
}
