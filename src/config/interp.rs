//! `${ENV}` interpolation in config strings and secrets named by `*_env` keys.
//!
//! Interpolated strings remember their template so `Debug` prints `${API_TOKEN}` rather than
//! the token: config structs can derive `Debug` without leaking secrets into logs.

use std::fmt;

use serde::{Deserialize, Deserializer};

/// Expand `${VAR}` and `${VAR:-default}`; a missing variable without default is an error.
pub fn expand(s: &str) -> Result<String, String> {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(start) = rest.find("${") {
        out.push_str(&rest[..start]);
        let after = &rest[start + 2..];
        let end = after
            .find('}')
            .ok_or_else(|| format!("unterminated ${{ in {s:?}"))?;
        let inner = &after[..end];
        let (name, default) = match inner.split_once(":-") {
            Some((n, d)) => (n, Some(d)),
            None => (inner, None),
        };
        if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
            return Err(format!(
                "invalid environment variable name {name:?} in ${{…}}"
            ));
        }
        match std::env::var(name) {
            Ok(v) if !v.is_empty() || default.is_none() => out.push_str(&v),
            _ => match default {
                Some(d) => out.push_str(d),
                None => return Err(format!("environment variable {name} is not set")),
            },
        }
        rest = &after[end + 1..];
    }
    out.push_str(rest);
    Ok(out)
}

/// A config string after `${ENV}` expansion.
#[derive(Clone, PartialEq, Eq, Default)]
pub struct Interp {
    template: String,
    value: String,
}

impl Interp {
    pub fn literal(s: impl Into<String>) -> Self {
        let s = s.into();
        Interp {
            template: s.clone(),
            value: s,
        }
    }
    pub fn as_str(&self) -> &str {
        &self.value
    }
    pub fn template(&self) -> &str {
        &self.template
    }
}

impl std::ops::Deref for Interp {
    type Target = str;
    fn deref(&self) -> &str {
        &self.value
    }
}

impl fmt::Debug for Interp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.template, f)
    }
}

impl<'de> Deserialize<'de> for Interp {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let template = String::deserialize(d)?;
        let value = expand(&template).map_err(serde::de::Error::custom)?;
        Ok(Interp { template, value })
    }
}

impl schemars::JsonSchema for Interp {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "Text".into()
    }
    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schemars::json_schema!({
            "type": "string",
            "description": "Text; `${ENV_VAR}` and `${ENV_VAR:-default}` are replaced from the environment."
        })
    }
}

/// A secret read from the environment variable a `*_env` key names. Never printed.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret {
    var: String,
    value: String,
}

impl Secret {
    pub fn expose(&self) -> &str {
        &self.value
    }
    pub fn var(&self) -> &str {
        &self.var
    }
    pub fn new(var: impl Into<String>, value: impl Into<String>) -> Self {
        Secret {
            var: var.into(),
            value: value.into(),
        }
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Secret(${}, redacted)", self.var)
    }
}

impl<'de> Deserialize<'de> for Secret {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let var = String::deserialize(d)?;
        match std::env::var(&var) {
            Ok(value) if !value.is_empty() => Ok(Secret { var, value }),
            _ => Err(serde::de::Error::custom(format!(
                "environment variable {var} is not set (this key names the variable holding the secret)"
            ))),
        }
    }
}

impl schemars::JsonSchema for Secret {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "SecretEnv".into()
    }
    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schemars::json_schema!({
            "type": "string",
            "description": "Name of the environment variable holding the secret (it must be set).",
            "pattern": "^[A-Za-z_][A-Za-z0-9_]*$"
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expands() {
        std::env::set_var("WP_TEST_INTERP", "abc");
        assert_eq!(expand("x ${WP_TEST_INTERP} y").unwrap(), "x abc y");
        assert_eq!(expand("${WP_TEST_MISSING_1:-dflt}").unwrap(), "dflt");
        assert_eq!(expand("plain").unwrap(), "plain");
        assert!(expand("${WP_TEST_MISSING_2}")
            .unwrap_err()
            .contains("WP_TEST_MISSING_2"));
        assert!(expand("${oops").is_err());
        assert!(expand("${bad name}").is_err());
    }

    #[test]
    fn debug_hides_value() {
        std::env::set_var("WP_TEST_SECRET", "hunter2");
        let i: Interp = serde_json::from_str("\"Bearer ${WP_TEST_SECRET}\"").unwrap();
        assert_eq!(i.as_str(), "Bearer hunter2");
        assert!(!format!("{i:?}").contains("hunter2"));
        let s: Secret = serde_json::from_str("\"WP_TEST_SECRET\"").unwrap();
        assert!(!format!("{s:?}").contains("hunter2"));
    }
}
