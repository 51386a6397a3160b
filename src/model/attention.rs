//! What every architecture's attention shares: the per-sequence KV cache with its padding
//! bookkeeping, the positions and mask of one forward step, and scaled dot-product attention.
//!
//! Batches are left-padded. Each sequence keeps its own positions (a padded prompt starts at
//! position 0 at its first real token) and never attends to padding, so a batch gives what one
//! prompt at a time gives.

use anyhow::{bail, Result};
use candle_core::{DType, Device, Tensor, D};

use super::LogitsAt;
use crate::hooks::{HookPoint, Hooks};

/// Keys and values of every layer, plus which cached slots hold real tokens.
pub struct KvCache {
    layers: Vec<Option<(Tensor, Tensor)>>,
    /// `valid[b][slot]`: whether slot `slot` of sequence `b` is a real token (not padding).
    valid: Vec<Vec<bool>>,
    /// The position the next real token of each sequence takes.
    next_pos: Vec<usize>,
}

/// Positions and attention mask of one forward step over `[batch, seq]` new tokens.
pub struct Step {
    /// `[batch * seq]` u32 positions, for rotary tables and learned position embeddings.
    pub positions: Tensor,
    /// `[batch, 1, seq, past + seq]` additive mask (0 or -inf).
    pub mask: Tensor,
    pub batch: usize,
    pub seq: usize,
}

impl KvCache {
    /// An empty cache for `n_layers` layers and `batch` sequences.
    pub fn new(n_layers: usize, batch: usize) -> Self {
        Self {
            layers: vec![None; n_layers],
            valid: vec![Vec::new(); batch],
            next_pos: vec![0; batch],
        }
    }

    /// Number of cached slots (the same for every sequence).
    pub fn len(&self) -> usize {
        self.valid.first().map_or(0, |v| v.len())
    }

    /// Whether nothing is cached yet.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The largest position any sequence has reached.
    pub fn max_position(&self) -> usize {
        self.next_pos.iter().copied().max().unwrap_or(0)
    }

    /// Registers `valid` (`[batch][seq]`, false = padding) as the next step and returns its
    /// positions and mask.
    pub fn begin_step(&mut self, valid: &[Vec<bool>], device: &Device) -> Result<Step> {
        let batch = valid.len();
        if batch != self.valid.len() {
            bail!("step has {batch} sequences, the cache {}", self.valid.len());
        }
        let seq = valid.first().map_or(0, |v| v.len());
        if seq == 0 || valid.iter().any(|v| v.len() != seq) {
            bail!("every sequence of a step needs the same, non-zero number of tokens");
        }
        let past = self.len();
        let total = past + seq;
        let mut positions = Vec::with_capacity(batch * seq);
        let mut mask = vec![f32::NEG_INFINITY; batch * seq * total];
        for (b, row) in valid.iter().enumerate() {
            for &is_real in row {
                if is_real {
                    positions.push(self.next_pos[b] as u32);
                    self.next_pos[b] += 1;
                } else {
                    positions.push(0);
                }
            }
            self.valid[b].extend_from_slice(row);
            for i in 0..seq {
                let q = past + i;
                let base = (b * seq + i) * total;
                for k in 0..=q {
                    if self.valid[b][k] || k == q {
                        mask[base + k] = 0.0;
                    }
                }
            }
        }
        Ok(Step {
            positions: Tensor::from_vec(positions, batch * seq, device)?,
            mask: Tensor::from_vec(mask, (batch, 1, seq, total), device)?,
            batch,
            seq,
        })
    }

    /// Appends this step's keys and values `[batch, kv_heads, seq, head_dim]` for `layer` and
    /// returns the whole cached keys and values.
    pub fn append(&mut self, layer: usize, k: Tensor, v: Tensor) -> Result<(Tensor, Tensor)> {
        let kv = match self.layers[layer].take() {
            None => (k, v),
            Some((pk, pv)) => (Tensor::cat(&[&pk, &k], 2)?, Tensor::cat(&[&pv, &v], 2)?),
        };
        self.layers[layer] = Some(kv.clone());
        Ok(kv)
    }
}

/// Softmax attention: `q [b, h, t, hd]`, cached `k`, `v` `[b, kv_h, T, hd]`, grouped-query when
/// `kv_h < h`. Returns `[b, t, h * hd]`.
pub fn attend(q: &Tensor, k: &Tensor, v: &Tensor, mask: &Tensor) -> Result<Tensor> {
    let (b, h, t, hd) = q.dims4()?;
    let kv_h = k.dim(1)?;
    let total = k.dim(2)?;
    let group = h / kv_h;
    // Grouped-query attention without copying keys: fold the heads that share a key/value head
    // into the query's sequence dimension.
    let q = q.reshape((b, kv_h, group * t, hd))?;
    let scale = 1.0 / (hd as f64).sqrt();
    let scores = (q.matmul(&k.t()?)? * scale)?;
    let scores = scores.reshape((b, kv_h, group, t, total))?;
    let mask = mask.unsqueeze(1)?; // [b, 1, 1, t, T]
    let scores = scores.broadcast_add(&mask)?;
    let probs = candle_nn::ops::softmax_last_dim(&scores.reshape((b, kv_h, group * t, total))?)?;
    let out = probs.matmul(&v.contiguous()?)?; // [b, kv_h, group*t, hd]
    out.reshape((b, h, t, hd))?.transpose(1, 2)?.reshape((b, t, h * hd))
        .map_err(Into::into)
}

/// Normalizes over the last dimension without any gain or bias. Returns `(normalized, scale)`,
/// where `scale` is `[.., 1]`: TransformerLens's `hook_normalized` and `hook_scale`.
/// `center` subtracts the mean first (LayerNorm); otherwise it is RMSNorm.
pub fn normalize(x: &Tensor, eps: f64, center: bool) -> Result<(Tensor, Tensor)> {
    let x = if center { x.broadcast_sub(&x.mean_keepdim(D::Minus1)?)? } else { x.clone() };
    let scale = (x.sqr()?.mean_keepdim(D::Minus1)? + eps)?.sqrt()?;
    let normalized = x.broadcast_div(&scale)?;
    Ok((normalized, scale))
}

/// Normalizes `x` and passes the scale and the normalized value through their hook points;
/// returns the (possibly rewritten) normalized value.
pub fn hooked_norm(hooks: &mut Hooks, x: &Tensor, eps: f64, center: bool, scale_at: HookPoint, normalized_at: HookPoint) -> Result<Tensor> {
    let (normalized, scale) = normalize(x, eps, center)?;
    hooks.visit(scale_at, scale)?;
    hooks.visit(normalized_at, normalized)
}

/// Keeps every position, or only the last one, of `x [batch, seq, d]`.
pub fn select_positions(x: Tensor, at: LogitsAt) -> Result<Tensor> {
    Ok(match at {
        LogitsAt::All => x,
        LogitsAt::Last => {
            let t = x.dim(1)?;
            x.narrow(1, t - 1, 1)?
        }
    })
}

/// `x @ w.T` for `x [.., in]` and an `nn.Linear` weight `w [out, in]`, as one matrix product.
pub fn linear(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    let dims = x.dims().to_vec();
    let inner = dims[dims.len() - 1];
    let rows = x.elem_count() / inner;
    let y = x.reshape((rows, inner))?.matmul(&w.t()?)?;
    let mut out = dims;
    *out.last_mut().unwrap() = w.dim(0)?;
    Ok(y.reshape(out)?)
}

/// Converts a tensor to f32 if it is not already.
pub fn to_f32(t: Tensor) -> Result<Tensor> {
    Ok(if t.dtype() == DType::F32 { t } else { t.to_dtype(DType::F32)? })
}
