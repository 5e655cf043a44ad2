//! Keeping bounds checks the verifier needs.

/// Returns `x` unchanged, hiding its value from LLVM. A clamp applied after this cannot be
/// proven redundant and dropped: LLVM removes `min(n, MAX)` when it can prove `n <= MAX` through
/// a chain the verifier cannot follow (it tracks each register's range, not relations between
/// registers), and the helper call that follows is then rejected as possibly out of bounds.
#[inline(always)]
pub fn opaque(mut x: u64) -> u64 {
    // SAFETY: an empty asm block that only claims to modify the register.
    unsafe {
        core::arch::asm!("/* {0} */", inout(reg) x, options(nomem, nostack, preserves_flags))
    };
    x
}

/// `min(x, max)` that survives optimisation.
#[inline(always)]
pub fn clamp(x: u64, max: u64) -> u64 {
    let x = opaque(x);
    if x > max { max } else { x }
}
