/*
 * virtio_irq: checks the interrupt path a Linux guest relies on, end to end: the device's irqfd
 * (registered by the VMM on the slot's GSI) -> in-kernel IOAPIC pin -> local APIC -> an IDT
 * vector. The guest installs an IDT, routes IOAPIC pin (5 + slot) to vector 0x40, submits a
 * virtio-rng request with interrupts enabled, and waits for the handler, which reads and acks
 * the virtio interrupt-status register and sends the LAPIC EOI, as Linux's vm_interrupt does.
 * Exit code 0 when the interrupt arrived with the used-ring bit set and the buffer was filled.
 */
#include "lib/virtio.h"

#define IRQ_VECTOR 0x40

static struct virtio_dev dev;
static struct virtq queue;
static uint8_t buf[32];
static volatile uint32_t irq_count, irq_status, stray_count;

__attribute__((interrupt)) static void virtio_isr(struct interrupt_frame *frame) {
    (void)frame;
    irq_status |= virtio_ack_interrupt(&dev);
    irq_count++;
    lapic_eoi();
}

/* Anything else (a spurious or legacy-PIC vector) is counted, never a fault. */
__attribute__((interrupt)) static void stray_isr(struct interrupt_frame *frame) {
    (void)frame;
    stray_count++;
    lapic_eoi();
}

int main(void *boot_params) {
    (void)boot_params;
    if (virtio_find(VIRTIO_ID_RNG, &dev) != 0) {
        serial_puts("virtio_irq: FAILED no virtio-rng device\n");
        return 10;
    }
    /* Mask the legacy PIC (KVM routes GSIs to it too, through LINT0 as ExtINT), as Linux does
     * when it switches to the IOAPIC; then no legacy vector can arrive. */
    pic_mask_all();
    idt_init(stray_isr);
    idt_set_gate(IRQ_VECTOR, virtio_isr);
    lapic_enable();
    uint32_t gsi = 5 + (uint32_t)dev.slot;
    ioapic_route(gsi, IRQ_VECTOR);

    if (virtio_init(&dev, 0, &queue, 1, 8) != 0) {
        serial_puts("virtio_irq: FAILED init\n");
        return 11;
    }
    struct vbuf v = {(uint64_t)buf, sizeof(buf), 1};
    virtq_add(&queue, &v, 1);
    virtq_kick(&queue);
    __asm__ volatile("sti");
    for (uint64_t i = 0; i < 50000000UL && irq_count == 0; i++) cpu_relax();
    __asm__ volatile("cli");
    uint32_t len = 0;
    int head = virtq_poll(&queue, &len);
    serial_printf("virtio_irq: gsi %u, interrupts %u, status %x, stray %u, used len %u\n", gsi,
                  irq_count, irq_status, stray_count, head >= 0 ? len : 0);
    if (irq_count == 0) return 12;
    if (!(irq_status & 1)) return 13;
    if (head < 0 || len != sizeof(buf)) return 14;
    if (mmio_read32(dev.base + 0x60) != 0) return 15; /* acked */
    serial_puts("virtio_irq: ok\n");
    return 0;
}
