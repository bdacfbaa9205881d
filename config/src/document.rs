//! The YAML documents behind a configuration: `${...}` expansion, merging several
//! files in order, and finding where a key path was written (file, line, column), so
//! that every error can point at its source.
use serde_norway::{Mapping, Value};

/// One configuration file as read.
#[derive(Clone, Debug)]
pub struct Source {
    pub origin: String,
    pub text: String,
}

/// Expands `${env:NAME}`, `${env:NAME:-default}`, `${NAME}` and `${file:PATH}` in every
/// string value, as the collector does: a value that is exactly one reference takes the
/// referenced text parsed as YAML (so `${env:PORT}` can be an int), a reference inside a
/// longer string is replaced as text, and `$$` is a literal `$`. Keys are not expanded.
pub fn expand(value: &mut Value, path: &mut Vec<String>) -> Result<(), (String, String)> {
    match value {
        Value::Mapping(map) => {
            for (key, item) in map.iter_mut() {
                path.push(key.as_str().unwrap_or("?").to_owned());
                expand(item, path)?;
                path.pop();
            }
        }
        Value::Sequence(items) => {
            for (i, item) in items.iter_mut().enumerate() {
                path.push(i.to_string());
                expand(item, path)?;
                path.pop();
            }
        }
        Value::String(text) if text.contains('$') => {
            let at = || path.join(".");
            let whole =
                text.starts_with("${") && text.ends_with('}') && text.matches("${").count() == 1;
            let expanded = expand_text(text).map_err(|e| (at(), e))?;
            *value = if whole {
                serde_norway::from_str::<Value>(&expanded)
                    .ok()
                    .filter(|v| !matches!(v, Value::Mapping(_) | Value::Sequence(_) | Value::Null))
                    .unwrap_or(Value::String(expanded))
            } else {
                Value::String(expanded)
            };
        }
        _ => {}
    }
    Ok(())
}

fn expand_text(text: &str) -> Result<String, String> {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(pos) = rest.find('$') {
        out.push_str(&rest[..pos]);
        let after = &rest[pos + 1..];
        if let Some(stripped) = after.strip_prefix('$') {
            out.push('$');
            rest = stripped;
        } else if let Some(body) = after.strip_prefix('{') {
            let end = body
                .find('}')
                .ok_or_else(|| format!("unterminated reference in {text:?}"))?;
            out.push_str(&resolve(&body[..end])?);
            rest = &body[end + 1..];
        } else {
            out.push('$');
            rest = after;
        }
    }
    out.push_str(rest);
    Ok(out)
}

fn resolve(reference: &str) -> Result<String, String> {
    let (scheme, name) = match reference.split_once(':') {
        Some((scheme @ ("env" | "file"), name)) => (scheme, name),
        _ => ("env", reference),
    };
    match scheme {
        "file" => std::fs::read_to_string(name)
            .map(|s| s.trim_end_matches('\n').to_owned())
            .map_err(|e| format!("${{file:{name}}}: cannot read {name}: {e}")),
        _ => {
            let (var, default) = match name.split_once(":-") {
                Some((var, default)) => (var, Some(default)),
                None => (name, None),
            };
            match (std::env::var(var), default) {
                (Ok(value), _) => Ok(value),
                (Err(_), Some(default)) => Ok(default.to_owned()),
                (Err(_), None) => Err(format!(
                    "${{env:{var}}}: environment variable {var} is not set (give a default with ${{env:{var}:-value}})"
                )),
            }
        }
    }
}

/// Merges `later` into `base`: mappings key by key, anything else replaced, as the
/// collector merges several `--config` files.
pub fn merge(base: &mut Value, later: Value) {
    match (base, later) {
        (Value::Mapping(base), Value::Mapping(later)) => {
            for (key, value) in later {
                match base.get_mut(&key) {
                    Some(existing) => merge(existing, value),
                    None => {
                        base.insert(key, value);
                    }
                }
            }
        }
        (base, later) => *base = later,
    }
}

/// Where `path` (e.g. `exporters.otlp.timeout`) was written in a block-style YAML
/// text: the 1-based line and column of the deepest key of it that can be found.
pub fn locate(text: &str, path: &[&str]) -> Option<(usize, usize, usize)> {
    let mut stack: Vec<(usize, String)> = Vec::new();
    let mut best: Option<(usize, usize, usize)> = None;
    for (n, line) in text.lines().enumerate() {
        let trimmed = line.trim_start();
        if trimmed.is_empty() || trimmed.starts_with('#') {
            continue;
        }
        let mut indent = line.len() - trimmed.len();
        let mut body = trimmed;
        while let Some(item) = body.strip_prefix("- ") {
            indent += 2;
            body = item.trim_start();
        }
        let Some(colon) = body.find(':') else {
            continue;
        };
        let key = body[..colon].trim().trim_matches(|c| c == '"' || c == '\'');
        if key.is_empty() || key.contains(' ') && !key.contains('/') {
            continue;
        }
        while stack.last().is_some_and(|(i, _)| *i >= indent) {
            stack.pop();
        }
        stack.push((indent, key.to_owned()));
        let depth = stack
            .iter()
            .zip(path)
            .take_while(|((_, k), p)| k == *p)
            .count();
        if depth == stack.len() && best.is_none_or(|(d, _, _)| depth > d) {
            best = Some((depth, n + 1, indent + 1));
        }
    }
    best
}

/// "did you mean" for serde's unknown-field and unknown-variant messages.
pub fn suggestion(message: &str) -> Option<String> {
    let names: Vec<&str> = message.split('`').skip(1).step_by(2).collect();
    let (unknown, expected) = names.split_first()?;
    if !(message.starts_with("unknown field") || message.starts_with("unknown variant")) {
        return None;
    }
    expected
        .iter()
        .map(|candidate| (strsim::levenshtein(unknown, candidate), *candidate))
        .filter(|(distance, candidate)| *distance <= 2.max(candidate.len() / 3))
        .min()
        .map(|(_, best)| format!(" (did you mean `{best}`?)"))
}

/// An empty mapping, the value of an empty document.
pub fn empty() -> Value {
    Value::Mapping(Mapping::new())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn yaml(text: &str) -> Value {
        serde_norway::from_str(text).unwrap()
    }

    #[test]
    fn expansion_follows_the_collector() {
        // SAFETY: single-threaded test setup of a variable no other test reads.
        unsafe { std::env::set_var("RIDLEY_TEST_PORT", "4317") };
        let mut v = yaml(
            "a: ${env:RIDLEY_TEST_PORT}\nb: host:${RIDLEY_TEST_PORT}\nc: ${env:RIDLEY_TEST_UNSET:-x}\nd: $$5\n",
        );
        expand(&mut v, &mut vec![]).unwrap();
        assert_eq!(v, yaml("a: 4317\nb: host:4317\nc: x\nd: $5\n"));
        let mut v = yaml("exporters:\n  otlp:\n    endpoint: ${env:RIDLEY_TEST_UNSET}\n");
        let (path, message) = expand(&mut v, &mut vec![]).unwrap_err();
        assert_eq!(path, "exporters.otlp.endpoint");
        assert!(
            message.starts_with("${env:RIDLEY_TEST_UNSET}: environment variable"),
            "{message}"
        );
    }

    #[test]
    fn later_files_override_earlier_ones_key_by_key() {
        let mut base = yaml("exporters:\n  otlp: {endpoint: a, timeout: 5s}\n  debug: {}\n");
        merge(&mut base, yaml("exporters:\n  otlp: {endpoint: b}\n"));
        assert_eq!(
            base,
            yaml("exporters:\n  otlp: {endpoint: b, timeout: 5s}\n  debug: {}\n")
        );
    }

    #[test]
    fn locates_nested_keys() {
        let text = "receivers:\n  ebpf:\n    collection_interval: 1s\nexporters:\n  otlp:\n    endpoint: x\n    timeout: nope\n";
        assert_eq!(
            locate(text, &["exporters", "otlp", "timeout"]),
            Some((3, 7, 5))
        );
        // A key that is not written: the deepest written prefix.
        assert_eq!(locate(text, &["exporters", "otlp", "tls"]), Some((2, 5, 3)));
        assert_eq!(locate(text, &["processors"]), None);
    }

    #[test]
    fn suggests_the_closest_key() {
        assert_eq!(
            suggestion("unknown field `colection_interval`, expected one of `collection_interval`, `idle_timeout`").as_deref(),
            Some(" (did you mean `collection_interval`?)")
        );
        assert_eq!(suggestion("unknown field `zzz`, expected `path`"), None);
    }
}
