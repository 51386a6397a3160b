//! Gemma-2 with hook points.
//!
//! What sets it apart from Llama: embeddings × √d_model; RMSNorm gains stored as offsets (the
//! gain is 1 + w); a norm before *and after* attention and the MLP (`input_layernorm`,
//! `post_attention_layernorm`, `pre_feedforward_layernorm`, `post_feedforward_layernorm`);
//! scores scaled by `query_pre_attn_scalar^-0.5` and soft-capped; sliding-window layers
//! alternating with global ones; a GeGLU MLP (tanh GELU); soft-capped final logits; a tied
//! unembedding.
//!
//! Hook values are TransformerLens's (its Gemma-2 model with `fold_ln`; `center_unembed` is off
//! because the final soft cap is not shift-invariant, so the logits are the raw ones). `ln1` and
//! `ln2` are folded, so their `hook_normalized` carries no gain; the post-norms `ln1_post` and
//! `ln2_post` keep theirs, which is applied after their `hook_normalized`. `hook_attn_out` and
//! `hook_mlp_out` are the post-normed outputs that join the residual stream; `mlp.hook_out` is
//! the MLP's own output before `ln2_post`.

use anyhow::{Context, Result};
use candle_core::{DType, Tensor};
use candle_nn::VarBuilder;

use super::attention::{hooked_norm, select_positions, KvCache, Scores, Step};
use super::config::Gemma2Config;
use super::decoder::{Activation, AttentionShape, GatedMlp, Rotary, SelfAttention};
use super::linear::{Embedding, Linear};
use super::pointwise::scale_rows;
use super::{Input, Output};
use crate::hooks::{HookPoint, Hooks};

struct Block {
    /// Norm gains `1 + w` (f32).
    attn_norm: Tensor,
    attn: SelfAttention,
    attn_post_norm: Tensor,
    mlp_norm: Tensor,
    mlp: GatedMlp,
    mlp_post_norm: Tensor,
    sliding: bool,
}

/// A Gemma-2 model with hook points.
pub struct Gemma2 {
    pub config: Gemma2Config,
    /// Token embeddings in the weight dtype, unscaled (the rows of the unembedding when tied).
    embed: Embedding,
    blocks: Vec<Block>,
    final_norm: Tensor,
    lm_head: Linear,
    rotary: Rotary,
}

impl Gemma2 {
    /// Loads HF-named weights: matrices and embeddings in `dtype`, norm gains (1 + w) in f32.
    pub fn load(config: Gemma2Config, vb: VarBuilder, dtype: DType) -> Result<Self> {
        let c = &config;
        let d = c.hidden_size;
        let vb = vb.to_dtype(DType::F32);
        let w = vb.to_dtype(dtype);
        let gain = |vb: &VarBuilder, name: &str| -> Result<Tensor> { Ok((vb.get(d, name)? + 1.0)?) };
        let embed = w.get((c.vocab_size, d), "model.embed_tokens.weight")?;
        let shape = AttentionShape { d_model: d, heads: c.num_attention_heads, kv_heads: c.num_key_value_heads, head_dim: c.head_dim };
        let scores = Scores {
            scale: c.query_pre_attn_scalar.powf(-0.5) as f32,
            softcap: c.attn_logit_softcapping.map(|s| s as f32),
        };
        let mut blocks = Vec::with_capacity(c.num_hidden_layers);
        for (i, &sliding) in c.sliding_layers.iter().enumerate() {
            let b = vb.pp(format!("model.layers.{i}"));
            blocks.push(Block {
                attn_norm: gain(&b, "input_layernorm.weight")?,
                attn: SelfAttention::load(&b.pp("self_attn"), dtype, shape, None, scores)?,
                attn_post_norm: gain(&b, "post_attention_layernorm.weight")?,
                mlp_norm: gain(&b, "pre_feedforward_layernorm.weight")?,
                mlp: GatedMlp::load(&b.pp("mlp"), dtype, d, c.intermediate_size, Activation::GeluTanh)?,
                mlp_post_norm: gain(&b, "post_feedforward_layernorm.weight")?,
                sliding,
            });
        }
        let final_norm = gain(&vb, "model.norm.weight")?;
        let rotary =
            Rotary::new(c.head_dim, c.rope_theta, c.max_position_embeddings, None, vb.device()).context("building rotary tables")?;
        let (embed, lm_head) = Embedding::with_head(embed, &w, c.tie_word_embeddings, c.vocab_size, d)?;
        Ok(Self { config, embed, blocks, final_norm, lm_head, rotary })
    }

    /// The window of the sliding layers, if any layer slides.
    pub fn sliding_window(&self) -> Option<usize> {
        self.config.sliding_layers.contains(&true).then_some(self.config.sliding_window)
    }

    /// Runs the blocks from `input` to `output` (see [`Input`]), appending to `cache`. `step` must have
    /// been begun with [`Gemma2::sliding_window`].
    pub fn forward(
        &self,
        input: Input,
        step: &Step,
        cache: &mut KvCache,
        hooks: &mut Hooks,
        output: Output,
    ) -> Result<Tensor> {
        let c = &self.config;
        let (b, t, d) = (step.batch, step.seq, c.hidden_size);
        let eps = c.rms_norm_eps;
        let rope = self.rotary.at(step)?;

        // transformers multiplies by sqrt(hidden_size) cast to the activations' dtype (f32 here).
        let (first, mut x) = match input {
            Input::Tokens(tokens) => {
                let x = self.embed.lookup(&self.lm_head, tokens)?.reshape((b, t, d))?;
                (0, hooks.visit(HookPoint::Embed, (x * (d as f32).sqrt() as f64)?)?)
            }
            Input::Resid(l, x) => (l, x),
        };
        for (l, blk) in self.blocks.iter().enumerate().take(output.end(self.blocks.len())).skip(first) {
            x = hooks.visit(HookPoint::ResidPre(l), x)?;
            // Attention, then its post-norm.
            let normed = hooked_norm(hooks, &x, eps, false, HookPoint::Ln1Scale(l), HookPoint::Ln1Normalized(l))?;
            let mask = match (blk.sliding, &step.window_mask) {
                (false, _) => &step.mask,
                (true, Some(m)) => m,
                (true, None) => anyhow::bail!("Gemma-2 step begun without its sliding window"),
            };
            let attn = blk.attn.forward(&scale_rows(&normed, false, &blk.attn_norm, None)?, &rope, cache, l, mask, step.real.as_deref())?;
            let normed = hooked_norm(hooks, &attn, eps, false, HookPoint::Ln1PostScale(l), HookPoint::Ln1PostNormalized(l))?;
            let attn_out = hooks.visit(HookPoint::AttnOut(l), scale_rows(&normed, false, &blk.attn_post_norm, None)?)?;
            x = hooks.visit(HookPoint::ResidMid(l), (x + attn_out)?)?;
            // MLP, then its post-norm.
            let normed = hooked_norm(hooks, &x, eps, false, HookPoint::Ln2Scale(l), HookPoint::Ln2Normalized(l))?;
            let h = hooks.visit(HookPoint::MlpIn(l), scale_rows(&normed, false, &blk.mlp_norm, None)?)?;
            let mlp = blk.mlp.forward(hooks, l, &h, step.real.as_deref())?;
            let mlp = hooks.visit(HookPoint::MlpHookOut(l), mlp)?;
            let normed = hooked_norm(hooks, &mlp, eps, false, HookPoint::Ln2PostScale(l), HookPoint::Ln2PostNormalized(l))?;
            let mlp_out = hooks.visit(HookPoint::MlpOut(l), scale_rows(&normed, false, &blk.mlp_post_norm, None)?)?;
            x = hooks.visit(HookPoint::ResidPost(l), (x + mlp_out)?)?;
        }
        let Output::Logits(logits_at) = output else { return Ok(x) };
        let x = select_positions(x, logits_at)?;
        let normed = hooked_norm(hooks, &x, eps, false, HookPoint::LnFinalScale, HookPoint::LnFinalNormalized)?;
        let logits = self.lm_head.forward(&scale_rows(&normed, false, &self.final_norm, None)?, None)?;
        Ok(match c.final_logit_softcapping {
            Some(cap) => ((logits / cap)?.tanh()? * cap)?,
            None => logits,
        })
    }
}
