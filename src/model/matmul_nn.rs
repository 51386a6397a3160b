//! CPU products `y = x · W` for activations `x [m, k]` in f32 and a weight `W [k, n]` stored in
//! f32, bf16 or f16: the layout of a transcoder's encoder `[d_in, d_sae]` and decoder
//! `[d_sae, d_out]`, so a transcoder held in half precision is used as it is stored.
//!
//! Every output element is the sum over `q`, in increasing order, of `x[i, q] · w[q, j]`, from
//! zero, skipping each `q` whose `x[i, q]` is zero, whatever the tile or the thread count: a
//! batch row gets exactly what the same row alone gets. With AVX-512 each step is one fused
//! multiply-add; elsewhere a multiply then an add. Skipping zeros means that decoding sparse
//! feature activations reads only the decoder rows of active features.
//!
//! Rows of `x` go in tiles of up to 8, and each task owns a block of output columns. With
//! AVX-512, rows go in groups of 32, each listing once the `q` where some row is not zero (with
//! a bit per row, and the rows' values there side by side); a task copies a chunk of the listed
//! weight rows' slices into a buffer, row after row (fetching the next chunk's meanwhile: the
//! rows lie `n` apart, and a row's slice read whole is what the prefetchers follow), then runs
//! every tile over the buffer 32 columns at a time, the sums in registers. Elsewhere a task walks
//! W row by row, widening row `q`'s slice of its block to f32 in a stack buffer and adding it,
//! times `x[i, q]`, into a tile's sums in memory. Either way no widened copy of the matrix is made.

use rayon::prelude::*;

use super::matmul::{Elem, Isa, SendPtr, Weights};

/// Output columns per task (of the kernels without AVX-512).
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

fn run<T: Elem>(isa: Isa, x: &[f32], m: usize, k: usize, w: &[T], n: usize, y: &mut [f32]) {
    assert!(w.len() >= k * n, "matmul_nn: weight too small");
    if m == 0 || n == 0 {
        return;
    }
    #[cfg(target_arch = "x86_64")]
    if isa == Isa::Avx512 {
        return tiles512::run(x, m, k, w, n, y);
    }
    let out = SendPtr(y.as_mut_ptr());
    let task = |c: usize| {
        let (j0, j1) = (c * COLS, ((c + 1) * COLS).min(n));
        match isa {
            // SAFETY: the instruction set was checked against the processor.
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
fn block<T: Elem>(x: &[f32], m: usize, k: usize, w: &[T], n: usize, j0: usize, j1: usize, out: SendPtr) {
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

/// [`block`] compiled with AVX2 (the compiler vectorises its loops; no fused multiply-add, so
/// the sums equal the portable ones).
#[cfg(target_arch = "x86_64")]
#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx2,f16c")]
unsafe fn block_avx2<T: Elem>(x: &[f32], m: usize, k: usize, w: &[T], n: usize, j0: usize, j1: usize, out: SendPtr) {
    block(x, m, k, w, n, j0, j1, out)
}

/// The AVX-512 kernel: register tiles of up to 8 rows × 32 columns over chunks of the listed `q`,
/// fused multiply-adds.
#[cfg(target_arch = "x86_64")]
mod tiles512 {
    use super::super::matmul::x86::*;
    use super::super::matmul::{Elem, SendPtr};
    use super::ROWS;
    use rayon::prelude::*;

    /// Rows of x per group: the `q` where some row of a group is not zero are listed once, with
    /// a bit per row.
    const GROUP: usize = 32;
    /// Output columns per register tile (two vectors).
    const NR: usize = 32;
    /// Listed `q` per chunk: a task copies a chunk's weight rows (its slice of them, up to 256
    /// columns: at most 32 KB) into a buffer, row after row, while fetching the next chunk's,
    /// then runs every tile of the group over the buffer 32 columns at a time.
    const CHUNK: usize = 32;
    // A chunk's entries are numbered in a byte.
    const _: () = assert!(CHUNK <= 256);

    /// The `q` of `x [rows, k]` (rows ≤ 32) where some row is not zero, with the mask of those
    /// rows (bit `r` for row `r`): sixteen `q` compared at a time, then only the `q` found looked
    /// at row by row.
    #[target_feature(enable = "avx512f")]
    unsafe fn active(x: &[f32], k: usize, rows: usize) -> Vec<(u32, u32)> {
        let mut list = Vec::new();
        for q0 in (0..k).step_by(16) {
            let lanes = ((1u32 << (k - q0).min(16)) - 1) as u16;
            let mut masks = [0u16; GROUP];
            for (r, m) in masks.iter_mut().enumerate().take(rows) {
                let v = _mm512_maskz_loadu_ps(lanes, x.as_ptr().add(r * k + q0));
                *m = _mm512_mask_cmp_ps_mask::<_CMP_NEQ_UQ>(lanes, v, _mm512_setzero_ps());
            }
            let mut any = masks.iter().fold(0u16, |a, &m| a | m);
            while any != 0 {
                let b = any.trailing_zeros();
                any &= any - 1;
                let mask = masks.iter().enumerate().fold(0u32, |a, (r, &m)| a | ((((m >> b) & 1) as u32) << r));
                list.push(((q0 + b as usize) as u32, mask));
            }
        }
        list
    }

    /// Rows `i0..i0 + rows` of x: the `q` where some of them is not zero, each with the mask of
    /// those rows (bit `r` for row `i0 + r`), and their values there, `xt [list.len()][32]`.
    struct Group {
        i0: usize,
        rows: usize,
        list: Vec<(u32, u32)>,
        xt: Vec<f32>,
    }

    pub fn run<T: Elem>(x: &[f32], m: usize, k: usize, w: &[T], n: usize, y: &mut [f32]) {
        assert!(u32::try_from(k).is_ok(), "matmul_nn: k = {k} does not fit 32 bits");
        // SAFETY: AVX-512 was detected (the caller's Isa); the rows lie inside x.
        let groups: Vec<Group> = (0..m)
            .step_by(GROUP)
            .map(|i0| {
                let rows = GROUP.min(m - i0);
                let list = unsafe { active(&x[i0 * k..(i0 + rows) * k], k, rows) };
                let mut xt = vec![0f32; list.len() * GROUP];
                for (d, &(q, _)) in xt.chunks_exact_mut(GROUP).zip(&list) {
                    for (r, d) in d.iter_mut().enumerate().take(rows) {
                        *d = x[(i0 + r) * k + q as usize];
                    }
                }
                Group { i0, rows, list, xt }
            })
            .collect();
        let threads = rayon::current_num_threads().max(1);
        // Columns per task: whole register tiles, at most 256, about four tasks per thread.
        let cols = n.div_ceil(4 * threads).next_multiple_of(NR).min(256);
        let tasks = n.div_ceil(cols);
        // Every group's chunks in order, (group, first and end entry): a group with no `q` runs
        // one empty chunk, which writes its zeros.
        let chunks: Vec<(usize, usize, usize)> = groups
            .iter()
            .enumerate()
            .flat_map(|(g, gr)| (0..gr.list.len().div_ceil(CHUNK).max(1)).map(move |c| (g, c * CHUNK, ((c + 1) * CHUNK).min(gr.list.len()))))
            .collect();
        let out = SendPtr(y.as_mut_ptr());
        let task = |c: usize| {
            let (j0, j1) = (c * cols, ((c + 1) * cols).min(n));
            let width = j1 - j0;
            let mut buf: Vec<T> = Vec::with_capacity(CHUNK * width);
            for (ci, &(g, e0, e1)) in chunks.iter().enumerate() {
                let (gr, list) = (&groups[g], &groups[g].list[e0..e1]);
                let (i0, rows) = (gr.i0, gr.rows);
                let next = chunks.get(ci + 1).map_or(&[][..], |&(g, e0, e1)| &groups[g].list[e0..e1]);
                // The chunk's rows of w (their columns j0..j1), one after another; the next
                // chunk's are fetched meanwhile, every cache line of them.
                buf.clear();
                for e in 0..list.len().max(next.len()) {
                    if let Some(&(ahead, _)) = next.get(e) {
                        let p = w[ahead as usize * n + j0..].as_ptr();
                        let (start, end) = (p as usize & !63, p as usize + width * std::mem::size_of::<T>());
                        for line in (start..end).step_by(64) {
                            // SAFETY: SSE is part of x86_64; a prefetch reads nothing.
                            unsafe { _mm_prefetch::<_MM_HINT_T0>(line as *const i8) };
                        }
                    }
                    if let Some(&(q, _)) = list.get(e) {
                        buf.extend_from_slice(&w[q as usize * n + j0..][..width]);
                    }
                }
                for t0 in (0..rows).step_by(ROWS) {
                    let tr = ROWS.min(rows - t0);
                    // The chunk's entries where some row of the tile is not zero, and those rows.
                    let (mut sel, mut count) = ([(0u8, 0u8); CHUNK], 0);
                    for (e, &(_, mask)) in list.iter().enumerate() {
                        let live = (mask >> t0) as u8 & (((1u32 << tr) - 1) as u8);
                        sel[count] = (e as u8, live);
                        count += (live != 0) as usize;
                    }
                    for j in (0..width).step_by(NR) {
                        let args = Args {
                            sel: &sel[..count],
                            first: e0 == 0,
                            x: gr.xt.as_ptr().wrapping_add(e0 * GROUP + t0),
                            rows: tr,
                            w: buf.as_ptr().wrapping_add(j),
                            ld: width,
                            cols: (width - j).min(NR),
                            // SAFETY: rows i0 + t0.. of y lie inside it (checked by the caller).
                            y: unsafe { out.get().add((i0 + t0) * n + j0 + j) },
                            n,
                        };
                        // SAFETY: AVX-512 was detected; the tile's rows and listed q lie inside
                        // x, the buffer holds the chunk's rows `ld` apart, columns j..j + cols
                        // of the tile's rows of y lie inside it, and only this task writes them.
                        unsafe {
                            match tr {
                                1 => tile::<T, 1>(args),
                                2 => tile::<T, 2>(args),
                                3 | 4 => tile::<T, 4>(args),
                                _ => tile::<T, ROWS>(args),
                            }
                        }
                    }
                }
            }
        };
        if tasks == 1 || threads == 1 {
            (0..tasks).for_each(task);
        } else {
            (0..tasks).into_par_iter().for_each(task);
        }
    }

    /// One register tile's work over one chunk: `rows` rows of the group (their values at the
    /// chunk's `q` at `x`, [`GROUP`] apart) times the chunk's weight rows (`w`, `ld` apart,
    /// `cols` ≤ 32 columns) over the chunk's entries `sel` lists (each with the tile's rows not
    /// zero there), started from zero (`first`) or from what y holds, written to y (`n` apart).
    struct Args<'a, T> {
        sel: &'a [(u8, u8)],
        first: bool,
        x: *const f32,
        rows: usize,
        w: *const T,
        ld: usize,
        cols: usize,
        y: *mut f32,
        n: usize,
    }

    /// Runs [`Args`] with `R ≥ rows` register rows.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,f16c")]
    unsafe fn tile<T: Elem, const R: usize>(a: Args<T>) {
        let m0 = ((1u32 << a.cols.min(16)) - 1) as u16;
        let m1 = ((1u32 << a.cols.saturating_sub(16)) - 1) as u16;
        // Register rows past `rows` are not written.
        let yr: [*mut f32; R] = std::array::from_fn(|r| a.y.add(r.min(a.rows - 1) * a.n));
        let all = ((1u32 << a.rows) - 1) as u8;
        let mut acc = [[_mm512_setzero_ps(); 2]; R];
        if !a.first {
            for (acc, y) in acc.iter_mut().zip(&yr) {
                *acc = [_mm512_maskz_loadu_ps(m0, *y), _mm512_maskz_loadu_ps(m1, y.wrapping_add(16))];
            }
        }
        for &(e, mask) in a.sel {
            let e = e as usize;
            let wp = a.w.add(e * a.ld);
            let w = [T::load16_masked(wp, m0), T::load16_masked(wp.wrapping_add(16), m1)];
            let xe = a.x.add(e * GROUP);
            if mask == all {
                for (r, acc) in acc.iter_mut().enumerate() {
                    let xv = _mm512_set1_ps(*xe.add(r));
                    acc[0] = _mm512_fmadd_ps(xv, w[0], acc[0]);
                    acc[1] = _mm512_fmadd_ps(xv, w[1], acc[1]);
                }
            } else {
                for (r, acc) in acc.iter_mut().enumerate() {
                    let keep = (((mask >> r) & 1) as u16).wrapping_neg();
                    let xv = _mm512_set1_ps(*xe.add(r));
                    acc[0] = _mm512_mask3_fmadd_ps(xv, w[0], acc[0], keep);
                    acc[1] = _mm512_mask3_fmadd_ps(xv, w[1], acc[1], keep);
                }
            }
        }
        for (acc, y) in acc.iter().zip(&yr).take(a.rows) {
            _mm512_mask_storeu_ps(*y, m0, acc[0]);
            _mm512_mask_storeu_ps(y.wrapping_add(16), m1, acc[1]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use half::{bf16, f16};

    /// The plain loop: every `y[i, j]` summed over `q` in order, from zero, skipping zero
    /// `x[i, q]`; with `fused`, each step one fused multiply-add.
    fn reference<T: Elem>(x: &[f32], m: usize, k: usize, w: &[T], n: usize, fused: bool) -> Vec<f32> {
        let mut wf = vec![0f32; w.len()];
        T::widen(w, &mut wf);
        let mut y = vec![0f32; m * n];
        for i in 0..m {
            for q in 0..k {
                let xv = x[i * k + q];
                if xv != 0.0 {
                    for j in 0..n {
                        let y = &mut y[i * n + j];
                        *y = if fused { xv.mul_add(wf[q * n + j], *y) } else { *y + xv * wf[q * n + j] };
                    }
                }
            }
        }
        y
    }

    /// Odd shapes, sparse rows, every dtype and instruction set: equal to the plain loop, bit for
    /// bit (the same order of operations; fused with AVX-512). Shapes span several groups of 32
    /// rows (one of them all zero), several chunks of `q`, ragged tiles and column tails; the
    /// first `q` is zero in every row and its weight row infinite, which a skipped `q` never
    /// touches.
    #[test]
    fn equals_the_plain_loop() {
        let mut seed = 7u64;
        let mut rnd = || {
            seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((seed >> 40) as f32 / (1u64 << 24) as f32) - 0.5
        };
        for &(m, k, n) in &[(1, 1, 1), (1, 17, 300), (3, 33, 257), (5, 64, 513), (9, 7, 31), (33, 20, 1000), (70, 150, 45), (13, 300, 33)] {
            let x: Vec<f32> =
                (0..m * k).map(|i| if i % 3 == 0 || i % k == 0 || (32..64).contains(&(i / k)) { 0.0 } else { rnd() }).collect();
            let mut w32: Vec<f32> = (0..k * n).map(|_| rnd()).collect();
            if k > 1 {
                w32[..n].fill(f32::INFINITY);
            }
            let wb: Vec<bf16> = w32.iter().map(|&v| bf16::from_f32(v)).collect();
            let wh: Vec<f16> = w32.iter().map(|&v| f16::from_f32(v)).collect();
            for &isa in Isa::available() {
                let fused = isa == Isa::Avx512;
                let mut y = vec![f32::NAN; m * n];
                matmul_nn_with(isa, &x, m, k, Weights::F32(&w32), n, &mut y);
                assert_eq!(y, reference(&x, m, k, &w32, n, fused), "f32 {isa:?} {m}x{k}x{n}");
                matmul_nn_with(isa, &x, m, k, Weights::Bf16(&wb), n, &mut y);
                assert_eq!(y, reference(&x, m, k, &wb, n, fused), "bf16 {isa:?} {m}x{k}x{n}");
                matmul_nn_with(isa, &x, m, k, Weights::F16(&wh), n, &mut y);
                assert_eq!(y, reference(&x, m, k, &wh, n, fused), "f16 {isa:?} {m}x{k}x{n}");
            }
        }
    }

    /// Time of a transcoder's dense encode at decode sizes (GPT-2's `d_in` 768 times 24,576
    /// features, 75 MB of f32, more than any cache), and of a sparse decode (about 2% of the
    /// features active per row), inside the pool, with each instruction set in turn (not a timed
    /// test: it asserts nothing; run it with
    /// `cargo test --release --lib nn_throughput -- --ignored --nocapture`).
    #[test]
    #[ignore]
    fn nn_throughput() {
        let (d, f) = (768usize, 24576usize);
        let mut seed = 11u64;
        let mut rnd = || {
            seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((seed >> 40) as f32 / (1u64 << 24) as f32) - 0.5
        };
        let w: Vec<f32> = (0..d * f).map(|_| rnd()).collect();
        rayon::scope(|_| {
            for m in [1usize, 8, 32] {
                let x: Vec<f32> = (0..m * d).map(|_| rnd()).collect();
                let sparse: Vec<f32> = (0..m * f).map(|i| if (i * 2654435761) % 50 == 0 { 1.0 } else { 0.0 }).collect();
                let mut y = vec![0f32; m * f.max(d)];
                let isas = Isa::available();
                let mut best = vec![[f64::INFINITY; 2]; isas.len()];
                for _ in 0..8 {
                    for (b, &isa) in best.iter_mut().zip(isas) {
                        let t = std::time::Instant::now();
                        matmul_nn_with(isa, &x, m, d, Weights::F32(&w), f, &mut y);
                        b[0] = b[0].min(t.elapsed().as_secs_f64());
                        let t = std::time::Instant::now();
                        matmul_nn_with(isa, &sparse, m, f, Weights::F32(&w), d, &mut y);
                        b[1] = b[1].min(t.elapsed().as_secs_f64());
                    }
                }
                for (b, isa) in best.iter().zip(isas) {
                    let gflops = 2.0 * (m * d * f) as f64 / b[0] / 1e9;
                    println!("m={m:3} {isa:?}: encode {:7.2} ms ({gflops:6.1} GFLOP/s), sparse decode {:7.2} ms", b[0] * 1e3, b[1] * 1e3);
                }
            }
        });
    }
}
