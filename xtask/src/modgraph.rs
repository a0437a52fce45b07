//! `cargo xtask modgraph`: the import graph between the daemon's top-level modules
//! (`zone-ingress/src/<module>.rs` or `<module>/`), from every `crate::<module>` path and every
//! `use crate::{...}` group in their code (comments left out). Fails on a cycle, naming it.
//! `cargo xtask test` runs it with the lints.

use std::{
    collections::{BTreeMap, BTreeSet},
    fs,
    path::{Path, PathBuf},
};

use anyhow::{Context as _, bail};
use clap::Parser;
use xtask::workspace_root;

#[derive(Debug, Parser, Default)]
pub(crate) struct Options {
    /// Print every edge, not only a cycle.
    #[arg(long)]
    pub print: bool,
    /// Another source tree to check (default: `zone-ingress/src`).
    #[arg(long)]
    pub src: Option<PathBuf>,
}

/// Module → the modules it uses.
type Graph = BTreeMap<String, BTreeSet<String>>;

pub(crate) fn modgraph(opts: &Options) -> anyhow::Result<()> {
    let src = opts.src.clone().unwrap_or_else(|| workspace_root().join("zone-ingress/src"));
    let graph = build(&src)?;
    if opts.print {
        for (from, to) in &graph {
            eprintln!("{from} -> {}", to.iter().cloned().collect::<Vec<_>>().join(", "));
        }
    }
    if let Some(cycle) = find_cycle(&graph) {
        bail!("import cycle between the daemon's modules: {}", cycle.join(" -> "));
    }
    let edges: usize = graph.values().map(BTreeSet::len).sum();
    eprintln!("modgraph: {} modules, {edges} edges, no cycle", graph.len());
    Ok(())
}

fn build(src: &Path) -> anyhow::Result<Graph> {
    let mut graph = Graph::new();
    for file in rust_files(src)? {
        let rel = file.strip_prefix(src).context("file outside src")?;
        let Some(module) = top_module(rel) else { continue };
        let text = fs::read_to_string(&file).with_context(|| format!("reading {}", file.display()))?;
        let deps = graph.entry(module.clone()).or_default();
        for used in crate_paths(&strip_comments(&text)) {
            if used != module {
                deps.insert(used);
            }
        }
    }
    // Only edges to modules of this crate (a `crate::` path may name an item of lib.rs).
    let modules: BTreeSet<String> = graph.keys().cloned().collect();
    for deps in graph.values_mut() {
        deps.retain(|d| modules.contains(d));
    }
    Ok(graph)
}

fn rust_files(dir: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    for entry in fs::read_dir(dir).with_context(|| format!("listing {}", dir.display()))? {
        let path = entry?.path();
        if path.is_dir() {
            out.extend(rust_files(&path)?);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
    out.sort();
    Ok(out)
}

/// `server/conn.rs` → `server`, `reject.rs` → `reject`; the crate roots have none.
fn top_module(rel: &Path) -> Option<String> {
    let first = rel.components().next()?.as_os_str().to_str()?;
    let name = first.strip_suffix(".rs").unwrap_or(first);
    (!matches!(name, "lib" | "main")).then(|| name.to_owned())
}

/// The text without `//` comments (doc comments included) and without string literals' contents.
fn strip_comments(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for line in text.lines() {
        let mut in_str = false;
        let mut prev = '\0';
        let mut kept = String::new();
        let mut chars = line.chars().peekable();
        while let Some(c) = chars.next() {
            if !in_str && c == '/' && chars.peek() == Some(&'/') {
                break;
            }
            if c == '"' && prev != '\\' {
                in_str = !in_str;
            }
            if !in_str {
                kept.push(c);
            }
            prev = c;
        }
        out.push_str(&kept);
        out.push('\n');
    }
    out
}

fn is_ident(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_'
}

/// The first segment of every `crate::` path, including each item of a `crate::{...}` group.
fn crate_paths(code: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut rest = code;
    while let Some(i) = rest.find("crate::") {
        let before = rest[..i].chars().next_back();
        rest = &rest[i + "crate::".len()..];
        if before.is_some_and(is_ident) {
            continue;
        }
        if let Some(group) = rest.strip_prefix('{') {
            // Items at depth 0 of the group: `a`, `b::{c}`, `d::e as f`.
            let mut depth = 0usize;
            let mut at_item_start = true;
            let mut item = String::new();
            for c in group.chars() {
                match c {
                    '{' => depth += 1,
                    '}' if depth == 0 => break,
                    '}' => depth -= 1,
                    ',' if depth == 0 => {
                        if !item.is_empty() {
                            out.insert(std::mem::take(&mut item));
                        }
                        at_item_start = true;
                    }
                    c if depth == 0 && at_item_start && is_ident(c) => item.push(c),
                    c if c.is_whitespace() && item.is_empty() => {}
                    _ => {
                        if !item.is_empty() {
                            out.insert(std::mem::take(&mut item));
                        }
                        at_item_start = false;
                    }
                }
            }
            if !item.is_empty() {
                out.insert(item);
            }
        } else {
            let name: String = rest.chars().take_while(|c| is_ident(*c)).collect();
            if !name.is_empty() {
                out.insert(name);
            }
        }
    }
    out
}

/// A cycle of the graph, if there is one (depth-first search).
fn find_cycle(graph: &Graph) -> Option<Vec<String>> {
    #[derive(Clone, Copy, PartialEq)]
    enum Mark {
        Open,
        Done,
    }
    fn visit(
        node: &str,
        graph: &Graph,
        marks: &mut BTreeMap<String, Mark>,
        stack: &mut Vec<String>,
    ) -> Option<Vec<String>> {
        match marks.get(node) {
            Some(Mark::Done) => return None,
            Some(Mark::Open) => {
                let start = stack.iter().position(|n| n == node).unwrap_or(0);
                let mut cycle = stack[start..].to_vec();
                cycle.push(node.to_owned());
                return Some(cycle);
            }
            None => {}
        }
        marks.insert(node.to_owned(), Mark::Open);
        stack.push(node.to_owned());
        for next in graph.get(node).into_iter().flatten() {
            if let Some(cycle) = visit(next, graph, marks, stack) {
                return Some(cycle);
            }
        }
        stack.pop();
        marks.insert(node.to_owned(), Mark::Done);
        None
    }
    let mut marks = BTreeMap::new();
    for node in graph.keys() {
        let mut stack = Vec::new();
        if let Some(cycle) = visit(node, graph, &mut marks, &mut stack) {
            return Some(cycle);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn groups_and_paths_are_both_seen() {
        let code = strip_comments(
            "use crate::{\n    admin,\n    config::{self, Diagnostic},\n    server::Ingress as I,\n};\n// crate::nope\nlet x = crate::flows::Flow;\nmycrate::ignored;\n",
        );
        let got: Vec<String> = crate_paths(&code).into_iter().collect();
        assert_eq!(got, ["admin", "config", "flows", "server"]);
    }

    #[test]
    fn a_cycle_is_found_and_a_dag_passes() {
        let mut g = Graph::new();
        g.entry("a".into()).or_default().insert("b".into());
        g.entry("b".into()).or_default().insert("c".into());
        g.entry("c".into()).or_default();
        assert_eq!(find_cycle(&g), None);
        g.entry("c".into()).or_default().insert("a".into());
        assert_eq!(find_cycle(&g), Some(vec!["a".into(), "b".into(), "c".into(), "a".into()]));
    }
}
