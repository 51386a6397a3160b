//! Prompt styles: templates with `{field}` placeholders filled from an [`Item`]'s fields.
//!
//! Three styles are built in:
//! - `basic`: [`BASIC_TEMPLATE`];
//! - `0shot`: [`ZERO_SHOT_TEMPLATE`] (chain-of-thought trigger);
//! - `fewshot`: `k` worked examples rendered with [`FEWSHOT_EXAMPLE_TEMPLATE`], then the basic
//!   template for the question.
//!
//! Template syntax: `{name}` is replaced by the item's field `name` with its surrounding
//! whitespace stripped; `{{` and `}}` are literal braces. A placeholder naming a field the item
//! lacks is an error naming the field and the style.
//!
//! A TOML file can override styles and add new ones, one table per style:
//!
//! ```toml
//! [basic]
//! template = "Q: {question}\nA:"
//!
//! [fewshot]
//! k = 3
//! example_template = "Q: {question}\nA: {reasoning} So {answer}.\n\n"
//! examples_file = "examples.jsonl"   # relative to the TOML file
//!
//! [boolq]
//! template = "Question: {question}\nPassage: {passage}\nAnswer:"
//! ```
//!
//! Styles the file does not mention keep their defaults. A table that gives only `template`
//! replaces the style whole: `[fewshot]` with only a `template` writes its worked examples into
//! the template itself, and no examples are generated.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use serde::Deserialize;

use super::{detect_kind, load_rows, normalize, Item};

/// The `basic` style.
pub const BASIC_TEMPLATE: &str = "Question: {question}\nAnswer:";
/// The `0shot` style: the basic prompt with a chain-of-thought trigger.
pub const ZERO_SHOT_TEMPLATE: &str = "Question: {question}\nAnswer: Let's think step by step.";
/// How each worked example of the `fewshot` style is rendered.
pub const FEWSHOT_EXAMPLE_TEMPLATE: &str =
    "Question: {question}\nAnswer: {reasoning} The answer is {answer}.\n\n";
/// The BoolQ steering prompt. [`render_template`] strips each field's surrounding whitespace,
/// so the question and passage appear stripped.
pub const BOOLQ_TEMPLATE: &str = "Question: {question}\nPassage: {passage}\nAnswer:";
/// Number of worked examples of a few-shot style when none is given.
pub const DEFAULT_K: usize = 2;

/// Wraps a user message in the Llama-3 instruct chat template, ready for the assistant's turn.
/// No `<|begin_of_text|>`: the tokenizer adds the BOS token.
pub fn llama3_chat(user: &str) -> String {
    format!(
        "<|start_header_id|>user<|end_header_id|>\n\n{user}<|eot_id|>\
         <|start_header_id|>assistant<|end_header_id|>\n\n"
    )
}

/// A piece of a parsed template.
enum Piece<'a> {
    Text(&'a str),
    Brace(char),
    Field(&'a str),
}

/// Splits a template into literal text, escaped braces and `{field}` placeholders.
fn parse(template: &str) -> Result<Vec<Piece<'_>>> {
    let mut pieces = Vec::new();
    let bytes = template.as_bytes();
    let (mut i, mut start) = (0, 0);
    while i < bytes.len() {
        match bytes[i] {
            b'{' | b'}' if bytes.get(i + 1) == Some(&bytes[i]) => {
                pieces.push(Piece::Text(&template[start..i]));
                pieces.push(Piece::Brace(bytes[i] as char));
                i += 2;
                start = i;
            }
            b'{' => {
                let end = template[i + 1..]
                    .find(['}', '{'])
                    .map(|e| e + i + 1)
                    .filter(|&e| bytes[e] == b'}')
                    .ok_or_else(|| anyhow!("unclosed `{{` at byte {i} (write `{{{{` for a literal brace)"))?;
                let name = template[i + 1..end].trim();
                if name.is_empty() {
                    bail!("empty placeholder `{{}}` at byte {i}");
                }
                pieces.push(Piece::Text(&template[start..i]));
                pieces.push(Piece::Field(name));
                i = end + 1;
                start = i;
            }
            b'}' => bail!("unmatched `}}` at byte {i} (write `}}}}` for a literal brace)"),
            _ => i += 1,
        }
    }
    pieces.push(Piece::Text(&template[start..]));
    Ok(pieces)
}

/// Fills `template` from `item`'s fields, each stripped of surrounding whitespace. `style` only
/// names the template in error messages.
pub fn render_template(template: &str, item: &Item, style: &str) -> Result<String> {
    let pieces = parse(template).with_context(|| format!("prompt style `{style}`: bad template"))?;
    if !pieces.iter().any(|p| matches!(p, Piece::Field(_))) {
        bail!("prompt style `{style}`: the template has no placeholder such as {{question}}, so every item would get the same prompt");
    }
    let mut out = String::with_capacity(template.len() + 256);
    for piece in pieces {
        match piece {
            Piece::Text(t) => out.push_str(t),
            Piece::Brace(c) => out.push(c),
            Piece::Field(name) => {
                let value = item.fields.get(name).ok_or_else(|| {
                    anyhow!(
                        "prompt style `{style}`: unknown placeholder `{{{name}}}` (item {} has fields: {})",
                        item.id,
                        item.fields.keys().cloned().collect::<Vec<_>>().join(", ")
                    )
                })?;
                match value {
                    serde_json::Value::String(s) => out.push_str(s.trim()),
                    other => out.push_str(other.to_string().trim()),
                }
            }
        }
    }
    Ok(out)
}

/// One prompt style.
#[derive(Debug, Clone, PartialEq)]
pub struct Style {
    /// The template for the evaluated question.
    pub template: String,
    /// For few-shot styles: the template for each worked example.
    pub example_template: Option<String>,
    /// For few-shot styles: how many worked examples ([`DEFAULT_K`] when `None`).
    pub k: Option<usize>,
    /// For few-shot styles: a JSONL/JSON/parquet file to take the examples from, instead of
    /// a disjoint part of the dataset.
    pub examples_file: Option<PathBuf>,
}

impl Style {
    fn plain(template: &str) -> Self {
        Style { template: template.into(), example_template: None, k: None, examples_file: None }
    }

    /// Whether the style uses worked examples.
    pub fn is_fewshot(&self) -> bool {
        self.example_template.is_some()
    }

    /// Number of worked examples (0 for styles without examples).
    pub fn k(&self) -> usize {
        if self.is_fewshot() {
            self.k.unwrap_or(DEFAULT_K)
        } else {
            0
        }
    }
}

/// A style table in the TOML override file.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct StyleToml {
    template: Option<String>,
    example_template: Option<String>,
    k: Option<usize>,
    examples_file: Option<PathBuf>,
}

/// A named set of prompt styles, and whether to wrap prompts in the Llama-3 chat template.
#[derive(Debug, Clone, PartialEq)]
pub struct PromptSet {
    styles: Vec<(String, Style)>,
    /// Wrap every rendered prompt with [`llama3_chat`] (off by default).
    pub chat: bool,
}

impl Default for PromptSet {
    fn default() -> Self {
        Self::builtin()
    }
}

impl PromptSet {
    /// The built-in styles `basic`, `0shot` and `fewshot`, without the chat template.
    pub fn builtin() -> Self {
        let fewshot = Style {
            template: BASIC_TEMPLATE.into(),
            example_template: Some(FEWSHOT_EXAMPLE_TEMPLATE.into()),
            k: Some(DEFAULT_K),
            examples_file: None,
        };
        PromptSet {
            styles: vec![
                ("basic".into(), Style::plain(BASIC_TEMPLATE)),
                ("0shot".into(), Style::plain(ZERO_SHOT_TEMPLATE)),
                ("fewshot".into(), fewshot),
            ],
            chat: false,
        }
    }

    /// The built-in styles overridden and extended by a TOML file (see the module docs).
    /// Unknown keys, a new style without `template`, and malformed templates are errors.
    /// `examples_file` paths are relative to the TOML file's folder.
    pub fn from_toml_file(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path)
            .map_err(|e| anyhow!("{}: cannot read prompt file ({e})", path.display()))?;
        let base = path.parent().unwrap_or(Path::new("."));
        Self::from_toml_str(&text, base).with_context(|| format!("{}", path.display()))
    }

    /// Like [`PromptSet::from_toml_file`], from TOML text; relative `examples_file` paths are
    /// resolved against `base`.
    pub fn from_toml_str(text: &str, base: &Path) -> Result<Self> {
        let tables: BTreeMap<String, StyleToml> = toml::from_str(text).map_err(|e| anyhow!("{e}"))?;
        let mut set = Self::builtin();
        for (name, t) in tables {
            let existing = set.styles.iter().position(|(n, _)| *n == name);
            let mut style = match existing {
                Some(i) => set.styles[i].1.clone(),
                None => Style::plain(
                    t.template.as_deref().ok_or_else(|| anyhow!("style `{name}` has no `template`"))?,
                ),
            };
            // Overriding a few-shot style with only a `template` means the template holds its
            // worked examples itself: no examples are generated.
            if t.template.is_some() && t.example_template.is_none() && t.k.is_none() && t.examples_file.is_none() {
                style.example_template = None;
                style.k = None;
                style.examples_file = None;
            }
            if let Some(tpl) = t.template {
                style.template = tpl;
            }
            if let Some(ex) = t.example_template {
                style.example_template = Some(ex);
            }
            if let Some(k) = t.k {
                style.k = Some(k);
            }
            if let Some(f) = t.examples_file {
                style.examples_file = Some(if f.is_relative() { base.join(f) } else { f });
            }
            if (style.k.is_some() || style.examples_file.is_some()) && style.example_template.is_none() {
                style.example_template = Some(FEWSHOT_EXAMPLE_TEMPLATE.into());
            }
            for tpl in std::iter::once(&style.template).chain(style.example_template.as_ref()) {
                parse(tpl).with_context(|| format!("style `{name}`: bad template"))?;
            }
            match existing {
                Some(i) => set.styles[i].1 = style,
                None => set.styles.push((name, style)),
            }
        }
        Ok(set)
    }

    /// The style names: the built-in ones first, then those the TOML file added.
    pub fn style_names(&self) -> Vec<String> {
        self.styles.iter().map(|(n, _)| n.clone()).collect()
    }

    /// A style by name, or an error listing the known ones.
    pub fn style(&self, name: &str) -> Result<&Style> {
        self.styles.iter().find(|(n, _)| n == name).map(|(_, s)| s).ok_or_else(|| {
            anyhow!("unknown prompt style `{name}` (known: {})", self.style_names().join(", "))
        })
    }

    /// Number of worked examples of the `fewshot` style ([`DEFAULT_K`] unless overridden).
    pub fn fewshot_k(&self) -> usize {
        self.style("fewshot").map(Style::k).unwrap_or(DEFAULT_K)
    }

    /// Renders `item` in `style`. A few-shot style puts its first `k` `examples` in front
    /// (fewer than `k` is an error; other styles ignore `examples`). Fields are stripped of
    /// surrounding whitespace. With [`PromptSet::chat`] set the prompt is wrapped by
    /// [`llama3_chat`].
    pub fn render(&self, style: &str, item: &Item, examples: &[Item]) -> Result<String> {
        let s = self.style(style)?;
        let mut out = String::new();
        if let Some(ex_tpl) = &s.example_template {
            let k = s.k();
            if examples.len() < k {
                bail!(
                    "prompt style `{style}` needs {k} worked examples, got {} (they come from held-out items with a `reasoning` \
                     field, or from the style's `examples_file`)",
                    examples.len()
                );
            }
            for ex in &examples[..k] {
                out.push_str(&render_template(ex_tpl, ex, style)?);
            }
        }
        out.push_str(&render_template(&s.template, item, style)?);
        Ok(if self.chat { llama3_chat(&out) } else { out })
    }

    /// The worked examples for `style` from its `examples_file`, if it has one: the file's
    /// first `k` items with a `reasoning` field (layout detected as in [`detect_kind`]).
    pub fn examples_from_file(&self, style: &str) -> Result<Option<Vec<Item>>> {
        let s = self.style(style)?;
        let Some(path) = &s.examples_file else { return Ok(None) };
        let spec = path.to_str().ok_or_else(|| anyhow!("{}: path is not UTF-8", path.display()))?;
        let rows = load_rows(spec, "train")?;
        let kind = detect_kind(&rows);
        let items = normalize(rows, kind).with_context(|| format!("{spec}: examples"))?;
        let examples: Vec<Item> = items.into_iter().filter(has_reasoning).take(s.k()).collect();
        if examples.len() < s.k() {
            bail!("{spec}: style `{style}` needs {} examples with `reasoning`, found {}", s.k(), examples.len());
        }
        Ok(Some(examples))
    }
}

fn has_reasoning(item: &Item) -> bool {
    item.get("reasoning").is_some_and(|r| !r.trim().is_empty())
}

/// Splits a (shuffled) dataset into the evaluated items, the first `n_eval`, and up to `k`
/// worked examples: the first items of the remaining pool that have a non-empty `reasoning`
/// field. The two parts never share an item.
pub fn split_examples(items: Vec<Item>, n_eval: usize, k: usize) -> (Vec<Item>, Vec<Item>) {
    let mut eval = items;
    let pool = eval.split_off(n_eval.min(eval.len()));
    let examples = pool.into_iter().filter(has_reasoning).take(k).collect();
    (eval, examples)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::{tests::assets, DatasetKind, Row};
    use serde_json::Value;

    fn item(id: &str, fields: &[(&str, &str)]) -> Item {
        let fields: Row = fields.iter().map(|(k, v)| (k.to_string(), Value::from(*v))).collect();
        Item { id: id.into(), fields }
    }

    fn worked(i: usize) -> Item {
        let (q, r, a) = (format!("Q{i}?"), format!("R{i}."), i.to_string());
        item(&format!("ex{i}"), &[("question", q.as_str()), ("reasoning", r.as_str()), ("answer", a.as_str())])
    }

    #[test]
    fn builtin_styles_render() {
        let p = PromptSet::builtin();
        assert_eq!(p.style_names(), ["basic", "0shot", "fewshot"]);
        assert_eq!(p.fewshot_k(), 2);
        let it = item("1", &[("question", "  Is water wet? \n"), ("answer", "True")]);
        assert_eq!(p.render("basic", &it, &[]).unwrap(), "Question: Is water wet?\nAnswer:");
        assert_eq!(
            p.render("0shot", &it, &[]).unwrap(),
            "Question: Is water wet?\nAnswer: Let's think step by step."
        );
        let ex = [worked(1), worked(2), worked(3)];
        assert_eq!(
            p.render("fewshot", &it, &ex).unwrap(),
            "Question: Q1?\nAnswer: R1. The answer is 1.\n\n\
             Question: Q2?\nAnswer: R2. The answer is 2.\n\n\
             Question: Is water wet?\nAnswer:"
        );
        let err = p.render("fewshot", &it, &ex[..1]).unwrap_err().to_string();
        assert!(err.contains("needs 2 worked examples, got 1"), "{err}");
        let err = p.render("nope", &it, &[]).unwrap_err().to_string();
        assert!(err.contains("`nope`") && err.contains("basic, 0shot, fewshot"), "{err}");
    }

    #[test]
    fn template_errors_and_escapes() {
        let it = item("7", &[("question", "q"), ("passage", " p ")]);
        let err = render_template("{question} {missing}", &it, "mine").unwrap_err().to_string();
        assert!(err.contains("`{missing}`") && err.contains("`mine`"), "{err}");
        assert_eq!(render_template("{{json}} {{{question}}}", &it, "s").unwrap(), "{json} {q}");
        assert_eq!(render_template("[{ passage }]", &it, "s").unwrap(), "[p]");
        for bad in ["{question", "a } b", "{}", "{a{b}"] {
            let err = render_template(bad, &it, "s");
            assert!(err.is_err(), "{bad}");
            assert!(format!("{:#}", err.unwrap_err()).contains("style `s`"), "{bad}");
        }
        let err = render_template("no fields", &it, "s").unwrap_err().to_string();
        assert!(err.contains("no placeholder"), "{err}");
        assert_eq!(render_template("héllo {question}é", &it, "s").unwrap(), "héllo qé");
    }

    #[test]
    fn boolq_template_strips_fields() {
        let it = item("0", &[("question", " is it true\n"), ("passage", "\n  Some passage.  "), ("answer", "True")]);
        assert_eq!(
            render_template(BOOLQ_TEMPLATE, &it, "boolq").unwrap(),
            "Question: is it true\nPassage: Some passage.\nAnswer:"
        );
    }

    #[test]
    fn llama3_chat_format() {
        assert_eq!(
            llama3_chat("Hi"),
            "<|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"
        );
        let mut p = PromptSet::builtin();
        let it = item("0", &[("question", "q")]);
        p.chat = true;
        assert_eq!(p.render("basic", &it, &[]).unwrap(), llama3_chat("Question: q\nAnswer:"));
    }

    fn tmp_dir() -> PathBuf {
        let dir = std::env::temp_dir().join(format!("neurosteer-prompts-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn toml_overrides_and_custom_styles() {
        let dir = tmp_dir();
        std::fs::write(
            dir.join("ex.jsonl"),
            "{\"question\": \"no reasoning\", \"answer\": \"#### 3\"}\n\
             {\"question\": \"A?\", \"answer\": \"R. #### 5\"}\n\
             {\"question\": \"B?\", \"answer\": \"S <<1+1=2>>2. #### 2\"}\n",
        )
        .unwrap();
        let path = dir.join("prompts.toml");
        std::fs::write(
            &path,
            r#"
[basic]
template = "Q: {question}\nA:"

[fewshot]
k = 1
examples_file = "ex.jsonl"

[boolq]
template = "Question: {question}\nPassage: {passage}\nAnswer:"

[mcq]
template = "{question}\n{choices}\nAnswer:"
"#,
        )
        .unwrap();
        let p = PromptSet::from_toml_file(&path).unwrap();
        assert_eq!(p.style_names(), ["basic", "0shot", "fewshot", "boolq", "mcq"]);
        assert_eq!(p.fewshot_k(), 1);
        assert_eq!(p.style("0shot").unwrap().template, ZERO_SHOT_TEMPLATE);
        assert_eq!(p.style("fewshot").unwrap().example_template.as_deref(), Some(FEWSHOT_EXAMPLE_TEMPLATE));
        assert_eq!(p.style("boolq").unwrap().template, BOOLQ_TEMPLATE);
        let it = item("0", &[("question", "q"), ("choices", "A. x\nB. y")]);
        assert_eq!(p.render("basic", &it, &[]).unwrap(), "Q: q\nA:");
        assert_eq!(p.render("mcq", &it, &[]).unwrap(), "q\nA. x\nB. y\nAnswer:");
        // The GSM8K-shaped examples file: rows without reasoning are skipped, k = 1 taken.
        let ex = p.examples_from_file("fewshot").unwrap().unwrap();
        assert_eq!(ex.len(), 1);
        assert_eq!(ex[0].question(), "A?");
        // fewshot keeps the basic template for the question, not the overridden `basic`.
        assert_eq!(p.render("fewshot", &it, &ex).unwrap(), "Question: A?\nAnswer: R. The answer is 5.\n\nQuestion: q\nAnswer:");
        assert!(PromptSet::builtin().examples_from_file("fewshot").unwrap().is_none());
    }

    #[test]
    fn toml_errors() {
        let base = Path::new(".");
        let err = PromptSet::from_toml_str("[basic]\ntemplat = \"x\"\n", base).unwrap_err().to_string();
        assert!(err.contains("templat"), "{err}");
        let err = PromptSet::from_toml_str("[new]\nk = 2\n", base).unwrap_err().to_string();
        assert!(err.contains("`new` has no `template`"), "{err}");
        let err = format!("{:#}", PromptSet::from_toml_str("[x]\ntemplate = \"{oops\"\n", base).unwrap_err());
        assert!(err.contains("style `x`") && err.contains("unclosed"), "{err}");
        let err = PromptSet::from_toml_file("/nonexistent/p.toml").unwrap_err().to_string();
        assert!(err.contains("/nonexistent/p.toml"), "{err}");
        // A custom few-shot style gets the default example template when it sets k.
        let p = PromptSet::from_toml_str("[fs3]\ntemplate = \"Q: {question}\"\nk = 3\n", base).unwrap();
        assert_eq!(p.style("fs3").unwrap().k(), 3);
        assert_eq!(p.style("basic").unwrap().k(), 0);
    }

    #[test]
    fn split_examples_is_disjoint() {
        let mut items: Vec<Item> = (0..6).map(worked).collect();
        items[4].fields.remove("reasoning");
        let (eval, ex) = split_examples(items, 4, 2);
        assert_eq!(eval.iter().map(|i| i.id.as_str()).collect::<Vec<_>>(), ["ex0", "ex1", "ex2", "ex3"]);
        assert_eq!(ex.iter().map(|i| i.id.as_str()).collect::<Vec<_>>(), ["ex5"]);
        let (eval, ex) = split_examples((0..3).map(worked).collect(), 10, 2);
        assert_eq!((eval.len(), ex.len()), (3, 0));
    }

    #[test]
    fn gsm8k_fewshot_from_real_data() {
        let Some(a) = assets() else { return };
        let rows = load_rows(a.join("reasoning/gsm8k/test.jsonl").to_str().unwrap(), "test").unwrap();
        let items = crate::data::shuffle_take(normalize(rows, DatasetKind::Gsm8k).unwrap(), true, 0, None);
        let p = PromptSet::builtin();
        let (eval, ex) = split_examples(items, 100, p.fewshot_k());
        assert_eq!((eval.len(), ex.len()), (100, 2));
        assert!(eval.iter().all(|e| ex.iter().all(|x| x.id != e.id)));
        let prompt = p.render("fewshot", &eval[0], &ex).unwrap();
        assert!(prompt.starts_with(&format!("Question: {}\nAnswer: ", ex[0].question().trim())));
        assert!(prompt.contains(&format!("The answer is {}.\n\n", ex[1].answer().unwrap())));
        assert!(prompt.ends_with(&format!("Question: {}\nAnswer:", eval[0].question().trim())));
        assert!(!prompt.contains("<<"));
        // BoolQ steering prompt on the real first row.
        let rows = load_rows(a.join("boolq/validation.jsonl").to_str().unwrap(), "validation").unwrap();
        let boolq = normalize(rows, DatasetKind::BoolQ).unwrap();
        let text = render_template(BOOLQ_TEMPLATE, &boolq[0], "boolq").unwrap();
        assert!(text.starts_with("Question: does ethanol take more energy make that produces\nPassage: All biomass"));
        assert!(text.ends_with(".\nAnswer:"), "{}", &text[text.len() - 40..]);
    }

    #[test]
    fn fewshot_overridden_by_a_template_alone_generates_no_examples() {
        let p = PromptSet::from_toml_str("[fewshot]\ntemplate = \"Q: 1+1?\\nA: 2.\\n\\nQ: {question}\\nA:\"\n", Path::new(".")).unwrap();
        let style = p.style("fewshot").unwrap();
        assert!(!style.is_fewshot());
        assert_eq!(p.fewshot_k(), 0);
        let it = Item { id: "0".into(), fields: [("question".to_string(), serde_json::json!("q"))].into_iter().collect() };
        assert_eq!(p.render("fewshot", &it, &[]).unwrap(), "Q: 1+1?\nA: 2.\n\nQ: q\nA:");
    }
}
