//! `neurosteer bench`: prefill and decode throughput on random models of real shapes (or on a
//! given model), and the memory-bandwidth floor they should be measured against.

use std::collections::HashMap;
use std::time::Instant;

use anyhow::Result;
use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use serde::Serialize;

use crate::hooks::Hooks;
use crate::model::config::{Gpt2Config, LlamaConfig, ModelConfig};
use crate::model::tokenizer::Tokenizer;
use crate::model::{LogitsAt, Model};

/// A model shape to benchmark with random weights.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Preset {
    /// GPT-2 small: 12 layers, d 768, vocab 50,257 (124M parameters).
    Gpt2Small,
    /// A Llama-3.2-1B shape: 16 layers, d 2048, GQA 32/8, vocab 128,256 (1.2B parameters).
    Llama1b,
}

/// One measured configuration.
#[derive(Debug, Clone, Serialize)]
pub struct BenchRow {
    pub model: String,
    pub batch: usize,
    pub prompt_tokens: usize,
    pub new_tokens: usize,
    /// Prefill time for the whole batch, in milliseconds.
    pub prefill_ms: f64,
    /// Median time of one cached decode step (all sequences), in milliseconds.
    pub decode_step_ms: f64,
    /// Generated tokens per second over the batch.
    pub decode_tokens_per_s: f64,
    /// Bytes of weights read per decode step.
    pub weight_bytes: u64,
    /// `weight_bytes / bandwidth`: the fastest a decode step can be, in milliseconds.
    pub floor_ms: f64,
    /// `decode_step_ms / floor_ms` at this batch.
    pub over_floor: f64,
}

/// Everything `bench` measured.
#[derive(Debug, Clone, Serialize)]
pub struct BenchReport {
    /// Measured read bandwidth, GB/s.
    pub bandwidth_gb_s: f64,
    pub threads: usize,
    pub rows: Vec<BenchRow>,
}

/// Builds a model of `preset`'s shape with random weights (std 0.02) in memory.
pub fn random_model(preset: Preset) -> Result<Model> {
    let dev = Device::Cpu;
    let mut t = HashMap::new();
    let mut put = |name: String, shape: &[usize]| -> Result<()> {
        t.insert(name, Tensor::randn(0f32, 0.02, shape, &dev)?);
        Ok(())
    };
    let (config, name) = match preset {
        Preset::Gpt2Small => {
            let c = Gpt2Config {
                n_embd: 768,
                n_layer: 12,
                n_head: 12,
                n_inner: 3072,
                n_positions: 1024,
                vocab_size: 50257,
                layer_norm_epsilon: 1e-5,
                bos_token_id: Some(50256),
                eos_token_ids: vec![50256],
            };
            put("wte.weight".into(), &[c.vocab_size, c.n_embd])?;
            put("wpe.weight".into(), &[c.n_positions, c.n_embd])?;
            put("ln_f.weight".into(), &[c.n_embd])?;
            put("ln_f.bias".into(), &[c.n_embd])?;
            for i in 0..c.n_layer {
                let (d, f) = (c.n_embd, c.n_inner);
                for (n, s) in [
                    ("ln_1.weight", vec![d]), ("ln_1.bias", vec![d]), ("ln_2.weight", vec![d]), ("ln_2.bias", vec![d]),
                    ("attn.c_attn.weight", vec![d, 3 * d]), ("attn.c_attn.bias", vec![3 * d]),
                    ("attn.c_proj.weight", vec![d, d]), ("attn.c_proj.bias", vec![d]),
                    ("mlp.c_fc.weight", vec![d, f]), ("mlp.c_fc.bias", vec![f]),
                    ("mlp.c_proj.weight", vec![f, d]), ("mlp.c_proj.bias", vec![d]),
                ] {
                    put(format!("h.{i}.{n}"), &s)?;
                }
            }
            (ModelConfig::Gpt2(c), "gpt2-small (random)")
        }
        Preset::Llama1b => {
            let c = LlamaConfig {
                hidden_size: 2048,
                intermediate_size: 8192,
                num_hidden_layers: 16,
                num_attention_heads: 32,
                num_key_value_heads: 8,
                head_dim: 64,
                vocab_size: 128256,
                max_position_embeddings: 4096,
                rms_norm_eps: 1e-5,
                rope_theta: 500000.0,
                rope_scaling: None,
                tie_word_embeddings: true,
                bos_token_id: Some(128000),
                eos_token_ids: vec![128001],
            };
            let (d, f, kv) = (c.hidden_size, c.intermediate_size, c.num_key_value_heads * c.head_dim);
            put("model.embed_tokens.weight".into(), &[c.vocab_size, d])?;
            put("model.norm.weight".into(), &[d])?;
            for i in 0..c.num_hidden_layers {
                for (n, s) in [
                    ("input_layernorm.weight", vec![d]), ("post_attention_layernorm.weight", vec![d]),
                    ("self_attn.q_proj.weight", vec![d, d]), ("self_attn.k_proj.weight", vec![kv, d]),
                    ("self_attn.v_proj.weight", vec![kv, d]), ("self_attn.o_proj.weight", vec![d, d]),
                    ("mlp.gate_proj.weight", vec![f, d]), ("mlp.up_proj.weight", vec![f, d]),
                    ("mlp.down_proj.weight", vec![d, f]),
                ] {
                    put(format!("model.layers.{i}.{n}"), &s)?;
                }
            }
            (ModelConfig::Llama(c), "llama-1b (random)")
        }
    };
    let vb = VarBuilder::from_tensors(t, DType::F32, &dev);
    Model::build(name, config, vb, Tokenizer::None)
}

/// Bytes of weights one decode step reads (every matrix once; embeddings only by row).
pub fn weight_bytes(model: &Model) -> u64 {
    let i = &model.info;
    let d = i.d_model as u64;
    let (attn, mlp) = match &model.network {
        crate::model::Network::Gpt2(_) => (4 * d * d, 2 * d * i.d_mlp as u64),
        crate::model::Network::Llama(m) => {
            let c = &m.config;
            let q = (c.num_attention_heads * c.head_dim) as u64;
            let kv = (c.num_key_value_heads * c.head_dim) as u64;
            (2 * d * q + 2 * d * kv, 3 * d * i.d_mlp as u64)
        }
    };
    4 * (i.n_layers as u64 * (attn + mlp) + d * i.vocab_size as u64)
}

/// Measures read bandwidth: every thread sums its share of a 512 MiB buffer with independent
/// lanes (so the adds vectorise and memory, not arithmetic, is the limit); best of 3, in GB/s.
pub fn measure_bandwidth() -> f64 {
    let n: usize = 128 * 1024 * 1024;
    let buf: Vec<f32> = (0..n).map(|i| (i % 7) as f32).collect();
    let threads = candle_core::utils::get_num_threads().max(1);
    let mut best = f64::MAX;
    for _ in 0..3 {
        let t = Instant::now();
        std::thread::scope(|scope| {
            for part in buf.chunks(n.div_ceil(threads)) {
                scope.spawn(move || {
                    let mut lanes = [0f32; 16];
                    for c in part.chunks_exact(16) {
                        for (l, v) in lanes.iter_mut().zip(c) {
                            *l += v;
                        }
                    }
                    std::hint::black_box(lanes);
                });
            }
        });
        best = best.min(t.elapsed().as_secs_f64());
    }
    (n * 4) as f64 / best / 1e9
}

/// Times prefill and `new_tokens` cached decode steps at `batch`.
pub fn measure(model: &Model, batch: usize, prompt_tokens: usize, new_tokens: usize, hooks: &Hooks, bandwidth_gb_s: f64) -> Result<BenchRow> {
    let vocab = model.info.vocab_size as u32;
    let tokens: Vec<Vec<u32>> =
        (0..batch).map(|b| (0..prompt_tokens).map(|i| ((i * 7919 + b * 104729) as u32) % vocab).collect()).collect();
    let valid = vec![vec![true; prompt_tokens]; batch];
    let mut hooks = hooks.clone();
    let mut cache = model.new_cache(batch);
    let t = Instant::now();
    let mut logits = model.forward(&tokens, &valid, &mut cache, &mut hooks, LogitsAt::Last)?;
    let prefill_ms = t.elapsed().as_secs_f64() * 1e3;
    let mut steps = Vec::with_capacity(new_tokens);
    for _ in 0..new_tokens {
        let next: Vec<Vec<u32>> = crate::generate::argmax(&logits)?.into_iter().map(|t| vec![t]).collect();
        let t = Instant::now();
        logits = model.forward(&next, &vec![vec![true]; batch], &mut cache, &mut hooks, LogitsAt::Last)?;
        steps.push(t.elapsed().as_secs_f64() * 1e3);
    }
    steps.sort_by(|a, b| a.total_cmp(b));
    let decode_step_ms = steps.get(steps.len() / 2).copied().unwrap_or(f64::NAN);
    let wb = weight_bytes(model);
    let floor_ms = wb as f64 / (bandwidth_gb_s * 1e9) * 1e3;
    Ok(BenchRow {
        model: model.info.source.clone(),
        batch,
        prompt_tokens,
        new_tokens,
        prefill_ms,
        decode_step_ms,
        decode_tokens_per_s: batch as f64 / decode_step_ms * 1e3,
        weight_bytes: wb,
        floor_ms,
        over_floor: decode_step_ms / floor_ms,
    })
}

/// A random transcoder for `model`'s `layer` with `d_sae` features, about 2% of which fire on
/// a typical token (a bias of −2σ), to time steering.
pub fn random_transcoder(model: &Model, layer: usize, d_sae: usize) -> Result<crate::transcoder::Transcoder> {
    use crate::transcoder::{Transcoder, TranscoderMeta};
    let dev = Device::Cpu;
    let d = model.info.d_model;
    let w_enc = Tensor::randn(0f32, 1.0 / (d as f32).sqrt(), (d, d_sae), &dev)?;
    Ok(Transcoder {
        meta: TranscoderMeta {
            layer,
            hook_in: crate::hooks::HookPoint::Ln2Normalized(layer).to_string(),
            hook_out: crate::hooks::HookPoint::MlpOut(layer).to_string(),
            d_in: d,
            d_sae,
            d_out: d,
            format: "neurosteer".into(),
            model_name: None,
            extra: Default::default(),
        },
        w_enc,
        b_enc: Tensor::full(-2.0f32, d_sae, &dev)?,
        w_dec: Tensor::randn(0f32, 0.02, (d_sae, d), &dev)?,
        b_dec_in: Tensor::zeros(d, DType::F32, &dev)?,
        b_dec_out: Tensor::zeros(d, DType::F32, &dev)?,
        threshold: None,
        w_skip: None,
        log_frequency: None,
    })
}
