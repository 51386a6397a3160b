//! The MLP activations, in one pass over an f32 tensor on the CPU.
//!
//! Both are `x · σ(z(x))`: SiLU with `z = x`, and the tanh approximation of GELU (GPT-2's
//! `gelu_new`, Gemma-2's `gelu_pytorch_tanh`) with `z = 2·√(2/π)·(x + 0.044715 x³)`, since
//! `½(1 + tanh(u)) = σ(2u)`. With AVX-512 sixteen lanes at a time use a polynomial `exp` (relative
//! error about 2e-7); elsewhere, and on other devices or dtypes, the plain formulas.

use anyhow::Result;
use candle_core::{DType, Device, Storage, Tensor};
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
    let (storage, layout) = x.storage_and_layout();
    let Storage::Cpu(cpu) = &*storage else { unreachable!("checked above") };
    let src = &cpu.as_slice::<f32>()?[layout.start_offset()..][..x.elem_count()];
    let mut out = vec![0f32; src.len()];
    run(Isa::detected(), kind, src, &mut out);
    Ok(Tensor::from_vec(out, x.dims(), &Device::Cpu)?)
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
}
