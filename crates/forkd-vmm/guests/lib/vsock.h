/*
 * Guest side of virtio-vsock for forkd's test guests, on top of virtio.h: stream connections
 * with credit-based flow control, polled. One device per guest.
 *
 * Usage: vsock_init(); vsock_listen(port) and/or vsock_connect(port); then call vsock_poll()
 * in a loop and act on the events it returns. Data arrives in rx buffers the caller gives back
 * with vsock_release() (or forwards without copying with vsock_send_buf(), which releases the
 * buffer once the device has read it).
 */
#ifndef FORKD_VSOCK_H
#define FORKD_VSOCK_H

#include "virtio.h"

#define VSOCK_HOST_CID 2
#define VSOCK_MAX_CONNS 16
/* Receive space each connection advertises to the host (buf_alloc). */
#define VSOCK_GUEST_BUF_ALLOC (64 * 1024)

enum vsock_event_type {
    VSOCK_EV_NONE = 0,
    VSOCK_EV_ACCEPTED,  /* a host connection to a listened port was accepted */
    VSOCK_EV_CONNECTED, /* vsock_connect() completed */
    VSOCK_EV_DATA,      /* data: `data`/`len` inside rx buffer `buf` */
    VSOCK_EV_PEER_DONE, /* the host will send no more (SHUTDOWN) */
    VSOCK_EV_RESET,     /* the connection is gone (RST, refused connect, transport reset) */
};

struct vsock_event {
    int type;
    int conn;
    const uint8_t *data;
    uint32_t len;
    int buf;
};

int vsock_init(void);
uint64_t vsock_guest_cid(void);
int vsock_present(void);
void vsock_listen(uint32_t port);
/* Starts a connection to host port `port`; returns the connection id or -1. */
int vsock_connect(uint32_t port);
/* Handles at most one received packet; fills `ev` (VSOCK_EV_NONE when nothing happened). */
void vsock_poll(struct vsock_event *ev);
/* Bytes the host can take right now on `conn` (its credit). */
uint32_t vsock_send_room(int conn);
/* Copies `len` (<= 200) bytes into one packet; 0 on success, -1 without credit or room. */
int vsock_send(int conn, const void *data, uint32_t len);
/* Sends `len` bytes that live in rx buffer `buf` without copying; the buffer is released when
 * the device has read it. 0 on success, -1 without credit or room. */
int vsock_send_buf(int conn, const uint8_t *data, uint32_t len, int buf);
/* Gives rx buffer `buf` (carrying `len` bytes of `conn`'s data) back to the device. */
void vsock_release(int conn, int buf, uint32_t len);
/* Closes `conn` (SHUTDOWN both ways); the host answers RST, reported as VSOCK_EV_RESET. */
void vsock_close(int conn);
int vsock_conn_open(int conn);
/* The device's interrupt line (GSI 5 + its virtio-mmio slot); valid once vsock_init succeeded. */
uint32_t vsock_gsi(void);
/* Acknowledges the device's interrupt (call from the interrupt handler; the caller then polls
 * every queue, so the status is not read: one register access, not two). */
void vsock_ack_interrupt(void);

#endif
