//! Splicing a transcoder into a model and steering its features.
//!
//! The transcoder reads `blocks.L.ln2.hook_normalized` and stands for `blocks.L.hook_mlp_out`.
//! For a feature set S and a strength s:
//! - [`SteerMode::Delta`] (default, error-preserving): `mlp_out + (s-1) · Σ_{i∈S} f_i W_dec[i]`.
//!   Only the columns in S are encoded, so the cost grows with |S|; s = 1 is exactly the model.
//! - [`SteerMode::Replace`]: `mlp_out := f' @ W_dec + b_dec_out` with `f'_i = s·f_i` for i in S,
//!   decoded from the active features only. s = 1 is the plain transcoder splice.
//! - [`SteerMode::SeedCompat`]: the original notebook's hook, kept to compare with its results:
//!   at the MLP *input* it returns `relu(x @ W_enc + b_enc)` (S scaled) `@ W_dec + b_dec`, with no
//!   input centring and the input-centring vector as output bias, and the real MLP runs on that.
//!   It is not a transcoder splice.

use std::sync::Arc;

use anyhow::{bail, Result};
use candle_core::{Device, Storage, Tensor};

use super::Transcoder;
use std::collections::BTreeMap;

use crate::hooks::{Edit, HookPoint};

/// How steering acts on the model.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum SteerMode {
    /// Real MLP output plus (s-1) times the chosen features' decoded contribution.
    Delta,
    /// MLP output replaced by the transcoder's output with the chosen features scaled.
    Replace,
    /// The original notebook's hook (transcoder output fed to the MLP input), for comparisons.
    SeedCompat,
}

impl std::fmt::Display for SteerMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            SteerMode::Delta => "delta",
            SteerMode::Replace => "replace",
            SteerMode::SeedCompat => "seed-compat",
        })
    }
}

/// A transcoder spliced in at its layer, scaling `features` by `strength`.
pub struct Steering {
    transcoder: Arc<Transcoder>,
    mode: SteerMode,
    strength: f64,
    features: Vec<usize>,
    /// The hook point read and the one written.
    input: HookPoint,
    output: HookPoint,
    /// For delta: `W_enc[:, S]` `[d_in, |S|]`, `b_enc[S]`, `W_dec[S]` `[|S|, d_out]`, threshold[S].
    subset: Option<Subset>,
    /// For replace and seed-compat: a per-feature scale `[d_sae]` (1 outside S).
    scale: Option<Tensor>,
}

struct Subset {
    w_enc: Tensor,
    b_enc: Tensor,
    w_dec: Tensor,
    b_dec_in: Tensor,
    threshold: Option<Tensor>,
}

impl Steering {
    /// Prepares a steering edit; checks the feature indices.
    pub fn new(transcoder: Arc<Transcoder>, features: Vec<usize>, strength: f64, mode: SteerMode) -> Result<Self> {
        let d_sae = transcoder.meta.d_sae;
        if let Some(&bad) = features.iter().find(|&&i| i >= d_sae) {
            bail!("feature {bad} is out of range: the transcoder has {d_sae} features");
        }
        if !strength.is_finite() {
            bail!("strength must be a finite number, got {strength}");
        }
        let (input, output) = transcoder.meta.points()?;
        if mode == SteerMode::SeedCompat && input != HookPoint::Ln2Normalized(transcoder.meta.layer) {
            bail!("--mode seed-compat needs a transcoder that reads ln2.hook_normalized; this one reads {input}");
        }
        let device = transcoder.w_enc.device().clone();
        let (subset, scale) = match mode {
            SteerMode::Delta => {
                let idx = Tensor::from_vec(features.iter().map(|&i| i as u32).collect::<Vec<_>>(), features.len(), &device)?;
                let t = &transcoder;
                let subset = Subset {
                    w_enc: t.w_enc.index_select(&idx, 1)?.contiguous()?,
                    b_enc: t.b_enc.index_select(&idx, 0)?,
                    w_dec: t.w_dec.index_select(&idx, 0)?.contiguous()?,
                    b_dec_in: t.b_dec_in.clone(),
                    threshold: t.threshold.as_ref().map(|th| th.index_select(&idx, 0)).transpose()?,
                };
                (Some(subset), None)
            }
            SteerMode::Replace | SteerMode::SeedCompat => {
                let mut scale = vec![1f32; d_sae];
                for &i in &features {
                    scale[i] = strength as f32;
                }
                (None, Some(Tensor::from_vec(scale, d_sae, &device)?))
            }
        };
        if mode == SteerMode::SeedCompat {
            eprintln!(
                "warning: --mode seed-compat reproduces the original notebook's hook, which is not a \
                 transcoder splice (it feeds the transcoder's output to the MLP's input); use it only \
                 to compare with results made by that notebook"
            );
        }
        Ok(Self { transcoder, mode, strength, features, input, output, subset, scale })
    }

    /// The layer this edit acts on.
    pub fn layer(&self) -> usize {
        self.transcoder.meta.layer
    }

    /// The steered features.
    pub fn features(&self) -> &[usize] {
        &self.features
    }

    /// The strength.
    pub fn strength(&self) -> f64 {
        self.strength
    }

    /// The mode.
    pub fn mode(&self) -> SteerMode {
        self.mode
    }
}

impl Edit for Steering {
    fn reads(&self) -> Vec<HookPoint> {
        vec![self.input]
    }

    fn writes(&self) -> Vec<HookPoint> {
        match self.mode {
            SteerMode::SeedCompat => Vec::new(),
            _ => vec![self.output],
        }
    }

    /// Delta keeps the chosen features' decoded contribution, replace the whole steered output;
    /// seed-compat rewrites the MLP input here.
    fn read(&self, _: HookPoint, x: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let t = &self.transcoder;
        match self.mode {
            SteerMode::Delta => {
                if self.strength == 1.0 || self.features.is_empty() {
                    return Ok((None, None));
                }
                let s = self.subset.as_ref().expect("delta has a subset");
                let xc = x.broadcast_sub(&s.b_dec_in)?;
                let pre = linear_in(&xc, &s.w_enc)?.broadcast_add(&s.b_enc)?;
                let f = activate(&pre, s.threshold.as_ref())?;
                Ok((Some((linear_in(&f, &s.w_dec)? * (self.strength - 1.0))?), None))
            }
            SteerMode::Replace => {
                let f = t.encode(x)?.broadcast_mul(self.scale.as_ref().expect("replace has a scale"))?;
                let mut y = sparse_decode(&f, &t.w_dec)?.broadcast_add(&t.b_dec_out)?;
                if let Some(w_skip) = &t.w_skip {
                    y = (y + linear_in(x, &w_skip.t()?)?)?;
                }
                Ok((Some(y), None))
            }
            SteerMode::SeedCompat => {
                let pre = linear_in(x, &t.w_enc)?.broadcast_add(&t.b_enc)?;
                let f = pre.relu()?.broadcast_mul(self.scale.as_ref().expect("seed-compat has a scale"))?;
                Ok((None, Some(linear_in(&f, &t.w_dec)?.broadcast_add(&t.b_dec_in)?)))
            }
        }
    }

    fn write(&self, _: HookPoint, kept: &BTreeMap<HookPoint, Tensor>, out: &Tensor) -> Result<Option<Tensor>> {
        let Some(k) = kept.get(&self.input) else { return Ok(None) };
        Ok(Some(match self.mode {
            SteerMode::Delta => (out + k)?,
            _ => k.clone(),
        }))
    }
}

/// `x [.., k] @ w [k, n]` as one matrix product over all leading dimensions.
pub fn linear_in(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    let dims = x.dims().to_vec();
    let k = dims[dims.len() - 1];
    let y = x.reshape((x.elem_count() / k, k))?.matmul(w)?;
    let mut out = dims;
    *out.last_mut().unwrap() = w.dim(1)?;
    Ok(y.reshape(out)?)
}

/// ReLU, or JumpReLU (`pre` where `pre > threshold`, else 0) when a threshold is given.
pub fn activate(pre: &Tensor, threshold: Option<&Tensor>) -> Result<Tensor> {
    Ok(match threshold {
        None => pre.relu()?,
        Some(th) => {
            let keep = pre.broadcast_gt(th)?.to_dtype(pre.dtype())?;
            (pre * keep)?
        }
    })
}

/// `f @ W_dec` reading only the rows of W_dec whose feature is active (on CPU).
pub fn sparse_decode(f: &Tensor, w_dec: &Tensor) -> Result<Tensor> {
    let dims = f.dims().to_vec();
    let d_sae = dims[dims.len() - 1];
    let d_out = w_dec.dim(1)?;
    if !matches!(f.device(), Device::Cpu) || !w_dec.is_contiguous() {
        return linear_in(f, w_dec);
    }
    let rows = f.reshape((f.elem_count() / d_sae, d_sae))?.to_vec2::<f32>()?;
    let (storage, layout) = w_dec.storage_and_layout();
    let Storage::Cpu(cpu) = &*storage else { return linear_in(f, w_dec) };
    let w = &cpu.as_slice::<f32>()?[layout.start_offset()..];
    let mut out = vec![0f32; rows.len() * d_out];
    for (r, row) in rows.iter().enumerate() {
        let acc = &mut out[r * d_out..(r + 1) * d_out];
        for (i, &a) in row.iter().enumerate() {
            if a != 0.0 {
                let wi = &w[i * d_out..(i + 1) * d_out];
                for (o, &wv) in acc.iter_mut().zip(wi) {
                    *o += a * wv;
                }
            }
        }
    }
    let mut shape = dims;
    *shape.last_mut().unwrap() = d_out;
    Ok(Tensor::from_vec(out, shape, f.device())?)
}
