/*
 * vsock: the virtio-vsock test guest. Announces itself on host port 1025 ("READY vsock\n"),
 * then echoes every byte received on port 1024 back to its sender, for any number of
 * concurrent connections, without copying (the echo packet points at the rx buffer). When the
 * host half-closes a connection, the guest closes its side after the last echo. Runs until the
 * VMM stops it.
 */
#include "lib/vsock.h"

#define ECHO_PORT FORKD_GUEST_PORT
#define READY_PORT FORKD_READY_PORT
#define PENDING_MAX 64

struct pending {
    const uint8_t *data;
    uint32_t len;
    int buf;
};

static struct pending pending[VSOCK_MAX_CONNS][PENDING_MAX];
static int pending_head[VSOCK_MAX_CONNS], pending_count[VSOCK_MAX_CONNS];
static int peer_done[VSOCK_MAX_CONNS];

static void flush(int c) {
    while (pending_count[c] > 0) {
        struct pending *p = &pending[c][pending_head[c]];
        if (vsock_send_buf(c, p->data, p->len, p->buf) != 0) return; /* wait for credit */
        pending_head[c] = (pending_head[c] + 1) % PENDING_MAX;
        pending_count[c]--;
    }
    if (peer_done[c] && vsock_conn_open(c)) {
        vsock_close(c);
        peer_done[c] = 0;
    }
}

int main(void *boot_params) {
    (void)boot_params;
    int rc = vsock_init();
    if (rc != 0) {
        serial_printf("vsock: FAILED init (%d)\n", rc);
        return 10;
    }
    serial_printf("vsock: guest cid %lu\n", vsock_guest_cid());
    vsock_listen(ECHO_PORT);
    int ready = vsock_connect(READY_PORT);
    if (ready < 0) return 11;
    struct vsock_event ev;
    for (;;) {
        vsock_poll(&ev);
        int c = ev.conn;
        switch (ev.type) {
        case VSOCK_EV_CONNECTED:
            if (c == ready) {
                vsock_send(c, "READY vsock\n", 12);
                vsock_close(c);
                serial_puts("vsock: ready sent\n");
            }
            break;
        case VSOCK_EV_ACCEPTED:
            pending_head[c] = pending_count[c] = peer_done[c] = 0;
            break;
        case VSOCK_EV_DATA:
            if (c == ready || pending_count[c] == PENDING_MAX) {
                vsock_release(c, ev.buf, ev.len);
            } else {
                int slot = (pending_head[c] + pending_count[c]) % PENDING_MAX;
                pending[c][slot] = (struct pending){ev.data, ev.len, ev.buf};
                pending_count[c]++;
            }
            break;
        case VSOCK_EV_PEER_DONE:
            peer_done[c] = 1;
            break;
        case VSOCK_EV_RESET:
            if (c == ready && ready >= 0) {
                ready = -1;
            } else if (c >= 0) {
                /* Connection gone: give back whatever it still held. */
                while (pending_count[c] > 0) {
                    vsock_release(-1, pending[c][pending_head[c]].buf, 0);
                    pending_head[c] = (pending_head[c] + 1) % PENDING_MAX;
                    pending_count[c]--;
                }
            }
            break;
        default:
            break;
        }
        for (int k = 0; k < VSOCK_MAX_CONNS; k++)
            if (pending_count[k] || peer_done[k]) flush(k);
    }
}
