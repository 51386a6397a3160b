//! Splicing a transcoder into a model and steering its features.
//!
//! The transcoder reads its input hook (`blocks.L.ln2.hook_normalized`, `hook_resid_mid` or
//! `mlp.hook_in`) and stands for its output hook (`blocks.L.hook_mlp_out` or `mlp.hook_out`).
//! For a feature set S and a strength s:
//! - [`SteerMode::Delta`] (default, error-preserving): `mlp_out + (s-1) · Σ_{i∈S} f_i W_dec[i]`.
//!   Only the columns in S are encoded (all of them for TopK, which must rank them), so the cost
//!   grows with |S|; s = 1 is exactly the model. A cross-layer transcoder's features add their
//!   contribution to every layer they write.
//! - [`SteerMode::Replace`]: `mlp_out := f' @ W_dec + b_dec_out (+ x @ W_skip.T)` with
//!   `f'_i = s·f_i` for i in S, decoded from the active features only. s = 1 is the plain
//!   transcoder splice. For a cross-layer transcoder every layer is replaced (see
//!   [`Splice::steering`]).
//! - [`SteerMode::SeedCompat`]: the original notebook's hook, kept to compare with its results:
//!   at the MLP *input* it returns `relu(x @ W_enc + b_enc)` (S scaled) `@ W_dec + b_dec`, with no
//!   input centring and the input-centring vector as output bias, and the real MLP runs on that.
//!   It is not a transcoder splice.

use std::collections::BTreeMap;
use std::sync::Arc;

use anyhow::{anyhow, bail, Result};
use candle_core::Tensor;

use super::{linear_in, sparse_decode, Transcoder};

use crate::hooks::{Edit, HookPoint};

/// Positions per pass through the transcoder on the CPU (see [`Steering`]'s `read`).
const ROWS: usize = 256;

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

/// A transcoder spliced in, scaling `features` by `strength`. For a cross-layer transcoder the
/// features of its source layer also write into the later layers: `delta` adds their scaled
/// contribution to every layer written, and `replace` splices every source layer (see
/// [`Splice::steering`]).
pub struct Steering {
    /// The transcoders spliced: one, or for a cross-layer `replace` every source layer.
    sources: Vec<Arc<Transcoder>>,
    /// The index in `sources` of the one whose features are steered.
    steered: usize,
    mode: SteerMode,
    strength: f64,
    features: Vec<usize>,
    /// The point each source reads.
    inputs: Vec<HookPoint>,
    /// The output hook at the steered source's layer (the same hook at later layers is written
    /// by cross-layer decoders).
    output: HookPoint,
    /// For delta: the steered features' slices of the transcoder.
    subset: Option<Subset>,
    /// For replace and seed-compat: a per-feature scale `[d_sae]` (1 outside S).
    scale: Option<Tensor>,
    /// For replace: each source's skip matrix transposed, `W_skip.T [d_in, d_out]`, contiguous
    /// (so that a step reads it in place instead of copying a transposed view).
    skips: Vec<Option<Tensor>>,
}

/// `W_enc[:, S]` `[d_in, |S|]`, `b_enc[S]`, `threshold[S]`, and `W_dec[S]` `[|S|, d_out]` for every
/// layer written.
struct Subset {
    idx: Tensor,
    w_enc: Tensor,
    b_enc: Tensor,
    threshold: Option<Tensor>,
    w_dec: Vec<Tensor>,
}

/// What steering splices in: a transcoder, or for `replace` with a cross-layer transcoder every
/// source layer, one of which is steered.
#[derive(Clone)]
pub struct Splice {
    sources: Vec<Arc<Transcoder>>,
    steered: usize,
}

impl Splice {
    /// One transcoder (single-layer, or one source layer of a cross-layer transcoder for `delta`).
    pub fn new(transcoder: Arc<Transcoder>) -> Self {
        Self { sources: vec![transcoder], steered: 0 }
    }

    /// Every source layer of a cross-layer transcoder, steering the one of `layer`.
    pub fn cross_layer(all: Vec<Arc<Transcoder>>, layer: usize) -> Result<Self> {
        let steered = all
            .iter()
            .position(|t| t.meta.layer == layer)
            .ok_or_else(|| anyhow!("the cross-layer transcoder has no source layer {layer}"))?;
        Ok(Self { sources: all, steered })
    }

    /// The steered transcoder.
    pub fn transcoder(&self) -> &Arc<Transcoder> {
        &self.sources[self.steered]
    }

    /// An edit scaling `features` by `strength`. `replace` with a cross-layer transcoder needs
    /// every source layer ([`Splice::cross_layer`]): every layer W's MLP output becomes
    /// `b_dec_W + Σ_{L ≤ W} f_L @ W_dec_L[:, W − L]`, the features of every source layer computed in
    /// the spliced pass, and those of the steered layer in S scaled.
    pub fn steering(&self, features: Vec<usize>, strength: f64, mode: SteerMode) -> Result<Steering> {
        let t = self.transcoder();
        if mode != SteerMode::Replace {
            return Steering::build(vec![t.clone()], 0, features, strength, mode);
        }
        if t.is_cross_layer() && self.sources.len() == 1 {
            bail!("--mode replace with a cross-layer transcoder splices every source layer: load them all (Transcoder::load_all, Splice::cross_layer)");
        }
        Steering::build(self.sources.clone(), self.steered, features, strength, mode)
    }
}

/// Checks a steered feature list: every index below `d_sae`, none twice.
pub fn check_features(features: &[usize], d_sae: usize) -> Result<()> {
    if let Some(&bad) = features.iter().find(|&&i| i >= d_sae) {
        bail!("feature {bad} is out of range: the transcoder has {d_sae} features");
    }
    let mut seen = vec![false; d_sae];
    if let Some(&dup) = features.iter().find(|&&i| std::mem::replace(&mut seen[i], true)) {
        bail!("feature {dup} is listed twice (each feature is scaled once)");
    }
    Ok(())
}

impl Steering {
    /// Prepares a steering edit with one transcoder; checks the feature indices.
    pub fn new(transcoder: Arc<Transcoder>, features: Vec<usize>, strength: f64, mode: SteerMode) -> Result<Self> {
        Splice::new(transcoder).steering(features, strength, mode)
    }

    fn build(sources: Vec<Arc<Transcoder>>, steered: usize, features: Vec<usize>, strength: f64, mode: SteerMode) -> Result<Self> {
        let t = sources[steered].clone();
        let d_sae = t.meta.d_sae;
        check_features(&features, d_sae)?;
        // The edit runs in f32: a strength past its range would scale features to ±∞.
        if !(strength as f32).is_finite() {
            bail!("strength {strength:e} is not a finite f32 (at most about 3.4e38 in size)");
        }
        let inputs = sources.iter().map(|s| Ok(s.meta.points()?.0)).collect::<Result<Vec<_>>>()?;
        let (input, output) = t.meta.points()?;
        if mode == SteerMode::SeedCompat && input != HookPoint::Ln2Normalized(t.meta.layer) {
            bail!("--mode seed-compat needs a transcoder that reads ln2.hook_normalized; this one reads {input}");
        }
        let device = t.w_enc.device().clone();
        let (subset, scale) = match mode {
            SteerMode::Delta => {
                let idx = Tensor::from_vec(features.iter().map(|&i| i as u32).collect::<Vec<_>>(), features.len(), &device)?;
                let decoders = std::iter::once(&t.w_dec).chain(&t.w_dec_next);
                let subset = Subset {
                    w_enc: t.w_enc.index_select(&idx, 1)?.contiguous()?,
                    b_enc: t.b_enc.index_select(&idx, 0)?,
                    threshold: t.threshold.as_ref().map(|th| th.index_select(&idx, 0)).transpose()?,
                    w_dec: decoders.map(|w| Ok(w.index_select(&idx, 0)?.contiguous()?)).collect::<Result<_>>()?,
                    idx,
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
        let skips = match mode {
            SteerMode::Replace => sources.iter().map(|t| t.w_skip.as_ref().map(|w| Ok(w.t()?.contiguous()?)).transpose()).collect::<Result<_>>()?,
            _ => Vec::new(),
        };
        if mode == SteerMode::SeedCompat {
            eprintln!(
                "warning: --mode seed-compat reproduces the original notebook's hook, which is not a \
                 transcoder splice (it feeds the transcoder's output to the MLP's input); use it only \
                 to compare with results made by that notebook"
            );
        }
        Ok(Self { sources, steered, mode, strength, features, inputs, output, subset, scale, skips })
    }

    /// The layer whose features are steered.
    pub fn layer(&self) -> usize {
        self.sources[self.steered].meta.layer
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

    /// Whether delta steering is a no-op (strength 1 or no features): nothing to compute.
    fn delta_is_identity(&self) -> bool {
        self.strength == 1.0 || self.features.is_empty()
    }

    /// The steered features' contributions to every layer they write, side by side:
    /// `(s − 1) · f_S @ W_dec_j[S]` for j = 0, 1, ...
    fn delta_contributions(&self, x: &Tensor) -> Result<Tensor> {
        let t = &self.sources[self.steered];
        let s = self.subset.as_ref().expect("delta has a subset");
        let f = if t.meta.activation.elementwise() {
            let pre = linear_in(&x.broadcast_sub(&t.b_dec_in)?, &s.w_enc)?.broadcast_add(&s.b_enc)?;
            t.meta.activation.apply(&pre, s.threshold.as_ref())?
        } else {
            // TopK needs every feature's pre-activation to know which are in the top k.
            t.encode(x)?.index_select(&s.idx, x.rank() - 1)?
        };
        let parts = s.w_dec.iter().map(|w| Ok((linear_in(&f, w)? * (self.strength - 1.0))?)).collect::<Result<Vec<_>>>()?;
        Ok(Tensor::cat(&parts, x.rank() - 1)?)
    }

    /// Source `i`'s (scaled) decoded features for every layer it writes, side by side, the skip
    /// connection included in its own layer's part.
    fn replace_contributions(&self, i: usize, x: &Tensor) -> Result<Tensor> {
        let t = &self.sources[i];
        let mut f = t.encode(x)?;
        if i == self.steered {
            f = f.broadcast_mul(self.scale.as_ref().expect("replace has a scale"))?;
        }
        let mut parts = Vec::with_capacity(1 + t.w_dec_next.len());
        for (j, w) in std::iter::once(&t.w_dec).chain(&t.w_dec_next).enumerate() {
            let mut y = sparse_decode(&f, w)?;
            if let (0, Some(skip)) = (j, &self.skips[i]) {
                y = (y + linear_in(x, skip)?)?;
            }
            parts.push(y);
        }
        Ok(Tensor::cat(&parts, x.rank() - 1)?)
    }

    /// [`Edit::read`] on positions `x [.., d_in]` at once.
    fn read_rows(&self, point: HookPoint, x: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        match self.mode {
            SteerMode::Delta if self.delta_is_identity() => Ok((None, None)),
            SteerMode::Delta => Ok((Some(self.delta_contributions(x)?), None)),
            SteerMode::Replace => {
                let i = self.inputs.iter().position(|&p| p == point).expect("reads only its inputs");
                Ok((Some(self.replace_contributions(i, x)?), None))
            }
            SteerMode::SeedCompat => {
                let t = &self.sources[self.steered];
                let pre = linear_in(x, &t.w_enc)?.broadcast_add(&t.b_enc)?;
                let f = pre.relu()?.broadcast_mul(self.scale.as_ref().expect("seed-compat has a scale"))?;
                Ok((None, Some(linear_in(&f, &t.w_dec)?.broadcast_add(&t.b_dec_in)?)))
            }
        }
    }
}

impl Edit for Steering {
    fn reads(&self) -> Vec<HookPoint> {
        match self.mode {
            SteerMode::Replace => self.inputs.clone(),
            _ => vec![self.inputs[self.steered]],
        }
    }

    fn writes(&self) -> Vec<HookPoint> {
        let writers: &[Arc<Transcoder>] = match self.mode {
            SteerMode::SeedCompat => &[],
            SteerMode::Delta => std::slice::from_ref(&self.sources[self.steered]),
            SteerMode::Replace => &self.sources,
        };
        let mut points: Vec<HookPoint> = writers
            .iter()
            .flat_map(|t| (0..=t.w_dec_next.len()).map(move |j| self.output.at_layer(t.meta.layer + j)))
            .collect();
        points.sort_unstable();
        points.dedup();
        points
    }

    /// Delta keeps the steered features' contributions, replace each source's decoded features;
    /// seed-compat rewrites the MLP input here. On the CPU a prefill's positions go through the
    /// transcoder `ROWS` at a time: each position's result is its own, and the feature
    /// activations held at once stay a few tensors of `ROWS × d_sae` (8 prompts of 200 tokens
    /// would otherwise hold 1,600 rows of every feature in each).
    fn read(&self, point: HookPoint, x: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let d = x.dim(x.rank() - 1)?;
        let rows = x.elem_count() / d.max(1);
        if !x.device().is_cpu() || rows <= ROWS {
            return self.read_rows(point, x);
        }
        let flat = x.reshape((rows, d))?;
        let (mut kept, mut rewritten) = (Vec::new(), Vec::new());
        for r0 in (0..rows).step_by(ROWS) {
            let (k, w) = self.read_rows(point, &flat.narrow(0, r0, ROWS.min(rows - r0))?)?;
            kept.extend(k);
            rewritten.extend(w);
        }
        let lead = &x.dims()[..x.rank() - 1];
        let join = |parts: Vec<Tensor>| -> Result<Option<Tensor>> {
            if parts.is_empty() {
                return Ok(None);
            }
            let all = Tensor::cat(&parts, 0)?;
            Ok(Some(all.reshape([lead, &[all.dim(1)?]].concat())?))
        };
        Ok((join(kept)?, join(rewritten)?))
    }

    fn write(&self, point: HookPoint, kept: &BTreeMap<HookPoint, Tensor>, out: &Tensor) -> Result<Option<Tensor>> {
        let target = point.layer().expect("writes block outputs");
        let part = |t: &Transcoder, k: &Tensor| -> Result<Tensor> {
            let d = t.meta.d_out;
            Ok(k.narrow(k.rank() - 1, (target - t.meta.layer) * d, d)?)
        };
        match self.mode {
            SteerMode::SeedCompat => Ok(None),
            SteerMode::Delta => {
                let Some(k) = kept.get(&self.inputs[self.steered]) else { return Ok(None) };
                Ok(Some((out + part(&self.sources[self.steered], k)?)?))
            }
            SteerMode::Replace => {
                let own = self.sources.iter().find(|t| t.meta.layer == target).expect("replace writes its sources' layers");
                let mut y = own.b_dec_out.broadcast_as(out.shape())?.contiguous()?;
                for (t, input) in self.sources.iter().zip(&self.inputs) {
                    let writes_here = t.meta.layer <= target && target <= t.meta.layer + t.w_dec_next.len();
                    if let (true, Some(k)) = (writes_here, kept.get(input)) {
                        y = (y + part(t, k)?)?;
                    }
                }
                Ok(Some(y))
            }
        }
    }
}
