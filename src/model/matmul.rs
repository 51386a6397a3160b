//! CPU matrix products of linear layers: `y = x · Wᵀ` for activations `x [m, k]` in f32 and a weight
//! `W [n, k]` (the `nn.Linear` layout) stored in f32, bf16 or f16, accumulated in f32, with
//! half-precision weights converted to f32 in registers (never a widened copy of the matrix).
//!
//! With AVX-512 (detected at run time) the weights are re-laid out once, at load, as panels of 32
//! rows ([`Packed`]), and one blocked kernel (`gemm512`) runs every product: decode (a few rows,
//! bound by reading the weights once, output columns split across threads) and prefill (many
//! rows, bound by arithmetic). Every output element is summed in the same order whatever `m`, so
//! a batch row gets exactly what the same row alone gets.
//!
//! Without AVX-512 the weights stay `[n, k]`. For `m <= SMALL_M` a register-tiled kernel (AVX2+FMA
//! with F16C, or portable code) reads each weight row once per tile of rows of `x`, running blocks
//! of k against groups of weight rows while they are in L1; every output element is the in-order
//! sum of its dot products over fixed blocks of k, whatever `m`, the tile or the thread count.
//! Larger `m` runs in the `gemm` crate (what candle uses), with a half-precision weight widened
//! one block of rows at a time into a reused buffer.

use std::cell::Cell;
use std::sync::OnceLock;

use half::{bf16, f16};
use rayon::prelude::*;

/// Rows of `x` up to which a product counts as decode and runs in a weight-streaming kernel (this
/// module's without AVX-512, and [`super::matmul_nn`]'s for transcoders); above it, `gemm`.
pub const SMALL_M: usize = 32;

/// A weight matrix `[n, k]`, row-major, in its storage dtype.
#[derive(Clone, Copy)]
pub enum Weights<'a> {
    F32(&'a [f32]),
    Bf16(&'a [bf16]),
    F16(&'a [f16]),
}

impl Weights<'_> {
    /// Calls `f` with the elements of `t`, a contiguous f32, bf16 or f16 tensor on the CPU (`what`
    /// names it in errors).
    pub fn with<R>(t: &candle_core::Tensor, what: &str, f: impl FnOnce(Weights) -> R) -> anyhow::Result<R> {
        use candle_core::{DType, Storage};
        let (storage, layout) = t.storage_and_layout();
        let Storage::Cpu(cpu) = &*storage else { anyhow::bail!("{what} is not on the CPU") };
        let off = layout.start_offset();
        let w = match t.dtype() {
            DType::F32 => Weights::F32(&cpu.as_slice::<f32>()?[off..]),
            DType::BF16 => Weights::Bf16(&cpu.as_slice::<bf16>()?[off..]),
            DType::F16 => Weights::F16(&cpu.as_slice::<f16>()?[off..]),
            other => anyhow::bail!("{what} must be f32, bf16 or f16, not {other:?}"),
        };
        Ok(f(w))
    }

    fn len(&self) -> usize {
        match self {
            Weights::F32(w) => w.len(),
            Weights::Bf16(w) => w.len(),
            Weights::F16(w) => w.len(),
        }
    }
}

/// Weight rows per panel of [`Packed`] (two AVX-512 vectors of outputs).
const NP: usize = 32;

/// A weight matrix `[n, k]` re-laid out once for the AVX-512 kernel, in its storage dtype: panels
/// of 32 rows, each `[k][32]` (row `j` of W is lane `j % 32` of panel `j / 32`; lanes past `n` are
/// zero), so that every product, whatever its number of rows, streams each panel in order.
pub struct Packed {
    data: PackedData,
    n: usize,
    k: usize,
}

enum PackedData {
    F32(Vec<f32>),
    Bf16(Vec<bf16>),
    F16(Vec<f16>),
}

/// The zeroed panels of an `[n, k]` matrix (a [`super::zeroed_buffer`]), panel `pi` (`[k][32]`)
/// filled by `fill(pi, panel)`, panels in parallel.
fn panels<T: Copy + bytemuck::Zeroable + Send + Sync>(n: usize, k: usize, fill: impl Fn(usize, &mut [T]) + Sync) -> Vec<T> {
    let mut out = super::zeroed_buffer(n.div_ceil(NP) * k * NP);
    if k > 0 {
        out.par_chunks_mut(k * NP).enumerate().for_each(|(pi, dst)| fill(pi, dst));
    }
    out
}

impl Packed {
    /// Whether this processor runs products on packed weights (AVX-512); elsewhere the kernels
    /// read `[n, k]` as it is.
    pub fn supported() -> bool {
        Isa::detected() == Isa::Avx512
    }

    /// Packs `w [n, k]`.
    pub fn new(w: Weights, n: usize, k: usize) -> Packed {
        assert!(w.len() >= n * k, "Packed::new: weights too small");
        fn pack<T: Copy + bytemuck::Zeroable + Send + Sync>(w: &[T], n: usize, k: usize) -> Vec<T> {
            panels(n, k, |pi, dst| {
                let rows = NP.min(n - pi * NP);
                // 64 k at a time, so the 32 rows' lines are reused while in L1.
                for p0 in (0..k).step_by(64) {
                    let p1 = (p0 + 64).min(k);
                    for r in 0..rows {
                        for (p, &v) in w[(pi * NP + r) * k..][p0..p1].iter().enumerate() {
                            dst[(p0 + p) * NP + r] = v;
                        }
                    }
                }
            })
        }
        let data = match w {
            Weights::F32(w) => PackedData::F32(pack(w, n, k)),
            Weights::Bf16(w) => PackedData::Bf16(pack(w, n, k)),
            Weights::F16(w) => PackedData::F16(pack(w, n, k)),
        };
        Packed { data, n, k }
    }

    /// Packs the transpose of `w [k, n]` (a `[in, out]` layout, as GPT-2's Conv1D stores it)
    /// with `sub[p]` subtracted from its row `p`, converted to `dtype` (f32, bf16 or f16, rounded
    /// to nearest as candle converts): the panels are copies of 32-wide slices of its rows.
    pub fn from_kn(w: &[f32], k: usize, n: usize, sub: &[f32], dtype: candle_core::DType) -> anyhow::Result<Packed> {
        assert!(w.len() >= k * n && sub.len() >= k, "Packed::from_kn: buffers too small");
        fn pack<T: Copy + bytemuck::Zeroable + Send + Sync>(w: &[f32], k: usize, n: usize, sub: &[f32], cvt: impl Fn(f32) -> T + Sync) -> Vec<T> {
            panels(n, k, |pi, dst| {
                let j0 = pi * NP;
                let cols = NP.min(n - j0);
                for (p, d) in dst.chunks_exact_mut(NP).enumerate() {
                    for (d, &v) in d.iter_mut().zip(&w[p * n + j0..][..cols]) {
                        *d = cvt(v - sub[p]);
                    }
                }
            })
        }
        let data = match dtype {
            candle_core::DType::F32 => PackedData::F32(pack(w, k, n, sub, |v| v)),
            candle_core::DType::BF16 => PackedData::Bf16(pack(w, k, n, sub, bf16::from_f32)),
            candle_core::DType::F16 => PackedData::F16(pack(w, k, n, sub, f16::from_f32)),
            other => anyhow::bail!("weights must be f32, bf16 or f16, not {other:?}"),
        };
        Ok(Packed { data, n, k })
    }

    /// `(n, k)`.
    pub fn dims(&self) -> (usize, usize) {
        (self.n, self.k)
    }

    /// Row `j` of W in f32, into `out [k]` (an embedding lookup in a tied table).
    pub fn row(&self, j: usize, out: &mut [f32]) {
        assert!(j < self.n && out.len() == self.k, "Packed::row: row {j} of {}, or a buffer of the wrong size", self.n);
        let base = (j / NP) * self.k * NP + j % NP;
        match &self.data {
            PackedData::F32(d) => out.iter_mut().enumerate().for_each(|(p, o)| *o = d[base + p * NP]),
            PackedData::Bf16(d) => out.iter_mut().enumerate().for_each(|(p, o)| *o = d[base + p * NP].to_f32()),
            PackedData::F16(d) => out.iter_mut().enumerate().for_each(|(p, o)| *o = d[base + p * NP].to_f32()),
        }
    }

    /// `y[i, j] = Σ_q x[i, q] · w[j, q]` for the `rows` of `x [.., k]`, rows of y `ldy` apart
    /// (`ldy >= n`); y's other rows are left as they are. Needs AVX-512 ([`Packed::supported`]).
    pub fn matmul(&self, x: &[f32], rows: Rows, y: &mut [f32], ldy: usize) {
        let (n, k) = (self.n, self.k);
        let Some(end) = rows.end() else { return };
        if n == 0 {
            return;
        }
        assert!(ldy >= n && x.len() >= end * k && y.len() >= (end - 1) * ldy + n, "Packed::matmul: buffers too small");
        assert!(Packed::supported(), "Packed::matmul: this processor lacks AVX-512");
        if k == 0 {
            for i in 0..rows.len() {
                y[rows.at(i) * ldy..][..n].fill(0.0);
            }
            return;
        }
        #[cfg(target_arch = "x86_64")]
        match &self.data {
            PackedData::F32(w) => gemm512::gemm(x, rows, k, w, n, y, ldy),
            PackedData::Bf16(w) => gemm512::gemm(x, rows, k, w, n, y, ldy),
            PackedData::F16(w) => gemm512::gemm(x, rows, k, w, n, y, ldy),
        }
    }
}

/// The rows of x and y a product covers: the first `m`, or only the listed ones, in increasing
/// order (a batch's real tokens, its padding skipped).
#[derive(Clone, Copy, Debug)]
pub enum Rows<'a> {
    First(usize),
    Only(&'a [usize]),
}

impl Rows<'_> {
    /// How many rows are computed.
    pub fn len(&self) -> usize {
        match self {
            Rows::First(m) => *m,
            Rows::Only(r) => r.len(),
        }
    }

    /// Whether no row is computed.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The index in x and y of the `i`-th computed row.
    #[inline]
    pub fn at(&self, i: usize) -> usize {
        match self {
            Rows::First(_) => i,
            Rows::Only(r) => r[i],
        }
    }

    /// One past the last row touched (`None` when none is); panics unless listed rows increase.
    fn end(&self) -> Option<usize> {
        if let Rows::Only(r) = self {
            assert!(r.windows(2).all(|w| w[0] < w[1]), "Rows::Only: rows must increase");
        }
        (!self.is_empty()).then(|| self.at(self.len() - 1) + 1)
    }
}

/// The vector instructions a kernel uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Isa {
    /// AVX-512 (F, BW, VL) with F16C.
    Avx512,
    /// AVX2 with FMA and F16C.
    Avx2,
    /// Plain Rust (auto-vectorised where the compiler can).
    Portable,
}

impl Isa {
    /// The best instruction set this processor supports (detected once).
    pub fn detected() -> Isa {
        static ISA: OnceLock<Isa> = OnceLock::new();
        *ISA.get_or_init(|| {
            #[cfg(target_arch = "x86_64")]
            {
                let has = |f: &str| match f {
                    "avx512f" => is_x86_feature_detected!("avx512f"),
                    "avx512bw" => is_x86_feature_detected!("avx512bw"),
                    "avx512vl" => is_x86_feature_detected!("avx512vl"),
                    "avx2" => is_x86_feature_detected!("avx2"),
                    "fma" => is_x86_feature_detected!("fma"),
                    "f16c" => is_x86_feature_detected!("f16c"),
                    _ => false,
                };
                if ["avx512f", "avx512bw", "avx512vl", "fma", "f16c"].iter().all(|f| has(f)) {
                    return Isa::Avx512;
                }
                if ["avx2", "fma", "f16c"].iter().all(|f| has(f)) {
                    return Isa::Avx2;
                }
            }
            Isa::Portable
        })
    }

    /// The instruction sets this processor can run, best first (for tests and benchmarks).
    pub fn available() -> &'static [Isa] {
        match Isa::detected() {
            Isa::Avx512 => &[Isa::Avx512, Isa::Avx2, Isa::Portable],
            Isa::Avx2 => &[Isa::Avx2, Isa::Portable],
            Isa::Portable => &[Isa::Portable],
        }
    }
}

/// `y[i, j] = Σ_q x[i, q] · w[j, q]` for `x [m, k]`, `w [n, k]`, with the detected instruction
/// set. Row `i` of the output starts at `y[i * ldy]` (`ldy >= n`, so the product can fill some
/// columns of a wider matrix). With AVX-512 this packs `w` first; a weight used more than once
/// should be [`Packed`] once instead.
pub fn matmul_nt(x: &[f32], m: usize, k: usize, w: Weights, n: usize, y: &mut [f32], ldy: usize) {
    matmul_nt_with(Isa::detected(), x, m, k, w, n, y, ldy)
}

/// [`matmul_nt`] with a chosen instruction set (which must be in [`Isa::available`]).
#[allow(clippy::too_many_arguments)]
pub fn matmul_nt_with(isa: Isa, x: &[f32], m: usize, k: usize, w: Weights, n: usize, y: &mut [f32], ldy: usize) {
    if m == 0 || n == 0 {
        return;
    }
    assert!(ldy >= n && x.len() >= m * k && w.len() >= n * k && y.len() >= (m - 1) * ldy + n, "matmul_nt: buffers too small");
    assert!(Isa::available().contains(&isa), "matmul_nt: {isa:?} is not supported by this processor");
    if k == 0 {
        for i in 0..m {
            y[i * ldy..i * ldy + n].fill(0.0);
        }
        return;
    }
    if isa == Isa::Avx512 {
        Packed::new(w, n, k).matmul(x, Rows::First(m), y, ldy);
        return;
    }
    if m > SMALL_M {
        large(x, m, k, w, n, y, ldy);
        return;
    }
    match w {
        Weights::F32(w) => small(isa, x, m, k, w, n, y, ldy),
        Weights::Bf16(w) => small(isa, x, m, k, w, n, y, ldy),
        Weights::F16(w) => small(isa, x, m, k, w, n, y, ldy),
    }
}

/// A pointer to an output buffer that may cross threads: each task writes a disjoint set of its
/// elements.
#[derive(Clone, Copy)]
pub(crate) struct SendPtr(pub(crate) *mut f32);
unsafe impl Send for SendPtr {}
unsafe impl Sync for SendPtr {}

impl SendPtr {
    /// The pointer (a method, so that closures capture the whole `Send` wrapper).
    pub(crate) fn get(self) -> *mut f32 {
        self.0
    }
}

/// `src [rows, cols]` transposed to `[cols, rows]`, with `sub[i]` subtracted from source row `i`
/// (exact: the same floats as the plain loop), in parallel over blocks of 16 output rows.
pub fn transpose_sub(src: &[f32], rows: usize, cols: usize, sub: &[f32]) -> Vec<f32> {
    transpose_sub_with(Isa::detected(), src, rows, cols, sub)
}

/// [`transpose_sub`] with a chosen instruction set (AVX-512 or the plain loop).
fn transpose_sub_with(isa: Isa, src: &[f32], rows: usize, cols: usize, sub: &[f32]) -> Vec<f32> {
    assert!(src.len() >= rows * cols && sub.len() >= rows, "transpose_sub: buffers too small");
    let mut dst = vec![0f32; rows * cols];
    if rows == 0 {
        return dst;
    }
    let avx512 = isa == Isa::Avx512;
    dst.par_chunks_mut(16 * rows).enumerate().for_each(|(b, out)| {
        let j0 = b * 16;
        let width = out.len() / rows;
        #[cfg(target_arch = "x86_64")]
        if avx512 {
            // SAFETY: AVX-512 was detected; the reads stay in rows x [j0, j0 + width) of src and
            // the writes in `out` (width rows of `rows`).
            unsafe { transpose_block_avx512(src, rows, cols, sub, j0, width, out) };
            return;
        }
        #[cfg(not(target_arch = "x86_64"))]
        let _ = avx512;
        for i in 0..rows {
            for (o, &v) in src[i * cols + j0..][..width].iter().enumerate() {
                out[o * rows + i] = v - sub[i];
            }
        }
    });
    dst
}

/// Output rows `j0..j0 + width` (`width <= 16`) of [`transpose_sub`]: 16 x 16 blocks in registers.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
unsafe fn transpose_block_avx512(src: &[f32], rows: usize, cols: usize, sub: &[f32], j0: usize, width: usize, out: &mut [f32]) {
    let mask = ((1u32 << width) - 1) as u16;
    for i0 in (0..rows).step_by(16) {
        let n = 16.min(rows - i0);
        // Rows i0..i0 + n, their elements j0..j0 + width less the row's `sub`, transposed.
        let mut v = [x86::_mm512_setzero_ps(); 16];
        for (i, v) in v.iter_mut().enumerate().take(n) {
            let row = x86::f32x16_masked(src.as_ptr().add((i0 + i) * cols + j0), mask);
            *v = x86::_mm512_maskz_sub_ps(mask, row, x86::_mm512_set1_ps(sub[i0 + i]));
        }
        x86::transpose16(&mut v);
        let rmask = ((1u32 << n) - 1) as u16;
        for (o, v) in v.iter().enumerate().take(width) {
            x86::_mm512_mask_storeu_ps(out.as_mut_ptr().add(o * rows + i0), rmask, *v);
        }
    }
}

/// Weight rows per tile.
const R: usize = 4;

/// k per block: every output of the small kernel is the sum, in order, of its dot products over
/// blocks of this many k (a multiple of every vector width), whatever `m`, so the blocks can be
/// scheduled for the cache without changing a bit of the result.
const KB: usize = 256;

/// Weight rows run against each block of `x` while it is in L1, when `x` has more than one tile
/// of rows (`x` is then read from L2 once per group of rows instead of once per tile).
const GROUP: usize = 16;

#[allow(clippy::too_many_arguments)]
fn small<T: Elem>(isa: Isa, x: &[f32], m: usize, k: usize, w: &[T], n: usize, y: &mut [f32], ldy: usize) {
    let threads = rayon::current_num_threads().max(1);
    let max_mt = max_tile_rows(isa);
    let group = if m > max_mt { GROUP } else { R };
    // About eight tasks per thread, at least 16 rows each, a multiple of the group.
    let chunk = (n.div_ceil(threads * 8)).max(16).div_ceil(group) * group;
    let out = SendPtr(y.as_mut_ptr());
    let task = |c: usize| {
        let (n0, n1) = (c * chunk, ((c + 1) * chunk).min(n));
        for g0 in (n0..n1).step_by(group) {
            let g1 = (g0 + group).min(n1);
            for p0 in (0..k).step_by(KB) {
                let kb = KB.min(k - p0);
                let mut i = 0;
                while i < m {
                    let mt = max_mt.min(m - i);
                    let mut j = g0;
                    while j < g1 {
                        let r = R.min(g1 - j);
                        let mut acc = [[0f32; MAX_MT]; R];
                        tile(isa, &x[i * k + p0..], &w[j * k + p0..], k, kb, mt, r, &mut acc);
                        for (a, row) in acc.iter().enumerate().take(r) {
                            for (b, v) in row.iter().enumerate().take(mt) {
                                // SAFETY: (i + b, j + a) is inside y, and only this task writes
                                // rows j..j+r.
                                unsafe {
                                    let dst = out.get().add((i + b) * ldy + j + a);
                                    *dst = if p0 == 0 { *v } else { *dst + *v };
                                }
                            }
                        }
                        j += r;
                    }
                    i += mt;
                }
            }
        }
    };
    let tasks = n.div_ceil(chunk);
    if tasks == 1 || threads == 1 {
        (0..tasks).for_each(task);
    } else {
        (0..tasks).into_par_iter().for_each(task);
    }
}

/// The most rows of `x` one tile holds.
const MAX_MT: usize = 4;

fn max_tile_rows(isa: Isa) -> usize {
    match isa {
        Isa::Avx2 => 2,
        _ => 4,
    }
}

/// Dot products of `r` rows of `w` with `mt` rows of `x` over their first `kb` elements, into
/// `acc[0..r][0..mt]` (rows `ld` elements apart in both).
#[allow(clippy::too_many_arguments)]
fn tile<T: Elem>(isa: Isa, x: &[f32], w: &[T], ld: usize, kb: usize, mt: usize, r: usize, acc: &mut [[f32; MAX_MT]; R]) {
    macro_rules! dispatch {
        ($f:ident) => {
            // SAFETY: the instruction set was checked against the processor; the slices hold
            // `(mt - 1) * ld + kb` and `(r - 1) * ld + kb` elements.
            unsafe {
                match (r, mt) {
                    (4, 4) => $f::<T, 4, 4>(x, w, ld, kb, acc),
                    (4, 3) => $f::<T, 4, 3>(x, w, ld, kb, acc),
                    (4, 2) => $f::<T, 4, 2>(x, w, ld, kb, acc),
                    (4, 1) => $f::<T, 4, 1>(x, w, ld, kb, acc),
                    (3, 4) => $f::<T, 3, 4>(x, w, ld, kb, acc),
                    (3, 3) => $f::<T, 3, 3>(x, w, ld, kb, acc),
                    (3, 2) => $f::<T, 3, 2>(x, w, ld, kb, acc),
                    (3, 1) => $f::<T, 3, 1>(x, w, ld, kb, acc),
                    (2, 4) => $f::<T, 2, 4>(x, w, ld, kb, acc),
                    (2, 3) => $f::<T, 2, 3>(x, w, ld, kb, acc),
                    (2, 2) => $f::<T, 2, 2>(x, w, ld, kb, acc),
                    (2, 1) => $f::<T, 2, 1>(x, w, ld, kb, acc),
                    (1, 4) => $f::<T, 1, 4>(x, w, ld, kb, acc),
                    (1, 3) => $f::<T, 1, 3>(x, w, ld, kb, acc),
                    (1, 2) => $f::<T, 1, 2>(x, w, ld, kb, acc),
                    (1, 1) => $f::<T, 1, 1>(x, w, ld, kb, acc),
                    _ => unreachable!("tile sizes are at most {R} x {MAX_MT}"),
                }
            }
        };
    }
    match isa {
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => dispatch!(tile_avx2),
        _ => dispatch!(tile_portable),
    }
}

/// A weight element: how to read it as f32, one at a time, a slice at a time or a vector at a
/// time.
pub(super) trait Elem: Copy + Send + Sync + 'static {
    fn f32(self) -> f32;
    /// `dst[i] = src[i]` as f32.
    fn widen(src: &[Self], dst: &mut [f32]);
    #[cfg(target_arch = "x86_64")]
    unsafe fn load16(p: *const Self) -> x86::__m512;
    /// The lanes of `mask` (the others zero and not read).
    #[cfg(target_arch = "x86_64")]
    unsafe fn load16_masked(p: *const Self, mask: u16) -> x86::__m512;
    #[cfg(target_arch = "x86_64")]
    unsafe fn load8(p: *const Self) -> x86::__m256;
}

#[cfg(target_arch = "x86_64")]
pub(super) mod x86 {
    pub use std::arch::x86_64::*;

    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
    pub unsafe fn bf16x16(p: *const u16) -> __m512 {
        _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(_mm256_loadu_si256(p as *const __m256i))))
    }
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
    pub unsafe fn bf16x16_masked(p: *const u16, mask: u16) -> __m512 {
        _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(mask, p as *const i16))))
    }
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
    pub unsafe fn f16x16(p: *const u16) -> __m512 {
        _mm512_cvtph_ps(_mm256_loadu_si256(p as *const __m256i))
    }
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
    pub unsafe fn f16x16_masked(p: *const u16, mask: u16) -> __m512 {
        _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(mask, p as *const i16))
    }
    #[inline]
    #[target_feature(enable = "avx512f")]
    pub unsafe fn f32x16(p: *const f32) -> __m512 {
        _mm512_loadu_ps(p)
    }
    #[inline]
    #[target_feature(enable = "avx512f")]
    pub unsafe fn f32x16_masked(p: *const f32, mask: u16) -> __m512 {
        _mm512_maskz_loadu_ps(mask, p)
    }
    #[inline]
    #[target_feature(enable = "avx2")]
    pub unsafe fn bf16x8(p: *const u16) -> __m256 {
        _mm256_castsi256_ps(_mm256_slli_epi32::<16>(_mm256_cvtepu16_epi32(_mm_loadu_si128(p as *const __m128i))))
    }
    #[inline]
    #[target_feature(enable = "avx2,f16c")]
    pub unsafe fn f16x8(p: *const u16) -> __m256 {
        _mm256_cvtph_ps(_mm_loadu_si128(p as *const __m128i))
    }
    #[inline]
    #[target_feature(enable = "avx")]
    pub unsafe fn f32x8(p: *const f32) -> __m256 {
        _mm256_loadu_ps(p)
    }
    /// Transposes 16 rows of 16 floats in place (row i, lane j becomes row j, lane i).
    #[inline]
    #[target_feature(enable = "avx512f")]
    pub unsafe fn transpose16(r: &mut [__m512; 16]) {
        let (pd, ps) = (_mm512_castps_pd, _mm512_castpd_ps);
        let mut t = [_mm512_setzero_ps(); 16];
        for i in 0..8 {
            t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
            t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
        }
        for i in 0..4 {
            r[4 * i] = ps(_mm512_unpacklo_pd(pd(t[4 * i]), pd(t[4 * i + 2])));
            r[4 * i + 1] = ps(_mm512_unpackhi_pd(pd(t[4 * i]), pd(t[4 * i + 2])));
            r[4 * i + 2] = ps(_mm512_unpacklo_pd(pd(t[4 * i + 1]), pd(t[4 * i + 3])));
            r[4 * i + 3] = ps(_mm512_unpackhi_pd(pd(t[4 * i + 1]), pd(t[4 * i + 3])));
        }
        for b in [0, 8] {
            for i in b..b + 4 {
                t[i] = _mm512_shuffle_f32x4::<0x88>(r[i], r[i + 4]);
                t[i + 4] = _mm512_shuffle_f32x4::<0xdd>(r[i], r[i + 4]);
            }
        }
        for i in 0..8 {
            r[i] = _mm512_shuffle_f32x4::<0x88>(t[i], t[i + 8]);
            r[i + 8] = _mm512_shuffle_f32x4::<0xdd>(t[i], t[i + 8]);
        }
    }
}

impl Elem for f32 {
    #[inline(always)]
    fn f32(self) -> f32 {
        self
    }
    fn widen(src: &[Self], dst: &mut [f32]) {
        dst.copy_from_slice(src);
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load16(p: *const Self) -> x86::__m512 {
        x86::f32x16(p)
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load16_masked(p: *const Self, mask: u16) -> x86::__m512 {
        x86::f32x16_masked(p, mask)
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load8(p: *const Self) -> x86::__m256 {
        x86::f32x8(p)
    }
}

/// bf16 and f16: widened by the `x86` helpers named, a slice by `$widen`.
macro_rules! half_elem {
    ($t:ty, $x16:ident, $x16m:ident, $x8:ident, $widen:expr) => {
        impl Elem for $t {
            #[inline(always)]
            fn f32(self) -> f32 {
                self.to_f32()
            }
            #[inline(always)]
            fn widen(src: &[Self], dst: &mut [f32]) {
                $widen(src, dst)
            }
            #[cfg(target_arch = "x86_64")]
            #[inline(always)]
            unsafe fn load16(p: *const Self) -> x86::__m512 {
                x86::$x16(p as *const u16)
            }
            #[cfg(target_arch = "x86_64")]
            #[inline(always)]
            unsafe fn load16_masked(p: *const Self, mask: u16) -> x86::__m512 {
                x86::$x16m(p as *const u16, mask)
            }
            #[cfg(target_arch = "x86_64")]
            #[inline(always)]
            unsafe fn load8(p: *const Self) -> x86::__m256 {
                x86::$x8(p as *const u16)
            }
        }
    };
}
// bf16 is the top half of an f32: a shift, as the vector helpers widen it (the `half` crate's
// conversion also quiets signalling NaNs); f16 by the `half` crate's vectorised conversion.
half_elem!(bf16, bf16x16, bf16x16_masked, bf16x8, |src: &[bf16], dst: &mut [f32]| {
    for (d, s) in dst.iter_mut().zip(src) {
        *d = f32::from_bits((s.to_bits() as u32) << 16);
    }
});
half_elem!(f16, f16x16, f16x16_masked, f16x8, |src: &[f16], dst: &mut [f32]| {
    use half::slice::HalfFloatSliceExt;
    src.convert_to_f32_slice(dst)
});

/// AVX2: 8 lanes per step, the remainder one element at a time.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn tile_avx2<T: Elem, const RR: usize, const MT: usize>(x: &[f32], w: &[T], ld: usize, kb: usize, out: &mut [[f32; MAX_MT]; R]) {
    use x86::*;
    let (xp, wp) = (x.as_ptr(), w.as_ptr());
    let mut acc = [[_mm256_setzero_ps(); MT]; RR];
    let full = kb / 8 * 8;
    let mut p = 0;
    while p < full {
        let mut xv = [_mm256_setzero_ps(); MT];
        for (i, v) in xv.iter_mut().enumerate() {
            *v = _mm256_loadu_ps(xp.add(i * ld + p));
        }
        for (r, row) in acc.iter_mut().enumerate() {
            let wv = T::load8(wp.add(r * ld + p));
            for (a, v) in row.iter_mut().zip(&xv) {
                *a = _mm256_fmadd_ps(wv, *v, *a);
            }
        }
        p += 8;
    }
    for (r, (o, row)) in out.iter_mut().zip(&acc).enumerate() {
        for (i, (o, a)) in o.iter_mut().zip(row).enumerate() {
            // Horizontal sum: 8 -> 4 -> 2 -> 1.
            let s4 = _mm_add_ps(_mm256_castps256_ps128(*a), _mm256_extractf128_ps::<1>(*a));
            let s2 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
            let s1 = _mm_add_ss(s2, _mm_shuffle_ps::<0x55>(s2, s2));
            let mut s = _mm_cvtss_f32(s1);
            for q in full..kb {
                s += x[i * ld + q] * w[r * ld + q].f32();
            }
            *o = s;
        }
    }
}

/// Portable: eight independent lanes per dot product (vectorised by the compiler where it can).
unsafe fn tile_portable<T: Elem, const RR: usize, const MT: usize>(x: &[f32], w: &[T], ld: usize, kb: usize, out: &mut [[f32; MAX_MT]; R]) {
    let mut acc = [[[0f32; 8]; MT]; RR];
    let full = kb / 8 * 8;
    let mut p = 0;
    while p < full {
        for (r, row) in acc.iter_mut().enumerate() {
            let wr = &w[r * ld + p..r * ld + p + 8];
            for (i, lanes) in row.iter_mut().enumerate() {
                let xr = &x[i * ld + p..i * ld + p + 8];
                for l in 0..8 {
                    lanes[l] += wr[l].f32() * xr[l];
                }
            }
        }
        p += 8;
    }
    for (r, (o, row)) in out.iter_mut().zip(&acc).enumerate() {
        for (i, (o, lanes)) in o.iter_mut().zip(row).enumerate() {
            let mut s = ((lanes[0] + lanes[4]) + (lanes[1] + lanes[5])) + ((lanes[2] + lanes[6]) + (lanes[3] + lanes[7]));
            for q in full..kb {
                s += x[i * ld + q] * w[r * ld + q].f32();
            }
            *o = s;
        }
    }
}

/// Peak multiply-add throughput of this processor with the detected instruction set, in GFLOP/s
/// (2 flops per lane per FMA), over every thread of the pool: the compute floor of a kernel.
pub fn peak_gflops() -> f64 {
    const ITERS: usize = 20_000_000;
    let threads = rayon::current_num_threads().max(1);
    let isa = Isa::detected();
    (0..3)
        .map(|_| {
            let t = std::time::Instant::now();
            let flops: f64 = (0..threads).into_par_iter().map(|_| fma_loop(isa, ITERS)).sum();
            flops / t.elapsed().as_secs_f64() / 1e9
        })
        .fold(0.0, f64::max)
}

/// Runs `iters` rounds of 8 independent FMA chains; returns the flops done.
fn fma_loop(isa: Isa, iters: usize) -> f64 {
    #[cfg(target_arch = "x86_64")]
    {
        use x86::*;
        #[target_feature(enable = "avx512f")]
        unsafe fn avx512(iters: usize) -> f32 {
            let mut acc = [_mm512_set1_ps(0.0); 8];
            let (a, b) = (_mm512_set1_ps(0.999_999), _mm512_set1_ps(1e-7));
            for _ in 0..iters {
                for v in acc.iter_mut() {
                    *v = _mm512_fmadd_ps(*v, a, b);
                }
            }
            acc.iter().map(|v| _mm512_reduce_add_ps(*v)).sum()
        }
        #[target_feature(enable = "avx2,fma")]
        unsafe fn avx2(iters: usize) -> f32 {
            let mut acc = [_mm256_set1_ps(0.0); 8];
            let (a, b) = (_mm256_set1_ps(0.999_999), _mm256_set1_ps(1e-7));
            for _ in 0..iters {
                for v in acc.iter_mut() {
                    *v = _mm256_fmadd_ps(*v, a, b);
                }
            }
            let mut out = [0f32; 8];
            _mm256_storeu_ps(out.as_mut_ptr(), acc.iter().fold(_mm256_setzero_ps(), |s, v| _mm256_add_ps(s, *v)));
            out.iter().sum()
        }
        // SAFETY: the instruction set was detected on this processor.
        match isa {
            Isa::Avx512 => {
                std::hint::black_box(unsafe { avx512(iters) });
                return (iters * 8 * 16 * 2) as f64;
            }
            Isa::Avx2 => {
                std::hint::black_box(unsafe { avx2(iters) });
                return (iters * 8 * 8 * 2) as f64;
            }
            Isa::Portable => {}
        }
    }
    let mut acc = [0f32; 8];
    for _ in 0..iters {
        for v in acc.iter_mut() {
            *v = v.mul_add(0.999_999, 1e-7);
        }
    }
    std::hint::black_box(acc);
    (iters * 8 * 2) as f64
}

/// The AVX-512 product on [`Packed`] weights, for any number of rows. The rows of `x` are packed
/// in groups of 14 rows of a k-block (`[14][256]`, per k-block of 256, for as many k-blocks at a
/// time as keep them within L2: a copy of the rows, which selects them); each task runs a few
/// panels of 32 weight columns, one k-block at a time (meant to stay in L1), against every group:
/// up to 28 accumulators, 2 panel loads (half precision widened to f32 in registers) and one
/// broadcast per row of x per 2 multiply-adds per row (for half precision, inside each
/// multiply-add), and vector stores into y (masked at the column tails). Each output sums its k-blocks in order,
/// each block a sequence of fused multiply-adds from zero, whatever `m`, the shapes or the thread
/// count, so a batch row gets exactly what the same row alone gets.
#[cfg(target_arch = "x86_64")]
mod gemm512 {
    use super::x86::*;
    use super::{Elem, Rows, SendPtr, NP, with_scratch};
    use rayon::prelude::*;
    use std::cell::Cell;

    /// Rows of x per group (broadcast).
    const MT: usize = 14;
    /// k per block.
    const KC: usize = 256;
    /// Panels per task, at most (fewer when that leaves a thread without two tasks).
    const GP: usize = 4;
    /// How far ahead of the multiply-adds the weights are fetched into L2, in k (a panel is one
    /// stream, and the hardware prefetchers stop at every 4 KiB page).
    const PREFETCH: usize = 128;
    /// Rows of x per pass (14 groups): a prefill's product runs its rows in passes of this many,
    /// whose packed x (200 KB per k-block) stays in L2 while each panel's block (in L1) runs
    /// over it; with all of a long prefill's rows at once it came from L3, 10-18% slower.
    const MC: usize = 14 * MT;
    /// Floats of packed x per pass over the weights (1 MiB, within L2).
    const XBUDGET: usize = 1 << 18;

    thread_local! {
        /// The packed groups of x (on the calling thread).
        static XPACK: Cell<Vec<f32>> = const { Cell::new(Vec::new()) };
    }

    /// `y = x · Wᵀ` over `rows` of x `[.., k]` and y, for `W [n, k]` packed as panels
    /// `[n / 32][k][32]`.
    pub fn gemm<T: Elem>(x: &[f32], rows: Rows, k: usize, w: &[T], n: usize, y: &mut [f32], ldy: usize) {
        for r0 in (0..rows.len()).step_by(MC) {
            gemm_rows(x, rows, r0, MC.min(rows.len() - r0), k, w, n, y, ldy);
        }
    }

    /// [`gemm`] over the `m` rows of `rows` from its `r0`-th.
    #[allow(clippy::too_many_arguments)]
    fn gemm_rows<T: Elem>(x: &[f32], rows: Rows, r0: usize, m: usize, k: usize, w: &[T], n: usize, y: &mut [f32], ldy: usize) {
        let groups = m.div_ceil(MT);
        let panels = n.div_ceil(NP);
        let gp = GP.min(panels.div_ceil(2 * rayon::current_num_threads().max(1))).max(1);
        let tasks = panels.div_ceil(gp);
        // k per pass over the weights: whole k-blocks, as many as keep packed x within budget
        // (decode takes all of k in one pass).
        let span = (XBUDGET / (groups * MT * KC)).max(1) * KC;
        let out = SendPtr(y.as_mut_ptr());
        with_scratch(&XPACK, |xp| {
            for s0 in (0..k).step_by(span) {
                let ks = span.min(k - s0);
                // Per k-block b, x[.., p0..p0+kc] as groups [group][14][256] (zero rows past m).
                xp.clear();
                xp.resize(groups * MT * ks.next_multiple_of(KC), 0.0);
                let block = groups * MT * KC;
                // Each k-block's groups, in parallel when there are many rows (prefill).
                let parallel = m * ks >= 1 << 16;
                for (b, dst) in xp.chunks_mut(block).enumerate() {
                    let p0 = s0 + b * KC;
                    let kc = KC.min(k - p0);
                    let group = |(g, dst): (usize, &mut [f32])| {
                        for i in 0..MT.min(m - g * MT) {
                            dst[i * KC..][..kc].copy_from_slice(&x[rows.at(r0 + g * MT + i) * k + p0..][..kc]);
                        }
                    };
                    if parallel {
                        dst.par_chunks_mut(MT * KC).enumerate().for_each(group);
                    } else {
                        dst.chunks_mut(MT * KC).enumerate().for_each(group);
                    }
                }
                let xp: &[f32] = xp;
                let task = |ti: usize| {
                    let (mut pi, end) = (ti * gp, (ti * gp + gp).min(panels));
                    while pi < end {
                        // A single row of x runs four panels of its task at once (when the
                        // task has four): four streams of weights and eight independent sums.
                        let np = if m == 1 && end - pi >= 4 { 4 } else { 1 };
                        let j0 = pi * NP;
                        for (b, p0) in (s0..s0 + ks).step_by(KC).enumerate() {
                            let kc = KC.min(k - p0);
                            for g in 0..groups {
                                // Where the group's rows start in y.
                                let mut at = [0usize; MT];
                                for (i, at) in at.iter_mut().enumerate().take(MT.min(m - g * MT)) {
                                    *at = rows.at(r0 + g * MT + i) * ldy;
                                }
                                // SAFETY: AVX-512 was detected; panels pi..pi + np hold k rows
                                // of 32, the packed block b holds groups * 14 * 256 floats, and
                                // y has room for every (row, column < n) written (checked by
                                // Packed::matmul).
                                unsafe {
                                    micro_rows(
                                        kc,
                                        w.as_ptr().add((pi * k + p0) * NP),
                                        k * NP,
                                        np,
                                        xp.as_ptr().add(b * block + g * MT * KC),
                                        out.get().add(j0),
                                        &at,
                                        MT.min(m - g * MT),
                                        n - j0,
                                        p0 == 0,
                                    );
                                }
                            }
                        }
                        pi += np;
                    }
                };
                if tasks > 1 {
                    (0..tasks).into_par_iter().for_each(task);
                } else {
                    task(0);
                }
            }
        });
    }

    /// [`micro`] over `np` panels (1, or 4 for a single row of x) with room for the `tokens` rows
    /// (1, 2, 4, 8 or 14; missing rows of x are zero); the rows of y start at `y + at[t]`.
    #[allow(clippy::too_many_arguments)]
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,f16c")]
    unsafe fn micro_rows<T: Elem>(kc: usize, wp: *const T, ps: usize, np: usize, xp: *const f32, y: *mut f32, at: &[usize; MT], tokens: usize, cols: usize, first: bool) {
        match (tokens, np) {
            (1, 4) => micro::<T, 1, 4>(kc, wp, ps, xp, y, at, tokens, cols, first),
            (1, _) => micro::<T, 1, 1>(kc, wp, ps, xp, y, at, tokens, cols, first),
            (2, _) => micro::<T, 2, 1>(kc, wp, ps, xp, y, at, tokens, cols, first),
            (3 | 4, _) => micro::<T, 4, 1>(kc, wp, ps, xp, y, at, tokens, cols, first),
            (5..=8, _) => micro::<T, 8, 1>(kc, wp, ps, xp, y, at, tokens, cols, first),
            _ => micro::<T, MT, 1>(kc, wp, ps, xp, y, at, tokens, cols, first),
        }
    }

    /// `NPAN` panel blocks of 32 weight columns (`[kc][32]` each, `ps` elements apart) times the
    /// first `TK` rows of one group of x (`[14][256]`); writes (for the first k-block) or adds
    /// the results for `tokens` rows and the first `cols` columns into y, row `t` at `y + at[t]`.
    #[allow(clippy::too_many_arguments)]
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,f16c")]
    unsafe fn micro<T: Elem, const TK: usize, const NPAN: usize>(
        kc: usize,
        wp: *const T,
        ps: usize,
        xp: *const f32,
        y: *mut f32,
        at: &[usize; MT],
        tokens: usize,
        cols: usize,
        first: bool,
    ) {
        // The y rows written at the end are fetched meanwhile (each row is a separate place in
        // y, out of the prefetchers' sight).
        for &at in &at[..tokens] {
            let d = y.add(at) as *const i8;
            _mm_prefetch::<_MM_HINT_T0>(d);
            _mm_prefetch::<_MM_HINT_T0>(d.wrapping_add(4 * NP * NPAN - 1));
        }
        let mut acc = [[[_mm512_setzero_ps(); 2]; NPAN]; TK];
        for p in 0..kc {
            let mut w = [[_mm512_setzero_ps(); 2]; NPAN];
            for (q, w) in w.iter_mut().enumerate() {
                let at = wp.add(q * ps + p * NP);
                // A panel is read in order: ask for what comes PREFETCH k later (in the next
                // block or panel at the end; a prefetch past the matrix is dropped by the
                // processor).
                let ahead = at.wrapping_add(PREFETCH * NP) as *const i8;
                _mm_prefetch::<_MM_HINT_T1>(ahead);
                if std::mem::size_of::<T>() == 4 {
                    _mm_prefetch::<_MM_HINT_T1>(ahead.wrapping_add(64));
                }
                *w = [T::load16(at), T::load16(at.add(16))];
            }
            for (t, a) in acc.iter_mut().enumerate() {
                let xs = xp.add(t * KC + p);
                if std::mem::size_of::<T>() == 2 {
                    // Half-precision weights: x is broadcast inside each multiply-add, so no
                    // separate broadcast competes with the widening of the weights for the
                    // vector pipes (bf16 products 5-15% faster on Zen 4; f32 gains nothing).
                    for (a, w) in a.iter_mut().zip(&w) {
                        for (a, w) in a.iter_mut().zip(w) {
                            // SAFETY: reads the one f32 at `xs`, inside the packed group of x;
                            // AVX-512 is enabled for this function.
                            std::arch::asm!(
                                "vfmadd231ps {a}, {w}, dword ptr [{x}]{{1to16}}",
                                a = inout(zmm_reg) *a,
                                w = in(zmm_reg) *w,
                                x = in(reg) xs,
                                options(pure, readonly, nostack, preserves_flags)
                            );
                        }
                    }
                } else {
                    let xv = _mm512_set1_ps(*xs);
                    for (a, w) in a.iter_mut().zip(&w) {
                        a[0] = _mm512_fmadd_ps(xv, w[0], a[0]);
                        a[1] = _mm512_fmadd_ps(xv, w[1], a[1]);
                    }
                }
            }
        }
        for (t, a) in acc.iter().enumerate().take(tokens) {
            for (q, a) in a.iter().enumerate() {
                let c = cols.saturating_sub(q * NP).min(NP);
                let m0 = ((1u32 << c.min(16)) - 1) as u16;
                let m1 = ((1u32 << c.saturating_sub(16)) - 1) as u16;
                // Masked: lanes past `cols` are neither read nor written (they may lie past the
                // end of y).
                let d0 = y.wrapping_add(at[t] + q * NP);
                let d1 = d0.wrapping_add(16);
                if first {
                    _mm512_mask_storeu_ps(d0, m0, a[0]);
                    _mm512_mask_storeu_ps(d1, m1, a[1]);
                } else {
                    _mm512_mask_storeu_ps(d0, m0, _mm512_add_ps(_mm512_maskz_loadu_ps(m0, d0), a[0]));
                    _mm512_mask_storeu_ps(d1, m1, _mm512_add_ps(_mm512_maskz_loadu_ps(m1, d1), a[1]));
                }
            }
        }
    }
}

thread_local! {
    /// A block of weight rows widened to f32 for the many-rows paths, reused across calls.
    static WIDE: Cell<Vec<f32>> = const { Cell::new(Vec::new()) };
}

/// Runs `f` with this thread's scratch buffer `key`, taken out for the call: while a product
/// waits for its parallel tasks, rayon may run another product on the same thread (a forward
/// pass of another caller), which then finds the buffer empty and grows its own.
fn with_scratch<R>(key: &'static std::thread::LocalKey<Cell<Vec<f32>>>, f: impl FnOnce(&mut Vec<f32>) -> R) -> R {
    let mut buf = key.take();
    let r = f(&mut buf);
    key.set(buf);
    r
}

/// Many rows: `gemm`, reading f32 weights in place and half-precision weights one widened block
/// of rows at a time.
fn large(x: &[f32], m: usize, k: usize, w: Weights, n: usize, y: &mut [f32], ldy: usize) {
    let threads = rayon::current_num_threads().max(1);
    // SAFETY: the strides describe x [m, k], w [n, k] read as wᵀ [k, n], and y [m, n], all
    // inside their slices (checked by the caller).
    let run = |w: &[f32], n0: usize, nb: usize, y: &mut [f32]| unsafe {
        gemm::gemm(
            m,
            nb,
            k,
            y.as_mut_ptr().add(n0),
            1,
            ldy as isize,
            false,
            x.as_ptr(),
            1,
            k as isize,
            w.as_ptr(),
            k as isize,
            1,
            0.0f32,
            1.0f32,
            false,
            false,
            false,
            gemm::Parallelism::Rayon(threads),
        )
    };
    fn widen<T: Elem>(src: &[T], dst: &mut [f32]) {
        dst.par_chunks_mut(4096).zip(src.par_chunks(4096)).for_each(|(d, s)| T::widen(s, d));
    }
    match w {
        Weights::F32(w) => run(w, 0, n, y),
        Weights::Bf16(_) | Weights::F16(_) => {
            // Blocks of about 4 MiB of widened rows.
            let block = ((1 << 20) / k).clamp(16, n.max(16));
            with_scratch(&WIDE, |buf| {
                buf.resize(block * k, 0.0);
                let mut n0 = 0;
                while n0 < n {
                    let nb = block.min(n - n0);
                    let dst = &mut buf[..nb * k];
                    match w {
                        Weights::Bf16(w) => widen(&w[n0 * k..(n0 + nb) * k], dst),
                        Weights::F16(w) => widen(&w[n0 * k..(n0 + nb) * k], dst),
                        Weights::F32(_) => unreachable!(),
                    }
                    run(dst, n0, nb, y);
                    n0 += nb;
                }
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reference(x: &[f32], m: usize, k: usize, w: &[f32], n: usize) -> Vec<f64> {
        let mut y = vec![0f64; m * n];
        for i in 0..m {
            for j in 0..n {
                y[i * n + j] = (0..k).map(|q| x[i * k + q] as f64 * w[j * k + q] as f64).sum();
            }
        }
        y
    }

    fn data(len: usize, seed: u64) -> Vec<f32> {
        let mut s = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        (0..len)
            .map(|_| {
                s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                ((s >> 40) as f32 / (1u64 << 24) as f32) - 0.5
            })
            .collect()
    }

    /// Every instruction set and dtype against an f64 reference on odd shapes: rows 1..=33 (both
    /// paths), widths that are not multiples of any vector width.
    #[test]
    fn kernels_match_reference_on_odd_shapes() {
        for &(k, n) in &[(1usize, 1usize), (7, 5), (17, 9), (33, 13), (100, 31), (257, 67), (300, 161), (70, 1000)] {
            let w32 = data(n * k, k as u64);
            let wb: Vec<bf16> = w32.iter().map(|&v| bf16::from_f32(v)).collect();
            let wh: Vec<f16> = w32.iter().map(|&v| f16::from_f32(v)).collect();
            for m in (1..=33).chain([40, 65]) {
                let x = data(m * k, (m * 31 + k) as u64);
                for &isa in Isa::available() {
                    for (w, exact) in [
                        (Weights::F32(&w32), w32.clone()),
                        (Weights::Bf16(&wb), wb.iter().map(|v| v.to_f32()).collect()),
                        (Weights::F16(&wh), wh.iter().map(|v| v.to_f32()).collect()),
                    ] {
                        let want = reference(&x, m, k, &exact, n);
                        let mut y = vec![f32::NAN; m * n];
                        matmul_nt_with(isa, &x, m, k, w, n, &mut y, n);
                        for (got, want) in y.iter().zip(&want) {
                            let tol = 1e-5 * (k as f64).sqrt() + 1e-6 * want.abs();
                            assert!(
                                (*got as f64 - want).abs() <= tol,
                                "{isa:?} m={m} k={k} n={n}: got {got}, want {want}"
                            );
                        }
                    }
                }
            }
        }
    }

    /// The AVX-512 GEMM sums each output exactly as documented: k-blocks of 256 in order, each a
    /// sequence of fused multiply-adds from zero, added to the previous blocks' sum. Bit for bit,
    /// on odd shapes (several tasks, k-blocks and groups, tails everywhere), every dtype.
    #[test]
    #[cfg(target_arch = "x86_64")]
    fn gemm512_sums_in_documented_order() {
        if Isa::detected() != Isa::Avx512 {
            eprintln!("SKIPPED gemm512_sums_in_documented_order: no AVX-512 here");
            return;
        }
        let k = 600;
        // A single row over many panels runs four panels at a time (tasks of four panels: on one
        // thread, whatever the machine).
        let one_thread = rayon::ThreadPoolBuilder::new().num_threads(1).build().unwrap();
        for (m, n) in [(1, 1000), (8, 161), (33, 161), (40, 161), (65, 161)] {
            let w32 = data(n * k, 11);
            let wb: Vec<bf16> = w32.iter().map(|&v| bf16::from_f32(v)).collect();
            let wh: Vec<f16> = w32.iter().map(|&v| f16::from_f32(v)).collect();
            let x = data(m * k, m as u64);
            for (w, exact) in [
                (Weights::F32(&w32), w32.clone()),
                (Weights::Bf16(&wb), wb.iter().map(|v| v.to_f32()).collect()),
                (Weights::F16(&wh), wh.iter().map(|v| v.to_f32()).collect::<Vec<f32>>()),
            ] {
                let mut y = vec![f32::NAN; m * n];
                if m == 1 {
                    one_thread.install(|| matmul_nt_with(Isa::Avx512, &x, m, k, w, n, &mut y, n));
                } else {
                    matmul_nt_with(Isa::Avx512, &x, m, k, w, n, &mut y, n);
                }
                for i in 0..m {
                    for j in 0..n {
                        let mut want = 0f32;
                        for (b, p0) in (0..k).step_by(256).enumerate() {
                            let block = (p0..(p0 + 256).min(k)).fold(0f32, |acc, p| x[i * k + p].mul_add(exact[j * k + p], acc));
                            want = if b == 0 { block } else { want + block };
                        }
                        assert_eq!(y[i * n + j].to_bits(), want.to_bits(), "m={m} ({i}, {j})");
                    }
                }
            }
        }
    }

    /// With `ldy > n` (a product filling some columns of a wider matrix), the other columns are
    /// left untouched and the written ones equal the `ldy = n` product, on every path.
    #[test]
    fn wider_output_rows_keep_their_other_columns() {
        let (k, n, ldy) = (300, 45, 52);
        let w = data(n * k, 12);
        for m in [5, 40] {
            let x = data(m * k, 13);
            for &isa in Isa::available() {
                let mut dense = vec![0f32; m * n];
                matmul_nt_with(isa, &x, m, k, Weights::F32(&w), n, &mut dense, n);
                let mut wide = vec![-7.5f32; m * ldy];
                matmul_nt_with(isa, &x, m, k, Weights::F32(&w), n, &mut wide, ldy);
                for i in 0..m {
                    assert_eq!(wide[i * ldy..i * ldy + n], dense[i * n..(i + 1) * n], "{isa:?} m={m} row {i}");
                    assert!(wide[i * ldy + n..(i + 1) * ldy].iter().all(|&v| v == -7.5), "{isa:?} m={m} row {i} spilled");
                }
            }
        }
    }

    /// A packed matrix gives back each row exactly (the lookup of a tied embedding), every dtype.
    #[test]
    fn packed_rows_are_the_weight_rows() {
        let (n, k) = (45, 37);
        let w32 = data(n * k, 14);
        let wb: Vec<bf16> = w32.iter().map(|&v| bf16::from_f32(v)).collect();
        for (w, exact) in [(Weights::F32(&w32), w32.clone()), (Weights::Bf16(&wb), wb.iter().map(|v| v.to_f32()).collect())] {
            let p = Packed::new(w, n, k);
            assert_eq!(p.dims(), (n, k));
            let mut row = vec![0f32; k];
            for j in [0, 31, 32, 44] {
                p.row(j, &mut row);
                assert_eq!(row, exact[j * k..(j + 1) * k], "row {j}");
            }
        }
    }

    /// Packing a `[k, n]` matrix with rows centred equals packing its centred transpose, exactly,
    /// in every dtype.
    #[test]
    fn packing_the_transpose_equals_packing_it_transposed() {
        let (k, n) = (37, 70);
        let src = data(k * n, 15);
        let sub = data(k, 16);
        let t = transpose_sub_with(Isa::Portable, &src, k, n, &sub);
        let x = data(3 * k, 17);
        for dtype in [candle_core::DType::F32, candle_core::DType::BF16, candle_core::DType::F16] {
            let a = Packed::from_kn(&src, k, n, &sub, dtype).unwrap();
            let b = match dtype {
                candle_core::DType::F32 => Packed::new(Weights::F32(&t), n, k),
                candle_core::DType::BF16 => Packed::new(Weights::Bf16(&t.iter().map(|&v| bf16::from_f32(v)).collect::<Vec<_>>()), n, k),
                _ => Packed::new(Weights::F16(&t.iter().map(|&v| f16::from_f32(v)).collect::<Vec<_>>()), n, k),
            };
            let (mut ra, mut rb) = (vec![0f32; k], vec![0f32; k]);
            for j in 0..n {
                a.row(j, &mut ra);
                b.row(j, &mut rb);
                assert_eq!(ra, rb, "{dtype:?} row {j}");
            }
            if Packed::supported() {
                let (mut ya, mut yb) = (vec![0f32; 3 * n], vec![0f32; 3 * n]);
                a.matmul(&x, Rows::First(3), &mut ya, n);
                b.matmul(&x, Rows::First(3), &mut yb, n);
                assert_eq!(ya, yb, "{dtype:?} product");
            }
        }
    }

    /// The transposition equals the plain loop exactly, on odd shapes.
    #[test]
    fn transpose_sub_equals_the_plain_loop() {
        for &(rows, cols) in &[(1usize, 1usize), (5, 17), (16, 16), (33, 20), (40, 47)] {
            let src = data(rows * cols, (rows * 100 + cols) as u64);
            let sub = data(rows, 9);
            for &isa in Isa::available() {
                let got = transpose_sub_with(isa, &src, rows, cols, &sub);
                for i in 0..rows {
                    for j in 0..cols {
                        assert_eq!(got[j * rows + i], src[i * cols + j] - sub[i], "{isa:?} {rows}x{cols} at ({i}, {j})");
                    }
                }
            }
        }
    }

    /// Throughput of each path on decode and prefill shapes, and of the `gemm` crate for many
    /// rows (not a timed test: it asserts nothing; run it with
    /// `cargo test --release --lib kernel_throughput -- --ignored --nocapture`).
    #[test]
    #[ignore]
    fn kernel_throughput() {
        // Inside the pool, as a decode step runs its products (a prefill runs them from its
        // calling thread, where each is handed to the pool: a small cost next to theirs).
        rayon::scope(|_| kernel_throughput_in_pool());
    }

    fn kernel_throughput_in_pool() {
        for &(n, k) in &[(3072usize, 768usize), (768, 3072), (50257, 768), (14336, 4096)] {
            let w32 = data(n * k, 1);
            let wb: Vec<bf16> = w32.iter().map(|&v| bf16::from_f32(v)).collect();
            for m in [1usize, 8, 16, 32, 33, 128, 1024] {
                let x = data(m * k, 2);
                let mut y = vec![0f32; m * n];
                for (name, w) in [("f32", Weights::F32(&w32)), ("bf16", Weights::Bf16(&wb))] {
                    // As a layer runs it: packed once where the kernel wants it.
                    let packed = Packed::supported().then(|| Packed::new(w, n, k));
                    let run = |y: &mut [f32]| match &packed {
                        Some(p) => p.matmul(&x, Rows::First(m), y, n),
                        None => matmul_nt(&x, m, k, w, n, y, n),
                    };
                    run(&mut y);
                    let reps = 5;
                    let t = std::time::Instant::now();
                    for _ in 0..reps {
                        run(&mut y);
                    }
                    let s = t.elapsed().as_secs_f64() / reps as f64;
                    println!("n={n} k={k} m={m:3} {name:4}: {:8.3} ms {:6.1} GFLOP/s", s * 1e3, 2.0 * (m * n * k) as f64 / s / 1e9);
                    if m > SMALL_M {
                        let t = std::time::Instant::now();
                        for _ in 0..reps {
                            large(&x, m, k, w, n, &mut y, n);
                        }
                        let s = t.elapsed().as_secs_f64() / reps as f64;
                        println!("   gemm crate: {:8.3} ms {:6.1} GFLOP/s", s * 1e3, 2.0 * (m * n * k) as f64 / s / 1e9);
                    }
                }
            }
        }
    }

    /// Throughput of the products of a GPT-2-small decode step, each matrix read from memory
    /// (12 blocks of distinct f32 weights and the unembedding, 0.5 GB, more than any cache),
    /// inside the pool as a step runs them (not a timed test: it asserts nothing; run it with
    /// `cargo test --release --lib stream_throughput -- --ignored --nocapture`).
    #[test]
    #[ignore]
    fn stream_throughput() {
        let shapes: Vec<(usize, usize)> = (0..12).flat_map(|_| [(2304usize, 768usize), (768, 768), (3072, 768), (768, 3072)]).chain([(50257, 768)]).collect();
        let packed: Vec<Packed> = shapes.iter().enumerate().map(|(i, &(n, k))| Packed::new(Weights::F32(&data(n * k, i as u64)), n, k)).collect();
        let params: usize = shapes.iter().map(|&(n, k)| n * k).sum();
        rayon::scope(|_| {
            for m in [1usize, 8, 14, 32] {
                let xs: Vec<Vec<f32>> = shapes.iter().map(|&(_, k)| data(m * k, 3)).collect();
                let mut ys: Vec<Vec<f32>> = shapes.iter().map(|&(n, _)| vec![0f32; m * n]).collect();
                let mut best = f64::INFINITY;
                for _ in 0..6 {
                    let t = std::time::Instant::now();
                    for ((p, x), y) in packed.iter().zip(&xs).zip(&mut ys) {
                        p.matmul(x, Rows::First(m), y, p.dims().0);
                    }
                    best = best.min(t.elapsed().as_secs_f64());
                }
                let (gflops, gbs) = (2.0 * (m * params) as f64 / best / 1e9, (4 * params) as f64 / best / 1e9);
                println!("m={m:3}: {:7.2} ms, {gflops:6.1} GFLOP/s, weights read at {gbs:5.1} GB/s", best * 1e3);
            }
        });
    }

    /// Products handed to the thread pool by many threads at once (as forward passes are) each
    /// give what they give alone: a product waiting for its parallel tasks runs others on its
    /// thread meanwhile (rayon takes queued work), so none may keep a thread's scratch buffer
    /// borrowed across its tasks.
    #[test]
    fn products_from_many_threads_agree() {
        let (k, n) = (700, 300);
        let w = data(n * k, 7);
        let wb: Vec<bf16> = w.iter().map(|&v| bf16::from_f32(v)).collect();
        let pool = rayon::ThreadPoolBuilder::new().num_threads(2).build().unwrap();
        for (name, w) in [("f32", Weights::F32(&w)), ("bf16", Weights::Bf16(&wb))] {
            let packed = Packed::supported().then(|| Packed::new(w, n, k));
            let run = |(m, x): &(usize, Vec<f32>)| {
                let mut y = vec![0f32; m * n];
                match &packed {
                    Some(p) => p.matmul(x, Rows::First(*m), &mut y, n),
                    None => matmul_nt(x, *m, k, w, n, &mut y, n),
                }
                y
            };
            // Decode-sized and prefill-sized products (the latter take the many-rows path
            // without AVX-512).
            let calls: Vec<(usize, Vec<f32>)> = (0..32).map(|i| ([1, 8, 40, 3][i % 4], data([1, 8, 40, 3][i % 4] * k, 100 + i as u64))).collect();
            let alone: Vec<Vec<f32>> = pool.install(|| calls.iter().map(run).collect());
            // Whether a product runs inside another one depends on timing: 8 rounds.
            for _ in 0..8 {
                let together: Vec<Vec<f32>> = std::thread::scope(|s| {
                    let threads: Vec<_> = calls.iter().map(|c| s.spawn(|| pool.install(|| run(c)))).collect();
                    threads.into_iter().map(|t| t.join().unwrap()).collect()
                });
                assert!(alone == together, "{name}: products run together differ from each alone");
            }
        }
    }

    /// Rows give bit for bit the same outputs whatever the number of rows of the product, in the
    /// weight-streaming kernel and in the AVX-512 GEMM at any `m` (the `gemm` crate, used for many
    /// rows without AVX-512, blocks by the row count and does not promise it).
    #[test]
    fn rows_do_not_depend_on_the_batch() {
        let (k, n) = (600, 45);
        let w = data(n * k, 5);
        let x = data(420 * k, 6);
        for &isa in Isa::available() {
            let mut pairs = vec![(3, 7)];
            if isa == Isa::Avx512 {
                // One kernel for every m: decode and prefill rows agree too, and a product of
                // more rows than one pass takes (196) with one that takes them all at once.
                pairs.extend([(1, 70), (8, 33), (33, 70), (70, 420)]);
            }
            for (m1, m2) in pairs {
                let mut a = vec![0f32; m1 * n];
                let mut b = vec![0f32; m2 * n];
                matmul_nt_with(isa, &x, m1, k, Weights::F32(&w), n, &mut a, n);
                matmul_nt_with(isa, &x, m2, k, Weights::F32(&w), n, &mut b, n);
                assert!(a == b[..m1 * n], "{isa:?}: rows of m={m1} and m={m2} differ");
            }
        }
    }

    /// A product over listed rows (a batch's real tokens) gives those rows bit for bit as the
    /// product over all rows does, and leaves the other rows of y as they were; in every dtype,
    /// for lists that fill several groups of 14, one group, and a single row (which runs four
    /// panels at once); with many rows (x packed in parallel, several passes over k, a list that
    /// spans two passes over rows), and with y ending at the last listed row.
    #[test]
    fn listed_rows_equal_all_rows_and_leave_the_others() {
        if !Packed::supported() {
            eprintln!("SKIPPED listed_rows_equal_all_rows_and_leave_the_others: no AVX-512 here");
            return;
        }
        let one_thread = rayon::ThreadPoolBuilder::new().num_threads(1).build().unwrap();
        for (m, k, n) in [(40, 300, 161), (300, 1100, 200), (5, 513, 2000)] {
            let w32 = data(n * k, 8);
            let wb: Vec<bf16> = w32.iter().map(|&v| bf16::from_f32(v)).collect();
            let wh: Vec<f16> = w32.iter().map(|&v| f16::from_f32(v)).collect();
            let x = data(m * k, 9);
            let lists = [(0..m).filter(|i| i % 3 != 1).collect(), vec![2, 3, m - 1], vec![m / 2], vec![1, 4]];
            for w in [Weights::F32(&w32), Weights::Bf16(&wb), Weights::F16(&wh)] {
                let p = Packed::new(w, n, k);
                let mut all = vec![0f32; m * n];
                p.matmul(&x, Rows::First(m), &mut all, n);
                for list in &lists {
                    let end = list.last().unwrap() + 1;
                    let mut some = vec![-3.0f32; end * n];
                    one_thread.install(|| p.matmul(&x, Rows::Only(list), &mut some, n));
                    for i in 0..end {
                        let row = &some[i * n..(i + 1) * n];
                        if list.contains(&i) {
                            assert!(row == &all[i * n..(i + 1) * n], "m={m} {list:?}: row {i} differs");
                        } else {
                            assert!(row.iter().all(|&v| v == -3.0), "m={m} {list:?}: row {i} was written");
                        }
                    }
                }
            }
        }
    }

    /// A row gives bit for bit the same output alone as inside a batch (small path), whatever
    /// the thread count.
    #[test]
    fn batch_rows_equal_single_rows() {
        // Enough panels that a single row runs four at a time (on up to 16 threads).
        let (k, n) = (64, 4100);
        let w = data(n * k, 3);
        let m = 13;
        let x = data(m * k, 4);
        for &isa in Isa::available() {
            let mut batch = vec![0f32; m * n];
            matmul_nt_with(isa, &x, m, k, Weights::F32(&w), n, &mut batch, n);
            let pool = rayon::ThreadPoolBuilder::new().num_threads(1).build().unwrap();
            for i in 0..m {
                let mut one = vec![0f32; n];
                pool.install(|| matmul_nt_with(isa, &x[i * k..(i + 1) * k], 1, k, Weights::F32(&w), n, &mut one, n));
                assert_eq!(&batch[i * n..(i + 1) * n], &one[..], "{isa:?} row {i}");
            }
        }
    }
}
