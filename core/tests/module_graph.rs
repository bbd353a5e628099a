//! The core's module graph has no circle: every module imports only modules below it.
//!
//! Reads `core/src/**/*.rs`, collects each top-level module's references to other modules
//! (`crate::<module>` paths in `use` lines and in code, and `crate::<Item>` paths through the
//! re-exports of `lib.rs`), and checks that the graph is acyclic, printing a cycle if not.
//! Comments, string and character literals, and `#[cfg(test)]` items are left out: a unit test
//! may build the values of a module above the one it tests. A file under `src/<module>/` is part
//! of `<module>`; `lib.rs` is the crate root, above every module. The layering itself is
//! documented in `docs/architecture.md` ("Module layering").

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Path, PathBuf};

type Graph = BTreeMap<String, BTreeSet<String>>;

/// Replaces comments and string/char literals with spaces (keeping line structure), so that
/// neither `crate::` in a doc comment nor a `{` in a format string counts.
fn strip_comments_and_literals(src: &str) -> String {
    let b = src.as_bytes();
    let mut out = String::with_capacity(src.len());
    let mut i = 0;
    let blank = |out: &mut String, bytes: &[u8]| {
        for &c in bytes {
            out.push(if c == b'\n' { '\n' } else { ' ' });
        }
    };
    while i < b.len() {
        let rest = &b[i..];
        if rest.starts_with(b"//") {
            let end = rest.iter().position(|&c| c == b'\n').map_or(b.len(), |p| i + p);
            blank(&mut out, &b[i..end]);
            i = end;
        } else if rest.starts_with(b"/*") {
            let (mut depth, mut j) = (1, i + 2);
            while j < b.len() && depth > 0 {
                if b[j..].starts_with(b"/*") {
                    depth += 1;
                    j += 2;
                } else if b[j..].starts_with(b"*/") {
                    depth -= 1;
                    j += 2;
                } else {
                    j += 1;
                }
            }
            blank(&mut out, &b[i..j]);
            i = j;
        } else if (rest.starts_with(b"r\"") || rest.starts_with(b"r#") || rest.starts_with(b"br"))
            && (i == 0 || !is_ident(b[i - 1]))
            && raw_string_hashes(rest).is_some()
        {
            let start = if rest[0] == b'b' { 2 } else { 1 };
            let hashes = raw_string_hashes(rest).unwrap_or(0);
            let mut close = vec![b'"'];
            close.extend(std::iter::repeat_n(b'#', hashes));
            let body = i + start + hashes + 1;
            let end = find(&b[body..], &close).map_or(b.len(), |p| body + p + close.len());
            blank(&mut out, &b[i..end]);
            i = end;
        } else if rest[0] == b'"' {
            let mut j = i + 1;
            while j < b.len() && b[j] != b'"' {
                j += if b[j] == b'\\' { 2 } else { 1 };
            }
            let end = (j + 1).min(b.len());
            blank(&mut out, &b[i..end]);
            i = end;
        } else if rest[0] == b'\'' {
            // A char literal ('x', '\n', '\u{..}', '{'), or else a lifetime or label.
            let len = if rest.get(1) == Some(&b'\\') {
                rest[2..].iter().position(|&c| c == b'\'').map(|p| p + 3)
            } else {
                let ch = src[i + 1..].chars().next().map_or(1, char::len_utf8);
                (rest.get(1 + ch) == Some(&b'\'')).then_some(ch + 2)
            };
            let end = i + len.unwrap_or(1);
            if len.is_some() {
                blank(&mut out, &b[i..end]);
            } else {
                out.push('\'');
            }
            i = end;
        } else {
            let ch = src[i..].chars().next().expect("in bounds");
            out.push(ch);
            i += ch.len_utf8();
        }
    }
    out
}

/// `Some(number of #)` if `s` starts a raw string literal (`r"`, `r#"`, `br"`, ...).
fn raw_string_hashes(s: &[u8]) -> Option<usize> {
    let s = s.strip_prefix(b"b").unwrap_or(s).strip_prefix(b"r")?;
    let hashes = s.iter().take_while(|&&c| c == b'#').count();
    (s.get(hashes) == Some(&b'"')).then_some(hashes)
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

fn is_ident(c: u8) -> bool {
    c.is_ascii_alphanumeric() || c == b'_'
}

/// Removes every item marked `#[cfg(test)]` (a `mod tests { .. }`, a `use`, a `fn`).
fn strip_cfg_test(src: &str) -> String {
    let mut s = src.to_owned();
    while let Some(at) = s.find("#[cfg(test)]") {
        let b = s.as_bytes();
        // The item ends at its first `;` outside braces, or at the `}` closing its first `{`.
        let mut j = at + "#[cfg(test)]".len();
        let mut depth = 0usize;
        while j < b.len() {
            match b[j] {
                b'{' => depth += 1,
                b'}' => {
                    depth -= 1;
                    if depth == 0 {
                        j += 1;
                        break;
                    }
                }
                b';' if depth == 0 => {
                    j += 1;
                    break;
                }
                _ => {}
            }
            j += 1;
        }
        s.replace_range(at..j.min(s.len()), "");
    }
    s
}

/// The first identifier of `s` (after whitespace).
fn first_ident(s: &str) -> Option<&str> {
    let s = s.trim_start();
    let end = s.bytes().position(|c| !is_ident(c)).unwrap_or(s.len());
    (end > 0).then(|| &s[..end])
}

/// The first path segment of every `crate::` path in `code` (for `crate::{a::X, B}`, `a` and
/// `B`).
fn crate_path_heads(code: &str) -> Vec<String> {
    let mut heads = Vec::new();
    let b = code.as_bytes();
    let mut from = 0;
    while let Some(p) = code[from..].find("crate::") {
        let at = from + p;
        from = at + "crate::".len();
        if at > 0 && (is_ident(b[at - 1]) || b[at - 1] == b'$') {
            continue;
        }
        let rest = code[from..].trim_start();
        if let Some(group) = rest.strip_prefix('{') {
            // Split the group's top-level items at commas.
            let (mut depth, mut start) = (0usize, 0usize);
            for (k, c) in group.char_indices() {
                match c {
                    '{' => depth += 1,
                    '}' if depth == 0 => {
                        heads.extend(first_ident(&group[start..k]).map(String::from));
                        break;
                    }
                    '}' => depth -= 1,
                    ',' if depth == 0 => {
                        heads.extend(first_ident(&group[start..k]).map(String::from));
                        start = k + 1;
                    }
                    _ => {}
                }
            }
        } else {
            heads.extend(first_ident(rest).map(String::from));
        }
    }
    heads
}

/// Every `.rs` file under `dir`.
fn rust_files(dir: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    for entry in fs::read_dir(dir).expect("readable source directory") {
        let path = entry.expect("directory entry").path();
        if path.is_dir() {
            files.extend(rust_files(&path));
        } else if path.extension().is_some_and(|e| e == "rs") {
            files.push(path);
        }
    }
    files.sort();
    files
}

/// Which module each name re-exported at the crate root comes from (`pub use m::{A, B};`).
fn root_reexports(lib: &str) -> BTreeMap<String, String> {
    let mut map = BTreeMap::new();
    let code = strip_cfg_test(&strip_comments_and_literals(lib));
    for stmt in code.split(';') {
        let Some(path) = stmt.trim().strip_prefix("pub use ") else { continue };
        let Some((module, items)) = path.split_once("::") else { continue };
        let items = items.trim().trim_start_matches('{').trim_end_matches('}');
        for item in items.split(',') {
            let name = item.split(" as ").last().unwrap_or(item).trim();
            if !name.is_empty() {
                map.insert(name.to_owned(), module.trim().to_owned());
            }
        }
    }
    map
}

/// The module graph of the crate at `src`: module -> the modules it references.
fn module_graph(src: &Path) -> Graph {
    let lib = fs::read_to_string(src.join("lib.rs")).expect("lib.rs");
    let reexports = root_reexports(&lib);
    let files: Vec<(String, PathBuf)> = rust_files(src)
        .into_iter()
        .filter(|p| p.file_name().is_some_and(|n| n != "lib.rs"))
        .map(|p| {
            let rel = p.strip_prefix(src).expect("under src");
            let first = rel.components().next().expect("non-empty").as_os_str().to_string_lossy();
            (first.trim_end_matches(".rs").to_owned(), p)
        })
        .collect();
    let modules: BTreeSet<String> = files.iter().map(|(m, _)| m.clone()).collect();
    let mut graph: Graph = modules.iter().map(|m| (m.clone(), BTreeSet::new())).collect();
    for (module, path) in &files {
        let text = fs::read_to_string(path).expect("source file");
        let code = strip_cfg_test(&strip_comments_and_literals(&text));
        for head in crate_path_heads(&code) {
            let target = if modules.contains(&head) { Some(head) } else { reexports.get(&head).cloned() };
            if let Some(target) = target.filter(|t| t != module) {
                graph.get_mut(module).expect("known module").insert(target);
            }
        }
    }
    graph
}

/// A cycle of `graph`, as a path that starts and ends at the same module, if there is one.
fn find_cycle(graph: &Graph) -> Option<Vec<String>> {
    #[derive(Clone, Copy, PartialEq)]
    enum Mark {
        New,
        OnPath,
        Done,
    }
    fn visit(
        node: &str,
        graph: &Graph,
        marks: &mut BTreeMap<String, Mark>,
        path: &mut Vec<String>,
    ) -> Option<Vec<String>> {
        marks.insert(node.to_owned(), Mark::OnPath);
        path.push(node.to_owned());
        for next in graph.get(node).into_iter().flatten() {
            match marks.get(next.as_str()).copied().unwrap_or(Mark::New) {
                Mark::OnPath => {
                    let start = path.iter().position(|m| m == next).expect("on the path");
                    let mut cycle = path[start..].to_vec();
                    cycle.push(next.clone());
                    return Some(cycle);
                }
                Mark::New => {
                    if let Some(cycle) = visit(next, graph, marks, path) {
                        return Some(cycle);
                    }
                }
                Mark::Done => {}
            }
        }
        path.pop();
        marks.insert(node.to_owned(), Mark::Done);
        None
    }
    let mut marks = BTreeMap::new();
    for node in graph.keys() {
        if marks.get(node.as_str()).copied().unwrap_or(Mark::New) == Mark::New
            && let Some(cycle) = visit(node, graph, &mut marks, &mut Vec::new())
        {
            return Some(cycle);
        }
    }
    None
}

fn core_graph() -> Graph {
    module_graph(&Path::new(env!("CARGO_MANIFEST_DIR")).join("src"))
}

fn render(graph: &Graph) -> String {
    graph.iter().map(|(m, deps)| format!("  {m} -> {}\n", deps.iter().cloned().collect::<Vec<_>>().join(" "))).collect()
}

#[test]
fn the_core_module_graph_is_acyclic() {
    let graph = core_graph();
    println!("the core's module graph:\n{}", render(&graph));
    if let Some(cycle) = find_cycle(&graph) {
        panic!(
            "the core's modules import each other in a circle: {}\n\nthe graph:\n{}",
            cycle.join(" -> "),
            render(&graph)
        );
    }
}

/// The switch between real and model-checked primitives is the bottom layer: it may use only
/// the set-once cell of `global`.
#[test]
fn primitive_sits_at_the_bottom() {
    let graph = core_graph();
    let deps = &graph["primitive"];
    assert!(deps.iter().all(|d| d == "global"), "primitive imports {deps:?}");
    assert!(graph["global"].is_empty(), "global imports {:?}", graph["global"]);
}

/// The graph is read from the sources, not assumed: known edges are found (through `use`
/// groups, paths in code and root re-exports), so the acyclicity test cannot pass vacuously.
#[test]
fn the_reader_finds_known_edges() {
    let graph = core_graph();
    for (from, to) in [("session", "map"), ("map", "node"), ("store", "session"), ("node", "index"), ("scope", "time")]
    {
        assert!(graph[from].contains(to), "{from} -> {to} not found:\n{}", render(&graph));
    }
    assert!(graph.contains_key("config"), "config/duration.rs is part of config");
    assert!(!graph.contains_key("duration"));
}

#[test]
fn the_reader_handles_groups_literals_and_tests() {
    let src = r##"
        use crate::{a::X, b, c::{D, E}};
        // crate::commented
        /// [`doc`](crate::doc)
        fn f() { let s = "crate::in_string {"; let c = '{'; let r = r#"crate::raw"#; crate::d::g(); }
        #[cfg(test)]
        mod tests { use crate::e; fn t() { let _ = "}"; } }
        fn h<'a>(x: &'a str) -> &'a str { crate::f::id(x) }
    "##;
    let code = strip_cfg_test(&strip_comments_and_literals(src));
    assert_eq!(crate_path_heads(&code), ["a", "b", "c", "d", "f"]);
}

#[test]
fn the_cycle_finder_reports_a_cycle() {
    let graph: Graph = [("a", &["b"][..]), ("b", &["c"]), ("c", &["a"]), ("d", &[])]
        .into_iter()
        .map(|(m, deps)| (m.to_owned(), deps.iter().map(|d| (*d).to_owned()).collect()))
        .collect();
    assert_eq!(find_cycle(&graph), Some(vec!["a".into(), "b".into(), "c".into(), "a".into()]));
    let acyclic: Graph = [("a", &["b"][..]), ("b", &[])]
        .into_iter()
        .map(|(m, deps)| (m.to_owned(), deps.iter().map(|d| (*d).to_owned()).collect()))
        .collect();
    assert_eq!(find_cycle(&acyclic), None);
}
