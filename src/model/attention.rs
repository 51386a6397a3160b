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
///
/// Each layer's keys and values live in buffers `[batch, kv_heads, capacity, head_dim]` allocated
/// once, in f32 on the model's device, and written in place step by step; a step past the
/// capacity (only when the caller's estimate was short) moves them to buffers twice as large.
pub struct KvCache {
    layers: Vec<Option<(Tensor, Tensor)>>,
    /// Slots allocated per sequence.
    capacity: usize,
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
    /// An empty cache for `n_layers` layers and `batch` sequences of up to `capacity` tokens.
    pub fn new(n_layers: usize, batch: usize, capacity: usize) -> Self {
        Self {
            layers: vec![None; n_layers],
            capacity: capacity.max(1),
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

    /// Forgets every slot from `len` on (their buffers are overwritten by the next steps).
    pub fn truncate(&mut self, len: usize) {
        for (valid, next) in self.valid.iter_mut().zip(&mut self.next_pos) {
            if len < valid.len() {
                *next -= valid[len..].iter().filter(|&&v| v).count();
                valid.truncate(len);
            }
        }
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

    /// Writes this step's keys and values `[batch, kv_heads, seq, head_dim]` for `layer` (called
    /// after [`KvCache::begin_step`]) and returns views of all cached keys and values.
    pub fn append(&mut self, layer: usize, k: Tensor, v: Tensor) -> Result<(Tensor, Tensor)> {
        let (b, kv_h, t, hd) = k.dims4()?;
        let total = self.len();
        let past = total - t;
        let buffers = match self.layers[layer].take() {
            Some((bk, bv)) if bk.dim(2)? >= total => (bk, bv),
            old => {
                while self.capacity < total {
                    self.capacity *= 2;
                }
                let alloc = || Tensor::zeros((b, kv_h, self.capacity, hd), DType::F32, k.device());
                let (bk, bv) = (alloc()?, alloc()?);
                if let Some((ok, ov)) = old {
                    bk.slice_set(&ok.narrow(2, 0, past)?.contiguous()?, 2, 0)?;
                    bv.slice_set(&ov.narrow(2, 0, past)?.contiguous()?, 2, 0)?;
                }
                (bk, bv)
            }
        };
        buffers.0.slice_set(&k.to_dtype(DType::F32)?.contiguous()?, 2, past)?;
        buffers.1.slice_set(&v.to_dtype(DType::F32)?.contiguous()?, 2, past)?;
        let views = (buffers.0.narrow(2, 0, total)?, buffers.1.narrow(2, 0, total)?);
        self.layers[layer] = Some(buffers);
        Ok(views)
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
    let out = probs.matmul(v)?; // [b, kv_h, group*t, hd]
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
