//! Boot: the PVH note, the only code that runs at CPL0, and the static tables it needs.
//!
//! CPL0 is instruction-emulated on KVM-PVM (~1000x slower), so the 32-bit entry does the strict
//! minimum - 14 instructions - to reach 64-bit CPL3 with IOPL=3: page tables, GDT and the `iretq`
//! frame are static data in the image. Everything else, including the BSP/AP split and the
//! choice of stack, happens at CPL3 in `probe_user_entry`.
//!
//! Register contract at CPL3 entry (preserved from the PVH entry): EBX = hvm_start_info GPA,
//! EDI/ESI = Vireo's vCPU convention (EDI = 0x56495245, ESI = index) for secondary vCPUs.

core::arch::global_asm!(
    r#"
    .section .note.Xen, "a"
    .balign 4
    .long 4                 /* namesz: "Xen\0" */
    .long 4                 /* descsz */
    .long 18                /* XEN_ELFNOTE_PHYS32_ENTRY */
    .asciz "Xen"
    .balign 4
    .long pvh_start32
    .balign 4

    .section .text.pvh_entry, "ax"
    .code32
    .globl pvh_start32
pvh_start32:
    movl $0x620, %eax           /* CR4 = PAE | OSFXSR | OSXMMEXCPT (Rust code uses SSE) */
    movl %eax, %cr4
    movl $probe_pml4, %eax
    movl %eax, %cr3
    movl $0xC0000080, %ecx      /* EFER.LME */
    rdmsr
    orl $0x100, %eax
    wrmsr
    movl $0x80000023, %eax      /* CR0 = PG | NE | MP | PE (EM = TS = 0: SSE allowed) */
    movl %eax, %cr0
    lgdt probe_gdt_ptr
    ljmp $0x08, $1f
    .code64
1:
    movl $probe_iret_frame, %esp
    iretq
    .globl pvh_cpl0_end
pvh_cpl0_end:

    /* CPL3 from here on. */
    .section .text.probe_user_entry, "ax"
    .globl probe_user_entry
probe_user_entry:
    cmpl $0x56495245, %edi
    jne 2f
    testl %esi, %esi
    jz 2f
    cmpl $32, %esi
    jae 3f
    movl %esi, %eax
    addl $1, %eax
    shll $14, %eax
    leaq probe_ap_stacks(%rip), %rsp
    addq %rax, %rsp
    movl %esi, %edi
    call probe_ap_main
3:
    pause
    jmp 3b
2:
    leaq probe_bsp_stack_top(%rip), %rsp
    movl %ebx, %edi
    call probe_bsp_main
4:
    pause
    jmp 4b

    .section .rodata.probe_boot, "a"
    .balign 16
probe_gdt:
    .quad 0
    .quad 0x00af9b000000ffff    /* 0x08: kernel code, 64-bit (accessed bit preset) */
    .quad 0x00cf93000000ffff    /* 0x10: kernel data */
    .quad 0x00affb000000ffff    /* 0x18: user code, 64-bit, DPL 3 */
    .quad 0x00cff3000000ffff    /* 0x20: user data, DPL 3 */
probe_gdt_end:
    .balign 8
probe_gdt_ptr:
    .word probe_gdt_end - probe_gdt - 1
    .long probe_gdt
    .balign 16
probe_iret_frame:
    .quad probe_user_entry      /* RIP */
    .quad 0x1b                  /* CS: user code | RPL 3 */
    .quad 0x3002                /* RFLAGS: IOPL = 3, IF = 0 */
    .quad 0                     /* RSP: chosen at CPL3 */
    .quad 0x23                  /* SS: user data | RPL 3 */

    /* Identity map of 0..4 GiB with user-accessible 2 MiB pages; accessed/dirty bits preset so
       the CPU never has to write them. */
    .section .data.pagetables, "aw"
    .balign 4096
probe_pml4:
    .quad probe_pdpt + 0x27
    .fill 511, 8, 0
probe_pdpt:
    .quad probe_pd + 0x27
    .quad probe_pd + 0x1000 + 0x27
    .quad probe_pd + 0x2000 + 0x27
    .quad probe_pd + 0x3000 + 0x27
    .fill 508, 8, 0
probe_pd:
    .set probe_page, 0
    .rept 2048
    .quad probe_page + 0xe7     /* P | RW | US | A | D | PS */
    .set probe_page, probe_page + 0x200000
    .endr

    .section .bss.probe_stacks, "aw", @nobits
    .balign 4096
probe_bsp_stack:
    .skip 262144
probe_bsp_stack_top:
    .globl probe_ap_stacks
probe_ap_stacks:
    .skip 32 * 16384            /* slot i (1..31) is AP i's stack; top = base + (i + 1) * 16 KiB */
"#,
    options(att_syntax)
);
