/* rng: reads two 64-byte buffers from virtio-rng and checks they are neither constant nor equal. */
#include "lib/virtio.h"

static struct virtio_dev dev;
static struct virtq queue;
static uint8_t a[64], b[64];

static int fill(uint8_t *buf) {
    struct vbuf v = {(uint64_t)buf, 64, 1};
    uint32_t len = 0;
    if (virtq_add(&queue, &v, 1) < 0) return -1;
    virtq_kick(&queue);
    if (virtq_wait(&queue, &len, 100000000UL) < 0) return -2;
    return (int)len;
}

int main(void *boot_params) {
    (void)boot_params;
    if (virtio_find(VIRTIO_ID_RNG, &dev) != 0) {
        serial_puts("rng: FAILED no virtio-rng device\n");
        return 10;
    }
    if (virtio_init(&dev, 0, &queue, 1, 8) != 0) {
        serial_puts("rng: FAILED init\n");
        return 11;
    }
    if (fill(a) != 64 || fill(b) != 64) {
        serial_puts("rng: FAILED short fill\n");
        return 12;
    }
    serial_puts("rng: bytes ");
    for (int i = 0; i < 64; i++) serial_printf("%x%x", a[i] >> 4, a[i] & 15);
    serial_puts("\n");
    int distinct = 0;
    for (int i = 1; i < 64; i++)
        if (a[i] != a[0]) distinct = 1;
    if (!distinct || memcmp(a, b, 64) == 0) {
        serial_puts("rng: FAILED bytes look constant\n");
        return 13;
    }
    serial_puts("rng: ok\n");
    return 0;
}
