/*
 * The built-in demo guest (`forkd vm run --kernel builtin:demo`): a 64-bit counter at
 * GUEST_STATUS_ADDR holds the microseconds the guest has run (its LAPIC timer's time), updated
 * whenever the guest wakes (a tick every 100 ms, or vsock traffic) and printed to the serial
 * port every second.
 * The counter lets the VMM (and snapshot/fork tests) see that the guest is running, stopped
 * while paused, and carries on from the same value in a restored child.
 *
 * Status page layout (little endian, read by the host; see forkd_vmm::guests):
 *   +0  u64 magic "FORKDEMO"
 *   +8  u64 counter
 *
 * vsock (project-wide protocol): with a virtio-vsock device the demo connects to host port 1025
 * and writes "READY demo\n" once, at boot, then serves port 1024, answering
 * "COUNTER <nonce>\n" with "COUNTER <value> <nonce>\n".
 * That lives in lib/demo_vsock.c, whose demo_vsock_init() / demo_vsock_poll() override the weak
 * defaults below.
 *
 * The guest halts between interrupts, and wakes only for its tick and for vsock traffic (the
 * device's line routed through the IOAPIC, as Linux does). That matters on hosts whose KVM
 * emulates every guest instruction (PVM): a hundred idle children then cost the host almost
 * nothing and do not starve siblings that are still being restored.
 */
#include "lib/forkd_guest.h"

#define DEMO_MAGIC 0x4f4d45444b524f46UL /* "FORKDEMO" */
#define TICK_VECTOR 0x30
#define TICK_MS 100u
#define TICK_NS (TICK_MS * 1000000u)

struct status {
    volatile uint64_t magic;
    volatile uint64_t counter;
};

static struct status *const st = (struct status *)GUEST_STATUS_ADDR;

/* Finds the vsock device and routes its interrupt. Overridden by the vsock-enabled build. */
__attribute__((weak)) void demo_vsock_init(void) {}

/* Handles pending vsock traffic; nonzero if more may be waiting. Overridden by the
 * vsock-enabled build. */
__attribute__((weak)) int demo_vsock_poll(uint64_t counter) {
    (void)counter;
    return 0;
}

static volatile uint64_t ticks;

__attribute__((interrupt)) static void tick_isr(struct interrupt_frame *frame) {
    (void)frame;
    ticks = ticks + 1;
    lapic_eoi();
}

/* Spurious or legacy vectors: acknowledge and carry on. */
__attribute__((interrupt)) static void other_isr(struct interrupt_frame *frame) {
    (void)frame;
    lapic_eoi();
}

/* Microseconds of guest time: whole ticks plus the current period's elapsed part. The timer
 * may reload before its tick is taken (interrupts are off here), so never go backwards. */
static uint64_t update_counter(void) {
    uint64_t elapsed_ns = TICK_NS - lapic_timer_current();
    uint64_t us = ticks * TICK_MS * 1000u + elapsed_ns / 1000u;
    if (us > st->counter) st->counter = us;
    return st->counter;
}

int main(void *boot_params) {
    (void)boot_params;
    st->counter = 0;
    st->magic = DEMO_MAGIC;
    serial_puts("forkd demo guest running\n");
    pic_mask_all();
    idt_init(other_isr);
    idt_set_gate(TICK_VECTOR, tick_isr);
    lapic_enable();
    demo_vsock_init();
    lapic_timer_periodic(TICK_VECTOR, TICK_NS);
    uint64_t printed_s = ~0UL;
    for (;;) {
        uint64_t c = update_counter();
        if (c / 1000000u != printed_s) {
            printed_s = c / 1000000u;
            serial_printf("counter %lu\n", c);
        }
        /* Serve vsock until it is quiet, then sleep until the next interrupt (every instruction
         * counts on an emulating host: no extra polling pass). */
        while (demo_vsock_poll(c)) {
        }
        __asm__ volatile("sti; hlt; cli" ::: "memory");
    }
}
