//! Loading and running language models: Hugging Face folders or hub ids (Llama, Qwen3, Gemma-2,
//! GPT-2) and llama2.c checkpoints, all behind one [`Model`] with TransformerLens hook points.

pub mod attention;
pub mod config;
pub mod decoder;
pub mod gemma2;
pub mod gpt2;
pub mod linear;
pub mod llama;
pub mod llama2c;
pub mod matmul;
pub mod matmul_nn;
pub mod pointwise;
pub mod tokenizer;
pub mod weights;

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use rayon::prelude::*;

pub use attention::KvCache;
use config::ModelConfig;
use gemma2::Gemma2;
use gpt2::Gpt2;
use llama::Llama;
use tokenizer::{TextCodec, Tokenizer};

use crate::hooks::{HookPoint, Hooks};
use crate::hub::HubRepo;
use weights::SafetensorsFiles;

/// Precision of the weights: `--dtype`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum DTypeChoice {
    /// On a GPU the checkpoint's dtype; on the CPU f32 when an f32 copy fits comfortably in the
    /// available memory (at most half of it), else the checkpoint's dtype.
    #[default]
    Auto,
    F32,
    Bf16,
    F16,
}

impl DTypeChoice {
    /// The dtype to hold `params` weights stored as `stored` on `device`.
    pub fn resolve(self, stored: DType, params: u64, device: &Device) -> DType {
        match self {
            DTypeChoice::F32 => DType::F32,
            DTypeChoice::Bf16 => DType::BF16,
            DTypeChoice::F16 => DType::F16,
            DTypeChoice::Auto if !device.is_cpu() => stored,
            DTypeChoice::Auto => {
                let fits = available_memory().is_none_or(|avail| params * 4 <= avail / 2);
                if fits || !matches!(stored, DType::BF16 | DType::F16) { DType::F32 } else { stored }
            }
        }
    }
}

/// Precision of a transcoder's weight matrices (encoder and decoders): `--transcoder-dtype`.
/// Biases, thresholds and the skip matrix stay f32, encodes accumulate in f32, and feature
/// activations are f32 whatever the choice.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum TranscoderDType {
    #[default]
    F32,
    /// The dtype of the model's weights.
    Model,
    Bf16,
    F16,
}

impl TranscoderDType {
    /// The dtype for a model whose weights are held in `model`.
    pub fn resolve(self, model: DType) -> DType {
        match self {
            TranscoderDType::F32 => DType::F32,
            TranscoderDType::Model => model,
            TranscoderDType::Bf16 => DType::BF16,
            TranscoderDType::F16 => DType::F16,
        }
    }
}

/// Where a model runs and the precision of its weights and of transcoders loaded for it:
/// `--device`, `--dtype` and `--transcoder-dtype` on the command line, `device`, `dtype` and
/// `transcoder_dtype` in a `run` config.
#[derive(Debug, Clone, clap::Args, serde::Deserialize, serde::Serialize)]
pub struct Placement {
    /// Where to run: cpu, cuda (the first GPU) or cuda:N.
    #[arg(long, default_value_t = Placement::default_device())]
    #[serde(default = "Placement::default_device")]
    pub device: String,
    /// Weight precision: auto, f32, bf16 or f16. Activations, norms, softmax, attention, hook
    /// values and logits stay f32.
    #[arg(long, value_enum, default_value_t = DTypeChoice::Auto)]
    #[serde(default)]
    pub dtype: DTypeChoice,
    /// Precision of transcoder weight matrices: f32, model (the model's dtype), bf16 or f16.
    /// Encodes accumulate in f32 and feature activations are f32.
    #[arg(long, value_enum, default_value_t = TranscoderDType::F32)]
    #[serde(default)]
    pub transcoder_dtype: TranscoderDType,
}

impl Default for Placement {
    fn default() -> Self {
        Self { device: Self::default_device(), dtype: DTypeChoice::Auto, transcoder_dtype: TranscoderDType::F32 }
    }
}

impl Placement {
    pub fn default_device() -> String {
        "cpu".into()
    }

    /// Load options for this placement.
    pub fn load_options(&self, tokenizer: Option<PathBuf>, no_bos: bool) -> Result<LoadOptions> {
        Ok(LoadOptions { tokenizer, no_bos, device: parse_device(&self.device)?, dtype: self.dtype, transcoder_dtype: self.transcoder_dtype })
    }
}

/// Bytes of memory available to new allocations (`MemAvailable`), where the system says.
pub fn available_memory() -> Option<u64> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = info.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// A zeroed buffer of `len` elements for a large array (packed weights, a tensor as read from a
/// checkpoint). Its memory comes zeroed from the allocator (fresh pages, not written). With
/// `NEUROSTEER_HUGE_PAGES=1`, on Linux, it is also advised for transparent huge pages before
/// anything writes it (why only then: `huge_pages_wanted`).
pub fn zeroed_buffer<T: bytemuck::Zeroable + Clone>(len: usize) -> Vec<T> {
    zeroed_buffer_with(len, huge_pages_wanted())
}

/// Whether large buffers ask for transparent huge pages: only when the environment says
/// `NEUROSTEER_HUGE_PAGES=1`. 2 MiB pages make streaming the weights miss the TLB far less often
/// and filling them take 512 times fewer page faults, which pays where memory is already backed
/// (a process run again at once: GPT-2's `generate` 1.13-1.24 s against 1.34-1.42 s, Llama-3.2-1B
/// f32's bench 6.3-8.0 s against 10.7-13.2 s). But a virtual machine whose host takes back free
/// memory (free page reporting, as on the development machine) hands out 2 MiB blocks that the
/// host must back anew as they are cleared, while small pages mostly come from memory still
/// backed: there a first run after other work took 4.1-4.4 s against 1.3-1.5 s for GPT-2, and
/// no less for Llama-3.2-1B or Llama-3.1-8B.
fn huge_pages_wanted() -> bool {
    static WANTED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *WANTED.get_or_init(|| match std::env::var("NEUROSTEER_HUGE_PAGES") {
        Ok(v) if v == "1" => true,
        Ok(v) if v == "0" || v.is_empty() => false,
        Ok(v) => {
            eprintln!("warning: NEUROSTEER_HUGE_PAGES={v:?} is neither 1 nor 0; huge pages stay off");
            false
        }
        Err(_) => false,
    })
}

/// [`zeroed_buffer`], advised for huge pages (on Linux) when `huge`.
fn zeroed_buffer_with<T: bytemuck::Zeroable + Clone>(len: usize, huge: bool) -> Vec<T> {
    let v: Vec<T> = bytemuck::zeroed_vec(len);
    #[cfg(target_os = "linux")]
    if huge {
        const HUGE: usize = 2 << 20;
        let start = v.as_ptr() as usize;
        let (from, to) = (start.next_multiple_of(HUGE), (start + std::mem::size_of_val(v.as_slice())) / HUGE * HUGE);
        if to > from {
            // SAFETY: the range lies inside this vector's allocation; the advice changes how the
            // kernel backs those pages, not what they hold.
            unsafe { libc::madvise(from as *mut libc::c_void, to - from, libc::MADV_HUGEPAGE) };
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = huge;
    v
}

/// Parses `--device`: `cpu`, `cuda` (the first GPU) or `cuda:N`. A device this build lacks, or
/// that is absent, is one clear error.
pub fn parse_device(spec: &str) -> Result<Device> {
    let (kind, ordinal) = match spec.split_once(':') {
        Some((k, n)) => (k, n.parse::<usize>().with_context(|| format!("--device {spec}: `{n}` is not a device number"))?),
        None => (spec, 0),
    };
    match kind {
        "cpu" if ordinal == 0 => Ok(Device::Cpu),
        "cuda" if !candle_core::utils::cuda_is_available() => bail!(
            "--device {spec}: this neurosteer was built without CUDA support (rebuild with `--features cuda`; see the README's \"Devices and precision\")"
        ),
        "cuda" => Device::new_cuda(ordinal).map_err(|e| anyhow::anyhow!("--device {spec}: no usable CUDA GPU ({e})")),
        _ => bail!("--device {spec}: expected cpu, cuda or cuda:N"),
    }
}

/// Which positions get logits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogitsAt {
    /// Every position: `[batch, seq, vocab]`.
    All,
    /// The last position of each sequence: `[batch, 1, vocab]`.
    Last,
}

/// The first blocks of a forward step ([`Model::forward_prefix`]): the step begun, how many
/// blocks ran, and the residual stream entering the next one.
pub struct Prefix {
    step: attention::Step,
    blocks: usize,
    x: Tensor,
}

/// Where a forward pass starts.
pub enum Input<'a> {
    /// Token ids `[batch, seq]` (u32).
    Tokens(&'a Tensor),
    /// The residual stream `[batch, seq, d]` entering block `l`, as a pass that stopped there
    /// returned it (the block's hooks not yet applied).
    Resid(usize, Tensor),
}

/// Where a forward pass stops.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Output {
    /// At the logits.
    Logits(LogitsAt),
    /// Before block `l`, returning the residual stream entering it (its hooks not yet applied).
    Resid(usize),
}

impl Output {
    /// The blocks run are those before this index.
    fn end(self, n_blocks: usize) -> usize {
        match self {
            Output::Logits(_) => n_blocks,
            Output::Resid(l) => l.min(n_blocks),
        }
    }
}

/// The network itself.
pub enum Network {
    /// Llama and Qwen3.
    Llama(Box<Llama>),
    Gemma2(Box<Gemma2>),
    Gpt2(Box<Gpt2>),
}

/// Shapes and special tokens of a loaded model.
#[derive(Debug, Clone)]
pub struct ModelInfo {
    /// Where the model came from (folder, file or hub id).
    pub source: String,
    /// `llama`, `qwen3`, `gemma2` or `gpt2`.
    pub family: &'static str,
    pub n_layers: usize,
    pub d_model: usize,
    pub d_mlp: usize,
    pub vocab_size: usize,
    /// The context length (positions the model was built for).
    pub n_ctx: usize,
    pub bos: Option<u32>,
    pub eos: Vec<u32>,
    /// TransformerLens's `default_prepend_bos`: false for Qwen3, whose text starts without BOS
    /// (an empty text then becomes `[bos]`, as in the references).
    pub prepend_bos: bool,
    /// Whether TransformerLens's logits are centred over the vocabulary (`center_unembed`); off
    /// for models with a final logit soft cap (Gemma-2), which is not shift-invariant.
    pub center_unembed: bool,
}

/// A language model with its tokenizer.
pub struct Model {
    pub network: Network,
    pub codec: TextCodec,
    pub info: ModelInfo,
    pub device: Device,
    /// The dtype the weight matrices are held in (activations are f32).
    pub dtype: DType,
    /// The dtype transcoders loaded for this model hold their weight matrices in.
    pub transcoder_dtype: DType,
}

/// How to load a model.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    /// A tokenizer file to use instead of the model's own (required for llama2.c checkpoints
    /// unless a `tok*.bin` lies beside them).
    pub tokenizer: Option<PathBuf>,
    /// Do not prepend BOS.
    pub no_bos: bool,
    /// Where to run.
    pub device: Device,
    /// Weight precision.
    pub dtype: DTypeChoice,
    /// Precision of transcoders loaded for the model.
    pub transcoder_dtype: TranscoderDType,
}

impl Default for LoadOptions {
    fn default() -> Self {
        Self { tokenizer: None, no_bos: false, device: Device::Cpu, dtype: DTypeChoice::Auto, transcoder_dtype: TranscoderDType::F32 }
    }
}

impl Model {
    /// Loads `spec`: a Hugging Face folder, a llama2.c `.bin` checkpoint, or a hub id.
    pub fn load(spec: &str, options: &LoadOptions) -> Result<Self> {
        let path = Path::new(spec);
        let mut model = if path.is_dir() {
            load_hf_folder(spec, &HfFiles::from_folder(path)?, options)
        } else if path.is_file() {
            load_llama2c(path, options)
        } else if looks_like_hub_id(spec) {
            load_hf_folder(spec, &HfFiles::from_hub(spec)?, options)
        } else {
            bail!("{spec}: no such file or folder, and not a hub id (like `gpt2` or `org/name`)")
        }?;
        model.transcoder_dtype = options.transcoder_dtype.resolve(model.dtype);
        // Say where the model runs unless it is the plain default (f32 on the CPU).
        if !(model.device.is_cpu() && model.dtype == DType::F32) {
            eprintln!(
                "neurosteer: {} on {} with {} weights{}",
                model.info.source,
                device_name(&model.device),
                model.dtype.as_str(),
                if options.dtype == DTypeChoice::Auto { " (chosen by --dtype auto)" } else { "" }
            );
        }
        Ok(model)
    }

    /// Builds a model from a parsed config and its weights (BOS on when the config names one),
    /// holding the weight matrices in `dtype` on `vb`'s device.
    pub fn build(source: &str, config: ModelConfig, vb: VarBuilder, dtype: DType, tokenizer: Tokenizer) -> Result<Self> {
        let vocab = match &config {
            ModelConfig::Llama(c) => c.vocab_size,
            ModelConfig::Gemma2(c) => c.vocab_size,
            ModelConfig::Gpt2(c) => c.vocab_size,
        };
        if let Some((id, piece)) = tokenizer.max_id().filter(|&(id, _)| id as usize >= vocab) {
            bail!("{source}: the tokenizer has token {piece:?} with id {id}, outside the model's vocabulary of {vocab} (a tokenizer of another model?)");
        }
        let device = vb.device().clone();
        let (network, info) = match config {
            ModelConfig::Llama(c) => {
                let info = llama_info(source, &c);
                let m = Llama::load(c, vb, dtype).with_context(|| format!("{source}: bad weights"))?;
                (Network::Llama(Box::new(m)), info)
            }
            ModelConfig::Gemma2(c) => {
                let info = ModelInfo {
                    source: source.to_string(),
                    family: "gemma2",
                    n_layers: c.num_hidden_layers,
                    d_model: c.hidden_size,
                    d_mlp: c.intermediate_size,
                    vocab_size: c.vocab_size,
                    n_ctx: c.max_position_embeddings,
                    bos: c.bos_token_id,
                    eos: c.eos_token_ids.clone(),
                    prepend_bos: true,
                    center_unembed: c.final_logit_softcapping.is_none(),
                };
                let m = Gemma2::load(c, vb, dtype).with_context(|| format!("{source}: bad weights"))?;
                (Network::Gemma2(Box::new(m)), info)
            }
            ModelConfig::Gpt2(c) => {
                let info = ModelInfo {
                    source: source.to_string(),
                    family: "gpt2",
                    n_layers: c.n_layer,
                    d_model: c.n_embd,
                    d_mlp: c.n_inner,
                    vocab_size: c.vocab_size,
                    n_ctx: c.n_positions,
                    bos: c.bos_token_id,
                    eos: c.eos_token_ids.clone(),
                    prepend_bos: true,
                    center_unembed: true,
                };
                let m = Gpt2::load(c, vb, dtype).with_context(|| format!("{source}: bad weights"))?;
                (Network::Gpt2(Box::new(m)), info)
            }
        };
        let codec = TextCodec { tokenizer, bos: None, bos_if_empty: None };
        Ok(Model { network, codec, info, device, dtype, transcoder_dtype: DType::F32 }.with_bos(true))
    }

    /// Turns BOS handling on (TransformerLens's default for the family: BOS prepended, except for
    /// Qwen3, where only an empty text becomes `[bos]`) or off (no BOS at all).
    pub fn with_bos(mut self, on: bool) -> Self {
        let bos = if on { self.info.bos } else { None };
        (self.codec.bos, self.codec.bos_if_empty) = if self.info.prepend_bos { (bos, None) } else { (None, bos) };
        self
    }

    /// TransformerLens's logits from ours: centred over the vocabulary (the last dimension) when
    /// it centres them (`center_unembed`), else as they are.
    pub fn tl_logits(&self, logits: &Tensor) -> Result<Tensor> {
        Ok(if self.info.center_unembed {
            logits.broadcast_sub(&logits.mean_keepdim(candle_core::D::Minus1)?)?
        } else {
            logits.clone()
        })
    }

    /// Whether the model has learned position embeddings (`hook_pos_embed`).
    pub fn has_pos_embed(&self) -> bool {
        matches!(self.network, Network::Gpt2(_))
    }

    /// Whether the blocks have post-attention and post-MLP norms (`ln1_post`, `ln2_post`).
    pub fn has_post_norms(&self) -> bool {
        matches!(self.network, Network::Gemma2(_))
    }

    /// Parses and checks a hook name against this model.
    pub fn hook_point(&self, name: &str) -> Result<HookPoint> {
        HookPoint::parse_for(name, self.info.n_layers, self.has_pos_embed(), self.has_post_norms())
    }

    /// One forward step over `tokens` (`[batch][seq]`, left-padded; `valid` marks real tokens),
    /// continuing `cache`. Returns f32 logits `[batch, seq or 1, vocab]`.
    pub fn forward(
        &self,
        tokens: &[Vec<u32>],
        valid: &[Vec<bool>],
        cache: &mut KvCache,
        hooks: &mut Hooks,
        logits_at: LogitsAt,
    ) -> Result<Tensor> {
        let (step, ids) = self.begin_step(tokens, valid, cache)?;
        self.run(Input::Tokens(&ids), &step, cache, hooks, Output::Logits(logits_at))
    }

    /// The first `blocks` blocks of a forward step over `tokens` (as [`Model::forward`]), with
    /// `hooks` (their hook points in those blocks), from which [`Model::forward_from`] goes on
    /// (with this cache, or a [`KvCache::fork`] of it).
    pub fn forward_prefix(&self, tokens: &[Vec<u32>], valid: &[Vec<bool>], cache: &mut KvCache, hooks: &mut Hooks, blocks: usize) -> Result<Prefix> {
        let (step, ids) = self.begin_step(tokens, valid, cache)?;
        let x = self.run(Input::Tokens(&ids), &step, cache, hooks, Output::Resid(blocks))?;
        Ok(Prefix { step, blocks, x })
    }

    /// The rest of a step that [`Model::forward_prefix`] began: the remaining blocks, with
    /// `hooks`. Returns the logits, as [`Model::forward`] would have.
    pub fn forward_from(&self, prefix: &Prefix, cache: &mut KvCache, hooks: &mut Hooks, logits_at: LogitsAt) -> Result<Tensor> {
        self.run(Input::Resid(prefix.blocks, prefix.x.clone()), &prefix.step, cache, hooks, Output::Logits(logits_at))
    }

    /// Registers a step over `tokens` in `cache`: its positions and masks, and the ids as a
    /// tensor.
    fn begin_step(&self, tokens: &[Vec<u32>], valid: &[Vec<bool>], cache: &mut KvCache) -> Result<(attention::Step, Tensor)> {
        let window = match &self.network {
            Network::Gemma2(m) => m.sliding_window(),
            Network::Llama(_) | Network::Gpt2(_) => None,
        };
        let step = cache.begin_step(valid, window, &self.device)?;
        if cache.max_position() > self.info.n_ctx {
            bail!(
                "sequence of {} positions exceeds the model's context of {}",
                cache.max_position(),
                self.info.n_ctx
            );
        }
        let flat: Vec<u32> = tokens.iter().flatten().copied().collect();
        if let Some(&bad) = flat.iter().find(|&&t| t as usize >= self.info.vocab_size) {
            bail!("token id {bad} is outside the vocabulary of {}", self.info.vocab_size);
        }
        let ids = Tensor::from_vec(flat, (step.batch, step.seq), &self.device)?;
        Ok((step, ids))
    }

    fn run(&self, input: Input, step: &attention::Step, cache: &mut KvCache, hooks: &mut Hooks, output: Output) -> Result<Tensor> {
        let go = || match &self.network {
            Network::Llama(m) => m.forward(input, step, cache, hooks, output),
            Network::Gemma2(m) => m.forward(input, step, cache, hooks, output),
            Network::Gpt2(m) => m.forward(input, step, cache, hooks, output),
        };
        // A CPU pass of one position per sequence (a decode step, or a one-token prompt) runs
        // on one of the pool's threads: its small parallel ops (products, attention, norms:
        // some ten per block) then split work with the other threads directly, where from
        // outside the pool each is handed over and waited for (a batch-32 GPT-2 step took 10%
        // longer so). A prefill stays on the calling thread: its ops are large, and its large
        // buffers, allocated on the pool's threads, came from their own heaps with more page
        // faults (seed-compat `steer` 8% slower).
        let out = if self.device.is_cpu() && step.seq == 1 && rayon::current_thread_index().is_none() {
            rayon::scope(|_| go())
        } else {
            go()
        }?;
        if matches!(output, Output::Logits(_)) && !all_finite(&out)? {
            bail!("the forward pass gave NaN or infinite logits: an activation overflowed f32 (weights too large, or a steering strength or edit too strong)");
        }
        Ok(out)
    }

    /// A fresh KV cache for `batch` sequences of up to `capacity` tokens (it grows if needed).
    pub fn new_cache(&self, batch: usize, capacity: usize) -> KvCache {
        KvCache::new(self.info.n_layers, batch, capacity)
    }
}

/// Whether every value of `t` is finite (no NaN, no ±∞): a scan of a CPU f32 tensor, else a sum.
pub fn all_finite(t: &Tensor) -> Result<bool> {
    if !(t.device().is_cpu() && t.dtype() == DType::F32) {
        // x − x is 0 for finite x and NaN otherwise.
        #[allow(clippy::eq_op)]
        return Ok((t - t)?.sum_all()?.to_dtype(DType::F32)?.to_scalar::<f32>()?.is_finite());
    }
    let t = t.contiguous()?;
    let (storage, layout) = t.storage_and_layout();
    let candle_core::Storage::Cpu(cpu) = &*storage else { unreachable!("a CPU tensor") };
    let v = &cpu.as_slice::<f32>()?[layout.start_offset()..][..t.elem_count()];
    // An exponent of all ones is ±∞ or NaN; or-ing a chunk's flags vectorises.
    let none_bad = |c: &[f32]| !c.iter().fold(false, |bad, x| bad | (x.to_bits() & 0x7f80_0000 == 0x7f80_0000));
    Ok(if v.len() < 1 << 20 { none_bad(v) } else { v.par_chunks(1 << 18).all(none_bad) })
}

fn looks_like_hub_id(spec: &str) -> bool {
    let parts: Vec<&str> = spec.split('/').collect();
    parts.len() <= 2
        && parts.iter().all(|p| {
            !p.is_empty() && p.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        })
        && !spec.ends_with(".bin")
}

/// The files of a Hugging Face checkpoint.
struct HfFiles {
    config: PathBuf,
    tokenizer: Option<PathBuf>,
    weights: Vec<PathBuf>,
}

impl HfFiles {
    fn from_folder(dir: &Path) -> Result<Self> {
        let config = dir.join("config.json");
        if !config.is_file() {
            bail!("{}: no config.json in this folder", dir.display());
        }
        let index = dir.join("model.safetensors.index.json");
        let weights = if index.is_file() {
            shard_names(&index)?.into_iter().map(|n| dir.join(n)).collect()
        } else if dir.join("model.safetensors").is_file() {
            vec![dir.join("model.safetensors")]
        } else {
            bail!("{}: no model.safetensors or model.safetensors.index.json", dir.display());
        };
        for w in &weights {
            if !w.is_file() {
                bail!("{}: weight shard is missing", w.display());
            }
        }
        let tokenizer = Some(dir.join("tokenizer.json")).filter(|p| p.is_file());
        Ok(Self { config, tokenizer, weights })
    }

    fn from_hub(id: &str) -> Result<Self> {
        let repo = HubRepo::model(id);
        if crate::hub::offline() {
            // Say at once everything that is missing, not only the first file.
            let mut missing: Vec<&str> =
                ["config.json", "tokenizer.json"].into_iter().filter(|f| repo.cached(f).is_none()).collect();
            if repo.cached("model.safetensors").is_none() && repo.cached("model.safetensors.index.json").is_none() {
                missing.push("model.safetensors (or model.safetensors.index.json and its shards)");
            }
            if !missing.is_empty() {
                bail!(
                    "{id}: not in the hub cache at {} and HF_HUB_OFFLINE is set; missing: {}; download them where the hub \
                     is reachable (`huggingface-cli download {id}`) or pass a local folder",
                    crate::hub::cache_dir().display(),
                    missing.join(", ")
                );
            }
        }
        let config = repo.get("config.json")?;
        let tokenizer = Some(repo.get("tokenizer.json")?);
        let weights = match repo.cached("model.safetensors.index.json") {
            Some(index) => shard_names(&index)?,
            None => match repo.get("model.safetensors") {
                Ok(p) => return Ok(Self { config, tokenizer, weights: vec![p] }),
                Err(single) => {
                    let index = repo.get("model.safetensors.index.json").map_err(|_| single)?;
                    shard_names(&index)?
                }
            },
        };
        let weights = weights.iter().map(|w| repo.get(w)).collect::<Result<Vec<_>>>()?;
        Ok(Self { config, tokenizer, weights })
    }
}

/// The distinct shard files named by a `model.safetensors.index.json`, in order.
fn shard_names(index: &Path) -> Result<Vec<String>> {
    let text = std::fs::read_to_string(index).with_context(|| format!("{}: cannot read", index.display()))?;
    let v: serde_json::Value =
        serde_json::from_str(&text).with_context(|| format!("{}: not valid JSON", index.display()))?;
    let map = v
        .get("weight_map")
        .and_then(|m| m.as_object())
        .with_context(|| format!("{}: no weight_map object", index.display()))?;
    let mut names: Vec<String> = Vec::new();
    for f in map.values() {
        let f = f.as_str().with_context(|| format!("{}: weight_map values must be file names", index.display()))?;
        if Path::new(f).file_name().and_then(|n| n.to_str()) != Some(f) {
            bail!("{}: weight_map names `{f}`, which is not a file in the model's folder", index.display());
        }
        if !names.iter().any(|n| n == f) {
            names.push(f.to_string());
        }
    }
    Ok(names)
}

fn load_hf_folder(spec: &str, files: &HfFiles, options: &LoadOptions) -> Result<Model> {
    let config = ModelConfig::from_file(&files.config)?;
    let tok_path = options
        .tokenizer
        .clone()
        .or_else(|| files.tokenizer.clone())
        .with_context(|| format!("{spec}: no tokenizer.json; pass --tokenizer"))?;
    let tokenizer = Tokenizer::from_hf_file(&tok_path)?;
    let weights = SafetensorsFiles::open(&files.weights)?;
    let n_layers = match &config {
        ModelConfig::Llama(c) => c.num_hidden_layers,
        ModelConfig::Gemma2(c) => c.num_hidden_layers,
        ModelConfig::Gpt2(c) => c.n_layer,
    };
    // Tensors of layers the config lacks: the config of a shallower model, which would run.
    if let Some((name, layer)) = weights.names().into_iter().find_map(|n| layer_of(n).filter(|&l| l >= n_layers).map(|l| (n, l))) {
        bail!("{spec}: the checkpoint has tensor {name} of layer {layer}, but config.json declares {n_layers} layers (the config of another model?)");
    }
    let dtype = options.dtype.resolve(weights.stored_dtype(), weights.param_count(), &options.device);
    let vb = VarBuilder::from_backend(Box::new(weights), DType::F32, options.device.clone());
    let model = Model::build(spec, config, vb, dtype, tokenizer)?;
    Ok(model.with_bos(!options.no_bos))
}

/// The layer a checkpoint tensor belongs to: the number after `layers.` (Llama, Qwen3, Gemma-2)
/// or `h.` (GPT-2) in its name.
fn layer_of(name: &str) -> Option<usize> {
    let parts: Vec<&str> = name.split('.').collect();
    parts.windows(2).find(|w| w[0] == "layers" || w[0] == "h").and_then(|w| w[1].parse().ok())
}

fn device_name(device: &Device) -> String {
    match device.location() {
        candle_core::DeviceLocation::Cpu => "cpu".into(),
        candle_core::DeviceLocation::Cuda { gpu_id } => format!("cuda:{gpu_id}"),
        candle_core::DeviceLocation::Metal { gpu_id } => format!("metal:{gpu_id}"),
    }
}

fn llama_info(spec: &str, c: &config::LlamaConfig) -> ModelInfo {
    ModelInfo {
        source: spec.to_string(),
        family: c.family.name(),
        n_layers: c.num_hidden_layers,
        d_model: c.hidden_size,
        d_mlp: c.intermediate_size,
        vocab_size: c.vocab_size,
        n_ctx: c.max_position_embeddings,
        bos: c.bos_token_id,
        eos: c.eos_token_ids.clone(),
        prepend_bos: c.family != config::LlamaFamily::Qwen3,
        center_unembed: true,
    }
}

fn load_llama2c(path: &Path, options: &LoadOptions) -> Result<Model> {
    let spec = path.display().to_string();
    let ckpt = llama2c::load_checkpoint(path, &Device::Cpu)?;
    let tok_path = match &options.tokenizer {
        Some(p) => p.clone(),
        None => sibling_tokenizer(path, ckpt.config.vocab_size)
            .with_context(|| format!("{spec}: llama2.c checkpoints need --tokenizer (e.g. tok512.bin)"))?,
    };
    let tokenizer = if tok_path.extension().is_some_and(|e| e == "json") {
        Tokenizer::from_hf_file(&tok_path)?
    } else {
        Tokenizer::Llama2c(llama2c::Llama2cTokenizer::load(&tok_path, ckpt.config.vocab_size)?)
    };
    let params = ckpt.tensors.values().map(|t| t.elem_count() as u64).sum();
    let dtype = options.dtype.resolve(DType::F32, params, &options.device);
    let vb = VarBuilder::from_tensors(ckpt.tensors, DType::F32, &options.device);
    let model = Model::build(&spec, ModelConfig::Llama(ckpt.config), vb, dtype, tokenizer)?;
    Ok(model.with_bos(!options.no_bos))
}

fn sibling_tokenizer(path: &Path, vocab: usize) -> Option<PathBuf> {
    let dir = path.parent()?;
    [format!("tok{vocab}.bin"), "tokenizer.bin".to_string()]
        .into_iter()
        .map(|n| dir.join(n))
        .find(|p| p.is_file())
}

#[cfg(test)]
mod tests {
    use super::zeroed_buffer_with;

    /// One number from /proc/vmstat.
    #[cfg(target_os = "linux")]
    fn vmstat(key: &str) -> u64 {
        let s = std::fs::read_to_string("/proc/vmstat").unwrap_or_default();
        s.lines().find_map(|l| l.strip_prefix(key)?.strip_prefix(' ')?.parse().ok()).unwrap_or(0)
    }

    /// `AnonHugePages` (KiB) of the mapping of this process that holds `addr`.
    #[cfg(target_os = "linux")]
    fn huge_kib_at(addr: usize) -> u64 {
        let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap();
        let mut inside = false;
        for line in smaps.lines() {
            let range = line.split_whitespace().next().and_then(|r| r.split_once('-'));
            if let Some((lo, hi)) = range.and_then(|(a, b)| Some((usize::from_str_radix(a, 16).ok()?, usize::from_str_radix(b, 16).ok()?))) {
                inside = (lo..hi).contains(&addr);
            } else if let Some(kb) = line.strip_prefix("AnonHugePages:").filter(|_| inside) {
                return kb.trim().trim_end_matches("kB").trim().parse().unwrap();
            }
        }
        0
    }

    /// A zeroed buffer holds zeros of its length, with huge pages asked for or not. On Linux
    /// with transparent huge pages enabled, a large one asked for them, once written, is backed
    /// by them (unless the kernel found no free 2 MiB page: then the test says so and checks
    /// nothing more); where the kernel gives them only on request, one not asked for is not.
    #[test]
    fn zeroed_buffers_are_zero_and_in_huge_pages() {
        for huge in [false, true] {
            for len in [0usize, 1, 1000, (2 << 20) / 4 + 3] {
                assert!(zeroed_buffer_with::<f32>(len, huge) == vec![0f32; len]);
                let b = zeroed_buffer_with::<half::bf16>(len, huge);
                assert!(b.len() == len && b.iter().all(|v| v.to_bits() == 0));
            }
        }
        #[cfg(target_os = "linux")]
        {
            let mode = std::fs::read_to_string("/sys/kernel/mm/transparent_hugepage/enabled").unwrap_or_default();
            if mode.is_empty() || mode.contains("[never]") {
                eprintln!("*** SKIPPED *** the huge-page check: transparent huge pages are off here");
                return;
            }
            // 64 MiB: above any size glibc serves from its heaps, so fresh pages.
            if mode.contains("[madvise]") {
                let mut v = zeroed_buffer_with::<f32>(16 << 20, false);
                v.fill(1.0);
                let huge = huge_kib_at(v.as_ptr() as usize + v.len() * 2);
                assert!(huge == 0, "a 64 MiB zeroed buffer not asked for huge pages has {huge} KiB in them");
            }
            let fallbacks = vmstat("thp_fault_fallback");
            let mut v = zeroed_buffer_with::<f32>(16 << 20, true);
            v.fill(1.0);
            let huge = huge_kib_at(v.as_ptr() as usize + v.len() * 2);
            if vmstat("thp_fault_fallback") > fallbacks {
                eprintln!("*** SKIPPED *** the huge-page check: the kernel had no free huge page");
                return;
            }
            assert!(huge >= 32 << 10, "a 64 MiB zeroed buffer has only {huge} KiB in huge pages");
        }
    }
}
