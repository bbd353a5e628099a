//! Prints a crate's public API, one item per line, from rustdoc's JSON output: the snapshot that
//! `.ci/run` compares with `docs/public-api/<crate>.txt`, so that every change to the public
//! surface shows up in review (a removal or a changed signature is a breaking change; see
//! CHANGELOG.md).
//!
//! ```text
//! cargo +nightly rustdoc -p localsession-core --all-features -- -Z unstable-options --output-format json
//! cargo run -p localsession-tests --example public_api -- target/doc/localsession_core.json
//! ```
//!
//! Lines are sorted: items by path, with their fields, variants, inherent methods (with
//! signatures) and the traits they implement (auto traits and blanket impls left out, as
//! rustdoc's JSON reports them only for the concrete type).

use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::process::ExitCode;

use serde_json::Value;

fn main() -> ExitCode {
    let Some(path) = std::env::args().nth(1) else {
        eprintln!("usage: public_api <rustdoc JSON file>");
        return ExitCode::FAILURE;
    };
    let text = match std::fs::read_to_string(&path) {
        Ok(text) => text,
        Err(e) => {
            eprintln!("public_api: cannot read {path}: {e}");
            return ExitCode::FAILURE;
        }
    };
    let doc: Value = match serde_json::from_str(&text) {
        Ok(doc) => doc,
        Err(e) => {
            eprintln!("public_api: {path} is not rustdoc JSON: {e}");
            return ExitCode::FAILURE;
        }
    };
    let api = Api { doc: &doc, lines: BTreeSet::new() };
    for line in api.collect() {
        println!("{line}");
    }
    ExitCode::SUCCESS
}

struct Api<'a> {
    doc: &'a Value,
    lines: BTreeSet<String>,
}

impl<'a> Api<'a> {
    fn item(&self, id: &Value) -> Option<&'a Value> {
        let key = match id {
            Value::Number(n) => n.to_string(),
            Value::String(s) => s.clone(),
            _ => return None,
        };
        self.doc["index"].get(&key)
    }

    fn collect(mut self) -> BTreeSet<String> {
        let root = self.doc["root"].clone();
        let name = self.item(&root).and_then(|r| r["name"].as_str()).unwrap_or("crate").to_string();
        self.module(&root, &name, 0);
        self.lines
    }

    fn module(&mut self, id: &Value, path: &str, depth: usize) {
        let Some(module) = self.item(id) else { return };
        let Some(items) = module["inner"]["module"]["items"].as_array() else { return };
        for child in items {
            self.visit(child, path, None, depth + 1);
        }
    }

    /// An item reached under `parent` (under the name `rename` for a re-export).
    fn visit(&mut self, id: &Value, parent: &str, rename: Option<&str>, depth: usize) {
        if depth > 16 {
            return;
        }
        let Some(item) = self.item(id) else { return };
        if item["visibility"] != "public" {
            return;
        }
        let inner = &item["inner"];
        if let Some(import) = inner.get("use") {
            let name = import["name"].as_str().unwrap_or("_");
            if import["is_glob"].as_bool() == Some(true) {
                self.lines.insert(format!("use {parent}::{}::*", import["source"].as_str().unwrap_or("?")));
                return;
            }
            match import["id"].as_u64().and_then(|_| self.item(&import["id"])) {
                Some(_) => self.visit(&import["id"], parent, Some(name), depth),
                // A re-export of another crate's item: name it.
                None => {
                    self.lines
                        .insert(format!("pub use {parent}::{name} = {}", import["source"].as_str().unwrap_or("?")));
                }
            }
            return;
        }
        let name = rename.or_else(|| item["name"].as_str()).unwrap_or("_");
        let path = format!("{parent}::{name}");
        let (kind, body) = match inner.as_object().and_then(|o| o.iter().next()) {
            Some((k, v)) => (k.as_str(), v),
            None => return,
        };
        match kind {
            "module" => {
                self.lines.insert(format!("mod {path}"));
                self.module(id, &path, depth);
            }
            "function" => {
                let sig = self.function(name, body);
                self.lines.insert(format!("{path}: {sig}"));
            }
            "constant" => {
                self.lines.insert(format!("const {path}: {}", ty(&body["type"])));
            }
            "static" => {
                self.lines.insert(format!("static {path}: {}", ty(&body["type"])));
            }
            "type_alias" => {
                self.lines.insert(format!("type {path} = {}", ty(&body["type"])));
            }
            "macro" => {
                self.lines.insert(format!("macro {path}!"));
            }
            "struct" | "enum" | "union" | "trait" => self.type_item(kind, &path, body),
            other => {
                self.lines.insert(format!("{other} {path}"));
            }
        }
    }

    fn type_item(&mut self, kind: &str, path: &str, body: &Value) {
        let generics = generics(&body["generics"]);
        self.lines.insert(format!("{kind} {path}{generics}"));
        if kind == "struct" {
            if let Some(fields) = body["kind"]["plain"]["fields"].as_array() {
                for f in fields {
                    if let Some(field) = self.item(f).filter(|f| f["visibility"] == "public") {
                        let name = field["name"].as_str().unwrap_or("_");
                        self.lines.insert(format!("{path}.{name}: {}", ty(&field["inner"]["struct_field"])));
                    }
                }
            }
            if body["kind"]["plain"]["has_stripped_fields"].as_bool() == Some(true) {
                self.lines.insert(format!("{path} (has private fields)"));
            }
        }
        if kind == "enum" {
            for v in body["variants"].as_array().into_iter().flatten() {
                if let Some(variant) = self.item(v) {
                    self.lines.insert(format!("{path}::{}", variant["name"].as_str().unwrap_or("_")));
                }
            }
        }
        if kind == "trait" {
            for m in body["items"].as_array().into_iter().flatten() {
                if let Some(member) = self.item(m) {
                    let name = member["name"].as_str().unwrap_or("_");
                    let line = match member["inner"].get("function") {
                        Some(f) => format!("{path}::{}", self.function(name, f)),
                        None => format!("{path}::{name}"),
                    };
                    self.lines.insert(line);
                }
            }
        }
        for i in body["impls"].as_array().into_iter().flatten() {
            let Some(imp) = self.item(i) else { continue };
            let imp = &imp["inner"]["impl"];
            if imp["is_synthetic"].as_bool() == Some(true) || !imp["blanket_impl"].is_null() {
                continue;
            }
            match imp["trait"].as_object() {
                Some(tr) => {
                    let tr = Value::Object(tr.clone());
                    self.lines.insert(format!("impl {} for {}", path_ty(&tr), ty(&imp["for"])));
                }
                None => {
                    for m in imp["items"].as_array().into_iter().flatten() {
                        let Some(member) = self.item(m).filter(|m| m["visibility"] == "public") else { continue };
                        let name = member["name"].as_str().unwrap_or("_");
                        if let Some(f) = member["inner"].get("function") {
                            let sig = self.function(name, f);
                            self.lines.insert(format!("{path}::{sig}"));
                        } else if let Some(c) = member["inner"].get("assoc_const") {
                            self.lines.insert(format!("{path}::{name}: {}", ty(&c["type"])));
                        }
                    }
                }
            }
        }
    }

    fn function(&self, name: &str, f: &Value) -> String {
        let sig = &f["sig"];
        let mut out = String::new();
        if f["header"]["is_unsafe"].as_bool() == Some(true) {
            out.push_str("unsafe ");
        }
        if f["header"]["is_async"].as_bool() == Some(true) {
            out.push_str("async ");
        }
        let (params, predicates) = generics_parts(&f["generics"]);
        let _ = write!(out, "fn {name}{params}(");
        let inputs: Vec<String> = sig["inputs"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|p| format!("{}: {}", p[0].as_str().unwrap_or("_"), ty(&p[1])))
            .collect();
        out.push_str(&inputs.join(", "));
        out.push(')');
        if !sig["output"].is_null() {
            let _ = write!(out, " -> {}", ty(&sig["output"]));
        }
        out.push_str(&predicates);
        out
    }
}

fn generics(g: &Value) -> String {
    let (params, predicates) = generics_parts(g);
    format!("{params}{predicates}")
}

/// `<params>` and ` where predicates`, apart.
fn generics_parts(g: &Value) -> (String, String) {
    let params: Vec<String> = g["params"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|p| p["kind"]["type"]["is_synthetic"].as_bool() != Some(true))
        .map(|p| {
            let name = p["name"].as_str().unwrap_or("_").to_string();
            match p["kind"].get("type") {
                Some(t) => {
                    let bounds = bounds(&t["bounds"]);
                    if bounds.is_empty() { name } else { format!("{name}: {bounds}") }
                }
                None => match p["kind"].get("const") {
                    Some(c) => format!("const {name}: {}", ty(&c["type"])),
                    None => name,
                },
            }
        })
        .collect();
    let out = if params.is_empty() { String::new() } else { format!("<{}>", params.join(", ")) };
    let predicates: Vec<String> = g["where_predicates"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|w| w.get("bound_predicate"))
        .map(|b| format!("{}: {}", ty(&b["type"]), bounds(&b["bounds"])))
        .collect();
    let predicates = if predicates.is_empty() { String::new() } else { format!(" where {}", predicates.join(", ")) };
    (out, predicates)
}

fn bounds(b: &Value) -> String {
    b.as_array()
        .into_iter()
        .flatten()
        .map(|b| match b.get("trait_bound") {
            Some(t) => {
                let prefix = if t["modifier"] == "maybe" { "?" } else { "" };
                format!("{prefix}{}", path_ty(&t["trait"]))
            }
            None => b["outlives"].as_str().unwrap_or("?").to_string(),
        })
        .collect::<Vec<_>>()
        .join(" + ")
}

fn path_ty(p: &Value) -> String {
    // The last segment only: rustdoc reports paths as written in the source (`crate::x::Y` or
    // `Y`), which would make moving code between modules look like an API change.
    let name = p["path"].as_str().or_else(|| p["name"].as_str()).unwrap_or("?");
    let name = name.rsplit("::").next().unwrap_or(name);
    format!("{name}{}", args(&p["args"]))
}

fn args(a: &Value) -> String {
    if let Some(ab) = a.get("angle_bracketed") {
        let mut parts: Vec<String> = ab["args"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|arg| match arg.as_object().and_then(|o| o.iter().next()).map(|(k, v)| (k.as_str(), v)) {
                Some(("type", t)) => ty(t),
                Some(("lifetime", l)) => l.as_str().unwrap_or("'_").to_string(),
                Some(("const", c)) => c["expr"].as_str().unwrap_or("_").to_string(),
                _ => "_".to_string(),
            })
            .collect();
        for c in ab["constraints"].as_array().into_iter().flatten() {
            let rhs = match c["binding"].get("equality") {
                Some(eq) => format!(" = {}", ty(&eq["type"])),
                None => format!(": {}", bounds(&c["binding"]["constraint"])),
            };
            parts.push(format!("{}{rhs}", c["name"].as_str().unwrap_or("_")));
        }
        if parts.is_empty() { String::new() } else { format!("<{}>", parts.join(", ")) }
    } else if let Some(p) = a.get("parenthesized") {
        let inputs: Vec<String> = p["inputs"].as_array().into_iter().flatten().map(ty).collect();
        let output = if p["output"].is_null() { String::new() } else { format!(" -> {}", ty(&p["output"])) };
        format!("({}){output}", inputs.join(", "))
    } else {
        String::new()
    }
}

/// A type, rendered close to Rust syntax.
fn ty(t: &Value) -> String {
    let Some((kind, v)) = t.as_object().and_then(|o| o.iter().next()) else { return "?".into() };
    match kind.as_str() {
        "resolved_path" => path_ty(v),
        "primitive" | "generic" => v.as_str().unwrap_or("?").to_string(),
        "borrowed_ref" => {
            let lt = v["lifetime"].as_str().map(|l| format!("{l} ")).unwrap_or_default();
            let m = if v["is_mutable"].as_bool() == Some(true) { "mut " } else { "" };
            format!("&{lt}{m}{}", ty(&v["type"]))
        }
        "raw_pointer" => {
            let m = if v["is_mutable"].as_bool() == Some(true) { "mut" } else { "const" };
            format!("*{m} {}", ty(&v["type"]))
        }
        "tuple" => format!("({})", v.as_array().into_iter().flatten().map(ty).collect::<Vec<_>>().join(", ")),
        "slice" => format!("[{}]", ty(v)),
        "array" => format!("[{}; {}]", ty(&v["type"]), v["len"].as_str().unwrap_or("_")),
        "impl_trait" => format!("impl {}", bounds(v)),
        "dyn_trait" => {
            let traits: Vec<String> =
                v["traits"].as_array().into_iter().flatten().map(|p| path_ty(&p["trait"])).collect();
            let lt = v["lifetime"].as_str().map(|l| format!(" + {l}")).unwrap_or_default();
            format!("dyn {}{lt}", traits.join(" + "))
        }
        "qualified_path" => {
            let tr = if v["trait"].is_null() { String::new() } else { format!(" as {}", path_ty(&v["trait"])) };
            format!("<{}{tr}>::{}", ty(&v["self_type"]), v["name"].as_str().unwrap_or("_"))
        }
        "function_pointer" => {
            let inputs: Vec<String> = v["sig"]["inputs"].as_array().into_iter().flatten().map(|p| ty(&p[1])).collect();
            let output =
                if v["sig"]["output"].is_null() { String::new() } else { format!(" -> {}", ty(&v["sig"]["output"])) };
            format!("fn({}){output}", inputs.join(", "))
        }
        "infer" => "_".into(),
        other => format!("<{other}>"),
    }
}
