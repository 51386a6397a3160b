//! `neurosteer bench`: prefill and decode throughput on random models of real shapes (or on a
//! given model), against the floors they should be measured by: the memory-bandwidth floor
//! ((weight bytes + the KV cache's bytes) read per step / measured bandwidth) and the compute
//! floor (matrix flops per step / measured peak multiply-add throughput).

use std::collections::HashMap;
use std::time::Instant;

use anyhow::Result;
use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use rayon::prelude::*;
use serde::Serialize;

use crate::hooks::Hooks;
use crate::model::config::{Gpt2Config, LlamaConfig, LlamaFamily, ModelConfig};
use crate::model::tokenizer::Tokenizer;
use crate::model::{LogitsAt, Model, Network};

/// A model shape to benchmark with random weights.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Preset {
    /// GPT-2 small: 12 layers, d 768, vocab 50,257 (124M parameters).
    Gpt2Small,
    /// Llama-3.2-1B: 16 layers, d 2048, GQA 32/8, tied embeddings, vocab 128,256 (1.2B parameters).
    #[value(name = "llama-3.2-1b")]
    Llama32_1b,
    /// Llama-3.1-8B: 32 layers, d 4096, GQA 32/8, d_mlp 14,336, vocab 128,256 (8.0B parameters).
    #[value(name = "llama-3.1-8b")]
    Llama31_8b,
}

/// One measured configuration (see [`measure_rows`]: its decode steps alternate with the other
/// rows' and with bandwidth probes).
#[derive(Debug, Clone, Serialize)]
pub struct BenchRow {
    pub model: String,
    /// The weights' dtype.
    pub dtype: String,
    pub batch: usize,
    pub prompt_tokens: usize,
    pub new_tokens: usize,
    /// Prefill time for the whole batch, in milliseconds.
    pub prefill_ms: f64,
    /// Prompt tokens per second in the prefill.
    pub prefill_tokens_per_s: f64,
    /// Median time of one cached decode step (all sequences), in milliseconds.
    pub decode_step_ms: f64,
    /// Generated tokens per second over the batch.
    pub decode_tokens_per_s: f64,
    /// Bytes of weights read per decode step.
    pub weight_bytes: u64,
    /// Bytes of the KV cache (keys and values of every cached position) after the middle decode
    /// step, which its attention reads (at most: sliding-window layers read fewer).
    pub kv_bytes: u64,
    /// Read bandwidth, GB/s: the median of the probes taken between the steps.
    pub bandwidth_gb_s: f64,
    /// `(weight_bytes + kv_bytes) / bandwidth_gb_s`: the fastest a decode step can read its
    /// weights and its KV cache, in ms.
    pub floor_ms: f64,
    /// Matrix flops of one decode step / peak FMA throughput, in ms (null where not measured).
    pub compute_floor_ms: Option<f64>,
    /// Each step over the larger of its floors (the bandwidth floor at its cycle's probed
    /// bandwidth, the compute floor): the median over steps.
    pub over_floor: f64,
    /// Decode tokens/s over unsteered batch 1's, each step against batch 1's step of the same
    /// cycle: the median over steps (null for a steered row, or when batch 1 is not measured).
    pub vs_batch1: Option<f64>,
    /// A steered row's step over the unsteered step at its batch size in the same cycle, minus 1:
    /// the median over steps (null for an unsteered row).
    pub steer_overhead: Option<f64>,
    /// A row of a model in another dtype (`--also-dtype`): its step over the same row's step in
    /// the first dtype, in the same cycle: the median over steps (null for the first dtype).
    pub vs_dtype: Option<f64>,
    /// The process's peak resident memory so far once this row is prefilled, GiB: every model
    /// timed together and every earlier row's cache included (null where the system does not
    /// say).
    pub peak_rss_gib: Option<f64>,
    /// Every decode step's time, ms, in order.
    pub steps_ms: Vec<f64>,
    /// The bandwidth probed at the start of each cycle of steps, GB/s (on a GPU, one measurement
    /// repeated).
    pub probes_gb_s: Vec<f64>,
}

/// A timed run of the original experiment's shape: `prompts` prompts of `prompt_tokens` tokens,
/// `new_tokens` greedy tokens each, in batches of `batch`, under each configuration of `steer`'s
/// default (`Base,Original=1.0,Suppressed=0.5,Strengthen=2.0`, delta mode) with a transcoder at
/// `layer` scaling every tenth of its features. As in `steer`, a configuration that is another by
/// construction (strength 1 is the base model) is not generated again.
#[derive(Debug, Clone, Serialize)]
pub struct ExperimentTiming {
    pub model: String,
    pub dtype: String,
    pub transcoder_dtype: String,
    pub layer: usize,
    pub d_sae: usize,
    pub features: usize,
    pub prompts: usize,
    pub prompt_tokens: usize,
    pub new_tokens: usize,
    pub batch: usize,
    pub configs: Vec<ConfigTiming>,
    /// Wall time of every configuration together, in seconds.
    pub total_s: f64,
    /// Generated tokens per second over the whole run (configurations not generated count as 0).
    pub tokens_per_s: f64,
    pub peak_rss_gib: Option<f64>,
}

/// One configuration of an [`ExperimentTiming`].
#[derive(Debug, Clone, Serialize)]
pub struct ConfigTiming {
    pub name: String,
    /// `null` for the unsteered base model.
    pub strength: Option<f64>,
    pub seconds: f64,
    /// The configuration this one equals by construction (not generated again).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub same_as: Option<String>,
}

/// Times the original experiment's shape (see [`ExperimentTiming`]) with `tc` on `model`.
pub fn time_experiment(
    model: &Model,
    tc: std::sync::Arc<crate::transcoder::Transcoder>,
    prompts: usize,
    prompt_tokens: usize,
    new_tokens: usize,
    batch: usize,
) -> Result<ExperimentTiming> {
    use crate::steer::{identical_configs, parse_configs, DEFAULT_CONFIGS};
    use crate::transcoder::splice::{SteerMode, Steering};
    let vocab = model.info.vocab_size as u32;
    let ids: Vec<Vec<u32>> =
        (0..prompts).map(|b| (0..prompt_tokens).map(|i| ((i * 7919 + b * 104729 + 17) as u32) % vocab).collect()).collect();
    let opts = crate::generate::GenerateOptions { max_new_tokens: new_tokens, batch_size: batch, stop_at_eos: false, truncate_left: false, feed_last: false };
    let features: Vec<usize> = (0..tc.meta.d_sae).step_by(10).collect();
    let configs = parse_configs(DEFAULT_CONFIGS)?;
    let identical = identical_configs(&configs, SteerMode::Delta);
    let mut timings = Vec::new();
    let start = Instant::now();
    for c in &configs {
        let same_as = identical.get(&c.name).cloned();
        let t = Instant::now();
        if same_as.is_none() {
            let mut hooks = Hooks::none();
            if let Some(s) = c.strength {
                hooks.edit(std::sync::Arc::new(Steering::new(tc.clone(), features.clone(), s, SteerMode::Delta)?));
            }
            crate::generate::generate(model, &ids, &opts, &hooks, |_| Ok(()))?;
            model.device.synchronize()?;
        }
        let seconds = t.elapsed().as_secs_f64();
        eprintln!("  {}: {seconds:.1} s{}", c.name, same_as.as_ref().map_or(String::new(), |s| format!(" (same as {s})")));
        timings.push(ConfigTiming { name: c.name.clone(), strength: c.strength, seconds, same_as });
    }
    let total_s = start.elapsed().as_secs_f64();
    let generated = timings.iter().filter(|t| t.same_as.is_none()).count() * prompts * new_tokens;
    Ok(ExperimentTiming {
        model: model.info.source.clone(),
        dtype: model.dtype.as_str().to_string(),
        transcoder_dtype: tc.w_enc.dtype().as_str().to_string(),
        layer: tc.meta.layer,
        d_sae: tc.meta.d_sae,
        features: features.len(),
        prompts,
        prompt_tokens,
        new_tokens,
        batch,
        configs: timings,
        total_s,
        tokens_per_s: generated as f64 / total_s,
        peak_rss_gib: peak_rss_gib(),
    })
}

/// Everything `bench` measured.
#[derive(Debug, Clone, Serialize)]
pub struct BenchReport {
    /// Measured peak multiply-add throughput (CPU), GFLOP/s.
    pub peak_gflops: Option<f64>,
    /// The CPU kernels' instruction set.
    pub isa: String,
    pub threads: usize,
    pub rows: Vec<BenchRow>,
    /// `--experiment`: the original experiment's shape, timed per model.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub experiments: Vec<ExperimentTiming>,
}

/// A config for `preset`.
pub fn preset_config(preset: Preset) -> (ModelConfig, &'static str) {
    let llama = |hidden_size, intermediate_size, num_hidden_layers, tie_word_embeddings| LlamaConfig {
        family: LlamaFamily::Llama,
        hidden_size,
        intermediate_size,
        num_hidden_layers,
        num_attention_heads: 32,
        num_key_value_heads: 8,
        head_dim: hidden_size / 32,
        vocab_size: 128256,
        max_position_embeddings: 4096,
        rms_norm_eps: 1e-5,
        rope_theta: 500000.0,
        rope_scaling: None,
        tie_word_embeddings,
        bos_token_id: Some(128000),
        eos_token_ids: vec![128001],
    };
    match preset {
        Preset::Gpt2Small => (
            ModelConfig::Gpt2(Gpt2Config {
                n_embd: 768,
                n_layer: 12,
                n_head: 12,
                n_inner: 3072,
                n_positions: 1024,
                vocab_size: 50257,
                layer_norm_epsilon: 1e-5,
                bos_token_id: Some(50256),
                eos_token_ids: vec![50256],
            }),
            "gpt2-small (random)",
        ),
        Preset::Llama32_1b => (ModelConfig::Llama(llama(2048, 8192, 16, true)), "llama-3.2-1b (random)"),
        Preset::Llama31_8b => (ModelConfig::Llama(llama(4096, 14336, 32, false)), "llama-3.1-8b (random)"),
    }
}

/// The weight names and shapes of a config, with whether each is a matrix (held in the weight
/// dtype) or a norm/bias vector (f32).
fn weight_shapes(config: &ModelConfig) -> Vec<(String, Vec<usize>)> {
    let mut v: Vec<(String, Vec<usize>)> = Vec::new();
    match config {
        ModelConfig::Gpt2(c) => {
            let (d, f) = (c.n_embd, c.n_inner);
            v.push(("wte.weight".into(), vec![c.vocab_size, d]));
            v.push(("wpe.weight".into(), vec![c.n_positions, d]));
            v.push(("ln_f.weight".into(), vec![d]));
            v.push(("ln_f.bias".into(), vec![d]));
            for i in 0..c.n_layer {
                for (n, s) in [
                    ("ln_1.weight", vec![d]), ("ln_1.bias", vec![d]), ("ln_2.weight", vec![d]), ("ln_2.bias", vec![d]),
                    ("attn.c_attn.weight", vec![d, 3 * d]), ("attn.c_attn.bias", vec![3 * d]),
                    ("attn.c_proj.weight", vec![d, d]), ("attn.c_proj.bias", vec![d]),
                    ("mlp.c_fc.weight", vec![d, f]), ("mlp.c_fc.bias", vec![f]),
                    ("mlp.c_proj.weight", vec![f, d]), ("mlp.c_proj.bias", vec![d]),
                ] {
                    v.push((format!("h.{i}.{n}"), s));
                }
            }
        }
        ModelConfig::Gemma2(_) => unreachable!("no Gemma-2 bench preset"),
        ModelConfig::Llama(c) => {
            let (d, f) = (c.hidden_size, c.intermediate_size);
            let (q, kv) = (c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim);
            v.push(("model.embed_tokens.weight".into(), vec![c.vocab_size, d]));
            if !c.tie_word_embeddings {
                v.push(("lm_head.weight".into(), vec![c.vocab_size, d]));
            }
            v.push(("model.norm.weight".into(), vec![d]));
            for i in 0..c.num_hidden_layers {
                for (n, s) in [
                    ("input_layernorm.weight", vec![d]), ("post_attention_layernorm.weight", vec![d]),
                    ("self_attn.q_proj.weight", vec![q, d]), ("self_attn.k_proj.weight", vec![kv, d]),
                    ("self_attn.v_proj.weight", vec![kv, d]), ("self_attn.o_proj.weight", vec![d, q]),
                    ("mlp.gate_proj.weight", vec![f, d]), ("mlp.up_proj.weight", vec![f, d]),
                    ("mlp.down_proj.weight", vec![d, f]),
                ] {
                    v.push((format!("model.layers.{i}.{n}"), s));
                }
            }
        }
    }
    v
}

/// Uniform random values with standard deviation `std` (seeded, generated on every thread),
/// straight into `dtype`: a model of several GB is never built in f32 first.
fn random_tensor(shape: &[usize], std: f32, dtype: DType, seed: u64) -> Result<Tensor> {
    let n: usize = shape.iter().product();
    let half_width = std * 3f32.sqrt();
    // Chunk `c` of 65,536 values from its own xorshift stream, converted by `cvt`, in a buffer
    // filled in parallel (allocated as a checkpoint's tensors are read).
    fn filled<T: bytemuck::Zeroable + Clone + Send + candle_core::WithDType>(n: usize, shape: &[usize], seed: u64, half_width: f32, cvt: impl Fn(f32) -> T + Sync) -> Result<Tensor> {
        let mut v = crate::model::zeroed_buffer::<T>(n);
        v.par_chunks_mut(1 << 16).enumerate().for_each(|(c, dst)| {
            let mut s = (seed ^ (c as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15)) | 1;
            for d in dst {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                *d = cvt(((s >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * half_width);
            }
        });
        Ok(Tensor::from_vec(v, shape, &Device::Cpu)?)
    }
    match dtype {
        DType::BF16 => filled(n, shape, seed, half_width, half::bf16::from_f32),
        DType::F16 => filled(n, shape, seed, half_width, half::f16::from_f32),
        _ => filled(n, shape, seed, half_width, |v| v),
    }
}

/// Random weights made when the model asks for them (as a checkpoint is read tensor by tensor),
/// so that building holds one copy: `name -> (shape, seed)`, matrices in `dtype`, the rest f32.
struct RandomWeights {
    shapes: HashMap<String, (Vec<usize>, u64)>,
    dtype: DType,
}

impl candle_nn::var_builder::SimpleBackend for RandomWeights {
    fn get(&self, s: candle_core::Shape, name: &str, _: candle_nn::Init, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        crate::model::weights::expect_shape(self.get_unchecked(name, dtype, dev)?, &s, name)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        let Some((shape, seed)) = self.shapes.get(name) else {
            return Err(candle_core::Error::Msg(format!("no tensor {name} in the preset")));
        };
        let stored = if shape.len() == 2 { self.dtype } else { DType::F32 };
        let t = random_tensor(shape, 0.02, stored, *seed).map_err(|e| candle_core::Error::Msg(format!("{e:#}")))?;
        t.to_dtype(dtype)?.to_device(dev)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.shapes.contains_key(name)
    }
}

/// Builds a model of `preset`'s shape with random weights (std 0.02) in memory: matrices in
/// `dtype`, norms and biases in f32, on `device`.
pub fn random_model(preset: Preset, dtype: DType, device: &Device) -> Result<Model> {
    let (config, name) = preset_config(preset);
    let shapes = weight_shapes(&config).into_iter().enumerate().map(|(i, (name, shape))| (name, (shape, i as u64 + 1))).collect();
    let vb = VarBuilder::from_backend(Box::new(RandomWeights { shapes, dtype }), DType::F32, device.clone());
    Model::build(name, config, vb, dtype, Tokenizer::None)
}

/// Matrix parameters one decode step reads (every matrix once; embeddings only by row).
pub fn matrix_params(model: &Model) -> u64 {
    let i = &model.info;
    let d = i.d_model as u64;
    // q, k, v and output projections of grouped-query attention.
    let gqa = |heads: usize, kv_heads: usize, head_dim: usize| 2 * d * ((heads + kv_heads) * head_dim) as u64;
    let (attn, mlp, unembed) = match &model.network {
        Network::Gpt2(_) => (4 * d * d, 2 * d * i.d_mlp as u64, d * i.vocab_size as u64),
        Network::Llama(m) => {
            let c = &m.config;
            (gqa(c.num_attention_heads, c.num_key_value_heads, c.head_dim), 3 * d * i.d_mlp as u64, d * i.vocab_size as u64)
        }
        Network::Gemma2(m) => {
            let c = &m.config;
            (gqa(c.num_attention_heads, c.num_key_value_heads, c.head_dim), 3 * d * i.d_mlp as u64, d * i.vocab_size as u64)
        }
    };
    i.n_layers as u64 * (attn + mlp) + unembed
}

/// Bytes of weights one decode step reads.
pub fn weight_bytes(model: &Model) -> u64 {
    matrix_params(model) * model.dtype.size_in_bytes() as u64
}

/// A read-bandwidth probe. On the CPU one call sums a 128 MiB buffer (four times a large L3),
/// every thread its share, with 64 independent lanes (so the adds vectorise and memory, not
/// arithmetic, is the limit): cheap enough to take between decode steps. A GPU's bandwidth does
/// not drift, so it is measured once: the best of 3 copy-scales of 1 GiB (read + write).
pub enum Probe {
    Cpu(Vec<f32>),
    Fixed(f64),
}

impl Probe {
    pub fn new(device: &Device) -> Result<Probe> {
        if device.is_cpu() {
            let n = 32 * 1024 * 1024;
            return Ok(Probe::Cpu((0..n).map(|i| (i % 7) as f32).collect()));
        }
        let n = 256 * 1024 * 1024;
        let x = Tensor::ones(n, DType::F32, device)?;
        let mut best = f64::MAX;
        for _ in 0..3 {
            device.synchronize()?;
            let t = Instant::now();
            let y = x.affine(1.0, 0.0)?;
            device.synchronize()?;
            best = best.min(t.elapsed().as_secs_f64());
            drop(y);
        }
        Ok(Probe::Fixed((2 * n * 4) as f64 / best / 1e9))
    }

    /// The read bandwidth now, GB/s.
    pub fn sample(&self) -> Result<f64> {
        let buf = match self {
            Probe::Fixed(gb_s) => return Ok(*gb_s),
            Probe::Cpu(buf) => buf,
        };
        let threads = rayon::current_num_threads().max(1);
        let t = Instant::now();
        buf.par_chunks(buf.len().div_ceil(threads)).for_each(|part| {
            let mut lanes = [0f32; 64];
            for c in part.chunks_exact(64) {
                for (l, v) in lanes.iter_mut().zip(c) {
                    *l += v;
                }
            }
            std::hint::black_box(lanes);
        });
        Ok((buf.len() * 4) as f64 / t.elapsed().as_secs_f64() / 1e9)
    }
}

/// The process's peak resident set (VmHWM), in GiB, where /proc says.
pub fn peak_rss_gib() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / (1024.0 * 1024.0))
}

/// A configuration to time: one of [`measure_rows`]'s models (its index), a batch size, plain
/// (`steered == None`) or with `hooks` steering it (`steered` names the mode, appended to the
/// model's name).
pub struct RowSpec {
    pub model: usize,
    pub batch: usize,
    pub hooks: Hooks,
    pub steered: Option<String>,
}

/// The median (the mean of the middle two for an even count); NaN for none.
fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

/// A row being timed: its prefilled cache and hooks, the logits its next step starts from.
struct Running {
    cache: crate::model::KvCache,
    hooks: Hooks,
    logits: Tensor,
    prefill_ms: f64,
    peak_rss_gib: Option<f64>,
    steps_ms: Vec<f64>,
    kv_bytes: Vec<u64>,
}

/// Times every spec: each row's prefill (after an untimed one: a process's first pass at a size
/// pays for fresh memory and idle threads), then `new_tokens` cycles, each of which probes the
/// read bandwidth and runs one cached decode step of every row in turn (in reverse order every
/// other cycle). On a machine whose memory speed drifts, rows timed one after another are not
/// comparable; a cycle's steps lie one cycle apart at most, so the ratios between rows (to
/// batch 1, to the unsteered step, to another dtype) and to the floors are taken step by step,
/// within a cycle, and their medians reported. `models` are one
/// model in one or more dtypes (the first is the one others are compared with), all on one device.
pub fn measure_rows(models: &[Model], specs: &[RowSpec], prompt_tokens: usize, new_tokens: usize, peak_gflops: Option<f64>) -> Result<Vec<BenchRow>> {
    let mut rows = Vec::with_capacity(specs.len());
    for s in specs {
        let model = &models[s.model];
        let vocab = model.info.vocab_size as u32;
        let tokens: Vec<Vec<u32>> =
            (0..s.batch).map(|b| (0..prompt_tokens).map(|i| ((i * 7919 + b * 104729) as u32) % vocab).collect()).collect();
        let valid = vec![vec![true; prompt_tokens]; s.batch];
        let mut hooks = s.hooks.clone();
        model.forward(&tokens, &valid, &mut model.new_cache(s.batch, prompt_tokens), &mut hooks, LogitsAt::Last)?;
        let mut cache = model.new_cache(s.batch, prompt_tokens + new_tokens);
        let t = Instant::now();
        let logits = model.forward(&tokens, &valid, &mut cache, &mut hooks, LogitsAt::Last)?;
        model.device.synchronize()?;
        let prefill_ms = t.elapsed().as_secs_f64() * 1e3;
        rows.push(Running { cache, hooks, logits, prefill_ms, peak_rss_gib: peak_rss_gib(), steps_ms: Vec::new(), kv_bytes: Vec::new() });
    }
    let device = &models[0].device;
    let probe = Probe::new(device)?;
    let mut probes = Vec::with_capacity(new_tokens);
    for cycle in 0..new_tokens {
        probes.push(probe.sample()?);
        // Every other cycle in reverse order, so that a drift within a cycle, and the probe's
        // evicting the caches before its first step, fall on every row alike.
        let order: Vec<usize> = if cycle % 2 == 0 { (0..specs.len()).collect() } else { (0..specs.len()).rev().collect() };
        for i in order {
            let (s, r) = (&specs[i], &mut rows[i]);
            let next: Vec<Vec<u32>> = crate::generate::argmax(&r.logits)?.into_iter().map(|t| vec![t]).collect();
            let t = Instant::now();
            r.logits = models[s.model].forward(&next, &vec![vec![true]; s.batch], &mut r.cache, &mut r.hooks, LogitsAt::Last)?;
            device.synchronize()?;
            r.steps_ms.push(t.elapsed().as_secs_f64() * 1e3);
            r.kv_bytes.push(r.cache.bytes());
        }
    }
    let bandwidth_gb_s = median(probes.clone());
    // The median over steps of `f(step)`.
    let per_step = |f: &dyn Fn(usize) -> f64| median((0..new_tokens).map(f).collect());
    // The row of `model` at `batch`, steered as `steered`.
    let find = |model: usize, batch: usize, steered: Option<&String>| {
        specs.iter().position(|p| p.model == model && p.batch == batch && p.steered.as_ref() == steered)
    };
    Ok(specs
        .iter()
        .zip(&rows)
        .map(|(s, r)| {
            let model = &models[s.model];
            let wb = weight_bytes(model);
            let kv_bytes = r.kv_bytes.get(r.kv_bytes.len() / 2).copied().unwrap_or(0);
            let floor = |bw: f64| (wb + kv_bytes) as f64 / (bw * 1e9) * 1e3;
            let compute_floor_ms = peak_gflops.map(|g| 2.0 * s.batch as f64 * matrix_params(model) as f64 / (g * 1e9) * 1e3);
            let decode_step_ms = median(r.steps_ms.clone());
            let batch1 = find(s.model, 1, None).filter(|_| s.steered.is_none());
            let plain = find(s.model, s.batch, None).filter(|_| s.steered.is_some());
            let first_dtype = find(0, s.batch, s.steered.as_ref()).filter(|_| s.model > 0);
            // The median over steps of this row's step over row `o`'s.
            let ratio = |o: usize| per_step(&|t| r.steps_ms[t] / rows[o].steps_ms[t]);
            BenchRow {
                model: match &s.steered {
                    Some(mode) => format!("{} +{mode}", model.info.source),
                    None => model.info.source.clone(),
                },
                dtype: model.dtype.as_str().to_string(),
                batch: s.batch,
                prompt_tokens,
                new_tokens,
                prefill_ms: r.prefill_ms,
                prefill_tokens_per_s: (s.batch * prompt_tokens) as f64 / r.prefill_ms * 1e3,
                decode_step_ms,
                decode_tokens_per_s: s.batch as f64 / decode_step_ms * 1e3,
                weight_bytes: wb,
                kv_bytes,
                bandwidth_gb_s,
                floor_ms: floor(bandwidth_gb_s),
                compute_floor_ms,
                over_floor: per_step(&|t| r.steps_ms[t] / floor(probes[t]).max(compute_floor_ms.unwrap_or(0.0))),
                vs_batch1: batch1.map(|b| per_step(&|t| s.batch as f64 * rows[b].steps_ms[t] / r.steps_ms[t])),
                steer_overhead: plain.map(|p| ratio(p) - 1.0),
                vs_dtype: first_dtype.map(ratio),
                peak_rss_gib: r.peak_rss_gib,
                steps_ms: r.steps_ms.clone(),
                probes_gb_s: probes.clone(),
            }
        })
        .collect())
}

/// A random transcoder for `model`'s `layer` with `d_sae` features, about 2% of which fire on
/// a typical token (a bias of −2σ), to time steering.
pub fn random_transcoder(model: &Model, layer: usize, d_sae: usize) -> Result<crate::transcoder::Transcoder> {
    use crate::transcoder::{Transcoder, TranscoderMeta};
    let dev = &model.device;
    let d = model.info.d_model;
    let w_enc = (random_tensor(&[d, d_sae], 1.0 / (d as f32).sqrt(), DType::F32, 101)?).to_device(dev)?;
    Ok(Transcoder {
        meta: TranscoderMeta {
            layer,
            hook_in: crate::hooks::HookPoint::Ln2Normalized(layer).to_string(),
            hook_out: crate::hooks::HookPoint::MlpOut(layer).to_string(),
            d_in: d,
            d_sae,
            d_out: d,
            format: "neurosteer".into(),
            activation: Default::default(),
            model_name: None,
            extra: Default::default(),
        },
        w_enc,
        b_enc: Tensor::full(-2.0f32, d_sae, dev)?,
        w_dec: random_tensor(&[d_sae, d], 0.02, DType::F32, 102)?.to_device(dev)?,
        w_dec_next: Vec::new(),
        b_dec_in: Tensor::zeros(d, DType::F32, dev)?,
        b_dec_out: Tensor::zeros(d, DType::F32, dev)?,
        threshold: None,
        w_skip: None,
        log_frequency: None,
    })
}
