//! Hub downloads against a local stand-in for the Hugging Face hub (`HF_ENDPOINT`) that demands
//! a token: the one `huggingface-cli login` stores under `HF_HOME` is sent without `HF_TOKEN`,
//! and a refusal is one clear line.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::sync::{Arc, Mutex};

/// Serves `files` under `/{repo}/resolve/main/{name}` to requests bearing `Bearer {token}`
/// (the protocol hf-hub speaks: a `bytes=0-0` probe for etag, commit and size, then a ranged
/// GET); records every Authorization header seen.
fn stand_in_hub(files: Vec<(String, Vec<u8>)>, token: &'static str) -> (String, Arc<Mutex<Vec<String>>>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let seen = Arc::new(Mutex::new(Vec::new()));
    let log = seen.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            let mut reader = BufReader::new(stream.try_clone().unwrap());
            let mut request = String::new();
            if reader.read_line(&mut request).is_err() {
                continue;
            }
            let (mut auth, mut range) = (String::new(), None::<usize>);
            loop {
                let mut line = String::new();
                if reader.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
                    break;
                }
                let lower = line.to_ascii_lowercase();
                if lower.starts_with("authorization:") {
                    auth = line["authorization:".len()..].trim().to_string();
                }
                if let Some(r) = lower.strip_prefix("range: bytes=") {
                    range = r.trim().split('-').next().and_then(|s| s.parse().ok());
                }
            }
            log.lock().unwrap().push(auth.clone());
            let path = request.split_whitespace().nth(1).unwrap_or("").to_string();
            let file = files.iter().find(|(name, _)| path.ends_with(&format!("/resolve/main/{name}")));
            let response = match (auth == format!("Bearer {token}"), file) {
                (false, _) => b"HTTP/1.1 401 Unauthorized\r\ncontent-length: 0\r\nconnection: close\r\n\r\n".to_vec(),
                (true, None) => b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\nconnection: close\r\n\r\n".to_vec(),
                (true, Some((_, bytes))) => {
                    let start = range.unwrap_or(0).min(bytes.len());
                    let body = &bytes[start..];
                    let mut head = format!(
                        "HTTP/1.1 206 Partial Content\r\netag: \"e{}\"\r\nx-repo-commit: 0123abcd\r\ncontent-range: bytes {start}-{}/{}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
                        bytes.len(),
                        bytes.len().saturating_sub(1),
                        bytes.len(),
                        body.len()
                    )
                    .into_bytes();
                    head.extend_from_slice(body);
                    head
                }
            };
            let _ = stream.write_all(&response);
            let mut rest = Vec::new();
            let _ = reader.read_to_end(&mut rest);
        }
    });
    (url, seen)
}

#[test]
fn login_token_and_endpoint_are_honoured() {
    let Some(shared) = common::shared() else { return };
    let pt = shared.join("fixtures/transcoders/stories260K/layer_02/stories260K_blocks.2.ln2.hook_normalized_512.pt");
    let name = pt.file_name().unwrap().to_str().unwrap().to_string();
    let (url, seen) = stand_in_hub(vec![(name.clone(), std::fs::read(&pt).unwrap())], "hf_login_token");
    let home = std::env::temp_dir().join(format!("neurosteer-hub-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&home);
    std::fs::create_dir_all(&home).unwrap();
    let spec = format!("hf://someone/gated-transcoders/{name}");
    let info = |with_token: bool| {
        if with_token {
            std::fs::write(home.join("token"), "hf_login_token\n").unwrap();
        }
        common::bin()
            .args(["transcoder", "info", &spec])
            .env("HF_HOME", &home)
            .env("HF_ENDPOINT", &url)
            .env_remove("HF_TOKEN")
            .env_remove("HF_TOKEN_PATH")
            .env_remove("HF_HUB_CACHE")
            .env_remove("HF_HUB_OFFLINE")
            .output()
            .unwrap()
    };
    // No login: refused, in one line that names the repository and says how to work offline.
    let out = info(false);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && !err.contains("panicked"), "{err}");
    assert!(err.contains("someone/gated-transcoders") && err.contains("HF_HUB_OFFLINE"), "{err}");
    assert_eq!(err.lines().filter(|l| !l.trim().is_empty()).count(), 1, "{err}");
    // Logged in: the stored token is sent and the file comes from the stand-in.
    let out = info(true);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("d_sae:       512"));
    assert!(seen.lock().unwrap().iter().any(|a| a == "Bearer hf_login_token"), "the login token was never sent");
    assert!(home.join("hub/models--someone--gated-transcoders").is_dir(), "not cached under HF_HOME/hub");
    std::fs::remove_dir_all(&home).ok();
}
