//! Files from the Hugging Face hub, through the standard cache.
//!
//! The cache folder is `HF_HUB_CACHE`, else `HF_HOME/hub`, else `~/.cache/huggingface/hub`
//! (the layout Python's `huggingface_hub` uses, so both share downloads). Gated repositories are
//! authorised by `HF_TOKEN`, else the token `huggingface-cli login` stored (`HF_TOKEN_PATH`, else
//! `HF_HOME/token`, else `~/.cache/huggingface/token`). `HF_ENDPOINT` replaces
//! `https://huggingface.co` (a mirror); `HF_HUB_OFFLINE=1` never touches the network. A file that
//! is neither cached nor downloadable gives an error naming the repository, the file and how to
//! work offline.

use std::path::PathBuf;

use anyhow::{bail, Result};
use hf_hub::{Cache, Repo, RepoType};

/// The hub cache folder, honouring `HF_HUB_CACHE` and `HF_HOME`.
pub fn cache_dir() -> PathBuf {
    if let Some(p) = std::env::var_os("HF_HUB_CACHE").filter(|p| !p.is_empty()) {
        return PathBuf::from(p);
    }
    if let Some(p) = std::env::var_os("HF_HOME").filter(|p| !p.is_empty()) {
        return PathBuf::from(p).join("hub");
    }
    let home = std::env::var_os("HOME").map(PathBuf::from).unwrap_or_else(|| PathBuf::from("."));
    home.join(".cache").join("huggingface").join("hub")
}

/// The access token: `HF_TOKEN`, else the file `huggingface-cli login` wrote.
pub fn token() -> Option<String> {
    if let Some(t) = std::env::var("HF_TOKEN").ok().filter(|t| !t.trim().is_empty()) {
        return Some(t.trim().to_string());
    }
    let path = match std::env::var_os("HF_TOKEN_PATH").filter(|p| !p.is_empty()) {
        Some(p) => PathBuf::from(p),
        None => match std::env::var_os("HF_HOME").filter(|p| !p.is_empty()) {
            Some(home) => PathBuf::from(home).join("token"),
            None => {
                let home = std::env::var_os("HOME").map(PathBuf::from).unwrap_or_else(|| PathBuf::from("."));
                home.join(".cache").join("huggingface").join("token")
            }
        },
    };
    std::fs::read_to_string(path).ok().map(|t| t.trim().to_string()).filter(|t| !t.is_empty())
}

/// A hub client for the cache, token and endpoint the environment names.
fn api(progress: bool) -> Result<hf_hub::api::sync::Api> {
    let mut builder = hf_hub::api::sync::ApiBuilder::new().with_cache_dir(cache_dir()).with_token(token()).with_progress(progress);
    if let Some(endpoint) = std::env::var("HF_ENDPOINT").ok().filter(|e| !e.trim().is_empty()) {
        builder = builder.with_endpoint(endpoint.trim().trim_end_matches('/').to_string());
    }
    Ok(builder.build()?)
}

/// Whether `HF_HUB_OFFLINE` forbids the network.
pub fn offline() -> bool {
    matches!(
        std::env::var("HF_HUB_OFFLINE").unwrap_or_default().to_lowercase().as_str(),
        "1" | "true" | "yes" | "on"
    )
}

/// A repository on the hub: a model or a dataset.
pub struct HubRepo {
    pub id: String,
    pub kind: RepoType,
    /// A branch, tag or commit; `None` is the default branch.
    pub revision: Option<String>,
}

impl HubRepo {
    /// A model repository such as `meta-llama/Llama-3.1-8B-Instruct`.
    pub fn model(id: &str) -> Self {
        Self { id: id.to_string(), kind: RepoType::Model, revision: None }
    }

    /// A model repository at a revision (branch, tag or commit).
    pub fn model_at(id: &str, revision: &str) -> Self {
        Self { id: id.to_string(), kind: RepoType::Model, revision: Some(revision.to_string()) }
    }

    /// A dataset repository such as `google/boolq`.
    pub fn dataset(id: &str) -> Self {
        Self { id: id.to_string(), kind: RepoType::Dataset, revision: None }
    }

    fn repo(&self) -> Repo {
        match &self.revision {
            Some(r) => Repo::with_revision(self.id.clone(), self.kind, r.clone()),
            None => Repo::new(self.id.clone(), self.kind),
        }
    }

    /// The cached copy of `file`, if there is one.
    pub fn cached(&self, file: &str) -> Option<PathBuf> {
        Cache::new(cache_dir()).repo(self.repo()).get(file)
    }

    /// `file`, from the cache or downloaded into it.
    pub fn get(&self, file: &str) -> Result<PathBuf> {
        if let Some(p) = self.cached(file) {
            return Ok(p);
        }
        let how = format!(
            "download it where the hub is reachable (e.g. `huggingface-cli download {}{} {file}`) \
             into {} (set HF_HOME or HF_HUB_CACHE to use another cache) and set HF_HUB_OFFLINE=1, or pass a local folder",
            if matches!(self.kind, RepoType::Dataset) { "--repo-type dataset " } else { "" },
            self.id,
            cache_dir().display()
        );
        if offline() {
            bail!("{}: `{file}` is not in the hub cache and HF_HUB_OFFLINE is set; {how}", self.id);
        }
        match api(true)?.repo(self.repo()).get(file) {
            Ok(p) => Ok(p),
            Err(e) => bail!("{}: cannot download `{file}` ({e}); {how}", self.id),
        }
    }

    /// Lists the repository's files (needs the network).
    pub fn list_files(&self) -> Result<Vec<String>> {
        if offline() {
            bail!("{}: cannot list the repository's files with HF_HUB_OFFLINE set", self.id);
        }
        match api(false)?.repo(self.repo()).info() {
            Ok(info) => Ok(info.siblings.into_iter().map(|s| s.rfilename).collect()),
            Err(e) => bail!("{}: cannot list the repository on the hub ({e}); pass a local file instead", self.id),
        }
    }
}
