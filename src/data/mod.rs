//! Datasets: loading rows from JSONL, JSON, Parquet or the Hugging Face hub, and normalizing
//! them into flat string fields that prompt templates can use.
//!
//! Loading ([`load_rows`]) keeps each row as it is in the file. Normalizing ([`normalize`])
//! turns a known layout (GSM8K, BoolQ, StrategyQA, ARC, CommonsenseQA, or user-named fields)
//! into [`Item`]s whose fields are all strings: always `question`, `answer` when known, and
//! per kind `passage`, `reasoning` or `choices`.

pub mod prompts;

use std::fmt;
use std::fs::File;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::str::FromStr;

use anyhow::{anyhow, bail, Context, Result};
use arrow_array::{
    Array, BooleanArray, Float32Array, Float64Array, Int16Array, Int32Array, Int64Array,
    Int8Array, LargeListArray, LargeStringArray, ListArray, StringArray, StructArray,
    UInt16Array, UInt32Array, UInt64Array, UInt8Array,
};
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{Map, Value};

use crate::hub::HubRepo;

/// One dataset row as read from the file: field name to JSON value.
pub type Row = Map<String, Value>;

// ---------------------------------------------------------------------------------------------
// Loading
// ---------------------------------------------------------------------------------------------

/// Loads the rows of a dataset.
///
/// `spec` is a local `.jsonl`, `.json` or `.parquet` file, or a hub dataset id such as
/// `google/boolq`. For a hub id the repository's parquet files whose path contains `split` are
/// downloaded (through the hub cache) and read in path order. For a `.json` file holding an
/// object, the rows are taken from its list under `data`, `rows` or `split`. `split` is
/// otherwise ignored for local files.
pub fn load_rows(spec: &str, split: &str) -> Result<Vec<Row>> {
    let path = Path::new(spec);
    let ext = path.extension().and_then(|e| e.to_str()).map(|e| e.to_ascii_lowercase());
    match ext.as_deref() {
        Some("jsonl") | Some("json") | Some("parquet") => {
            if !path.is_file() {
                bail!("{spec}: no such file");
            }
            match ext.as_deref() {
                Some("jsonl") => read_jsonl(path),
                Some("json") => read_json(path, split),
                _ => read_parquet(path),
            }
        }
        _ if path.exists() => {
            bail!("{spec}: unsupported dataset file (expected .jsonl, .json or .parquet)")
        }
        _ if looks_like_hub_id(spec) => load_hub(spec, split),
        _ => bail!("{spec}: no such file (and not a hub dataset id like `google/boolq`)"),
    }
}

/// Whether `spec` has the shape of a hub id: `name` or `owner/name`, no extension.
fn looks_like_hub_id(spec: &str) -> bool {
    let parts: Vec<&str> = spec.split('/').collect();
    !spec.is_empty()
        && parts.len() <= 2
        && parts.iter().all(|p| {
            !p.is_empty()
                && p.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
                && !p.starts_with('.')
        })
}

/// The parquet files among a hub repository's `files` that belong to `split`: those whose path
/// contains the split name, sorted by path.
pub fn pick_split_files(files: &[String], split: &str) -> Vec<String> {
    let mut picked: Vec<String> = files
        .iter()
        .filter(|f| f.ends_with(".parquet") && f.contains(split))
        .cloned()
        .collect();
    picked.sort();
    // Datasets with several configurations keep them in folders (openai/gsm8k: main/, socratic/):
    // read one, `main` or `default` when present, else the first.
    let folder = |f: &String| f.split_once('/').map(|(d, _)| d.to_string()).unwrap_or_default();
    let mut folders: Vec<String> = picked.iter().map(folder).collect();
    folders.dedup();
    if folders.len() > 1 {
        let keep = ["main", "default", "data"]
            .iter()
            .find(|k| folders.iter().any(|f| f == *k))
            .map(|k| k.to_string())
            .unwrap_or_else(|| folders[0].clone());
        picked.retain(|f| folder(f) == keep);
    }
    picked
}

fn load_hub(id: &str, split: &str) -> Result<Vec<Row>> {
    let repo = HubRepo::dataset(id);
    let files = repo.list_files()?;
    let picked = pick_split_files(&files, split);
    if picked.is_empty() {
        let parquet: Vec<&String> = files.iter().filter(|f| f.ends_with(".parquet")).collect();
        bail!("{id}: no parquet file for split `{split}` (parquet files: {parquet:?})");
    }
    let mut rows = Vec::new();
    for file in picked {
        let local = repo.get(&file)?;
        rows.extend(read_parquet(&local).with_context(|| format!("{id}: {file}"))?);
    }
    Ok(rows)
}

fn read_jsonl(path: &Path) -> Result<Vec<Row>> {
    let file = File::open(path).with_context(|| format!("{}: cannot open", path.display()))?;
    let mut rows = Vec::new();
    for (i, line) in BufReader::new(file).lines().enumerate() {
        let line = line.with_context(|| format!("{}:{}: cannot read", path.display(), i + 1))?;
        if line.trim().is_empty() {
            continue;
        }
        match serde_json::from_str::<Value>(&line) {
            Ok(Value::Object(row)) => rows.push(row),
            Ok(_) => bail!("{}:{}: expected a JSON object", path.display(), i + 1),
            Err(e) => bail!("{}:{}: bad JSON ({e})", path.display(), i + 1),
        }
    }
    Ok(rows)
}

fn read_json(path: &Path, split: &str) -> Result<Vec<Row>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("{}: cannot read", path.display()))?;
    let value: Value =
        serde_json::from_str(&text).map_err(|e| anyhow!("{}: bad JSON ({e})", path.display()))?;
    let list = match value {
        Value::Array(list) => list,
        Value::Object(mut obj) => {
            let key = ["data", "rows", split]
                .into_iter()
                .find(|k| obj.get(*k).is_some_and(Value::is_array))
                .ok_or_else(|| {
                    anyhow!(
                        "{}: a JSON object without a list under \"data\", \"rows\" or \"{split}\"",
                        path.display()
                    )
                })?;
            match obj.remove(key) {
                Some(Value::Array(list)) => list,
                _ => unreachable!(),
            }
        }
        _ => bail!("{}: expected a JSON array of objects", path.display()),
    };
    list.into_iter()
        .enumerate()
        .map(|(i, v)| match v {
            Value::Object(row) => Ok(row),
            _ => bail!("{}: element {i} is not a JSON object", path.display()),
        })
        .collect()
}

fn read_parquet(path: &Path) -> Result<Vec<Row>> {
    let file = File::open(path).with_context(|| format!("{}: cannot open", path.display()))?;
    let reader = ParquetRecordBatchReaderBuilder::try_new(file)
        .with_context(|| format!("{}: not a parquet file", path.display()))?
        .build()?;
    let mut rows = Vec::new();
    for batch in reader {
        let batch = batch.with_context(|| format!("{}: cannot read", path.display()))?;
        let schema = batch.schema();
        let names: Vec<String> = schema.fields().iter().map(|f| f.name().to_string()).collect();
        let columns: Vec<Vec<Value>> = batch
            .columns()
            .iter()
            .zip(&names)
            .map(|(col, name)| {
                array_to_json(col.as_ref())
                    .with_context(|| format!("{}: column `{name}`", path.display()))
            })
            .collect::<Result<_>>()?;
        for r in 0..batch.num_rows() {
            let mut row = Row::new();
            for (name, col) in names.iter().zip(&columns) {
                row.insert(name.clone(), col[r].clone());
            }
            rows.push(row);
        }
    }
    Ok(rows)
}

/// Every element of an Arrow array as a JSON value (nulls as `null`).
fn array_to_json(arr: &dyn Array) -> Result<Vec<Value>> {
    let any = arr.as_any();
    let n = arr.len();
    macro_rules! each {
        ($ty:ty, $f:expr) => {
            if let Some(a) = any.downcast_ref::<$ty>() {
                return Ok((0..n)
                    .map(|i| if a.is_null(i) { Value::Null } else { $f(a, i) })
                    .collect());
            }
        };
    }
    each!(StringArray, |a: &StringArray, i| Value::from(a.value(i)));
    each!(LargeStringArray, |a: &LargeStringArray, i| Value::from(a.value(i)));
    each!(BooleanArray, |a: &BooleanArray, i| Value::from(a.value(i)));
    each!(Int64Array, |a: &Int64Array, i| Value::from(a.value(i)));
    each!(Int32Array, |a: &Int32Array, i| Value::from(a.value(i)));
    each!(Int16Array, |a: &Int16Array, i| Value::from(a.value(i)));
    each!(Int8Array, |a: &Int8Array, i| Value::from(a.value(i)));
    each!(UInt64Array, |a: &UInt64Array, i| Value::from(a.value(i)));
    each!(UInt32Array, |a: &UInt32Array, i| Value::from(a.value(i)));
    each!(UInt16Array, |a: &UInt16Array, i| Value::from(a.value(i)));
    each!(UInt8Array, |a: &UInt8Array, i| Value::from(a.value(i)));
    each!(Float64Array, |a: &Float64Array, i| float(a.value(i)));
    each!(Float32Array, |a: &Float32Array, i| float(a.value(i) as f64));
    if let Some(a) = any.downcast_ref::<ListArray>() {
        return (0..n)
            .map(|i| if a.is_null(i) { Ok(Value::Null) } else { array_to_json(a.value(i).as_ref()).map(Value::Array) })
            .collect();
    }
    if let Some(a) = any.downcast_ref::<LargeListArray>() {
        return (0..n)
            .map(|i| if a.is_null(i) { Ok(Value::Null) } else { array_to_json(a.value(i).as_ref()).map(Value::Array) })
            .collect();
    }
    if let Some(a) = any.downcast_ref::<StructArray>() {
        let names: Vec<String> = a.column_names().iter().map(|s| s.to_string()).collect();
        let cols: Vec<Vec<Value>> =
            a.columns().iter().map(|c| array_to_json(c.as_ref())).collect::<Result<_>>()?;
        return Ok((0..n)
            .map(|i| {
                if a.is_null(i) {
                    return Value::Null;
                }
                let obj: Row = names.iter().zip(&cols).map(|(k, c)| (k.clone(), c[i].clone())).collect();
                Value::Object(obj)
            })
            .collect());
    }
    bail!("unsupported parquet column type {:?}", arr.data_type())
}

/// A float as JSON (non-finite values, which JSON cannot hold, become `null`).
fn float(x: f64) -> Value {
    serde_json::Number::from_f64(x).map(Value::Number).unwrap_or(Value::Null)
}

// ---------------------------------------------------------------------------------------------
// Normalizing
// ---------------------------------------------------------------------------------------------

/// A dataset layout that [`normalize`] understands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DatasetKind {
    /// GSM8K: `question`, `answer` = reasoning then `#### N`.
    Gsm8k,
    /// BoolQ, in the google/boolq layout (`answer` bool) or SuperGLUE's (`label`).
    BoolQ,
    /// StrategyQA: `question`, `answer` bool, `facts` list.
    StrategyQa,
    /// AI2 ARC: `question{stem, choices[{text, label}]}`, `answerKey`.
    Arc,
    /// CommonsenseQA: `question` string, `choices{label[], text[]}`, `answerKey`.
    CommonsenseQa,
    /// User-named fields: the question field, and optionally the answer and passage fields.
    Custom {
        /// Name of the question field.
        question: String,
        /// Name of the answer field, if any.
        answer: Option<String>,
        /// Name of the passage field, if any.
        passage: Option<String>,
    },
}

impl DatasetKind {
    /// The kind's short name (`custom` for [`DatasetKind::Custom`]).
    pub fn name(&self) -> &'static str {
        match self {
            DatasetKind::Gsm8k => "gsm8k",
            DatasetKind::BoolQ => "boolq",
            DatasetKind::StrategyQa => "strategyqa",
            DatasetKind::Arc => "arc",
            DatasetKind::CommonsenseQa => "commonsenseqa",
            DatasetKind::Custom { .. } => "custom",
        }
    }
}

impl fmt::Display for DatasetKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for DatasetKind {
    type Err = anyhow::Error;

    /// Parses `gsm8k`, `boolq`, `strategyqa`, `arc` or `commonsenseqa` (any case; `-`/`_`
    /// ignored). Custom kinds are built from field names, not parsed.
    fn from_str(s: &str) -> Result<Self> {
        let key: String = s.chars().filter(|c| *c != '-' && *c != '_').collect::<String>().to_lowercase();
        Ok(match key.as_str() {
            "gsm8k" => DatasetKind::Gsm8k,
            "boolq" => DatasetKind::BoolQ,
            "strategyqa" => DatasetKind::StrategyQa,
            "arc" => DatasetKind::Arc,
            "commonsenseqa" | "csqa" => DatasetKind::CommonsenseQa,
            _ => bail!("unknown dataset kind `{s}` (known: gsm8k, boolq, strategyqa, arc, commonsenseqa)"),
        })
    }
}

/// Guesses the layout from the first row's fields. Rows that match no known layout give
/// [`DatasetKind::Custom`] with fields `question`, and `answer`/`passage` where present.
pub fn detect_kind(rows: &[Row]) -> DatasetKind {
    let custom = |row: Option<&Row>| DatasetKind::Custom {
        question: "question".into(),
        answer: row.filter(|r| r.contains_key("answer")).map(|_| "answer".into()),
        passage: row.filter(|r| r.contains_key("passage")).map(|_| "passage".into()),
    };
    let Some(row) = rows.first() else { return custom(None) };
    let has = |k: &str| row.contains_key(k);
    if has("facts") && has("question") && has("answer") {
        return DatasetKind::StrategyQa;
    }
    if has("answerKey") {
        match row.get("question") {
            Some(Value::Object(_)) => return DatasetKind::Arc,
            Some(Value::String(_)) if row.get("choices").is_some_and(Value::is_object) => {
                return DatasetKind::CommonsenseQa
            }
            _ => {}
        }
    }
    if has("question") && has("passage") && (has("answer") || has("label")) {
        return DatasetKind::BoolQ;
    }
    // GSM8K answers end in `#### N`; look past a first row that lacks it.
    let gsm8k_answer = |r: &Row| matches!(r.get("answer"), Some(Value::String(a)) if a.contains("####"));
    if rows.iter().take(20).any(gsm8k_answer) {
        return DatasetKind::Gsm8k;
    }
    custom(Some(row))
}

/// One normalized example: an id and flat string fields for templates.
#[derive(Debug, Clone, PartialEq)]
pub struct Item {
    /// The row's `id`, `qid` or `idx` field, else its index in the file.
    pub id: String,
    /// Field name to string value (every value is a JSON string).
    pub fields: Row,
}

impl Item {
    /// A field's text, if present.
    pub fn get(&self, field: &str) -> Option<&str> {
        self.fields.get(field).and_then(Value::as_str)
    }

    /// The `question` field ("" if absent).
    pub fn question(&self) -> &str {
        self.get("question").unwrap_or("")
    }

    /// The `answer` field, if known.
    pub fn answer(&self) -> Option<&str> {
        self.get("answer")
    }
}

/// Turns raw rows into [`Item`]s with flat string fields (see the module docs and
/// [`DatasetKind`]). A row missing a required field gives an error naming the row and field.
pub fn normalize(rows: Vec<Row>, kind: DatasetKind) -> Result<Vec<Item>> {
    rows.into_iter()
        .enumerate()
        .map(|(i, row)| {
            let id = row_id(&row).unwrap_or_else(|| i.to_string());
            let fields = normalize_row(&row, &kind)
                .with_context(|| format!("row {i} (id {id}) as {kind}"))?;
            Ok(Item { id, fields })
        })
        .collect()
}

/// Refuses two items with one id, where ids pair an item's results (across prompt styles,
/// configurations and runs): names both items' places.
pub fn check_unique_ids(items: &[Item]) -> Result<()> {
    let mut first = std::collections::HashMap::new();
    for (i, it) in items.iter().enumerate() {
        if let Some(j) = first.insert(it.id.as_str(), i) {
            bail!("items {j} and {i} share the id `{}` (ids pair an item's results across prompt styles, configurations and runs)", it.id);
        }
    }
    Ok(())
}

fn row_id(row: &Row) -> Option<String> {
    ["id", "qid", "idx"].iter().find_map(|k| match row.get(*k) {
        Some(Value::String(s)) => Some(s.clone()),
        Some(Value::Number(n)) => Some(n.to_string()),
        _ => None,
    })
}

fn normalize_row(row: &Row, kind: &DatasetKind) -> Result<Row> {
    let mut out = Row::new();
    let mut put = |k: &str, v: String| {
        out.insert(k.to_string(), Value::String(v));
    };
    match kind {
        DatasetKind::Gsm8k => {
            put("question", text(row, "question")?);
            let full = text(row, "answer")?;
            let (reasoning, answer) = full
                .rsplit_once("####")
                .ok_or_else(|| anyhow!("field `answer` has no `####` final answer"))?;
            put("answer", answer.trim().replace(',', ""));
            put("reasoning", strip_calculator(reasoning).trim().to_string());
        }
        DatasetKind::BoolQ => {
            put("question", text(row, "question")?);
            put("passage", text(row, "passage")?);
            let label = row
                .get("answer")
                .or_else(|| row.get("label"))
                .ok_or_else(|| anyhow!("missing field `answer` (or `label`)"))?;
            put("answer", bool_answer(label)?.to_string());
        }
        DatasetKind::StrategyQa => {
            put("question", text(row, "question")?);
            put("answer", bool_answer(field(row, "answer")?)?.to_string());
            let facts = match row.get("facts") {
                Some(Value::Array(f)) => f.iter().filter_map(Value::as_str).map(str::trim).collect::<Vec<_>>().join(" "),
                Some(Value::String(s)) => s.trim().to_string(),
                _ => String::new(),
            };
            put("reasoning", facts);
        }
        DatasetKind::Arc => {
            let q = field(row, "question")?;
            let stem = q.get("stem").and_then(Value::as_str).ok_or_else(|| anyhow!("missing `question.stem`"))?;
            put("question", stem.to_string());
            let choices = q.get("choices").and_then(Value::as_array).ok_or_else(|| anyhow!("missing `question.choices`"))?;
            let lines = choices
                .iter()
                .map(|c| {
                    let label = c.get("label").map(scalar_text).unwrap_or_default();
                    let t = c.get("text").map(scalar_text).unwrap_or_default();
                    format!("{label}. {t}")
                })
                .collect::<Vec<_>>();
            put("choices", lines.join("\n"));
            put("answer", text(row, "answerKey")?);
        }
        DatasetKind::CommonsenseQa => {
            put("question", text(row, "question")?);
            let choices = field(row, "choices")?;
            let labels = choices.get("label").and_then(Value::as_array).ok_or_else(|| anyhow!("missing `choices.label`"))?;
            let texts = choices.get("text").and_then(Value::as_array).ok_or_else(|| anyhow!("missing `choices.text`"))?;
            if labels.len() != texts.len() {
                bail!("`choices.label` and `choices.text` differ in length");
            }
            let lines = labels
                .iter()
                .zip(texts)
                .map(|(l, t)| format!("{}. {}", scalar_text(l), scalar_text(t)))
                .collect::<Vec<_>>();
            put("choices", lines.join("\n"));
            if let Some(a) = row.get("answerKey").filter(|v| !v.is_null()) {
                put("answer", scalar_text(a));
            }
        }
        DatasetKind::Custom { question, answer, passage } => {
            for (k, v) in row {
                if matches!(v, Value::String(_) | Value::Number(_) | Value::Bool(_)) {
                    put(k, scalar_text(v));
                }
            }
            put("question", text(row, question)?);
            if let Some(a) = answer {
                put("answer", scalar_text(field(row, a)?));
            }
            if let Some(p) = passage {
                put("passage", text(row, p)?);
            }
        }
    }
    Ok(out)
}

fn field<'a>(row: &'a Row, name: &str) -> Result<&'a Value> {
    row.get(name).filter(|v| !v.is_null()).ok_or_else(|| anyhow!("missing field `{name}`"))
}

/// A string, number or bool field as text.
fn text(row: &Row, name: &str) -> Result<String> {
    match field(row, name)? {
        v @ (Value::String(_) | Value::Number(_) | Value::Bool(_)) => Ok(scalar_text(v)),
        _ => bail!("field `{name}` is not a string"),
    }
}

/// A scalar as text: strings as they are, bools as `True`/`False`, numbers in JSON form.
fn scalar_text(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Bool(b) => if *b { "True" } else { "False" }.to_string(),
        Value::Null => String::new(),
        other => other.to_string(),
    }
}

/// `True`/`False` from a JSON bool, a string `true`/`false` (any case) or the integers 1/0.
fn bool_answer(v: &Value) -> Result<&'static str> {
    let b = match v {
        Value::Bool(b) => *b,
        Value::String(s) if s.trim().eq_ignore_ascii_case("true") => true,
        Value::String(s) if s.trim().eq_ignore_ascii_case("false") => false,
        Value::Number(n) if n.as_u64() == Some(1) => true,
        Value::Number(n) if n.as_u64() == Some(0) => false,
        other => bail!("expected a true/false answer, got {other}"),
    };
    Ok(if b { "True" } else { "False" })
}

/// Removes GSM8K calculator annotations `<<...>>`.
fn strip_calculator(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(start) = rest.find("<<") {
        match rest[start..].find(">>") {
            Some(end) => {
                out.push_str(&rest[..start]);
                rest = &rest[start + end + 2..];
            }
            None => break,
        }
    }
    out.push_str(rest);
    out
}

/// Shuffles (when `shuffle` is set) with a seeded Fisher–Yates shuffle
/// (`StdRng::seed_from_u64(seed)`), then keeps the first `n` items (all when `None`).
/// The same seed gives the same order on every run.
pub fn shuffle_take(mut items: Vec<Item>, shuffle: bool, seed: u64, n: Option<usize>) -> Vec<Item> {
    if shuffle {
        let mut rng = StdRng::seed_from_u64(seed);
        for i in (1..items.len()).rev() {
            let j = rng.gen_range(0..=i);
            items.swap(i, j);
        }
    }
    if let Some(n) = n {
        items.truncate(n);
    }
    items
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::path::PathBuf;

    /// The shared assets folder, or `None` after a loud skip message.
    pub(crate) fn assets() -> Option<PathBuf> {
        let dir = std::env::var_os("NEUROSTEER_SHARED")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared"));
        let assets = dir.join("assets");
        if assets.is_dir() {
            Some(assets)
        } else {
            eprintln!(
                "\n*** SKIPPED: shared test data not found at {} (set NEUROSTEER_SHARED) ***\n",
                assets.display()
            );
            None
        }
    }

    fn load(path: &Path) -> Vec<Row> {
        load_rows(path.to_str().unwrap(), "validation").unwrap()
    }

    fn tmp_file(name: &str, content: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("neurosteer-data-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join(name);
        std::fs::write(&p, content).unwrap();
        p
    }

    #[test]
    fn boolq_jsonl_and_parquet() {
        let Some(a) = assets() else { return };
        let rows = load(&a.join("boolq/validation.jsonl"));
        assert_eq!(detect_kind(&rows), DatasetKind::BoolQ);
        let items = normalize(rows, DatasetKind::BoolQ).unwrap();
        assert_eq!(items.len(), 3270);
        assert_eq!(items.iter().filter(|i| i.answer() == Some("True")).count(), 2033);
        assert_eq!(items[0].id, "0");
        assert_eq!(items[0].question(), "does ethanol take more energy make that produces");
        assert_eq!(items[0].answer(), Some("False"));
        assert!(items[0].get("passage").unwrap().starts_with("All biomass goes through"));

        let prows = load(&a.join("boolq/validation.parquet"));
        assert_eq!(detect_kind(&prows), DatasetKind::BoolQ);
        assert!(prows[0]["answer"].is_boolean());
        let pitems = normalize(prows, DatasetKind::BoolQ).unwrap();
        assert_eq!(items, pitems);
    }

    #[test]
    fn boolq_superglue_layout() {
        let Some(a) = assets() else { return };
        let rows = load(&a.join("boolq/superglue_val.jsonl"));
        assert_eq!(detect_kind(&rows), DatasetKind::BoolQ);
        let sg = normalize(rows, DatasetKind::BoolQ).unwrap();
        let g = normalize(load(&a.join("boolq/validation.jsonl")), DatasetKind::BoolQ).unwrap();
        assert_eq!(sg.len(), 3270);
        assert_eq!(sg[5].id, "5");
        assert!(sg[0].get("passage").unwrap().starts_with("Ethanol fuel -- "));
        for (s, g) in sg.iter().zip(&g) {
            assert_eq!(s.question(), g.question());
            assert_eq!(s.answer(), g.answer());
            assert!(s.get("passage").unwrap().ends_with(g.get("passage").unwrap()));
        }
    }

    #[test]
    fn gsm8k_test_set() {
        let Some(a) = assets() else { return };
        let rows = load(&a.join("reasoning/gsm8k/test.jsonl"));
        assert_eq!(detect_kind(&rows), DatasetKind::Gsm8k);
        let items = normalize(rows, DatasetKind::Gsm8k).unwrap();
        assert_eq!(items.len(), 1319);
        assert_eq!(items[0].answer(), Some("18"));
        assert_eq!(
            items[0].get("reasoning").unwrap(),
            "Janet sells 16 - 3 - 4 = 9 duck eggs a day.\nShe makes 9 * 2 = $18 every day at the farmer\u{2019}s market."
        );
        assert_eq!(items[1].answer(), Some("3"));
        for it in &items {
            let r = it.get("reasoning").unwrap();
            assert!(!r.contains("<<") && !r.contains("####"), "{}", it.id);
            assert!(it.answer().unwrap().parse::<f64>().is_ok(), "{:?}", it.answer());
        }
    }

    #[test]
    fn strategyqa_train() {
        let Some(a) = assets() else { return };
        let rows = load(&a.join("reasoning/strategyqa/strategyqa_train.json"));
        assert_eq!(detect_kind(&rows), DatasetKind::StrategyQa);
        let items = normalize(rows, DatasetKind::StrategyQa).unwrap();
        assert_eq!(items.len(), 2290);
        assert_eq!(items[0].id, "b8677742616fef051f00");
        assert_eq!(items[0].answer(), Some("True"));
        assert_eq!(items[1].answer(), Some("False"));
        assert!(items[0]
            .get("reasoning")
            .unwrap()
            .starts_with("Julius Caesar had three children. Genghis Khan had sixteen children. Modern"));
    }

    #[test]
    fn commonsenseqa_dev() {
        let Some(a) = assets() else { return };
        let rows = load(&a.join("reasoning/commonsenseqa/dev_rand_split.jsonl"));
        assert_eq!(detect_kind(&rows), DatasetKind::CommonsenseQa);
        let items = normalize(rows, DatasetKind::CommonsenseQa).unwrap();
        assert_eq!(items.len(), 1221);
        assert_eq!(items[0].id, "1afa02df02c908a558b4036e80242fac");
        assert_eq!(items[0].get("choices").unwrap(), "A. bank\nB. library\nC. department store\nD. mall\nE. new york");
        assert_eq!(items[0].answer(), Some("A"));
    }

    #[test]
    fn arc_files() {
        let Some(a) = assets() else { return };
        let rows = load(&a.join("reasoning/arc/ARC-Easy-Test.jsonl"));
        assert_eq!(detect_kind(&rows), DatasetKind::Arc);
        let items = normalize(rows, DatasetKind::Arc).unwrap();
        assert_eq!(items.len(), 2376);
        assert_eq!(items[0].id, "Mercury_417466");
        assert_eq!(
            items[0].question(),
            "Which statement best explains why photosynthesis is the foundation of most food webs?"
        );
        assert!(items[0].get("choices").unwrap().starts_with("A. Sunlight is the source of energy"));
        assert_eq!(items[0].get("choices").unwrap().lines().count(), 4);
        assert_eq!(items[0].answer(), Some("A"));
        for (file, n) in [("ARC-Easy-Dev", 570), ("ARC-Challenge-Dev", 299), ("ARC-Challenge-Test", 1172)] {
            let rows = load(&a.join(format!("reasoning/arc/{file}.jsonl")));
            assert_eq!(normalize(rows, DatasetKind::Arc).unwrap().len(), n, "{file}");
        }
    }

    #[test]
    fn malformed_jsonl_names_the_line() {
        let p = tmp_file("bad.jsonl", "{\"question\": \"a\"}\n\n{\"question\": oops}\n");
        let err = load_rows(p.to_str().unwrap(), "train").unwrap_err().to_string();
        assert!(err.contains("bad.jsonl:3:"), "{err}");
        assert!(!err.contains('\n'), "{err}");
        let p = tmp_file("notobj.jsonl", "[1, 2]\n");
        let err = load_rows(p.to_str().unwrap(), "train").unwrap_err().to_string();
        assert!(err.contains("notobj.jsonl:1: expected a JSON object"), "{err}");
    }

    #[test]
    fn missing_file_and_bad_specs() {
        let err = load_rows("/nonexistent/x.jsonl", "train").unwrap_err().to_string();
        assert_eq!(err, "/nonexistent/x.jsonl: no such file");
        let err = load_rows("/nonexistent/x.parquet", "train").unwrap_err().to_string();
        assert_eq!(err, "/nonexistent/x.parquet: no such file");
        assert!(load_rows("./nope/a/b", "train").unwrap_err().to_string().contains("no such file"));
        assert!(looks_like_hub_id("google/boolq"));
        assert!(looks_like_hub_id("gsm8k"));
        assert!(!looks_like_hub_id("/abs/path"));
        assert!(!looks_like_hub_id("a/b/c"));
    }

    #[test]
    fn json_object_layouts() {
        let p = tmp_file("obj.json", r#"{"meta": 1, "validation": [{"question": "q", "answer": 2, "idx": 7}]}"#);
        let rows = load_rows(p.to_str().unwrap(), "validation").unwrap();
        assert_eq!(rows.len(), 1);
        let items = normalize(rows, detect_kind(&load_rows(p.to_str().unwrap(), "validation").unwrap())).unwrap();
        assert_eq!(items[0].id, "7");
        assert_eq!(items[0].answer(), Some("2"));
        let p = tmp_file("data.json", r#"{"data": [{"q": "x"}]}"#);
        assert_eq!(load_rows(p.to_str().unwrap(), "train").unwrap().len(), 1);
        let p = tmp_file("none.json", r#"{"other": []}"#);
        assert!(load_rows(p.to_str().unwrap(), "train").is_err());
    }

    #[test]
    fn split_file_picking_one_config() {
        let files: Vec<String> = ["main/test-00000-of-00001.parquet", "socratic/test-00000-of-00001.parquet", "main/train-00000-of-00001.parquet"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        assert_eq!(pick_split_files(&files, "test"), vec!["main/test-00000-of-00001.parquet".to_string()]);
    }

    #[test]
    fn split_file_picking() {
        let files: Vec<String> = [
            "README.md",
            "data/validation-00000-of-00001.parquet",
            "data/train-00001-of-00002.parquet",
            "data/train-00000-of-00002.parquet",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        assert_eq!(pick_split_files(&files, "validation"), vec!["data/validation-00000-of-00001.parquet"]);
        assert_eq!(
            pick_split_files(&files, "train"),
            vec!["data/train-00000-of-00002.parquet", "data/train-00001-of-00002.parquet"]
        );
        assert!(pick_split_files(&files, "test").is_empty());
    }

    fn row(v: Value) -> Row {
        v.as_object().unwrap().clone()
    }

    #[test]
    fn boolq_label_forms_and_errors() {
        let rows = vec![
            row(serde_json::json!({"question": "q", "passage": "p", "label": "TRUE", "idx": 30})),
            row(serde_json::json!({"question": "q", "passage": "p", "label": false})),
            row(serde_json::json!({"question": "q", "passage": "p", "answer": "False"})),
            row(serde_json::json!({"question": "q", "passage": "p", "label": 1})),
        ];
        let items = normalize(rows, DatasetKind::BoolQ).unwrap();
        let answers: Vec<_> = items.iter().map(|i| i.answer().unwrap()).collect();
        assert_eq!(answers, ["True", "False", "False", "True"]);
        assert_eq!(items[0].id, "30");
        assert_eq!(items[1].id, "1");
        // An id twice (here a row's index equal to another's idx) pairs nothing reliably.
        let twice = vec![
            row(serde_json::json!({"question": "q", "passage": "p", "label": true, "idx": 2})),
            row(serde_json::json!({"question": "q", "passage": "p", "label": true})),
            row(serde_json::json!({"question": "q", "passage": "p", "label": true})),
        ];
        let err = check_unique_ids(&normalize(twice, DatasetKind::BoolQ).unwrap()).unwrap_err().to_string();
        assert!(err.contains("items 0 and 2 share the id `2`"), "{err}");
        let err = normalize(vec![row(serde_json::json!({"question": "q", "label": true}))], DatasetKind::BoolQ)
            .unwrap_err();
        assert!(format!("{err:#}").contains("missing field `passage`"), "{err:#}");
        let err = normalize(vec![row(serde_json::json!({"question": "q", "passage": "p", "label": "maybe"}))], DatasetKind::BoolQ)
            .unwrap_err();
        assert!(format!("{err:#}").contains("row 0"), "{err:#}");
    }

    #[test]
    fn custom_fields() {
        let rows = vec![row(serde_json::json!({
            "prompt": " Is it? ", "gold": true, "ctx": "text", "n": 4, "tags": ["x"], "qid": "a1"
        }))];
        let kind = DatasetKind::Custom {
            question: "prompt".into(),
            answer: Some("gold".into()),
            passage: Some("ctx".into()),
        };
        let items = normalize(rows, kind).unwrap();
        let f = &items[0].fields;
        assert_eq!(items[0].id, "a1");
        assert_eq!(f["question"], " Is it? ");
        assert_eq!(f["answer"], "True");
        assert_eq!(f["passage"], "text");
        assert_eq!(f["prompt"], " Is it? ");
        assert_eq!(f["n"], "4");
        assert!(!f.contains_key("tags"));
    }

    #[test]
    fn gsm8k_parsing_details() {
        let rows = vec![row(serde_json::json!({
            "question": "How many?",
            "answer": "He has 2*3=<<2*3=6>>6 apples.\nThen 1,000+6=<<1000+6=1006>>1006.\n#### 1,006"
        }))];
        let items = normalize(rows, DatasetKind::Gsm8k).unwrap();
        assert_eq!(items[0].answer(), Some("1006"));
        assert_eq!(items[0].get("reasoning").unwrap(), "He has 2*3=6 apples.\nThen 1,000+6=1006.");
        assert_eq!(strip_calculator("a <<unclosed"), "a <<unclosed");
    }

    #[test]
    fn kind_names_parse() {
        for k in ["gsm8k", "boolq", "strategyqa", "arc", "commonsenseqa"] {
            let kind: DatasetKind = k.parse().unwrap();
            assert_eq!(kind.name(), k);
        }
        assert_eq!("BoolQ".parse::<DatasetKind>().unwrap(), DatasetKind::BoolQ);
        assert!("squad".parse::<DatasetKind>().unwrap_err().to_string().contains("squad"));
        assert_eq!(
            detect_kind(&[row(serde_json::json!({"question": "q", "answer": "a"}))]),
            DatasetKind::Custom { question: "question".into(), answer: Some("answer".into()), passage: None }
        );
    }

    fn numbered(n: usize) -> Vec<Item> {
        (0..n).map(|i| Item { id: i.to_string(), fields: Row::new() }).collect()
    }

    #[test]
    fn shuffle_take_is_deterministic() {
        let ids = |v: Vec<Item>| v.into_iter().map(|i| i.id).collect::<Vec<_>>();
        let a = ids(shuffle_take(numbered(50), true, 42, Some(10)));
        assert_eq!(a, ids(shuffle_take(numbered(50), true, 42, Some(10))));
        assert_ne!(a, ids(shuffle_take(numbered(50), true, 43, Some(10))));
        assert_eq!(a.len(), 10);
        let all = ids(shuffle_take(numbered(50), true, 42, None));
        assert_eq!(&all[..10], &a[..]);
        let mut sorted: Vec<usize> = all.iter().map(|s| s.parse().unwrap()).collect();
        sorted.sort();
        assert_eq!(sorted, (0..50).collect::<Vec<_>>());
        assert_eq!(ids(shuffle_take(numbered(5), false, 1, Some(3))), ["0", "1", "2"]);
        assert_eq!(shuffle_take(numbered(3), true, 1, Some(10)).len(), 3);
    }
}
