//! The rule table: its schema in `rules.toml`, and loading it validated into [`Rules`].

use std::collections::{BTreeMap, HashSet};

use regex::{Regex, RegexSet};
use serde::Deserialize;

use crate::parse;

/// The rule table shipped with Portcullis.
pub const BUILTIN_RULES: &str = include_str!("../../rules.toml");

#[derive(Debug, thiserror::Error)]
pub enum RulesError {
    #[error("the rule table is not valid TOML: {0}")]
    Toml(String),
    #[error("rule {index} ({id}): {what}")]
    Rule {
        index: usize,
        id: String,
        what: String,
    },
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Table {
    rule: Vec<RuleSpec>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RuleSpec {
    id: String,
    title: String,
    cause: String,
    resolution: String,
    #[serde(rename = "match")]
    matchers: Vec<MatcherSpec>,
    #[serde(default)]
    supporting: Vec<String>,
    #[serde(default)]
    before: Vec<String>,
    #[serde(default)]
    after: Vec<String>,
    #[serde(default)]
    absorbed_by: Vec<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct MatcherSpec {
    message: Option<String>,
    component: Option<String>,
    #[serde(default)]
    fields: BTreeMap<String, String>,
}

pub(super) struct Matcher {
    /// Index into `Rules::message_set` and `Rules::message_regexes`.
    pub(super) message: Option<usize>,
    pub(super) component: Option<Regex>,
    pub(super) fields: Vec<(String, Regex)>,
}

pub(super) struct Rule {
    pub(super) id: String,
    pub(super) title: String,
    pub(super) cause: String,
    pub(super) resolution: String,
    pub(super) matchers: Vec<Matcher>,
    pub(super) before: Vec<Regex>,
    pub(super) after: Vec<Regex>,
    pub(super) absorbed_by: Vec<usize>,
}

/// A validated rule table.
pub struct Rules {
    pub(super) rules: Vec<Rule>,
    pub(super) message_set: RegexSet,
    pub(super) message_regexes: Vec<Regex>,
    /// Supporting patterns of every rule: one set, and which rule each belongs to.
    pub(super) support_set: RegexSet,
    pub(super) support_regexes: Vec<(usize, Regex)>,
}

impl std::fmt::Debug for Rules {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Rules")
            .field("ids", &self.ids().collect::<Vec<_>>())
            .finish()
    }
}

/// A field name as a capture name: `cs(User-Agent)` is `cs_user_agent`.
pub(super) fn capture_name(field: &str) -> String {
    let mut out = String::new();
    for c in field.chars() {
        if c.is_ascii_alphanumeric() {
            out.push(c.to_ascii_lowercase());
        } else if !out.ends_with('_') {
            out.push('_');
        }
    }
    out.trim_matches('_').to_string()
}

/// `{name}` or `{name|fallback}` in a template.
fn placeholders(
    template: &str,
) -> impl Iterator<Item = (std::ops::Range<usize>, &str, Option<&str>)> {
    let mut at = 0;
    std::iter::from_fn(move || loop {
        let open = at + template.get(at..)?.find('{')?;
        let close = template[open..].find('}').map(|c| open + c)?;
        at = open + 1;
        let inner = &template[open + 1..close];
        let (name, fallback) = match inner.split_once('|') {
            Some((n, f)) => (n, Some(f)),
            None => (inner, None),
        };
        if !name.is_empty() && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
            at = close + 1;
            return Some((open..close + 1, name, fallback));
        }
    })
}

pub(super) fn fill(template: &str, captures: &BTreeMap<String, String>) -> String {
    let mut out = String::new();
    let mut last = 0;
    for (range, name, fallback) in placeholders(template) {
        out.push_str(&template[last..range.start]);
        match (captures.get(name), fallback) {
            (Some(v), _) => out.push_str(v),
            (None, Some(f)) => out.push_str(f),
            (None, None) => out.push_str(name),
        }
        last = range.end;
    }
    out.push_str(&template[last..]);
    out
}

impl Rules {
    /// The embedded table.
    pub fn builtin() -> Result<Rules, RulesError> {
        Rules::from_toml(BUILTIN_RULES)
    }

    /// A table from TOML text, validated.
    pub fn from_toml(text: &str) -> Result<Rules, RulesError> {
        let table: Table = toml::from_str(text).map_err(|e| RulesError::Toml(e.to_string()))?;
        let mut rules = Vec::new();
        let mut message_patterns = Vec::new();
        let mut message_regexes = Vec::new();
        let mut support_patterns = Vec::new();
        let mut support_regexes = Vec::new();
        let mut seen = HashSet::new();
        let mut names_per_rule: Vec<HashSet<String>> = Vec::new();
        for (index, spec) in table.rule.iter().enumerate() {
            let bad = |what: String| RulesError::Rule {
                index: index + 1,
                id: spec.id.clone(),
                what,
            };
            let regex = |kind: &str, pattern: &str| {
                // A Unicode word boundary sends the regex engine down its slow path on
                // non-ASCII text; the table writes ASCII ones.
                let bare = pattern.replace(r"(?-u:\b)", "").replace(r"(?-u:\B)", "");
                if bare.contains(r"\b") || bare.contains(r"\B") {
                    return Err(bad(format!(
                        "{kind} regex {pattern:?}: write word boundaries as (?-u:\\b), ASCII"
                    )));
                }
                Regex::new(pattern).map_err(|e| bad(format!("{kind} regex {pattern:?}: {e}")))
            };
            if spec.id.is_empty()
                || !spec
                    .id
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
            {
                return Err(bad("the id must be lower-case letters, digits and -".into()));
            }
            if !seen.insert(spec.id.clone()) {
                return Err(bad("the id is used by an earlier rule".into()));
            }
            for (name, text) in [
                ("title", &spec.title),
                ("cause", &spec.cause),
                ("resolution", &spec.resolution),
            ] {
                if text.trim().is_empty() {
                    return Err(bad(format!("{name} is empty")));
                }
            }
            if spec.matchers.is_empty() {
                return Err(bad("no match = [...]: it could never fire".into()));
            }
            let mut names: HashSet<String> = HashSet::new();
            let mut matchers = Vec::new();
            for m in &spec.matchers {
                if m.message.is_none() && m.fields.is_empty() && m.component.is_none() {
                    return Err(bad("a matcher with no message, fields or component".into()));
                }
                let message = match &m.message {
                    Some(p) => {
                        let r = regex("message", p)?;
                        names.extend(r.capture_names().flatten().map(str::to_string));
                        message_patterns.push(p.clone());
                        message_regexes.push(r);
                        Some(message_regexes.len() - 1)
                    }
                    None => None,
                };
                let mut fields = Vec::new();
                for (name, pattern) in &m.fields {
                    let r = regex(&format!("field {name}"), &format!("^(?:{pattern})$"))?;
                    fields.push((name.clone(), r));
                }
                if !m.fields.is_empty() {
                    // W3C records: every field can be interpolated.
                    names.extend(
                        parse::W3C_DEFAULT_FIELDS
                            .split(' ')
                            .chain(m.fields.keys().map(String::as_str))
                            .map(capture_name),
                    );
                }
                matchers.push(Matcher {
                    message,
                    component: m
                        .component
                        .as_deref()
                        .map(|p| regex("component", p))
                        .transpose()?,
                    fields,
                });
            }
            let mut context = |kind: &str, patterns: &[String]| {
                patterns
                    .iter()
                    .map(|p| {
                        let r = regex(kind, p)?;
                        names.extend(r.capture_names().flatten().map(str::to_string));
                        Ok(r)
                    })
                    .collect::<Result<Vec<_>, RulesError>>()
            };
            let before = context("before", &spec.before)?;
            let after = context("after", &spec.after)?;
            for r in context("supporting", &spec.supporting)? {
                support_patterns.push(r.as_str().to_string());
                support_regexes.push((index, r));
            }
            names_per_rule.push(names);
            let mut absorbed_by = Vec::new();
            for id in &spec.absorbed_by {
                match table.rule[..index].iter().position(|r| &r.id == id) {
                    Some(i) => absorbed_by.push(i),
                    None => {
                        return Err(bad(format!(
                            "absorbed_by names {id:?}, which is not an earlier rule"
                        )))
                    }
                }
            }
            rules.push(Rule {
                id: spec.id.clone(),
                title: spec.title.trim().to_string(),
                cause: spec.cause.trim().to_string(),
                resolution: spec.resolution.trim().to_string(),
                matchers,
                before,
                after,
                absorbed_by,
            });
        }
        // Placeholders: captured by the rule, or by a rule absorbed into it.
        for (index, (rule, spec)) in rules.iter().zip(&table.rule).enumerate() {
            let mut names = names_per_rule[index].clone();
            for (other, r) in rules.iter().enumerate() {
                if r.absorbed_by.contains(&index) {
                    names.extend(names_per_rule[other].iter().cloned());
                }
            }
            for (what, text) in [
                ("title", &spec.title),
                ("cause", &spec.cause),
                ("resolution", &spec.resolution),
            ] {
                for (_, name, _) in placeholders(text) {
                    if !names.contains(name) {
                        return Err(RulesError::Rule {
                            index: index + 1,
                            id: rule.id.clone(),
                            what: format!(
                                "the {what} uses {{{name}}}, which no pattern of this rule (or of a rule absorbed into it) captures"
                            ),
                        });
                    }
                }
            }
        }
        let set = |patterns: Vec<String>| {
            RegexSet::new(patterns).map_err(|e| RulesError::Toml(format!("regex set: {e}")))
        };
        Ok(Rules {
            rules,
            message_set: set(message_patterns)?,
            message_regexes,
            support_set: set(support_patterns)?,
            support_regexes,
        })
    }

    /// Rule ids in table order.
    pub fn ids(&self) -> impl Iterator<Item = &str> {
        self.rules.iter().map(|r| r.id.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_embedded_table_loads() {
        let rules = Rules::builtin().unwrap_or_else(|e| panic!("{e}"));
        assert!(rules.ids().count() >= 30);
    }

    #[test]
    fn bad_tables_are_refused_with_the_rule_named() {
        let rule = |extra: &str| {
            format!(
                "[[rule]]\nid = \"x\"\ntitle = \"t\"\ncause = \"c\"\nresolution = \"r\"\n{extra}\n"
            )
        };
        let err = Rules::from_toml(&rule("match = [{ message = '(unclosed' }]")).unwrap_err();
        assert!(
            err.to_string().contains("rule 1 (x): message regex"),
            "{err}"
        );
        let err = Rules::from_toml(&rule(r"match = [{ message = '\bx' }]")).unwrap_err();
        assert!(err.to_string().contains("(?-u:\\b)"), "{err}");
        assert!(Rules::from_toml(&rule(r"match = [{ message = '(?-u:\b)x' }]")).is_ok());
        let err = Rules::from_toml(&rule("match = []")).unwrap_err();
        assert!(err.to_string().contains("never fire"), "{err}");
        let err = Rules::from_toml(&rule("match = [{ message = 'a' }]\nabsorbed_by = ['y']"))
            .unwrap_err();
        assert!(err.to_string().contains("not an earlier rule"), "{err}");
        let err = Rules::from_toml(&rule("match = [{ mesage = 'a' }]")).unwrap_err();
        assert!(err.to_string().contains("mesage"), "{err}");
        let bad_capture = "[[rule]]\nid = \"x\"\ntitle = \"t\"\ncause = \"c {url}\"\nresolution = \"r\"\nmatch = [{ message = 'a' }]\n";
        let err = Rules::from_toml(bad_capture).unwrap_err();
        assert!(err.to_string().contains("{url}"), "{err}");
        let two = format!(
            "{}{}",
            rule("match = [{ message = 'a' }]"),
            rule("match = [{ message = 'a' }]")
        );
        assert!(Rules::from_toml(&two)
            .unwrap_err()
            .to_string()
            .contains("earlier rule"));
    }

    #[test]
    fn templates() {
        let mut caps = BTreeMap::new();
        caps.insert("url".to_string(), "https://mp".to_string());
        assert_eq!(
            fill("at {url} {x|y} {not a name} {", &caps),
            "at https://mp y {not a name} {"
        );
        assert_eq!(capture_name("cs(User-Agent)"), "cs_user_agent");
        assert_eq!(capture_name("sc-substatus"), "sc_substatus");
    }
}
