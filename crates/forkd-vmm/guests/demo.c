/*
 * The built-in demo guest (`forkd vm run --kernel builtin:demo`): increments a 64-bit counter
 * at GUEST_STATUS_ADDR once per millisecond (LAPIC timer tick; it halts in between) for as long
 * as it runs and prints it to the serial port about once a second.
 * The counter lets the VMM (and snapshot/fork tests) see that the guest is running, stopped
 * while paused, and carries on from the same value in a restored child.
 *
 * Status page layout (little endian, read by the host; see forkd_vmm::guests):
 *   +0  u64 magic "FORKDEMO"
 *   +8  u64 counter
 *
 * vsock (project-wide protocol): with a virtio-vsock device the demo connects to host port 1025
 * and writes "READY demo\n" (again after every vsock transport reset, i.e. in each restored
 * child), then serves port 1024, answering "COUNTER <nonce>\n" with "COUNTER <value> <nonce>\n".
 * That lives in lib/demo_vsock.c, whose demo_vsock_poll() overrides the weak default below; the
 * loop calls it on every tick.
 */
#include "lib/forkd_guest.h"

#define DEMO_MAGIC 0x4f4d45444b524f46UL /* "FORKDEMO" */
/* One tick per millisecond from the LAPIC timer; the guest halts in between, so a hundred
 * idle children cost the host almost nothing (and on an emulating host they do not starve
 * siblings that are still being restored). */
#define TICK_VECTOR 0x30
#define TICK_NS 1000000u
#define PRINT_EVERY 1024UL

struct status {
    volatile uint64_t magic;
    volatile uint64_t counter;
};

/* Returns nonzero if it handled vsock traffic. Overridden by the vsock-enabled build. */
__attribute__((weak)) int demo_vsock_poll(uint64_t counter) {
    (void)counter;
    return 0;
}

__attribute__((interrupt)) static void tick_isr(struct interrupt_frame *frame) {
    (void)frame;
    lapic_eoi();
}

/* Spurious or legacy vectors: acknowledge and carry on. */
__attribute__((interrupt)) static void other_isr(struct interrupt_frame *frame) {
    (void)frame;
    lapic_eoi();
}

int main(void *boot_params) {
    (void)boot_params;
    struct status *st = (struct status *)GUEST_STATUS_ADDR;
    st->counter = 0;
    st->magic = DEMO_MAGIC;
    serial_puts("forkd demo guest running\n");
    pic_mask_all();
    idt_init(other_isr);
    idt_set_gate(TICK_VECTOR, tick_isr);
    lapic_enable();
    lapic_timer_periodic(TICK_VECTOR, TICK_NS);
    for (;;) {
        uint64_t c = st->counter + 1;
        st->counter = c;
        if ((c & (PRINT_EVERY - 1)) == 0 || c == 1) serial_printf("counter %lu\n", c);
        /* Serve vsock until it is quiet, then sleep until the next tick. */
        while (demo_vsock_poll(c)) {
        }
        __asm__ volatile("sti; hlt; cli" ::: "memory");
    }
}
