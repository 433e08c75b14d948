/*
 * forkd test-guest runtime: a freestanding environment for small 64-bit guests that forkd's
 * VMM boots through its Linux boot path (ELF, long mode, identity-mapped first 1 GiB, and the
 * 3-4 GiB MMIO hole mapped uncached by the start code).
 *
 * Rules for guests on PVM hosts (KVM's instruction emulator): no SSE/FPU, no int3, no
 * cmpxchg16b, no faults. Keep loops short.
 *
 * Conventions shared with the VMM (crates/forkd-vmm/src/arch/x86_64/layout.rs, guests.rs):
 *   - serial 8250 at port 0x3f8;
 *   - writing a 32-bit value to port 0xf4 stops the VM with that exit code;
 *   - GUEST_STATUS_ADDR (0x6000) is a page the VMM may read: guests put counters there.
 */
#ifndef FORKD_GUEST_H
#define FORKD_GUEST_H

#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#define SERIAL_PORT 0x3f8
#define GUEST_EXIT_PORT 0xf4
#define I8042_COMMAND_PORT 0x64
#define GUEST_STATUS_ADDR 0x6000UL
#define LAPIC_BASE 0xfee00000UL
#define VIRTIO_MMIO_BASE 0xd0000000UL
#define VIRTIO_MMIO_SLOT_SIZE 0x1000UL
#define VIRTIO_MMIO_MAX_SLOTS 18

/* ---- port and memory-mapped I/O ---- */
static inline void outb(uint16_t port, uint8_t v) { __asm__ volatile("outb %0, %1" ::"a"(v), "Nd"(port)); }
static inline void outl(uint16_t port, uint32_t v) { __asm__ volatile("outl %0, %1" ::"a"(v), "Nd"(port)); }
static inline uint8_t inb(uint16_t port) {
    uint8_t v;
    __asm__ volatile("inb %1, %0" : "=a"(v) : "Nd"(port));
    return v;
}
static inline uint32_t inl(uint16_t port) {
    uint32_t v;
    __asm__ volatile("inl %1, %0" : "=a"(v) : "Nd"(port));
    return v;
}
static inline uint32_t mmio_read32(uint64_t addr) { return *(volatile uint32_t *)addr; }
static inline void mmio_write32(uint64_t addr, uint32_t v) { *(volatile uint32_t *)addr = v; }
static inline uint8_t mmio_read8(uint64_t addr) { return *(volatile uint8_t *)addr; }
static inline void mmio_write8(uint64_t addr, uint8_t v) { *(volatile uint8_t *)addr = v; }
static inline void cpu_relax(void) { __asm__ volatile("pause" ::: "memory"); }
static inline void barrier(void) { __asm__ volatile("" ::: "memory"); }
static inline void mb(void) { __asm__ volatile("mfence" ::: "memory"); }
static inline void cpuid(uint32_t leaf, uint32_t sub, uint32_t *a, uint32_t *b, uint32_t *c, uint32_t *d) {
    __asm__ volatile("cpuid" : "=a"(*a), "=b"(*b), "=c"(*c), "=d"(*d) : "a"(leaf), "c"(sub));
}

/* ---- libc bits gcc may call even with -ffreestanding ---- */
void *memset(void *dst, int c, size_t n);
void *memcpy(void *dst, const void *src, size_t n);
int memcmp(const void *a, const void *b, size_t n);
void *memchr(const void *s, int c, size_t n);
size_t strlen(const char *s);

/* ---- serial console ---- */
void serial_putc(char c);
void serial_write(const char *s, size_t n);
void serial_puts(const char *s);
/* printf subset: %s %c %d %u %x %lu %ld %lx %p %% */
void serial_printf(const char *fmt, ...);
void serial_vprintf(const char *fmt, va_list ap);
/* Returns the next received byte, or -1 when none is waiting. */
int serial_getc_nonblock(void);

/* ---- stopping ---- */
/* Stops the VM with `code` (0 = success) through the debug-exit port. */
__attribute__((noreturn)) void guest_exit(uint32_t code);
/* Asks for a reset through the i8042 (what Linux does with reboot=k). */
__attribute__((noreturn)) void guest_reset(void);

/* ---- CPUs ---- */
/* This CPU's initial APIC id (CPUID leaf 1). */
uint32_t this_apic_id(void);
/* Number of processors listed in the MP table the VMM wrote (0 if none found). */
int mp_cpu_count(void);
/*
 * Starts every application processor listed in the MP table the way Linux does: INIT, then
 * two STARTUP IPIs through the local APIC into a real-mode trampoline at 0x10000 that enters
 * long mode and calls `entry(apic_id)` on its own 16 KiB stack. Returns the number of APs
 * that reached `entry` within the wait budget.
 */
int smp_start_aps(void (*entry)(uint32_t apic_id));
#define MAX_CPUS 64

/* ---- simple spinlock (xchg) ---- */
typedef struct { volatile uint32_t locked; } spinlock_t;
void spin_lock(spinlock_t *l);
void spin_unlock(spinlock_t *l);

/* ---- interrupts (lib/interrupts.c) ---- */
struct interrupt_frame;
typedef void (*isr_t)(struct interrupt_frame *);
/* Points every vector at `fallback`, then loads the IDT. */
void idt_init(isr_t fallback);
void idt_set_gate(int vector, isr_t handler);
/* Masks the legacy PICs (as Linux does when it switches to the IOAPIC). */
void pic_mask_all(void);
/* Software-enables the local APIC (SVR bit 8). */
void lapic_enable(void);
void lapic_eoi(void);
/* Fires `vector` every `period_ns` (KVM's APIC timer counts at 1 GHz; divide by 1). */
void lapic_timer_periodic(uint8_t vector, uint32_t period_ns);
/* Nanoseconds left until the timer's next expiry (its current count). */
uint32_t lapic_timer_current(void);
/* Routes IOAPIC pin `gsi` to `vector` on this CPU: edge-triggered, active high, fixed delivery
 * (how virtio-mmio lines are wired; the VMM raises them through irqfds). */
void ioapic_route(uint32_t gsi, uint8_t vector);

/* The guest's entry point, called by the start code on the boot CPU. Its return value is the
 * exit code. `boot_params` points at the Linux zero page. */
int main(void *boot_params);

#endif
