/*
 * net: the virtio-net test guest. Takes the fixed address 10.0.2.15 on the device's MAC and
 * answers ARP requests for it and ICMP echo requests to it, forever; everything else is
 * ignored. Prints "net: mac <mac> ip 10.0.2.15" and then "READY net" on the serial port once
 * its receive buffers are posted, and one line per answer ("net: arp reply to <ip>",
 * "net: echo reply to <ip> seq <n>").
 *
 * Like the demo it halts between interrupts (the device's line routed through the IOAPIC,
 * plus a 10 Hz tick as a safety net), so an idle guest costs an emulating (PVM) host nothing.
 * Counters at GUEST_STATUS_ADDR (little endian): +0 magic "FORKDNET", +8 frames received,
 * +16 ARP replies, +24 echo replies.
 */
#include "lib/virtio.h"

#define NET_VECTOR 0x40
#define TICK_VECTOR 0x30
#define TICK_NS 100000000u

#define VIRTIO_NET_F_MAC (1ULL << 5)
#define RXQ 0
#define TXQ 1
#define QSIZE 64
#define RX_BUFS 32
#define TX_BUFS 16
#define BUF_SIZE 2048
#define HDR 12 /* virtio_net_hdr_v1 */

#define NET_MAGIC 0x54454e444b524f46UL /* "FORKDNET" */

struct status {
    volatile uint64_t magic;
    volatile uint64_t rx_frames;
    volatile uint64_t arp_replies;
    volatile uint64_t echo_replies;
};

static struct status *const st = (struct status *)GUEST_STATUS_ADDR;
static const uint8_t my_ip[4] = {10, 0, 2, 15};
static uint8_t mac[6];
static struct virtio_dev dev;
static struct virtq qs[2];
static uint8_t rxbuf[RX_BUFS][BUF_SIZE] __attribute__((aligned(64)));
static uint8_t txbuf[TX_BUFS][BUF_SIZE] __attribute__((aligned(64)));
static int rx_of_head[QSIZE];
static int tx_of_head[QSIZE];
static int tx_free[TX_BUFS];
static int tx_free_n;

__attribute__((interrupt)) static void net_isr(struct interrupt_frame *frame) {
    (void)frame;
    virtio_ack_interrupt(&dev);
    lapic_eoi();
}

/* The tick and anything else (a spurious vector): acknowledge and carry on. */
__attribute__((interrupt)) static void other_isr(struct interrupt_frame *frame) {
    (void)frame;
    lapic_eoi();
}

static void post_rx(int i) {
    struct vbuf v = {(uint64_t)rxbuf[i], BUF_SIZE, 1};
    int head = virtq_add(&qs[RXQ], &v, 1);
    if (head >= 0) rx_of_head[head] = i;
}

static void reclaim_tx(void) {
    uint32_t len;
    int head;
    while ((head = virtq_poll(&qs[TXQ], &len)) >= 0) tx_free[tx_free_n++] = tx_of_head[head];
}

/* A free transmit buffer (its frame starts HDR bytes in), or -1. */
static int tx_get(void) {
    if (tx_free_n == 0) reclaim_tx();
    if (tx_free_n == 0) return -1;
    return tx_free[--tx_free_n];
}

static void tx_send(int k, uint32_t frame_len) {
    memset(txbuf[k], 0, HDR);
    struct vbuf v = {(uint64_t)txbuf[k], HDR + frame_len, 0};
    int head = virtq_add(&qs[TXQ], &v, 1);
    if (head < 0) {
        tx_free[tx_free_n++] = k;
        return;
    }
    tx_of_head[head] = k;
    virtq_kick(&qs[TXQ]);
}

static uint16_t be16(const uint8_t *p) { return (uint16_t)(p[0] << 8 | p[1]); }

static void put_be16(uint8_t *p, uint16_t v) {
    p[0] = (uint8_t)(v >> 8);
    p[1] = (uint8_t)v;
}

/* The Internet checksum of p[0..n). */
static uint16_t csum(const uint8_t *p, uint32_t n) {
    uint32_t s = 0;
    for (uint32_t i = 0; i + 1 < n; i += 2) s += (uint32_t)(p[i] << 8 | p[i + 1]);
    if (n & 1) s += (uint32_t)p[n - 1] << 8;
    while (s >> 16) s = (s & 0xffff) + (s >> 16);
    return (uint16_t)~s;
}

static void print_ip(const uint8_t *ip) { serial_printf("%u.%u.%u.%u", ip[0], ip[1], ip[2], ip[3]); }

static void arp(const uint8_t *f, uint32_t n) {
    const uint8_t *a = f + 14;
    if (n < 42 || be16(a) != 1 || be16(a + 2) != 0x0800 || a[4] != 6 || a[5] != 4) return;
    if (be16(a + 6) != 1 || memcmp(a + 24, my_ip, 4) != 0) return;
    int k = tx_get();
    if (k < 0) return;
    uint8_t *r = txbuf[k] + HDR;
    memcpy(r, a + 8, 6); /* to the sender's hardware address */
    memcpy(r + 6, mac, 6);
    put_be16(r + 12, 0x0806);
    uint8_t *ra = r + 14;
    put_be16(ra, 1);
    put_be16(ra + 2, 0x0800);
    ra[4] = 6;
    ra[5] = 4;
    put_be16(ra + 6, 2); /* reply */
    memcpy(ra + 8, mac, 6);
    memcpy(ra + 14, my_ip, 4);
    memcpy(ra + 18, a + 8, 10); /* target = the sender's hardware and protocol address */
    tx_send(k, 42);
    st->arp_replies = st->arp_replies + 1;
    serial_puts("net: arp reply to ");
    print_ip(a + 14);
    serial_puts("\n");
}

static void ipv4(const uint8_t *f, uint32_t n) {
    const uint8_t *ip = f + 14;
    if (n < 34 || ip[0] >> 4 != 4) return;
    uint32_t ihl = (uint32_t)(ip[0] & 15) * 4;
    uint32_t total = be16(ip + 2);
    if (ihl < 20 || total < ihl + 8 || 14 + total > n || total + 14 > BUF_SIZE - HDR) return;
    if (be16(ip + 6) & 0x3fff) return; /* a fragment */
    if (ip[9] != 1 || memcmp(ip + 16, my_ip, 4) != 0) return;
    const uint8_t *icmp = ip + ihl;
    if (icmp[0] != 8 || icmp[1] != 0) return; /* echo request */
    int k = tx_get();
    if (k < 0) return;
    uint8_t *r = txbuf[k] + HDR;
    memcpy(r, f, 14 + total);
    memcpy(r, f + 6, 6);
    memcpy(r + 6, mac, 6);
    uint8_t *rip = r + 14;
    memcpy(rip + 12, my_ip, 4);
    memcpy(rip + 16, ip + 12, 4);
    rip[8] = 64; /* TTL */
    put_be16(rip + 10, 0);
    put_be16(rip + 10, csum(rip, ihl));
    uint8_t *ricmp = rip + ihl;
    ricmp[0] = 0; /* echo reply */
    put_be16(ricmp + 2, 0);
    put_be16(ricmp + 2, csum(ricmp, total - ihl));
    tx_send(k, 14 + total);
    st->echo_replies = st->echo_replies + 1;
    serial_puts("net: echo reply to ");
    print_ip(ip + 12);
    serial_printf(" seq %u\n", (unsigned)be16(icmp + 6));
}

static void handle(const uint8_t *f, uint32_t n) {
    st->rx_frames = st->rx_frames + 1;
    if (n < 14) return;
    uint16_t type = be16(f + 12);
    if (type == 0x0806) arp(f, n);
    else if (type == 0x0800) ipv4(f, n);
}

/* Handles every received frame and gives its buffer back; nonzero if there was any. */
static int poll_rx(void) {
    uint32_t len;
    int head, any = 0;
    while ((head = virtq_poll(&qs[RXQ], &len)) >= 0) {
        int i = rx_of_head[head];
        if (len > HDR && len <= BUF_SIZE) handle(rxbuf[i] + HDR, len - HDR);
        post_rx(i);
        any = 1;
    }
    if (any) virtq_kick(&qs[RXQ]);
    return any;
}

int main(void *boot_params) {
    (void)boot_params;
    st->magic = NET_MAGIC;
    if (virtio_find(VIRTIO_ID_NET, &dev) != 0) {
        serial_puts("net: FAILED no virtio-net device\n");
        return 10;
    }
    pic_mask_all();
    idt_init(other_isr);
    idt_set_gate(NET_VECTOR, net_isr);
    lapic_enable();
    ioapic_route(5 + (uint32_t)dev.slot, NET_VECTOR);
    int rc = virtio_init(&dev, VIRTIO_NET_F_MAC, qs, 2, QSIZE);
    if (rc != 0) {
        serial_printf("net: FAILED init (%d)\n", rc);
        return 11;
    }
    uint32_t lo = virtio_config_read32(&dev, 0), hi = virtio_config_read32(&dev, 4);
    for (int i = 0; i < 4; i++) mac[i] = (uint8_t)(lo >> (8 * i));
    mac[4] = (uint8_t)hi;
    mac[5] = (uint8_t)(hi >> 8);
    for (int k = 0; k < TX_BUFS; k++) tx_free[tx_free_n++] = k;
    for (int i = 0; i < RX_BUFS; i++) post_rx(i);
    virtq_kick(&qs[RXQ]);
    lapic_timer_periodic(TICK_VECTOR, TICK_NS);
    serial_puts("net: mac ");
    for (int i = 0; i < 6; i++) serial_printf("%s%x%x", i ? ":" : "", mac[i] >> 4, mac[i] & 15);
    serial_puts(" ip ");
    print_ip(my_ip);
    serial_puts("\nREADY net\n");
    for (;;) {
        while (poll_rx()) {
        }
        reclaim_tx();
        __asm__ volatile("sti; hlt; cli" ::: "memory");
    }
}
