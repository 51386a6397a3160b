//! neurosteer: find the features inside a language model that carry its reasoning, and turn
//! them up or down while it generates.
//!
//! The crate is layered by concern: [`model`] loads and runs models with TransformerLens hook
//! points ([`hooks`]); [`generate`] decodes greedily with a KV cache in batches.

pub mod activations;
pub mod bench;
pub mod generate;
pub mod hooks;
pub mod hub;
pub mod model;
pub mod report;
pub mod trace;
pub mod steer;
pub mod evaluate;
pub mod classify;
pub mod inject;
pub mod data;
pub mod pickle;
pub mod progress;
pub mod stats;
pub mod demo;
pub mod experiment;
pub mod transcoder;

/// An error as the one line users see: its causes joined by `: `, without the backtraces candle
/// attaches when `RUST_BACKTRACE` is set, and with no line breaks.
pub fn error_line(e: &anyhow::Error) -> String {
    fn plain(c: &candle_core::Error) -> String {
        match c {
            candle_core::Error::WithBacktrace { inner, .. } => plain(inner),
            other => other.to_string(),
        }
    }
    e.chain()
        .map(|c| c.downcast_ref::<candle_core::Error>().map_or_else(|| c.to_string(), plain))
        .collect::<Vec<_>>()
        .join(": ")
        .replace('\n', " ")
}

#[cfg(test)]
mod tests {
    /// A candle error carrying a backtrace is one short line: the context and the message.
    #[test]
    fn error_line_drops_backtraces() {
        let inner = candle_core::Error::Msg("unexpected dtype".into());
        let with_bt = candle_core::Error::WithBacktrace { inner: Box::new(inner), backtrace: Box::new(std::backtrace::Backtrace::force_capture()) };
        assert!(with_bt.to_string().contains('\n'), "the backtrace is in candle's own message");
        let e = anyhow::Error::from(with_bt).context("shard.safetensors: tensor `feature`");
        assert_eq!(super::error_line(&e), "shard.safetensors: tensor `feature`: unexpected dtype");
        let e = anyhow::anyhow!("two\nlines").context("file");
        assert_eq!(super::error_line(&e), "file: two lines");
    }
}
