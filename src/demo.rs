//! `neurosteer demo`: the whole job on karpathy's stories260K, for a fresh machine.
//!
//! Its inputs (stories260K, its tokenizer, BoolQ validation and GSM8K test; `assets/demo/`, with
//! their licences) are compiled into the binary and written to `<out>/inputs/`, so the demo runs
//! offline with no setup. `$NEUROSTEER_ASSETS` (a folder laid out like `shared/assets`) replaces
//! them; `--from-hub` fetches them from the Hugging Face hub instead (karpathy/tinyllamas,
//! google/boolq, openai/gsm8k). A transcoder is trained on the spot at layer 2; then trace,
//! classify, steer and evaluate run. stories260K writes children's stories and answers BoolQ near
//! chance: the demo shows the machinery, not an effect.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

use crate::experiment::{ClassifyJob, DatasetSpec, ExperimentConfig, SteerJob, TraceJob};
use crate::hub::HubRepo;
use crate::model::{Model, Placement};
use crate::transcoder::splice::SteerMode;
use crate::transcoder::train::{train_for_model, TrainOptions};

/// The demo's inputs: model, tokenizer, BoolQ and GSM8K.
struct DemoFiles {
    model: PathBuf,
    tokenizer: PathBuf,
    boolq: String,
    gsm8k: String,
}

/// The inputs compiled into the binary: (file name, bytes).
const EMBEDDED: [(&str, &[u8]); 8] = [
    ("stories260K.bin", include_bytes!("../assets/demo/stories260K.bin")),
    ("tok512.bin", include_bytes!("../assets/demo/tok512.bin")),
    ("boolq_validation.jsonl", include_bytes!("../assets/demo/boolq_validation.jsonl")),
    ("gsm8k_test.jsonl", include_bytes!("../assets/demo/gsm8k_test.jsonl")),
    ("LICENSE.karpathy-llama2.c", include_bytes!("../assets/demo/LICENSE.karpathy-llama2.c")),
    ("LICENSE.clebert-llama2.zig", include_bytes!("../assets/demo/LICENSE.clebert-llama2.zig")),
    ("LICENSE.gsm8k", include_bytes!("../assets/demo/LICENSE.gsm8k")),
    ("README.md", include_bytes!("../assets/demo/README.md")),
];

/// Where the demo's inputs come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// `$NEUROSTEER_ASSETS` when set, else the copies compiled into the binary.
    Local,
    /// The Hugging Face hub, through its cache.
    Hub,
}

fn demo_files(out: &Path, source: Source) -> Result<DemoFiles> {
    if source == Source::Hub {
        let repo = HubRepo::model("karpathy/tinyllamas");
        return Ok(DemoFiles {
            model: repo.get("stories260K/stories260K.bin")?,
            tokenizer: repo.get("stories260K/tok512.bin")?,
            boolq: "google/boolq".into(),
            gsm8k: "openai/gsm8k".into(),
        });
    }
    if let Some(dir) = std::env::var_os("NEUROSTEER_ASSETS").map(PathBuf::from) {
        return Ok(DemoFiles {
            model: dir.join("stories260K/stories260K.bin"),
            tokenizer: dir.join("stories260K/tok512.bin"),
            boolq: dir.join("boolq/validation.jsonl").display().to_string(),
            gsm8k: dir.join("reasoning/gsm8k/test.jsonl").display().to_string(),
        });
    }
    let dir = out.join("inputs");
    std::fs::create_dir_all(&dir).with_context(|| format!("{}: cannot create", dir.display()))?;
    for (name, bytes) in EMBEDDED {
        let path = dir.join(name);
        if std::fs::read(&path).ok().as_deref() != Some(bytes) {
            crate::report::write_atomic(&path, bytes)?;
        }
    }
    Ok(DemoFiles {
        model: dir.join("stories260K.bin"),
        tokenizer: dir.join("tok512.bin"),
        boolq: dir.join("boolq_validation.jsonl").display().to_string(),
        gsm8k: dir.join("gsm8k_test.jsonl").display().to_string(),
    })
}

fn dataset(path: &str, split: &str, kind: &str, n: usize) -> DatasetSpec {
    DatasetSpec {
        path: path.to_string(),
        split: split.to_string(),
        kind: Some(kind.to_string()),
        question_field: None,
        answer_field: None,
        passage_field: None,
        n: Some(n),
        seed: 42,
        shuffle: true,
    }
}

/// Runs the demo into `out`, steering on `n_boolq` BoolQ items.
pub fn run_demo(out: &Path, n_boolq: usize, placement: &Placement, source: Source) -> Result<()> {
    let files = demo_files(out, source)?;
    std::fs::create_dir_all(out)?;
    let transcoder = out.join("transcoder_layer2.safetensors");
    let cfg = ExperimentConfig {
        model: files.model.display().to_string(),
        tokenizer: Some(files.tokenizer.clone()),
        device: placement.device.clone(),
        dtype: placement.dtype,
        transcoder_dtype: placement.transcoder_dtype,
        transcoder: transcoder.clone(),
        layer: None,
        out: out.to_path_buf(),
        trace: TraceJob {
            dataset: dataset(&files.gsm8k, "test", "gsm8k", 48),
            styles: vec!["basic".into(), "0shot".into(), "fewshot".into()],
            templates: None,
            chat: false,
            max_new_tokens: 16,
            batch_size: 8,
            truncate_left: true,
        },
        classify: ClassifyJob::default(),
        steer: SteerJob {
            dataset: dataset(&files.boolq, "validation", "boolq", n_boolq),
            template: crate::data::prompts::BOOLQ_TEMPLATE.to_string(),
            configs: crate::steer::DEFAULT_CONFIGS.to_string(),
            mode: SteerMode::Delta,
            max_new_tokens: 10,
            batch_size: 8,
            random_controls: 2,
            score: "both".into(),
        },
    };
    // The steer stage's items (and `--n`) are checked before the transcoder is trained.
    cfg.steer.items()?;
    if !transcoder.exists() {
        eprintln!("[0/4] training a transcoder for layer 2 of stories260K -> {}", transcoder.display());
        let model = Model::load(&files.model.display().to_string(), &placement.load_options(Some(files.tokenizer.clone()), false)?)?;
        let (boolq, _) = dataset(&files.boolq, "train", "boolq", 300).load(0)?;
        let (gsm, _) = dataset(&files.gsm8k, "train", "gsm8k", 600).load(0)?;
        let mut texts: Vec<String> = Vec::new();
        let field = |it: &crate::data::Item, k: &str| it.fields.get(k).and_then(|v| v.as_str()).unwrap_or("").trim().to_string();
        for it in &boolq {
            texts.push(format!("Question: {}\nPassage: {}\nAnswer:", field(it, "question"), field(it, "passage")));
        }
        for it in &gsm {
            texts.push(format!("Question: {}\nAnswer:", field(it, "question")));
            texts.push(format!("Question: {}\nAnswer: Let's think step by step.", field(it, "question")));
        }
        let opts = TrainOptions { layer: 2, d_sae: 512, steps: 2000, ..Default::default() };
        let report = train_for_model(&model, &texts, &opts, 150_000, &transcoder)?;
        eprintln!("      held-out FVE {:.3}, L0 {:.1}, dead {}", report.fve, report.l0, report.dead);
    }
    crate::experiment::run_pipeline(&cfg, Path::new("."))?;
    println!(
        "\nDemo done. Outputs in {}:\n  inputs/                        the model and datasets it ran on (unless NEUROSTEER_ASSETS or --from-hub)\n  transcoder_layer2.safetensors  the trained transcoder\n  traces/                        feature traces per prompt style\n  neurons.json, neurons.csv      reasoning / memory classification (+ neurons*.png/svg)\n  results.json                   steered BoolQ generations (+ results.json.meta.json)\n  evaluation/                    accuracy table (md, csv, json) and accuracy_vs_strength.png/svg\n\
         stories260K is a 260K-parameter story model: it answers BoolQ near chance, so these numbers show\n  the machinery, not a real effect. Use `neurosteer run --config examples/llama31_8b.toml` for the real experiment.",
        out.display()
    );
    Ok(())
}
