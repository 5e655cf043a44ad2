//! Struct copies the BPF backend would otherwise turn into calls to a byte-at-a-time memmove or
//! memset subprogram (it does for some 24- and 40-byte copies between map values).

/// Copies `*src` to `*dst` in 8-byte words. `T` must be a multiple of 8 bytes and 8-aligned
/// (checked at compile time); the volatile accesses keep LLVM from merging them back into a
/// memmove call.
#[inline(always)]
pub fn copy_words<T: Copy>(dst: *mut T, src: *const T) {
    const { assert!(core::mem::size_of::<T>().is_multiple_of(8) && core::mem::align_of::<T>() >= 8) };
    let (d, s) = (dst.cast::<u64>(), src.cast::<u64>());
    let mut i = 0;
    while i < core::mem::size_of::<T>() / 8 {
        // SAFETY: both point to a whole, aligned T; i stays inside it.
        unsafe { d.add(i).write_volatile(s.add(i).read_volatile()) };
        i += 1;
    }
}

/// Zeroes `*dst` in 8-byte words. A struct literal's zero fields become memsets that LLVM
/// splits around the other fields, starting at unaligned offsets, and the BPF backend makes
/// those calls to a byte loop.
#[inline(always)]
pub fn zero_words<T: Copy>(dst: *mut T) {
    const { assert!(core::mem::size_of::<T>().is_multiple_of(8) && core::mem::align_of::<T>() >= 8) };
    let d = dst.cast::<u64>();
    let mut i = 0;
    while i < core::mem::size_of::<T>() / 8 {
        // SAFETY: inside the value, aligned.
        unsafe { d.add(i).write_volatile(0) };
        i += 1;
    }
}
