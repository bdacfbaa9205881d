//! The YAML documents behind a configuration: `${...}` expansion, merging several
//! files in order, finding where a key path was written (file, line, column), so
//! that every error can point at its source, and hiding secrets when it is printed.
use serde_norway::{Mapping, Value};

use crate::limits::{
    MAX_EXPANDED_SIZE, MAX_NESTING_DEPTH, MAX_REFERENCED_FILE_SIZE, nesting_depth,
    read_regular_file, show_size,
};

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
///
/// `budget` is how many bytes the references may still substitute (it starts at
/// [`MAX_EXPANDED_SIZE`] for a whole configuration); a `${file:PATH}` reads only a
/// regular file of at most [`MAX_REFERENCED_FILE_SIZE`].
pub fn expand(
    value: &mut Value,
    path: &mut Vec<String>,
    budget: &mut u64,
) -> Result<(), (String, String)> {
    match value {
        Value::Mapping(map) => {
            for (key, item) in map.iter_mut() {
                path.push(key.as_str().unwrap_or("?").to_owned());
                expand(item, path, budget)?;
                path.pop();
            }
        }
        Value::Sequence(items) => {
            for (i, item) in items.iter_mut().enumerate() {
                path.push(i.to_string());
                expand(item, path, budget)?;
                path.pop();
            }
        }
        Value::String(text) if text.contains('$') => {
            let at = || path.join(".");
            let whole =
                text.starts_with("${") && text.ends_with('}') && text.matches("${").count() == 1;
            let expanded = expand_text(text, budget).map_err(|e| (at(), e))?;
            // Text nested too deep for the limit would not be a scalar: it stays a string,
            // without being handed to the parser.
            *value = if whole && nesting_depth(&expanded, MAX_NESTING_DEPTH).is_ok() {
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

fn expand_text(text: &str, budget: &mut u64) -> Result<String, String> {
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
            let reference = &body[..end];
            let resolved = resolve(reference)?;
            *budget = budget.checked_sub(resolved.len() as u64).ok_or_else(|| {
                format!(
                    "${{{reference}}}: the references expand to more than the {} limit for a configuration",
                    show_size(MAX_EXPANDED_SIZE)
                )
            })?;
            out.push_str(&resolved);
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
        "file" => read_regular_file(name.as_ref(), MAX_REFERENCED_FILE_SIZE, "a referenced file")
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

/// The candidate a mistyped name was most likely meant to be, if one is close enough.
pub fn closest<'a>(
    unknown: &str,
    candidates: impl IntoIterator<Item = &'a str>,
) -> Option<&'a str> {
    candidates
        .into_iter()
        .map(|candidate| (strsim::levenshtein(unknown, candidate), candidate))
        .filter(|(distance, candidate)| *distance <= 2.max(candidate.len() / 3))
        .min()
        .map(|(_, best)| best)
}

/// "did you mean" for serde's unknown-field and unknown-variant messages, where only
/// serde's text has the names (nested sections, enum values).
pub fn suggestion(message: &str) -> Option<String> {
    let names: Vec<&str> = message.split('`').skip(1).step_by(2).collect();
    let (unknown, expected) = names.split_first()?;
    if !(message.starts_with("unknown field") || message.starts_with("unknown variant")) {
        return None;
    }
    closest(unknown, expected.iter().copied()).map(|best| format!(" (did you mean `{best}`?)"))
}

/// What `ridley config --print` shows in place of a secret.
pub const REDACTED: &str = "[REDACTED]";

/// A copy of `value` with its secrets replaced by [`REDACTED`]: every value under a
/// `headers` mapping, and the values of keys named as secrets ([`is_secret_key`]). A
/// mapping under a secret-named key is structure, not a secret: its own keys are judged
/// one by one. Nulls stay: they say a secret is not set, not what it is.
pub fn redact(value: &Value) -> Value {
    let mut value = value.clone();
    redact_in(&mut value);
    value
}

fn redact_in(value: &mut Value) {
    match value {
        Value::Mapping(map) => {
            for (key, item) in map.iter_mut() {
                let name = key.as_str().unwrap_or_default();
                if name.eq_ignore_ascii_case("headers") {
                    redact_all(item);
                } else if is_secret_key(name) {
                    redact_secret(item);
                } else {
                    redact_in(item);
                }
            }
        }
        Value::Sequence(items) => items.iter_mut().for_each(redact_in),
        Value::Tagged(tagged) => redact_in(&mut tagged.value),
        _ => {}
    }
}

fn redact_all(value: &mut Value) {
    match value {
        Value::Null => {}
        Value::Mapping(map) => map.values_mut().for_each(redact_all),
        Value::Sequence(items) => items.iter_mut().for_each(redact_all),
        Value::Tagged(tagged) => redact_all(&mut tagged.value),
        _ => *value = Value::String(REDACTED.to_owned()),
    }
}

fn redact_secret(value: &mut Value) {
    match value {
        Value::Null => {}
        Value::Mapping(_) => redact_in(value),
        Value::Sequence(items) => items.iter_mut().for_each(redact_secret),
        Value::Tagged(tagged) => redact_secret(&mut tagged.value),
        _ => *value = Value::String(REDACTED.to_owned()),
    }
}

/// Words that make a key name a secret's, alone (`token`, `api_key`, `bearerToken`) or
/// ending a word (`apikey`, `clientsecret`), singular or plural.
const SECRET_WORDS: &[&str] = &[
    "password",
    "passwd",
    "passphrase",
    "secret",
    "token",
    "key",
    "credential",
    "authorization",
];

/// Whether a key names a secret: one of its words (split at `_`, `-`, `.`, spaces and
/// camelCase humps) is or ends with one of [`SECRET_WORDS`], and its last word does not
/// make it a path to one (`key_file`, `token_path`). `keep_pod_detail` is not a secret:
/// `keep` is not `key`.
pub fn is_secret_key(name: &str) -> bool {
    let mut words: Vec<String> = Vec::new();
    let mut previous_lower = false;
    for c in name.chars() {
        if !c.is_alphanumeric() {
            previous_lower = false;
            words.push(String::new());
            continue;
        }
        if c.is_uppercase() && previous_lower || words.is_empty() {
            words.push(String::new());
        }
        previous_lower = c.is_lowercase() || c.is_ascii_digit();
        if let Some(word) = words.last_mut() {
            word.extend(c.to_lowercase());
        }
    }
    words.retain(|w| !w.is_empty());
    if words
        .last()
        .is_some_and(|last| matches!(last.as_str(), "file" | "path" | "dir"))
    {
        return false;
    }
    words.iter().any(|word| {
        let singular = word.strip_suffix('s').unwrap_or(word);
        SECRET_WORDS
            .iter()
            .any(|secret| word.ends_with(secret) || singular.ends_with(secret))
    })
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
            "a: ${env:RIDLEY_TEST_PORT}\nb: host:${RIDLEY_TEST_PORT}\nc: ${env:RIDLEY_TEST_UNSET:-x}\nd: $$5\ne: \"${env:RIDLEY_TEST_UNSET:-}\"\n",
        );
        expand(&mut v, &mut vec![], &mut MAX_EXPANDED_SIZE.clone()).unwrap();
        // An empty default is how a value may be empty on purpose.
        assert_eq!(v, yaml("a: 4317\nb: host:4317\nc: x\nd: $5\ne: ''\n"));
        let mut v = yaml("exporters:\n  otlp:\n    endpoint: ${env:RIDLEY_TEST_UNSET}\n");
        let (path, message) =
            expand(&mut v, &mut vec![], &mut MAX_EXPANDED_SIZE.clone()).unwrap_err();
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

    fn scratch(name: &str, contents: &[u8]) -> std::path::PathBuf {
        let path =
            std::env::temp_dir().join(format!("ridley-document-{}-{name}", std::process::id()));
        std::fs::write(&path, contents).unwrap();
        path
    }

    fn expand_error(text: &str) -> String {
        let mut v = yaml(text);
        let (path, message) =
            expand(&mut v, &mut vec![], &mut MAX_EXPANDED_SIZE.clone()).unwrap_err();
        format!("{path}: {message}")
    }

    #[test]
    fn file_references_read_only_small_regular_files() {
        assert_eq!(
            expand_error("a:\n  b: ${file:/dev/zero}\n"),
            "a.b: ${file:/dev/zero}: cannot read /dev/zero: not a regular file (it is a character device)"
        );
        let limit = MAX_REFERENCED_FILE_SIZE as usize;
        let big = scratch("big", &vec![b'x'; limit + 1]);
        assert_eq!(
            expand_error(&format!("a: ${{file:{}}}\n", big.display())),
            format!(
                "a: ${{file:{0}}}: cannot read {0}: larger than the 1 MiB limit for a referenced file",
                big.display()
            )
        );
        // Exactly at the limit is fine.
        let full = scratch("full", &vec![b'x'; limit]);
        let mut v = yaml(&format!("a: ${{file:{}}}\n", full.display()));
        expand(&mut v, &mut vec![], &mut MAX_EXPANDED_SIZE.clone()).unwrap();
        assert_eq!(v["a"].as_str().map(str::len), Some(limit));
        std::fs::remove_file(big).unwrap();
        std::fs::remove_file(full).unwrap();
    }

    #[test]
    fn references_share_one_budget() {
        let file = scratch("token", b"0123456789\n");
        let text = format!("a: x${{file:{0}}}\nb: y${{file:{0}}}\n", file.display());
        let mut v = yaml(&text);
        let mut budget = 19;
        let (path, message) = expand(&mut v, &mut vec![], &mut budget).unwrap_err();
        assert_eq!(path, "b");
        assert_eq!(
            message,
            format!(
                "${{file:{}}}: the references expand to more than the 16 MiB limit for a configuration",
                file.display()
            )
        );
        let mut v = yaml(&text);
        let mut budget = 20;
        expand(&mut v, &mut vec![], &mut budget).unwrap();
        assert_eq!(budget, 0);
        assert_eq!(v, yaml("a: x0123456789\nb: y0123456789\n"));
        std::fs::remove_file(file).unwrap();
    }

    #[test]
    fn a_deeply_nested_reference_stays_text_and_is_not_parsed() {
        let deep = "{a: ".repeat(200_000);
        let file = scratch("deep", deep.as_bytes());
        let mut v = yaml(&format!("a: ${{file:{}}}\n", file.display()));
        let started = std::time::Instant::now();
        expand(&mut v, &mut vec![], &mut MAX_EXPANDED_SIZE.clone()).unwrap();
        assert!(started.elapsed() < std::time::Duration::from_secs(2));
        assert_eq!(v["a"].as_str(), Some(deep.as_str()));
        std::fs::remove_file(file).unwrap();
    }

    #[test]
    fn secret_keys_are_told_by_their_words() {
        for secret in [
            "password",
            "api_key",
            "apikey",
            "apiKey",
            "X-API-Key",
            "bearer_token",
            "client_secret",
            "authorization",
            "Authorization",
            "key",
            "tokens",
            "key_pem",
            "db_passwd",
            "credentials",
        ] {
            assert!(is_secret_key(secret), "{secret}");
        }
        for plain in [
            "key_file",
            "cert_file",
            "ca_file",
            "token_path",
            "keep_pod_detail",
            "kubeconfig",
            "endpoint",
            "headers",
            "auth",
            "collection_interval",
            "",
        ] {
            assert!(!is_secret_key(plain), "{plain}");
        }
    }

    #[test]
    fn redaction_hides_headers_and_secret_values() {
        let effective = yaml(concat!(
            "exporters:\n",
            "  otlphttp:\n",
            "    endpoint: https://collector:4318\n",
            "    headers: {Authorization: Bearer abc, X-Scope-OrgID: tenant-1, X-Empty: null}\n",
            "    tls: {key_file: /etc/tls/client.key, ca_file: /etc/tls/ca.pem}\n",
            "    api_key: 12345\n",
            "    tokens: [one, two]\n",
            "    password:\n",
            "    client_secret: {name: vault, key: s3cr3t}\n",
            "processors:\n",
            "  k8sattributes: {keep_pod_detail: true}\n",
        ));
        let redacted = redact(&effective);
        assert_eq!(
            serde_norway::to_string(&redacted).unwrap(),
            concat!(
                "exporters:\n",
                "  otlphttp:\n",
                "    endpoint: https://collector:4318\n",
                "    headers:\n",
                "      Authorization: '[REDACTED]'\n",
                "      X-Scope-OrgID: '[REDACTED]'\n",
                "      X-Empty: null\n",
                "    tls:\n",
                "      key_file: /etc/tls/client.key\n",
                "      ca_file: /etc/tls/ca.pem\n",
                "    api_key: '[REDACTED]'\n",
                "    tokens:\n",
                "    - '[REDACTED]'\n",
                "    - '[REDACTED]'\n",
                "    password: null\n",
                "    client_secret:\n",
                "      name: vault\n",
                "      key: '[REDACTED]'\n",
                "processors:\n",
                "  k8sattributes:\n",
                "    keep_pod_detail: true\n",
            )
        );
        // The value itself is untouched.
        assert_eq!(
            effective["exporters"]["otlphttp"]["headers"]["Authorization"].as_str(),
            Some("Bearer abc")
        );
    }
}
