//! The web client: files of `static/`, compiled in (one binary deploys) or read from
//! `--static-dir`. Paths never escape the folder.

use crate::http::Response;
use std::path::{Path, PathBuf};

/// Files compiled into the binary: (URL path, content).
const EMBEDDED: &[(&str, &[u8])] = &[
    ("/index.html", include_bytes!("../static/index.html")),
    ("/app.js", include_bytes!("../static/app.js")),
    ("/style.css", include_bytes!("../static/style.css")),
];

/// Largest file served from `--static-dir` (a static file is read whole, in the loop).
const MAX_FILE_BYTES: u64 = 4 * 1024 * 1024;

/// Where static files come from.
#[derive(Debug, Clone)]
pub enum Files {
    Embedded,
    Dir(PathBuf),
}

fn content_type(path: &str) -> &'static str {
    match path.rsplit('.').next() {
        Some("html") => "text/html; charset=utf-8",
        Some("js") => "text/javascript; charset=utf-8",
        Some("css") => "text/css; charset=utf-8",
        Some("json") => "application/json",
        Some("svg") => "image/svg+xml",
        Some("png") => "image/png",
        Some("ico") => "image/x-icon",
        Some("txt") => "text/plain; charset=utf-8",
        _ => "application/octet-stream",
    }
}

/// A URL path that stays inside the folder: no `..`, `.`, empty or hidden segments,
/// no backslashes or NULs. `/` means `/index.html`.
fn clean(path: &str) -> Option<String> {
    if path == "/" {
        return Some("/index.html".to_string());
    }
    let rest = path.strip_prefix('/')?;
    let ok = rest
        .split('/')
        .all(|seg| !seg.is_empty() && !seg.starts_with('.') && !seg.contains(['\\', '\0', '%']));
    ok.then(|| path.to_string())
}

impl Files {
    /// The response for GET `path`: the file, or 404.
    pub fn get(&self, path: &str) -> Response {
        let Some(path) = clean(path) else {
            return Response::text(404, "");
        };
        match self {
            Files::Embedded => match EMBEDDED.iter().find(|(p, _)| *p == path) {
                Some((_, body)) => ok(&path, body.to_vec()),
                None => Response::text(404, ""),
            },
            Files::Dir(dir) => match read(dir, &path) {
                Some(body) => ok(&path, body),
                None => Response::text(404, ""),
            },
        }
    }
}

fn ok(path: &str, body: Vec<u8>) -> Response {
    Response::new(200, content_type(path), body).header("Cache-Control", "no-cache")
}

fn read(dir: &Path, path: &str) -> Option<Vec<u8>> {
    let root = dir.canonicalize().ok()?;
    let file = root
        .join(path.trim_start_matches('/'))
        .canonicalize()
        .ok()?;
    // Refuse symlinks that lead outside the folder.
    if !file.starts_with(&root) {
        return None;
    }
    let meta = std::fs::metadata(&file).ok()?;
    if !meta.is_file() || meta.len() > MAX_FILE_BYTES {
        return None;
    }
    std::fs::read(&file).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_cannot_escape() {
        assert_eq!(clean("/").as_deref(), Some("/index.html"));
        assert_eq!(clean("/app.js").as_deref(), Some("/app.js"));
        for bad in [
            "/../etc/passwd",
            "/a/../b",
            "/.env",
            "//x",
            "/a\\b",
            "/%2e%2e/x",
            "x",
        ] {
            assert_eq!(clean(bad), None, "{bad}");
        }
    }

    #[test]
    fn embedded_and_dir() {
        assert_eq!(Files::Embedded.get("/").status, 200);
        assert_eq!(Files::Embedded.get("/nope.txt").status, 404);
        let dir = std::env::temp_dir().join(format!("wsfan-static-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("sub")).unwrap();
        std::fs::write(dir.join("sub/a.txt"), b"A").unwrap();
        let files = Files::Dir(dir.clone());
        let r = files.get("/sub/a.txt");
        assert_eq!((r.status, &r.body[..]), (200, &b"A"[..]));
        assert_eq!(files.get("/sub").status, 404, "directories are not files");
        assert_eq!(files.get("/sub/../../etc/passwd").status, 404);
        std::fs::remove_dir_all(dir).unwrap();
    }
}
