//! Greedy generation with a KV cache, in left-padded batches.
//!
//! Each batch runs one prefill over the padded prompts, then one cached decode step per new
//! token. A sequence stops at EOS (the EOS is kept) or after `max_new_tokens`; the batch stops when
//! every sequence has. Hooks see every position computed: the whole prompt once, then one
//! position per sequence per step, as TransformerLens's `generate` with its KV cache.

use std::collections::BTreeMap;

use anyhow::{bail, Result};
use candle_core::Tensor;

use crate::hooks::{HookPoint, Hooks};
use crate::model::{KvCache, LogitsAt, Model};

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
    Ok(generate_under(model, prompts, opts, std::slice::from_ref(hooks), |_, view| on_step(view))?.remove(0))
}

/// Generates greedily for every prompt under each of `hooks` in turn: `[hooks][prompt]`, the
/// new tokens [`generate`] gives for each. A batch's prefill shares its first blocks between
/// the hooks (see [`prefill_each`]).
pub fn generate_each(model: &Model, prompts: &[Vec<u32>], opts: &GenerateOptions, hooks: &[Hooks]) -> Result<Vec<Vec<Vec<u32>>>> {
    generate_under(model, prompts, opts, hooks, |_, _| Ok(()))
}

/// [`generate_each`], calling `on_step(h, view)` after every forward pass under `hooks[h]`.
fn generate_under(
    model: &Model,
    prompts: &[Vec<u32>],
    opts: &GenerateOptions,
    hooks: &[Hooks],
    mut on_step: impl FnMut(usize, &StepView) -> Result<()>,
) -> Result<Vec<Vec<Vec<u32>>>> {
    let prompts = fitted(model, prompts, opts)?;
    let mut outputs = vec![vec![Vec::new(); prompts.len()]; hooks.len()];
    for chunk in batches(&prompts, opts.batch_size, None) {
        let batch: Vec<&[u32]> = chunk.iter().map(|&i| prompts[i].as_slice()).collect();
        let (tokens, valid) = padded(model, &batch);
        let capacity = tokens[0].len() + opts.max_new_tokens + 1;
        prefill_each(model, &tokens, &valid, capacity, hooks, |h, mut hooks, cache, logits| {
            let mut report = |step: usize, rows: &[bool], values: &BTreeMap<HookPoint, Tensor>| {
                let rows: Vec<(usize, bool)> = rows.iter().enumerate().map(|(b, &r)| (chunk[b], r)).collect();
                on_step(h, &StepView { step, rows: &rows, values })
            };
            report(0, &vec![true; batch.len()], &last_positions(&mut hooks)?)?;
            let new = decode(model, cache, logits, opts, &mut hooks, report)?;
            for (&i, out) in chunk.iter().zip(new) {
                outputs[h][i] = out;
            }
            Ok(())
        })?;
    }
    Ok(outputs)
}

/// Prefills `tokens` (`[batch][seq]`, `valid` marking real ones) under each of `hooks` in turn,
/// handing `then` the hooks' index, the hooks (with what the pass left in them), a KV cache with
/// room for `capacity` tokens, and the logits at the last position. The blocks before the
/// first one any of the hooks touches run once for all (a steered layer's earlier blocks are
/// the same under every strength); each hooks goes on from there with a copy of their KV cache,
/// the last with the cache itself (all from the tokens when some hooks touch the embeddings).
pub fn prefill_each(
    model: &Model,
    tokens: &[Vec<u32>],
    valid: &[Vec<bool>],
    capacity: usize,
    hooks: &[Hooks],
    mut then: impl FnMut(usize, Hooks, KvCache, Tensor) -> Result<()>,
) -> Result<()> {
    let shared = hooks.iter().filter_map(Hooks::first_block).min().unwrap_or(model.info.n_layers);
    let Some((last, others)) = hooks.split_last() else { return Ok(()) };
    if shared == 0 {
        for (h, hooks) in hooks.iter().enumerate() {
            let (mut hooks, mut cache) = (hooks.clone(), model.new_cache(tokens.len(), capacity));
            let logits = model.forward(tokens, valid, &mut cache, &mut hooks, LogitsAt::Last)?;
            then(h, hooks, cache, logits)?;
        }
        return Ok(());
    }
    let mut cache = model.new_cache(tokens.len(), capacity);
    let prefix = model.forward_prefix(tokens, valid, &mut cache, &mut Hooks::none(), shared)?;
    let mut go = |h: usize, hooks: &Hooks, mut cache: KvCache| {
        let mut hooks = hooks.clone();
        let logits = model.forward_from(&prefix, &mut cache, &mut hooks, LogitsAt::Last)?;
        then(h, hooks, cache, logits)
    };
    for (h, hooks) in others.iter().enumerate() {
        go(h, hooks, cache.fork()?)?;
    }
    go(others.len(), last, cache)
}

/// The prompts fitted to the context (see [`fit_prompt`]).
fn fitted(model: &Model, prompts: &[Vec<u32>], opts: &GenerateOptions) -> Result<Vec<Vec<u32>>> {
    if opts.batch_size == 0 {
        anyhow::bail!("--batch-size must be at least 1");
    }
    prompts.iter().map(|p| fit_prompt(model, p.clone(), opts)).collect()
}

/// The batches to run `prompts` in (indices): prompts in order of length (similar lengths
/// together, so less padding; the results are the same), `batch_size` a batch and, with
/// `max_positions`, at most that many positions once padded to the longest (a longer prompt
/// runs alone).
pub(crate) fn batches(prompts: &[Vec<u32>], batch_size: usize, max_positions: Option<usize>) -> Vec<Vec<usize>> {
    let mut order: Vec<usize> = (0..prompts.len()).collect();
    order.sort_by_key(|&i| prompts[i].len());
    let mut out: Vec<Vec<usize>> = Vec::new();
    for i in order {
        match out.last_mut() {
            // In order of length, so prompt i is the batch's longest.
            Some(b) if b.len() < batch_size && max_positions.is_none_or(|m| (b.len() + 1) * prompts[i].len() <= m) => b.push(i),
            _ => out.push(vec![i]),
        }
    }
    out
}

/// The token that pads a batch (and follows a finished sequence): the first EOS id.
fn pad_id(model: &Model) -> u32 {
    model.info.eos.first().copied().unwrap_or(0)
}

/// A batch's tokens, left-padded to the longest, and which are real.
pub(crate) fn padded(model: &Model, prompts: &[&[u32]]) -> (Vec<Vec<u32>>, Vec<Vec<bool>>) {
    let longest = prompts.iter().map(|p| p.len()).max().unwrap_or(0);
    let pad = pad_id(model);
    prompts
        .iter()
        .map(|p| {
            let n_pad = longest - p.len();
            let tokens = std::iter::repeat_n(pad, n_pad).chain(p.iter().copied()).collect();
            let valid = std::iter::repeat_n(false, n_pad).chain(std::iter::repeat_n(true, p.len())).collect();
            (tokens, valid)
        })
        .unzip()
}

/// The decode steps of a batch whose prompts are in `cache`, from the prefill's `logits`.
fn decode(
    model: &Model,
    mut cache: KvCache,
    mut logits: Tensor,
    opts: &GenerateOptions,
    hooks: &mut Hooks,
    mut on_step: impl FnMut(usize, &[bool], &BTreeMap<HookPoint, Tensor>) -> Result<()>,
) -> Result<Vec<Vec<u32>>> {
    let b = logits.dim(0)?;
    let pad = pad_id(model);
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
    crate::model::pointwise::argmax(logits)
}

#[cfg(test)]
mod tests {
    use super::batches;

    /// Batches hold every prompt once, in order of length, at most `batch_size` each and, with a
    /// cap, at most that many padded positions unless a prompt alone is longer.
    #[test]
    fn batches_bound_prompts_and_positions() {
        let prompts: Vec<Vec<u32>> = (0..40).map(|i| vec![0; [3, 700, 40, 512, 5000, 1, 90][i % 7] + i]).collect();
        for cap in [None, Some(4096)] {
            let out = batches(&prompts, 8, cap);
            let flat = out.concat();
            assert!(flat.windows(2).all(|w| prompts[w[0]].len() <= prompts[w[1]].len()), "not in order of length");
            let mut seen = flat.clone();
            seen.sort();
            assert_eq!(seen, (0..prompts.len()).collect::<Vec<_>>());
            for b in &out {
                let longest = b.iter().map(|&i| prompts[i].len()).max().unwrap();
                assert!(b.len() <= 8 && (b.len() == 1 || cap.is_none_or(|c| b.len() * longest <= c)), "{b:?}");
            }
            if cap.is_none() {
                assert_eq!(out.iter().map(Vec::len).collect::<Vec<_>>(), [8, 8, 8, 8, 8]);
            }
        }
        assert_eq!(batches(&vec![vec![0; 10]; 17], 8, Some(4096)).iter().map(Vec::len).collect::<Vec<_>>(), [8, 8, 1]);
        assert_eq!(batches(&vec![vec![0; 1000]; 5], 8, Some(4096)).iter().map(Vec::len).collect::<Vec<_>>(), [4, 1]);
    }
}
