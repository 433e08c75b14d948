/*
 * blk: drives the virtio-blk device through the virtio-mmio driver in lib/virtio.c. Reads known
 * sectors of the base image (byte at disk offset o is BASE_PATTERN(o)), writes sector 3 (inside
 * a copy-on-write block it only partly covers) and sectors 8..15, flushes, reads everything
 * back, asks for the disk id, and checks that a read past the end fails with IOERR.
 * Exit code 0 when every check passed; the serial log says which one failed otherwise.
 */
#include "lib/virtio.h"

#define BASE_PATTERN(o) ((uint8_t)((o) ^ ((o) >> 9) ^ 0x5a))
#define WRITTEN_PATTERN(o) ((uint8_t)(((o) * 7) ^ 0xc3))

#define T_IN 0
#define T_OUT 1
#define T_FLUSH 4
#define T_GET_ID 8
#define F_FLUSH (1ULL << 9)

struct blk_header {
    uint32_t type;
    uint32_t reserved;
    uint64_t sector;
};

static struct virtio_dev dev;
static struct virtq queue;
static struct blk_header header;
static volatile uint8_t status;
static uint8_t data[16 * 512] __attribute__((aligned(4096)));

static int request(uint32_t type, uint64_t sector, void *buf, uint32_t len, int device_writes) {
    struct vbuf bufs[3];
    int n = 0;
    header.type = type;
    header.reserved = 0;
    header.sector = sector;
    status = 0xff;
    bufs[n++] = (struct vbuf){(uint64_t)&header, sizeof(header), 0};
    if (len) bufs[n++] = (struct vbuf){(uint64_t)buf, len, device_writes};
    bufs[n++] = (struct vbuf){(uint64_t)&status, 1, 1};
    if (virtq_add(&queue, bufs, n) < 0) return -1;
    virtq_kick(&queue);
    if (virtq_wait(&queue, 0, 100000000UL) < 0) return -2;
    return status;
}

static int fail(int code, const char *what) {
    serial_printf("blk: FAILED %s\n", what);
    return code;
}

int main(void *boot_params) {
    (void)boot_params;
    if (virtio_find(VIRTIO_ID_BLOCK, &dev) != 0) return fail(10, "no virtio-blk device");
    int rc = virtio_init(&dev, F_FLUSH, &queue, 1, 16);
    if (rc != 0) {
        serial_printf("blk: init step %d\n", rc);
        return fail(11, "init");
    }
    uint64_t capacity = virtio_config_read32(&dev, 0) | ((uint64_t)virtio_config_read32(&dev, 4) << 32);
    serial_printf("blk: slot %d, capacity %lu sectors\n", dev.slot, capacity);
    if (capacity < 16) return fail(12, "disk too small");

    if (request(T_IN, 0, data, sizeof(data), 1) != 0) return fail(13, "read sectors 0-15");
    for (uint64_t o = 0; o < sizeof(data); o++)
        if (data[o] != BASE_PATTERN(o)) return fail(14, "base contents");
    serial_puts("blk: base sectors read ok\n");

    for (uint64_t o = 0; o < 512; o++) data[o] = WRITTEN_PATTERN(3 * 512 + o);
    if (request(T_OUT, 3, data, 512, 0) != 0) return fail(15, "write sector 3");
    for (uint64_t o = 0; o < 8 * 512; o++) data[o] = WRITTEN_PATTERN(8 * 512 + o);
    if (request(T_OUT, 8, data, 8 * 512, 0) != 0) return fail(16, "write sectors 8-15");
    if (request(T_FLUSH, 0, 0, 0, 0) != 0) return fail(17, "flush");

    memset(data, 0, sizeof(data));
    if (request(T_IN, 0, data, sizeof(data), 1) != 0) return fail(18, "read back");
    for (uint64_t o = 0; o < sizeof(data); o++) {
        int written = (o >= 3 * 512 && o < 4 * 512) || o >= 8 * 512;
        uint8_t want = written ? WRITTEN_PATTERN(o) : BASE_PATTERN(o);
        if (data[o] != want) {
            serial_printf("blk: offset %lu is %x, expected %x\n", o, data[o], want);
            return fail(19, "read-back contents");
        }
    }
    serial_puts("blk: write/flush/read-back ok\n");

    char id[21];
    memset(id, 0, sizeof(id));
    if (request(T_GET_ID, 0, id, 20, 1) != 0) return fail(20, "get id");
    serial_printf("blk: id %s\n", id);

    if (request(T_IN, capacity, data, 512, 1) != 1) return fail(21, "read past the end not IOERR");
    if (request(T_IN, 0, data, 100, 1) != 1) return fail(22, "partial-sector read not IOERR");
    if (request(99, 0, 0, 0, 0) != 2) return fail(23, "unknown request not UNSUPP");
    serial_puts("blk: error statuses ok\n");
    serial_puts("blk: all checks passed\n");
    return 0;
}
