//! The Llama family (Llama 2/3.x, SmolLM, TinyLlama, llama2.c checkpoints) and Qwen3, with hook
//! points. Qwen3 is Llama with an RMSNorm over each head's q and k before RoPE.
//!
//! Weights stay as Hugging Face stores them; the hook values are those of TransformerLens's
//! processed model: for RMSNorm, `fold_ln` only moves the norm's gain into the next weights, so
//! `ln*.hook_normalized` is `x / rms(x)` and the gain is applied after the hook.

use anyhow::{Context, Result};
use candle_core::{DType, Tensor};
use candle_nn::VarBuilder;

use super::attention::{hooked_norm, select_positions, KvCache, Scores, Step};
use super::config::{LlamaConfig, LlamaFamily};
use super::decoder::{Activation, AttentionShape, GatedMlp, Rotary, SelfAttention};
use super::linear::{Embedding, Linear};
use super::pointwise::scale_rows;
use super::{Input, Output};
use crate::hooks::{HookPoint, Hooks};

struct Block {
    attn_norm: Tensor,
    attn: SelfAttention,
    mlp_norm: Tensor,
    mlp: GatedMlp,
}

/// A Llama (or Qwen3) model with hook points.
pub struct Llama {
    pub config: LlamaConfig,
    /// Token embeddings in the weight dtype (or the rows of a tied unembedding).
    embed: Embedding,
    blocks: Vec<Block>,
    final_norm: Tensor,
    lm_head: Linear,
    rotary: Rotary,
}

impl Llama {
    /// Loads HF-named weights (`model.layers.N.self_attn.q_proj.weight`, ...): matrices and
    /// embeddings in `dtype`, norm gains in f32.
    pub fn load(config: LlamaConfig, vb: VarBuilder, dtype: DType) -> Result<Self> {
        let c = &config;
        let d = c.hidden_size;
        let vb = vb.to_dtype(DType::F32);
        let w = vb.to_dtype(dtype);
        let embed = w.get((c.vocab_size, d), "model.embed_tokens.weight")?;
        let shape = AttentionShape { d_model: d, heads: c.num_attention_heads, kv_heads: c.num_key_value_heads, head_dim: c.head_dim };
        let qk_norm = (c.family == LlamaFamily::Qwen3).then_some(c.rms_norm_eps);
        let mut blocks = Vec::with_capacity(c.num_hidden_layers);
        for i in 0..c.num_hidden_layers {
            let b = vb.pp(format!("model.layers.{i}"));
            blocks.push(Block {
                attn_norm: b.get(d, "input_layernorm.weight")?,
                attn: SelfAttention::load(&b.pp("self_attn"), dtype, shape, qk_norm, Scores::standard(c.head_dim))?,
                mlp_norm: b.get(d, "post_attention_layernorm.weight")?,
                mlp: GatedMlp::load(&b.pp("mlp"), dtype, d, c.intermediate_size, Activation::Silu)?,
            });
        }
        let final_norm = vb.get(d, "model.norm.weight")?;
        let rotary = Rotary::new(c.head_dim, c.rope_theta, c.max_position_embeddings, c.rope_scaling.as_ref(), vb.device())
            .context("building rotary tables")?;
        let (embed, lm_head) = Embedding::with_head(embed, &w, c.tie_word_embeddings, c.vocab_size, d)?;
        Ok(Self { config, embed, blocks, final_norm, lm_head, rotary })
    }

    /// Runs the blocks from `input` to `output` (see [`Input`]), appending to `cache`.
    pub fn forward(
        &self,
        input: Input,
        step: &Step,
        cache: &mut KvCache,
        hooks: &mut Hooks,
        output: Output,
    ) -> Result<Tensor> {
        let c = &self.config;
        let (b, t) = (step.batch, step.seq);
        let eps = c.rms_norm_eps;
        let rope = self.rotary.at(step)?;

        let (first, mut x) = match input {
            Input::Tokens(tokens) => (0, hooks.visit(HookPoint::Embed, self.embed.lookup(&self.lm_head, tokens)?.reshape((b, t, c.hidden_size))?)?),
            Input::Resid(l, x) => (l, x),
        };
        for (l, blk) in self.blocks.iter().enumerate().take(output.end(self.blocks.len())).skip(first) {
            x = hooks.visit(HookPoint::ResidPre(l), x)?;
            // Attention.
            let normed = hooked_norm(hooks, &x, eps, false, HookPoint::Ln1Scale(l), HookPoint::Ln1Normalized(l))?;
            let attn = blk.attn.forward(&scale_rows(&normed, false, &blk.attn_norm, None)?, &rope, cache, l, &step.mask, step.real.as_deref())?;
            let attn_out = hooks.visit(HookPoint::AttnOut(l), attn)?;
            x = hooks.visit(HookPoint::ResidMid(l), (x + attn_out)?)?;
            // MLP.
            let normed = hooked_norm(hooks, &x, eps, false, HookPoint::Ln2Scale(l), HookPoint::Ln2Normalized(l))?;
            let h = hooks.visit(HookPoint::MlpIn(l), scale_rows(&normed, false, &blk.mlp_norm, None)?)?;
            let mlp_out = blk.mlp.forward(hooks, l, &h, step.real.as_deref())?;
            let mlp_out = hooks.visit(HookPoint::MlpHookOut(l), mlp_out)?;
            let mlp_out = hooks.visit(HookPoint::MlpOut(l), mlp_out)?;
            x = hooks.visit(HookPoint::ResidPost(l), (x + mlp_out)?)?;
        }
        let Output::Logits(logits_at) = output else { return Ok(x) };
        let x = select_positions(x, logits_at)?;
        let normed = hooked_norm(hooks, &x, eps, false, HookPoint::LnFinalScale, HookPoint::LnFinalNormalized)?;
        let h = scale_rows(&normed, false, &self.final_norm, None)?;
        self.lm_head.forward(&h, None)
    }
}
