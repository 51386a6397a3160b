//! A linear layer whose weights stay in their storage dtype on their device.
//!
//! On the CPU the product runs in [`super::matmul`]'s kernels: activations in f32, the weight read
//! in f32, bf16 or f16 and converted in registers, f32 accumulation; with AVX-512 the weight is
//! packed once, here, for its kernel. On a GPU it is one matrix product in the weight's dtype
//! (cuBLAS), with the activations cast to it and the result cast back to f32, as transformers
//! computes a bf16 model.

use anyhow::{bail, Result};
use candle_core::{DType, Device, Storage, Tensor};
use rayon::prelude::*;

use super::matmul::{matmul_nt, Packed, Rows, Weights};

/// `y = x · Wᵀ (+ b)` for `W [out, in]` (the `nn.Linear` layout). `W` may be several matrices
/// stacked along `out` (q, k and v projections, say) that are kept apart in memory: their
/// outputs are written side by side, with no copy of the weights.
pub struct Linear {
    parts: Vec<Part>,
    bias: Option<Tensor>,
    out: usize,
    k: usize,
}

/// One stacked matrix `[n, in]`: packed for the AVX-512 kernel, or as loaded.
enum Part {
    Packed(Packed),
    Tensor(Tensor),
}

impl Part {
    fn n(&self) -> usize {
        match self {
            Part::Packed(p) => p.dims().0,
            Part::Tensor(t) => t.dim(0).unwrap_or(0),
        }
    }
}

impl Linear {
    /// `weight [out, in]` in f32, bf16 or f16; `bias [out]` (kept in f32).
    pub fn new(weight: Tensor, bias: Option<Tensor>) -> Result<Self> {
        Self::stacked(vec![weight])?.with_bias(bias)
    }

    /// A weight already packed for the CPU kernel (where [`packs_on`] the CPU); `bias [out]` on
    /// the CPU.
    pub fn from_packed(weight: Packed, bias: Option<Tensor>) -> Result<Self> {
        let (out, k) = weight.dims();
        Self { parts: vec![Part::Packed(weight)], bias: None, out, k }.with_bias(bias)
    }

    fn with_bias(mut self, bias: Option<Tensor>) -> Result<Self> {
        if let Some(b) = bias.as_ref().filter(|b| b.dims() != [self.out]) {
            bail!("linear bias has shape {:?}, expected [{}]", b.dims(), self.out);
        }
        self.bias = bias.map(|b| b.to_dtype(DType::F32)).transpose()?;
        Ok(self)
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
        let parts = parts
            .into_iter()
            .map(|p| {
                let p = p.contiguous()?;
                if packs_on(p.device()) {
                    let (n, k) = p.dims2()?;
                    Ok(Part::Packed(Weights::with(&p, "linear weight", |w| Packed::new(w, n, k))?))
                } else {
                    Ok(Part::Tensor(p))
                }
            })
            .collect::<Result<_>>()?;
        Ok(Self { parts, bias: None, out, k: k.unwrap_or(0) })
    }

    /// Rows `ids` of W (of a single matrix) in f32, `[len, in]`: the lookup of a table that is
    /// also this layer's weight (tied embeddings).
    pub fn rows(&self, ids: &Tensor) -> Result<Tensor> {
        let [part] = &self.parts[..] else { bail!("linear layer: rows of a stacked weight") };
        match part {
            Part::Tensor(t) => select_rows(t, ids),
            Part::Packed(p) => {
                let ids = ids.to_vec1::<u32>()?;
                let mut out = vec![0f32; ids.len() * self.k];
                for (&j, row) in ids.iter().zip(out.chunks_exact_mut(self.k.max(1))) {
                    if j as usize >= self.out {
                        bail!("row {j} of a table of {}", self.out);
                    }
                    p.row(j as usize, row);
                }
                Ok(Tensor::from_vec(out, (ids.len(), self.k), &Device::Cpu)?)
            }
        }
    }

    /// `[.., in] -> [.., out]`, in f32. `real`: the rows of x (flattened to `[rows, in]`) that
    /// matter, when the others are padding; the packed CPU kernel skips those, whose outputs
    /// are then the bias alone (the other paths compute every row). Padding rows carry no
    /// meaning either way: readers go by the step's validity flags.
    pub fn forward(&self, x: &Tensor, real: Option<&[usize]>) -> Result<Tensor> {
        let k = self.k;
        let dims = x.dims().to_vec();
        if dims.last() != Some(&k) {
            bail!("linear layer expects [.., {k}], got {dims:?}");
        }
        let rows = x.elem_count() / k.max(1);
        let y = match &self.parts[0] {
            Part::Tensor(w) if !w.device().is_cpu() => {
                let x = x.reshape((rows, k))?.to_dtype(w.dtype())?;
                let ys = self
                    .parts
                    .iter()
                    .map(|p| match p {
                        Part::Tensor(w) => Ok(x.matmul(&w.t()?)?),
                        Part::Packed(_) => bail!("linear layer: parts on different devices"),
                    })
                    .collect::<Result<Vec<_>>>()?;
                let y = Tensor::cat(&ys, 1)?.to_dtype(DType::F32)?;
                match &self.bias {
                    Some(b) => y.broadcast_add(b)?,
                    None => y,
                }
            }
            _ => self.cpu_forward(&x.to_dtype(DType::F32)?.contiguous()?, rows, k, real)?,
        };
        let mut shape = dims;
        *shape.last_mut().unwrap() = self.out;
        Ok(y.reshape(shape)?)
    }

    fn cpu_forward(&self, x: &Tensor, rows: usize, k: usize, real: Option<&[usize]>) -> Result<Tensor> {
        let (xs, xl) = x.storage_and_layout();
        let Storage::Cpu(xc) = &*xs else { bail!("linear layer: the input is not on the CPU") };
        let xv = &xc.as_slice::<f32>()?[xl.start_offset()..][..rows * k];
        let mut y = vec![0f32; rows * self.out];
        let mut col = 0;
        for part in &self.parts {
            let n = part.n();
            match part {
                Part::Packed(p) => p.matmul(xv, real.map_or(Rows::First(rows), Rows::Only), &mut y[col..], self.out),
                Part::Tensor(w) => Weights::with(w, "linear weight", |w| matmul_nt(xv, rows, k, w, n, &mut y[col..], self.out))?,
            }
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

/// Whether a weight on `device` is packed for the AVX-512 kernel (on a CPU that has it).
pub fn packs_on(device: &Device) -> bool {
    device.is_cpu() && Packed::supported()
}

/// Rows `ids` of a `[rows, d]` tensor, in f32.
fn select_rows(t: &Tensor, ids: &Tensor) -> Result<Tensor> {
    Ok(t.index_select(ids, 0)?.to_dtype(DType::F32)?)
}

/// A token-embedding table: its own, or the rows of the unembedding it is tied to (one copy of
/// the weights, in the unembedding's layout).
pub enum Embedding {
    Own(Tensor),
    Tied,
}

impl Embedding {
    /// The embedding and the unembedding from `table [vocab, d]` and, when the checkpoint has a
    /// separate one, `lm_head [vocab, d]`.
    pub fn with_unembed(table: Tensor, lm_head: Option<Tensor>) -> Result<(Embedding, Linear)> {
        Ok(match lm_head {
            Some(w) => (Embedding::Own(table), Linear::new(w, None)?),
            None => (Embedding::Tied, Linear::new(table, None)?),
        })
    }

    /// The embedding and the unembedding of a checkpoint whose embeddings are `table` and whose
    /// other weights are `w`: with `tied`, the table serves as the head and a stored
    /// `lm_head.weight` is ignored, as transformers ties it; else `lm_head.weight [vocab, d]`.
    pub fn with_head(table: Tensor, w: &candle_nn::VarBuilder, tied: bool, vocab: usize, d: usize) -> Result<(Embedding, Linear)> {
        let head = match tied {
            true => None,
            false if w.contains_tensor("lm_head.weight") => Some(w.get((vocab, d), "lm_head.weight")?),
            false => bail!("config.json does not tie the embeddings (tie_word_embeddings), but the weights hold no lm_head.weight"),
        };
        Self::with_unembed(table, head)
    }

    /// The f32 rows of `ids` (u32, any shape), `[len, d]`.
    pub fn lookup(&self, unembed: &Linear, ids: &Tensor) -> Result<Tensor> {
        let ids = ids.flatten_all()?;
        match self {
            Embedding::Own(t) => select_rows(t, &ids),
            Embedding::Tied => unembed.rows(&ids),
        }
    }
}
