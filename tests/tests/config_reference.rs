//! docs/configuration.md lists exactly the keys the config structs accept, and its
//! defaults are the built-in ones.
//!
//! The keys come from the structs themselves: serde's derive hands every struct's field
//! names to `deserialize_struct`; a tracing deserializer records them and follows each
//! field into nested tables (and arrays of tables) without needing valid values.

use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet};
use std::rc::Rc;

use serde::de::{
    self, DeserializeOwned, DeserializeSeed, IntoDeserializer, MapAccess, SeqAccess, Visitor,
};

/// Struct tables found: dotted path → (field names, reached through an array of tables).
type Tables = BTreeMap<String, (Vec<&'static str>, bool)>;

struct Tracer {
    path: String,
    follow: Vec<&'static str>,
    in_array: bool,
    tables: Rc<RefCell<Tables>>,
}

impl Tracer {
    fn child(&self, key: &'static str, follow: Vec<&'static str>) -> Self {
        Self {
            path: if self.path.is_empty() {
                key.to_owned()
            } else {
                format!("{}.{key}", self.path)
            },
            follow,
            in_array: false,
            tables: self.tables.clone(),
        }
    }
}

fn leaf() -> de::value::Error {
    de::Error::custom("a value, not a table")
}

impl<'de> de::Deserializer<'de> for Tracer {
    type Error = de::value::Error;

    fn deserialize_any<V: Visitor<'de>>(self, _: V) -> Result<V::Value, Self::Error> {
        Err(leaf())
    }

    fn deserialize_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        fields: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, Self::Error> {
        self.tables
            .borrow_mut()
            .insert(self.path.clone(), (fields.to_vec(), self.in_array));
        let next = self
            .follow
            .split_first()
            .map(|(key, rest)| (*key, self.child(key, rest.to_vec())));
        visitor.visit_map(OneKey(next))
    }

    fn deserialize_seq<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Self::Error> {
        visitor.visit_seq(OneElement(Some(Tracer {
            in_array: true,
            ..self
        })))
    }

    fn deserialize_option<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Self::Error> {
        visitor.visit_some(self)
    }

    serde::forward_to_deserialize_any! {
        bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes byte_buf
        unit unit_struct newtype_struct tuple tuple_struct map enum identifier ignored_any
    }
}

/// A table with at most one key: the next one on the path being followed.
struct OneKey(Option<(&'static str, Tracer)>);

impl<'de> MapAccess<'de> for OneKey {
    type Error = de::value::Error;
    fn next_key_seed<K: DeserializeSeed<'de>>(
        &mut self,
        seed: K,
    ) -> Result<Option<K::Value>, Self::Error> {
        match &self.0 {
            Some((key, _)) => seed.deserialize((*key).into_deserializer()).map(Some),
            None => Ok(None),
        }
    }
    fn next_value_seed<V: DeserializeSeed<'de>>(
        &mut self,
        seed: V,
    ) -> Result<V::Value, Self::Error> {
        let (_, value) = self.0.take().expect("a key was given");
        seed.deserialize(value)
    }
}

/// An array with one element, traced like a table.
struct OneElement(Option<Tracer>);

impl<'de> SeqAccess<'de> for OneElement {
    type Error = de::value::Error;
    fn next_element_seed<T: DeserializeSeed<'de>>(
        &mut self,
        seed: T,
    ) -> Result<Option<T::Value>, Self::Error> {
        match self.0.take() {
            Some(t) => seed.deserialize(t).map(Some),
            None => Ok(None),
        }
    }
}

/// Every table of `T` with its keys.
fn trace<T: DeserializeOwned>() -> Tables {
    let tables = Rc::new(RefCell::new(Tables::new()));
    let mut queue = vec![Vec::<&'static str>::new()];
    let mut seen = BTreeSet::new();
    while let Some(follow) = queue.pop() {
        let _ = T::deserialize(Tracer {
            path: String::new(),
            follow: follow.clone(),
            in_array: false,
            tables: tables.clone(),
        });
        let path = follow.join(".");
        let fields = tables.borrow().get(&path).map(|(f, _)| f.clone());
        if let Some(fields) = fields
            && seen.insert(path)
        {
            for f in fields {
                let mut next = follow.clone();
                next.push(f);
                queue.push(next);
            }
        }
    }
    Rc::try_unwrap(tables).expect("one owner").into_inner()
}

/// One documented file: table path → key → default cell.
type Doc = BTreeMap<String, BTreeMap<String, String>>;

/// The tables of the part of docs/configuration.md under the `## ` heading starting with `title`.
fn doc_part(title: &str) -> Doc {
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../docs/configuration.md"
    ))
    .expect("docs/configuration.md");
    let part = text
        .split("\n## ")
        .find(|p| p.starts_with(title))
        .unwrap_or_else(|| panic!("no `## {title}` in docs/configuration.md"));
    let mut doc = Doc::new();
    let mut table: Option<String> = None;
    for line in part.lines() {
        if let Some(h) = line.strip_prefix("### ") {
            let path = if h.starts_with("Top level") {
                String::new()
            } else {
                h.trim_matches('`')
                    .trim_matches(|c| c == '[' || c == ']')
                    .to_owned()
            };
            doc.entry(path.clone()).or_default();
            table = Some(path);
        } else if let Some(row) = line.strip_prefix("| `") {
            let t = table
                .as_ref()
                .unwrap_or_else(|| panic!("a row outside a table: {line}"));
            let (key, rest) = row.split_once('`').expect("`key`");
            let default = rest
                .split('|')
                .nth(1)
                .expect("a default cell")
                .trim()
                .to_owned();
            let dup = doc
                .entry(t.clone())
                .or_default()
                .insert(key.to_owned(), default);
            assert!(dup.is_none(), "{title}: `{key}` listed twice in [{t}]");
        }
    }
    doc
}

/// The keys of `doc` must be those of the structs: a table for every struct, a row for
/// every key that is a value or an array of tables (a plain sub-table gets its own table).
fn assert_same_keys(what: &str, tables: &Tables, doc: &Doc) {
    let mut expected = Doc::new();
    for (path, (fields, _)) in tables {
        let rows = expected.entry(path.clone()).or_default();
        for f in fields {
            let sub = if path.is_empty() {
                (*f).to_owned()
            } else {
                format!("{path}.{f}")
            };
            if !matches!(tables.get(&sub), Some((_, false))) {
                rows.insert((*f).to_owned(), String::new());
            }
        }
    }
    let keys = |d: &Doc| -> BTreeSet<String> {
        d.iter()
            .flat_map(|(t, rows)| {
                std::iter::once(format!("[{t}]"))
                    .chain(rows.keys().map(move |k| format!("[{t}] {k}")))
            })
            .collect()
    };
    let (want, have) = (keys(&expected), keys(doc));
    let missing: Vec<_> = want.difference(&have).collect();
    let extra: Vec<_> = have.difference(&want).collect();
    assert!(
        missing.is_empty() && extra.is_empty(),
        "docs/configuration.md, {what}: not documented: {missing:?}; documented but not accepted: {extra:?}"
    );
}

/// A TOML document setting every documented default of the plain tables.
fn defaults_toml(doc: &Doc, tables: &Tables) -> String {
    let mut out = String::new();
    for (path, rows) in doc {
        if matches!(tables.get(path), Some((_, true))) {
            continue; // arrays of tables have no defaults
        }
        if !path.is_empty() {
            out.push_str(&format!("[{path}]\n"));
        }
        for (key, default) in rows {
            if default.starts_with('*') {
                continue; // *none*, *required*
            }
            let value = default.trim_matches('`');
            out.push_str(&format!("{key} = {value}\n"));
        }
    }
    // Top-level keys must come before any table.
    let (top, rest): (Vec<&str>, Vec<&str>) = {
        let mut top = Vec::new();
        let mut rest = Vec::new();
        let mut in_table = false;
        for l in out.lines() {
            in_table |= l.starts_with('[');
            if in_table { rest.push(l) } else { top.push(l) }
        }
        (top, rest)
    };
    format!("{}\n{}\n", top.join("\n"), rest.join("\n"))
}

#[test]
fn the_reference_lists_exactly_the_agent_keys_with_their_defaults() {
    use causeway_agent::config::AgentConfig;
    let tables = trace::<AgentConfig>();
    assert!(
        tables.contains_key("dns") && tables.contains_key("health"),
        "{tables:?}"
    );
    let doc = doc_part("agent.toml");
    assert_same_keys("agent.toml", &tables, &doc);
    let text = defaults_toml(&doc, &tables);
    let parsed: AgentConfig = toml::from_str(&text).unwrap_or_else(|e| panic!("{e}\n{text}"));
    assert_eq!(
        format!("{parsed:#?}"),
        format!("{:#?}", AgentConfig::default()),
        "a default in docs/configuration.md (agent.toml) differs from the built-in one:\n{text}"
    );
}

#[test]
fn the_reference_lists_exactly_the_controller_keys_with_their_defaults() {
    use causeway_controller::config::Config;
    let tables = trace::<Config>();
    assert!(
        tables.contains_key("sources.consul") && tables.contains_key("mesh"),
        "{tables:?}"
    );
    let doc = doc_part("controller.toml");
    assert_same_keys("controller.toml", &tables, &doc);
    let text = defaults_toml(&doc, &tables);
    let parsed: Config = toml::from_str(&text).unwrap_or_else(|e| panic!("{e}\n{text}"));
    assert_eq!(
        format!("{parsed:#?}"),
        format!("{:#?}", Config::default()),
        "a default in docs/configuration.md (controller.toml) differs from the built-in one:\n{text}"
    );
}

#[test]
fn the_reference_lists_exactly_the_file_source_keys_and_its_example_parses() {
    use causeway_registry::file::FileDoc;
    let tables = trace::<FileDoc>();
    assert!(tables.contains_key("services.endpoints"), "{tables:?}");
    let doc = doc_part("The file-source format");
    assert_same_keys("file source", &tables, &doc);
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../docs/configuration.md"
    ))
    .unwrap();
    let part = text
        .split("\n## The file-source format")
        .nth(1)
        .expect("file-source part");
    let example = part
        .split("```toml\n")
        .nth(1)
        .and_then(|s| s.split("```").next())
        .expect("a toml example");
    let parsed: FileDoc = toml::from_str(example).unwrap_or_else(|e| panic!("{e}\n{example}"));
    assert!(format!("{parsed:?}").contains("203.0.113.10"), "{parsed:?}");
}

/// The tracer sees a key that is added to a struct: the check cannot pass by accident.
#[test]
fn the_tracer_finds_nested_keys_and_arrays_of_tables() {
    #[allow(dead_code, reason = "only the field names matter")]
    #[derive(serde::Deserialize)]
    #[serde(deny_unknown_fields, default)]
    #[derive(Default)]
    struct Top {
        a: u32,
        inner: Inner,
        list: Vec<Item>,
    }
    #[allow(dead_code, reason = "only the field names matter")]
    #[derive(serde::Deserialize, Default)]
    #[serde(deny_unknown_fields, default)]
    struct Inner {
        b: Option<String>,
    }
    #[allow(dead_code, reason = "only the field names matter")]
    #[derive(serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Item {
        c: String,
        d: Vec<String>,
    }
    let t = trace::<Top>();
    assert_eq!(t[""], (vec!["a", "inner", "list"], false));
    assert_eq!(t["inner"], (vec!["b"], false));
    assert_eq!(t["list"], (vec!["c", "d"], true));
    assert_eq!(t.len(), 3, "{t:?}");
}
