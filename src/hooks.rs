//! Hook points with TransformerLens names, and the means to read and write them.
//!
//! The names are a public contract: `blocks.3.ln2.hook_normalized` means exactly what it means in
//! TransformerLens's default-processed model (`fold_ln`, `center_writing_weights`,
//! `center_unembed`, `fold_value_biases`). A forward pass calls [`Hooks::visit`] at every point;
//! the hooks record the values that were asked for and apply any edit registered for that point.
//! Splices (transcoders, ablations) are [`Edit`]s: an edit reads the values at some hook points
//! and rewrites the values at later points of the same forward pass (a transcoder reads its layer's
//! MLP input and writes that layer's MLP output; a cross-layer transcoder writes several layers).

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

use anyhow::{bail, Result};
use candle_core::Tensor;

/// One hook point of the model, named as in TransformerLens.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum HookPoint {
    /// `hook_embed`: token embeddings.
    Embed,
    /// `hook_pos_embed`: learned position embeddings (GPT-2 only).
    PosEmbed,
    /// `blocks.L.hook_resid_pre`: the residual stream entering block L.
    ResidPre(usize),
    /// `blocks.L.ln1.hook_scale`: the attention norm's scale, `[.., 1]`.
    Ln1Scale(usize),
    /// `blocks.L.ln1.hook_normalized`: the attention input, normalized, without gain or bias.
    Ln1Normalized(usize),
    /// `blocks.L.ln1_post.hook_scale`: Gemma-2's post-attention norm's scale, `[.., 1]`.
    Ln1PostScale(usize),
    /// `blocks.L.ln1_post.hook_normalized`: Gemma-2's attention output (before its post-norm),
    /// normalized, without the gain.
    Ln1PostNormalized(usize),
    /// `blocks.L.hook_attn_out`: the attention output as it joins the residual stream (for
    /// Gemma-2 after its post-norm).
    AttnOut(usize),
    /// `blocks.L.hook_resid_mid`: residual after attention.
    ResidMid(usize),
    /// `blocks.L.ln2.hook_scale`: the MLP norm's scale, `[.., 1]`.
    Ln2Scale(usize),
    /// `blocks.L.ln2.hook_normalized`: the MLP input, normalized, without gain or bias.
    Ln2Normalized(usize),
    /// `blocks.L.mlp.hook_in`: the MLP input as the model computes it, norm gain (and bias) included.
    MlpIn(usize),
    /// `blocks.L.mlp.hook_pre`: pre-activation (the gate projection for gated MLPs).
    MlpPre(usize),
    /// `blocks.L.mlp.hook_post`: post-activation (gate activation times up projection).
    MlpPost(usize),
    /// `blocks.L.mlp.hook_out`: the MLP module's own output (for Gemma-2 before its post-MLP norm).
    MlpHookOut(usize),
    /// `blocks.L.ln2_post.hook_scale`: Gemma-2's post-MLP norm's scale, `[.., 1]`.
    Ln2PostScale(usize),
    /// `blocks.L.ln2_post.hook_normalized`: Gemma-2's MLP output (`mlp.hook_out`), normalized,
    /// without the gain.
    Ln2PostNormalized(usize),
    /// `blocks.L.hook_mlp_out`: the MLP output as it joins the residual stream (for Gemma-2
    /// after its post-norm).
    MlpOut(usize),
    /// `blocks.L.hook_resid_post`: the residual stream leaving block L.
    ResidPost(usize),
    /// `ln_final.hook_scale`.
    LnFinalScale,
    /// `ln_final.hook_normalized`: the final norm's output without gain or bias.
    LnFinalNormalized,
}

impl HookPoint {
    /// The layer this point belongs to, if any.
    pub fn layer(&self) -> Option<usize> {
        use HookPoint::*;
        match *self {
            Embed | PosEmbed | LnFinalScale | LnFinalNormalized => None,
            ResidPre(l) | Ln1Scale(l) | Ln1Normalized(l) | Ln1PostScale(l) | Ln1PostNormalized(l) | AttnOut(l)
            | ResidMid(l) | Ln2Scale(l) | Ln2Normalized(l) | MlpIn(l) | MlpPre(l) | MlpPost(l) | MlpHookOut(l)
            | Ln2PostScale(l) | Ln2PostNormalized(l) | MlpOut(l) | ResidPost(l) => Some(l),
        }
    }

    /// The same point at another layer (points outside the blocks are returned unchanged).
    pub fn at_layer(self, layer: usize) -> Self {
        use HookPoint::*;
        match self {
            Embed | PosEmbed | LnFinalScale | LnFinalNormalized => self,
            ResidPre(_) => ResidPre(layer),
            Ln1Scale(_) => Ln1Scale(layer),
            Ln1Normalized(_) => Ln1Normalized(layer),
            AttnOut(_) => AttnOut(layer),
            ResidMid(_) => ResidMid(layer),
            Ln2Scale(_) => Ln2Scale(layer),
            Ln2Normalized(_) => Ln2Normalized(layer),
            MlpIn(_) => MlpIn(layer),
            MlpPre(_) => MlpPre(layer),
            MlpPost(_) => MlpPost(layer),
            MlpHookOut(_) => MlpHookOut(layer),
            MlpOut(_) => MlpOut(layer),
            ResidPost(_) => ResidPost(layer),
            Ln1PostScale(_) => Ln1PostScale(layer),
            Ln1PostNormalized(_) => Ln1PostNormalized(layer),
            Ln2PostScale(_) => Ln2PostScale(layer),
            Ln2PostNormalized(_) => Ln2PostNormalized(layer),
        }
    }

    /// Whether this is a point of a post-attention or post-MLP norm (`ln1_post`, `ln2_post`:
    /// Gemma-2 only).
    pub fn is_post_norm(&self) -> bool {
        use HookPoint::*;
        matches!(self, Ln1PostScale(_) | Ln1PostNormalized(_) | Ln2PostScale(_) | Ln2PostNormalized(_))
    }

    /// Parses a name and checks it against the model's layer count and architecture (whether it
    /// has learned position embeddings, and post-norms).
    pub fn parse_for(name: &str, n_layers: usize, has_pos_embed: bool, has_post_norms: bool) -> Result<Self> {
        let point: HookPoint = name.parse()?;
        if let Some(l) = point.layer() {
            if l >= n_layers {
                bail!("hook `{name}`: layer {l} does not exist (the model has {n_layers} layers)");
            }
        }
        if point == HookPoint::PosEmbed && !has_pos_embed {
            bail!("hook `{name}`: this model has no learned position embeddings");
        }
        if point.is_post_norm() && !has_post_norms {
            bail!("hook `{name}`: this model has no post-attention or post-MLP norms (only Gemma-2 has ln1_post and ln2_post)");
        }
        Ok(point)
    }
}

impl fmt::Display for HookPoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        use HookPoint::*;
        match *self {
            Embed => write!(f, "hook_embed"),
            PosEmbed => write!(f, "hook_pos_embed"),
            ResidPre(l) => write!(f, "blocks.{l}.hook_resid_pre"),
            Ln1Scale(l) => write!(f, "blocks.{l}.ln1.hook_scale"),
            Ln1Normalized(l) => write!(f, "blocks.{l}.ln1.hook_normalized"),
            Ln1PostScale(l) => write!(f, "blocks.{l}.ln1_post.hook_scale"),
            Ln1PostNormalized(l) => write!(f, "blocks.{l}.ln1_post.hook_normalized"),
            AttnOut(l) => write!(f, "blocks.{l}.hook_attn_out"),
            ResidMid(l) => write!(f, "blocks.{l}.hook_resid_mid"),
            Ln2Scale(l) => write!(f, "blocks.{l}.ln2.hook_scale"),
            Ln2Normalized(l) => write!(f, "blocks.{l}.ln2.hook_normalized"),
            MlpIn(l) => write!(f, "blocks.{l}.mlp.hook_in"),
            MlpPre(l) => write!(f, "blocks.{l}.mlp.hook_pre"),
            MlpPost(l) => write!(f, "blocks.{l}.mlp.hook_post"),
            MlpHookOut(l) => write!(f, "blocks.{l}.mlp.hook_out"),
            Ln2PostScale(l) => write!(f, "blocks.{l}.ln2_post.hook_scale"),
            Ln2PostNormalized(l) => write!(f, "blocks.{l}.ln2_post.hook_normalized"),
            MlpOut(l) => write!(f, "blocks.{l}.hook_mlp_out"),
            ResidPost(l) => write!(f, "blocks.{l}.hook_resid_post"),
            LnFinalScale => write!(f, "ln_final.hook_scale"),
            LnFinalNormalized => write!(f, "ln_final.hook_normalized"),
        }
    }
}

impl FromStr for HookPoint {
    type Err = anyhow::Error;

    fn from_str(name: &str) -> Result<Self> {
        use HookPoint::*;
        match name {
            "hook_embed" => return Ok(Embed),
            "hook_pos_embed" => return Ok(PosEmbed),
            "ln_final.hook_scale" => return Ok(LnFinalScale),
            "ln_final.hook_normalized" => return Ok(LnFinalNormalized),
            _ => {}
        }
        let unknown = || anyhow::anyhow!("unknown hook point `{name}` (known: {})", KNOWN_HOOKS);
        let rest = name.strip_prefix("blocks.").ok_or_else(unknown)?;
        let (layer, point) = rest.split_once('.').ok_or_else(unknown)?;
        let l: usize = layer.parse().map_err(|_| unknown())?;
        Ok(match point {
            "hook_resid_pre" => ResidPre(l),
            "ln1.hook_scale" => Ln1Scale(l),
            "ln1.hook_normalized" => Ln1Normalized(l),
            "ln1_post.hook_scale" => Ln1PostScale(l),
            "ln1_post.hook_normalized" => Ln1PostNormalized(l),
            "hook_attn_out" => AttnOut(l),
            "hook_resid_mid" => ResidMid(l),
            "ln2.hook_scale" => Ln2Scale(l),
            "ln2.hook_normalized" => Ln2Normalized(l),
            "mlp.hook_in" => MlpIn(l),
            "mlp.hook_pre" => MlpPre(l),
            "mlp.hook_post" => MlpPost(l),
            "mlp.hook_out" => MlpHookOut(l),
            "ln2_post.hook_scale" => Ln2PostScale(l),
            "ln2_post.hook_normalized" => Ln2PostNormalized(l),
            "hook_mlp_out" => MlpOut(l),
            "hook_resid_post" => ResidPost(l),
            _ => return Err(unknown()),
        })
    }
}

const KNOWN_HOOKS: &str = "hook_embed, hook_pos_embed, blocks.L.{hook_resid_pre, ln1.hook_scale, \
ln1.hook_normalized, ln1_post.hook_scale, ln1_post.hook_normalized, hook_attn_out, hook_resid_mid, \
ln2.hook_scale, ln2.hook_normalized, mlp.hook_in, mlp.hook_pre, mlp.hook_post, mlp.hook_out, ln2_post.hook_scale, \
ln2_post.hook_normalized, hook_mlp_out, hook_resid_post}, ln_final.hook_scale, ln_final.hook_normalized";

/// An intervention on a forward pass: it reads the values at some hook points and rewrites the
/// values at later points of the same pass. Tensors are `[batch, seq, d]` and cover every
/// position the pass computes: the whole prompt in the prefill, one position per sequence in each
/// cached decode step. What a read keeps is handed to the writes of the same pass.
pub trait Edit: Send + Sync {
    /// The points whose values the edit reads.
    fn reads(&self) -> Vec<HookPoint>;
    /// The points whose values the edit rewrites.
    fn writes(&self) -> Vec<HookPoint>;
    /// Sees the value at a read point; returns what to keep for the writes and, optionally, a
    /// new value for the point (the original notebook's hook rewrites the MLP input).
    fn read(&self, point: HookPoint, value: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)>;
    /// Rewrites the value at a write point (`None`: unchanged), given what the reads kept.
    fn write(&self, point: HookPoint, kept: &BTreeMap<HookPoint, Tensor>, value: &Tensor) -> Result<Option<Tensor>>;
}

/// A function that replaces the value at a hook point.
pub type HookFn = Arc<dyn Fn(&Tensor) -> Result<Tensor> + Send + Sync>;

/// The hooks of one forward pass: which points to record, which to rewrite.
#[derive(Default, Clone)]
pub struct Hooks {
    record: BTreeSet<HookPoint>,
    recorded: BTreeMap<HookPoint, Tensor>,
    writes: BTreeMap<HookPoint, HookFn>,
    edits: Vec<Arc<dyn Edit>>,
    /// Per edit, what its reads kept in the current pass.
    kept: Vec<BTreeMap<HookPoint, Tensor>>,
    /// Edit indices by the points they read and write.
    edit_reads: BTreeMap<HookPoint, Vec<usize>>,
    edit_writes: BTreeMap<HookPoint, Vec<usize>>,
}

impl Hooks {
    /// No hooks at all: the plain model.
    pub fn none() -> Self {
        Self::default()
    }

    /// Asks for the value at `point` to be kept (the last forward pass's value is kept).
    pub fn record(&mut self, point: HookPoint) {
        self.record.insert(point);
    }

    /// Registers a function that replaces the value at `point`.
    pub fn write(&mut self, point: HookPoint, f: HookFn) {
        self.writes.insert(point, f);
    }

    /// Adds an edit; several edits at one point are applied in the order they were added.
    pub fn edit(&mut self, edit: Arc<dyn Edit>) {
        let i = self.edits.len();
        for p in edit.reads() {
            self.edit_reads.entry(p).or_default().push(i);
        }
        for p in edit.writes() {
            self.edit_writes.entry(p).or_default().push(i);
        }
        self.edits.push(edit);
        self.kept.push(BTreeMap::new());
    }

    /// The first block whose computation these hooks see or change (0 for the embeddings), or
    /// `None` when they touch no block: the blocks before it run the same as with no hooks.
    pub fn first_block(&self) -> Option<usize> {
        let points = self.record.iter().chain(self.writes.keys()).chain(self.edit_reads.keys()).chain(self.edit_writes.keys());
        points.filter_map(|p| if matches!(p, HookPoint::Embed | HookPoint::PosEmbed) { Some(0) } else { p.layer() }).min()
    }

    /// The value recorded at `point` by the last forward pass.
    pub fn recorded(&self, point: HookPoint) -> Option<&Tensor> {
        self.recorded.get(&point)
    }

    /// Takes all recorded values out.
    pub fn take_recorded(&mut self) -> BTreeMap<HookPoint, Tensor> {
        std::mem::take(&mut self.recorded)
    }

    /// Called by the model at every hook point: applies the write function, the edits writing
    /// here, then the edits reading here, then records.
    pub fn visit(&mut self, point: HookPoint, value: Tensor) -> Result<Tensor> {
        let mut value = match self.writes.get(&point) {
            Some(f) => f(&value)?,
            None => value,
        };
        for &i in self.edit_writes.get(&point).into_iter().flatten() {
            if let Some(v) = self.edits[i].write(point, &self.kept[i], &value)? {
                value = v;
            }
        }
        for &i in self.edit_reads.get(&point).into_iter().flatten() {
            let (keep, replace) = self.edits[i].read(point, &value)?;
            match keep {
                Some(k) => self.kept[i].insert(point, k),
                None => self.kept[i].remove(&point),
            };
            if let Some(v) = replace {
                value = v;
            }
        }
        if self.record.contains(&point) {
            self.recorded.insert(point, value.clone());
        }
        Ok(value)
    }
}

/// Zero-ablation of a layer's MLP: its output becomes zero. A floor for comparisons.
pub struct ZeroAblation(pub usize);

impl Edit for ZeroAblation {
    fn reads(&self) -> Vec<HookPoint> {
        Vec::new()
    }
    fn writes(&self) -> Vec<HookPoint> {
        vec![HookPoint::MlpOut(self.0)]
    }
    fn read(&self, _: HookPoint, _: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        Ok((None, None))
    }
    fn write(&self, _: HookPoint, _: &BTreeMap<HookPoint, Tensor>, value: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(value.zeros_like()?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for name in [
            "hook_embed",
            "hook_pos_embed",
            "blocks.0.hook_resid_pre",
            "blocks.3.ln1.hook_normalized",
            "blocks.12.ln2.hook_normalized",
            "blocks.2.mlp.hook_post",
            "blocks.2.mlp.hook_in",
            "blocks.2.mlp.hook_out",
            "blocks.1.hook_mlp_out",
            "blocks.1.ln1_post.hook_scale",
            "blocks.0.ln1_post.hook_normalized",
            "blocks.4.ln2_post.hook_scale",
            "blocks.2.ln2_post.hook_normalized",
            "ln_final.hook_normalized",
        ] {
            let p: HookPoint = name.parse().unwrap();
            assert_eq!(p.to_string(), name);
        }
    }

    #[test]
    fn rejects_unknown_and_out_of_range() {
        assert!("blocks.0.hook_nothing".parse::<HookPoint>().is_err());
        assert!("blocks.x.hook_mlp_out".parse::<HookPoint>().is_err());
        let e = HookPoint::parse_for("blocks.5.hook_mlp_out", 5, false, false).unwrap_err();
        assert!(e.to_string().contains("layer 5 does not exist"));
        assert!(HookPoint::parse_for("hook_pos_embed", 2, false, false).is_err());
        let e = HookPoint::parse_for("blocks.1.ln2_post.hook_normalized", 2, false, false).unwrap_err();
        assert!(e.to_string().contains("no post-attention or post-MLP norms"), "{e}");
        assert!(HookPoint::parse_for("blocks.1.ln2_post.hook_normalized", 2, false, true).is_ok());
    }
}
