//! Greedy generation with a KV cache, in left-padded batches.
//!
//! Each batch runs one prefill over the padded prompts, then one cached decode step per new
//! token. A sequence stops at EOS (the EOS is kept) or after `max_new_tokens`; the batch stops when
//! every sequence has. Hooks see every position computed: the whole prompt once, then one
//! position per sequence per step, as TransformerLens's `generate` with its KV cache.

use std::collections::BTreeMap;

use anyhow::{bail, Result};
use candle_core::{Tensor, D};

use crate::hooks::{HookPoint, Hooks};
use crate::model::{LogitsAt, Model};

/// How to generate.
#[derive(Debug, Clone)]
pub struct GenerateOptions {
    pub max_new_tokens: usize,
    /// Prompts per forward pass.
    pub batch_size: usize,
    /// Stop a sequence at the model's EOS ids.
    pub stop_at_eos: bool,
    /// Cut prompts from the left to fit the context instead of refusing them.
    pub truncate_left: bool,
    /// Feed the last generated token once more, so that a hook sees it (tracing needs this).
    pub feed_last: bool,
}

impl Default for GenerateOptions {
    fn default() -> Self {
        Self { max_new_tokens: 50, batch_size: 8, stop_at_eos: true, truncate_left: false, feed_last: false }
    }
}

/// What a step callback sees: the recorded hook values at the newest position of each sequence.
pub struct StepView<'a> {
    /// 0 for the prefill (the last prompt position), t for the position of the t-th new token.
    pub step: usize,
    /// For each sequence of the batch (indices into the prompts given to [`generate`]), whether it
    /// has a token at this step.
    pub rows: &'a [(usize, bool)],
    /// Recorded hooks at the newest position, `[batch, d]`.
    pub values: &'a BTreeMap<HookPoint, Tensor>,
}

/// Checks that a prompt fits the context with `max_new_tokens` more, cutting it from the left
/// when allowed.
pub fn fit_prompt(model: &Model, mut prompt: Vec<u32>, opts: &GenerateOptions) -> Result<Vec<u32>> {
    let n_ctx = model.info.n_ctx;
    if prompt.is_empty() {
        bail!("empty prompt: there is no token to start from (did you pass --no-bos with empty text?)");
    }
    if opts.max_new_tokens >= n_ctx {
        bail!("--max-new-tokens {} leaves no room in the context of {n_ctx}", opts.max_new_tokens);
    }
    if prompt.len() + opts.max_new_tokens > n_ctx {
        if !opts.truncate_left {
            bail!(
                "prompt of {} tokens plus {} new tokens exceeds the model's context of {n_ctx} \
                 (shorten it, lower --max-new-tokens, or pass --truncate-left)",
                prompt.len(),
                opts.max_new_tokens
            );
        }
        prompt.drain(..prompt.len() + opts.max_new_tokens - n_ctx);
    }
    Ok(prompt)
}

/// Generates greedily for every prompt; returns the new tokens of each, EOS included.
/// `on_step` is called after every forward pass with the recorded hook values.
pub fn generate(
    model: &Model,
    prompts: &[Vec<u32>],
    opts: &GenerateOptions,
    hooks: &Hooks,
    mut on_step: impl FnMut(&StepView) -> Result<()>,
) -> Result<Vec<Vec<u32>>> {
    if opts.batch_size == 0 {
        anyhow::bail!("--batch-size must be at least 1");
    }
    let prompts: Vec<Vec<u32>> =
        prompts.iter().map(|p| fit_prompt(model, p.clone(), opts)).collect::<Result<_>>()?;
    // Batch prompts of similar length together: less padding, same results.
    let mut order: Vec<usize> = (0..prompts.len()).collect();
    order.sort_by_key(|&i| prompts[i].len());
    let mut outputs = vec![Vec::new(); prompts.len()];
    for chunk in order.chunks(opts.batch_size) {
        let batch: Vec<&[u32]> = chunk.iter().map(|&i| prompts[i].as_slice()).collect();
        let mut hooks = hooks.clone();
        let new = generate_batch(model, &batch, opts, &mut hooks, |step, rows, values| {
            let rows: Vec<(usize, bool)> = rows.iter().enumerate().map(|(b, &r)| (chunk[b], r)).collect();
            on_step(&StepView { step, rows: &rows, values })
        })?;
        for (&i, out) in chunk.iter().zip(new) {
            outputs[i] = out;
        }
    }
    Ok(outputs)
}

fn generate_batch(
    model: &Model,
    prompts: &[&[u32]],
    opts: &GenerateOptions,
    hooks: &mut Hooks,
    mut on_step: impl FnMut(usize, &[bool], &BTreeMap<HookPoint, Tensor>) -> Result<()>,
) -> Result<Vec<Vec<u32>>> {
    let b = prompts.len();
    let longest = prompts.iter().map(|p| p.len()).max().unwrap_or(0);
    let pad = model.info.eos.first().copied().unwrap_or(0);
    let mut tokens = Vec::with_capacity(b);
    let mut valid = Vec::with_capacity(b);
    for p in prompts {
        let n_pad = longest - p.len();
        tokens.push(std::iter::repeat_n(pad, n_pad).chain(p.iter().copied()).collect::<Vec<_>>());
        valid.push(std::iter::repeat_n(false, n_pad).chain(std::iter::repeat_n(true, p.len())).collect::<Vec<_>>());
    }
    let mut cache = model.new_cache(b, longest + opts.max_new_tokens + 1);
    let mut logits = model.forward(&tokens, &valid, &mut cache, hooks, LogitsAt::Last)?;
    on_step(0, &vec![true; b], &last_positions(hooks)?)?;

    let mut out: Vec<Vec<u32>> = vec![Vec::new(); b];
    let mut done = vec![opts.max_new_tokens == 0; b];
    for step in 1.. {
        let next = argmax(&logits)?;
        let mut produced = vec![false; b];
        for row in 0..b {
            if done[row] {
                continue;
            }
            let tok = next[row];
            out[row].push(tok);
            produced[row] = true;
            if (opts.stop_at_eos && model.info.eos.contains(&tok)) || out[row].len() >= opts.max_new_tokens {
                done[row] = true;
            }
        }
        let any_produced = produced.iter().any(|&p| p);
        if done.iter().all(|&d| d) && !(opts.feed_last && any_produced) {
            break;
        }
        let feed: Vec<Vec<u32>> = (0..b).map(|r| vec![*out[r].last().unwrap_or(&pad)]).collect();
        let feed_valid: Vec<Vec<bool>> = produced.iter().map(|&p| vec![p]).collect();
        logits = model.forward(&feed, &feed_valid, &mut cache, hooks, LogitsAt::Last)?;
        on_step(step, &produced, &last_positions(hooks)?)?;
    }
    Ok(out)
}

/// The recorded hook values at the last position: `[batch, seq, d]` becomes `[batch, d]`.
fn last_positions(hooks: &mut Hooks) -> Result<BTreeMap<HookPoint, Tensor>> {
    hooks
        .take_recorded()
        .into_iter()
        .map(|(p, t)| {
            let seq = t.dim(1)?;
            Ok((p, t.narrow(1, seq - 1, 1)?.squeeze(1)?))
        })
        .collect()
}

/// Argmax over the vocabulary of `[batch, 1, vocab]` logits.
pub fn argmax(logits: &Tensor) -> Result<Vec<u32>> {
    Ok(logits.argmax(D::Minus1)?.flatten_all()?.to_vec1::<u32>()?)
}
