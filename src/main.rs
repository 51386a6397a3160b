//! The `neurosteer` command line. Each subcommand parses its flags and calls the library.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use neurosteer::bench::{self, Preset};
use neurosteer::generate::{generate, GenerateOptions};
use neurosteer::hooks::Hooks;
use neurosteer::model::{LoadOptions, LogitsAt, Model};

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
}

impl ModelArgs {
    fn load(&self) -> Result<Model> {
        Model::load(&self.model, &LoadOptions { tokenizer: self.tokenizer.clone(), no_bos: self.no_bos })
    }
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
    /// (TransformerLens's centred logits) and "tokens".
    #[arg(long)]
    out: PathBuf,
}

#[derive(Args)]
struct BenchArgs {
    /// Benchmark this model instead of random ones.
    #[arg(long)]
    model: Option<String>,
    /// Tokenizer for --model (llama2.c checkpoints).
    #[arg(long)]
    tokenizer: Option<PathBuf>,
    /// Random-weight shapes to benchmark when no --model is given.
    #[arg(long, value_enum, value_delimiter = ',', default_values_t = [Preset::Gpt2Small, Preset::Llama1b])]
    preset: Vec<Preset>,
    /// Prompt length.
    #[arg(long, default_value_t = 128)]
    prompt_tokens: usize,
    /// Decode steps to time.
    #[arg(long, default_value_t = 16)]
    new_tokens: usize,
    /// Batch sizes.
    #[arg(long, value_delimiter = ',', default_values_t = [1usize, 8])]
    batch: Vec<usize>,
    /// Write the results as JSON here.
    #[arg(long, default_value = "bench.json")]
    out: PathBuf,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Generate(a) => cmd_generate(a),
        Command::Activations(a) => cmd_activations(a),
        Command::Bench(a) => cmd_bench(a),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let msg = format!("{e:#}").replace('\n', " ");
            eprintln!("neurosteer: error: {msg}");
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
    let outputs = generate(&model, &ids, &opts, &Hooks::none(), |_| Ok(()))?;
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
    let mut hooks = Hooks::none();
    let mut points = Vec::new();
    for name in &a.hooks {
        let p = model.hook_point(name)?;
        hooks.record(p);
        points.push(p);
    }
    let ids = model.codec.to_tokens(&a.prompt)?;
    if ids.is_empty() {
        bail!("empty prompt: nothing to run");
    }
    if ids.len() > model.info.n_ctx {
        bail!("prompt of {} tokens exceeds the model's context of {}", ids.len(), model.info.n_ctx);
    }
    let mut cache = model.new_cache(1);
    let logits = model.forward(&[ids.clone()], &[vec![true; ids.len()]], &mut cache, &mut hooks, LogitsAt::All)?;
    let logits = logits.squeeze(0)?;
    let centred = logits.broadcast_sub(&logits.mean_keepdim(1)?)?;
    let mut tensors = std::collections::HashMap::new();
    for p in points {
        let t = hooks.recorded(p).context("hook was not reached")?.squeeze(0)?;
        tensors.insert(p.to_string(), t);
    }
    tensors.insert("logits".to_string(), centred);
    let n = ids.len();
    tensors.insert("tokens".to_string(), candle_core::Tensor::from_vec(ids.iter().map(|&i| i as i64).collect::<Vec<_>>(), n, &candle_core::Device::Cpu)?);
    let tmp = a.out.with_extension("safetensors.tmp");
    candle_core::safetensors::save(&tensors, &tmp).with_context(|| format!("{}: cannot write", tmp.display()))?;
    std::fs::rename(&tmp, &a.out).with_context(|| format!("{}: cannot write", a.out.display()))?;
    eprintln!("wrote {} tensors to {}", tensors.len(), a.out.display());
    Ok(())
}

fn cmd_bench(a: BenchArgs) -> Result<()> {
    eprintln!("measuring memory bandwidth ...");
    let bandwidth = bench::measure_bandwidth();
    let models: Vec<Model> = match &a.model {
        Some(m) => vec![Model::load(m, &LoadOptions { tokenizer: a.tokenizer.clone(), no_bos: false })?],
        None => a.preset.iter().map(|&p| bench::random_model(p)).collect::<Result<_>>()?,
    };
    let mut rows = Vec::new();
    println!("{:<22} {:>5} {:>11} {:>13} {:>12} {:>10} {:>9}", "model", "batch", "prefill ms", "decode ms/step", "decode tok/s", "floor ms", "x floor");
    for model in &models {
        for &batch in &a.batch {
            let prompt = a.prompt_tokens.min(model.info.n_ctx - a.new_tokens - 1);
            let row = bench::measure(model, batch, prompt, a.new_tokens, &Hooks::none(), bandwidth)?;
            println!(
                "{:<22} {:>5} {:>11.1} {:>13.2} {:>12.1} {:>10.2} {:>9.2}",
                row.model, row.batch, row.prefill_ms, row.decode_step_ms, row.decode_tokens_per_s, row.floor_ms, row.over_floor
            );
            rows.push(row);
        }
    }
    println!("measured read bandwidth: {bandwidth:.1} GB/s ({} threads)", candle_core::utils::get_num_threads());
    let report = bench::BenchReport { bandwidth_gb_s: bandwidth, threads: candle_core::utils::get_num_threads(), rows };
    std::fs::write(&a.out, serde_json::to_string_pretty(&report)?)
        .with_context(|| format!("{}: cannot write", a.out.display()))?;
    eprintln!("wrote {}", a.out.display());
    Ok(())
}
