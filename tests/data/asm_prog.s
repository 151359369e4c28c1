# A hand-written program whose FUNC symbol has no size (no .size directive):
# inspect falls back to the section size.
	.section	xdp,"ax",@progbits
	.globl	xdp_pass
	.type	xdp_pass,@function
xdp_pass:
	r0 = 2
	exit

	.section	license,"aw",@progbits
	.asciz	"GPL"
