/*
 * first_exit: the smallest guest, without the runtime. Its very first instruction exits to the
 * VMM (a write to port 0x80, the POST-code port) so the benchmark can time VM creation to the
 * first guest instruction; then it stops the VM through the debug-exit port with code 0.
 */
    .section .text.start, "ax"
    .code64
    .globl _start
_start:
    out %al, $0x80
    xor %eax, %eax
    out %eax, $0xf4
1:  hlt
    jmp 1b
