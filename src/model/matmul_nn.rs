//! CPU products `y = x · W` for activations `x [m, k]` in f32 and a weight `W [k, n]` stored in
//! f32, bf16 or f16: the layout of a transcoder's encoder `[d_in, d_sae]` and decoder
//! `[d_sae, d_out]`, so a transcoder held in half precision is used as it is stored.
//!
//! Each task owns a block of output columns and walks `W` row by row: row `q`'s slice of the
//! block is widened to f32 in a small stack buffer (never a widened copy of the matrix) and added,
//! times `x[i, q]`, into the accumulators of a tile of up to `ROWS` rows of `x`. A zero `x[i, q]`
//! adds nothing and is skipped, so decoding sparse feature activations reads only the decoder rows
//! of active features. Every output element is summed over `q` in increasing order with separate
//! multiplies and adds, whatever the tile, the thread count or the instruction set, so a batch row
//! gets exactly what the same row alone gets.

use half::{bf16, f16};
use rayon::prelude::*;

use super::matmul::{Isa, SendPtr, Weights};

/// Output columns per task.
const COLS: usize = 256;
/// Rows of `x` per tile.
const ROWS: usize = 8;

/// `y[i, j] = Σ_q x[i, q] · w[q, j]` for `x [m, k]`, `w [k, n]`, `y [m, n]` (all row-major).
pub fn matmul_nn(x: &[f32], m: usize, k: usize, w: Weights, n: usize, y: &mut [f32]) {
    matmul_nn_with(Isa::detected(), x, m, k, w, n, y)
}

/// [`matmul_nn`] compiled for a chosen instruction set (which must be in [`Isa::available`]).
pub fn matmul_nn_with(isa: Isa, x: &[f32], m: usize, k: usize, w: Weights, n: usize, y: &mut [f32]) {
    assert!(x.len() >= m * k && y.len() >= m * n, "matmul_nn: buffers too small");
    assert!(Isa::available().contains(&isa), "matmul_nn: {isa:?} is not supported by this processor");
    match w {
        Weights::F32(w) => run(isa, x, m, k, w, n, y),
        Weights::Bf16(w) => run(isa, x, m, k, w, n, y),
        Weights::F16(w) => run(isa, x, m, k, w, n, y),
    }
}

fn run<T: Widen>(isa: Isa, x: &[f32], m: usize, k: usize, w: &[T], n: usize, y: &mut [f32]) {
    assert!(w.len() >= k * n, "matmul_nn: weight too small");
    if m == 0 || n == 0 {
        return;
    }
    let out = SendPtr(y.as_mut_ptr());
    let task = |c: usize| {
        let (j0, j1) = (c * COLS, ((c + 1) * COLS).min(n));
        match isa {
            // SAFETY: the instruction set was checked against the processor.
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 => unsafe { block_avx512(x, m, k, w, n, j0, j1, out) },
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => unsafe { block_avx2(x, m, k, w, n, j0, j1, out) },
            _ => block(x, m, k, w, n, j0, j1, out),
        }
    };
    let tasks = n.div_ceil(COLS);
    if tasks == 1 || rayon::current_num_threads() == 1 {
        (0..tasks).for_each(task);
    } else {
        (0..tasks).into_par_iter().for_each(task);
    }
}

/// Output columns `j0..j1` of every row.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn block<T: Widen>(x: &[f32], m: usize, k: usize, w: &[T], n: usize, j0: usize, j1: usize, out: SendPtr) {
    let cols = j1 - j0;
    let mut wrow = [0f32; COLS];
    let mut acc = [[0f32; COLS]; ROWS];
    let mut i0 = 0;
    while i0 < m {
        let rows = ROWS.min(m - i0);
        for a in acc.iter_mut().take(rows) {
            a[..cols].fill(0.0);
        }
        for q in 0..k {
            let xs: [f32; ROWS] = std::array::from_fn(|r| if r < rows { x[(i0 + r) * k + q] } else { 0.0 });
            if xs.iter().all(|&v| v == 0.0) {
                continue;
            }
            T::widen(&w[q * n + j0..q * n + j1], &mut wrow[..cols]);
            for (a, &xv) in acc.iter_mut().zip(&xs).take(rows) {
                if xv != 0.0 {
                    for (o, &wv) in a[..cols].iter_mut().zip(&wrow[..cols]) {
                        *o += xv * wv;
                    }
                }
            }
        }
        for (r, a) in acc.iter().enumerate().take(rows) {
            // SAFETY: row i0 + r, columns j0..j1 lie inside y and only this task writes them.
            unsafe { std::ptr::copy_nonoverlapping(a.as_ptr(), out.get().add((i0 + r) * n + j0), cols) };
        }
        i0 += rows;
    }
}

/// [`block`] compiled with AVX-512 (the compiler vectorises its loops; no fused multiply-add, so
/// the sums equal the portable ones).
#[cfg(target_arch = "x86_64")]
#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,f16c")]
unsafe fn block_avx512<T: Widen>(x: &[f32], m: usize, k: usize, w: &[T], n: usize, j0: usize, j1: usize, out: SendPtr) {
    block(x, m, k, w, n, j0, j1, out)
}

/// [`block`] compiled with AVX2.
#[cfg(target_arch = "x86_64")]
#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx2,f16c")]
unsafe fn block_avx2<T: Widen>(x: &[f32], m: usize, k: usize, w: &[T], n: usize, j0: usize, j1: usize, out: SendPtr) {
    block(x, m, k, w, n, j0, j1, out)
}

/// A weight element that widens a slice of itself to f32.
trait Widen: Copy + Send + Sync {
    fn widen(src: &[Self], dst: &mut [f32]);
}

impl Widen for f32 {
    #[inline(always)]
    fn widen(src: &[Self], dst: &mut [f32]) {
        dst.copy_from_slice(src);
    }
}

impl Widen for bf16 {
    #[inline(always)]
    fn widen(src: &[Self], dst: &mut [f32]) {
        // bf16 is the top half of an f32.
        for (d, s) in dst.iter_mut().zip(src) {
            *d = f32::from_bits((s.to_bits() as u32) << 16);
        }
    }
}

impl Widen for f16 {
    #[inline(always)]
    fn widen(src: &[Self], dst: &mut [f32]) {
        use half::slice::HalfFloatSliceExt;
        src.convert_to_f32_slice(dst);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reference<T: Widen>(x: &[f32], m: usize, k: usize, w: &[T], n: usize) -> Vec<f32> {
        let mut wf = vec![0f32; w.len()];
        T::widen(w, &mut wf);
        let mut y = vec![0f32; m * n];
        for i in 0..m {
            for q in 0..k {
                let xv = x[i * k + q];
                if xv != 0.0 {
                    for j in 0..n {
                        y[i * n + j] += xv * wf[q * n + j];
                    }
                }
            }
        }
        y
    }

    /// Odd shapes, sparse rows, every dtype and instruction set: equal to the plain loop, bit for
    /// bit (the same order of separate multiplies and adds).
    #[test]
    fn equals_the_plain_loop() {
        let mut seed = 7u64;
        let mut rnd = || {
            seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((seed >> 40) as f32 / (1u64 << 24) as f32) - 0.5
        };
        for &(m, k, n) in &[(1, 1, 1), (1, 17, 300), (3, 33, 257), (5, 64, 513), (9, 7, 31), (33, 20, 1000)] {
            let x: Vec<f32> = (0..m * k).map(|i| if i % 3 == 0 { 0.0 } else { rnd() }).collect();
            let w32: Vec<f32> = (0..k * n).map(|_| rnd()).collect();
            let wb: Vec<bf16> = w32.iter().map(|&v| bf16::from_f32(v)).collect();
            let wh: Vec<f16> = w32.iter().map(|&v| f16::from_f32(v)).collect();
            for &isa in Isa::available() {
                let mut y = vec![f32::NAN; m * n];
                matmul_nn_with(isa, &x, m, k, Weights::F32(&w32), n, &mut y);
                assert_eq!(y, reference(&x, m, k, &w32, n), "f32 {isa:?} {m}x{k}x{n}");
                matmul_nn_with(isa, &x, m, k, Weights::Bf16(&wb), n, &mut y);
                assert_eq!(y, reference(&x, m, k, &wb, n), "bf16 {isa:?} {m}x{k}x{n}");
                matmul_nn_with(isa, &x, m, k, Weights::F16(&wh), n, &mut y);
                assert_eq!(y, reference(&x, m, k, &wh, n), "f16 {isa:?} {m}x{k}x{n}");
            }
        }
    }
}
