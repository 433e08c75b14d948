/* Entry from the VMM in 64-bit mode (rip = ELF entry, rsi = zero page, interrupts off). */
    .section .text.start, "ax"
    .code64
    .globl _start
_start:
    cli
    lea boot_stack_top(%rip), %rsp
    mov %rsi, %rdi
    call guest_start
1:  hlt
    jmp 1b

/*
 * AP trampoline, copied by smp_start_aps() to TRAMPOLINE_BASE (0x10000, SIPI vector 0x10).
 * Real mode -> 32-bit protected mode -> long mode with the boot CPU's CR3, like Linux's
 * trampoline_64. Addresses are computed relative to the copy.
 */
    .set TRAMPOLINE_BASE, 0x10000
    .section .rodata.trampoline, "a"
    .globl trampoline_start, trampoline_end, trampoline_cr3
    .code16
trampoline_start:
    cli
    mov %cs, %ax
    mov %ax, %ds
    lgdtl tramp_gdt_desc - trampoline_start
    mov %cr0, %eax
    or $1, %eax
    mov %eax, %cr0
    ljmpl $0x18, $(TRAMPOLINE_BASE + tramp32 - trampoline_start)

    .code32
tramp32:
    mov $0x10, %ax
    mov %ax, %ds
    mov %ax, %es
    mov %ax, %ss
    mov %cr4, %eax
    or $0x20, %eax              /* PAE */
    mov %eax, %cr4
    mov (TRAMPOLINE_BASE + trampoline_cr3 - trampoline_start), %eax
    mov %eax, %cr3
    mov $0xc0000080, %ecx       /* EFER.LME */
    rdmsr
    or $0x100, %eax
    wrmsr
    mov %cr0, %eax
    or $0x80000000, %eax        /* PG */
    mov %eax, %cr0
    ljmp $0x08, $(TRAMPOLINE_BASE + tramp64 - trampoline_start)

    .code64
tramp64:
    mov $0x10, %ax
    mov %ax, %ds
    mov %ax, %es
    mov %ax, %ss
    mov $1, %eax
    cpuid
    shr $24, %ebx               /* initial APIC id */
    mov %ebx, %edi
    lea 1(%rbx), %rax
    shl $14, %rax               /* 16 KiB per CPU */
    movabs $ap_stacks, %rsp
    add %rax, %rsp
    movabs $ap_start, %rax
    call *%rax
2:  hlt
    jmp 2b

    .balign 8
tramp_gdt:
    .quad 0
    .quad 0x00af9b000000ffff    /* 0x08: 64-bit code */
    .quad 0x00cf93000000ffff    /* 0x10: data */
    .quad 0x00cf9b000000ffff    /* 0x18: 32-bit code */
tramp_gdt_desc:
    .word 4 * 8 - 1
    .long TRAMPOLINE_BASE + tramp_gdt - trampoline_start
    .balign 4
trampoline_cr3:
    .long 0
trampoline_end:

    .section .bss
    .balign 16
    .globl boot_stack_top
    .skip 32768
boot_stack_top:
