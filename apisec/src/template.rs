//! Path templates inferred from live traffic, per service.
//!
//! A trie of path segments. A segment becomes a parameter two ways:
//! - by its **token type**: integers, UUIDs, Mongo ObjectIds, hex of 16+ digits, long mixed
//!   alphanumerics, emails, dates (`/orders/42` → `/orders/{id}`);
//! - by **cardinality**: when one position under one prefix has taken more than
//!   [`TemplateLimits::literal_fanout`] distinct literal values, they are merged into one parameter
//!   (`/users/alice/profile`, `/users/bob/profile`, … → `/users/{param}/profile`), their subtrees
//!   merged with it. Words and version segments (`v1`) otherwise stay literal.
//!
//! A known path is looked up without allocating. Everything a client can grow is capped: nodes,
//! templates, segment length, depth; past a cap a path counts as the service's **overflow**
//! template (`{overflow}`), counted, never stored.

use std::collections::HashMap;

/// What kind of value a parameter holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    Integer,
    Uuid,
    ObjectId,
    Hex,
    /// A long mix of letters and digits (tokens, hashes in base36/base64url).
    Token,
    Email,
    Date,
    /// Made a parameter by cardinality, or holding values of several kinds.
    Param,
}

impl Kind {
    pub fn placeholder(self) -> &'static str {
        match self {
            Kind::Integer => "{id}",
            Kind::Uuid => "{uuid}",
            Kind::ObjectId => "{objectId}",
            Kind::Hex => "{hex}",
            Kind::Token => "{token}",
            Kind::Email => "{email}",
            Kind::Date => "{date}",
            Kind::Param => "{param}",
        }
    }

    /// The kind of a path segment's value, or `None` for a literal.
    pub fn of(seg: &str) -> Option<Kind> {
        let b = seg.as_bytes();
        if b.is_empty() {
            return None;
        }
        if b.iter().all(u8::is_ascii_digit) {
            return Some(if is_date_digits(b) {
                Kind::Date
            } else {
                Kind::Integer
            });
        }
        // A signed integer (`-141222304`).
        if let [b'-' | b'+', rest @ ..] = b
            && !rest.is_empty()
            && rest.iter().all(u8::is_ascii_digit)
        {
            return Some(Kind::Integer);
        }
        if is_uuid(b) {
            return Some(Kind::Uuid);
        }
        let hex = b.iter().all(u8::is_ascii_hexdigit);
        let digits = b.iter().filter(|c| c.is_ascii_digit()).count();
        if hex && b.len() == 24 && digits > 0 {
            return Some(Kind::ObjectId);
        }
        if hex && b.len() >= 16 && digits > 0 {
            return Some(Kind::Hex);
        }
        if is_email(b) {
            return Some(Kind::Email);
        }
        if is_date(b) {
            return Some(Kind::Date);
        }
        let letters = b.iter().filter(|c| c.is_ascii_alphabetic()).count();
        let tokenish = b
            .iter()
            .all(|c| c.is_ascii_alphanumeric() || *c == b'-' || *c == b'_');
        if tokenish && b.len() >= 10 && digits >= 2 && letters >= 2 {
            return Some(Kind::Token);
        }
        // Values, not names: what API path words are not made of (percent-encoded or non-ASCII
        // bytes, `,` `=` `+` `'` `*` …; `:` stays, for custom methods like `things:batchGet`),
        // decimals, and JSON's literal values.
        let wordish = b
            .iter()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'_' | b'.' | b'~' | b':'));
        let decimal = is_number(b);
        // Names do not start or end with `.` or `_` (`.exe`, `__main__`: values).
        let dotted = (matches!(b[0], b'.' | b'_') || matches!(b[b.len() - 1], b'.' | b'_'))
            && seg != ".well-known";
        // No letter or digit at all (`--`, `~~`): not a name. A single `-` may be one
        // (`/-/readiness`); next to a parameter it is a value (`short_value`).
        let punctuation = b.len() > 1 && !b.iter().any(u8::is_ascii_alphanumeric);
        if !wordish
            || decimal
            || dotted
            || punctuation
            || VALUE_WORDS.iter().any(|w| w.eq_ignore_ascii_case(seg))
        {
            return Some(Kind::Param);
        }
        None
    }
}

/// A token that does not look like an API path word — any one character, up to three letters
/// and digits with a capital (`J`, `-`, `UC`, `yC`), or a capitalized word (`Scunthorpe`; path
/// words are lower or camel case: not `me`, `v1`, `export`): a value wherever a position already
/// holds a parameter.
fn short_value(seg: &str) -> bool {
    let b = seg.as_bytes();
    b.len() == 1
        || b.iter().all(u8::is_ascii_alphanumeric)
            && (b.len() <= 3 && b.iter().any(u8::is_ascii_uppercase) || b[0].is_ascii_uppercase())
}

/// A decimal or floating-point number (`12.50`, `-0.5`, `1e100`, `6.02E+23`).
fn is_number(b: &[u8]) -> bool {
    let mut i = usize::from(matches!(b.first(), Some(b'-' | b'+')));
    let int_start = i;
    while i < b.len() && b[i].is_ascii_digit() {
        i += 1;
    }
    let mut digits = i - int_start;
    let mut fraction = false;
    if i < b.len() && b[i] == b'.' {
        i += 1;
        let f = i;
        while i < b.len() && b[i].is_ascii_digit() {
            i += 1;
        }
        digits += i - f;
        fraction = i > f;
    }
    let mut exponent = false;
    if digits > 0 && i < b.len() && matches!(b[i], b'e' | b'E') {
        i += 1;
        if i < b.len() && matches!(b[i], b'-' | b'+') {
            i += 1;
        }
        let e = i;
        while i < b.len() && b[i].is_ascii_digit() {
            i += 1;
        }
        exponent = i > e;
        if !exponent {
            return false;
        }
    }
    digits > 0 && i == b.len() && (fraction || exponent)
}

/// Segments that are values whatever position they are in.
const VALUE_WORDS: &[&str] = &[
    "null",
    "true",
    "false",
    "undefined",
    "nan",
    "nil",
    "none",
    "inf",
    "infinity",
];

fn is_uuid(b: &[u8]) -> bool {
    b.len() == 36
        && b.iter().enumerate().all(|(i, c)| match i {
            8 | 13 | 18 | 23 => *c == b'-',
            _ => c.is_ascii_hexdigit(),
        })
}

fn is_email(b: &[u8]) -> bool {
    let Some(at) = b.iter().position(|c| *c == b'@') else {
        return false;
    };
    let (user, domain) = (&b[..at], &b[at + 1..]);
    !user.is_empty() && domain.contains(&b'.') && !domain.contains(&b'@')
}

/// `YYYY-MM-DD`.
fn is_date(b: &[u8]) -> bool {
    b.len() == 10
        && b[4] == b'-'
        && b[7] == b'-'
        && is_date_digits(&[b[0], b[1], b[2], b[3], b[5], b[6], b[8], b[9]])
}

/// `YYYYMMDD` with a plausible month and day.
fn is_date_digits(b: &[u8]) -> bool {
    if b.len() != 8 || !b.iter().all(u8::is_ascii_digit) {
        return false;
    }
    let n = |s: &[u8]| s.iter().fold(0u32, |a, c| a * 10 + u32::from(c - b'0'));
    let (y, m, d) = (n(&b[..4]), n(&b[4..6]), n(&b[6..]));
    (1900..=2199).contains(&y) && (1..=12).contains(&m) && (1..=31).contains(&d)
}

/// Caps on what one service's templates may hold.
#[derive(Debug, Clone, Copy)]
pub struct TemplateLimits {
    /// Trie nodes (one per distinct segment per position).
    pub max_nodes: usize,
    /// Distinct templates.
    pub max_templates: usize,
    /// Distinct literals at one position under one prefix before they become one parameter.
    pub literal_fanout: usize,
    /// Segments per path.
    pub max_depth: usize,
    /// A longer segment is a `{token}` whatever it looks like.
    pub max_segment_len: usize,
    /// Example paths kept per template, and their length.
    pub examples: usize,
    pub example_len: usize,
}

impl Default for TemplateLimits {
    fn default() -> Self {
        Self {
            max_nodes: 2048,
            max_templates: 512,
            literal_fanout: 64,
            max_depth: 32,
            max_segment_len: 128,
            examples: 3,
            example_len: 128,
        }
    }
}

/// A template's handle; stable for the life of the service's trie (a merged template forwards to
/// the one it was merged into, see [`Templates::resolve`]).
pub type TemplateId = u32;

/// The overflow template's handle.
pub const OVERFLOW: TemplateId = u32::MAX;

#[derive(Debug)]
enum Label {
    Root,
    Literal(Box<str>),
    Param(Kind),
}

#[derive(Debug)]
struct Node {
    parent: u32,
    label: Label,
    literals: HashMap<Box<str>, u32>,
    param: Option<u32>,
    /// Made a parameter by cardinality: every new value goes to the parameter.
    collapsed: bool,
    /// A path ends here.
    template: Option<TemplateId>,
}

#[derive(Debug)]
struct Template {
    node: u32,
    examples: Vec<String>,
    merged_into: Option<TemplateId>,
}

/// One service's templates.
#[derive(Debug)]
pub struct Templates {
    limits: TemplateLimits,
    nodes: Vec<Node>,
    templates: Vec<Template>,
    overflow: u64,
}

impl Templates {
    pub fn new(limits: TemplateLimits) -> Self {
        Self {
            limits,
            nodes: vec![Node {
                parent: 0,
                label: Label::Root,
                literals: HashMap::new(),
                param: None,
                collapsed: false,
                template: None,
            }],
            templates: Vec::new(),
            overflow: 0,
        }
    }

    /// The template of a path already learned, without allocating; `None` if it is new.
    pub fn lookup(&self, path: &str) -> Option<TemplateId> {
        let mut node = 0usize;
        let mut depth = 0;
        for seg in segments(path) {
            depth += 1;
            if depth > self.limits.max_depth {
                return None;
            }
            let n = &self.nodes[node];
            node = match n.literals.get(seg) {
                Some(&child) => child as usize,
                // A parameter takes values of a parameter's kind, or anything once collapsed.
                None if n.collapsed
                    || seg.len() > self.limits.max_segment_len
                    || Kind::of(seg).is_some()
                    || short_value(seg) =>
                {
                    n.param? as usize
                }
                None => return None,
            };
        }
        self.nodes[node].template.map(|t| self.resolve(t))
    }

    /// The template of `path`, learning it if new (which may merge literals into a parameter);
    /// [`OVERFLOW`] once a cap is reached.
    pub fn learn(&mut self, path: &str) -> TemplateId {
        let mut node = 0usize;
        for (depth, seg) in segments(path).enumerate() {
            if depth >= self.limits.max_depth {
                return self.overflowed();
            }
            let Some(next) = self.step(node, seg) else {
                return self.overflowed();
            };
            node = next;
        }
        let t = match self.nodes[node].template {
            Some(t) => self.resolve(t),
            None => {
                if self.live_templates() >= self.limits.max_templates {
                    return self.overflowed();
                }
                let t = self.templates.len() as TemplateId;
                self.templates.push(Template {
                    node: node as u32,
                    examples: Vec::new(),
                    merged_into: None,
                });
                self.nodes[node].template = Some(t);
                t
            }
        };
        self.note_example(t, path);
        t
    }

    /// One segment down from `node`, creating what is needed; `None` at the node cap.
    fn step(&mut self, node: usize, seg: &str) -> Option<usize> {
        if let Some(&child) = self.nodes[node].literals.get(seg) {
            return Some(child as usize);
        }
        let kind = if seg.len() > self.limits.max_segment_len {
            Some(Kind::Token)
        } else {
            Kind::of(seg)
        };
        let n = &self.nodes[node];
        match (kind, n.param, n.collapsed) {
            // A parameter's value, or any new value at a collapsed position.
            (Some(k), Some(p), _) => {
                self.widen(p as usize, k);
                return Some(p as usize);
            }
            (None, Some(p), true) => return Some(p as usize),
            // A short token that is not a lowercase word, next to a parameter: a value of it.
            (None, Some(p), false) if short_value(seg) => return Some(p as usize),
            (Some(k), None, _) => {
                let param = self.add_child(node, Label::Param(k))?;
                self.absorb_short_values(node, param);
                return Some(param);
            }
            (None, _, _) => {}
        }
        // A literal. Too many distinct ones here: they become one parameter.
        if self.nodes[node].literals.len() >= self.limits.literal_fanout {
            return self.collapse(node);
        }
        self.add_child(node, Label::Literal(seg.into()))
    }

    /// A new parameter at `node` takes in the short-value literals already there (learned
    /// before the position was known to hold values).
    fn absorb_short_values(&mut self, node: usize, param: usize) {
        let values: Vec<Box<str>> = self.nodes[node]
            .literals
            .keys()
            .filter(|l| short_value(l))
            .cloned()
            .collect();
        if values.is_empty() {
            return;
        }
        if let Label::Param(k) = &mut self.nodes[param].label {
            *k = Kind::Param;
        }
        for v in values {
            if let Some(child) = self.nodes[node].literals.remove(&v) {
                self.merge(param, child as usize);
            }
        }
    }

    fn widen(&mut self, param: usize, k: Kind) {
        if let Label::Param(old) = &mut self.nodes[param].label
            && *old != k
        {
            *old = Kind::Param;
        }
    }

    fn add_child(&mut self, node: usize, label: Label) -> Option<usize> {
        if self.nodes.len() >= self.limits.max_nodes {
            return None;
        }
        let id = self.nodes.len() as u32;
        let is_param = matches!(label, Label::Param(_));
        let key = match &label {
            Label::Literal(s) => Some(s.clone()),
            _ => None,
        };
        self.nodes.push(Node {
            parent: node as u32,
            label,
            literals: HashMap::new(),
            param: None,
            collapsed: false,
            template: None,
        });
        match key {
            Some(k) => {
                self.nodes[node].literals.insert(k, id);
            }
            None if is_param => self.nodes[node].param = Some(id),
            None => {}
        }
        Some(id as usize)
    }

    /// Merges every literal child of `node` into its parameter child (made if missing), so the
    /// position is a parameter from now on; returns the parameter.
    fn collapse(&mut self, node: usize) -> Option<usize> {
        let param = match self.nodes[node].param {
            Some(p) => p as usize,
            None => self.add_child(node, Label::Param(Kind::Param))?,
        };
        if let Label::Param(k) = &mut self.nodes[param].label {
            *k = Kind::Param;
        }
        self.nodes[node].collapsed = true;
        let literals = std::mem::take(&mut self.nodes[node].literals);
        for (_, child) in literals {
            self.merge(param, child as usize);
        }
        Some(param)
    }

    /// Moves everything under `src` into `dst` (two nodes at the same position).
    fn merge(&mut self, dst: usize, src: usize) {
        if let Some(ts) = self.nodes[src].template.take() {
            match self.nodes[dst].template {
                Some(td) => {
                    let moved = std::mem::take(&mut self.templates[ts as usize].examples);
                    self.templates[ts as usize].merged_into = Some(td);
                    for e in moved {
                        self.push_example(td, e);
                    }
                }
                None => {
                    self.nodes[dst].template = Some(ts);
                    self.templates[ts as usize].node = dst as u32;
                }
            }
        }
        let literals = std::mem::take(&mut self.nodes[src].literals);
        for (label, child) in literals {
            match self.nodes[dst].literals.get(&label) {
                Some(&d) => self.merge(d as usize, child as usize),
                None => {
                    self.nodes[child as usize].parent = dst as u32;
                    self.nodes[dst].literals.insert(label, child);
                }
            }
        }
        if let Some(sp) = self.nodes[src].param.take() {
            match self.nodes[dst].param {
                Some(dp) => self.merge(dp as usize, sp as usize),
                None => {
                    self.nodes[sp as usize].parent = dst as u32;
                    self.nodes[dst].param = Some(sp);
                }
            }
        }
        if self.nodes[src].collapsed {
            self.nodes[dst].collapsed = true;
        }
    }

    /// The template a (possibly merged) template now is.
    pub fn resolve(&self, mut t: TemplateId) -> TemplateId {
        while let Some(next) = self.templates.get(t as usize).and_then(|x| x.merged_into) {
            t = next;
        }
        t
    }

    /// `/orders/{id}/items`; `{overflow}` for [`OVERFLOW`].
    pub fn text(&self, t: TemplateId) -> String {
        if t == OVERFLOW {
            return "{overflow}".into();
        }
        let t = self.resolve(t);
        let mut parts = Vec::new();
        let mut node = self.templates[t as usize].node as usize;
        while node != 0 {
            let n = &self.nodes[node];
            parts.push(match &n.label {
                Label::Literal(s) => s.to_string(),
                Label::Param(k) => k.placeholder().to_owned(),
                Label::Root => String::new(),
            });
            node = n.parent as usize;
        }
        parts.reverse();
        format!("/{}", parts.join("/"))
    }

    /// The depth (0-based segment index) of a template's last parameter, if it has one: where an
    /// object ID is in its paths. Walks the template's nodes; allocates nothing.
    pub fn last_param_depth(&self, t: TemplateId) -> Option<usize> {
        if t == OVERFLOW {
            return None;
        }
        let t = self.resolve(t);
        let mut node = self.templates.get(t as usize)?.node as usize;
        let mut depth = 0;
        let mut walk = node;
        while walk != 0 {
            depth += 1;
            walk = self.nodes[walk].parent as usize;
        }
        while node != 0 {
            depth -= 1;
            if matches!(self.nodes[node].label, Label::Param(_)) {
                return Some(depth);
            }
            node = self.nodes[node].parent as usize;
        }
        None
    }

    /// Up to [`TemplateLimits::examples`] raw paths seen for a template.
    pub fn examples(&self, t: TemplateId) -> &[String] {
        if t == OVERFLOW {
            return &[];
        }
        &self.templates[self.resolve(t) as usize].examples
    }

    /// Templates that are not merged into another.
    pub fn live_templates(&self) -> usize {
        self.templates
            .iter()
            .filter(|t| t.merged_into.is_none())
            .count()
    }

    /// Calls that hit a cap.
    pub fn overflow(&self) -> u64 {
        self.overflow
    }

    pub fn nodes(&self) -> usize {
        self.nodes.len()
    }

    /// Every live template.
    pub fn all(&self) -> impl Iterator<Item = TemplateId> + '_ {
        self.templates
            .iter()
            .enumerate()
            .filter(|(_, t)| t.merged_into.is_none())
            .map(|(i, _)| i as TemplateId)
    }

    fn overflowed(&mut self) -> TemplateId {
        self.overflow += 1;
        OVERFLOW
    }

    fn note_example(&mut self, t: TemplateId, path: &str) {
        if t == OVERFLOW {
            return;
        }
        let have = &self.templates[t as usize].examples;
        if have.len() < self.limits.examples && !have.iter().any(|e| e == path) {
            let mut e = path.to_owned();
            truncate(&mut e, self.limits.example_len);
            self.templates[t as usize].examples.push(e);
        }
    }

    fn push_example(&mut self, t: TemplateId, e: String) {
        let have = &mut self.templates[t as usize].examples;
        if have.len() < self.limits.examples && !have.contains(&e) {
            have.push(e);
        }
    }
}

/// A path's segments; the empty ones (`//`, a trailing `/`) are dropped: `/a/` is `/a`.
fn segments(path: &str) -> impl Iterator<Item = &str> {
    path.split('/').filter(|s| !s.is_empty())
}

fn truncate(s: &mut String, max: usize) {
    if s.len() > max {
        let mut cut = max;
        while !s.is_char_boundary(cut) {
            cut -= 1;
        }
        s.truncate(cut);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn learned(paths: &[&str]) -> Templates {
        let mut t = Templates::new(TemplateLimits::default());
        for p in paths {
            t.learn(p);
        }
        t
    }

    fn text_of(t: &Templates, path: &str) -> String {
        t.text(
            t.lookup(path)
                .unwrap_or_else(|| panic!("{path} not learned")),
        )
    }

    #[test]
    fn token_types_become_parameters_and_words_stay_literal() {
        let cases = [
            ("/orders/42/items", "/orders/{id}/items"),
            ("/orders/2024/items", "/orders/{id}/items"),
            (
                "/users/3f2b8c1e-9a4d-4e7b-8c2a-1f0e9d8c7b6a",
                "/users/{uuid}",
            ),
            ("/docs/507f1f77bcf86cd799439011", "/docs/{objectId}"),
            ("/blobs/deadbeef00112233", "/blobs/{hex}"),
            ("/sessions/a8f3k2j9x1q7", "/sessions/{token}"),
            ("/people/jane.doe@example.com", "/people/{email}"),
            ("/reports/2026-12-01", "/reports/{date}"),
            ("/reports/20261201", "/reports/{date}"),
            ("/api/v1/status", "/api/v1/status"),
            ("/users/me/settings", "/users/me/settings"),
            ("/cache/-141222304", "/cache/{id}"),
            ("/status/null,null", "/status/{param}"),
            ("/status/null", "/status/{param}"),
            ("/flags/true", "/flags/{param}"),
            ("/anything/%C3%82R%C3%8B", "/anything/{param}"),
            ("/q/a=b", "/q/{param}"),
            ("/prices/12.50", "/prices/{param}"),
            ("/anything/False", "/anything/{param}"),
            ("/anything/.exe", "/anything/{param}"),
            ("/anything/__main__", "/anything/{param}"),
            ("/anything/~~", "/anything/{param}"),
            ("/anything/1e100", "/anything/{param}"),
            ("/anything/-0.5", "/anything/{param}"),
            ("/anything/INF", "/anything/{param}"),
            // Names stay names: files, versions, custom methods, dashes.
            ("/static/app.min.js", "/static/app.min.js"),
            ("/api/v1.2/things:batchGet", "/api/v1.2/things:batchGet"),
            ("/lib/1.2.3/x", "/lib/1.2.3/x"),
            ("/-/health-check", "/-/health-check"),
            (
                "/.well-known/openid-configuration",
                "/.well-known/openid-configuration",
            ),
        ];
        for (path, want) in cases {
            let t = learned(&[path]);
            assert_eq!(text_of(&t, path), want, "{path}");
        }
    }

    #[test]
    fn one_parameter_per_position_keeps_literal_siblings() {
        let t = learned(&[
            "/users/1",
            "/users/2",
            "/users/me",
            "/users/3f2b8c1e-9a4d-4e7b-8c2a-1f0e9d8c7b6a",
        ]);
        assert_eq!(
            text_of(&t, "/users/77"),
            "/users/{param}",
            "two kinds widen to {{param}}"
        );
        assert_eq!(text_of(&t, "/users/me"), "/users/me");
        assert_eq!(t.live_templates(), 2);
    }

    #[test]
    fn many_distinct_words_at_one_position_become_a_parameter() {
        let mut t = Templates::new(TemplateLimits {
            literal_fanout: 8,
            ..Default::default()
        });
        let names = [
            "alice", "bob", "carol", "dave", "erin", "frank", "grace", "heidi", "ivan", "judy",
        ];
        for n in names {
            t.learn(&format!("/users/{n}/profile"));
            t.learn(&format!("/users/{n}/orders/1"));
        }
        t.learn("/users/list");
        assert_eq!(
            text_of(&t, "/users/alice/profile"),
            "/users/{param}/profile"
        );
        assert_eq!(
            text_of(&t, "/users/zed/orders/5"),
            "/users/{param}/orders/{id}"
        );
        // Merged, not duplicated: two templates (plus the literal learned before the collapse
        // merged too).
        let texts: std::collections::BTreeSet<String> = t.all().map(|x| t.text(x)).collect();
        assert_eq!(
            texts,
            [
                "/users/{param}",
                "/users/{param}/orders/{id}",
                "/users/{param}/profile"
            ]
            .map(String::from)
            .into()
        );
        assert!(t.examples(t.lookup("/users/x/profile").unwrap()).len() <= 3);
    }

    #[test]
    fn grpc_and_trailing_slashes() {
        let t = learned(&["/orders.v1.Orders/Get", "/a/b/"]);
        assert_eq!(
            text_of(&t, "/orders.v1.Orders/Get"),
            "/orders.v1.Orders/Get"
        );
        assert_eq!(text_of(&t, "/a/b"), "/a/b");
        assert_eq!(text_of(&learned(&["/"]), "/"), "/");
    }

    #[test]
    fn spraying_random_paths_is_bounded() {
        let limits = TemplateLimits::default();
        let mut t = Templates::new(limits);
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut word = || {
            // xorshift: deterministic "random" lowercase words of 3–12 letters
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let len = 3 + (x % 10) as usize;
            (0..len)
                .map(|i| (b'a' + ((x >> (i * 5)) % 26) as u8) as char)
                .collect::<String>()
        };
        for _ in 0..100_000 {
            let depth = 1 + (word().len() % 6);
            let path: String = (0..depth).map(|_| format!("/{}", word())).collect();
            t.learn(&path);
        }
        assert!(t.nodes() <= limits.max_nodes, "{} nodes", t.nodes());
        assert!(t.live_templates() <= limits.max_templates);
        // Cardinality folded most of it into parameters; what did not fit overflowed, counted.
        let texts: Vec<String> = t.all().map(|x| t.text(x)).collect();
        assert!(
            texts.iter().any(|s| s.starts_with("/{param}")),
            "{:?}",
            &texts[..texts.len().min(5)]
        );
        println!(
            "nodes {} templates {} overflow {}",
            t.nodes(),
            t.live_templates(),
            t.overflow()
        );
    }

    #[test]
    fn caps_overflow_instead_of_growing() {
        let mut t = Templates::new(TemplateLimits {
            max_nodes: 5,
            ..Default::default()
        });
        for p in ["/a", "/b", "/c", "/d", "/e", "/f"] {
            t.learn(p);
        }
        assert_eq!(t.nodes(), 5);
        assert_eq!(t.learn("/g"), OVERFLOW);
        assert_eq!(t.overflow(), 3, "/e, /f and /g");
        assert_eq!(t.text(OVERFLOW), "{overflow}");
        // Known paths are still found.
        assert_eq!(t.text(t.lookup("/a").unwrap()), "/a");
        let deep = "/x".repeat(40);
        assert_eq!(t.learn(&deep), OVERFLOW);
    }

    #[test]
    fn long_segments_are_tokens_and_examples_are_short() {
        let long = "x".repeat(500);
        let t = learned(&[&format!("/files/{long}")]);
        let id = t.lookup(&format!("/files/{long}")).unwrap();
        assert_eq!(t.text(id), "/files/{token}");
        assert!(t.examples(id)[0].len() <= 128);
    }
}

#[cfg(test)]
mod short_value_tests {
    use super::*;

    #[test]
    fn short_tokens_next_to_a_parameter_are_values_whatever_came_first() {
        let mut t = Templates::new(TemplateLimits::default());
        // Learned before the position is known to hold values…
        for p in ["/anything/J", "/anything/UC", "/users/me", "/api/v1"] {
            t.learn(p);
        }
        // …then a value arrives: the short tokens join it; `me` and `v1` stay names.
        let param = t.learn("/anything/.exe");
        assert_eq!(t.text(param), "/anything/{param}");
        for p in [
            "/anything/J",
            "/anything/UC",
            "/anything/yC",
            "/anything/q",
            "/anything/-",
            "/anything/Scunthorpe",
        ] {
            let id = t.lookup(p).unwrap_or_else(|| t.learn(p));
            assert_eq!(t.text(id), "/anything/{param}", "{p}");
        }
        t.learn("/users/42");
        t.learn("/users/export");
        assert_eq!(t.text(t.lookup("/users/export").unwrap()), "/users/export");
        assert_eq!(t.text(t.lookup("/users/me").unwrap()), "/users/me");
        assert_eq!(t.text(t.lookup("/api/v1").unwrap()), "/api/v1");
    }
}
