//! The `neurosteer` command line. Each subcommand parses its flags and calls the library.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use neurosteer::bench::{self, Preset};
use neurosteer::generate::{generate, GenerateOptions};
use neurosteer::hooks::Hooks;
use neurosteer::classify::{Selection, Statistic};
use neurosteer::experiment::{self, ClassifyJob, DatasetSpec, SteerJob, TraceJob};
use neurosteer::model::{DTypeChoice, LoadOptions, Model, Placement};
use neurosteer::transcoder::splice::{SteerMode, Steering};
use neurosteer::transcoder::Transcoder;
use neurosteer::{demo, evaluate, transcoder};

#[derive(Parser)]
#[command(name = "neurosteer", version, about = "Find and steer the features that carry a language model's reasoning")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Generate text greedily (KV cache, batched), optionally steering transcoder features.
    Generate(GenerateArgs),
    /// Run one prompt and save hook values and logits to a safetensors file (run_with_cache).
    Activations(ActivationsArgs),
    /// Measure prefill and decode speed against the memory-bandwidth floor.
    Bench(BenchArgs),
    /// Inspect, evaluate or train transcoders.
    #[command(subcommand)]
    Transcoder(TranscoderCommand),
    /// Generate under the basic, 0shot and fewshot prompt styles and record every feature at each step.
    Trace(TraceArgs),
    /// Split alive features into reasoning and memory features from traces.
    Classify(ClassifyArgs),
    /// Estimate each feature's log10 firing frequency over a dataset's tokens.
    Frequency(FrequencyArgs),
    /// Answer BoolQ-style questions while scaling the reasoning features, under several strengths.
    Steer(SteerArgs),
    /// Score a steering results file: accuracy, Wilson CIs, McNemar tests, controls, plots.
    Evaluate(EvaluateArgs),
    /// Run trace, classify, steer and evaluate from one TOML config (each stage resumable).
    Run(RunArgs),
    /// The whole job on stories260K with a transcoder trained on the spot (a fresh machine's demo).
    Demo(DemoArgs),
}

#[derive(Subcommand)]
enum TranscoderCommand {
    /// Print a transcoder's config, sizes and alive count.
    Info {
        /// A transcoder, in any format `--transcoder` takes.
        path: PathBuf,
        /// The layer to load from a set.
        #[arg(long)]
        layer: Option<usize>,
        /// Alive means log10 frequency above this.
        #[arg(long, default_value_t = -6.0, allow_hyphen_values = true)]
        alive_threshold: f32,
    },
    /// Fidelity on held-out text: variance explained, L0, dead features, CE recovered, KL.
    Eval(TranscoderEvalArgs),
    /// Train a ReLU transcoder for one layer and save it (neurosteer format, with frequencies).
    Train(TranscoderTrainArgs),
}

/// Which dataset to read.
#[derive(Args, Clone)]
struct DatasetArgs {
    /// A `.jsonl`, `.json` or `.parquet` file, or a hub dataset id (e.g. `google/boolq`).
    #[arg(long)]
    dataset: String,
    /// The split to read from a hub dataset.
    #[arg(long, default_value = "validation")]
    split: String,
    /// Dataset kind: gsm8k, boolq, strategyqa, arc, commonsenseqa (guessed when absent).
    #[arg(long)]
    kind: Option<String>,
    /// For other datasets: the field holding the question.
    #[arg(long)]
    question_field: Option<String>,
    /// For other datasets: the field holding the answer.
    #[arg(long)]
    answer_field: Option<String>,
    /// For other datasets: the field holding a passage.
    #[arg(long)]
    passage_field: Option<String>,
    /// Keep the file order instead of a seeded shuffle.
    #[arg(long)]
    no_shuffle: bool,
    /// Shuffle seed.
    #[arg(long, default_value_t = 42)]
    seed: u64,
}

impl DatasetArgs {
    fn spec(&self, n: Option<usize>) -> DatasetSpec {
        DatasetSpec {
            path: self.dataset.clone(),
            split: self.split.clone(),
            kind: self.kind.clone(),
            question_field: self.question_field.clone(),
            answer_field: self.answer_field.clone(),
            passage_field: self.passage_field.clone(),
            n,
            seed: self.seed,
            shuffle: !self.no_shuffle,
        }
    }
}

#[derive(Args)]
struct TraceArgs {
    #[command(flatten)]
    model: ModelArgs,
    #[command(flatten)]
    tc: TranscoderArg,
    #[command(flatten)]
    data: DatasetArgs,
    /// Prompt styles to trace.
    #[arg(long, value_delimiter = ',', default_value = "basic,0shot,fewshot")]
    styles: Vec<String>,
    /// A TOML file with one table per style holding a `template` string.
    #[arg(long)]
    templates: Option<PathBuf>,
    /// Wrap prompts in the Llama-3 chat template (instruct models).
    #[arg(long)]
    chat: bool,
    /// Questions to trace.
    #[arg(long, default_value_t = 512)]
    n: usize,
    /// New tokens per text (N new tokens give N + 1 recorded steps).
    #[arg(long, default_value_t = 32)]
    max_new_tokens: usize,
    /// Texts per forward pass (and per shard).
    #[arg(long, default_value_t = 8)]
    batch_size: usize,
    /// Cut prompts that do not fit the context from the left instead of skipping them.
    #[arg(long)]
    truncate_left: bool,
    /// Output folder (resumed when it holds the same trace).
    #[arg(long)]
    out: PathBuf,
}

#[derive(Args)]
struct ClassifyArgs {
    /// A trace folder (neurosteer's, or the seed notebook's layout).
    #[arg(long)]
    traces: PathBuf,
    /// Log10 firing frequencies: a `*_log_feature_sparsity.pt`, a `.safetensors`, a JSON list, or
    /// a transcoder carrying them (default: the traced transcoder).
    #[arg(long)]
    frequency: Option<PathBuf>,
    /// Alive means log10 frequency above this.
    #[arg(long, default_value_t = -6.0, allow_hyphen_values = true)]
    alive_threshold: f64,
    /// Reasoning means a CoT style exceeds basic by more than this.
    #[arg(long, default_value_t = 1e-3, allow_hyphen_values = true)]
    diff_threshold: f64,
    /// Which per-style vector to compare.
    #[arg(long, value_enum, default_value_t = Statistic::Mean)]
    statistic: Statistic,
    /// How the reasoning set is chosen: `threshold` (the rule above), `fdr:Q` (q-value at most Q
    /// in a style where the feature rises) or `top:K` (the K smallest such q-values).
    #[arg(long, default_value = "threshold")]
    select: Selection,
    /// Run the token-injection control on the reasoning set (needs the model and transcoder:
    /// --model/--transcoder, else the ones in the traces' trace.json).
    #[arg(long)]
    inject: bool,
    /// Injection: the feature's top CoT tokens injected per text.
    #[arg(long, default_value_t = neurosteer::inject::DEFAULT_TOP_TOKENS)]
    top_tokens: usize,
    /// Injection: lexical means injected / CoT activation at least this.
    #[arg(long, default_value_t = neurosteer::inject::DEFAULT_THRESHOLD)]
    lexical_threshold: f64,
    /// Injection: a neutral text file (one text per line) instead of the basic prompts.
    #[arg(long)]
    inject_text: Option<PathBuf>,
    /// Injection: how many base texts.
    #[arg(long, default_value_t = neurosteer::inject::DEFAULT_TEXTS)]
    inject_texts: usize,
    /// Injection: the model (default: the traces' model).
    #[arg(long)]
    model: Option<String>,
    /// Injection: the tokenizer file, for llama2.c `.bin` checkpoints.
    #[arg(long)]
    tokenizer: Option<PathBuf>,
    /// Injection: the transcoder (default: the traces' transcoder and layer).
    #[arg(long)]
    transcoder: Option<PathBuf>,
    /// Injection: the layer to load from a transcoder set.
    #[arg(long)]
    layer: Option<usize>,
    #[command(flatten)]
    placement: Placement,
    /// Output JSON (a CSV and plots are written beside it).
    #[arg(long, default_value = "neurons.json")]
    out: PathBuf,
}

#[derive(Args)]
struct FrequencyArgs {
    #[command(flatten)]
    model: ModelArgs,
    #[command(flatten)]
    tc: TranscoderArg,
    #[command(flatten)]
    data: DatasetArgs,
    /// Tokens to count over.
    #[arg(long, default_value_t = 100_000)]
    n_tokens: usize,
    /// Output `.safetensors` holding `log_frequency` `[d_sae]`.
    #[arg(long)]
    out: PathBuf,
}

#[derive(Args)]
struct SteerArgs {
    #[command(flatten)]
    model: ModelArgs,
    #[command(flatten)]
    tc: TranscoderArg,
    /// Reasoning features: neurons.json, a JSON list, or `1,5,9`.
    #[arg(long)]
    features: String,
    #[command(flatten)]
    data: DatasetArgs,
    /// Items to answer (after the seeded shuffle).
    #[arg(long, default_value_t = 300)]
    n: usize,
    /// Prompt template over dataset fields (stripped).
    #[arg(long, default_value = neurosteer::data::prompts::BOOLQ_TEMPLATE)]
    template: String,
    /// New tokens per answer (EOS stops one earlier).
    #[arg(long, default_value_t = 50)]
    max_new_tokens: usize,
    /// Comma-separated `Name=strength` list; `Base` is the untouched model.
    #[arg(long, default_value = neurosteer::steer::DEFAULT_CONFIGS)]
    configs: String,
    /// How the features are scaled.
    #[arg(long, value_enum, default_value_t = SteerMode::Delta)]
    mode: SteerMode,
    /// Items per batch: generation runs a batch's items together, and the results are saved
    /// after every batch.
    #[arg(long, default_value_t = 8)]
    batch_size: usize,
    /// Random feature sets (alive, non-reasoning, same size) steered the same way, as controls.
    #[arg(long, default_value_t = 0)]
    random_controls: usize,
    /// `generate` (parse the answer), `loglik` (yes vs no log-probabilities) or `both`.
    #[arg(long, default_value = "generate")]
    score: String,
    /// Results file (its `.meta.json` and, while running, `.lock` beside it).
    #[arg(long, default_value = "results.json")]
    out: PathBuf,
}

#[derive(Args)]
struct EvaluateArgs {
    /// A results file written by `steer`.
    results: PathBuf,
    /// Folder for evaluation.{json,md,csv}, comparisons.{md,csv}, flips.csv, the plot and
    /// report.html.
    #[arg(long, default_value = "evaluation")]
    out: PathBuf,
    /// The classification (neurons.json) behind the steered features, shown in report.html with
    /// its plots and injection result.
    #[arg(long)]
    neurons: Option<PathBuf>,
}

#[derive(Args)]
struct RunArgs {
    /// Experiment TOML (see examples/).
    #[arg(long)]
    config: PathBuf,
}

#[derive(Args)]
struct DemoArgs {
    /// Output folder.
    #[arg(long, default_value = "demo-out")]
    out: PathBuf,
    /// BoolQ items to steer on.
    #[arg(long, default_value_t = 50)]
    n: usize,
    /// Fetch stories260K and the datasets from the Hugging Face hub instead of using the copies
    /// built into neurosteer.
    #[arg(long)]
    from_hub: bool,
    #[command(flatten)]
    placement: Placement,
}

#[derive(Args)]
struct TranscoderEvalArgs {
    #[command(flatten)]
    model: ModelArgs,
    #[command(flatten)]
    tc: TranscoderArg,
    #[command(flatten)]
    data: DatasetArgs,
    /// Texts to evaluate on.
    #[arg(long, default_value_t = 64)]
    n: usize,
    /// Write the numbers as JSON here too.
    #[arg(long)]
    out: Option<PathBuf>,
}

#[derive(Args)]
struct TranscoderTrainArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// The layer whose MLP the transcoder stands for.
    #[arg(long)]
    layer: usize,
    /// Training text: dataset files (prompts are built from their fields) or hub ids.
    #[arg(long, num_args = 1.., required = true)]
    dataset: Vec<String>,
    /// Number of features.
    #[arg(long, default_value_t = 512)]
    d_sae: usize,
    /// Sparsity coefficient λ.
    #[arg(long, default_value_t = 0.05)]
    l1_coefficient: f64,
    /// Learning rate (decays linearly over the last 20% of steps).
    #[arg(long, default_value_t = 1e-3)]
    lr: f64,
    /// Optimizer steps.
    #[arg(long, default_value_t = 3000)]
    steps: usize,
    /// Tokens per training batch.
    #[arg(long, default_value_t = 2048)]
    batch_tokens: usize,
    /// Activation buffer size in tokens.
    #[arg(long, default_value_t = 200_000)]
    max_tokens: usize,
    /// Seed of the dataset shuffle, the initial weights and the batches.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Output `.safetensors` (neurosteer format).
    #[arg(long)]
    out: PathBuf,
}

/// Which model to load.
#[derive(Args, Clone)]
struct ModelArgs {
    /// A Hugging Face folder, a hub id (e.g. `gpt2`), or a llama2.c `.bin` checkpoint.
    #[arg(long)]
    model: String,
    /// Tokenizer file: `tokenizer.json`, or llama2.c's `tok512.bin` for `.bin` checkpoints.
    #[arg(long)]
    tokenizer: Option<PathBuf>,
    /// Do not prepend BOS (TransformerLens's `to_tokens` prepends it by default).
    #[arg(long)]
    no_bos: bool,
    #[command(flatten)]
    placement: Placement,
}

impl ModelArgs {
    fn options(&self) -> Result<LoadOptions> {
        self.placement.load_options(self.tokenizer.clone(), self.no_bos)
    }

    fn load(&self) -> Result<Model> {
        Model::load(&self.model, &self.options()?)
    }

    fn load_with_transcoder(&self, tc: &TranscoderArg) -> Result<(Model, std::sync::Arc<Transcoder>)> {
        experiment::load_model_and_transcoder(&self.model, &self.options()?, &tc.transcoder, tc.layer)
    }
}

/// Which transcoder to load.
#[derive(Args, Clone)]
struct TranscoderArg {
    /// A `.pt` (sae_training), a SAELens folder, a neurosteer `.safetensors`, a transcoder set
    /// folder (`config.yaml`), one layer's file of a set, a Gemma Scope `params.npz`, or a hub
    /// reference (`hf://org/repo[/path]` or `org/repo`).
    #[arg(long)]
    transcoder: PathBuf,
    /// The layer to load from a set (for a cross-layer transcoder: the source layer).
    #[arg(long)]
    layer: Option<usize>,
}

#[derive(Args)]
struct GenerateArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// The prompt text.
    #[arg(long, conflicts_with = "prompts", required_unless_present = "prompts")]
    prompt: Option<String>,
    /// A `.jsonl` file: one JSON string, or object with a "prompt" field, per line.
    #[arg(long)]
    prompts: Option<PathBuf>,
    /// New tokens per prompt (EOS stops a sequence earlier).
    #[arg(long, default_value_t = 50)]
    max_new_tokens: usize,
    /// Prompts per forward pass.
    #[arg(long, default_value_t = 8)]
    batch_size: usize,
    /// Cut prompts from the left to fit the context instead of refusing them.
    #[arg(long)]
    truncate_left: bool,
    /// Print one JSON object per prompt: {"prompt", "new_tokens", "text"}.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    steering: SteeringArgs,
}

/// Transcoder steering during generation. Several transcoders (at several layers) may be given;
/// `--features` and `--strength` pair with them in order, and a single value applies to all.
#[derive(Args, Clone)]
struct SteeringArgs {
    /// Transcoder to splice in (repeatable; the formats of `transcoder info`).
    #[arg(long = "transcoder")]
    transcoders: Vec<PathBuf>,
    /// The layer to load from a transcoder set (repeatable, paired with --transcoder in order).
    #[arg(long = "layer")]
    layers: Vec<usize>,
    /// Features to scale: `1,5,9`, a JSON list, or neurons.json's "reasoning" (repeatable).
    #[arg(long = "features")]
    features: Vec<String>,
    /// Scale of the chosen features (repeatable).
    #[arg(long = "strength", allow_hyphen_values = true)]
    strengths: Vec<f64>,
    /// delta (real MLP output + (s-1)·Σ f_i W_dec[i]), replace (MLP output := transcoder output),
    /// or seed-compat (the original notebook's hook).
    #[arg(long, value_enum, default_value_t = SteerMode::Delta)]
    mode: SteerMode,
    /// Zero-ablate this layer's MLP (repeatable): a floor for comparisons.
    #[arg(long = "ablate-mlp")]
    ablate_mlp: Vec<usize>,
}

impl SteeringArgs {
    /// Builds the hooks these flags ask for.
    fn hooks(&self, model: &Model) -> Result<Hooks> {
        let mut hooks = Hooks::none();
        let n = self.transcoders.len();
        let pick = |len: usize, what: &str| -> Result<()> {
            if len > 1 && len != n {
                bail!("{len} values of --{what} for {n} transcoders: give one, or one per transcoder");
            }
            Ok(())
        };
        pick(self.features.len(), "features")?;
        pick(self.strengths.len(), "strength")?;
        pick(self.layers.len(), "layer")?;
        for (i, path) in self.transcoders.iter().enumerate() {
            let layer = self.layers.get(i).or(self.layers.first()).copied();
            let splice = experiment::load_splice_for(model, path, layer, self.mode)?;
            let features = match self.features.get(i).or(self.features.first()) {
                Some(f) => neurosteer::classify::features_for(f, &splice.transcoder().meta)?,
                None => Vec::new(),
            };
            let strength = self.strengths.get(i).or(self.strengths.first()).copied().unwrap_or(1.0);
            hooks.edit(std::sync::Arc::new(splice.steering(features, strength, self.mode)?));
        }
        if n == 0 && (!self.features.is_empty() || !self.strengths.is_empty() || !self.layers.is_empty()) {
            bail!("--features, --strength and --layer need --transcoder");
        }
        for &l in &self.ablate_mlp {
            if l >= model.info.n_layers {
                bail!("--ablate-mlp {l}: the model has {} layers", model.info.n_layers);
            }
            hooks.edit(std::sync::Arc::new(neurosteer::hooks::ZeroAblation(l)));
        }
        Ok(hooks)
    }
}

#[derive(Args)]
struct ActivationsArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// The prompt text.
    #[arg(long)]
    prompt: String,
    /// A TransformerLens hook name to save, e.g. `blocks.0.ln2.hook_normalized` (repeatable).
    #[arg(long = "hook")]
    hooks: Vec<String>,
    /// Output safetensors file: one f32 `[seq, d]` tensor per hook, "logits" `[seq, vocab]`
    /// (TransformerLens's logits: centred over the vocabulary, except Gemma-2's) and "tokens".
    #[arg(long)]
    out: PathBuf,
    /// Also save this transcoder's feature activations as "features.L" `[seq, d_sae]`.
    #[arg(long)]
    transcoder: Option<PathBuf>,
    /// The layer to load from a transcoder set.
    #[arg(long, requires = "transcoder")]
    layer: Option<usize>,
}

#[derive(Args)]
struct BenchArgs {
    #[command(flatten)]
    model: BenchModelArgs,
    /// Random-weight shapes to benchmark when no --model is given.
    #[arg(long, value_enum, value_delimiter = ',', default_values_t = [Preset::Gpt2Small, Preset::Llama32_1b])]
    preset: Vec<Preset>,
    /// Prompt length.
    #[arg(long, default_value_t = 128)]
    prompt_tokens: usize,
    /// Decode steps to time.
    #[arg(long, default_value_t = 16)]
    new_tokens: usize,
    /// Batch sizes (comma-separated or repeated).
    #[arg(long, value_delimiter = ',', default_values_t = [1usize, 8])]
    batch: Vec<usize>,
    /// Also build each model in these weight dtypes (comma-separated) and time their rows in the
    /// same cycles, each step against the same row's step in --dtype.
    #[arg(long, value_enum, value_delimiter = ',', value_name = "DTYPE")]
    also_dtype: Vec<DTypeChoice>,
    /// Write the results as JSON here.
    #[arg(long, default_value = "bench.json")]
    out: PathBuf,
    /// Also time steering with a random transcoder of this many features at the middle layer
    /// (delta and replace, scaling 10% of the features).
    #[arg(long)]
    steer_features: Option<usize>,
    /// Also time the original experiment's shape on this many random prompts of --prompt-tokens
    /// tokens: --new-tokens greedy tokens each, batches of the largest --batch, under steer's
    /// default configurations (Base, strengths 1, 0.5, 2; delta) with a random transcoder of
    /// --steer-features features (65,536 when not given) at layer 0.
    #[arg(long, value_name = "PROMPTS")]
    experiment: Option<usize>,
}

/// `bench`'s model: a real one, or random presets (in `--dtype`; `auto` means f32 for them).
#[derive(Args)]
struct BenchModelArgs {
    /// Benchmark this model instead of random ones.
    #[arg(long)]
    model: Option<String>,
    /// Tokenizer for --model (llama2.c checkpoints).
    #[arg(long)]
    tokenizer: Option<PathBuf>,
    #[command(flatten)]
    placement: Placement,
}

fn main() -> ExitCode {
    // Die quietly when the reader of stdout goes away (`neurosteer ... | head`), as Unix tools do,
    // instead of panicking on a broken pipe.
    #[cfg(unix)]
    // SAFETY: restoring the default disposition of SIGPIPE before any thread starts.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    // Keep buffers below 1 GiB on the heap for reuse instead of mapping and unmapping (and
    // page-faulting) them anew: a decode step's activations, allocated and freed every step, and
    // while loading, each weight as read, freed once packed, whose memory the next one reuses.
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: tuning the allocator before any allocation-heavy work or thread starts.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 1 << 30);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 2 << 30);
    }
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Generate(a) => cmd_generate(a),
        Command::Activations(a) => cmd_activations(a),
        Command::Bench(a) => cmd_bench(a),
        Command::Transcoder(TranscoderCommand::Info { path, layer, alive_threshold }) => cmd_transcoder_info(&path, layer, alive_threshold),
        Command::Transcoder(TranscoderCommand::Eval(a)) => cmd_transcoder_eval(a),
        Command::Transcoder(TranscoderCommand::Train(a)) => cmd_transcoder_train(a),
        Command::Trace(a) => cmd_trace(a),
        Command::Classify(a) => cmd_classify(a),
        Command::Frequency(a) => cmd_frequency(a),
        Command::Steer(a) => cmd_steer(a),
        Command::Evaluate(a) => cmd_evaluate(a),
        Command::Run(a) => experiment::run_experiment(&a.config),
        Command::Demo(a) => demo::run_demo(&a.out, a.n, &a.placement, if a.from_hub { demo::Source::Hub } else { demo::Source::Local }),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("neurosteer: error: {}", neurosteer::error_line(&e));
            ExitCode::FAILURE
        }
    }
}

/// Reads prompts from a `.jsonl` file of strings or `{"prompt": ...}` objects.
fn read_prompts(path: &PathBuf) -> Result<Vec<String>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("{}: cannot read", path.display()))?;
    let mut prompts = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let v: serde_json::Value = serde_json::from_str(line)
            .with_context(|| format!("{}:{}: not valid JSON", path.display(), i + 1))?;
        match v {
            serde_json::Value::String(s) => prompts.push(s),
            serde_json::Value::Object(o) => match o.get("prompt").and_then(|p| p.as_str()) {
                Some(p) => prompts.push(p.to_string()),
                None => bail!("{}:{}: object has no string \"prompt\" field", path.display(), i + 1),
            },
            _ => bail!("{}:{}: expected a JSON string or an object with \"prompt\"", path.display(), i + 1),
        }
    }
    if prompts.is_empty() {
        bail!("{}: no prompts", path.display());
    }
    Ok(prompts)
}

fn cmd_generate(a: GenerateArgs) -> Result<()> {
    let prompts = match (&a.prompt, &a.prompts) {
        (Some(p), _) => vec![p.clone()],
        (None, Some(f)) => read_prompts(f)?,
        (None, None) => bail!("give --prompt or --prompts"),
    };
    let model = a.model.load()?;
    let ids: Vec<Vec<u32>> = prompts.iter().map(|p| model.codec.to_tokens(p)).collect::<Result<_>>()?;
    let opts = GenerateOptions {
        max_new_tokens: a.max_new_tokens,
        batch_size: a.batch_size,
        stop_at_eos: true,
        truncate_left: a.truncate_left,
        feed_last: false,
    };
    if let Some(f) = a.prompts.as_ref().filter(|_| a.max_new_tokens < model.info.n_ctx) {
        // A prompt that does not fit the context is named by its file and place in it.
        for (i, p) in ids.iter().enumerate() {
            neurosteer::generate::fit_prompt(&model, p.clone(), &opts).with_context(|| format!("{}: prompt {}", f.display(), i + 1))?;
        }
    }
    let hooks = a.steering.hooks(&model)?;
    let outputs = generate(&model, &ids, &opts, &hooks, |_| Ok(()))?;
    for (prompt, new) in prompts.iter().zip(outputs) {
        let text = model.codec.decode(&new)?;
        if a.json {
            println!("{}", serde_json::json!({"prompt": prompt, "new_tokens": new, "text": text}));
        } else {
            println!("{prompt}{text}");
        }
    }
    Ok(())
}

fn cmd_activations(a: ActivationsArgs) -> Result<()> {
    let model = a.model.load()?;
    let mut points = a.hooks.iter().map(|name| model.hook_point(name)).collect::<Result<Vec<_>>>()?;
    let n_named = points.len();
    let transcoder = match &a.transcoder {
        Some(p) => {
            let tc = experiment::load_transcoder_for(&model, p, a.layer)?;
            let input = tc.meta.points()?.0;
            points.push(input);
            Some((tc, input))
        }
        None => None,
    };
    let ids = model.codec.to_tokens(&a.prompt)?;
    let (logits, values) = neurosteer::activations::run_with_cache(&model, &ids, &points)?;
    let mut tensors = std::collections::HashMap::new();
    for p in &points[..n_named] {
        tensors.insert(p.to_string(), values[p].clone());
    }
    if let Some((tc, input)) = &transcoder {
        tensors.insert(format!("features.{}", tc.meta.layer), tc.encode(&values[input])?);
    }
    tensors.insert("logits".to_string(), logits);
    let n = ids.len();
    tensors.insert("tokens".to_string(), candle_core::Tensor::from_vec(ids.iter().map(|&i| i as i64).collect::<Vec<_>>(), n, &candle_core::Device::Cpu)?);
    neurosteer::report::replace_atomic(&a.out, |tmp| Ok(candle_core::safetensors::save(&tensors, tmp)?))?;
    eprintln!("wrote {} tensors to {}", tensors.len(), a.out.display());
    Ok(())
}

fn print_bench_row(row: &bench::BenchRow) {
    let opt = |v: Option<f64>, p: usize| v.map_or("-".to_string(), |v| format!("{v:.p$}"));
    println!(
        "{:<34} {:>5} {:>5} {:>10.1} {:>10.1} {:>9.2} {:>9.1} {:>6.1} {:>8.2} {:>9} {:>7.2} {:>6} {:>8} {:>7} {:>6}",
        row.model,
        row.dtype,
        row.batch,
        row.prefill_ms,
        row.prefill_tokens_per_s,
        row.decode_step_ms,
        row.decode_tokens_per_s,
        row.bandwidth_gb_s,
        row.floor_ms,
        opt(row.compute_floor_ms, 2),
        row.over_floor,
        opt(row.vs_batch1, 2),
        opt(row.steer_overhead.map(|o| 100.0 * o), 1),
        opt(row.vs_dtype, 2),
        opt(row.peak_rss_gib, 2)
    );
}

fn cmd_bench(a: BenchArgs) -> Result<()> {
    if a.batch.contains(&0) {
        bail!("--batch: batch sizes must be at least 1");
    }
    if a.experiment == Some(0) {
        bail!("--experiment: give at least 1 prompt");
    }
    if a.steer_features == Some(0) {
        bail!("--steer-features: the random transcoder needs at least 1 feature");
    }
    if a.new_tokens == 0 {
        bail!("--new-tokens: give at least 1 (the decode steps are what bench times)");
    }
    let device = neurosteer::model::parse_device(&a.model.placement.device)?;
    let dtypes: Vec<DTypeChoice> = std::iter::once(a.model.placement.dtype).chain(a.also_dtype.iter().copied()).collect();
    // Random weights are "stored" in f32, so `auto` keeps f32 for them; a checkpoint's `auto` is
    // known once it is read.
    let preset_dtype = |choice: DTypeChoice| choice.resolve(candle_core::DType::F32, 0, &device);
    for (i, &d) in dtypes.iter().enumerate().skip(1) {
        if dtypes[..i].iter().any(|&e| e == d || (a.model.model.is_none() && preset_dtype(e) == preset_dtype(d))) {
            bail!("--also-dtype: {} is already among the dtypes to time", format!("{d:?}").to_lowercase());
        }
    }
    // Measured once, after the first model's rows are known to fit.
    let peak = std::cell::OnceCell::new();
    let peak_gflops = || {
        *peak.get_or_init(|| {
            device.is_cpu().then(|| {
                eprintln!("measuring peak multiply-add throughput ...");
                neurosteer::model::matmul::peak_gflops()
            })
        })
    };
    let sources: Vec<Option<Preset>> = match &a.model.model {
        Some(_) => vec![None],
        None => a.preset.iter().copied().map(Some).collect(),
    };
    let mut rows = Vec::new();
    let mut experiments = Vec::new();
    for source in sources {
        let mut models = Vec::new();
        for &choice in &dtypes {
            let placement = Placement { dtype: choice, ..a.model.placement.clone() };
            let model = match (source, &a.model.model) {
                (Some(p), _) => {
                    let dtype = preset_dtype(choice);
                    eprintln!("building a random {p:?} model in {dtype:?} ...");
                    let mut model = bench::random_model(p, dtype, &device)?;
                    model.transcoder_dtype = placement.transcoder_dtype.resolve(dtype);
                    model
                }
                (None, Some(m)) => Model::load(m, &placement.load_options(a.model.tokenizer.clone(), false)?)?,
                (None, None) => unreachable!("a model or presets"),
            };
            if models.iter().any(|m: &Model| m.dtype == model.dtype) {
                bail!("--also-dtype: {} is loaded in {} already (`auto` chose it)", model.info.source, model.dtype.as_str());
            }
            if a.prompt_tokens == 0 || a.prompt_tokens + a.new_tokens > model.info.n_ctx {
                bail!(
                    "--prompt-tokens {} plus --new-tokens {} must fit the model's context of {} (and --prompt-tokens be at least 1)",
                    a.prompt_tokens,
                    a.new_tokens,
                    model.info.n_ctx
                );
            }
            models.push(model);
        }
        let prompt = a.prompt_tokens;
        let mut specs = Vec::new();
        for (mi, model) in models.iter().enumerate() {
            let steer = match a.steer_features {
                Some(d_sae) => {
                    let tc = bench::random_transcoder(model, model.info.n_layers / 2, d_sae)?;
                    Some((experiment::place_for(model, std::sync::Arc::new(tc))?, (0..d_sae).step_by(10).collect::<Vec<usize>>()))
                }
                None => None,
            };
            for &batch in &a.batch {
                specs.push(bench::RowSpec { model: mi, batch, hooks: Hooks::none(), steered: None });
                if let Some((tc, features)) = &steer {
                    for mode in [SteerMode::Delta, SteerMode::Replace] {
                        let mut hooks = Hooks::none();
                        hooks.edit(std::sync::Arc::new(Steering::new(tc.clone(), features.clone(), 0.5, mode)?));
                        specs.push(bench::RowSpec { model: mi, batch, hooks, steered: Some(mode.to_string()) });
                    }
                }
            }
        }
        // Every row holds its logits, and the next step's, at once: refuse what cannot fit.
        let logits_bytes = specs.iter().map(|s| 2 * 4 * s.batch as u64 * models[s.model].info.vocab_size as u64).sum::<u64>();
        if let Some(free) = neurosteer::model::available_memory().filter(|&free| device.is_cpu() && logits_bytes > free) {
            bail!("--batch: the rows' logits alone need {:.1} GiB, more than the {:.1} GiB of memory available", logits_bytes as f64 / (1u64 << 30) as f64, free as f64 / (1u64 << 30) as f64);
        }
        eprintln!("prefilling {} rows, then {} cycles of one decode step each ...", specs.len(), a.new_tokens);
        let model_rows = bench::measure_rows(&models, &specs, prompt, a.new_tokens, peak_gflops())?;
        if rows.is_empty() {
            println!(
                "{:<34} {:>5} {:>5} {:>10} {:>10} {:>9} {:>9} {:>6} {:>8} {:>9} {:>7} {:>6} {:>8} {:>7} {:>6}",
                "model", "dtype", "batch", "prefill ms", "prefill/s", "decode ms", "decode/s", "GB/s", "floor ms", "flop floor",
                "x floor", "x b1", "steer +%", "x dtype", "RSS GiB"
            );
        }
        model_rows.iter().for_each(print_bench_row);
        rows.extend(model_rows);
        if let Some(prompts) = a.experiment {
            let d_sae = a.steer_features.unwrap_or(65536);
            let batch = a.batch.iter().copied().max().unwrap_or(1);
            for model in &models {
                eprintln!("timing the experiment's shape in {}: {prompts} prompts, {d_sae}-feature transcoder at layer 0, batch {batch} ...", model.dtype.as_str());
                let tc = experiment::place_for(model, std::sync::Arc::new(bench::random_transcoder(model, 0, d_sae)?))?;
                let e = bench::time_experiment(model, tc, prompts, prompt, a.new_tokens, batch)?;
                println!(
                    "experiment ({}): {} prompts x {} configurations ({} generated), {} new tokens: {:.1} s, {:.1} tokens/s",
                    e.dtype,
                    e.prompts,
                    e.configs.len(),
                    e.configs.iter().filter(|c| c.same_as.is_none()).count(),
                    e.new_tokens,
                    e.total_s,
                    e.tokens_per_s
                );
                experiments.push(e);
            }
        }
    }
    let threads = rayon::current_num_threads();
    println!(
        "peak multiply-add: {}; {threads} threads; kernels: {:?}",
        peak_gflops().map_or("-".into(), |g| format!("{g:.0} GFLOP/s")),
        neurosteer::model::matmul::Isa::detected()
    );
    let report = bench::BenchReport {
        peak_gflops: peak_gflops(),
        isa: format!("{:?}", neurosteer::model::matmul::Isa::detected()),
        threads,
        rows,
        experiments,
    };
    neurosteer::report::write_atomic(&a.out, serde_json::to_string_pretty(&report)?.as_bytes())?;
    eprintln!("wrote {}", a.out.display());
    Ok(())
}

fn cmd_transcoder_info(path: &std::path::Path, layer: Option<usize>, alive_threshold: f32) -> Result<()> {
    let tc = Transcoder::load(path, layer)?;
    let m = &tc.meta;
    println!("file:        {}", path.display());
    println!("format:      {}", m.format);
    if let Some(name) = &m.model_name {
        println!("model:       {name}");
    }
    println!("layer:       {}", m.layer);
    println!("reads:       {}", m.hook_in);
    println!("writes:      {}", m.hook_out);
    println!("d_in:        {}", m.d_in);
    println!("d_sae:       {}", m.d_sae);
    println!("d_out:       {}", m.d_out);
    println!("activation:  {}", m.activation);
    println!("skip:        {}", if tc.w_skip.is_some() { "yes" } else { "no" });
    if tc.is_cross_layer() {
        println!("writes into: layers {}..={}", m.layer, m.layer + tc.w_dec_next.len());
    }
    match tc.alive(alive_threshold) {
        Some(alive) => println!("alive:       {} of {} (log10 frequency > {alive_threshold})", alive.len(), m.d_sae),
        None => println!("alive:       unknown (no frequency file)"),
    }
    for (k, v) in &m.extra {
        println!("cfg.{k}: {v}");
    }
    Ok(())
}

/// Texts for transcoder training and evaluation: each dataset item's prompt (the basic style,
/// with the passage first when there is one).
fn dataset_texts(spec: &DatasetSpec) -> Result<Vec<String>> {
    let (items, _) = spec.load(0)?;
    if items.is_empty() {
        bail!("{}: no texts{}", spec.path, if spec.n == Some(0) { " (--n is 0)" } else { "" });
    }
    Ok(items
        .iter()
        .map(|it| {
            let get = |k: &str| it.fields.get(k).and_then(|v| v.as_str()).unwrap_or("").trim().to_string();
            match it.fields.get("text").and_then(|t| t.as_str()) {
                Some(t) => t.to_string(),
                None if it.fields.contains_key("passage") => format!("Question: {}\nPassage: {}\nAnswer:", get("question"), get("passage")),
                None => format!("Question: {}\nAnswer:", get("question")),
            }
        })
        .collect())
}

fn cmd_transcoder_eval(a: TranscoderEvalArgs) -> Result<()> {
    let (model, tc) = a.model.load_with_transcoder(&a.tc)?;
    let texts = dataset_texts(&a.data.spec(Some(a.n)))?;
    let report = transcoder::eval::evaluate(&model, &tc, &texts).with_context(|| a.tc.transcoder.display().to_string())?;
    println!("{}", serde_json::to_string_pretty(&report)?);
    if let Some(out) = &a.out {
        neurosteer::report::write_atomic(out, serde_json::to_string_pretty(&report)?.as_bytes())?;
    }
    Ok(())
}

fn cmd_transcoder_train(a: TranscoderTrainArgs) -> Result<()> {
    let model = a.model.load()?;
    let mut texts = Vec::new();
    for d in &a.dataset {
        let spec = DatasetSpec { path: d.clone(), split: "train".into(), kind: None, question_field: None, answer_field: None, passage_field: None, n: None, seed: a.seed, shuffle: true };
        texts.extend(dataset_texts(&spec)?);
    }
    let opts = transcoder::train::TrainOptions {
        layer: a.layer,
        d_sae: a.d_sae,
        l1_coefficient: a.l1_coefficient,
        lr: a.lr,
        steps: a.steps,
        batch_tokens: a.batch_tokens,
        resample_every: 500,
        seed: a.seed,
    };
    let report = transcoder::train::train_for_model(&model, &texts, &opts, a.max_tokens, &a.out)?;
    println!("{}", serde_json::to_string_pretty(&report)?);
    eprintln!("wrote {}", a.out.display());
    Ok(())
}

fn cmd_trace(a: TraceArgs) -> Result<()> {
    let (model, tc) = a.model.load_with_transcoder(&a.tc)?;
    let job = TraceJob {
        dataset: a.data.spec(Some(a.n)),
        styles: a.styles,
        templates: a.templates,
        chat: a.chat,
        max_new_tokens: a.max_new_tokens,
        batch_size: a.batch_size,
        truncate_left: a.truncate_left,
    };
    experiment::run_trace_job(&job, &model, tc, &a.tc.transcoder, &a.out)?;
    eprintln!("traces in {}", a.out.display());
    Ok(())
}

fn cmd_classify(a: ClassifyArgs) -> Result<()> {
    let inject = a.inject.then(|| neurosteer::inject::InjectJob {
        top_tokens: a.top_tokens,
        threshold: a.lexical_threshold,
        text: a.inject_text.clone(),
        n_texts: a.inject_texts,
    });
    let job = ClassifyJob {
        frequency: a.frequency,
        alive_threshold: a.alive_threshold,
        diff_threshold: a.diff_threshold,
        statistic: a.statistic,
        select: a.select,
        inject,
    };
    if !a.inject {
        experiment::run_classify_job(&job, &a.traces, &a.out, None)?;
        return Ok(());
    }
    // The traced model and transcoder, unless given.
    let manifest = std::fs::read_to_string(a.traces.join("trace.json"))
        .ok()
        .and_then(|t| serde_json::from_str::<neurosteer::trace::TraceManifest>(&t).ok());
    let model = a.model.clone().or(manifest.as_ref().map(|m| m.model.clone())).context("--inject: give --model (the traces have no trace.json)")?;
    let tc_path = a.transcoder.clone().or(manifest.as_ref().map(|m| PathBuf::from(&m.transcoder))).context("--inject: give --transcoder")?;
    let layer = a.layer.or(manifest.as_ref().filter(|_| a.transcoder.is_none()).map(|m| m.layer));
    let (model, tc) = experiment::load_model_and_transcoder(&model, &a.placement.load_options(a.tokenizer.clone(), false)?, &tc_path, layer)?;
    experiment::run_classify_job(&job, &a.traces, &a.out, Some((&model, &tc)))?;
    Ok(())
}

fn cmd_frequency(a: FrequencyArgs) -> Result<()> {
    let (model, tc) = a.model.load_with_transcoder(&a.tc)?;
    let texts = dataset_texts(&a.data.spec(None))?;
    let freq = transcoder::eval::log_frequency(&model, &tc, &texts, a.n_tokens)?;
    let n = freq.len();
    let t = candle_core::Tensor::from_vec(freq, n, &candle_core::Device::Cpu)?;
    let bytes = safetensors::serialize([("log_frequency", &t)], None).map_err(|e| anyhow::anyhow!("{e}"))?;
    neurosteer::report::write_atomic(&a.out, &bytes)?;
    eprintln!("wrote {}", a.out.display());
    Ok(())
}

fn cmd_steer(a: SteerArgs) -> Result<()> {
    let model = a.model.load()?;
    let splice = experiment::load_splice_for(&model, &a.tc.transcoder, a.tc.layer, a.mode)?;
    let job = SteerJob {
        dataset: a.data.spec(Some(a.n)),
        template: a.template,
        configs: a.configs,
        mode: a.mode,
        max_new_tokens: a.max_new_tokens,
        batch_size: a.batch_size,
        random_controls: a.random_controls,
        score: a.score,
    };
    experiment::run_steer_job(&job, &model, &splice, &a.tc.transcoder, &a.features, &a.out)
}

fn cmd_evaluate(a: EvaluateArgs) -> Result<()> {
    let (e, written) = evaluate::evaluate_file(&a.results, &a.out, a.neurons.as_deref())?;
    println!("{}", evaluate::table(&e).to_text());
    println!("{}", evaluate::comparison_table(&e).to_text());
    for w in &e.warnings {
        eprintln!("warning: {w}");
    }
    for p in written {
        println!("wrote {}", p.display());
    }
    Ok(())
}
