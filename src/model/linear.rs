//! A linear layer whose weights stay in their storage dtype on their device.
//!
//! On the CPU the product runs in [`super::matmul`]'s kernels: activations in f32, the weight read
//! in f32, bf16 or f16 and converted in registers, f32 accumulation. On a GPU it is one matrix
//! product in the weight's dtype (cuBLAS), with the activations cast to it and the result cast
//! back to f32, as transformers computes a bf16 model.

use anyhow::{bail, Result};
use candle_core::{DType, Device, Storage, Tensor};
use rayon::prelude::*;

use super::matmul::{matmul_nt, Weights};

/// `y = x · Wᵀ (+ b)` for `W [out, in]` (the `nn.Linear` layout). `W` may be several matrices
/// stacked along `out` (q, k and v projections, say) that are kept apart in memory: their
/// outputs are written side by side, with no copy of the weights.
pub struct Linear {
    parts: Vec<Tensor>,
    bias: Option<Tensor>,
    out: usize,
}

impl Linear {
    /// `weight [out, in]` in f32, bf16 or f16; `bias [out]` (kept in f32).
    pub fn new(weight: Tensor, bias: Option<Tensor>) -> Result<Self> {
        let mut l = Self::stacked(vec![weight])?;
        if let Some(b) = bias.as_ref().filter(|b| b.dims() != [l.out]) {
            bail!("linear bias has shape {:?}, expected [{}]", b.dims(), l.out);
        }
        l.bias = bias.map(|b| b.to_dtype(DType::F32)).transpose()?;
        Ok(l)
    }

    /// Matrices `[out_i, in]` with one input, their outputs concatenated.
    pub fn stacked(parts: Vec<Tensor>) -> Result<Self> {
        let mut out = 0;
        let mut k = None;
        for p in &parts {
            if !matches!(p.dtype(), DType::F32 | DType::BF16 | DType::F16) {
                bail!("linear weights must be f32, bf16 or f16, not {:?}", p.dtype());
            }
            let (n, pk) = p.dims2()?;
            if *k.get_or_insert(pk) != pk {
                bail!("stacked linear weights need the same input width");
            }
            out += n;
        }
        let parts = parts.into_iter().map(|p| p.contiguous()).collect::<candle_core::Result<_>>()?;
        Ok(Self { parts, bias: None, out })
    }

    /// `[.., in] -> [.., out]`, in f32.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let k = self.parts[0].dim(1)?;
        let dims = x.dims().to_vec();
        if dims.last() != Some(&k) {
            bail!("linear layer expects [.., {k}], got {dims:?}");
        }
        let rows = x.elem_count() / k.max(1);
        let y = match self.parts[0].device() {
            Device::Cpu => self.cpu_forward(&x.to_dtype(DType::F32)?.contiguous()?, rows, k)?,
            _ => {
                let x = x.reshape((rows, k))?.to_dtype(self.parts[0].dtype())?;
                let ys = self.parts.iter().map(|w| x.matmul(&w.t()?)).collect::<candle_core::Result<Vec<_>>>()?;
                let y = Tensor::cat(&ys, 1)?.to_dtype(DType::F32)?;
                match &self.bias {
                    Some(b) => y.broadcast_add(b)?,
                    None => y,
                }
            }
        };
        let mut shape = dims;
        *shape.last_mut().unwrap() = self.out;
        Ok(y.reshape(shape)?)
    }

    fn cpu_forward(&self, x: &Tensor, rows: usize, k: usize) -> Result<Tensor> {
        let (xs, xl) = x.storage_and_layout();
        let Storage::Cpu(xc) = &*xs else { bail!("linear layer: the input is not on the CPU") };
        let xv = &xc.as_slice::<f32>()?[xl.start_offset()..][..rows * k];
        let mut y = vec![0f32; rows * self.out];
        let mut col = 0;
        for part in &self.parts {
            let n = part.dim(0)?;
            Weights::with(part, "linear weight", |w| matmul_nt(xv, rows, k, w, n, &mut y[col..], self.out))?;
            col += n;
        }
        // The bias, added in place (the same sums as a broadcast add, without its buffer).
        if let (Some(b), true) = (&self.bias, self.out > 0) {
            let b = b.to_vec1::<f32>()?;
            y.par_chunks_mut(self.out * 64).for_each(|rows| {
                for row in rows.chunks_exact_mut(self.out) {
                    for (v, b) in row.iter_mut().zip(&b) {
                        *v += b;
                    }
                }
            });
        }
        Ok(Tensor::from_vec(y, (rows, self.out), &Device::Cpu)?)
    }
}
