/* Guest-side virtio-vsock: see vsock.h. */
#include "vsock.h"

#define OP_REQUEST 1
#define OP_RESPONSE 2
#define OP_RST 3
#define OP_SHUTDOWN 4
#define OP_RW 5
#define OP_CREDIT_UPDATE 6
#define OP_CREDIT_REQUEST 7
#define TYPE_STREAM 1

#define RXQ_SIZE 64
#define TXQ_SIZE 128
#define EVQ_SIZE 4
#define RX_PAYLOAD 16384
#define SMALL_DATA 200

struct vsock_hdr {
    uint64_t src_cid;
    uint64_t dst_cid;
    uint32_t src_port;
    uint32_t dst_port;
    uint32_t len;
    uint16_t type;
    uint16_t op;
    uint32_t flags;
    uint32_t buf_alloc;
    uint32_t fwd_cnt;
} __attribute__((packed));

struct rx_buf {
    struct vsock_hdr hdr;
    uint8_t data[RX_PAYLOAD];
} __attribute__((packed));

struct tx_slot {
    struct vsock_hdr hdr;
    uint8_t data[SMALL_DATA];
    int release_buf;
    int release_conn;
    uint32_t release_len;
};

enum { C_FREE = 0, C_CONNECTING, C_OPEN };

struct conn {
    int state;
    uint32_t local_port, peer_port;
    uint32_t peer_buf_alloc, peer_fwd_cnt, tx_cnt;
    uint32_t fwd_cnt, fwd_cnt_sent;
    int need_credit_update;
};

static struct virtio_dev dev;
static struct virtq queues[3]; /* rx, tx, event */
static struct rx_buf rx_bufs[RXQ_SIZE];
static int rx_of_head[TXQ_SIZE];
static struct tx_slot tx_slots[TXQ_SIZE];
static uint32_t events[EVQ_SIZE];
static struct conn conns[VSOCK_MAX_CONNS];
static uint64_t guest_cid;
static int present;
static uint32_t listen_ports[4];
static int nlisten;
/* Set when some connection may need a credit update, so polling skips the scan otherwise. */
static int credit_updates_pending;
static uint32_t next_local_port = 40000;

int vsock_present(void) { return present; }
uint64_t vsock_guest_cid(void) { return guest_cid; }
uint32_t vsock_gsi(void) { return 5 + (uint32_t)dev.slot; }
void vsock_ack_interrupt(void) { virtio_ack_all_interrupts(&dev); }
int vsock_conn_open(int c) { return c >= 0 && c < VSOCK_MAX_CONNS && conns[c].state == C_OPEN; }

static void post_rx(int i) {
    struct vbuf v = {(uint64_t)&rx_bufs[i], sizeof(struct rx_buf), 1};
    int head = virtq_add(&queues[0], &v, 1);
    if (head >= 0) rx_of_head[head] = i;
    virtq_kick(&queues[0]);
}

static void post_event(int i) {
    struct vbuf v = {(uint64_t)&events[i], 4, 1};
    virtq_add(&queues[2], &v, 1);
    virtq_kick(&queues[2]);
}

int vsock_init(void) {
    if (virtio_find(VIRTIO_ID_VSOCK, &dev) != 0) return -1;
    /* All three queues share one size here; the rx ring only ever holds RXQ_SIZE buffers. */
    if (virtio_init(&dev, 0, queues, 3, TXQ_SIZE) != 0) return -2;
    guest_cid = virtio_config_read32(&dev, 0) | ((uint64_t)virtio_config_read32(&dev, 4) << 32);
    for (int i = 0; i < RXQ_SIZE; i++) post_rx(i);
    for (int i = 0; i < EVQ_SIZE; i++) post_event(i);
    present = 1;
    return 0;
}

void vsock_listen(uint32_t port) {
    if (nlisten < 4) listen_ports[nlisten++] = port;
}

static void reset_all_conns(void) {
    memset(conns, 0, sizeof(conns)); /* C_FREE is 0; one string instruction */
}

/* Reclaims finished tx packets, releasing rx buffers that zero-copy sends were holding. */
static void reclaim_tx(void) {
    int head;
    while ((head = virtq_poll(&queues[1], 0)) >= 0) {
        struct tx_slot *s = &tx_slots[head];
        if (s->release_buf >= 0) {
            vsock_release(s->release_conn, s->release_buf, s->release_len);
            s->release_buf = -1;
        }
    }
}

static int send_packet(int c, uint16_t op, uint32_t flags, const void *small, uint32_t small_len,
                       const uint8_t *zc, uint32_t zc_len, int release_buf) {
    struct conn *k = &conns[c];
    reclaim_tx();
    if (queues[1].num_free < 2) return -1;
    uint16_t slot = queues[1].free_head; /* virtq_add takes the free-list head as chain head */
    struct tx_slot *s = &tx_slots[slot];
    uint32_t len = small_len + zc_len;
    s->hdr.src_cid = guest_cid;
    s->hdr.dst_cid = VSOCK_HOST_CID;
    s->hdr.src_port = k->local_port;
    s->hdr.dst_port = k->peer_port;
    s->hdr.len = len;
    s->hdr.type = TYPE_STREAM;
    s->hdr.op = op;
    s->hdr.flags = flags;
    s->hdr.buf_alloc = VSOCK_GUEST_BUF_ALLOC;
    s->hdr.fwd_cnt = k->fwd_cnt;
    k->fwd_cnt_sent = k->fwd_cnt;
    s->release_buf = release_buf;
    s->release_conn = c;
    s->release_len = zc_len;
    if (small_len) memcpy(s->data, small, small_len);
    struct vbuf bufs[2];
    int n = 0;
    bufs[n++] = (struct vbuf){(uint64_t)s, (uint32_t)sizeof(struct vsock_hdr) + small_len, 0};
    if (zc_len) bufs[n++] = (struct vbuf){(uint64_t)zc, zc_len, 0};
    if (virtq_add(&queues[1], bufs, n) != slot) return -1;
    k->tx_cnt += len;
    virtq_kick(&queues[1]);
    return 0;
}

uint32_t vsock_send_room(int c) {
    struct conn *k = &conns[c];
    uint32_t in_flight = k->tx_cnt - k->peer_fwd_cnt;
    return in_flight >= k->peer_buf_alloc ? 0 : k->peer_buf_alloc - in_flight;
}

int vsock_send(int c, const void *data, uint32_t len) {
    if (!vsock_conn_open(c) || len > SMALL_DATA || vsock_send_room(c) < len) return -1;
    return send_packet(c, OP_RW, 0, data, len, 0, 0, -1);
}

int vsock_send_buf(int c, const uint8_t *data, uint32_t len, int buf) {
    if (!vsock_conn_open(c) || vsock_send_room(c) < len) return -1;
    return send_packet(c, OP_RW, 0, 0, 0, data, len, buf);
}

void vsock_release(int c, int buf, uint32_t len) {
    post_rx(buf);
    if (c < 0 || c >= VSOCK_MAX_CONNS || conns[c].state == C_FREE) return;
    struct conn *k = &conns[c];
    k->fwd_cnt += len;
    /* Tell the host about freed space before it runs out of credit. */
    if (k->fwd_cnt - k->fwd_cnt_sent >= VSOCK_GUEST_BUF_ALLOC / 4) {
        k->need_credit_update = 1;
        credit_updates_pending = 1;
    }
}

static int alloc_conn(uint32_t local_port, uint32_t peer_port, int state) {
    for (int c = 0; c < VSOCK_MAX_CONNS; c++) {
        if (conns[c].state != C_FREE) continue;
        memset(&conns[c], 0, sizeof(conns[c]));
        conns[c].state = state;
        conns[c].local_port = local_port;
        conns[c].peer_port = peer_port;
        return c;
    }
    return -1;
}

static int find_conn(uint32_t local_port, uint32_t peer_port) {
    for (int c = 0; c < VSOCK_MAX_CONNS; c++)
        if (conns[c].state != C_FREE && conns[c].local_port == local_port && conns[c].peer_port == peer_port)
            return c;
    return -1;
}

int vsock_connect(uint32_t port) {
    int c = alloc_conn(next_local_port++, port, C_CONNECTING);
    if (c < 0) return -1;
    if (send_packet(c, OP_REQUEST, 0, 0, 0, 0, 0, -1) != 0) {
        conns[c].state = C_FREE;
        return -1;
    }
    return c;
}

void vsock_close(int c) {
    if (c < 0 || c >= VSOCK_MAX_CONNS || conns[c].state == C_FREE) return;
    send_packet(c, OP_SHUTDOWN, 3, 0, 0, 0, 0, -1);
}

/* A packet for a connection we do not have: answer RST from a temporary slot. */
static void send_rst_to(uint32_t local_port, uint32_t peer_port) {
    int c = alloc_conn(local_port, peer_port, C_OPEN);
    if (c < 0) return;
    send_packet(c, OP_RST, 0, 0, 0, 0, 0, -1);
    conns[c].state = C_FREE;
}

static int listening(uint32_t port) {
    for (int i = 0; i < nlisten; i++)
        if (listen_ports[i] == port) return 1;
    return 0;
}

static void poll_events(struct vsock_event *ev) {
    int head;
    while ((head = virtq_poll(&queues[2], 0)) >= 0) {
        /* The only event is TRANSPORT_RESET: every connection is gone. */
        reset_all_conns();
        post_event(head % EVQ_SIZE);
        ev->type = VSOCK_EV_RESET;
        ev->conn = -1;
    }
}

void vsock_poll(struct vsock_event *ev) {
    ev->type = VSOCK_EV_NONE;
    ev->conn = -1;
    ev->buf = -1;
    if (!present) return;
    reclaim_tx();
    if (credit_updates_pending) {
        int still_pending = 0;
        for (int c = 0; c < VSOCK_MAX_CONNS; c++) {
            if (conns[c].state != C_OPEN || !conns[c].need_credit_update) continue;
            if (send_packet(c, OP_CREDIT_UPDATE, 0, 0, 0, 0, 0, -1) == 0) conns[c].need_credit_update = 0;
            else still_pending = 1;
        }
        credit_updates_pending = still_pending;
    }
    poll_events(ev);
    if (ev->type != VSOCK_EV_NONE) return;
    uint32_t used_len = 0;
    int head = virtq_poll(&queues[0], &used_len);
    if (head < 0) return;
    int buf = rx_of_head[head];
    struct vsock_hdr *h = &rx_bufs[buf].hdr;
    if (used_len < sizeof(struct vsock_hdr) || h->dst_cid != guest_cid || h->type != TYPE_STREAM) {
        post_rx(buf);
        return;
    }
    int c = find_conn(h->dst_port, h->src_port);
    if (c >= 0) {
        conns[c].peer_buf_alloc = h->buf_alloc;
        conns[c].peer_fwd_cnt = h->fwd_cnt;
    }
    ev->conn = c;
    switch (h->op) {
    case OP_REQUEST:
        if (c < 0 && listening(h->dst_port)) {
            c = alloc_conn(h->dst_port, h->src_port, C_OPEN);
            if (c >= 0) {
                conns[c].peer_buf_alloc = h->buf_alloc;
                conns[c].peer_fwd_cnt = h->fwd_cnt;
                send_packet(c, OP_RESPONSE, 0, 0, 0, 0, 0, -1);
                ev->type = VSOCK_EV_ACCEPTED;
                ev->conn = c;
                break;
            }
        }
        send_rst_to(h->dst_port, h->src_port);
        break;
    case OP_RESPONSE:
        if (c >= 0 && conns[c].state == C_CONNECTING) {
            conns[c].state = C_OPEN;
            ev->type = VSOCK_EV_CONNECTED;
        }
        break;
    case OP_RW:
        if (c >= 0 && conns[c].state == C_OPEN && h->len <= used_len - sizeof(struct vsock_hdr)) {
            ev->type = VSOCK_EV_DATA;
            ev->data = rx_bufs[buf].data;
            ev->len = h->len;
            ev->buf = buf;
            return; /* the caller releases the buffer */
        }
        if (c < 0) send_rst_to(h->dst_port, h->src_port);
        break;
    case OP_CREDIT_REQUEST:
        if (c >= 0) send_packet(c, OP_CREDIT_UPDATE, 0, 0, 0, 0, 0, -1);
        break;
    case OP_SHUTDOWN:
        if (c >= 0) ev->type = VSOCK_EV_PEER_DONE;
        break;
    case OP_RST:
        if (c >= 0) {
            conns[c].state = C_FREE;
            ev->type = VSOCK_EV_RESET;
        }
        break;
    default:
        break;
    }
    post_rx(buf);
}
