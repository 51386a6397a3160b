//! Text to ids and back, with TransformerLens's `to_tokens` convention: BOS prepended once (for
//! the families whose default is to prepend it).

use std::path::Path;

use anyhow::{anyhow, Result};

use super::llama2c::Llama2cTokenizer;

/// A Hugging Face `tokenizer.json` or a llama2.c tokenizer.
pub enum Tokenizer {
    Hf(Box<tokenizers::Tokenizer>),
    Llama2c(Llama2cTokenizer),
    /// No tokenizer (random benchmark models): ids in, ids out; text is refused.
    None,
}

impl Tokenizer {
    /// Reads a `tokenizer.json`.
    pub fn from_hf_file(path: &Path) -> Result<Self> {
        let t = tokenizers::Tokenizer::from_file(path)
            .map_err(|e| anyhow!("{}: not a valid tokenizer.json: {e}", path.display()))?;
        Ok(Tokenizer::Hf(Box::new(t)))
    }

    /// Encodes text without any special token.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        match self {
            Tokenizer::Hf(t) => Ok(t
                .encode(text, false)
                .map_err(|e| anyhow!("tokenizer failed on {text:?}: {e}"))?
                .get_ids()
                .to_vec()),
            Tokenizer::Llama2c(t) => Ok(t.encode(text)),
            Tokenizer::None => anyhow::bail!("this model has no tokenizer; it takes token ids only"),
        }
    }

    /// Decodes ids, skipping special tokens.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        match self {
            Tokenizer::Hf(t) => t.decode(ids, true).map_err(|e| anyhow!("cannot decode {ids:?}: {e}")),
            Tokenizer::Llama2c(t) => Ok(t.decode(ids)),
            Tokenizer::None => Ok(ids.iter().map(|i| i.to_string()).collect::<Vec<_>>().join(" ")),
        }
    }

    /// The largest id the tokenizer can produce, with its token (added tokens included).
    pub fn max_id(&self) -> Option<(u32, String)> {
        match self {
            Tokenizer::Hf(t) => t.get_vocab(true).into_iter().map(|(piece, id)| (id, piece)).max(),
            // A llama2.c tokenizer is read for its checkpoint's vocabulary size.
            Tokenizer::Llama2c(_) | Tokenizer::None => None,
        }
    }

    /// The id of a token spelled exactly `piece`, if the vocabulary has it.
    pub fn token_id(&self, piece: &str) -> Option<u32> {
        match self {
            Tokenizer::Hf(t) => t.token_to_id(piece),
            Tokenizer::Llama2c(_) | Tokenizer::None => None,
        }
    }
}

/// A tokenizer together with the model's BOS rule.
pub struct TextCodec {
    pub tokenizer: Tokenizer,
    /// The BOS id to prepend, or `None` when the model has none, takes none or BOS is turned off.
    pub bos: Option<u32>,
    /// The id an otherwise empty text becomes, for models that take no BOS (Qwen3: its
    /// `bos_token_id`, as the references run the empty prompt).
    pub bos_if_empty: Option<u32>,
}

impl TextCodec {
    /// TransformerLens's `to_tokens`: BOS (when set) followed by the text's tokens; an empty
    /// result becomes `[bos_if_empty]` when that is set.
    pub fn to_tokens(&self, text: &str) -> Result<Vec<u32>> {
        let mut ids = Vec::new();
        ids.extend(self.bos);
        ids.extend(self.tokenizer.encode(text)?);
        if ids.is_empty() {
            ids.extend(self.bos_if_empty);
        }
        Ok(ids)
    }

    /// Decodes ids, skipping special tokens.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.tokenizer.decode(ids)
    }
}
