//! The MLP activations and the norms, in one pass over an f32 tensor on the CPU, and the
//! exponentials of attention's softmax ([`softmax_exp`]).
//!
//! The activations are `x · σ(z(x))`: SiLU with `z = x`, and the tanh approximation of GELU (GPT-2's
//! `gelu_new`, Gemma-2's `gelu_pytorch_tanh`) with `z = 2·√(2/π)·(x + 0.044715 x³)`, since
//! `½(1 + tanh(u)) = σ(2u)`. With AVX-512 sixteen lanes at a time use a polynomial `exp` (relative
//! error about 2e-7); elsewhere, and on other devices or dtypes, the plain formulas. The norms
//! ([`normalize`], [`scale_rows`], [`center_rows`]) run one row at a time, blocks of rows in
//! parallel; on other devices or dtypes they are tensor ops. The greedy choice of the next token
//! ([`argmax`]) also runs rows in parallel on the CPU, and is candle's op elsewhere.

use anyhow::Result;
use candle_core::{DType, Device, Storage, Tensor, D};
use rayon::prelude::*;

use super::matmul::Isa;

/// An activation of the form `x · σ(z(x))`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Silu,
    GeluTanh,
}

/// `√(2/π)`.
const SQRT_2_OVER_PI: f32 = 0.797_884_6;
const GELU_CUBIC: f32 = 0.044_715;

/// SiLU, `x · σ(x)`.
pub fn silu(x: &Tensor) -> Result<Tensor> {
    apply(x, Kind::Silu)
}

/// The tanh approximation of GELU, `½x(1 + tanh(√(2/π)(x + 0.044715 x³)))`.
pub fn gelu_tanh(x: &Tensor) -> Result<Tensor> {
    apply(x, Kind::GeluTanh)
}

fn apply(x: &Tensor, kind: Kind) -> Result<Tensor> {
    if !matches!(x.device(), Device::Cpu) || x.dtype() != DType::F32 {
        return Ok(match kind {
            Kind::Silu => candle_nn::ops::silu(x)?,
            // candle's `gelu` is the tanh approximation (`gelu_erf` is the exact one).
            Kind::GeluTanh => x.gelu()?,
        });
    }
    let x = x.contiguous()?;
    elements(&x, |src| {
        let mut out = vec![0f32; src.len()];
        run(Isa::detected(), kind, src, &mut out);
        Ok(Tensor::from_vec(out, x.dims(), &Device::Cpu)?)
    })
}

/// Elements per parallel task.
const CHUNK: usize = 1 << 15;

fn run(isa: Isa, kind: Kind, src: &[f32], out: &mut [f32]) {
    assert_eq!(src.len(), out.len(), "activation: input and output lengths differ");
    let chunk = |(s, o): (&[f32], &mut [f32])| match isa {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: AVX-512 was detected; both slices have the same length.
        Isa::Avx512 => unsafe { avx512(kind, s, o) },
        _ => portable(kind, s, o),
    };
    if src.len() > CHUNK {
        src.par_chunks(CHUNK).zip(out.par_chunks_mut(CHUNK)).for_each(chunk);
    } else {
        chunk((src, out));
    }
}

fn portable(kind: Kind, src: &[f32], out: &mut [f32]) {
    for (o, &x) in out.iter_mut().zip(src) {
        let z = match kind {
            Kind::Silu => x,
            Kind::GeluTanh => 2.0 * SQRT_2_OVER_PI * (x + GELU_CUBIC * x * x * x),
        };
        *o = x / (1.0 + (-z).exp());
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn avx512(kind: Kind, src: &[f32], out: &mut [f32]) {
    use std::arch::x86_64::*;
    let one = _mm512_set1_ps(1.0);
    let (a, c) = (_mm512_set1_ps(2.0 * SQRT_2_OVER_PI), _mm512_set1_ps(GELU_CUBIC));
    let mut i = 0;
    while i < src.len() {
        let left = src.len() - i;
        let mask: u16 = if left >= 16 { 0xFFFF } else { ((1u32 << left) - 1) as u16 };
        let x = _mm512_maskz_loadu_ps(mask, src.as_ptr().add(i));
        let z = match kind {
            Kind::Silu => x,
            Kind::GeluTanh => _mm512_mul_ps(a, _mm512_fmadd_ps(_mm512_mul_ps(c, x), _mm512_mul_ps(x, x), x)),
        };
        let e = exp512(_mm512_sub_ps(_mm512_setzero_ps(), z));
        _mm512_mask_storeu_ps(out.as_mut_ptr().add(i), mask, _mm512_div_ps(x, _mm512_add_ps(one, e)));
        i += 16;
    }
}

/// The exponentials of a softmax, in place: `p[j] = e^(p[j] − max)`, 0 where `p[j]` is −∞ (a
/// masked score), and their sum. With AVX-512 sixteen at a time with the polynomial `exp` (below
/// `e^-88` an exponential is `e^-88`, nothing beside the largest one's 1), summed in sixteen
/// lanes; elsewhere one at a time with the standard `exp`, summed in order.
pub fn softmax_exp(isa: Isa, p: &mut [f32], max: f32) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if isa == Isa::Avx512 {
        // SAFETY: AVX-512 was detected.
        return unsafe { softmax_exp512(p, max) };
    }
    let _ = isa;
    let mut sum = 0f32;
    for pj in p {
        *pj = if *pj == f32::NEG_INFINITY { 0.0 } else { (*pj - max).exp() };
        sum += *pj;
    }
    sum
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn softmax_exp512(p: &mut [f32], max: f32) -> f32 {
    use std::arch::x86_64::*;
    let (m, ninf) = (_mm512_set1_ps(max), _mm512_set1_ps(f32::NEG_INFINITY));
    let mut sum = _mm512_setzero_ps();
    for chunk in p.chunks_mut(16) {
        let mask: u16 = ((1u32 << chunk.len()) - 1) as u16;
        let x = _mm512_mask_loadu_ps(ninf, mask, chunk.as_ptr());
        let live = _mm512_cmp_ps_mask::<_CMP_NEQ_OQ>(x, ninf);
        let e = _mm512_maskz_mov_ps(live, exp512(_mm512_sub_ps(x, m)));
        _mm512_mask_storeu_ps(chunk.as_mut_ptr(), mask, e);
        sum = _mm512_add_ps(sum, e);
    }
    _mm512_reduce_add_ps(sum)
}

/// `eˣ` per lane: `x = n ln 2 + r` with `|r| ≤ ½ ln 2`, a degree-6 Taylor polynomial for `eʳ`,
/// scaled by `2ⁿ`. Arguments are clamped to [-88, 100]: below, `eˣ` is 0 to f32 precision beside
/// the 1 it is added to; above, the scaling overflows to infinity, as `eˣ` does. A NaN stays NaN.
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx512f")]
unsafe fn exp512(x: std::arch::x86_64::__m512) -> std::arch::x86_64::__m512 {
    use std::arch::x86_64::*;
    // With a NaN operand max/min return the second one: x.
    let x = _mm512_min_ps(_mm512_set1_ps(100.0), _mm512_max_ps(_mm512_set1_ps(-88.0), x));
    let n = _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(_mm512_mul_ps(x, _mm512_set1_ps(std::f32::consts::LOG2_E)));
    // ln 2 in two parts, so that n · ln2_hi is exact.
    let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693_145_75), x);
    let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.428_606_8e-6), r);
    let mut p = _mm512_set1_ps(1.0 / 720.0);
    for c in [1.0 / 120.0, 1.0 / 24.0, 1.0 / 6.0, 0.5, 1.0, 1.0] {
        p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(c));
    }
    _mm512_scalef_ps(p, n)
}

/// `t` made contiguous with its row width, when it is f32 on the CPU with rows of at least one
/// element (the fused paths); `None` for tensor ops.
fn cpu_rows(t: &Tensor) -> Result<Option<(Tensor, usize)>> {
    match t.dims().last() {
        Some(&d) if d > 0 && matches!(t.device(), Device::Cpu) && t.dtype() == DType::F32 => Ok(Some((t.contiguous()?, d))),
        _ => Ok(None),
    }
}

/// The f32 elements of a contiguous f32 CPU tensor (checked by the caller).
fn elements<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> Result<R>) -> Result<R> {
    let (storage, layout) = t.storage_and_layout();
    let Storage::Cpu(cpu) = &*storage else { unreachable!("checked by the caller") };
    f(&cpu.as_slice::<f32>()?[layout.start_offset()..][..t.elem_count()])
}

/// A tensor of x's shape whose row `r` is written by `f(r, x's row r, out row)`, blocks of rows
/// in parallel when there are many.
fn map_rows(x: &Tensor, d: usize, f: impl Fn(usize, &[f32], &mut [f32]) + Sync) -> Result<Tensor> {
    elements(x, |src| {
        let mut out = vec![0f32; src.len()];
        let rows = CHUNK.div_ceil(d);
        let block = |(b, (s, o)): (usize, (&[f32], &mut [f32]))| {
            for (r, (s, o)) in s.chunks_exact(d).zip(o.chunks_exact_mut(d)).enumerate() {
                f(b * rows + r, s, o);
            }
        };
        if src.len() > rows * d {
            src.par_chunks(rows * d).zip(out.par_chunks_mut(rows * d)).enumerate().for_each(block);
        } else {
            block((0, (src, &mut out)));
        }
        Ok(Tensor::from_vec(out, x.dims(), &Device::Cpu)?)
    })
}

/// A row folded into sixteen lanes (lane `l` takes elements `l`, `l + 16`, ..., each from
/// `init` by `op`; vectorised), and the elements past the last whole sixteen.
#[inline(always)]
fn lanes(row: &[f32], init: f32, op: impl Fn(f32, f32) -> f32) -> ([f32; 16], &[f32]) {
    let mut lanes = [init; 16];
    let mut chunks = row.chunks_exact(16);
    for c in &mut chunks {
        for (l, &v) in lanes.iter_mut().zip(c) {
            *l = op(*l, v);
        }
    }
    (lanes, chunks.remainder())
}

/// `Σ f(x)` over a row in f32, sixteen partial sums at a time (vectorised).
#[inline]
fn row_sum(row: &[f32], f: impl Fn(f32) -> f32) -> f32 {
    let (sums, rest) = lanes(row, 0.0, |a, v| a + f(v));
    sums.iter().sum::<f32>() + rest.iter().map(|&v| f(v)).sum::<f32>()
}

/// A row's mean, or 0 without `center`.
fn row_mean(row: &[f32], center: bool) -> f32 {
    if center {
        row_sum(row, |v| v) / row.len() as f32
    } else {
        0.0
    }
}

/// `x` minus each row's mean over the last dimension (tensor ops: the fallback of the fused
/// paths).
fn centred(x: &Tensor) -> Result<Tensor> {
    Ok(x.broadcast_sub(&x.mean_keepdim(D::Minus1)?)?)
}

/// `x` minus each row's mean over the last dimension.
pub fn center_rows(x: &Tensor) -> Result<Tensor> {
    match cpu_rows(x)? {
        Some((x, d)) => map_rows(&x, d, |_, row, out| {
            let m = row_mean(row, true);
            for (o, &v) in out.iter_mut().zip(row) {
                *o = v - m;
            }
        }),
        None => centred(x),
    }
}

/// Normalizes over the last dimension without any gain or bias. Returns `(normalized, scale)`,
/// where `scale` is `[.., 1]`: TransformerLens's `hook_normalized` and `hook_scale`.
/// `center` subtracts the mean first (LayerNorm); otherwise it is RMSNorm.
pub fn normalize(x: &Tensor, eps: f64, center: bool) -> Result<(Tensor, Tensor)> {
    let Some((x, d)) = cpu_rows(x)? else {
        let x = if center { centred(x)? } else { x.clone() };
        let scale = (x.sqr()?.mean_keepdim(D::Minus1)? + eps)?.sqrt()?;
        let normalized = x.broadcast_div(&scale)?;
        return Ok((normalized, scale));
    };
    // Each row's mean and scale, then the rows divided.
    let stats: Vec<(f32, f32)> = elements(&x, |src| {
        Ok(src
            .par_chunks(d)
            .with_min_len(CHUNK / d + 1)
            .map(|row| {
                let m = row_mean(row, center);
                (m, (row_sum(row, |v| (v - m) * (v - m)) / d as f32 + eps as f32).sqrt())
            })
            .collect())
    })?;
    let normalized = map_rows(&x, d, |r, row, out| {
        let (m, scale) = stats[r];
        for (o, &v) in out.iter_mut().zip(row) {
            *o = (v - m) / scale;
        }
    })?;
    let mut scale_dims = x.dims().to_vec();
    *scale_dims.last_mut().unwrap() = 1;
    let scales = stats.into_iter().map(|(_, s)| s).collect();
    Ok((normalized, Tensor::from_vec(scales, scale_dims, &Device::Cpu)?))
}

/// `x · gain (+ bias)` over the last dimension, `x` centred on each row's mean first with
/// `center` (GPT-2's LayerNorm gain and bias, applied to a possibly edited normalized value).
pub fn scale_rows(x: &Tensor, center: bool, gain: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
    let Some((x, d)) = cpu_rows(x)? else {
        let x = if center { centred(x)? } else { x.clone() };
        let y = x.broadcast_mul(gain)?;
        return Ok(match bias {
            Some(b) => y.broadcast_add(b)?,
            None => y,
        });
    };
    let gain = gain.to_dtype(DType::F32)?.to_vec1::<f32>()?;
    let bias = bias.map(|b| b.to_dtype(DType::F32)?.to_vec1::<f32>()).transpose()?;
    if gain.len() != d || bias.as_ref().is_some_and(|b| b.len() != d) {
        anyhow::bail!("gain or bias of {} values for rows of {d}", gain.len());
    }
    map_rows(&x, d, |_, row, out| {
        let m = row_mean(row, center);
        for ((o, &v), &g) in out.iter_mut().zip(row).zip(&gain) {
            *o = (v - m) * g;
        }
        if let Some(b) = &bias {
            for (o, &b) in out.iter_mut().zip(b) {
                *o += b;
            }
        }
    })
}

/// The index of the largest value in each row over the last dimension, rows in parallel on the
/// CPU: what candle's `argmax` gives (the first of equal values; NaN is never taken, unless it
/// comes first in its row), which it computes one row after another.
pub fn argmax(x: &Tensor) -> Result<Vec<u32>> {
    let Some((x, d)) = cpu_rows(x)? else {
        return Ok(x.argmax(D::Minus1)?.flatten_all()?.to_vec1::<u32>()?);
    };
    elements(&x, |src| {
        Ok(if src.len() > d {
            src.par_chunks(d).map(row_argmax).collect()
        } else {
            src.chunks(d).map(row_argmax).collect()
        })
    })
}

/// [`argmax`] of one row: its largest value (sixteen running maxima, vectorised; `f32::max`
/// passes over NaN), then where it first occurs.
fn row_argmax(row: &[f32]) -> u32 {
    if row[0].is_nan() {
        return 0;
    }
    let (maxima, rest) = lanes(row, row[0], f32::max);
    let max = rest.iter().chain(&maxima).fold(row[0], |a, &b| a.max(b));
    row.iter().position(|&v| v == max).expect("the maximum is one of the row's values") as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reference(kind: Kind, x: f32) -> f64 {
        let x = x as f64;
        match kind {
            Kind::Silu => x / (1.0 + (-x).exp()),
            Kind::GeluTanh => 0.5 * x * (1.0 + ((2.0f64 / std::f64::consts::PI).sqrt() * (x + 0.044715 * x * x * x)).tanh()),
        }
    }

    /// Every instruction set against an f64 reference within 1e-6 (relative beyond 1), over the
    /// range that matters, the far tails where `exp` is clamped, and short slices from the middle
    /// of the range (the masked tail).
    #[test]
    fn activations_match_the_formulas() {
        let xs: Vec<f32> = (0..40_017).map(|i| (i as f32 - 20_000.0) * 0.0015).chain([-1e30, -100.0, -30.0, 30.0, 100.0, 0.0, -0.0]).collect();
        for kind in [Kind::Silu, Kind::GeluTanh] {
            for &isa in Isa::available() {
                for range in [0..xs.len(), 20_000..20_001, 19_990..20_005, 20_500..20_517] {
                    let src = &xs[range];
                    let mut out = vec![f32::NAN; src.len()];
                    run(isa, kind, src, &mut out);
                    for (&x, &got) in src.iter().zip(&out) {
                        let want = reference(kind, x);
                        let tol = 1e-6 * want.abs().max(1.0);
                        assert!((got as f64 - want).abs() <= tol, "{kind:?} {isa:?} x={x}: got {got}, want {want}");
                    }
                }
                // NaN in, NaN out; -inf gives NaN (as candle's ops do).
                let mut out = [0f32; 2];
                run(isa, kind, &[f32::NAN, f32::NEG_INFINITY], &mut out);
                assert!(out[0].is_nan() && out[1].is_nan(), "{kind:?} {isa:?}: {out:?}");
            }
        }
    }

    /// A softmax's exponentials and their sum within 1e-6 (relative) of the f64 formulas, for
    /// scores down to 100 below the largest (the polynomial's floor of `e^-88` is then within
    /// the sum's tolerance), with masked (−∞) scores giving 0, at lengths around the vector
    /// width.
    #[test]
    fn softmax_exponentials_match_the_formula() {
        for len in [1usize, 15, 16, 17, 40, 333] {
            let p: Vec<f32> = (0..len).map(|j| if j % 7 == 3 { f32::NEG_INFINITY } else { 0.25 - ((j * 37) % 101) as f32 }).collect();
            let max = p.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
            let want: Vec<f64> = p.iter().map(|&x| if x == f32::NEG_INFINITY { 0.0 } else { ((x - max) as f64).exp() }).collect();
            let want_sum: f64 = want.iter().sum();
            for &isa in Isa::available() {
                let mut got = p.clone();
                let sum = softmax_exp(isa, &mut got, max);
                for (j, (&g, &w)) in got.iter().zip(&want).enumerate() {
                    if w == 0.0 {
                        assert!(g == 0.0, "{isa:?} len {len}: masked score {j} gave {g}");
                    } else {
                        assert!((g as f64 - w).abs() <= 1e-6 * w.max(1e-30) + 1e-37, "{isa:?} len {len}: {j}: {g} against {w}");
                    }
                }
                assert!((sum as f64 - want_sum).abs() <= 1e-6 * want_sum, "{isa:?} len {len}: sum {sum} against {want_sum}");
            }
        }
    }

    /// The tensor entry points equal the per-element kernel on strided (narrowed) input.
    #[test]
    fn tensors_in_and_out() -> Result<()> {
        let t = Tensor::arange(-50f32, 50.0, &Device::Cpu)?.affine(0.1, 0.0)?.reshape((5, 20))?.narrow(1, 3, 10)?;
        let got = gelu_tanh(&t)?.flatten_all()?.to_vec1::<f32>()?;
        let want = t.gelu()?.flatten_all()?.to_vec1::<f32>()?;
        for (g, w) in got.iter().zip(&want) {
            assert!((g - w).abs() <= 1e-6 * w.abs().max(1.0), "gelu: {g} vs candle's {w}");
        }
        let got = silu(&t)?.flatten_all()?.to_vec1::<f32>()?;
        let want = candle_nn::ops::silu(&t)?.flatten_all()?.to_vec1::<f32>()?;
        for (g, w) in got.iter().zip(&want) {
            assert!((g - w).abs() <= 1e-6 * w.abs().max(1.0), "silu: {g} vs candle's {w}");
        }
        Ok(())
    }

    /// The parallel argmax equals candle's on rows with ties (the first is taken), NaN (never
    /// taken unless first), infinities and signed zeros (−0 then 0 after −1: the −0), rows
    /// shorter and longer than sixteen, one row, many and none, and a strided view.
    #[test]
    fn argmax_is_candles() -> Result<()> {
        let dev = Device::Cpu;
        for d in [1usize, 5, 16, 37, 50_257] {
            let mut v: Vec<f32> = (0..40 * d).map(|i| ((i * 7919) % 1009) as f32 * 0.01 - 5.0).collect();
            for (r, row) in v.chunks_mut(d).enumerate() {
                match r % 8 {
                    0 => row[0] = f32::NAN,
                    1 => row.iter_mut().step_by(3).for_each(|x| *x = f32::NAN),
                    2 => row.fill(f32::NEG_INFINITY),
                    3 => row.iter_mut().enumerate().for_each(|(j, x)| *x = match j {
                        0 => -1.0,
                        j if j % 2 == 1 => -0.0,
                        _ => 0.0,
                    }),
                    4 => row[d - 1] = f32::INFINITY,
                    5 => row[d / 2] = f32::NAN,
                    _ => {}
                }
            }
            let t = Tensor::from_vec(v, (40, 1, d), &dev)?;
            let want = t.argmax(D::Minus1)?.flatten_all()?.to_vec1::<u32>()?;
            assert_eq!(argmax(&t)?, want, "rows of {d}");
            assert_eq!(argmax(&t.narrow(0, 3, 1)?)?, want[3..4], "one row of {d}");
            assert!(argmax(&t.narrow(0, 0, 0)?)?.is_empty(), "no rows of {d}");
        }
        let t = Tensor::randn(0f32, 1.0, (6, 40), &dev)?.narrow(1, 5, 30)?;
        assert_eq!(argmax(&t)?, t.argmax(D::Minus1)?.to_vec1::<u32>()?, "strided");
        Ok(())
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> Result<f32> {
        assert_eq!(a.dims(), b.dims());
        Ok((a - b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?)
    }

    /// The fused norms (and centring) against the tensor-op formulas, LayerNorm and RMSNorm: strided input,
    /// rows whose width leaves a tail beside the sixteen-lane sums, few rows (one task) and
    /// many (parallel blocks), three dimensions.
    #[test]
    fn fused_norms_match_tensor_ops() -> Result<()> {
        let dev = Device::Cpu;
        for (rows, d) in [(3, 37), (150, 768)] {
            let t = Tensor::randn(0.5f32, 2.0, (2, rows, d + 5), &dev)?.narrow(2, 2, d)?;
            let gain = Tensor::randn(1f32, 0.5, d, &dev)?;
            let bias = Tensor::randn(0f32, 0.5, d, &dev)?;
            assert!(max_diff(&center_rows(&t)?, &centred(&t)?)? < 1e-5, "centred rows, {rows}x{d}");
            for center in [true, false] {
                let (normalized, scale) = normalize(&t, 1e-5, center)?;
                let x = if center { t.broadcast_sub(&t.mean_keepdim(D::Minus1)?)? } else { t.clone() };
                let want_scale = (x.sqr()?.mean_keepdim(D::Minus1)? + 1e-5)?.sqrt()?;
                assert!(max_diff(&scale, &want_scale)? < 1e-5, "scale, center {center}, {rows}x{d}");
                assert!(max_diff(&normalized, &x.broadcast_div(&want_scale)?)? < 1e-5, "normalized, center {center}, {rows}x{d}");
                let got = scale_rows(&t, center, &gain, Some(&bias))?;
                let want = x.broadcast_mul(&gain)?.broadcast_add(&bias)?;
                assert!(max_diff(&got, &want)? < 1e-5, "gain and bias, center {center}, {rows}x{d}");
                assert!(max_diff(&scale_rows(&t, center, &gain, None)?, &x.broadcast_mul(&gain)?)? < 1e-5);
            }
        }
        Ok(())
    }
}
