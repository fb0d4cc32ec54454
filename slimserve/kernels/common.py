"""Pieces the Triton kernels share."""

from slimserve.kernels.dispatch import HAS_TRITON

if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def dot(a, b, UPCAST: tl.constexpr):
        # The CPU interpreter cannot multiply bf16 or FP8 held as raw integers; on a GPU UPCAST is off.
        if UPCAST:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        return tl.dot(a, b, input_precision="ieee")
