//! The parts that the Llama-shaped decoders (Llama, Qwen3, Gemma-2) share: rotary tables at a
//! step's positions, grouped-query self-attention (with Qwen3's per-head q/k norms and Gemma-2's
//! score scale and soft cap as options), and the gated MLP with its `mlp.hook_pre` /
//! `mlp.hook_post` hook points. Each family's file keeps its own block loop, where the norms and
//! the residual stream's hook points are.
//!
//! Weight matrices are held in the chosen dtype ([`Linear`]); norm gains, activations and the
//! attention itself are f32.

use anyhow::Result;
use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;

use super::attention::{attend, rotary_tables, KvCache, Scores, Step};
use super::config::Llama3RopeScaling;
use super::linear::Linear;
use super::pointwise;
use crate::hooks::{HookPoint, Hooks};

/// Rotary `cos` / `sin` tables `[max_positions, head_dim / 2]`.
pub struct Rotary {
    cos: Tensor,
    sin: Tensor,
}

impl Rotary {
    pub fn new(head_dim: usize, theta: f64, n_positions: usize, scaling: Option<&Llama3RopeScaling>, device: &Device) -> Result<Self> {
        let (cos, sin) = rotary_tables(head_dim, theta, n_positions, scaling, device)?;
        Ok(Self { cos, sin })
    }

    /// The tables at a step's positions, `[batch, seq, head_dim / 2]` each.
    pub fn at(&self, step: &Step) -> Result<(Tensor, Tensor)> {
        let half = self.cos.dim(1)?;
        let pick = |t: &Tensor| -> Result<Tensor> { Ok(t.index_select(&step.positions, 0)?.reshape((step.batch, step.seq, half))?) };
        Ok((pick(&self.cos)?, pick(&self.sin)?))
    }
}

/// Shapes of a grouped-query attention layer.
#[derive(Debug, Clone, Copy)]
pub struct AttentionShape {
    pub d_model: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
}

/// Self-attention with rotary positions: q, k, v projections, optional per-head RMSNorms of q
/// and k (before RoPE), the KV cache, softmax attention and the output projection.
pub struct SelfAttention {
    /// q, k and v projections, outputs side by side: `[(heads + 2 kv_heads) * head_dim]`.
    qkv: Linear,
    o: Linear,
    shape: AttentionShape,
    /// Qwen3's `q_norm` / `k_norm` gains `[head_dim]` (f32) and their epsilon.
    qk_norm: Option<(Tensor, Tensor, f64)>,
    scores: Scores,
}

impl SelfAttention {
    /// Loads `q_proj`, `k_proj`, `v_proj`, `o_proj` (and with `qk_norm_eps`, `q_norm` and
    /// `k_norm`) under `vb` (a layer's `self_attn`): matrices in `dtype`, gains in f32.
    pub fn load(vb: &VarBuilder, dtype: DType, shape: AttentionShape, qk_norm_eps: Option<f64>, scores: Scores) -> Result<Self> {
        let AttentionShape { d_model: d, heads, kv_heads, head_dim: hd } = shape;
        let w = vb.to_dtype(dtype);
        let (q_out, kv_out) = (heads * hd, kv_heads * hd);
        let qkv = Linear::stacked(vec![
            w.get((q_out, d), "q_proj.weight")?,
            w.get((kv_out, d), "k_proj.weight")?,
            w.get((kv_out, d), "v_proj.weight")?,
        ])?;
        let vb = vb.to_dtype(DType::F32);
        let qk_norm = match qk_norm_eps {
            Some(eps) => Some((vb.get(hd, "q_norm.weight")?, vb.get(hd, "k_norm.weight")?, eps)),
            None => None,
        };
        Ok(Self { qkv, o: Linear::new(w.get((d, q_out), "o_proj.weight")?, None)?, shape, qk_norm, scores })
    }

    /// The attention input `h [b, t, d_model]` (normed, gain included) to the output
    /// projection's output `[b, t, d_model]`, continuing layer `layer` of `cache`; `rope` is
    /// [`Rotary::at`] this step, `mask` the step's mask for this layer, `real` its real rows
    /// ([`Step::real`]).
    pub fn forward(&self, h: &Tensor, rope: &(Tensor, Tensor), cache: &mut KvCache, layer: usize, mask: &Tensor, real: Option<&[usize]>) -> Result<Tensor> {
        let AttentionShape { heads, kv_heads, head_dim: hd, .. } = self.shape;
        let (b, t, _) = h.dims3()?;
        let qkv = self.qkv.forward(h, real)?;
        let split = |start: usize, n: usize, norm: Option<(&Tensor, f64)>| -> Result<Tensor> {
            let x = qkv.narrow(2, start, n * hd)?.reshape((b, t, n, hd))?;
            let x = match norm {
                Some((gain, eps)) => pointwise::scale_rows(&pointwise::normalize(&x, eps, false)?.0, false, gain, None)?,
                None => x,
            };
            Ok(x.transpose(1, 2)?.contiguous()?)
        };
        let (q_norm, k_norm) = match &self.qk_norm {
            Some((qg, kg, eps)) => (Some((qg, *eps)), Some((kg, *eps))),
            None => (None, None),
        };
        let q = split(0, heads, q_norm)?;
        let k = split(heads * hd, kv_heads, k_norm)?;
        let v = split((heads + kv_heads) * hd, kv_heads, None)?;
        let (cos, sin) = rope;
        let q = candle_nn::rotary_emb::rope(&q, cos, sin)?;
        let k = candle_nn::rotary_emb::rope(&k, cos, sin)?;
        let (k, v) = cache.append(layer, k, v)?;
        self.o.forward(&attend(&q, &k, &v, mask, self.scores)?, real)
    }
}

/// The activation of a gated MLP's gate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    /// Llama, Qwen3.
    Silu,
    /// Gemma-2's `gelu_pytorch_tanh`: the tanh approximation of GELU.
    GeluTanh,
}

/// `down(act(gate(x)) · up(x))`.
pub struct GatedMlp {
    /// Gate and up projections, outputs side by side: `[2 d_mlp]`.
    gate_up: Linear,
    down: Linear,
    d_mlp: usize,
    act: Activation,
}

impl GatedMlp {
    /// Loads `gate_proj`, `up_proj` and `down_proj` under `vb` (a layer's `mlp`) in `dtype`.
    pub fn load(vb: &VarBuilder, dtype: DType, d_model: usize, d_mlp: usize, act: Activation) -> Result<Self> {
        let w = vb.to_dtype(dtype);
        let (d, f) = (d_model, d_mlp);
        Ok(Self {
            gate_up: Linear::stacked(vec![w.get((f, d), "gate_proj.weight")?, w.get((f, d), "up_proj.weight")?])?,
            down: Linear::new(w.get((d, f), "down_proj.weight")?, None)?,
            d_mlp,
            act,
        })
    }

    /// The MLP input (`mlp.hook_in`) to the down projection's output (`mlp.hook_out`, which the
    /// caller visits), visiting `mlp.hook_pre` (the gate projection) and `mlp.hook_post`;
    /// `real`: the real rows ([`Step::real`]).
    pub fn forward(&self, hooks: &mut Hooks, layer: usize, x: &Tensor, real: Option<&[usize]>) -> Result<Tensor> {
        let f = self.d_mlp;
        let gate_up = self.gate_up.forward(x, real)?;
        let pre = hooks.visit(HookPoint::MlpPre(layer), gate_up.narrow(2, 0, f)?)?;
        let act = match self.act {
            Activation::Silu => pointwise::silu(&pre)?,
            Activation::GeluTanh => pointwise::gelu_tanh(&pre)?,
        };
        let post = hooks.visit(HookPoint::MlpPost(layer), (act * gate_up.narrow(2, f, f)?)?)?;
        self.down.forward(&post, real)
    }
}
