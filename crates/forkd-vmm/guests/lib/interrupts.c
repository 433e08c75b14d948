/*
 * Interrupt plumbing for test guests: one IDT for the guest, the local APIC (enable, EOI,
 * periodic timer) and masking the legacy PICs.
 */
#include "forkd_guest.h"

#define LAPIC_EOI (LAPIC_BASE + 0xb0)
#define LAPIC_SVR (LAPIC_BASE + 0xf0)
#define LAPIC_LVT_TIMER (LAPIC_BASE + 0x320)
#define LAPIC_TIMER_INITIAL (LAPIC_BASE + 0x380)
#define LAPIC_TIMER_CURRENT (LAPIC_BASE + 0x390)
#define LAPIC_TIMER_DIVIDE (LAPIC_BASE + 0x3e0)
#define LVT_TIMER_PERIODIC (1u << 17)
#define IOAPIC_BASE 0xfec00000UL
#define IOAPIC_REDIR_LOW(gsi) (0x10 + 2 * (gsi))
#define IOAPIC_REDIR_HIGH(gsi) (0x11 + 2 * (gsi))

struct idt_entry {
    uint16_t offset_low;
    uint16_t selector;
    uint8_t ist;
    uint8_t type_attr;
    uint16_t offset_mid;
    uint32_t offset_high;
    uint32_t zero;
} __attribute__((packed));

static struct idt_entry idt[256] __attribute__((aligned(16)));

void idt_set_gate(int vector, isr_t handler) {
    uint64_t addr = (uint64_t)handler;
    uint16_t cs;
    __asm__ volatile("mov %%cs, %0" : "=r"(cs));
    idt[vector].offset_low = (uint16_t)addr;
    idt[vector].selector = cs;
    idt[vector].ist = 0;
    idt[vector].type_attr = 0x8e; /* present, ring 0, 64-bit interrupt gate */
    idt[vector].offset_mid = (uint16_t)(addr >> 16);
    idt[vector].offset_high = (uint32_t)(addr >> 32);
    idt[vector].zero = 0;
}

void idt_init(isr_t fallback) {
    for (int v = 0; v < 256; v++) idt_set_gate(v, fallback);
    struct {
        uint16_t limit;
        uint64_t base;
    } __attribute__((packed)) idtr = {sizeof(idt) - 1, (uint64_t)idt};
    __asm__ volatile("lidt %0" ::"m"(idtr));
}

void pic_mask_all(void) {
    outb(0x21, 0xff);
    outb(0xa1, 0xff);
}

void lapic_enable(void) { mmio_write32(LAPIC_SVR, mmio_read32(LAPIC_SVR) | 0x100); }

void lapic_eoi(void) { mmio_write32(LAPIC_EOI, 0); }

void lapic_timer_periodic(uint8_t vector, uint32_t period_ns) {
    mmio_write32(LAPIC_TIMER_DIVIDE, 0xb); /* divide by 1 */
    mmio_write32(LAPIC_LVT_TIMER, LVT_TIMER_PERIODIC | vector);
    mmio_write32(LAPIC_TIMER_INITIAL, period_ns);
}

uint32_t lapic_timer_current(void) { return mmio_read32(LAPIC_TIMER_CURRENT); }

static void ioapic_write(uint32_t reg, uint32_t value) {
    mmio_write32(IOAPIC_BASE, reg);
    mmio_write32(IOAPIC_BASE + 0x10, value);
}

void ioapic_route(uint32_t gsi, uint8_t vector) {
    ioapic_write(IOAPIC_REDIR_HIGH(gsi), this_apic_id() << 24);
    ioapic_write(IOAPIC_REDIR_LOW(gsi), vector);
}
