//! The shape of `src/`, checked by layer, not by file name: the `use` graph between
//! layers has no circle, and the loop (`server`) reaches backplanes only through the
//! seam (`backplane`, its `mod.rs`) and the picker (`backplane::pick`), never a
//! backplane (`backplane::memory`, `backplane::redis`). A layer is a top-level module,
//! except under `backplane/`, where the seam and each backplane are layers of their own.

/// Sub-layers of `backplane`.
const BACKPLANES: [&str; 3] = ["memory", "redis", "pick"];

/// The layer of a file under `src/` (`rel` without the `src/`).
fn layer_of(rel: &std::path::Path) -> String {
    let parts: Vec<String> = rel
        .components()
        .map(|c| {
            c.as_os_str()
                .to_string_lossy()
                .trim_end_matches(".rs")
                .to_string()
        })
        .collect();
    match parts.as_slice() {
        [top, sub, ..] if top == "backplane" && BACKPLANES.contains(&sub.as_str()) => {
            format!("backplane::{sub}")
        }
        [top, ..] => top.clone(),
        [] => String::new(),
    }
}

use std::collections::{BTreeMap, BTreeSet};

/// Top-level module of every `crate::…` path in each module's non-test code.
fn graph() -> BTreeMap<String, BTreeSet<String>> {
    let mut g: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let mut stack = vec![std::path::PathBuf::from("src")];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                stack.push(path);
                continue;
            }
            if path.extension().is_none_or(|e| e != "rs") {
                continue;
            }
            let rel = path.strip_prefix("src").unwrap();
            let top = layer_of(rel);
            if top == "lib" || top == "main" {
                continue;
            }
            let text = std::fs::read_to_string(&path).unwrap();
            let code = text.split("#[cfg(test)]").next().unwrap_or("");
            let deps = g.entry(top.clone()).or_default();
            for used in imports(code) {
                if used != top {
                    deps.insert(used);
                }
            }
        }
    }
    g
}

/// Layers named after `crate::`, including inside `use crate::{a, b::c}` groups; under
/// `crate::backplane::` the sub-layer (`backplane::redis`), or the seam itself.
fn imports(code: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let ident = |s: &str| -> String {
        s.chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect()
    };
    // `rest` starts just after `crate::` (or after `crate::backplane::`).
    fn names(rest: &str, ident: &dyn Fn(&str) -> String) -> Vec<String> {
        match rest.strip_prefix('{') {
            Some(group) => {
                let end = group.find('}').unwrap_or(group.len());
                group[..end]
                    .split(',')
                    .map(|p| p.trim().to_string())
                    .collect()
            }
            None => vec![rest.to_string()],
        }
        .into_iter()
        .map(|p| ident(&p))
        .filter(|n| !n.is_empty())
        .collect()
    }
    for (i, _) in code.match_indices("crate::") {
        let rest = &code[i + 7..];
        for name in names(rest, &ident) {
            if name != "backplane" {
                out.insert(name);
                continue;
            }
            let after = rest.find("backplane::").map(|k| &rest[k + 11..]);
            let subs = after.map(|a| names(a, &ident)).unwrap_or_default();
            if subs.is_empty() {
                out.insert(name);
            }
            for sub in subs {
                if BACKPLANES.contains(&sub.as_str()) {
                    out.insert(format!("backplane::{sub}"));
                } else {
                    out.insert("backplane".to_string());
                }
            }
        }
    }
    out
}

fn find_cycle(g: &BTreeMap<String, BTreeSet<String>>) -> Option<Vec<String>> {
    fn visit(
        n: &str,
        g: &BTreeMap<String, BTreeSet<String>>,
        path: &mut Vec<String>,
        done: &mut BTreeSet<String>,
    ) -> Option<Vec<String>> {
        if let Some(at) = path.iter().position(|p| p == n) {
            let mut c = path[at..].to_vec();
            c.push(n.to_string());
            return Some(c);
        }
        if done.contains(n) {
            return None;
        }
        path.push(n.to_string());
        for m in g.get(n).into_iter().flatten() {
            if let Some(c) = visit(m, g, path, done) {
                return Some(c);
            }
        }
        path.pop();
        done.insert(n.to_string());
        None
    }
    let mut done = BTreeSet::new();
    for n in g.keys() {
        if let Some(c) = visit(n, g, &mut Vec::new(), &mut done) {
            return Some(c);
        }
    }
    None
}

#[test]
fn the_module_graph_has_no_circle() {
    let g = graph();
    assert!(g.len() > 15, "{g:?}");
    if let Some(c) = find_cycle(&g) {
        panic!("a circle of imports: {}", c.join(" -> "));
    }
}

#[test]
fn the_loop_knows_backplanes_only_through_the_seam() {
    let g = graph();
    let server = &g["server"];
    assert!(
        server.contains("backplane") && server.contains("backplane::pick"),
        "{server:?}"
    );
    for backplane in ["backplane::redis", "backplane::memory"] {
        assert!(
            !server.contains(backplane),
            "server uses {backplane}: {server:?}"
        );
    }
    // The seam and the tokens import nothing of the loop or of a backplane; the two
    // backplanes mirror each other and import neither each other nor the loop.
    for leaf in ["backplane", "token"] {
        let deps = &g[leaf];
        for bad in [
            "server",
            "config",
            "backplane::pick",
            "backplane::redis",
            "backplane::memory",
        ] {
            assert!(!deps.contains(bad), "{leaf} imports {bad}: {deps:?}");
        }
    }
    // Client protocols speak in the seam's terms (positions, publications), never of a
    // backplane or of the loop.
    for bad in [
        "server",
        "backplane::redis",
        "backplane::memory",
        "backplane::pick",
    ] {
        assert!(!g["protocol"].contains(bad), "protocol imports {bad}");
    }
    for (a, b) in [
        ("backplane::redis", "backplane::memory"),
        ("backplane::memory", "backplane::redis"),
    ] {
        assert!(!g[a].contains(b), "{a} imports {b}");
        assert!(!g[a].contains("server"), "{a} imports the loop");
    }
}

#[test]
fn the_cycle_finder_finds_a_cycle() {
    // The check above must be able to fail.
    let mut g = BTreeMap::new();
    g.insert("a".to_string(), BTreeSet::from(["b".to_string()]));
    g.insert("b".to_string(), BTreeSet::from(["c".to_string()]));
    g.insert("c".to_string(), BTreeSet::from(["a".to_string()]));
    assert_eq!(find_cycle(&g).map(|c| c.len()), Some(4));
    assert_eq!(
        imports("use crate::{hub::Interest, ws};\nlet x = crate::metrics::Y;"),
        BTreeSet::from(["hub".into(), "ws".into(), "metrics".into()])
    );
    assert_eq!(
        imports("use crate::backplane::{Backplane, redis::X};\nuse crate::backplane::pick::Bus;"),
        BTreeSet::from([
            "backplane".into(),
            "backplane::redis".into(),
            "backplane::pick".into()
        ])
    );
    assert_eq!(
        layer_of(std::path::Path::new("backplane/redis/wire.rs")),
        "backplane::redis"
    );
    assert_eq!(
        layer_of(std::path::Path::new("backplane/mod.rs")),
        "backplane"
    );
}
