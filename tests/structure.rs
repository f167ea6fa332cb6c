//! The shape of `src/`, checked: the `use` graph between top-level modules has no
//! circle, and the loop (`server`) reaches backplanes only through the `Backplane`
//! trait (`backplane`) and the picker (`bus`), never a backplane's internals.

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
            let top = rel
                .components()
                .next()
                .unwrap()
                .as_os_str()
                .to_string_lossy()
                .trim_end_matches(".rs")
                .to_string();
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

/// Module names after `crate::`, including inside `use crate::{a, b::c}` groups.
fn imports(code: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let ident = |s: &str| -> String {
        s.chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect()
    };
    for (i, _) in code.match_indices("crate::") {
        let rest = &code[i + 7..];
        if let Some(group) = rest.strip_prefix('{') {
            let end = group.find('}').unwrap_or(group.len());
            for part in group[..end].split(',') {
                let name = ident(part.trim());
                if !name.is_empty() {
                    out.insert(name);
                }
            }
        } else {
            let name = ident(rest);
            if !name.is_empty() {
                out.insert(name);
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
fn the_loop_knows_backplanes_only_through_the_trait() {
    let g = graph();
    let server = &g["server"];
    assert!(
        server.contains("backplane") && server.contains("bus"),
        "{server:?}"
    );
    assert!(
        !server.contains("redis_link"),
        "server uses redis_link: {server:?}"
    );
    assert!(!server.contains("redis_target"), "{server:?}");
    // Leaves: the seam, the tokens and the parsed Redis target import nothing of
    // the loop or of a backplane.
    for leaf in ["backplane", "token", "redis_target"] {
        let deps = &g[leaf];
        for bad in ["server", "bus", "redis_link", "config"] {
            assert!(!deps.contains(bad), "{leaf} imports {bad}");
        }
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
}
