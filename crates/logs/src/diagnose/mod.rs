//! The rules behind `portcullis doctor logs`: records in, known failures out.
//!
//! The rules are data, in `rules.toml` (embedded; [`Rules::builtin`]), checked when loaded:
//! every regex compiles, ids are unique, every `{name}` a text interpolates is a capture some
//! pattern of that rule can make. A rule has:
//!
//! - `id`, `title` (the finding), `cause` and `resolution`;
//! - `match`: matchers, any of which makes a record *evidence* for the rule. A matcher has a
//!   `message` regex, `fields` (W3C field name to a regex the whole value must match, e.g.
//!   `sc-status = "403"`), and/or a `component` regex; all it names must hold;
//! - `supporting`: regexes for lines that explain a finding wherever they appear, in any file
//!   (the connector's certificate filter trail for the 403 it causes); shown only when the
//!   rule fired;
//! - `before` / `after`: regexes for the record right before / after an evidence record in the
//!   same file (the `[CCMHTTP] ERROR: URL=...` line before `StatusText=`), shown as supporting;
//! - `absorbed_by`: ids of (earlier) rules that tell the same failure more precisely. When one
//!   of them fired, this rule's evidence joins the first of them to appear instead of making a
//!   finding of its own.
//!
//! **One record is evidence for at most one rule: the first in table order that matches.** So
//! specific rules come before general ones (403.13/16/17 before any 403). Named capture groups
//! (`(?P<url>...)`) and W3C fields (as `sc_status`, `cs_uri_stem`, `cs_user_agent`...) fill
//! `{url}` or `{url|fallback}` in the title, cause and resolution; the first value seen wins,
//! evidence before context.
//!
//! **Correlation.** The same failure seen from different hops is one finding: the device's
//! `StatusText= CMGConnector_Clientcertificaterequired`, the connector's `Received response
//! ... 403 CMGConnector_Clientcertificaterequired` and the endpoint's IIS `403 7` line are all
//! evidence for `connector-client-cert-required`, because IIS's 403.7 *is* what the connector
//! turns into that status text. Where the endpoint names a more precise cause (403.16 for a
//! `CMGConnector_Forbidden`), the precise rule absorbs the general one. Findings are ordered by
//! their first evidence, in the order files were read.
//!
//! **Outside text picks no rule.** Portcullis's own lines quote what devices sent: a refused
//! certificate's subject or token's header in a refusal's reason, a device's path in the
//! connector's `Forwarding proxy message`/`Received response` lines and in the per-request
//! `Message` lines. A status text quoted so is not the line's own, so a rule is chosen on the
//! line with those parts masked (`own_text`, in `matching`); its captures still come from the
//! whole line.
//!
//! The table and its validation are in `rules`, records matched to rules (evidence, supporting
//! lines, absorption) in `matching`, and the report, as text and as JSON, in `render`.

mod matching;
mod render;
mod rules;

pub use matching::{Diagnosis, MAX_EVIDENCE, MAX_SUPPORTING};
pub use render::{Evidence, FileSummary, Finding, Report, Skip, SHOWN_EVIDENCE, SHOWN_SUPPORTING};
pub use rules::{Rules, RulesError, BUILTIN_RULES};
