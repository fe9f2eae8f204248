//! `watchpost schema`: JSON Schemas (draft-07) of the main config file and of probe files,
//! generated from the structs the loader deserializes (schemars reads their serde attributes
//! and `///` docs), for editors (taplo / Even Better TOML) and for the test that keeps the
//! README's configuration tables true.
//!
//! Not here: what a schema cannot say (cross references, files, environment variables,
//! value ranges that depend on other keys): that is `watchpost validate`.

use std::borrow::Cow;

use schemars::generate::SchemaSettings;
use schemars::{json_schema, JsonSchema, Schema, SchemaGenerator};
use serde_json::Value;

use super::{MainFile, ProbeCommonFile};
use crate::probe::KIND_SCHEMAS;

/// Builds the JSON Schema of one kind's keys (a probe or notifier kind's struct).
pub type SchemaFn = fn(&mut SchemaGenerator) -> Schema;

/// Which file a schema describes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Which {
    /// `config/watchpost.toml`.
    Main,
    /// A probe file (`probes/*.toml`).
    Probe,
}

/// The JSON Schema of `which`, as a JSON document.
pub fn schema(which: Which) -> Value {
    let g = SchemaSettings::draft07().into_generator();
    let root = match which {
        Which::Main => g.into_root_schema_for::<MainFile>(),
        Which::Probe => g.into_root_schema_for::<ProbeFile>(),
    };
    let mut v = root.to_value();
    v["title"] = Value::from(match which {
        Which::Main => "watchpost configuration (config/watchpost.toml)",
        Which::Probe => "watchpost probe file (probes/*.toml)",
    });
    v
}

/// The keys every probe file may have, whatever its kind.
pub fn common_probe_keys() -> Vec<String> {
    let mut g = SchemaSettings::draft07().into_generator();
    let s = ProbeCommonFile::json_schema(&mut g);
    s.get("properties")
        .and_then(Value::as_object)
        .map(|m| m.keys().cloned().collect())
        .unwrap_or_default()
}

/// A probe file: the keys every kind has plus the keys of its `kind`.
struct ProbeFile;

impl JsonSchema for ProbeFile {
    fn schema_name() -> Cow<'static, str> {
        "ProbeFile".into()
    }
    fn json_schema(g: &mut SchemaGenerator) -> Schema {
        let kinds: Vec<(&str, Schema)> = KIND_SCHEMAS
            .iter()
            .map(|(kind, own)| {
                let mut s = ProbeCommonFile::json_schema(g);
                let own = own(g);
                merge_object(&mut s, &own);
                (*kind, s)
            })
            .collect();
        one_of_kinds(
            "A watchpost probe file: `kind` decides which keys it takes besides the common ones.",
            kinds,
        )
    }
}

/// Add `extra`'s properties and required keys to the object schema `into`.
fn merge_object(into: &mut Schema, extra: &Schema) {
    let (Some(into), Some(extra)) = (into.as_object_mut(), extra.as_object()) else {
        return;
    };
    for key in ["properties", "required"] {
        let Some(add) = extra.get(key) else { continue };
        match (into.entry(key).or_insert_with(|| add.clone()), add) {
            (Value::Object(have), Value::Object(add)) => {
                have.extend(add.iter().map(|(k, v)| (k.clone(), v.clone())))
            }
            (Value::Array(have), Value::Array(add)) => {
                for v in add {
                    if !have.contains(v) {
                        have.push(v.clone());
                    }
                }
            }
            _ => {}
        }
    }
}

/// One of several object schemas told apart by their `kind` key: each variant gets
/// `kind` as a required constant.
pub(crate) fn one_of_kinds<'a>(
    description: &str,
    kinds: impl IntoIterator<Item = (&'a str, Schema)>,
) -> Schema {
    let variants: Vec<Value> = kinds
        .into_iter()
        .map(|(kind, mut s)| {
            if let Some(obj) = s.as_object_mut() {
                obj.insert("title".into(), Value::String(format!("kind = \"{kind}\"")));
                if let Value::Object(props) = obj
                    .entry("properties")
                    .or_insert_with(|| Value::Object(Default::default()))
                {
                    props.insert("kind".into(), json_kind(kind));
                }
                let req = obj
                    .entry("required")
                    .or_insert_with(|| Value::Array(Vec::new()));
                if let Value::Array(req) = req {
                    if !req.contains(&Value::from("kind")) {
                        req.insert(0, Value::from("kind"));
                    }
                }
            }
            s.to_value()
        })
        .collect();
    json_schema!({
        "description": description,
        "type": "object",
        "oneOf": variants,
    })
}

fn json_kind(kind: &str) -> Value {
    serde_json::json!({ "description": "What this table is.", "const": kind })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every key an editor offers comes with the `///` line of its field.
    fn undocumented(v: &Value, at: &str, out: &mut Vec<String>) {
        match v {
            Value::Object(m) => {
                if let Some(Value::Object(props)) = m.get("properties") {
                    for (k, p) in props {
                        if p.get("description").is_none() {
                            out.push(format!("{at}.{k}"));
                        }
                    }
                }
                for (k, x) in m {
                    undocumented(x, &format!("{at}/{k}"), out);
                }
            }
            Value::Array(a) => a.iter().for_each(|x| undocumented(x, at, out)),
            _ => {}
        }
    }

    #[test]
    fn every_key_has_a_description() {
        for which in [Which::Main, Which::Probe] {
            let mut missing = Vec::new();
            undocumented(&schema(which), "", &mut missing);
            assert!(missing.is_empty(), "{which:?}: no description: {missing:?}");
        }
    }
}
