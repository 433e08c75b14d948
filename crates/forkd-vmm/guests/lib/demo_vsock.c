/*
 * The demo guest's vsock service (overrides the weak demo_vsock_init() and demo_vsock_poll() in demo.c):
 *   - once, at boot, connects to host port 1025 and writes "READY demo\n" (what `forkd snapshot`
 *     waits for). A restored child does not announce itself: its vsock transport reset only
 *     drops the old streams, and the host learns it is alive by asking (guest work right after
 *     a restore competes with the restores of its siblings on an emulating host);
 *   - serves port 1024: each "COUNTER <nonce>\n" line is answered "COUNTER <value> <nonce>\n"
 *     with the counter's current value; "DIRTY <kib>\n" writes one byte into each 4 KiB page of
 *     the first <kib> KiB of a scratch area (so a forked child's memory cost can be measured
 *     after it dirtied a known amount) and answers "DIRTY <kib>\n"; other lines get
 *     "ERROR unknown request\n".
 * Without a vsock device it does nothing. The device's interrupt wakes the guest from HLT.
 */
#include "vsock.h"

#define VSOCK_VECTOR 0x40
#define DEMO_PORT FORKD_GUEST_PORT
#define READY_PORT FORKD_READY_PORT
#define LINE_MAX 64

static int present;
static int ready_conn = -1;
static int announce_pending;
static char lines[VSOCK_MAX_CONNS][LINE_MAX + 1];
static int line_len[VSOCK_MAX_CONNS];
static int line_overflow[VSOCK_MAX_CONNS];

static int put_u64(char *out, uint64_t v) {
    char tmp[24];
    int n = 0, len = 0;
    do {
        tmp[n++] = (char)('0' + v % 10);
        v /= 10;
    } while (v);
    while (n) out[len++] = tmp[--n];
    return len;
}

/* Scratch area for DIRTY: above the guest image and its stacks, inside the smallest RAM the
 * VMM gives a guest (identity mapped by the boot page tables). */
#define DIRTY_BASE 0x2000000UL
#define DIRTY_MAX_KIB (16UL * 1024)

/* Parses the decimal number at line[0..len); -1 if it is not one. */
static long parse_u32(const char *line, int len) {
    long v = 0;
    if (len <= 0 || len > 9) return -1;
    for (int i = 0; i < len; i++) {
        if (line[i] < '0' || line[i] > '9') return -1;
        v = v * 10 + (line[i] - '0');
    }
    return v;
}

static int dirty(const char *arg, int len, uint64_t counter, char *reply) {
    long kib = parse_u32(arg, len);
    if (kib < 0 || (unsigned long)kib > DIRTY_MAX_KIB) return 0;
    volatile uint8_t *area = (volatile uint8_t *)DIRTY_BASE;
    for (long off = 0; off < kib * 1024; off += 4096) area[off] = (uint8_t)((counter + (uint64_t)off) | 1); /* never 0: the host can see it */
    int n = 6;
    memcpy(reply, "DIRTY ", 6);
    n += put_u64(reply + n, (uint64_t)kib);
    reply[n++] = '\n';
    return n;
}

static void answer(int c, const char *line, int len, uint64_t counter) {
    char reply[160];
    int n = 0;
    if (len > 6 && memcmp(line, "DIRTY ", 6) == 0 && (n = dirty(line + 6, len - 6, counter, reply)) > 0) {
        /* reply built by dirty() */
    } else if (len > 8 && memcmp(line, "COUNTER ", 8) == 0 && len - 8 <= 100) {
        memcpy(reply, "COUNTER ", 8);
        n = 8;
        n += put_u64(reply + n, counter);
        reply[n++] = ' ';
        memcpy(reply + n, line + 8, (size_t)(len - 8));
        n += len - 8;
        reply[n++] = '\n';
    } else {
        const char *err = "ERROR unknown request\n";
        n = (int)strlen(err);
        memcpy(reply, err, (size_t)n);
    }
    /* Replies are tiny; the host always has credit for them in practice. Spin a little if not. */
    for (int tries = 0; tries < 1000 && vsock_send(c, reply, (uint32_t)n) != 0; tries++) {
        struct vsock_event ev;
        vsock_poll(&ev);
        if (ev.type == VSOCK_EV_DATA) vsock_release(ev.conn, ev.buf, ev.len);
    }
}

/* Appends data to connection c's line, answering each complete one. Works a piece (up to a
 * newline) at a time with string instructions: a byte loop costs ~16 emulated instructions a
 * character on an emulating host. */
static void take_data(int c, const uint8_t *data, uint32_t len, uint64_t counter) {
    while (len > 0) {
        const uint8_t *nl = memchr(data, '\n', len);
        uint32_t piece = nl ? (uint32_t)(nl - data) : len;
        uint32_t room = LINE_MAX - (uint32_t)line_len[c];
        if (piece > room) line_overflow[c] = 1;
        uint32_t take = piece < room ? piece : room;
        memcpy(&lines[c][line_len[c]], data, take);
        line_len[c] += (int)take;
        if (!nl) return;
        if (line_overflow[c]) answer(c, "", 0, counter);
        else answer(c, lines[c], line_len[c], counter);
        line_len[c] = 0;
        line_overflow[c] = 0;
        data = nl + 1;
        len -= piece + 1;
    }
}

/* Wakes the guest from HLT; demo_vsock_poll() then does the work. */
__attribute__((interrupt)) static void vsock_isr(struct interrupt_frame *frame) {
    (void)frame;
    vsock_ack_interrupt();
    lapic_eoi();
}

void demo_vsock_init(void) {
    if (vsock_init() != 0) return;
    present = 1;
    vsock_listen(DEMO_PORT);
    announce_pending = 1;
    idt_set_gate(VSOCK_VECTOR, vsock_isr);
    ioapic_route(vsock_gsi(), VSOCK_VECTOR);
    serial_puts("demo: vsock ready on port 1024\n");
}

int demo_vsock_poll(uint64_t counter) {
    if (!present) return 0;
    if (announce_pending && ready_conn < 0) {
        ready_conn = vsock_connect(READY_PORT);
        announce_pending = 0;
    }
    struct vsock_event ev;
    for (int budget = 0; budget < 64; budget++) {
        vsock_poll(&ev);
        int c = ev.conn;
        if (ev.type == VSOCK_EV_NONE) return 0;
        switch (ev.type) {
        case VSOCK_EV_CONNECTED:
            if (c == ready_conn) {
                vsock_send(c, "READY demo\n", 11);
                vsock_close(c);
            }
            break;
        case VSOCK_EV_ACCEPTED:
            line_len[c] = 0;
            line_overflow[c] = 0;
            break;
        case VSOCK_EV_DATA:
            if (c != ready_conn) take_data(c, ev.data, ev.len, counter);
            vsock_release(c, ev.buf, ev.len);
            break;
        case VSOCK_EV_PEER_DONE:
            vsock_close(c);
            break;
        case VSOCK_EV_RESET:
            /* A transport reset (c < 0: snapshot restore / fork) drops every stream. */
            if (c < 0 || c == ready_conn) ready_conn = -1;
            break;
        default:
            break;
        }
    }
    return 1; /* the budget ran out: more may be waiting */
}
