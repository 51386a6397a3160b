//! One prompt through the model with its hook values kept: TransformerLens's `run_with_cache`,
//! behind the `activations` command and the Python package's `Model.run_with_cache`.

use std::collections::BTreeMap;

use anyhow::{bail, Context, Result};
use candle_core::Tensor;

use crate::hooks::{HookPoint, Hooks};
use crate::model::{LogitsAt, Model};

/// Runs `ids` (one sequence) and returns TransformerLens's logits `[seq, vocab]` (centred over
/// the vocabulary where TransformerLens centres them: every family but Gemma-2) and the value of
/// every point in `points` `[seq, d]`, all f32 on the model's device.
pub fn run_with_cache(model: &Model, ids: &[u32], points: &[HookPoint]) -> Result<(Tensor, BTreeMap<HookPoint, Tensor>)> {
    if ids.is_empty() {
        bail!("empty prompt: nothing to run");
    }
    if ids.len() > model.info.n_ctx {
        bail!("prompt of {} tokens exceeds the model's context of {}", ids.len(), model.info.n_ctx);
    }
    let mut hooks = Hooks::none();
    for &p in points {
        hooks.record(p);
    }
    let mut cache = model.new_cache(1, ids.len());
    let logits = model.forward(&[ids.to_vec()], &[vec![true; ids.len()]], &mut cache, &mut hooks, LogitsAt::All)?;
    let logits = model.tl_logits(&logits.squeeze(0)?)?;
    let values = points
        .iter()
        .map(|&p| Ok((p, hooks.recorded(p).context("hook was not reached")?.squeeze(0)?)))
        .collect::<Result<_>>()?;
    Ok((logits, values))
}
